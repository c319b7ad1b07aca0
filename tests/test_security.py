"""Security of a running line: fuzzed input, CURVE access control, secrets, binds, pickle, limits.

- Arbitrary multipart messages (hypothesis) each get exactly one result and the worker keeps serving.
- With CURVE and an allow-list, only an allowed client's frames reach the worker and only an
  allowed reader gets results; unknown keys and plain clients get nothing through.
- A Redis password given by any route never appears in the worker's output or ``--print-config``.
- Metrics and health listen on loopback by default; nothing unpickles; every size a peer
  controls has a finite bound.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
import string
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zmq
import zmq.auth
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inspector.banks import open_store
from inspector.tools.camera import Camera, CameraConfig, FrameSource
from inspector.config import HttpConfig, IngestConfig, PublishConfig, load_config
from inspector.decode import encode_jpeg, encode_png
from inspector.worker.metrics import HealthServer, WorkerMetrics
from inspector.security import curve_client_configurer, peer_limits
from inspector.tools.tail import Tail
from inspector.wire import CHANNELS, ENCODINGS, Result
from inspector.worker.loop import Worker

from .conftest import REPO, RedisServer
from .test_faults import LINE, PREFIX, SERVED, Client, WorkerProcess, copy_banks, wait_until
from .test_worker import RESULT_TIMEOUT_S, Line, config, line_setup  # noqa: F401 (fixture)

# -- fuzzing the running worker ------------------------------------------------------------------------
FUZZ_EXAMPLES = 200  # about 7 s on 2 cores; every example is a real round trip through the worker
MAX_PARTS = 4  # messages of 1..4 parts: the frame has 2, a result 3
MAX_PART_BYTES = 2048  # bounded sizes keep the run short; size limits have their own tests
QUIET_MS = 30  # after a result, a second one for the same message would arrive within this
DOCUMENTED_ERRORS = {  # README "Verdicts and reasons": every reason an error result may carry
    "bad_parts", "header_too_large", "bad_header", "bad_version", "missing_field", "bad_field",
    "unknown_encoding", "bad_shape", "bad_pixel_format", "payload_too_large", "payload_size_mismatch",
    "empty_payload", "corrupt_image", "image_too_large", "encoding_mismatch",
}
RAW_SIDE = 8
HUGE_INT = 2**70  # beyond int64: the parser must refuse such numbers, never overflow on them
OVER_SIDE = 70_000  # over the default max_side (8192): shapes the parser must refuse before allocating
NO_TIMEOUT_MS = 60_000.0  # default deadline of the fuzzed worker: a verdict is never a slow machine's timeout

_JPEG = encode_jpeg(np.full((64, 64, 3), 90, np.uint8))
_PNG = encode_png(np.full((32, 48, 3), 30, np.uint8))
_RAW = bytes(RAW_SIDE * RAW_SIDE * 3)
_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-HUGE_INT, max_value=HUGE_INT),
                     st.floats(), st.text(max_size=16))
_VALID = {"v": 1, "frame_id": "fz", "camera": "cam1", "ts_ns": 1, "encoding": "jpeg"}
_FIELDS = {
    "v": st.one_of(st.just(1), _scalars),
    "frame_id": st.one_of(st.text(string.printable, min_size=1, max_size=140), _scalars),
    "camera": st.one_of(st.sampled_from(["cam1", "c.2-x", "bad cam", ""]), _scalars),
    "ts_ns": st.one_of(st.integers(min_value=-HUGE_INT, max_value=HUGE_INT), _scalars),
    "encoding": st.one_of(st.sampled_from(ENCODINGS), _scalars),
    "shape": st.one_of(st.lists(st.integers(min_value=-1, max_value=OVER_SIDE), max_size=4),
                       st.just([RAW_SIDE, RAW_SIDE, 3]), _scalars),
    "pixel_format": st.one_of(st.sampled_from(sorted(CHANNELS)), _scalars),
    "product": st.one_of(st.sampled_from(["valve-a", "valve-b", "nope"]), _scalars),
    "deadline_ms": st.one_of(st.floats(), st.integers(), _scalars),
}
_random_header = st.fixed_dictionaries({}, optional=_FIELDS)
_VALID_BY_ENCODING = {  # a valid header of each encoding, with the payload that matches it
    "jpeg": (_VALID, _JPEG),
    "png": ({**_VALID, "encoding": "png"}, _PNG),
    "raw": ({**_VALID, "encoding": "raw", "shape": [RAW_SIDE, RAW_SIDE, 3], "pixel_format": "rgb8"}, _RAW),
}


@st.composite
def _near_valid(draw) -> dict:
    """A valid header with one field replaced or dropped: exercises each check one at a time."""
    header = dict(draw(st.sampled_from(sorted(_VALID_BY_ENCODING)).map(lambda e: _VALID_BY_ENCODING[e][0])))
    name = draw(st.sampled_from(sorted(_FIELDS)))
    if draw(st.booleans()):
        header.pop(name, None)
    else:
        header[name] = draw(_FIELDS[name])
    return header


@st.composite
def _near_valid_frame(draw) -> list[bytes]:
    """A near-valid header with the payload its encoding (if still known) calls for."""
    header = draw(_near_valid())
    matched = _VALID_BY_ENCODING.get(header.get("encoding") if isinstance(header.get("encoding"), str) else "")
    payload = matched[1] if matched is not None else draw(st.binary(max_size=MAX_PART_BYTES))
    return [json.dumps(header).encode(), payload]


def _weighted(*choices: tuple[st.SearchStrategy, int]) -> st.SearchStrategy:
    """Draw from each strategy in proportion to its weight."""
    return st.sampled_from([s for s, weight in choices for _ in range(weight)]).flatmap(lambda s: s)


# Most messages are two-part frames whose header is one change away from valid, so each check deep
# in the parser and the decoder is reached, not only the first one.
_json = _weighted((_near_valid(), 2), (_random_header, 1)).map(lambda h: json.dumps(h).encode())
_headers = _weighted((_json, 4), (st.binary(max_size=MAX_PART_BYTES), 1))
_payloads = st.one_of(
    st.binary(max_size=MAX_PART_BYTES),
    st.sampled_from([_JPEG, _PNG, _RAW]),
    st.tuples(st.sampled_from([_JPEG, _PNG]), st.integers(min_value=0, max_value=len(_PNG))).map(lambda t: t[0][: t[1]]),
)
messages = _weighted((st.tuples(_headers, _payloads).map(list), 3), (_near_valid_frame(), 2),
                     (st.lists(st.binary(max_size=MAX_PART_BYTES), min_size=1, max_size=MAX_PARTS), 1))


@pytest.fixture(scope="module")
def served_line(line_setup):
    ln = Line(config(line_setup, **{"batch.deadline_ms": NO_TIMEOUT_MS}))
    yield ln
    ln.close()


def _answer(ln: Line, parts: list[bytes]) -> Result:
    ln.push.send_multipart(parts)
    assert ln.sub.poll(int(RESULT_TIMEOUT_S * 1000)), f"no result for {[p[:40] for p in parts]}"
    result, _ = Result.from_frames(ln.sub.recv_multipart())  # the result itself must honour the wire
    assert not ln.sub.poll(QUIET_MS), f"two results for {[p[:40] for p in parts]}"
    return result


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(parts=messages)
def test_fuzzed_messages_each_get_exactly_one_result(served_line, parts) -> None:
    result = _answer(served_line, parts)
    if result.verdict == "error":
        assert result.reason in DOCUMENTED_ERRORS, result
    else:
        assert result.verdict in (*SERVED, "timeout"), result


def test_documented_error_reasons_are_the_wire_modules() -> None:
    from inspector.wire import INPUT_ERRORS

    assert DOCUMENTED_ERRORS == set(INPUT_ERRORS)


def test_the_worker_serves_after_the_fuzzing(served_line) -> None:
    w = served_line.worker
    served_line.send("after-fuzz", product="valve-a")
    (r, _), = served_line.results(1)
    assert (r.frame_id, r.verdict in SERVED) == ("after-fuzz", True)
    assert served_line.thread.is_alive()
    wait_until(lambda: w.publisher.published == w.ingest.received, "every message answered")
    with urllib.request.urlopen(f"http://127.0.0.1:{w.health.port}/healthz", timeout=5) as reply:
        assert reply.status == 200


# -- CURVE ---------------------------------------------------------------------------------------------
CURVE_WAIT_S = 1.5  # long enough for a refused client's handshake retries (ZMQ reconnects every 0.1 s)
CLIENT_FRAMES = 5


@pytest.fixture
def keys(tmp_path):
    made = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    made.mkdir()
    allowed.mkdir()
    pairs = {name: zmq.auth.create_certificates(str(made), name) for name in ("server", "client", "intruder")}
    shutil.copy(pairs["client"][0], allowed)
    return SimpleNamespace(allowed=str(allowed), **{f"{n}_public": p for n, (p, _) in pairs.items()},
                           **{f"{n}_secret": s for n, (_, s) in pairs.items()})


def _camera(endpoint: str, name: str, server: str | None, client: str | None) -> Camera:
    source = FrameSource.generated(("tiles",), size=64, per_product=1)
    # Not blocking: a refused client has no connection to queue for, its sends return at once.
    cfg = CameraConfig(connect=endpoint, camera=name, rate_fps=0, linger_ms=0, run_id=name, block=False,
                       curve_server_key=server, curve_client_key=client)
    return Camera(cfg, source)


def test_curve_lets_only_allowed_clients_through(line_setup, keys) -> None:
    cfg = config(line_setup, **{"ingest.curve_server_secret_key": keys.server_secret,
                                "ingest.curve_allowed_clients_dir": keys.allowed, "publish.heatmaps": "none"})
    worker = Worker(cfg, install_signals=False).start()
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    ep_in, ep_out = cfg.ingest.bind, cfg.publish.bind
    tails = {"good": Tail(ep_out, LINE, curve_server_key=keys.server_public, curve_client_key=keys.client_secret),
             "intruder": Tail(ep_out, LINE, curve_server_key=keys.server_public,
                              curve_client_key=keys.intruder_secret),
             "plain": Tail(ep_out, LINE)}
    cams = {"good": _camera(ep_in, "good", keys.server_public, keys.client_secret),
            "intruder": _camera(ep_in, "intruder", keys.server_public, keys.intruder_secret),
            "plain": _camera(ep_in, "plain", None, None)}
    try:
        end = time.monotonic() + RESULT_TIMEOUT_S
        while tails["good"].receive(100) is None:  # handshakes and the subscription take a moment
            assert time.monotonic() < end, "the allowed client never got a result"
            cams["good"].send(0)
        ids = {cams["good"].send(0).frame_id for _ in range(CLIENT_FRAMES)}  # connected: never refused
        got = set()
        while not ids <= got and time.monotonic() < end:
            r = tails["good"].receive(100)
            got |= {r[0].frame_id} if r else set()
        assert ids <= got, "the allowed client's frames got results"
        while tails["good"].receive(int(CURVE_WAIT_S * 1000)):  # the handshake frames' results
            pass

        received = worker.ingest.received
        for _ in range(CLIENT_FRAMES):  # each is refused at once or queued for a connection that never opens
            cams["intruder"].send(0)
            cams["plain"].send(0)
        end = time.monotonic() + CURVE_WAIT_S
        while time.monotonic() < end:
            r = tails["good"].receive(100)
            assert r is None, f"a refused client's frame got a result: {r[0]}"
        assert worker.ingest.received == received, "a refused client's frame reached the worker"
        for name in ("intruder", "plain"):
            assert tails[name].receive(100) is None and tails[name].stats.received == 0

        last = cams["good"].send(0).frame_id  # the worker is healthy and still serves the allowed client
        end = time.monotonic() + RESULT_TIMEOUT_S
        while (r := tails["good"].receive(100)) is None or r[0].frame_id != last:
            assert time.monotonic() < end, "the allowed client was not served after the refusals"
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.health.port}/healthz", timeout=5) as reply:
            assert reply.status == 200
        for name in ("intruder", "plain"):
            assert tails[name].stats.received == 0
    finally:
        for item in (*cams.values(), *tails.values()):
            item.close()
        worker.stop()
        thread.join(RESULT_TIMEOUT_S)
    assert not thread.is_alive(), "the worker did not stop (ZAP handler left running)"


def test_curve_client_keys_are_checked(keys) -> None:
    with pytest.raises(ValueError, match="holds no secret key"):
        curve_client_configurer(keys.server_public, keys.client_public)
    with pytest.raises(ValueError, match="does not exist"):
        curve_client_configurer(keys.server_public + ".missing", keys.client_secret)
    with pytest.raises(ValueError, match="both"):
        CameraConfig(curve_server_key=keys.server_public)
    with pytest.raises(ValueError, match="both"):
        Tail("tcp://127.0.0.1:1", curve_client_key=keys.client_secret)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    try:
        curve_client_configurer(keys.server_public, keys.client_secret)(sock)
        assert sock.mechanism == zmq.CURVE and not sock.curve_server
    finally:
        sock.close(0)
        ctx.term()


# -- secrets never in output ----------------------------------------------------------------------------
SECRET = "Zq8-redis-SECRET-4711"  # distinctive: no log line contains it by accident
WRONG = "Wr0ng-redis-SECRET-0815"
FRAMES = 4


@pytest.fixture
def locked_redis(tmp_path, line_setup):
    """A Redis that requires ``SECRET``, holding the line's banks."""
    import redis

    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis").start()
    admin = redis.Redis(port=server.port)
    admin.config_set("requirepass", SECRET)
    admin.close()
    store = open_store(server.url, prefix=PREFIX, password=SECRET)
    copy_banks(line_setup / "banks", store)
    store.close()
    yield server
    server.stop()


def _route(route: str, port: int, tmp_path: Path) -> tuple[str, dict, str]:
    """(store URL, environment, the password given) for one way of passing the password."""
    plain = f"redis://127.0.0.1:{port}/0"
    if route == "environment":
        return plain, {"INSPECTOR_BANKS_PASSWORD": SECRET}, SECRET
    if route == "url":
        return f"redis://:{SECRET}@127.0.0.1:{port}/0", {}, SECRET
    if route == "url_query":
        return f"{plain}?password={SECRET}", {}, SECRET
    if route == "credentials":
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "redis_password").write_text(SECRET + "\n")
        return plain, {"CREDENTIALS_DIRECTORY": str(creds)}, SECRET
    return plain, {"INSPECTOR_REDIS_PASSWORD": WRONG}, WRONG  # "wrong": refused by Redis


@pytest.mark.parametrize("route", ["environment", "url", "url_query", "credentials", "wrong"])
def test_the_redis_password_never_appears_in_output(route, line_setup, locked_redis, tmp_path) -> None:
    store, env, given_password = _route(route, locked_redis.port, tmp_path)
    # a generous deadline: this test is about secrets, and a busy CI machine must not turn frames into timeouts
    args = ("--set", f"banks.prefix={PREFIX}", "--log-level", "debug", "--deadline-ms", str(NO_TIMEOUT_MS))
    printed = subprocess.run([sys.executable, "-m", "inspector", "run", "--line", LINE, "--store", store,
                              "--print-config", *args], env=dict(os.environ, PYTHONPATH=str(REPO), **env),
                             capture_output=True, text=True, timeout=RESULT_TIMEOUT_S)
    assert printed.returncode == 0, printed.stderr
    assert given_password not in printed.stdout + printed.stderr and "***" in printed.stdout

    worker = WorkerProcess(line_setup, tmp_path, store, *args, env=env)
    client = Client(worker.ingest, worker.publish)
    try:
        client.handshake(worker.alive, worker.output)
        ids = [f"s{i}" for i in range(FRAMES)]
        for i, fid in enumerate(ids):
            client.send(fid, product=("valve-a", "valve-b")[i % 2])
        results = client.collect(set(ids))
        assert len(results) == FRAMES
        if route == "wrong":  # no banks without the password: fail-safe, and the refusal is logged
            assert {r.reason for r in results} == {"no_products"}
        else:
            assert all(r.verdict in SERVED and r.product for r in results), [(r.verdict, r.reason, r.product) for r in results]
        locked_redis.stop()  # error paths too: the stream and the bank watcher lose their server
        client.send("down", product="valve-a")
        assert client.collect({"down"})
        wait_until(lambda: "stream_unavailable" in worker.output(), "the stream's error to be logged")
        assert worker.stop() == 0
    finally:
        client.close()
        worker.kill()
    output = worker.output()
    assert "worker_ready" in output and given_password not in output


# -- binds, pickle, limits ----------------------------------------------------------------------------
LOOPBACK_HEX = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it (little-endian)
TCP_LISTEN = "0A"


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp) of sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for row in list(handle)[1:]:
                local, state = row.split()[1], row.split()[3]
                address, port_hex = local.split(":")
                if state == TCP_LISTEN and int(port_hex, 16) == port:
                    found.add(address)
    return found


def test_metrics_and_health_bind_loopback_by_default(served_line) -> None:
    defaults = load_config(None, {}, {}, LINE)
    assert defaults.http.bind == HttpConfig().bind == "127.0.0.1"
    assert defaults.ingest.bind.startswith("tcp://127.0.0.1:") and defaults.publish.bind.startswith("tcp://127.0.0.1:")
    server = HealthServer(dataclasses.replace(defaults.http, port=0), WorkerMetrics()).start()
    try:
        assert listening_addresses(server.port) == {LOOPBACK_HEX}
    finally:
        server.stop()
    assert listening_addresses(served_line.worker.health.port) == {LOOPBACK_HEX}  # the running worker's too


SCANNED = ("inspector", "trainer", "deploy", "benchmarks")
PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve", "marshal"}
PICKLING_CALLS = {("marshal", "loads"), ("marshal", "load"), ("pandas", "read_pickle"), ("pd", "read_pickle")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def pickle_uses(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: what`` for each way this source could unpickle (or pickle) data."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PICKLING_MODULES or (module == "torch" and any(a.name == "load" for a in node.names)):
                found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and _dotted(node.value) in PICKLING_MODULES - {"marshal"}:
            found.append(f"{where}: {_dotted(node)}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if tuple(name.rsplit(".", 1)) in PICKLING_CALLS or name.endswith("read_pickle"):
                found.append(f"{where}: {name}(")
            elif name == "torch.load" and not _keyword_is(node, "weights_only", True):
                found.append(f"{where}: torch.load( without weights_only=True")
            elif name in ("np.load", "numpy.load") and not _keyword_is(node, "allow_pickle", False) and any(
                    k.arg == "allow_pickle" for k in node.keywords):
                found.append(f"{where}: {name}( with allow_pickle")
            elif name in ("__import__", "importlib.import_module") and node.args and isinstance(
                    node.args[0], ast.Constant) and str(node.args[0].value).split(".")[0] in PICKLING_MODULES:
                found.append(f"{where}: {name}({node.args[0].value!r})")
    return found


def test_the_pickle_scanner_finds_every_pattern() -> None:
    bad = "\n".join([
        "import pickle", "import cloudpickle as cp", "from dill import loads", "x = pickle.loads(b'')",
        "torch.load(f)", "torch.load(f, weights_only=False)", "np.load(f, allow_pickle=True)",
        "numpy.load(f, allow_pickle=True)", "marshal.loads(b'')", "pd.read_pickle(f)", "__import__('pickle')",
    ])
    assert len(pickle_uses(bad)) == len(bad.splitlines())
    clean = '"""No pickle anywhere."""\n# pickle is never used\ntorch.load(f, weights_only=True)\nnp.load(f)\n'
    assert pickle_uses(clean) == []


def test_nothing_unpickles() -> None:
    found = []
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*.py")):
            found += pickle_uses(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    assert not found, "pickle-capable code:\n" + "\n".join(found)


UNBOUNDED = 0  # ZeroMQ reads a high-water mark of 0 as "no limit"


def test_every_size_a_peer_controls_has_a_finite_bound(served_line) -> None:
    limits = peer_limits(load_config(None, {}, {}, LINE))
    named = {"ingest.max_header_bytes", "ingest.max_payload_bytes", "ingest.max_side", "ingest.max_pixels",
             "ingest.rcvhwm", "ingest.queue_size", "ingest.buffered_bytes_max", "publish.sndhwm",
             "publish.stream_buffer", "publish.stream_maxlen", "banks.max_blob_bytes", "banks.capacity_products"}
    assert named <= set(limits)
    for name, value in limits.items():
        assert isinstance(value, int) and value > UNBOUNDED, f"{name} = {value!r} is not a finite bound"
    assert limits["ingest.max_header_bytes"] == IngestConfig().max_header_bytes <= 4096  # DESIGN section 7
    # ... and the running worker applies them to its sockets, queue and buffers.
    w, cfg = served_line.worker, served_line.worker.cfg
    assert w.ingest.socket.getsockopt(zmq.RCVHWM) == cfg.ingest.rcvhwm > UNBOUNDED
    assert w.publisher.socket.getsockopt(zmq.SNDHWM) == cfg.publish.sndhwm > UNBOUNDED
    assert w.queue.capacity == cfg.ingest.queue_size and w.ingest.limits.max_payload_bytes == cfg.ingest.max_payload_bytes
    assert PublishConfig().stream_buffer > UNBOUNDED
