"""The line's Redis results stream and heartbeat key (``inspector.keys``), written by their own
thread from a bounded buffer: while Redis is down results wait there, and past the bound the
oldest are counted as lost (``inspector_stream_lost_total``), never raised.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from typing import Any, Callable

import structlog

from ..keys import heartbeat_key, results_key
from ..wire import Result
from .metrics import WorkerMetrics

STREAM_BATCH = 256  # results per pipelined XADD round trip
STREAM_IDLE_S = 0.05  # the stream thread re-checks its buffer this often when idle
STREAM_BACKOFF_MAX_S = 5.0  # retry Redis at least this often while it is down


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
