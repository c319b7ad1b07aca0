"""Camera simulator and result tail over real ZMQ sockets on loopback.

Sockets on the test's side bind to random loopback ports. The result tests publish from an XPUB
socket: it behaves as the worker's PUB and also receives each subscription, so a test publishes
exactly when the SUB's subscription has reached it (the ZMQ slow joiner), with no sleep.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from PIL import Image

from inspector.tools.camera import (
    CameraConfig,
    FrameSource,
    Pacer,
    arrival_offsets,
    endpoints,
    folder_truth,
    publish_frames,
)
from inspector.cli.stream import STREAM_COMMANDS, add_stream_parsers
from inspector.decode import decode_image, encode_heatmap
from inspector.tools.tail import NO_PRODUCT, ResultStats, collect_results, subscription, summarize
from inspector.testkit import free_port
from inspector.wire import HeatmapInfo, Latency, Result, WireError, parse_frame

LOOPBACK = "tcp://127.0.0.1"
SIZE = 64  # small generated frames keep encoding and sending to milliseconds
RECV_TIMEOUT_MS = 5000  # generous bound for a loopback message on a loaded CI machine; never reached when all is well
# JPEG at quality 90 on these smooth synthetic textures: measured mean error about 1-2 grey levels;
# 6 leaves room for other Pillow/libjpeg builds and still catches a colour swap or a wrong image.
JPEG_MEAN_ABS_TOL = 6.0


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def pull(ctx):
    sock = ctx.socket(zmq.PULL)
    port = sock.bind_to_random_port(LOOPBACK)
    yield sock, f"{LOOPBACK}:{port}"
    sock.close(linger=0)


def receive_frames(sock: zmq.Socket, n: int) -> list[list[bytes]]:
    out = []
    for _ in range(n):
        assert sock.poll(RECV_TIMEOUT_MS), f"only {len(out)} of {n} frames arrived"
        out.append(sock.recv_multipart())
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Sources


def test_a_camera_connected_to_two_workers_spreads_its_frames(ctx, tmp_path):
    socks = [ctx.socket(zmq.PULL) for _ in range(2)]
    ports = [s.bind_to_random_port(LOOPBACK) for s in socks]
    try:
        source = FrameSource.generated(["tiles"], size=SIZE, seed=0, per_product=2)
        n = 8
        cfg = CameraConfig(connect=",".join(f"{LOOPBACK}:{p}" for p in ports), rate_fps=0, count=n)
        assert publish_frames(source, cfg).sent == n
        got = [[], []]
        while sum(map(len, got)) < n:
            ready = [i for i, s in enumerate(socks) if s.poll(RECV_TIMEOUT_MS // 10)]
            assert ready, f"only {sum(map(len, got))} of {n} frames arrived"
            for i in ready:
                got[i].append(parse_frame(socks[i].recv_multipart())[0].frame_id)
        assert got[0] and got[1] and len(set(got[0] + got[1])) == n  # each frame to one worker, both used
    finally:
        for s in socks:
            s.close(linger=0)


@pytest.mark.parametrize("bad", ["", "tcp://a:1,", "tcp://a:1,,tcp://b:2", "tcp://a:1,tcp://a:1"])
def test_connect_lists_are_checked(bad):
    with pytest.raises(ValueError, match="--connect"):
        endpoints(bad)


@pytest.mark.parametrize("encoding", ["jpeg", "png", "raw"])
def test_generated_frames_parse_decode_and_join_the_record(pull, tmp_path, encoding):
    sock, endpoint = pull
    source = FrameSource.generated(["tiles", "rings"], size=SIZE, seed=0, per_product=2)
    n = 2 * len(source) + 1  # cycles over the source
    cfg = CameraConfig(connect=endpoint, encoding=encoding, rate_fps=0, count=n, hint=True, deadline_ms=250)
    summary = publish_frames(source, cfg, record=tmp_path / "sent.jsonl")
    assert (summary.sent, summary.not_sent, summary.errors) == (n, 0, 0)

    records = read_jsonl(tmp_path / "sent.jsonl")
    assert len(records) == n
    by_id = {r["frame_id"]: r for r in records}
    ids = []
    for seq, parts in enumerate(receive_frames(sock, n)):
        header, payload = parse_frame(parts)
        image = decode_image(header, payload)
        truth = source[seq % len(source)]
        assert image.shape == (SIZE, SIZE, 3) and header.encoding == encoding
        if encoding == "jpeg":
            assert np.abs(image.astype(float) - truth.image).mean() < JPEG_MEAN_ABS_TOL
        else:  # lossless
            np.testing.assert_array_equal(image, truth.image)
        rec = by_id[header.frame_id]
        assert (rec["camera"], rec["ts_ns"], rec["source"]) == (header.camera, header.ts_ns, truth.name)
        assert rec["product"] == header.product == truth.product
        assert rec["label"] == truth.truth["label"] and header.deadline_ms == 250
        ids.append(header.frame_id)
    assert len(set(ids)) == n and ids == [r["frame_id"] for r in records]
    assert all(i.startswith(f"{summary.run_id}-cam0-") for i in ids)


def test_generated_source_is_deterministic_and_labelled():
    a = FrameSource.generated(["weave", "dots"], size=SIZE, seed=3, per_product=4, defect_every=4)
    b = FrameSource.generated(["weave", "dots"], size=SIZE, seed=3, per_product=4, defect_every=4)
    c = FrameSource.generated(["weave", "dots"], size=SIZE, seed=4, per_product=4, defect_every=4)
    assert [f.name for f in a.frames()] == ["weave/good/000", "dots/good/000", "weave/good/001", "dots/good/001",
                                            "weave/good/002", "dots/good/002", "weave/hole/003", "dots/missing/003"]
    assert [f.truth["label"] for f in a.frames()] == ["good"] * 6 + ["defect"] * 2
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i].image, b[i].image)
    assert any(not np.array_equal(a[i].image, c[i].image) for i in range(len(a)))
    assert [f.name for f in a.frames(10)][8:] == [a[0].name, a[1].name]  # cycles
    with pytest.raises(ValueError, match="unknown products"):
        FrameSource.generated(["bolts"])


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_source_derives_product_and_label_from_an_mvtec_tree(tmp_path):
    rng = np.random.default_rng(0)

    def img() -> np.ndarray:
        return rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)

    root = tmp_path / "data"
    _save(root / "bottle" / "train" / "good" / "000.png", img())
    _save(root / "bottle" / "test" / "good" / "001.png", img())
    _save(root / "bottle" / "test" / "broken_large" / "002.bmp", img())
    _save(root / "bottle" / "ground_truth" / "broken_large" / "002_mask.png", np.zeros((12, 16), np.uint8))
    _save(root / "misc" / "a.tif", img())
    _save(root / ".cache" / "hidden.png", img())
    (root / "notes.txt").write_text("not an image")
    wide = np.full((12, 16), 65535, np.uint16)
    _save(root / "loose.png", wide)  # 16-bit grey

    source = FrameSource.from_folder(root)
    truth = {f.name: (f.product, f.truth["label"], f.truth["defect"]) for f in source.frames()}
    assert truth == {
        "bottle/test/broken_large/002.bmp": ("bottle", "defect", "broken_large"),
        "bottle/test/good/001.png": ("bottle", "good", None),
        "bottle/train/good/000.png": ("bottle", "good", None),
        "loose.png": (None, None, None),
        "misc/a.tif": (None, None, None),
    }
    assert [f.name for f in source.frames()] == sorted(truth)
    assert all(f.image.shape == (12, 16, 3) and f.image.dtype == np.uint8 for f in source.frames())
    np.testing.assert_array_equal(source[3].image, np.full((12, 16, 3), 255, np.uint8))  # 65535 -> 255
    # A class folder as the root: the product is the root's own name.
    by_class = FrameSource.from_folder(root / "bottle")
    assert {f.product for f in by_class.frames()} == {"bottle"}
    assert folder_truth(Path("x/tiles/test/crack/9.png"), "root")["product"] == "tiles"


def test_folder_source_refuses_missing_and_empty_folders(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="no .* images"):
        FrameSource.from_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        FrameSource.from_folder(tmp_path / "absent")


# ---------------------------------------------------------------------------------------------
# Pacing


def test_fixed_rate_holds_its_schedule(pull, tmp_path):
    sock, endpoint = pull
    rate, n = 50.0, 25
    source = FrameSource.generated(["dots"], size=SIZE, per_product=2)
    summary = publish_frames(source, CameraConfig(connect=endpoint, rate_fps=rate, count=n), record=tmp_path / "r.jsonl")
    stamps = [r["ts_ns"] for r in read_jsonl(tmp_path / "r.jsonl")]
    span_s = (stamps[-1] - stamps[0]) / 1e9
    ideal = (n - 1) / rate  # 0.48 s from the first frame to the last
    # Never early: each frame waits for its absolute due time (2 ms covers the wall clock, which
    # stamps ts_ns, against the monotonic clock that paces). Late by at most 0.15 s: the schedule
    # is absolute, so sleep overshoot does not add up, but on a shared 2-core machine a thread
    # can be descheduled for tens of milliseconds, and a sender late by over one gap moves its
    # schedule forward by that delay.
    assert ideal - 0.002 <= span_s <= ideal + 0.15, span_s
    assert summary.sent == n and summary.rate_fps == pytest.approx(rate, rel=0.25)
    assert len(receive_frames(sock, n)) == n


def test_poisson_schedule_is_seeded():
    rate, n = 100.0, 2000

    def first(seed: int) -> list[float]:
        offsets = arrival_offsets(rate, poisson=True, seed=seed)
        return [next(offsets) for _ in range(n)]

    a, b, c = first(7), first(7), first(8)
    assert a == b and a != c and a[0] == 0.0
    gaps = np.diff(a)
    # Exponential gaps: their standard deviation equals their mean, so the mean of 1999 gaps has
    # a relative standard error of 1/sqrt(1999), about 2.2%; 10% is 4.5 standard errors.
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.10)
    assert gaps.min() > 0
    assert arrival_offsets(0.0) is None
    with pytest.raises(ValueError):
        arrival_offsets(0.0, poisson=True)


class FakeClock:
    """A clock that moves only when the code under test sleeps or the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def paced_times(late_after_first: float, frames: int, stop_at: float | None = None) -> list[float]:
    clock = FakeClock()
    pacer = Pacer(arrival_offsets(10.0), stop_at=stop_at, clock=clock, sleep=clock.sleep)  # 0.1 s period
    times = []
    for k in range(frames):
        if not pacer.wait():
            break
        times.append(round(clock.now, 9))
        if k == 0:
            clock.now += late_after_first  # a slow send after the first frame
    return times


def test_a_late_sender_catches_up_at_most_one_frame():
    # Late by 0.25 s (over one 0.1 s gap): the schedule moves forward, no burst of missed frames.
    assert paced_times(0.35, 5) == [0.0, 0.35, 0.45, 0.55, 0.65]
    # Late by 0.05 s (under one gap): sent at once, and the next frame keeps its original slot.
    assert paced_times(0.15, 5) == [0.0, 0.15, 0.2, 0.3, 0.4]
    # The duration ends before the frame due at 0.3 s.
    assert paced_times(0.0, 10, stop_at=0.25) == [0.0, 0.1, 0.2]


@pytest.mark.parametrize("block", [False, True])
def test_full_queue_counts_frames_as_not_sent(block):
    # Nobody listens: ZMQ queues up to SNDHWM frames for the pending connection, then pushes back.
    source = FrameSource.generated(["rings"], size=SIZE, per_product=1)
    n = 6
    cfg = CameraConfig(connect=f"{LOOPBACK}:{free_port()}", encoding="raw", rate_fps=0, count=n, sndhwm=1,
                       block=block, send_timeout_ms=20, linger_ms=50)
    t0 = time.monotonic()
    summary = publish_frames(source, cfg)
    assert summary.sent + summary.not_sent == n and summary.not_sent >= n - 2 and summary.errors == 0
    # Each blocked frame waits 20 ms, and close lingers 50 ms: well under a second in all.
    assert time.monotonic() - t0 < 2.0


# ---------------------------------------------------------------------------------------------
# Tail


@pytest.fixture
def xpub(ctx):
    sock = ctx.socket(zmq.XPUB)
    port = sock.bind_to_random_port(LOOPBACK)
    yield sock, f"{LOOPBACK}:{port}"
    sock.close(linger=0)


def wait_subscribed(sock: zmq.Socket, prefix: bytes) -> None:
    """Block until the subscriber's subscription reached the publisher (XPUB hands it over)."""
    assert sock.poll(RECV_TIMEOUT_MS), "the subscriber never connected"
    assert sock.recv() == b"\x01" + prefix


T0 = 1_700_000_000_000_000_000  # a fixed capture time, so the results are reproducible


def make_result(i: int, verdict: str, reason: str | None, product: str | None, total: float,
                line: str = "L1", heatmap: bool = False) -> Result:
    info = HeatmapInfo(shape=(8, 12), scale=100.0) if heatmap else None
    return Result(
        frame_id=f"f{i:03d}", camera="cam0", line=line, verdict=verdict, reason=reason,
        score=0.1 * i if verdict in ("pass", "fail") else None, threshold=0.5, product=product,
        model="m-test", bank_epoch=1, ts_ns=T0 + i, done_ns=T0 + i * 10_000_000,
        latency_ms=Latency(queue=1.0, decode=2.0, infer=3.0, post=0.5, total=total), heatmap=info,
    )


GOOD_PNG = encode_heatmap(np.linspace(0, 1, 96).reshape(8, 12), 100.0)
RESULTS = [  # (result, heatmap bytes)
    (make_result(0, "pass", None, "tiles", 12.5, heatmap=True), GOOD_PNG),
    (make_result(1, "fail", "anomaly", "tiles", 30.25, heatmap=True), GOOD_PNG),
    (make_result(2, "fail", "unknown_product", None, 8.0), b""),
    (make_result(3, "error", "bad_header", None, 0.0), b""),
    (make_result(4, "timeout", "deadline_exceeded", "rings", 250.0), b""),
    (make_result(5, "dropped", "overload", None, math.nan), b""),  # a stage that was not timed
    (make_result(6, "pass", None, "rings", 15.0), b""),
    (make_result(7, "pass", None, "tiles", 11.0, heatmap=True), b"\x89PNG\r\n\x1a\n-broken"),
    (make_result(8, "fail", "anomaly", "rings", 41.5), b""),
]
OTHER_LINE = make_result(90, "fail", "anomaly", "tiles", 1.0, line="L2")
MALFORMED = [
    [b"result.L1.cam0", b"{not json", b""],
    [b"result.L1.cam0"],  # one part instead of three
    [b"result.L1.other", RESULTS[0][0].to_json(), b""],  # topic does not match the header
]


def publish_results(sock: zmq.Socket) -> None:
    """Results, with malformed messages and another line's results before the last one."""
    for k, (result, png) in enumerate(RESULTS):
        if k == len(RESULTS) - 1:
            for parts in MALFORMED:
                sock.send_multipart(parts)
            sock.send_multipart(OTHER_LINE.to_frames())
        sock.send_multipart(result.to_frames(png))


def test_collect_results_counts_verdicts_reasons_products_and_latency(xpub):
    sock, endpoint = xpub
    window = 4
    stats = ResultStats(window=window)
    got: list = []
    thread = threading.Thread(target=lambda: got.extend(
        collect_results(endpoint, line="L1", count=len(RESULTS), timeout_s=10.0, stats=stats)))
    thread.start()
    wait_subscribed(sock, subscription("L1"))
    publish_results(sock)
    thread.join(timeout=15.0)
    assert not thread.is_alive()

    assert [r.frame_id for r, _ in got] == [r.frame_id for r, _ in RESULTS]  # L2 filtered out
    assert [h for _, h in got] == [h for _, h in RESULTS]
    # Messages travel in order on one connection, so all of them arrived before the last result.
    s = stats.summary()
    assert s.received == len(RESULTS) and s.malformed == len(MALFORMED)
    assert s.counts == {"pass": 3, "fail": 3, "error": 1, "timeout": 1, "dropped": 1}
    assert s.by_reason == {"anomaly": 2, "bad_header": 1, "deadline_exceeded": 1, "overload": 1,
                           "unknown_product": 1}
    assert s.by_product == {NO_PRODUCT: {"dropped": 1, "error": 1, "fail": 1},
                            "rings": {"fail": 1, "pass": 1, "timeout": 1}, "tiles": {"fail": 1, "pass": 2}}
    assert (s.heatmaps, s.bad_heatmaps) == (3, 1)

    totals = [r.latency_ms.total for r, _ in RESULTS if not math.isnan(r.latency_ms.total)]
    # JSON carries floats in their shortest exact form, and the same numpy percentile (linear
    # interpolation) runs on the same float64 values: only summation order could differ.
    for got_lat, values in ((s.latency_ms, totals[-window:]), (s.latency_ms_overall, totals)):
        expected = np.percentile(values, [50, 95, 99])
        assert [got_lat["p50"], got_lat["p95"], got_lat["p99"]] == pytest.approx(expected, rel=1e-12)
        assert got_lat["max"] == max(values) and got_lat["n"] == len(values)
    assert s.throughput_fps > 0

    again = summarize(got, window=window, malformed=len(MALFORMED))
    assert (again.counts, again.by_reason, again.by_product) == (s.counts, s.by_reason, s.by_product)
    assert again.latency_ms == s.latency_ms
    # done_ns are 10 ms apart: 100 results per second.
    assert again.throughput_fps == pytest.approx(100.0, rel=1e-9)


def test_malformed_results_are_rejected_by_the_wire():
    for parts in MALFORMED:
        with pytest.raises(WireError):
            Result.from_frames(parts)


def test_collect_results_times_out_without_a_publisher():
    t0 = time.monotonic()
    assert collect_results(f"{LOOPBACK}:{free_port()}", count=1, timeout_s=0.2) == []
    assert time.monotonic() - t0 < 2.0


# ---------------------------------------------------------------------------------------------
# Command line


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="inspector")
    add_stream_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def run_cli(argv: list[str]) -> int:
    args = parse(argv)
    return STREAM_COMMANDS[args.command](args)


def test_cmd_publish_generated(pull, tmp_path, capsys):
    sock, endpoint = pull
    record = tmp_path / "sent.jsonl"
    rc = run_cli(["publish", "--connect", endpoint, "--generate", "tiles,dots", "--size", str(SIZE), "--pool", "2",
                  "--encoding", "png", "--rate", "0", "--count", "6", "--hint", "--deadline-ms", "100",
                  "--camera", "cam-7", "--record", str(record), "--quiet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sent"] == 6 and summary["camera"] == "cam-7"
    headers = [parse_frame(parts)[0] for parts in receive_frames(sock, 6)]
    assert [h.product for h in headers] == ["tiles", "dots"] * 3
    assert {h.encoding for h in headers} == {"png"} and {h.deadline_ms for h in headers} == {100.0}
    assert [r["frame_id"] for r in read_jsonl(record)] == [h.frame_id for h in headers]


def test_cmd_publish_folder_without_hint(pull, tmp_path, capsys):
    sock, endpoint = pull
    _save(tmp_path / "img" / "tiles" / "test" / "crack" / "000.png", np.zeros((8, 8, 3), np.uint8))
    _save(tmp_path / "img" / "tiles" / "test" / "good" / "000.png", np.ones((8, 8, 3), np.uint8))
    record = tmp_path / "sent.jsonl"
    rc = run_cli(["publish", "--connect", endpoint, "--images", str(tmp_path / "img"), "--rate", "0",
                  "--record", str(record), "--quiet"])  # no count or duration: one pass
    assert rc == 0
    headers = [parse_frame(parts)[0] for parts in receive_frames(sock, 2)]
    assert [h.product for h in headers] == [None, None]
    assert [(r["product"], r["label"]) for r in read_jsonl(record)] == [("tiles", "defect"), ("tiles", "good")]


@pytest.mark.parametrize("argv, message", [
    (["--images", "{empty}"], "no "),
    (["--images", "{missing}"], "does not exist"),
    (["--generate", "bolts"], "unknown products"),
    (["--generate", "tiles", "--poisson", "--rate", "0"], "Poisson"),
    (["--generate", "tiles", "--camera", "bad camera"], "camera name"),
])
def test_cmd_publish_usage_errors_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.format(empty=tmp_path / "empty", missing=tmp_path / "missing") for a in argv]
    assert run_cli(["publish", "--connect", f"{LOOPBACK}:{free_port()}", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_cmd_tail_json_and_record(xpub, tmp_path, capsys):
    sock, endpoint = xpub
    record = tmp_path / "results.jsonl"
    n = 4
    codes: list[int] = []
    argv = ["tail", "--connect", endpoint, "--line", "L1", "--count", str(n), "--json", "--record", str(record)]
    thread = threading.Thread(target=lambda: codes.append(run_cli(argv)))
    thread.start()
    wait_subscribed(sock, subscription("L1"))
    sock.send_multipart(MALFORMED[0])
    for result, png in RESULTS[:n]:
        sock.send_multipart(result.to_frames(png))
    thread.join(timeout=15.0)
    assert not thread.is_alive() and codes == [0]

    expected = [r.frame_id for r, _ in RESULTS[:n]]
    assert [r["frame_id"] for r in read_jsonl(record)] == expected
    out, err = capsys.readouterr()
    assert [json.loads(line)["frame_id"] for line in out.splitlines()] == expected
    final = json.loads(err.strip().splitlines()[-1])["summary"]
    assert final["received"] == n and final["malformed"] == 1
    assert final["counts"] == {"pass": 1, "fail": 2, "error": 1, "timeout": 0, "dropped": 0}


def test_cmd_tail_duration_prints_a_table(xpub, capsys):
    _, endpoint = xpub
    assert run_cli(["tail", "--connect", endpoint, "--duration", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "verdict" in out and "received 0" in out
    assert run_cli(["tail", "--connect", endpoint, "--count", "0"]) == 2
