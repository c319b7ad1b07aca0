"""Prometheus metrics and the health HTTP server (DESIGN section 9).

:class:`WorkerMetrics` owns its own registry, so several workers (or tests) in one process never
collide. :class:`HealthServer` serves ``/metrics``, ``/healthz`` (the processing loop is alive)
and ``/readyz`` (model, bank and warm-up done) from a daemon thread, bound to loopback by default.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from ..config import HttpConfig
from ..logs import get_logger

STAGES = ("queue", "decode", "infer", "post", "total")
MS_PER_S = 1000.0

# Stage latencies from 1 ms (a decode) to 10 s (a stalled GPU), in a 1-2-5 series.
LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
MAX_BATCH_BUCKET_LOG2 = 6  # batch sizes up to 64, far above what an edge GPU is given
BATCH_BUCKETS = tuple(float(2**power) for power in range(MAX_BATCH_BUCKET_LOG2 + 1))
# Calibrated scores: normal images sit near 0 (mean) to 1 (max); defects go well beyond.
SCORE_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0)

SERVE_POLL_S = 0.1  # how often the serving thread checks for stop(): bounds stop() latency
REQUEST_TIMEOUT_S = 5.0  # a client that stalls mid-request cannot hold a thread longer
JOIN_TIMEOUT_S = 5.0
NOT_READY_REASON = "starting"

HTTP_OK, HTTP_NOT_FOUND, HTTP_NOT_ALLOWED, HTTP_UNAVAILABLE = 200, 404, 405, 503
HTTP_BAD_REQUEST, HTTP_TOO_LARGE = 400, 413
TEXT_PLAIN = "text/plain; charset=utf-8"
TEXT_HTML = "text/html; charset=utf-8"
IMAGE_PNG = "image/png"
APPLICATION_JSON = "application/json"
FRAME_ROUTE = "/live/frames/"


class WorkerMetrics:
    """Every metric the worker exports, in a registry of its own.

    Label values stay bounded: verdicts and reasons are fixed vocabularies, products are capped
    by the bank capacity.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.stage_latency = Histogram(
            "inspector_stage_latency_seconds", "Time a frame spent in each stage.", ["stage"],
            buckets=LATENCY_BUCKETS_S, registry=reg)
        self.queue_depth = Gauge("inspector_queue_depth", "Frames waiting in the ingest queue.", registry=reg)
        self.received = Gauge("inspector_messages_received",
                              "Messages taken off the ingest socket since start (each gets exactly one result).",
                              registry=reg)
        self.batch_size = Histogram(
            "inspector_batch_size", "Frames per inference batch.", buckets=BATCH_BUCKETS, registry=reg)
        self.results_total = Counter(
            "inspector_results", "Results published, by verdict and reason.", ["verdict", "reason"], registry=reg)
        self.dropped_total = Counter("inspector_dropped", "Frames dropped by the overload policy.", registry=reg)
        self.bank_epoch = Gauge("inspector_bank_epoch", "Epoch of the bank set in use.", registry=reg)
        self.bank_products = Gauge("inspector_bank_products", "Products in the bank set in use.", registry=reg)
        self.bank_refused_total = Counter(
            "inspector_bank_refused", "Bank updates refused, by reason.", ["reason"], registry=reg)
        self.score = Histogram(
            "inspector_score", "Calibrated image scores, by product.", ["product"],
            buckets=SCORE_BUCKETS, registry=reg)
        self.stream_lost_total = Counter(
            "inspector_stream_lost", "Results that could not be written to the Redis stream.", registry=reg)
        self.stream_buffered = Gauge(
            "inspector_stream_buffered", "Results waiting for Redis to come back.", registry=reg)
        self.heatmap_errors_total = Counter(
            "inspector_heatmap_errors", "Heatmaps that could not be encoded.", registry=reg)
        self.notify_errors_total = Counter(
            "inspector_notify_errors", "systemd notifications that could not be sent.", registry=reg)
        self.calibration_u = Gauge(
            "inspector_calibration_u", "Each product's normal statistics in service: u (calibrated score 0).",
            ["product"], registry=reg)
        self.calibration_gamma = Gauge(
            "inspector_calibration_gamma", "Each product's normal statistics in service: gamma (calibrated score 1).",
            ["product"], registry=reg)
        self.calibration_count = Gauge(
            "inspector_calibration_count", "Good-image or stream scores behind each product's statistics, by source.",
            ["product", "source"], registry=reg)
        self.calibration_thin = Gauge(
            "inspector_calibration_thin",
            "1 while too few good-image scores stand behind a product's statistics (its threshold is uncertain), "
            "or its bank predates measured statistics.", ["product"], registry=reg)
        self.calibration_frozen = Gauge(
            "inspector_calibration_frozen", "1 while a product's stream learning is frozen by a fail-rate jump.",
            ["product"], registry=reg)
        self.calibration_updates_total = Counter(
            "inspector_calibration_updates", "Changes to products' statistics, by product and kind "
            "(stream, frozen, unfrozen, persist_failed).", ["product", "kind"], registry=reg)
        self.archive_written_total = Counter(
            "inspector_archive_written", "Frames written to the failed-frame archive.", registry=reg)
        self.archive_lost_total = Counter(
            "inspector_archive_lost", "Frames the archive could not keep, by reason (queue_full, enospc, "
            "eacces, erofs, ...): entries are lost, never results.", ["reason"], registry=reg)
        self.ready = Gauge("inspector_ready", "1 once the worker serves results, else 0.", registry=reg)
        self.info = Gauge("inspector_info", "Constant 1, labelled with the line and model id.",
                          ["line", "model"], registry=reg)

    def observe_result(
        self,
        verdict: str,
        reason: str,
        product: str | None,
        score: float | None,
        latency_ms: Mapping[str, float],
    ) -> None:
        """Count one published result.

        Args:
            verdict: pass, fail, error, timeout or dropped; ``dropped`` also counts as a drop.
            reason: the result's reason, "" when none.
            product: the routed product, or None/"" when unknown.
            score: calibrated score, None when the frame was not scored.
            latency_ms: per-stage latencies; stages other than :data:`STAGES` are ignored.
        """
        self.results_total.labels(verdict=verdict, reason=reason or "").inc()
        if verdict == "dropped":
            self.dropped_total.inc()
        if score is not None:
            self.score.labels(product=product or "").observe(score)
        for stage in STAGES:
            if stage in latency_ms:
                self.stage_latency.labels(stage=stage).observe(latency_ms[stage] / MS_PER_S)

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def count_received(self, read: Callable[[], int]) -> None:
        """Report ``read()`` (the ingest's own counter) as ``inspector_messages_received`` at each scrape."""
        self.received.set_function(read)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def set_bank(self, epoch: int, products: int) -> None:
        self.bank_epoch.set(epoch)
        self.bank_products.set(products)

    def bank_refused(self, reason: str) -> None:
        self.bank_refused_total.labels(reason=reason).inc()

    def stream_lost(self, count: int = 1) -> None:
        self.stream_lost_total.inc(count)

    def set_stream_buffered(self, count: int) -> None:
        self.stream_buffered.set(count)

    def archive_written(self) -> None:
        self.archive_written_total.inc()

    def archive_lost(self, reason: str) -> None:
        self.archive_lost_total.labels(reason=reason).inc()

    def heatmap_error(self) -> None:
        self.heatmap_errors_total.inc()

    def notify_failed(self) -> None:
        self.notify_errors_total.inc()

    def set_calibration(self, summaries: Mapping[str, Mapping]) -> None:
        """Show each product's statistics in service (``NormalStats.summary()`` per product)."""
        for gauge in (self.calibration_u, self.calibration_gamma, self.calibration_count, self.calibration_frozen,
                      self.calibration_thin):
            gauge.clear()
        for product, s in summaries.items():
            self.calibration_u.labels(product=product).set(s["u"])
            self.calibration_gamma.labels(product=product).set(s["gamma"])
            self.calibration_count.labels(product=product, source=s["source"]).set(s["count"])
            self.calibration_frozen.labels(product=product).set(1 if s["frozen"] else 0)
            self.calibration_thin.labels(product=product).set(1 if s["thin"] or not s.get("measured", True) else 0)

    def calibration_update(self, product: str, kind: str) -> None:
        self.calibration_updates_total.labels(product=product, kind=kind).inc()

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    def set_info(self, line: str, model: str) -> None:
        """Label the process with its line and model id (one series: a new model replaces the old)."""
        self.info.clear()
        self.info.labels(line=line, model=model).set(1)

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format 0.0.4."""
        return generate_latest(self.registry)


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` over HTTP, served from a daemon thread.

    ``/healthz`` is 200 while the processing loop calls :meth:`beat` at least every
    ``cfg.stale_after_s`` seconds (starting the server counts as a beat), 503 otherwise.
    ``/readyz`` is 503 with a JSON reason until :meth:`set_ready` is called with True.
    The server binds ``cfg.bind:cfg.port`` as given; port 0 binds an ephemeral port (the worker
    does not start the server at all when the configured port is 0).
    """

    def __init__(self, cfg: HttpConfig, metrics: WorkerMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cfg = cfg
        self.metrics = metrics
        self._clock = clock
        self._last_beat = clock()
        self._ready = False
        self._reason = NOT_READY_REASON
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._log = get_logger(__name__)
        self.live: Any = None  # an inspector.worker.live.LiveState once the worker has one: serves the page

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one when configured with 0)."""
        if self._server is None:
            raise RuntimeError("HealthServer is not started")
        return self._server.server_address[1]

    def start(self) -> HealthServer:
        with self._lock:
            if self._server is not None:
                return self
            server = _Server((self._cfg.bind, self._cfg.port), _Handler)
            server.health = self
            self._last_beat = self._clock()
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": SERVE_POLL_S},
                name="inspector-http", daemon=True)
            self._thread.start()
        self._log.info("http_started", bind=self._cfg.bind, port=self.port)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call more than once."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(JOIN_TIMEOUT_S)

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def beat(self) -> None:
        """Called from the processing loop: the worker is alive."""
        self._last_beat = self._clock()

    def set_ready(self, ready: bool, reason: str = "") -> None:
        """Mark the worker ready (or not, with a short reason for ``/readyz``)."""
        self._ready = ready
        self._reason = "" if ready else (reason or NOT_READY_REASON)
        self.metrics.set_ready(ready)

    def health(self) -> tuple[int, str]:
        silent_s = self._clock() - self._last_beat
        if silent_s > self._cfg.stale_after_s:
            return HTTP_UNAVAILABLE, f"stale: no beat for {silent_s:.1f} s\n"
        return HTTP_OK, "ok\n"

    def readiness(self) -> tuple[int, str]:
        if self._ready:
            return HTTP_OK, json.dumps({"ready": True})
        return HTTP_UNAVAILABLE, json.dumps({"ready": False, "reason": self._reason})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    health: HealthServer

    def handle_error(self, request: object, client_address: object) -> None:
        # A client hanging up mid-reply is not the worker's problem; keep stderr quiet.
        self.health._log.debug("http_request_failed", client=str(client_address))


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT_S
    server_version = "inspector"
    sys_version = ""

    def do_GET(self) -> None:
        health = self.server.health
        path = urlsplit(self.path).path
        if path == "/metrics":
            self._reply(HTTP_OK, health.metrics.render(), CONTENT_TYPE_PLAIN_0_0_4)
        elif path == "/healthz":
            status, text = health.health()
            self._reply(status, text.encode(), TEXT_PLAIN)
        elif path == "/readyz":
            status, text = health.readiness()
            self._reply(status, text.encode(), APPLICATION_JSON)
        elif health.live is not None and path in ("/", "/live"):
            from .live_page import PAGE

            self._reply(HTTP_OK, PAGE.encode(), TEXT_HTML)
        elif health.live is not None and path == "/live/state.json":
            self._reply(HTTP_OK, json.dumps(health.live.state()).encode(), APPLICATION_JSON)
        elif health.live is not None and path.startswith(FRAME_ROUTE) and path.endswith(".png"):
            frame_id, _, name = path[len(FRAME_ROUTE):].rpartition("/")
            png = health.live.image(frame_id, name[: -len(".png")]) if frame_id else None
            if png is None:
                self._reply(HTTP_NOT_FOUND, b"no such frame on the page (only the recent failed ones are kept)\n",
                            TEXT_PLAIN)
            else:
                self._reply(HTTP_OK, png, IMAGE_PNG)
        else:
            self._reply(HTTP_NOT_FOUND, b"not found\n", TEXT_PLAIN)

    def do_POST(self) -> None:
        live = self.server.health.live
        if live is None or urlsplit(self.path).path != "/live/feedback":
            self._not_allowed()
            return
        from .live import MAX_FEEDBACK_BODY, FeedbackError

        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._json(HTTP_BAD_REQUEST, {"error": "a feedback request needs a Content-Length"})
            return
        if not 0 < length <= MAX_FEEDBACK_BODY:
            self._json(HTTP_TOO_LARGE if length > 0 else HTTP_BAD_REQUEST,
                       {"error": f"a feedback request is a JSON object of at most {MAX_FEEDBACK_BODY} bytes"})
            return
        try:
            body = json.loads(self.rfile.read(length))
            frame_id = body["frame_id"] if isinstance(body, dict) else None
            if not isinstance(frame_id, str) or not frame_id:
                raise ValueError("frame_id")
        except (ValueError, KeyError, UnicodeDecodeError):
            self._json(HTTP_BAD_REQUEST, {"error": 'send {"frame_id": "<id of a failed frame on the page>"}'})
            return
        try:
            self._json(HTTP_OK, live.feedback(frame_id))
        except FeedbackError as err:
            self._json(err.status, {"error": str(err)})
        except Exception as err:  # a store outage: say so, keep serving
            self.server.health._log.warning("live_feedback_failed", frame_id=frame_id, error=repr(err))
            self._json(HTTP_UNAVAILABLE, {"error": f"feedback not recorded: {err}"})

    def _json(self, status: int, data: Mapping[str, Any]) -> None:
        self._reply(status, json.dumps(data).encode(), APPLICATION_JSON)

    def _not_allowed(self) -> None:
        self._reply(HTTP_NOT_ALLOWED, b"method not allowed\n", TEXT_PLAIN, allow="GET")

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed

    def _reply(self, status: int, body: bytes, content_type: str, allow: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if allow:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        """Silenced: per-request lines would flood the journal; /metrics is scraped often."""
