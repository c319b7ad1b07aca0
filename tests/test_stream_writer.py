"""The results stream writer: every result is written to the stream or counted lost, exactly once.

A real Redis server; the one thing controlled is *when* a pipelined send finishes, so a full
buffer can be forced while a send is in flight (the state in which the writer used to pop
results it had not sent and count sent ones as lost).
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import redis

from inspector.worker.metrics import WorkerMetrics
from inspector.worker.stream import StreamWriter
from inspector.tools.reconcile import read_result_stream
from inspector.wire import Result

WAIT_S = 10.0  # bounds a broken writer; each wait ends as soon as its event happens


class HeldSends:
    """A real redis client whose pipelined sends each wait for the test's permission."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.started = threading.Semaphore(0)  # released when a send reaches execute
        self.go = threading.Semaphore(0)  # one release lets one send through

    def set(self, *args, **kwargs):
        return self.client.set(*args, **kwargs)

    def pipeline(self, **kwargs):
        pipe = self.client.pipeline(**kwargs)
        execute = pipe.execute

        def held() -> list:
            self.started.release()
            assert self.go.acquire(timeout=WAIT_S), "the test never let the send through"
            return execute()

        pipe.execute = held
        return pipe


def result(i: int) -> Result:
    return Result(frame_id=f"f{i:04d}", camera="cam", line="t", verdict="pass", model="m", bank_epoch=1,
                  ts_ns=i, done_ns=i)


def written_ids(client: redis.Redis, key: str) -> list[str]:
    return [r["frame_id"] for r in read_result_stream(client, key)]


def wait(predicate, what: str) -> None:
    end = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.mark.parametrize("capacity", [1, 4])
def test_a_full_buffer_during_a_send_loses_only_queued_results_and_counts_each_once(
        redis_url: str, redis_prefix: str, capacity: int) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    held = HeldSends(client)
    writer = StreamWriter(held, redis_prefix, "t", maxlen=10_000, buffer=capacity, heartbeat_ttl_s=10,
                          metrics=WorkerMetrics(), status=dict).start()
    try:
        first = [result(i) for i in range(capacity)]
        for r in first:
            writer.append(r)
        assert held.started.acquire(timeout=WAIT_S), "the writer never started a send"
        # The first chunk is in flight. Overfill the buffer behind it: 3 x capacity more results.
        later = [result(i) for i in range(capacity, 4 * capacity)]
        for r in later:
            writer.append(r)
        held.go.release()  # the first chunk completes
        assert held.started.acquire(timeout=WAIT_S), "the queued results were never sent"
        held.go.release()
        total = len(first) + len(later)
        wait(lambda: writer.written + writer.lost == total, "every result written or lost")
        ids = written_ids(client, writer.stream_key)
    finally:
        for _ in range(8):
            held.go.release()  # no send stays held past the test
        writer.stop()
    # The in-flight chunk is written whole; of the later ones, the newest `capacity` survive.
    expected = [r.frame_id for r in first] + [r.frame_id for r in later[-capacity:]]
    assert ids == expected
    assert Counter(ids) == Counter(set(ids)), "a result was written twice"
    assert writer.written == len(ids) and writer.lost == total - len(ids) == 2 * capacity
