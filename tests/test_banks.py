"""Reference banks: blob format, the Redis and file stores (same suite), registration, watcher."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inspector.banks import (
    BankError, BankMeta, BankWatcher, FileStore, NotFound, StoreError, decode_bank, encode_bank,
    open_store, read_meta, redact_url,
)
from inspector.banks.register import ShotImage, pick_diverse, register_product
from inspector.banks.stores import RedisStore
from inspector.banks.watcher import BankSnapshot
from inspector.model import InspectionModel

from .conftest import RedisServer, tiny_config

SIGNATURE = "resnet18@test:64:1,2,3:0/1"
POLL_S = 0.5  # watcher poll interval in these tests; each change must be seen within it
CHANGE_BOUND_S = 15.0  # bounds a broken watcher only: "within one poll" is decided by counting wakes


class CountedWakes:
    """Wraps a store's subscriptions and counts the watcher's wakes (each ``wait`` that returns).

    "A change is seen within one poll interval" is decided by events: the snapshot with the
    change must exist by the end of the second wake after the change was written (the wake in
    progress when it landed, then one more), whatever the machine's load.
    """

    def __init__(self, store, monkeypatch, deaf: bool = False) -> None:
        self.wakes = 0
        self._lock = threading.Lock()
        original = store.subscribe
        counter = self

        class Sub:
            def __init__(self, line: str) -> None:
                self.inner = None if deaf else original(line)

            def wait(self, timeout: float) -> bool:
                if self.inner is None:  # notices lost: only the poll timeout wakes the watcher
                    time.sleep(timeout)
                    got = False
                else:
                    got = self.inner.wait(timeout)
                with counter._lock:
                    counter.wakes += 1
                return got

            def close(self) -> None:
                if self.inner is not None:
                    self.inner.close()

        monkeypatch.setattr(store, "subscribe", Sub)

        self.swaps: list[tuple[int, tuple[str, ...]]] = []  # (wakes so far, products) per swap
        self._swapped = threading.Condition()

    def now(self) -> int:
        with self._lock:
            return self.wakes

    def on_event(self, event: str, **kv: object) -> None:
        """The watcher's ``on_event``: notes how many wakes each swap came after."""
        if event == "bank_swapped":
            with self._swapped:
                self.swaps.append((self.now(), tuple(kv["products"])))
                self._swapped.notify_all()

    def swap_of(self, products: tuple[str, ...], timeout: float) -> int | None:
        """Wakes before the swap to ``products``. The watcher publishes a snapshot before it
        reports the swap, so a test that saw the snapshot waits here for the report."""
        with self._swapped:
            self._swapped.wait_for(lambda: any(p == products for _, p in self.swaps), timeout)
            return next((n for n, p in self.swaps if p == products), None)


def seen_within_one_wake(w: BankWatcher, wakes: CountedWakes, after: int, products: tuple[str, ...]) -> BankSnapshot:
    """The snapshot serving ``products``; fails if its swap followed more than two wakes after
    ``after`` (the wake in progress when the change landed, then one more)."""
    snap = w.wait_for(lambda s: s.products == products, timeout=CHANGE_BOUND_S)
    assert snap is not None, "the change was never seen"
    at = wakes.swap_of(products, timeout=CHANGE_BOUND_S)
    assert at is not None, "the snapshot was served but its swap never reported"
    assert at - after <= 2, f"seen only after {at - after} wakes"
    return snap


def shots(seed: int, n: int = 4, size: int = 64) -> list[ShotImage]:
    """``n`` images of one made-up product: a seeded stripe pattern plus noise."""
    rng = np.random.default_rng(seed)
    period = 4 + seed % 7
    x = (np.arange(size) % period < period // 2).astype(np.uint8) * 160
    base = np.stack([np.broadcast_to(x, (size, size))] * 3, -1)
    out = []
    for i in range(n):
        img = np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)
        out.append(ShotImage(f"p{seed}_{i}.png", f"{seed:02d}{i:062d}", img))
    return out


@pytest.fixture(scope="module")
def model() -> InspectionModel:
    torch.manual_seed(0)
    return InspectionModel(tiny_config()).eval()


@pytest.fixture(scope="module")
def registered(model: InspectionModel):
    """Blobs for three products, built once."""
    out = {}
    for seed, name in enumerate(("valve-a", "valve-b", "valve-c")):
        reg = register_product(model, SIGNATURE, "m0", name, shots(seed), bank_images=4)
        out[name] = (encode_bank(reg.bank, reg.meta), reg)
    return out


@pytest.fixture(params=["file", "redis"])
def store(request, tmp_path: Path, redis_url: str, redis_prefix: str):
    """The same suite runs against both stores."""
    if request.param == "file":
        s = open_store(f"file://{tmp_path / 'banks'}", keep=2)
    else:
        s = open_store(redis_url, prefix=redis_prefix, keep=2)
    yield s
    s.close()


# -- blob ----------------------------------------------------------------------------------------
def test_blob_round_trip_keeps_every_tensor_and_field(registered) -> None:
    blob, reg = registered["valve-a"]
    bank, meta = decode_bank(blob, SIGNATURE, tuple(c for _, c in reg.meta.levels))
    assert meta == reg.meta == read_meta(blob)
    for a, b in zip(bank.features, reg.bank.features):
        assert torch.equal(a, b) and a.dtype == torch.float16
    assert torch.equal(bank.prototype, reg.bank.prototype)
    assert meta.gamma > meta.u and meta.shots == 4 and len(meta.images) == 4


def test_blob_for_another_backbone_is_refused(registered) -> None:
    blob, _ = registered["valve-a"]
    with pytest.raises(BankError) as err:
        decode_bank(blob, "wide_resnet50_2@abc:256:1,2,3:0/1")
    assert err.value.reason == "wrong_backbone" and "register the product again" in str(err.value)
    with pytest.raises(BankError, match="channels"):
        decode_bank(blob, None, (1, 2, 3))


@pytest.mark.parametrize("damage, reason", [
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b[:4], "truncated"),
    (lambda b: b[:-100] + bytes(100), "corrupt"),  # tensor bytes zeroed: digest and norms fail
    (lambda b: b"\xff" * 8 + b[8:], "truncated"),  # header length beyond the blob
    (lambda b: b"", "truncated"),
])
def test_damaged_blob_is_rejected_with_a_reason(registered, damage, reason) -> None:
    blob, _ = registered["valve-a"]
    with pytest.raises(BankError) as err:
        decode_bank(damage(blob))
    assert err.value.reason == reason


def test_one_flipped_tensor_byte_is_caught_by_the_digest(registered) -> None:
    blob, _ = registered["valve-a"]
    damaged = bytearray(blob)
    damaged[-3] ^= 0x01  # a low mantissa bit of the last stats value: norms still pass
    with pytest.raises(BankError) as err:
        decode_bank(bytes(damaged))
    assert err.value.reason in ("corrupt", "bad_stats")


# Fuzzing: 200 arbitrary and 200 mutated blobs run in about 2 s on 2 cores and cover the header
# length, JSON, metadata and tensor checks; the loader must raise BankError and nothing else.
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_only_raise_bank_error(data: bytes) -> None:
    with pytest.raises(BankError):
        decode_bank(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255), cut=st.booleans())
def test_mutated_blobs_never_crash(registered, pos: int, value: int, cut: bool) -> None:
    blob = bytearray(registered["valve-b"][0])
    pos %= len(blob)
    if cut:
        blob = blob[:pos]
    else:
        blob[pos] = value
    try:
        decode_bank(bytes(blob))
    except BankError:
        pass


# -- registration --------------------------------------------------------------------------------
def test_more_images_than_shots_keeps_diverse_ones(model) -> None:
    """Two visually different groups; k=2 must take one image of each, not two near-copies."""
    images = shots(0, 4) + shots(5, 4)
    reg = register_product(model, SIGNATURE, "m0", "mixed", images, bank_images=2)
    groups = {name.split("_")[0] for name in reg.chosen}
    assert groups == {"p0", "p5"} and reg.meta.candidates == 8 and reg.meta.shots == 2


def test_pick_diverse_keeps_all_when_few() -> None:
    assert pick_diverse(torch.rand(3, 8, 2, 2), 4) == [0, 1, 2]


def test_registration_needs_enough_images(model) -> None:
    with pytest.raises(BankError, match="1 distinct good images, fewer than the 4 a product needs"):
        register_product(model, SIGNATURE, "m0", "one", shots(0, 1), bank_images=4)
    with pytest.raises(BankError, match="fewer than the 2 a product needs"):  # never below 2: one image has no cross-score
        register_product(model, SIGNATURE, "m0", "one", shots(0, 1), bank_images=8, min_images=1)
    with pytest.raises(BankError, match="must match"):
        register_product(model, SIGNATURE, "m0", "bad name!", shots(0), bank_images=4)


# -- stores (both) ---------------------------------------------------------------------------------
def test_store_round_trip(store, registered) -> None:
    blob, reg = registered["valve-a"]
    assert store.state("3").products == {} and store.state("3").epoch == 0
    version, epoch = store.put("3", blob, reg.meta)
    assert (version, epoch) == (1, 1)
    state = store.state("3")
    assert state.products == {"valve-a": 1} and state.epoch == 1
    assert store.blob("3", "valve-a") == blob
    assert store.meta("3", "valve-a") == reg.meta.with_version(1)
    assert store.state("4").products == {}  # lines are separate


def test_versions_are_kept_up_to_the_limit(store, registered) -> None:
    blob, reg = registered["valve-a"]
    for _ in range(4):
        store.put("3", blob, reg.meta)
    assert store.versions("3", "valve-a") == [3, 4]  # keep=2
    assert store.state("3").products == {"valve-a": 4}
    with pytest.raises(NotFound):
        store.blob("3", "valve-a", 1)


def test_remove_and_unknown_product(store, registered) -> None:
    blob, reg = registered["valve-a"]
    store.put("3", blob, reg.meta)
    epoch = store.remove("3", "valve-a")
    assert epoch == 2 and store.state("3").products == {} and store.versions("3", "valve-a") == []
    with pytest.raises(NotFound):
        store.remove("3", "valve-a")
    with pytest.raises(NotFound):
        store.meta("3", "nothing")


def test_concurrent_writers_never_expose_a_half_written_bank(store, registered, tmp_path, redis_url, redis_prefix) -> None:
    """Two writers with their own connections alternate two different banks of one product
    while a reader keeps loading the active version: every read decodes to one of the two."""
    metas = [dataclasses.replace(registered[n][1].meta, product="shared") for n in ("valve-a", "valve-b")]
    blobs = [encode_bank(registered[n][1].bank, m) for n, m in zip(("valve-a", "valve-b"), metas)]
    digests = {m.content_sha256 for m in metas}
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        s = open_store(store.url if isinstance(store, FileStore) else redis_url,
                       prefix=getattr(store, "prefix", "inspector"), keep=2)
        try:
            for _ in range(15):
                s.put("3", blobs[i], metas[i])
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    reads = 0
    while any(t.is_alive() for t in threads):
        try:
            _, meta = decode_bank(store.blob("3", "shared"))
        except NotFound:
            continue  # before the first write lands, or a version pruned between two reads
        assert meta.content_sha256 in digests
        reads += 1
    for t in threads:
        t.join()
    assert not errors, errors
    state = store.state("3")
    assert state.epoch == 30 and state.products["shared"] in store.versions("3", "shared")
    assert reads > 0


def test_a_put_expecting_an_active_version_loses_to_a_newer_registration(store, registered) -> None:
    """The compare-and-set a bank grown from the stream uses: it replaces only the version it
    grew from, so an operator's registration in between wins and nothing of the grown one stays."""
    blob, reg = registered["valve-a"]
    with pytest.raises(BankError) as err:
        store.put("3", blob, reg.meta, expect_active=1)  # nothing is registered yet
    assert err.value.reason == "conflict" and store.state("3").products == {}
    v1, _ = store.put("3", blob, reg.meta, expect_active=0)
    v2, _ = store.put("3", blob, reg.meta)  # the operator registers again
    state = store.state("3")
    with pytest.raises(BankError, match="version 2, not 1"):
        store.put("3", blob, reg.meta, expect_active=v1)
    assert store.state("3") == state and store.versions("3", "valve-a") == [v1, v2]
    v3, epoch = store.put("3", blob, reg.meta, expect_active=v2)
    assert store.state("3").products == {"valve-a": v3} and epoch == state.epoch + 1


# -- watcher (both stores) -----------------------------------------------------------------------
def _watcher(store, model, **kw) -> BankWatcher:
    return BankWatcher(store, "3", SIGNATURE, model.channels, poll_interval=POLL_S, **kw).start()


def test_watcher_sees_a_change_within_one_poll_interval(store, registered, model, monkeypatch) -> None:
    store.put("3", registered["valve-a"][0], registered["valve-a"][1].meta)
    wakes = CountedWakes(store, monkeypatch)
    w = _watcher(store, model, on_event=wakes.on_event)
    try:
        assert w.snapshot.products == ("valve-a",)
        before = wakes.now()
        store.put("3", registered["valve-b"][0], registered["valve-b"][1].meta)
        snap = seen_within_one_wake(w, wakes, before, ("valve-a", "valve-b"))
        assert snap.tensors.prototypes.shape[0] == 2
    finally:
        w.stop()


def test_polling_alone_sees_changes(store, registered, model, monkeypatch) -> None:
    """With the change notices lost (pub/sub down or dropped), the poll still finds the change."""
    wakes = CountedWakes(store, monkeypatch, deaf=True)
    w = _watcher(store, model, on_event=wakes.on_event)
    try:
        before = wakes.now()
        store.put("3", registered["valve-c"][0], registered["valve-c"][1].meta)
        seen_within_one_wake(w, wakes, before, ("valve-c",))
    finally:
        w.stop()


def test_corrupt_or_foreign_bank_is_refused_and_previous_kept(store, registered, model) -> None:
    blob, reg = registered["valve-a"]
    store.put("3", blob, reg.meta)
    events: list[tuple[str, dict]] = []
    w = _watcher(store, model, on_event=lambda e, **kv: events.append((e, kv)))
    try:
        first = w.snapshot
        store.put("3", blob[: len(blob) // 2], reg.meta)  # a truncated upload
        assert w.wait_for(lambda s: s.epoch == 2, timeout=CHANGE_BOUND_S) is not None
        assert w.snapshot.versions == {"valve-a": 1}
        assert torch.equal(w.snapshot.tensors.features[0], first.tensors.features[0])
        foreign = dataclasses.replace(reg.meta, signature="other@x:256:1,2,3:0/1")
        store.put("3", encode_bank(reg.bank, foreign), foreign)
        assert w.wait_for(lambda s: s.epoch == 3, timeout=CHANGE_BOUND_S) is not None
        assert w.snapshot.versions == {"valve-a": 1}
        refused = [kv["reason"] for e, kv in events if e == "bank_refused"]
        assert refused == ["truncated", "wrong_backbone"]
    finally:
        w.stop()


def test_snapshot_pads_to_a_fixed_capacity(store, registered, model) -> None:
    for name in ("valve-a", "valve-b"):
        store.put("3", registered[name][0], registered[name][1].meta)
    n = [lv[0] for lv in registered["valve-a"][1].meta.levels]
    cap = tuple(2 * v for v in n)
    w = BankWatcher(store, "3", SIGNATURE, model.channels, capacity=cap, capacity_products=4,
                    poll_interval=POLL_S)
    w.refresh()
    t = w.snapshot.tensors
    assert [f.shape[:2] for f in t.features] == [(4, c) for c in cap]
    assert w.snapshot.name(3) == "valve-b" and w.snapshot.index("valve-b") == 1


def test_bank_over_capacity_is_refused(store, registered, model) -> None:
    store.put("3", registered["valve-a"][0], registered["valve-a"][1].meta)
    w = BankWatcher(store, "3", SIGNATURE, model.channels, capacity=(1, 1, 1), poll_interval=POLL_S)
    w.refresh()
    assert w.snapshot.products == ()


# -- Redis failures --------------------------------------------------------------------------------
class EventLog:
    """A watcher's ``on_event`` that tests can wait on: events in order, no polling by time."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, event: str, **_: object) -> None:
        with self._cond:
            self.names.append(event)
            self._cond.notify_all()

    def wait(self, event: str, after: int = 0, timeout: float = 15.0) -> int:
        """Index of the first ``event`` at or after ``after``; fails after ``timeout`` (a bound on
        a broken watcher, never what the test decides by)."""
        with self._cond:
            found = self._cond.wait_for(lambda: event in self.names[after:], timeout)
            assert found, f"no {event!r} after event {after}: {self.names}"
            return self.names.index(event, after)


def test_watcher_survives_a_redis_restart_and_catches_up(redis_server: RedisServer, registered, model) -> None:
    store = open_store(redis_server.url)
    store.put("3", registered["valve-a"][0], registered["valve-a"][1].meta)
    events = EventLog()
    w = BankWatcher(store, "3", SIGNATURE, model.channels, poll_interval=POLL_S, on_event=events).start()
    try:
        redis_server.stop()
        down = events.wait("bank_store_unavailable")
        assert w.snapshot.products == ("valve-a",)  # still serving the last good banks
        redis_server.start()
        writer = open_store(redis_server.url)
        writer.put("3", registered["valve-b"][0], registered["valve-b"][1].meta)  # while it was away
        back = events.wait("bank_store_reconnected", after=down)
        swapped = events.wait("bank_swapped", after=down)
        assert back < swapped, f"the reconnection is reported before the swap it enables: {events.names}"
        snap = w.wait_for(lambda s: s.products == ("valve-a", "valve-b"), timeout=15.0)
        assert snap is not None, f"events: {events.names}"
    finally:
        w.stop()


def test_store_down_is_a_store_error(tmp_path) -> None:
    from .conftest import free_port

    store = open_store(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreError, match="redis at"):
        store.state("3")


def test_password_never_appears_in_the_store_url() -> None:
    assert redact_url("redis://user:hunter2@host:6379/0") == "redis://user:***@host:6379/0"
    store = RedisStore("redis://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in repr(store) and "hunter2" not in store.url


def test_unknown_store_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown bank store"):
        open_store("s3://bucket/banks")
