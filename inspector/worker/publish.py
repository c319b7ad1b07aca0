"""Publishing results: the ZMQ PUB socket, heatmap PNGs, the Redis stream and the heartbeat.

The publisher thread owns the PUB socket. PUB never blocks on a slow or absent subscriber (ZMQ
drops that subscriber's messages past its high-water mark), so inference never waits on
consumers. The Redis stream has its own thread and a bounded buffer: while Redis is down results
wait there, and past the bound the oldest are counted as lost (``inspector_stream_lost_total``),
never raised.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import structlog
import zmq

from ..decode import encode_heatmap
from ..keys import heartbeat_key, results_key
from .metrics import WorkerMetrics
from ..wire import FAIL, HeatmapInfo, Latency, Result

if TYPE_CHECKING:
    from .archive import Archive
    from .live import LiveState

STREAM_BATCH = 256  # results per pipelined XADD round trip
STREAM_IDLE_S = 0.05  # the stream thread re-checks its buffer this often when idle
STREAM_BACKOFF_MAX_S = 5.0  # retry Redis at least this often while it is down
STOP_POLL_S = 0.1  # the publisher re-checks for stop this often when idle


@dataclass
class Outgoing:
    """A result waiting to be published, with its calibrated map when a heatmap may be sent."""

    result: Result
    calibrated: np.ndarray | None = None
    recv_s: float = 0.0
    ready_s: float = 0.0  # monotonic time the engine finished with it
    pixels: np.ndarray | None = None  # the model's input, for the failed-frame archive and the live page
    raw_score: float | None = None  # against the product's bank, for the live page's feedback
    bank_version: int | None = None  # the product's bank version that raw score belongs to


class Publisher:
    """Sends every result once: PUB socket, stream, metrics; heatmaps per policy."""

    def __init__(
        self,
        context: zmq.Context,
        bind: str,
        sndhwm: int,
        heatmaps: str,
        heatmap_scale: float,
        metrics: WorkerMetrics,
        stream: "StreamWriter | None" = None,
        configure: Callable[[zmq.Socket], None] | None = None,
        archive: "Archive | None" = None,
        live: "LiveState | None" = None,
    ) -> None:
        self.archive = archive
        self.live = live
        self.heatmaps = heatmaps
        self.scale = heatmap_scale
        self.metrics = metrics
        self.stream = stream
        self.socket = context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, sndhwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        if configure is not None:
            configure(self.socket)
        self.socket.bind(bind)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.published = 0
        self.counts: dict[str, int] = {}
        self._queue: queue.SimpleQueue[Outgoing] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._log = structlog.get_logger("inspector.publish")
        self._thread = threading.Thread(target=self._run, name="publish", daemon=True)

    def start(self) -> "Publisher":
        self._thread.start()
        return self

    def submit(self, item: Outgoing) -> None:
        self._queue.put(item)

    def pending(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float = 10.0) -> None:
        """Publish everything submitted so far, then close the socket."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=STOP_POLL_S)
                except queue.Empty:
                    if self._stop.is_set():
                        break
                    continue
                try:
                    self._publish(item)
                except Exception as err:  # one bad result must not silence every later one
                    self._log.error("publish_failed", frame_id=item.result.frame_id, error=repr(err))
        finally:
            self.socket.close(linger=0)

    def _publish(self, item: Outgoing) -> None:
        result, png = item.result, b""
        if item.calibrated is not None and (self.heatmaps == "all" or (self.heatmaps == "fail" and result.verdict == FAIL)):
            try:
                png = encode_heatmap(item.calibrated, self.scale)
                result = dataclasses.replace(
                    result, heatmap=HeatmapInfo(shape=tuple(item.calibrated.shape), scale=self.scale))
            except Exception as err:  # a heatmap is optional: its failure costs the image, never the result
                self.metrics.heatmap_error()
                self._log.warning("heatmap_failed", frame_id=result.frame_id, error=repr(err))
        now = time.monotonic()
        lat = result.latency_ms
        if item.recv_s:
            lat = dataclasses.replace(lat, post=round(1000 * (now - item.ready_s), 3) if item.ready_s else lat.post,
                                      total=round(1000 * (now - item.recv_s), 3))
        result = dataclasses.replace(result, latency_ms=lat, done_ns=time.time_ns())
        try:
            self.socket.send_multipart(result.to_frames(png), zmq.NOBLOCK)
        except zmq.Again:  # PUB drops for slow subscribers instead; kept for safety, counted as sent
            pass
        if self.stream is not None:
            self.stream.append(result)
        self.published += 1
        self.counts[result.verdict] = self.counts.get(result.verdict, 0) + 1
        self.metrics.observe_result(result.verdict, result.reason or "", result.product, result.score,
                                    dataclasses.asdict(lat))
        if self.archive is not None:  # after the result is out: the archive never delays or costs one
            self.archive.offer(result, item.pixels, item.calibrated, png)
        if self.live is not None:
            try:
                self.live.observe(result, item.pixels, item.calibrated, item.raw_score, item.bank_version)
            except Exception as err:  # the page is optional: its failure never costs a result
                self._log.error("live_page_failed", frame_id=result.frame_id, error=repr(err))


class StreamWriter:
    """Appends result headers to the line's results stream and keeps its heartbeat key fresh
    (``inspector.keys``).

    Args:
        client: a ``redis.Redis`` client.
        prefix: the store's key prefix.
        line: the line name.
        maxlen: approximate stream length kept (XADD MAXLEN ~).
        buffer: results held while Redis is unreachable; beyond, the oldest are lost (counted).
        heartbeat_ttl_s: the heartbeat key expires this long after the last write.
        status: returns the heartbeat's JSON-ready status.
    """

    def __init__(self, client: Any, prefix: str, line: str, maxlen: int, buffer: int, heartbeat_ttl_s: int,
                 metrics: WorkerMetrics, status: Callable[[], dict]) -> None:
        self.client = client
        self.stream_key = results_key(prefix, line)
        self.heartbeat_key = heartbeat_key(prefix, line)
        self.maxlen = maxlen
        self.capacity = buffer
        self.ttl = heartbeat_ttl_s
        self.metrics = metrics
        self.status = status
        self.lost = 0
        self.written = 0
        self._buf: deque[bytes] = deque()  # queued, oldest first; eviction only ever takes from here
        self._sending: list[bytes] = []  # the chunk being sent: owned by the writer thread
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._connected = True
        self._beat_due = True
        self._log = structlog.get_logger("inspector.stream")
        self._thread = threading.Thread(target=self._run, name="stream", daemon=True)

    def start(self) -> "StreamWriter":
        self._thread.start()
        return self

    def beat_now(self) -> None:
        """Write the heartbeat at the next turn (the worker's status changed)."""
        self._beat_due = True

    def append(self, result: Result) -> None:
        """Queue one result; with the buffer full the oldest queued one is lost (counted once).

        Only queued results are ever evicted: a chunk the writer is sending is its own (taken out
        of the buffer under the lock), so a result is either written or counted lost, never both.
        """
        data = result.to_json()
        with self._lock:
            self._buf.append(data)
            self._evict_over_capacity()

    def _evict_over_capacity(self) -> None:
        """Drop the oldest queued results beyond capacity, counting each as lost (lock held)."""
        over = len(self._buf) - self.capacity
        for _ in range(max(over, 0)):
            self._buf.popleft()
        if over > 0:
            self.lost += over
            self.metrics.stream_lost(over)
        self.metrics.set_stream_buffered(len(self._buf) + len(self._sending))

    def _requeue(self) -> None:
        """A send failed: its chunk goes back in front of the queue, in order, and the capacity
        bound applies again (the oldest results are the ones lost). A chunk that was partly
        written before the connection broke is sent again whole: at-least-once, never lost silently.
        """
        with self._lock:
            self._buf.extendleft(reversed(self._sending))
            self._sending = []
            self._evict_over_capacity()

    def stop(self, timeout: float = 5.0) -> None:
        """Flush what can be flushed within ``timeout``; what remains is counted as lost."""
        self._stop.set()
        self._thread.join(timeout)
        with self._lock:
            left = len(self._buf) + len(self._sending)
            self._buf.clear()
            self._sending = []
        if left:
            self.lost += left
            self.metrics.stream_lost(left)
            self._log.warning("stream_results_lost_at_exit", count=left)

    def _run(self) -> None:
        import redis

        backoff = STREAM_IDLE_S
        next_beat = 0.0
        while True:
            with self._lock:  # the writer owns the chunk from here: append can no longer evict it
                self._sending = [self._buf.popleft() for _ in range(min(STREAM_BATCH, len(self._buf)))]
                chunk = self._sending
            if not chunk and self._stop.is_set():
                break
            try:
                if self._beat_due or time.monotonic() >= next_beat:
                    self._beat_due = False
                    self.client.set(self.heartbeat_key, json.dumps(self.status()), ex=self.ttl)
                    next_beat = time.monotonic() + self.ttl / 3
                if chunk:
                    pipe = self.client.pipeline(transaction=False)
                    for data in chunk:
                        pipe.xadd(self.stream_key, {"result": data}, maxlen=self.maxlen, approximate=True)
                    pipe.execute()
                    with self._lock:
                        self._sending = []
                        self.written += len(chunk)
                        self.metrics.set_stream_buffered(len(self._buf))
                if not self._connected:
                    self._connected = True
                    self._log.info("stream_reconnected")
                backoff = STREAM_IDLE_S
                if not chunk:
                    self._stop.wait(STREAM_IDLE_S)
            except (redis.RedisError, OSError) as err:
                self._requeue()
                if self._connected:
                    self._log.warning("stream_unavailable", error=str(err))
                self._connected = False
                if self._stop.is_set():
                    break
                self._stop.wait(backoff)
                backoff = min(backoff * 2, STREAM_BACKOFF_MAX_S)
