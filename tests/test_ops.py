"""Operations: metrics, the health HTTP server, systemd notifications and logging."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import socket
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from inspector.config import HttpConfig, LogConfig, WorkerConfig, load_config
from inspector.logs import configure_logging, get_logger
from inspector.worker.metrics import HealthServer, WorkerMetrics
from inspector.worker.notify import Notifier

SECRET = "s3cr3t-Passw0rd"
STALE_AFTER_S = 5.0
HTTP_TIMEOUT_S = 5.0  # generous for a loaded CI machine; a healthy reply takes milliseconds
RECV_TIMEOUT_S = 2.0  # a datagram on a local socket arrives before sendto returns; this is slack

METRIC_NAMES = (
    "inspector_stage_latency_seconds", "inspector_queue_depth", "inspector_batch_size",
    "inspector_results_total", "inspector_dropped_total", "inspector_bank_epoch", "inspector_bank_products",
    "inspector_bank_refused_total", "inspector_score", "inspector_stream_lost_total",
    "inspector_stream_buffered", "inspector_heatmap_errors_total", "inspector_ready", "inspector_info",
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- metrics


def observe_everything(metrics: WorkerMetrics) -> None:
    latency = {"queue": 1.0, "decode": 4.0, "infer": 20.0, "post": 2.0, "total": 27.0}
    metrics.observe_result("pass", "", "valve-a", 0.4, latency)
    metrics.observe_result("fail", "unknown_product", None, 3.5, latency)
    metrics.observe_result("dropped", "overload", None, None, {"total": 0.5})
    metrics.observe_batch(4)
    metrics.set_queue_depth(7)
    metrics.set_bank(epoch=12, products=3)
    metrics.bank_refused("signature_mismatch")
    metrics.stream_lost(2)
    metrics.set_stream_buffered(5)
    metrics.heatmap_error()
    metrics.notify_failed()
    metrics.set_ready(True)
    metrics.set_info(line="3", model="abc123")


def samples(metrics: WorkerMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_render_has_every_metric_and_parses() -> None:
    metrics = WorkerMetrics()
    observe_everything(metrics)
    text = metrics.render().decode()
    for name in METRIC_NAMES:
        assert name in text
    values = samples(metrics)
    assert values[("inspector_results_total", (("reason", ""), ("verdict", "pass")))] == 1
    assert values[("inspector_results_total", (("reason", "unknown_product"), ("verdict", "fail")))] == 1
    assert values[("inspector_dropped_total", ())] == 1  # the dropped result counts as a drop
    assert values[("inspector_queue_depth", ())] == 7
    assert values[("inspector_bank_epoch", ())] == 12 and values[("inspector_bank_products", ())] == 3
    assert values[("inspector_bank_refused_total", (("reason", "signature_mismatch"),))] == 1
    assert values[("inspector_stream_lost_total", ())] == 2 and values[("inspector_stream_buffered", ())] == 5
    assert values[("inspector_ready", ())] == 1
    assert values[("inspector_info", (("line", "3"), ("model", "abc123")))] == 1
    # Scores only for scored frames; latencies converted from ms to seconds.
    assert values[("inspector_score_count", (("product", "valve-a"),))] == 1
    assert values[("inspector_score_count", (("product", ""),))] == 1
    assert values[("inspector_stage_latency_seconds_count", (("stage", "total"),))] == 3
    assert values[("inspector_stage_latency_seconds_sum", (("stage", "infer"),))] == pytest.approx(0.040)
    assert values[("inspector_batch_size_bucket", (("le", "4.0"),))] == 1


def test_registries_are_independent() -> None:
    first, second = WorkerMetrics(), WorkerMetrics()
    first.set_queue_depth(3)
    assert samples(second)[("inspector_queue_depth", ())] == 0


def test_info_keeps_one_series_when_the_model_changes() -> None:
    metrics = WorkerMetrics()
    metrics.set_info("3", "old")
    metrics.set_info("3", "new")
    info = {key: value for key, value in samples(metrics).items() if key[0] == "inspector_info"}
    assert info == {("inspector_info", (("line", "3"), ("model", "new"))): 1}


# --------------------------------------------------------------------------- health server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(clock: FakeClock) -> Iterator[HealthServer]:
    health = HealthServer(HttpConfig(port=0, stale_after_s=STALE_AFTER_S), WorkerMetrics(), clock=clock)
    health.start()
    try:
        yield health
    finally:
        health.stop()


def get(server: HealthServer, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    data = b"{}" if method in ("POST", "PUT") else None
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", method=method, data=data)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def test_readyz_is_503_with_a_reason_until_ready(server: HealthServer) -> None:
    status, headers, body = get(server, "/readyz")
    assert status == 503 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"ready": False, "reason": "starting"}
    server.set_ready(True)
    status, _, body = get(server, "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    assert b"inspector_ready 1.0" in get(server, "/metrics")[2]
    server.set_ready(False, "bank_unavailable")
    status, _, body = get(server, "/readyz")
    assert status == 503 and json.loads(body)["reason"] == "bank_unavailable"


def test_healthz_goes_stale_without_beats(server: HealthServer, clock: FakeClock) -> None:
    status, headers, body = get(server, "/healthz")
    assert status == 200 and body == b"ok\n" and headers["Content-Type"].startswith("text/plain")
    clock.now += STALE_AFTER_S / 2
    server.beat()
    clock.now += STALE_AFTER_S * 0.9  # since the last beat: still inside the window
    assert get(server, "/healthz")[0] == 200
    clock.now += STALE_AFTER_S
    status, _, body = get(server, "/healthz")
    assert status == 503 and body.startswith(b"stale")
    server.beat()
    assert get(server, "/healthz")[0] == 200


def test_healthz_with_the_real_clock() -> None:
    # A tiny window: the first request comes long after the start beat has gone stale.
    health = HealthServer(HttpConfig(port=0, stale_after_s=1e-6), WorkerMetrics()).start()
    try:
        assert get(health, "/healthz")[0] == 503
    finally:
        health.stop()


def test_metrics_endpoint_serves_the_registry(server: HealthServer) -> None:
    observe_everything(server.metrics)
    status, headers, body = get(server, "/metrics?debug=1")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    names = {sample.name for family in text_string_to_metric_families(body.decode()) for sample in family.samples}
    for name in METRIC_NAMES:
        assert any(sample.startswith(name) for sample in names), name


@pytest.mark.parametrize("path", ["/", "/metrics/x", "/health"])
def test_unknown_paths_are_404(server: HealthServer, path: str) -> None:
    assert get(server, path)[0] == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD"])
def test_other_methods_are_405(server: HealthServer, method: str) -> None:
    status, headers, _ = get(server, "/metrics", method)
    assert status == 405 and headers["Allow"] == "GET"


def test_requests_are_not_logged_to_stderr(server: HealthServer, capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    for path in ("/metrics", "/healthz", "/readyz", "/missing"):
        get(server, path)
    get(server, "/metrics", "POST")
    assert capfd.readouterr().err == ""


def test_stop_is_idempotent_and_closes_the_socket(clock: FakeClock) -> None:
    health = HealthServer(HttpConfig(port=0), WorkerMetrics(), clock=clock).start()
    port = health.port
    health.stop()
    health.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S):
        pass


# --------------------------------------------------------------------------- systemd notify


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    # A short directory: AF_UNIX paths are limited to about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="ins") as directory:
        path = os.path.join(directory, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(RECV_TIMEOUT_S)
        try:
            yield sock, path
        finally:
            sock.close()


def nothing_pending(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(1024)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(RECV_TIMEOUT_S)
    return False


def test_notifier_sends_each_message(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready()
    assert sock.recv(1024) == b"READY=1"
    assert notifier.ready("serving 4 products")
    assert sock.recv(1024) == b"READY=1\nSTATUS=serving 4 products"
    assert notifier.watchdog()
    assert sock.recv(1024) == b"WATCHDOG=1"
    assert notifier.status("bank epoch 7\nREADY=1")  # a newline cannot smuggle in an assignment
    assert sock.recv(1024) == b"STATUS=bank epoch 7 READY=1"
    assert notifier.stopping()
    assert sock.recv(1024) == b"STOPPING=1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")
def test_notifier_abstract_socket() -> None:
    name = f"inspector-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(RECV_TIMEOUT_S)
        assert Notifier({"NOTIFY_SOCKET": f"@{name}"}).ready()
        assert sock.recv(1024) == b"READY=1"


def test_notifier_without_socket_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() and notifier.watchdog() and notifier.stopping() and notifier.status("x")
    assert notifier.watchdog_interval_s() is None


def test_notifier_send_failure_returns_false(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False


def test_watchdog_interval_is_half_the_period() -> None:
    assert Notifier({"WATCHDOG_USEC": "20000000"}).watchdog_interval_s() == pytest.approx(10.0)
    assert Notifier({"WATCHDOG_USEC": "bogus"}).watchdog_interval_s() is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval_s() is None


def test_watchdog_respects_watchdog_pid(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4242"}
    other = Notifier(env, pid=4243)
    assert other.watchdog_interval_s() is None
    assert other.watchdog()  # nothing due, nothing sent
    assert nothing_pending(sock)
    owner = Notifier(env, pid=4242)
    assert owner.watchdog_interval_s() == pytest.approx(1.0)
    assert owner.watchdog()
    assert sock.recv(1024) == b"WATCHDOG=1"


# --------------------------------------------------------------------------- logging


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    try:
        yield stream
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "stream", None) is stream]:
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
        structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_parse_with_level_time_and_context(log_stream: io.StringIO) -> None:
    configure_logging(LogConfig(level="info"), log_stream)
    log = get_logger("inspector.worker", line="3")
    log.info("batch_scored", frames=4, infer_ms=12.5)
    log.debug("hidden_at_info")
    (record,) = lines(log_stream)
    assert record["event"] == "batch_scored" and record["level"] == "info"
    assert record["frames"] == 4 and record["line"] == "3" and record["logger"] == "inspector.worker"
    assert record["timestamp"].endswith("Z")  # ISO 8601 in UTC


def test_secrets_are_redacted_in_log_output(log_stream: io.StringIO) -> None:
    configure_logging(LogConfig(level="debug"), log_stream)
    log = get_logger("inspector.banks")
    log.info("bank_connect", password=SECRET, api_token=SECRET, url=f"redis://u:{SECRET}@h:6379/0")
    log.info(f"retry redis://:{SECRET}@h")
    cfg = load_config(None, {"INSPECTOR_BANKS_PASSWORD": SECRET}, {}, "3")
    log.info("config_resolved", config=dataclasses.asdict(cfg.banks))  # even unredacted, nested keys are masked
    try:
        raise ConnectionError(f"cannot reach redis://u:{SECRET}@h")
    except ConnectionError:
        log.exception("bank_poll_failed")
    logging.getLogger("redis").warning("lost rediss://u:%s@h", SECRET)
    output = log_stream.getvalue()
    assert SECRET not in output
    records = lines(log_stream)
    assert len(records) == 5
    assert records[0]["password"] == "***" and records[0]["url"] == "redis://u:***@h:6379/0"
    assert records[2]["config"]["password"] == "***"
    assert records[4]["logger"] == "redis" and records[4]["event"] == "lost rediss://u:***@h"


def test_configure_logging_can_be_called_again(log_stream: io.StringIO) -> None:
    log = get_logger("inspector.cli")  # obtained before configuration, as a module-level logger is
    first, second = io.StringIO(), log_stream
    configure_logging(LogConfig(), first)
    log.info("one")
    configure_logging(LogConfig(level="warning"), second)
    log.info("two")
    log.warning("three")
    logging.getLogger("lib").warning("four")
    assert [r["event"] for r in lines(first)] == ["one"]
    assert [r["event"] for r in lines(second)] == ["three", "four"]
    assert sum(1 for h in logging.getLogger().handlers if getattr(h, "stream", None) is first) == 0


def test_console_format(log_stream: io.StringIO) -> None:
    configure_logging(LogConfig(json=False), log_stream)
    get_logger("inspector.worker").info("worker_ready", secret_key=SECRET, products=2)
    output = log_stream.getvalue()
    assert "worker_ready" in output and "products=2" in output and SECRET not in output
    with pytest.raises(json.JSONDecodeError):
        json.loads(output)


def test_defaults_config_logs_cleanly(log_stream: io.StringIO) -> None:
    configure_logging(WorkerConfig().log, log_stream)
    get_logger("x").info("started")
    assert lines(log_stream)[0]["event"] == "started"
