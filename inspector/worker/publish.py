"""Publishing results: the ZMQ PUB socket and heatmap PNGs; each result also goes to the Redis
stream (``stream.py``), the failed-frame archive and the live page when they are on.

The publisher thread owns the PUB socket. PUB never blocks on a slow or absent subscriber (ZMQ
drops that subscriber's messages past its high-water mark), so inference never waits on
consumers.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import structlog
import zmq

from ..decode import encode_heatmap
from .metrics import WorkerMetrics
from ..wire import FAIL, HeatmapInfo, Result

if TYPE_CHECKING:
    from .archive import Archive
    from .live import LiveState
    from .stream import StreamWriter

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
        """Finish the result (heatmap, ``done_ns``, post and total latencies: the one place a result
        is completed) and send it everywhere it goes."""
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
