"""The worker's bank watcher: follows a line's banks and hands the engine immutable snapshots.

It polls the line's epoch every ``poll_interval`` and wakes early on the store's change notice
(pub/sub alone loses notices across a disconnect, so polling is the guarantee and the notice only
makes it faster). A changed product is fetched, validated against the serving model's backbone
signature and geometry, and stacked into padded tensors here, off the inference path; the engine
picks up the new ``snapshot`` between two batches by reading one attribute. A bank that fails
validation is refused with a logged reason and the product's previous bank stays in service.
When the store is unreachable the last snapshot keeps serving and the watcher retries with
exponential backoff.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import structlog

from ..model.bank import BankTensors, ProductBank, stack_banks
from .normal import NormalStats
from .record import BankError, BankMeta, decode_bank
from .stores import BankStore, NotFound, StoreError, Subscription

BACKOFF_FIRST_S = 0.2  # first retry after a store error: quick for a blip, grows to BACKOFF_MAX_S
BACKOFF_MAX_S = 10.0  # a Redis restart is usually back within seconds; never wait longer than this

EventSink = Callable[..., None]


@dataclass(frozen=True)
class BankSnapshot:
    """The banks in service: what the engine reads between two batches. Never mutated.

    Attributes:
        epoch: the line's epoch this snapshot reflects (-1 before the first load).
        products: product names; index ``i`` is row ``i`` of ``tensors`` (rows past the real
            products repeat real ones to reach a fixed capacity and are never reported).
        versions: active version per product in service.
        metas: metadata per product in service.
        tensors: stacked banks for ``forward``, None when no product is registered; their
            ``stats`` rows are each product's normal statistics in ``normals``.
        normals: normal statistics per product in service (registration, stream or feedback).
        loaded_at: ``time.monotonic()`` when it was built.
    """

    epoch: int
    products: tuple[str, ...]
    versions: Mapping[str, int]
    metas: Mapping[str, BankMeta]
    tensors: BankTensors | None
    banks: Mapping[str, ProductBank] = field(repr=False, default_factory=dict)
    loaded_at: float = 0.0
    normals: Mapping[str, NormalStats] = field(repr=False, default_factory=dict)

    def index(self, product: str) -> int | None:
        """Row of ``product`` in the stacked tensors, or None when it is not in service."""
        try:
            return self.products.index(product)
        except ValueError:
            return None

    def name(self, row: int) -> str:
        """Product name of a (possibly padded) row."""
        return self.products[row % len(self.products)]


EMPTY = BankSnapshot(epoch=-1, products=(), versions={}, metas={}, tensors=None)


def over_capacity(bank: ProductBank, capacity: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(level, vectors, capacity)`` of each level (0-based) where ``bank`` holds more vectors
    than ``capacity`` allows: what the worker refuses and ``bank add`` refuses to write."""
    return [(level, f.shape[0], cap) for level, (f, cap) in enumerate(zip(bank.features, capacity)) if f.shape[0] > cap]


def build_snapshot(
    epoch: int,
    banks: Mapping[str, tuple[ProductBank, BankMeta]],
    capacity: tuple[int, ...] | None,
    capacity_products: int | None,
    normals: Mapping[str, NormalStats] | None = None,
) -> BankSnapshot:
    """Stack banks (sorted by name) padded to ``capacity`` vectors and ``capacity_products`` rows.

    Each product is calibrated by ``normals[product]`` where given, else by its registration
    statistics (the bank's metadata).
    """
    names = tuple(sorted(banks))
    if not names:
        return BankSnapshot(epoch, (), {}, {}, None, {}, time.monotonic())
    stats = {n: (normals or {}).get(n) or NormalStats.from_meta(banks[n][1]) for n in names}
    rows = [banks[n][0].with_stats(stats[n].u, stats[n].gamma) for n in names]
    if capacity_products is not None:
        rows = [rows[i % len(rows)] for i in range(capacity_products)]
    tensors = stack_banks(rows, capacity)
    return BankSnapshot(
        epoch=epoch,
        products=names,
        versions={n: banks[n][1].version for n in names},
        metas={n: banks[n][1] for n in names},
        tensors=tensors,
        banks={n: banks[n][0] for n in names},
        loaded_at=time.monotonic(),
        normals=stats,
    )


class BankWatcher:
    """Follows one line's banks in a background thread.

    Args:
        store: where the banks live.
        line: the line name.
        signature: the serving model's backbone signature; other banks are refused.
        channels: the serving model's channels per level.
        capacity: vectors per level the tensors are padded to (a fixed engine input shape);
            None pads to the largest bank.
        capacity_products: rows the tensors are padded to; None uses the product count.
        poll_interval: seconds between epoch polls; a change is seen within one interval.
        on_event: ``f(event, **fields)`` for metrics; events are also logged.
    """

    def __init__(
        self,
        store: BankStore,
        line: str,
        signature: str,
        channels: tuple[int, ...],
        capacity: tuple[int, ...] | None = None,
        capacity_products: int | None = None,
        poll_interval: float = 1.0,
        on_event: EventSink | None = None,
    ) -> None:
        self.store = store
        self.line = line
        self.signature = signature
        self.channels = tuple(channels)
        self.capacity = tuple(capacity) if capacity is not None else None
        self.capacity_products = capacity_products
        self.poll_interval = poll_interval
        self._on_event = on_event
        self._log = structlog.get_logger("inspector.banks").bind(line=line, store=store.url)
        self.snapshot: BankSnapshot = EMPTY
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refused: dict[tuple[str, int], str] = {}
        self.connected = True

    # -- events ----------------------------------------------------------------------------
    def _event(self, event: str, level: str = "info", **fields: object) -> None:
        getattr(self._log, level)(event, **fields)
        if self._on_event is not None:
            self._on_event(event, **fields)

    # -- loading ---------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Check the store once; build and publish a new snapshot if the epoch moved.

        Returns:
            True when a new snapshot was published.

        Raises:
            StoreError: the store is unreachable (the current snapshot stays in service).
        """
        state = self.store.state(self.line)
        current = self.snapshot
        if state.epoch == current.epoch:
            return False
        t0 = time.perf_counter()
        banks: dict[str, tuple[ProductBank, BankMeta]] = {}
        for product, version in sorted(state.products.items()):
            loaded = self._load(product, version, current)
            if loaded is not None:
                banks[product] = loaded
        if self.capacity_products is not None and len(banks) > self.capacity_products:
            for product in sorted(banks)[self.capacity_products :]:
                self._event("bank_refused", "warning", product=product, reason="over_capacity",
                            detail=f"the engine holds {self.capacity_products} products")
                del banks[product]
        # Forget refusals of versions no longer active, so months of bad uploads cost no memory.
        self._refused = {k: v for k, v in self._refused.items() if state.products.get(k[0]) == k[1]}
        normals = {p: n for p, (_, meta) in banks.items() if (n := self._normal(p, meta.version)) is not None}
        snap = build_snapshot(state.epoch, banks, self.capacity, self.capacity_products, normals)
        self.snapshot = snap  # one reference assignment: the engine sees the old or the new
        self._event("bank_swapped", epoch=snap.epoch, products=list(snap.products),
                    seconds=round(time.perf_counter() - t0, 4))
        return True

    def _load(self, product: str, version: int, current: BankSnapshot) -> tuple[ProductBank, BankMeta] | None:
        if current.versions.get(product) == version:
            return current.banks[product], current.metas[product]
        previous = (current.banks[product], current.metas[product]) if product in current.banks else None
        if (product, version) in self._refused:
            return previous
        try:
            blob = self.store.blob(self.line, product, version)
            bank, meta = decode_bank(blob, self.signature, self.channels)
            self._check_capacity(bank)
            if meta.product != product:
                raise BankError("bad_meta", f"blob says product {meta.product!r}, stored as {product!r}")
        except NotFound as err:
            raise StoreError(f"bank changed while loading ({err}); retrying") from err
        except BankError as err:
            self._refused[(product, version)] = err.reason
            kept = previous[1].version if previous else None
            self._event("bank_refused", "error", product=product, version=version,
                        reason=err.reason, detail=err.detail, kept_version=kept)
            return previous
        return bank, meta.with_version(version)

    def _normal(self, product: str, version: int) -> NormalStats | None:
        """The product's refined statistics for its active version; None keeps the registration's."""
        try:
            stats = self.store.normal(self.line, product)
        except BankError as err:
            self._event("normal_refused", "error", product=product, reason=err.reason, detail=err.detail)
            return None
        return stats if stats is not None and stats.bank_version == version else None

    def _check_capacity(self, bank: ProductBank) -> None:
        if self.capacity is None:
            return
        over = over_capacity(bank, self.capacity)
        if over:
            level, vectors, cap = over[0]
            raise BankError("over_capacity", f"level {level} has {vectors} vectors, the engine holds {cap}: "
                            "register with fewer shots or a coreset")

    # -- thread ----------------------------------------------------------------------------
    def start(self, initial_timeout: float | None = None) -> "BankWatcher":
        """Load the current banks (retrying up to ``initial_timeout``), then follow changes."""
        end = time.monotonic() + (initial_timeout or 0.0)
        while True:
            try:
                self.refresh()
                break
            except StoreError as err:
                if time.monotonic() >= end:
                    self._event("bank_store_unavailable", "warning", error=str(err))
                    self.connected = False
                    break
                time.sleep(BACKOFF_FIRST_S)
        self._thread = threading.Thread(target=self._run, name=f"banks-{self.line}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = BACKOFF_FIRST_S
        sub: Subscription | None = None
        while not self._stop.is_set():
            try:
                if sub is None:
                    sub = self.store.subscribe(self.line)
                sub.wait(self.poll_interval)
                if self._stop.is_set():
                    break
                if not self.connected:  # reported before the swap the reconnection enables
                    self.connected = True
                    self._event("bank_store_reconnected")
                self.refresh()
                backoff = BACKOFF_FIRST_S
            except StoreError as err:
                if self.connected:
                    self._event("bank_store_unavailable", "warning", error=str(err))
                self.connected = False
                if sub is not None:
                    sub.close()
                    sub = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            except Exception as err:  # a bug must not kill bank updates silently: log, keep going
                self._event("bank_watcher_error", "error", error=repr(err))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        if sub is not None:
            sub.close()

    def wait_for(self, predicate: Callable[[BankSnapshot], bool], timeout: float) -> BankSnapshot | None:
        """Block until the snapshot satisfies ``predicate`` (for start-up and tests)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            snap = self.snapshot
            if predicate(snap):
                return snap
            time.sleep(0.01)
        return None
