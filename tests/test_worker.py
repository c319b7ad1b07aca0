"""The streaming worker through real ZMQ sockets on loopback, a real Redis, and real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from inspector.artifact import save_artifact
from inspector.banks import encode_bank, open_store
from inspector.banks.register import ShotImage, register_product
from inspector.config import load_config
from inspector.decode import encode_jpeg
from inspector.model import InspectionModel
from inspector.wire import FrameHeader, Result, encode_frame
from inspector.worker.loop import Worker

from .conftest import REPO, free_port, tiny_config

RESULT_TIMEOUT_S = 60.0  # generous: a loaded 2-core CI machine; tests finish far sooner when healthy


@pytest.fixture(scope="module")
def line_setup(tmp_path_factory):
    """A tiny model artifact and a file bank store with two registered products."""
    base = tmp_path_factory.mktemp("worker")
    torch.manual_seed(0)
    model = InspectionModel(tiny_config()).eval()
    card = save_artifact(model, base / "model", None)
    store = open_store(f"file://{base / 'banks'}")
    rng = np.random.default_rng(0)
    for i, name in enumerate(("valve-a", "valve-b")):
        shots = [ShotImage(f"{name}{k}", f"{i}{k:063d}", (rng.random((64, 64, 3)) * 80 + 60 * i).astype(np.uint8))
                 for k in range(3)]
        reg = register_product(model, card.signature, card.model_id, name, shots, bank_images=3)
        store.put("7", encode_bank(reg.bank, reg.meta), reg.meta)
    return base


def config(base: Path, **overrides):
    flat = {"engine.artifact": str(base / "model"), "banks.store": f"file://{base / 'banks'}",
            "ingest.bind": f"tcp://127.0.0.1:{free_port()}", "publish.bind": f"tcp://127.0.0.1:{free_port()}",
            "http.port": 0, "engine.batch_sizes": "1,2", "batch.max_batch": 2, "engine.device": "cpu",
            "publish.heatmaps": "all"}
    flat.update(overrides)
    return load_config(None, {}, flat, "7")


class Line:
    """A worker running in a thread plus a camera socket and a results subscriber."""

    def __init__(self, cfg) -> None:
        self.worker = Worker(cfg, install_signals=False).start()
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"result.7.")
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.connect(cfg.publish.bind)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(cfg.ingest.bind)
        self._handshake()

    def _handshake(self) -> None:
        """Send probes until the subscriber sees one (ZMQ subscriptions take a moment to join)."""
        end = time.monotonic() + RESULT_TIMEOUT_S
        while time.monotonic() < end:
            self.push.send_multipart([b"probe"])
            if self.sub.poll(100):
                break
        while self.sub.poll(300):  # let the remaining probes' results drain
            self.sub.recv_multipart()

    def send(self, frame_id: str, image: np.ndarray | None = None, **header) -> None:
        image = image if image is not None else np.full((64, 64, 3), 120, np.uint8)
        h = FrameHeader(frame_id=frame_id, camera="cam1", ts_ns=time.time_ns(), encoding="jpeg", **header)
        self.push.send_multipart(encode_frame(h, encode_jpeg(image)))

    def results(self, n: int) -> list[tuple[Result, bytes]]:
        out = []
        end = time.monotonic() + RESULT_TIMEOUT_S
        while len(out) < n and time.monotonic() < end:
            if self.sub.poll(100):
                out.append(Result.from_frames(self.sub.recv_multipart()))
        return out

    def close(self) -> None:
        self.worker.stop()
        self.thread.join(RESULT_TIMEOUT_S)
        self.push.close(0)
        self.sub.close(0)
        self.ctx.term()


@pytest.fixture
def line(line_setup):
    lines = []

    def make(**overrides) -> Line:
        lines.append(Line(config(line_setup, **overrides)))
        return lines[-1]

    yield make
    for ln in lines:
        ln.close()


def test_every_frame_gets_exactly_one_result(line) -> None:
    ln = line()
    ids = [f"f{i}" for i in range(24)]
    for i, fid in enumerate(ids):
        ln.send(fid, product="valve-a" if i % 3 == 0 else None)
    results = ln.results(len(ids))
    got = sorted(r.frame_id for r, _ in results)
    assert got == sorted(ids)
    for r, png in results:
        assert r.verdict in ("pass", "fail") and r.line == "7" and r.model == ln.worker.card.model_id
        assert r.latency_ms.total >= r.latency_ms.infer > 0 and r.bank_epoch == 2
        assert r.heatmap is not None and png.startswith(b"\x89PNG")
    assert not ln.sub.poll(300), "a frame got a second result"


def _bad_inputs() -> list[tuple[str, list[bytes]]]:
    good = FrameHeader(frame_id="x", camera="cam1", ts_ns=1, encoding="jpeg")
    jpeg = encode_jpeg(np.full((64, 64, 3), 100, np.uint8))

    def header(**kw) -> bytes:
        data = json.loads(good.to_json())
        data.update(kw)
        return json.dumps({k: v for k, v in data.items() if v != "__drop__"}).encode()

    raw = FrameHeader(frame_id="raw", camera="cam1", ts_ns=1, encoding="raw", shape=(8, 8, 3), pixel_format="rgb8")
    return [
        ("bad_header", [b"{not json", jpeg]),
        ("missing_field", [header(frame_id="mf", camera="__drop__"), jpeg]),
        ("bad_version", [header(frame_id="bv", v=2), jpeg]),
        ("bad_parts", [header(frame_id="one")]),
        ("corrupt_image", [header(frame_id="trunc"), jpeg[: len(jpeg) // 2]]),
        ("payload_size_mismatch", [raw.to_json(), bytes(8 * 8 * 3 - 1)]),
        ("unknown_encoding", [header(frame_id="enc", encoding="webp"), jpeg]),
        ("header_too_large", [header(frame_id="big", pad="x" * 5000), jpeg]),
        ("payload_too_large", [header(frame_id="huge"), bytes(2 * 2**20)]),
    ]


def test_bad_inputs_get_error_results_and_the_worker_keeps_serving(line) -> None:
    ln = line(**{"ingest.max_payload_bytes": 2**20})
    cases = _bad_inputs()
    for _, parts in cases:
        ln.push.send_multipart(parts)
    ln.send("after")
    results = ln.results(len(cases) + 1)
    reasons = sorted(r.reason for r, _ in results if r.verdict == "error")
    assert reasons == sorted(reason for reason, _ in cases)
    after = [r for r, _ in results if r.frame_id == "after"]
    assert len(after) == 1 and after[0].verdict in ("pass", "fail")


def test_overload_drops_with_results_and_accounts_for_every_frame(line) -> None:
    ln = line(**{"ingest.queue_size": 3, "batch.max_delay_ms": 0})
    n = 60  # sent in a burst: many times what the worker serves while they arrive
    for i in range(n):
        ln.send(f"o{i}")
    results = ln.results(n)
    ids = [r.frame_id for r, _ in results]
    assert sorted(ids) == sorted(f"o{i}" for i in range(n))
    verdicts = [r.verdict for r, _ in results]
    assert verdicts.count("dropped") > 0
    assert all(r.reason == "overload" for r, _ in results if r.verdict == "dropped")
    assert len(verdicts) == sum(verdicts.count(v) for v in ("pass", "fail", "dropped"))


def test_frames_past_their_deadline_time_out(line) -> None:
    ln = line(**{"batch.max_delay_ms": 200, "batch.max_batch": 4})
    ln.send("late", deadline_ms=1.0)
    (r, _), = ln.results(1)
    assert (r.frame_id, r.verdict, r.reason) == ("late", "timeout", "deadline_exceeded")


def test_unknown_product_hint_fails_safe(line) -> None:
    ln = line()
    ln.send("hinted", product="valve-z")
    (r, _), = ln.results(1)
    assert (r.verdict, r.reason, r.product) == ("fail", "unknown_product", "valve-z")


def test_absent_or_stalled_subscriber_never_blocks_inference(line_setup) -> None:
    cfg = config(line_setup, **{"publish.sndhwm": 1, "publish.heatmaps": "all"})
    worker = Worker(cfg, install_signals=False).start()
    ctx = zmq.Context()
    stalled = ctx.socket(zmq.SUB)  # subscribes, never reads
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.connect(cfg.publish.bind)
    push = ctx.socket(zmq.PUSH)
    push.connect(cfg.ingest.bind)
    n = 30
    for i in range(n):
        h = FrameHeader(frame_id=f"s{i}", camera="cam1", ts_ns=time.time_ns(), encoding="jpeg")
        push.send_multipart(encode_frame(h, encode_jpeg(np.full((64, 64, 3), 90, np.uint8))))
    try:
        thread = threading.Thread(target=worker.run, kwargs={"max_frames": n}, daemon=True)
        thread.start()
        thread.join(RESULT_TIMEOUT_S)
        assert not thread.is_alive() and worker.processed == n
        assert worker.publisher.published == n
    finally:
        push.close(0)
        stalled.close(0)
        ctx.term()


def test_results_go_to_the_redis_stream(line_setup, redis_url, redis_prefix) -> None:
    from inspector.banks import FileStore

    store = open_store(redis_url, prefix=redis_prefix)
    src = FileStore(line_setup / "banks")
    for product, version in src.state("7").products.items():
        store.put("7", src.blob("7", product), src.meta("7", product))
    cfg = config(line_setup, **{"banks.store": redis_url, "banks.prefix": redis_prefix})
    ln = Line(cfg)
    try:
        for i in range(5):
            ln.send(f"r{i}")
        assert len(ln.results(5)) == 5
        key = f"{redis_prefix}:line:7:results"
        end = time.monotonic() + RESULT_TIMEOUT_S
        entries = []
        while time.monotonic() < end:
            entries = [json.loads(f[b"result"]) for _, f in store.client.xrange(key)]
            if len([e for e in entries if e["frame_id"].startswith("r")]) == 5:
                break
            time.sleep(0.05)
        assert sorted(e["frame_id"] for e in entries if e["frame_id"].startswith("r")) == [f"r{i}" for i in range(5)]
        beat = json.loads(store.client.get(f"{redis_prefix}:line:7:heartbeat"))
        assert beat["status"] == "ready" and beat["products"] == ["valve-a", "valve-b"]
    finally:
        ln.close()


# -- the real process ------------------------------------------------------------------------------
def _notify_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.1)
    return sock


def received(http_port: int) -> float:
    """``inspector_messages_received`` from the worker's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=2).read().decode()
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("inspector_messages_received "))


def test_process_ready_notify_watchdog_and_sigterm_drain(line_setup, tmp_path) -> None:
    """READY only after warm-up (and /readyz 503 before); SIGTERM publishes every accepted
    frame's result before exit 0; WATCHDOG and STOPPING arrive on the socket the test opens."""
    notify = _notify_socket(tmp_path)
    http_port, ingest, publish = free_port(), f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="400000",
               PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "inspector", "run", "--line", "7", "--artifact", str(line_setup / "model"),
           "--store", f"file://{line_setup / 'banks'}", "--bind", ingest, "--publish-bind", publish,
           "--http-port", str(http_port), "--device", "cpu", "--set", "engine.batch_sizes=1,2,4,8",
           "--max-batch", "2", "--max-delay-ms", "5", "--deadline-ms", "60000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    messages: list[str] = []
    saw_not_ready = False
    try:
        end = time.monotonic() + RESULT_TIMEOUT_S
        while "READY=1" not in "".join(messages) and time.monotonic() < end:
            try:
                messages.append(notify.recv(4096).decode())
            except socket.timeout:
                pass
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=0.2)
            except urllib.error.HTTPError as err:
                saw_not_ready |= err.code == 503
            except OSError:
                pass
        assert "READY=1" in "".join(messages), proc.stdout.read1().decode() if proc.poll() is not None else ""
        assert saw_not_ready, "/readyz never answered 503 before READY"
        assert urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2).status == 200

        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"result.7.")
        sub.connect(publish)
        push = ctx.socket(zmq.PUSH)
        push.connect(ingest)
        while True:  # handshake, as above
            push.send_multipart([b"probe"])
            if sub.poll(100):
                break
        while sub.poll(300):
            sub.recv_multipart()
        n = 12
        before = received(http_port)
        for i in range(n):
            h = FrameHeader(frame_id=f"t{i}", camera="cam1", ts_ns=time.time_ns(), encoding="jpeg")
            push.send_multipart(encode_frame(h, encode_jpeg(np.full((64, 64, 3), 70, np.uint8))))
        # The drain covers frames the ingest took off the socket: wait until it has all of them.
        end = time.monotonic() + RESULT_TIMEOUT_S
        while received(http_port) < before + n:
            assert time.monotonic() < end, "the ingest never took the frames off the socket"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        got = []
        while proc.poll() is None or sub.poll(200):
            if sub.poll(100):
                got.append(Result.from_frames(sub.recv_multipart())[0].frame_id)
        assert proc.wait(RESULT_TIMEOUT_S) == 0
        assert sorted(got) == sorted(f"t{i}" for i in range(n))
        while True:
            try:
                messages.append(notify.recv(4096).decode())
            except socket.timeout:
                break
        joined = "\n".join(messages)
        assert "WATCHDOG=1" in joined and "STOPPING=1" in joined
        push.close(0)
        sub.close(0)
        ctx.term()
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()


def test_bad_artifact_is_a_clear_startup_error(tmp_path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    (tmp_path / "model").mkdir()
    proc = subprocess.run([sys.executable, "-m", "inspector", "run", "--line", "7", "--artifact",
                           str(tmp_path / "model"), "--store", f"file://{tmp_path / 'banks'}", "--http-port", "0"],
                          env=env, capture_output=True, text=True, timeout=RESULT_TIMEOUT_S)
    assert proc.returncode == 2
    assert "not a model artifact" in proc.stderr and "startup_failed" in proc.stdout


def test_camera_simulator_and_tail_with_the_worker(line, tmp_path) -> None:
    """``inspector publish``'s camera feeds the worker; the tail's summary accounts for every frame."""
    from inspector.tools.camera import CameraConfig, FrameSource, publish_frames
    from inspector.tools.tail import summarize

    ln = line()
    record = tmp_path / "sent.jsonl"
    source = FrameSource.generated(("tiles", "rings"), size=64, per_product=3)
    sent = publish_frames(source, CameraConfig(connect=ln.worker.cfg.ingest.bind, camera="cam1", rate_fps=0,
                                               count=10), record=record)
    assert sent.sent == 10
    results = ln.results(10)
    ids = [json.loads(line)["frame_id"] for line in record.read_text().splitlines()]
    assert sorted(r.frame_id for r, _ in results) == sorted(ids)
    summary = summarize(results)
    assert summary.received == 10 and sum(summary.counts.values()) == 10 and summary.malformed == 0


def test_worker_serves_a_compiled_onnx_program(line, line_setup, tmp_path) -> None:
    """engine.backend = onnx: the worker loads the keyed program and serves the same verdicts."""
    from deploy.compile import compile_program

    path, _, _ = compile_program(line_setup / "model", "onnx", [1, 2], "fp32", products=16,
                                 out=tmp_path / "m.onnx", say=lambda _m: None)
    eager = line()
    onnx = line(**{"engine.backend": "onnx", "engine.compiled": str(path)})
    rng = np.random.default_rng(3)
    images = [(rng.random((64, 64, 3)) * 255).astype(np.uint8) for _ in range(4)]
    verdicts = []
    for ln in (eager, onnx):
        for i, img in enumerate(images):
            ln.send(f"c{i}", img)
        verdicts.append({r.frame_id: r for r, _ in ln.results(4)})
    assert sorted(verdicts[0]) == sorted(verdicts[1]) == [f"c{i}" for i in range(4)]
    for fid, want in verdicts[0].items():
        got = verdicts[1][fid]
        assert (got.verdict, got.product) == (want.verdict, want.product)
        assert abs(got.score - want.score) <= 1e-4  # fp32 on both sides; reordered sums differ by ~1e-6


def test_every_metric_the_grafana_dashboard_queries_is_on_metrics(line) -> None:
    """The dashboard next to the systemd unit queries only series a running worker exposes, and the
    traffic panels' series carry samples once frames have been served."""
    import re

    dashboard = json.loads((REPO / "systemd" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queried = set(re.findall(r"\binspector_[a-z_]+\b", " ".join(exprs)))
    assert len(queried) >= 15, sorted(queried)
    ln = line()
    for i in range(4):
        ln.send(f"g{i}", product="valve-a" if i % 2 else None)
    assert len(ln.results(4)) == 4
    text = urllib.request.urlopen(f"http://127.0.0.1:{ln.worker.health.port}/metrics", timeout=5).read().decode()
    declared = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) ", text, re.MULTILINE)}
    sampled = {m.group(1) for m in re.finditer(r"^(inspector_[a-z_]+)(?:\{| )", text, re.MULTILINE)}
    suffixes = ("_total", "_bucket", "_count", "_sum")
    for name in sorted(queried):
        family = next((name[: -len(s)] for s in suffixes if name.endswith(s)), name)
        assert name in sampled or name in declared or family in declared, f"{name} is not on /metrics"
    for name in ("inspector_results_total", "inspector_score_count", "inspector_stage_latency_seconds_bucket",
                 "inspector_queue_depth", "inspector_bank_epoch", "inspector_calibration_gamma", "inspector_ready"):
        assert name in queried and name in sampled, f"{name} has no samples after traffic"


def _worker_process(line_setup: Path, store: str, prefix: str) -> tuple[subprocess.Popen, str, str, int]:
    http_port, ingest, publish = free_port(), f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "inspector", "run", "--line", "7", "--artifact", str(line_setup / "model"),
           "--store", store, "--set", f"banks.prefix={prefix}", "--bind", ingest, "--publish-bind", publish,
           "--http-port", str(http_port), "--device", "cpu", "--set", "engine.batch_sizes=1,2",
           "--max-batch", "2", "--max-delay-ms", "5", "--deadline-ms", "60000"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, ingest, publish, http_port


def test_two_workers_on_one_line_give_every_frame_exactly_one_result(line_setup, redis_url, redis_prefix) -> None:
    """Two worker processes serve one line: the camera's PUSH connects to both PULL endpoints (ZMQ
    spreads the frames), results come from each worker's PUB and one Redis stream. Every frame
    gets exactly one result, none twice, and both workers serve."""
    from inspector.banks import FileStore

    store = open_store(redis_url, prefix=redis_prefix)
    src = FileStore(line_setup / "banks")
    for product in src.state("7").products:
        store.put("7", src.blob("7", product), src.meta("7", product))
    workers = [_worker_process(line_setup, redis_url, redis_prefix) for _ in range(2)]
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    subs = []
    try:
        for proc, ingest, publish, http_port in workers:
            end = time.monotonic() + RESULT_TIMEOUT_S
            while True:  # ready: warmed up, banks loaded
                assert proc.poll() is None, "a worker exited before it was ready"
                assert time.monotonic() < end, "a worker never became ready"
                try:
                    if urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=0.5).status == 200:
                        break
                except OSError:
                    time.sleep(0.1)
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"result.7.")
            sub.setsockopt(zmq.RCVHWM, 0)
            sub.connect(publish)
            subs.append(sub)
            push.connect(ingest)
        seen = [False, False]
        end = time.monotonic() + RESULT_TIMEOUT_S
        while not all(seen):  # handshake: probes until both subscriptions see a result
            assert time.monotonic() < end, "a worker's results never reached the subscriber"
            push.send_multipart([b"probe"])
            for i, sub in enumerate(subs):
                while sub.poll(50):
                    sub.recv_multipart()
                    seen[i] = True
        for sub in subs:
            while sub.poll(300):
                sub.recv_multipart()
        n = 40
        rng = np.random.default_rng(1)
        for i in range(n):
            h = FrameHeader(frame_id=f"two{i}", camera="cam1", ts_ns=time.time_ns(), encoding="jpeg")
            push.send_multipart(encode_frame(h, encode_jpeg((rng.random((64, 64, 3)) * 200).astype(np.uint8))))
        per_worker: list[list[str]] = [[], []]
        end = time.monotonic() + RESULT_TIMEOUT_S
        while sum(map(len, per_worker)) < n and time.monotonic() < end:
            for i, sub in enumerate(subs):
                if sub.poll(20):
                    per_worker[i].append(Result.from_frames(sub.recv_multipart())[0].frame_id)
        for sub in subs:  # anything published twice would arrive now
            while sub.poll(300):
                per_worker[subs.index(sub)].append(Result.from_frames(sub.recv_multipart())[0].frame_id)
        published = per_worker[0] + per_worker[1]
        assert sorted(published) == sorted(f"two{i}" for i in range(n))  # each exactly once
        assert per_worker[0] and per_worker[1], [len(p) for p in per_worker]  # both served
        key = f"{redis_prefix}:line:7:results"
        end = time.monotonic() + RESULT_TIMEOUT_S
        while True:
            logged = [json.loads(f[b"result"])["frame_id"] for _, f in store.client.xrange(key)]
            logged = [f for f in logged if f.startswith("two")]
            if len(logged) >= n or time.monotonic() > end:
                break
            time.sleep(0.05)
        assert sorted(logged) == sorted(published)  # one stream, every result once
    finally:
        for proc, *_ in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, *_ in workers:
            try:
                assert proc.wait(RESULT_TIMEOUT_S) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
        push.close(0)
        for sub in subs:
            sub.close(0)
        ctx.term()
