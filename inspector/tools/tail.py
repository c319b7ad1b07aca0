"""Live view of a worker's results: the consumer side of the result wire (DESIGN section 7).

A SUB socket connects to the worker's PUB endpoint and subscribes to ``result.`` (every line)
or ``result.<line>.`` (one line; a line name has no dot, so the prefix selects exactly it).
Every message is parsed with :meth:`inspector.wire.Result.from_frames`; one that breaks the
contract is counted as malformed and skipped, never raised.

:class:`ResultStats` keeps counts by verdict, reason and product, latency percentiles of
``latency_ms.total`` over a sliding window and over the whole run, and the recent throughput.
:func:`run_tail` drives the ``inspector tail`` command; :func:`collect_results` and
:func:`summarize` serve programs (the demo, tests) without the command line.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from array import array
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

import numpy as np
import zmq

from ..decode import decode_heatmap
from ..security import optional_client_configurer
from ..wire import VERDICTS, Result, WireError

DEFAULT_CONNECT = "tcp://127.0.0.1:5556"  # the worker's default result endpoint (PublishConfig.bind)
TOPIC_ROOT = "result."
# Results ZMQ queues for a slow reader before the worker's PUB drops them for this subscriber:
# ten seconds of a fast line at 1000 results/s; a live view should see drops, not hide them.
DEFAULT_RCVHWM = 10_000
DEFAULT_WINDOW = 1000  # results in the sliding latency window: a few seconds to minutes of a line
THROUGHPUT_WINDOW_S = 5.0  # throughput is measured over the last few seconds
REFRESH_S = 1.0  # the view refreshes about once per second
RECV_POLL_MS = 100  # bounds how late a refresh, a stop condition or Ctrl-C is noticed
PERCENTILES = (50, 95, 99)
NO_PRODUCT = "(none)"  # results without a product (errors, drops); parentheses are not valid in names
CLEAR_HOME = "\x1b[H\x1b[2J"  # ANSI: cursor home, clear screen, so the table refreshes in place
NS_PER_S = 1_000_000_000


def subscription(line: str | None = None) -> bytes:
    """The SUB prefix of all results, or of one line's."""
    return f"{TOPIC_ROOT}{line}.".encode("utf-8") if line else TOPIC_ROOT.encode("utf-8")


def percentiles(values: Iterable[float]) -> dict[str, float | None]:
    """``n``, ``p50``, ``p95``, ``p99`` and ``max`` (numpy's linear interpolation); None when empty."""
    data = np.fromiter(values, dtype=np.float64)
    if data.size == 0:
        return {"n": 0, **{f"p{q}": None for q in PERCENTILES}, "max": None}
    points = np.percentile(data, PERCENTILES)
    return {"n": int(data.size), **{f"p{q}": float(v) for q, v in zip(PERCENTILES, points)}, "max": float(data.max())}


@dataclass(frozen=True)
class Summary:
    """Counts and latencies of the results seen so far.

    Attributes:
        received: valid results.
        malformed: messages that broke the wire contract.
        counts: results per verdict, every verdict present (zeros included).
        by_reason: results per non-null reason (``anomaly``, ``overload``, ``bad_header``, ...).
        by_product: per product (``(none)`` when the result names none), results per verdict,
            non-zero verdicts only.
        latency_ms: percentiles of ``latency_ms.total`` over the last ``window`` results.
        latency_ms_overall: the same over every result.
        throughput_fps: results per second over the last ``THROUGHPUT_WINDOW_S`` seconds.
        heatmaps: results that carried a heatmap image.
        bad_heatmaps: heatmaps that did not decode to the shape their header announced.
    """

    received: int = 0
    malformed: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {v: 0 for v in VERDICTS})
    by_reason: dict[str, int] = field(default_factory=dict)
    by_product: dict[str, dict[str, int]] = field(default_factory=dict)
    latency_ms: dict[str, float | None] = field(default_factory=lambda: percentiles(()))
    latency_ms_overall: dict[str, float | None] = field(default_factory=lambda: percentiles(()))
    throughput_fps: float = 0.0
    heatmaps: int = 0
    bad_heatmaps: int = 0
    elapsed_s: float = 0.0
    window: int = DEFAULT_WINDOW

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResultStats:
    """Accumulates results into a :class:`Summary`.

    Args:
        window: results in the sliding latency window.
        clock: monotonic seconds (throughput and elapsed time).
        check_heatmaps: decode every heatmap and check it against its header.
    """

    def __init__(self, window: int = DEFAULT_WINDOW, clock: Callable[[], float] = time.monotonic,
                 check_heatmaps: bool = True) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self.window = window
        self.clock = clock
        self.check_heatmaps = check_heatmaps
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.start = self.clock()
        self.received = 0
        self.malformed = 0
        self.heatmaps = 0
        self.bad_heatmaps = 0
        self.verdicts: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.products: dict[str, Counter[str]] = {}
        self.recent = deque(maxlen=self.window)  # latency_ms.total of the last results
        self.latencies = array("d")  # every latency_ms.total: 8 bytes a result
        self.arrivals: deque[float] = deque()  # receive times within the throughput window

    def add(self, result: Result, heatmap: bytes = b"") -> None:
        """Count one valid result (and check its heatmap image, if any)."""
        now = self.clock()
        self.received += 1
        self.verdicts[result.verdict] += 1
        if result.reason is not None:
            self.reasons[result.reason] += 1
        self.products.setdefault(result.product or NO_PRODUCT, Counter())[result.verdict] += 1
        total = result.latency_ms.total
        if math.isfinite(total):  # a stage the worker could not time reads back as NaN
            self.recent.append(total)
            self.latencies.append(total)
        self.arrivals.append(now)
        self._trim(now)
        if heatmap:
            self.heatmaps += 1
            if self.check_heatmaps and not _heatmap_ok(result, heatmap):
                self.bad_heatmaps += 1

    def add_malformed(self) -> None:
        self.malformed += 1

    def _trim(self, now: float) -> None:
        while self.arrivals and self.arrivals[0] < now - THROUGHPUT_WINDOW_S:
            self.arrivals.popleft()

    def summary(self) -> Summary:
        now = self.clock()
        self._trim(now)
        span = min(THROUGHPUT_WINDOW_S, now - self.start)
        return Summary(
            received=self.received,
            malformed=self.malformed,
            counts={v: self.verdicts.get(v, 0) for v in VERDICTS},
            by_reason=dict(sorted(self.reasons.items())),
            by_product={p: dict(sorted(c.items())) for p, c in sorted(self.products.items())},
            latency_ms=percentiles(self.recent),
            latency_ms_overall=percentiles(self.latencies),
            throughput_fps=len(self.arrivals) / span if span > 0 else 0.0,
            heatmaps=self.heatmaps,
            bad_heatmaps=self.bad_heatmaps,
            elapsed_s=now - self.start,
            window=self.window,
        )


def _heatmap_ok(result: Result, heatmap: bytes) -> bool:
    info = result.heatmap
    try:
        decoded = decode_heatmap(heatmap, info.scale)  # (H, W)
    except WireError:
        return False
    return decoded.shape == tuple(info.shape)


def summarize(results: Iterable[tuple[Result, bytes]], window: int = DEFAULT_WINDOW, malformed: int = 0) -> Summary:
    """The summary of results already collected; throughput from their ``done_ns`` span."""
    stats = ResultStats(window)
    items = list(results)
    for result, heatmap in items:
        stats.add(result, heatmap)
    stats.malformed = malformed
    summary = stats.summary()
    done = [r.done_ns for r, _ in items]
    span_ns = max(done) - min(done) if done else 0
    fps = (len(done) - 1) * NS_PER_S / span_ns if span_ns > 0 else 0.0
    return Summary(**{**asdict(summary), "throughput_fps": fps})


class Tail:
    """A SUB socket on a worker's results.

    Args:
        endpoint: the worker's PUB endpoint.
        line: one line's results only, or every line's when None.
        rcvhwm: results ZMQ queues for this reader before the publisher drops them.
        stats: where results are counted (a new one with the default window when None).
        context: a ZMQ context to share; by default the tail owns one and ends it on close.
        curve_server_key: the worker's public certificate; with ``curve_client_key``, results
            arrive over CURVE (a worker with CURVE sends nothing to a plain subscriber).
        curve_client_key: this reader's secret certificate.

    Raises:
        ValueError: only one of the two CURVE keys is given, or a key file is unusable.
    """

    def __init__(self, endpoint: str = DEFAULT_CONNECT, line: str | None = None, rcvhwm: int = DEFAULT_RCVHWM,
                 stats: ResultStats | None = None, context: zmq.Context | None = None,
                 curve_server_key: str | None = None, curve_client_key: str | None = None) -> None:
        curve = optional_client_configurer(curve_server_key, curve_client_key)
        self.stats = stats or ResultStats()
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SUBSCRIBE, subscription(line))
        if curve is not None:
            curve(self.socket)
        self.socket.connect(endpoint)

    def receive(self, timeout_ms: int = RECV_POLL_MS) -> tuple[Result, bytes] | None:
        """The next valid result, counted; None on timeout or after a malformed message."""
        if not self.socket.poll(timeout_ms, zmq.POLLIN):
            return None
        parts = self.socket.recv_multipart(copy=False)
        try:
            result, heatmap = Result.from_frames(parts)
        except WireError:
            self.stats.add_malformed()
            return None
        self.stats.add(result, heatmap)
        return result, heatmap

    def close(self) -> None:
        self.socket.close(linger=0)
        if self._own_context:
            self.context.term()

    def __enter__(self) -> "Tail":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def collect_results(
    endpoint: str = DEFAULT_CONNECT,
    line: str | None = None,
    count: int = 1,
    timeout_s: float = 10.0,
    rcvhwm: int = DEFAULT_RCVHWM,
    context: zmq.Context | None = None,
    stats: ResultStats | None = None,
    curve_server_key: str | None = None,
    curve_client_key: str | None = None,
) -> list[tuple[Result, bytes]]:
    """Receive until ``count`` valid results or ``timeout_s`` seconds, whichever first.

    Malformed messages are skipped (counted in ``stats`` when given). A SUB socket sees only
    what is published after its subscription reached the publisher, so start this before the
    frames are sent. With both CURVE keys given, results arrive over CURVE (see :class:`Tail`).

    Returns:
        ``(result, heatmap PNG bytes or b"")`` in arrival order.
    """
    out: list[tuple[Result, bytes]] = []
    end = time.monotonic() + timeout_s
    with Tail(endpoint, line, rcvhwm, stats, context, curve_server_key, curve_client_key) as tail:
        while len(out) < count:
            left_ms = int((end - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            got = tail.receive(min(left_ms, RECV_POLL_MS))
            if got is not None:
                out.append(got)
    return out


# ---------------------------------------------------------------------------------------------
# The ``inspector tail`` command


@dataclass(frozen=True)
class TailConfig:
    """Flags of ``inspector tail``."""

    endpoint: str = DEFAULT_CONNECT
    line: str | None = None
    count: int | None = None
    duration_s: float | None = None
    json_lines: bool = False  # print each result header as a JSON line instead of the table
    record: str | None = None  # JSON-lines file of every result header
    window: int = DEFAULT_WINDOW
    rcvhwm: int = DEFAULT_RCVHWM
    curve_server_key: str | None = None  # the worker's public certificate: receive over CURVE
    curve_client_key: str | None = None  # this reader's secret certificate (with curve_server_key)

    def __post_init__(self) -> None:
        if bool(self.curve_server_key) != bool(self.curve_client_key):
            raise ValueError("CURVE needs both the worker's public key and this reader's secret key")
        if self.count is not None and self.count <= 0:
            raise ValueError(f"count must be positive, got {self.count}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration must be positive, got {self.duration_s}")
        if self.window <= 0 or self.rcvhwm <= 0:
            raise ValueError("window and rcvhwm must be positive")


def run_tail(cfg: TailConfig, out: TextIO | None = None, stop: threading.Event | None = None,
             context: zmq.Context | None = None) -> Summary:
    """Follow results until ``cfg.count`` results, ``cfg.duration_s`` seconds, ``stop`` or Ctrl-C.

    On a terminal the table refreshes in place about once per second; otherwise one summary
    line is printed per refresh; with ``json_lines`` each result header is printed instead. The
    final summary goes to ``out`` (to stderr in JSON mode, keeping ``out`` pure JSON lines).
    """
    out = out or sys.stdout
    stats = ResultStats(cfg.window)
    record = open(cfg.record, "w", encoding="utf-8") if cfg.record else None
    end = time.monotonic() + cfg.duration_s if cfg.duration_s is not None else None
    try:
        with Tail(cfg.endpoint, cfg.line, cfg.rcvhwm, stats, context, cfg.curve_server_key,
                  cfg.curve_client_key) as tail:
            _follow(tail, cfg, out, record, end, stop)
    except KeyboardInterrupt:
        pass
    finally:
        if record is not None:
            record.close()
    summary = stats.summary()
    final = sys.stderr if cfg.json_lines else out
    print(json.dumps({"summary": summary.to_dict()}) if cfg.json_lines else format_table(summary, cfg), file=final)
    return summary


def _follow(tail: Tail, cfg: TailConfig, out: TextIO, record: TextIO | None, end: float | None,
            stop: threading.Event | None) -> None:
    is_tty = _isatty(out)
    next_refresh = time.monotonic() + REFRESH_S
    while not (stop is not None and stop.is_set()):
        got = tail.receive(RECV_POLL_MS)
        if got is not None:
            line = got[0].to_json().decode("utf-8")
            if record is not None:
                record.write(line + "\n")
            if cfg.json_lines:
                print(line, file=out, flush=True)
        now = time.monotonic()
        if (cfg.count is not None and tail.stats.received >= cfg.count) or (end is not None and now >= end):
            return
        if not cfg.json_lines and now >= next_refresh:
            next_refresh = now + REFRESH_S
            summary = tail.stats.summary()
            text = CLEAR_HOME + format_table(summary, cfg) if is_tty else format_line(summary)
            print(text, file=out, flush=True)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or minimal stream
        return False


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_line(summary: Summary) -> str:
    """One line per refresh, for logs and pipes."""
    verdicts = " ".join(f"{v}={n}" for v, n in summary.counts.items())
    lat = summary.latency_ms
    return (
        f"t={summary.elapsed_s:.1f}s results={summary.received} fps={summary.throughput_fps:.1f} {verdicts} "
        f"malformed={summary.malformed} latency_ms p50={_ms(lat['p50'])} p95={_ms(lat['p95'])} "
        f"p99={_ms(lat['p99'])} max={_ms(lat['max'])}"
    )


def format_table(summary: Summary, cfg: TailConfig | None = None) -> str:
    """The full view: verdicts, reasons, products, latencies."""
    cfg = cfg or TailConfig()
    total = max(summary.received, 1)
    lines = [
        f"results from {cfg.endpoint} line {cfg.line or '*'}   {summary.elapsed_s:.1f} s   "
        f"{summary.throughput_fps:.1f} results/s (last {THROUGHPUT_WINDOW_S:.0f} s)",
        f"received {summary.received}   malformed {summary.malformed}   heatmaps {summary.heatmaps}"
        f" (bad {summary.bad_heatmaps})",
        "",
        f"{'verdict':<12}{'count':>9}{'%':>8}",
    ]
    lines += [f"{v:<12}{n:>9}{100 * n / total:>8.1f}" for v, n in summary.counts.items()]
    if summary.by_reason:
        lines += ["", f"{'reason':<24}{'count':>9}"]
        lines += [f"{r:<24}{n:>9}" for r, n in summary.by_reason.items()]
    if summary.by_product:
        lines += ["", f"{'product':<24}" + "".join(f"{v:>9}" for v in VERDICTS)]
        for product, counts in summary.by_product.items():
            lines.append(f"{product:<24}" + "".join(f"{counts.get(v, 0):>9}" for v in VERDICTS))
    lines += ["", f"{'latency ms':<24}{'n':>9}" + "".join(f"{f'p{q}':>9}" for q in PERCENTILES) + f"{'max':>9}"]
    for name, lat in ((f"last {summary.window}", summary.latency_ms), ("all", summary.latency_ms_overall)):
        cells = "".join(f"{_ms(lat[f'p{q}']):>9}" for q in PERCENTILES)
        lines.append(f"{name:<24}{lat['n']:>9}{cells}{_ms(lat['max']):>9}")
    return "\n".join(lines)


def write_records(path: str | Path, results: Iterable[tuple[Result, bytes]]) -> None:
    """Write result headers as JSON lines (the format of ``inspector tail --record``)."""
    with open(path, "w", encoding="utf-8") as handle:
        for result, _ in results:
            handle.write(result.to_json().decode("utf-8") + "\n")
