"""The bounded frame queue and the micro-batcher (DESIGN section 6).

Frames wait in one bounded queue between ingest and the engine. When it is full the overload
policy decides which frame leaves: ``drop_oldest`` (default: the newest frames are the ones a
reject gate can still act on), ``drop_newest``, or ``block`` (ingest stops reading, so the
socket's high-water mark pushes back on the cameras). A dropped frame is returned to the caller,
which publishes its ``dropped`` result: nothing leaves the queue silently.

A batch fires when it holds ``max_batch`` frames or ``max_delay_ms`` after its first frame
arrived, whichever comes first.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from ..wire import FrameHeader, Latency

OVERLOAD_POLICIES = ("drop_oldest", "drop_newest", "block")


@dataclass
class Job:
    """One accepted frame on its way through the worker.

    Attributes:
        header: the validated frame header.
        recv_ns: wall-clock receive time (``time.time_ns``).
        recv_s: monotonic receive time; deadlines and queue latency are measured from it.
        deadline_s: monotonic time after which the frame is a ``timeout`` when dequeued.
        decoded: the decode pool's future: ``(pixels, decode_ms)`` or a ``DecodeError``.
        pixels: the model's input, once the worker has taken the decoded frame.
        queue_ms: time from receipt to the worker taking the frame off the queue.
        decode_ms: time its decode took (None until decoded).
    """

    header: FrameHeader
    recv_ns: int
    recv_s: float
    deadline_s: float
    decoded: Future | None = None
    pixels: np.ndarray | None = None
    queue_ms: float = 0.0
    decode_ms: float | None = None

    def latency(self, infer_ms: float = 0.0) -> Latency:
        """The stage times known when the frame leaves the engine (the publisher adds the rest)."""
        return Latency(queue=round(self.queue_ms, 3), decode=round(self.decode_ms or 0.0, 3), infer=infer_ms)


class FrameQueue:
    """A bounded FIFO of jobs with an overload policy; thread-safe."""

    def __init__(self, capacity: int, policy: str = "drop_oldest") -> None:
        if policy not in OVERLOAD_POLICIES:
            raise ValueError(f"overload policy must be one of {OVERLOAD_POLICIES}, got {policy!r}")
        if capacity < 1:
            raise ValueError(f"queue capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.policy = policy
        self._items: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, job: Job, timeout: float | None = None) -> Job | None:
        """Enqueue ``job``; return the job that was dropped to make room (maybe ``job``), or None.

        With ``block``, waits up to ``timeout`` for room and returns ``job`` itself if none came
        (the caller retries, so a blocked ingest still notices shutdown).
        """
        with self._cond:
            if len(self._items) >= self.capacity:
                if self.policy == "drop_newest":
                    return job
                if self.policy == "drop_oldest":
                    dropped = self._items.popleft()
                    self._items.append(job)
                    self._cond.notify_all()
                    return dropped
                if not self._cond.wait_for(lambda: len(self._items) < self.capacity or self._closed, timeout):
                    return job
                if self._closed:
                    return job
            self._items.append(job)
            self._cond.notify_all()
            return None

    def get_batch(self, max_batch: int, max_delay_s: float, timeout: float) -> list[Job]:
        """Up to ``max_batch`` jobs: waits ``timeout`` for a first one, then until the batch is
        full or ``max_delay_s`` after the first job's arrival."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return []
            if not self._items:
                return []
            fire_at = self._items[0].recv_s + max_delay_s
            while len(self._items) < max_batch and not self._closed:
                left = fire_at - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = [self._items.popleft() for _ in range(min(max_batch, len(self._items)))]
            self._cond.notify_all()
            return batch

    def close(self) -> None:
        """Wake every waiter; later ``get_batch`` calls still return what is left (the drain)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
