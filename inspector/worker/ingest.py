"""Ingest: the ZMQ PULL socket, header validation, and hand-off to the decode pool and queue.

One thread owns the PULL socket (ZMQ sockets are not thread-safe). It receives without copying,
validates the header and limits (``inspector.wire``), submits the payload to the decode pool and
queues the job; a frame that fails validation becomes an ``error`` result at once, and a frame
the overload policy drops becomes a ``dropped`` result. Receiving polls with a timeout so a stop
request is seen within ``RECV_POLL_MS``.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Executor
from typing import Callable

import numpy as np
import zmq

from .batcher import FrameQueue, Job
from ..config import IngestConfig
from ..decode import prepare_frame
from ..wire import FrameHeader, WireError, WireLimits, parse_frame

RECV_POLL_MS = 100  # bounds how long a stop request waits for the ingest thread
BLOCK_RETRY_S = 0.1  # with the "block" policy, re-check for shutdown this often while the queue is full
# A message part up to this multiple of the payload limit is still received and answered with a
# `payload_too_large` error result; a larger one makes ZeroMQ drop the connection before buffering
# it, so a hostile sender cannot make ingest hold gigabytes (the peer sees a disconnect, no result).
OVERSIZE_FACTOR = 4

Reject = Callable[[WireError, int], None]
Drop = Callable[[Job], None]


def prepare(header: FrameHeader, payload: memoryview, limits: WireLimits, size: int) -> tuple[np.ndarray, float]:
    """Decode and resize one payload (``inspector.decode.prepare_frame``: a large JPEG at a reduced
    DCT scale) -> ``((size, size, 3) uint8 RGB, milliseconds)``."""
    t0 = time.perf_counter()
    pixels = prepare_frame(header, payload, limits, size)
    return pixels, 1000 * (time.perf_counter() - t0)


class Ingest:
    """Receives frames on ``bind`` until stopped.

    Args:
        context: the process's ZMQ context.
        cfg: the line config's ``[ingest]``: the endpoint to bind the PULL socket to, the receive
            high-water mark (messages ZMQ queues before pushing back on senders) and the wire
            limits of what a frame may be (``IngestConfig.limits()``).
        queue: the bounded queue the engine reads.
        pool: the decode pool.
        size: model input size frames are resized to.
        default_deadline_ms: deadline of frames whose header sets none.
        reject: called with each invalid frame's error and receive time.
        drop: called with each job the overload policy drops.
        configure: applies socket options before bind (CURVE security).
    """

    def __init__(
        self,
        context: zmq.Context,
        cfg: IngestConfig,
        queue: FrameQueue,
        pool: Executor,
        size: int,
        default_deadline_ms: float,
        reject: Reject,
        drop: Drop,
        configure: Callable[[zmq.Socket], None] | None = None,
    ) -> None:
        self.limits = limits = cfg.limits()
        self.queue = queue
        self.pool = pool
        self.size = size
        self.default_deadline_ms = default_deadline_ms
        self._reject = reject
        self._drop = drop
        self.socket = context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, cfg.rcvhwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, OVERSIZE_FACTOR * (limits.max_payload_bytes + limits.max_header_bytes))
        if configure is not None:
            configure(self.socket)
        self.socket.bind(cfg.bind)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)

    def start(self) -> "Ingest":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop receiving and close the socket (frames still in ZMQ's buffers are not received)."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(RECV_POLL_MS):
                    continue
                while not self._stop.is_set():
                    try:
                        parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.handle(parts)
        finally:
            self.socket.close(linger=0)

    def handle(self, parts: list) -> None:
        """Validate one message and queue it, or report it as rejected."""
        self.received += 1
        recv_ns, recv_s = time.time_ns(), time.monotonic()
        try:
            header, payload = parse_frame(parts, self.limits)
        except WireError as err:
            self._reject(err, recv_ns)
            return
        deadline_ms = header.deadline_ms if header.deadline_ms is not None else self.default_deadline_ms
        job = Job(header, recv_ns, recv_s, recv_s + deadline_ms / 1000.0)
        job.decoded = self.pool.submit(prepare, header, payload, self.limits, self.size)
        while True:
            dropped = self.queue.put(job, timeout=BLOCK_RETRY_S)
            if dropped is job and self.queue.policy == "block" and not self._stop.is_set():
                continue  # still full: keep waiting (ZMQ's HWM now pushes back on senders)
            break
        if dropped is not None:
            if dropped.decoded is not None:
                dropped.decoded.cancel()
            self._drop(dropped)
