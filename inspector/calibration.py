"""The worker's calibration stage: each product's normal statistics in service, refined live.

The bank watcher hands snapshots whose ``normals`` are what the store holds (registration,
stream or feedback statistics). This stage feeds every routed frame's raw score to a
``StreamCalibrator``, serves the statistics it arrives at to the engine as the ``stats`` input
(no recompilation: they are a tensor input like the banks) and writes each change back to the
store off the hot path, compare-and-set, so a restart keeps what was learned and an operator's
feedback is never overwritten by a stale worker.

Failure modes and what is done about each are in the README ("Self-calibration").
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch

from .banks.normal import NormalStats, StreamCalibrator, StreamConfig
from .banks.stores import BankStore, StoreError
from .banks.watcher import BankSnapshot
from .config import CalibrationConfig
from .engine import Scored
from .metrics import WorkerMetrics
from .wire import ANOMALY


def stream_config(cfg: CalibrationConfig) -> StreamConfig:
    """The line config's ``[calibration]`` as the calibrator's settings (validated there)."""
    return StreamConfig(cfg.stream, cfg.window, cfg.min_count, cfg.refresh_every, cfg.max_step, cfg.freeze_jump)


def _key(stats: NormalStats) -> tuple[int, int, str]:
    return stats.bank_version, stats.revision, stats.updated_at


class LineCalibration:
    """Statistics in service for one line's products.

    Args:
        cfg: the line's ``[calibration]`` settings.
        store: where refined statistics are persisted.
        line: the line name.
        metrics: per-product statistics gauges.
        log: a bound structlog logger.
    """

    def __init__(self, cfg: CalibrationConfig, store: BankStore, line: str, metrics: WorkerMetrics, log: Any) -> None:
        self.calibrator = StreamCalibrator(stream_config(cfg))
        self.store = store
        self.line = line
        self.metrics = metrics
        self.log = log
        self._snapshot: BankSnapshot | None = None
        self._tensor: torch.Tensor | None = None
        self._seen: dict[str, tuple[int, int, str]] = {}  # record last adopted or written, per product
        self._stored: dict[str, int] = {}  # revision believed stored, per product (0: none)
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="calibration")

    def stats_for(self, snapshot: BankSnapshot) -> torch.Tensor | None:
        """The ``(P, 2)`` statistics input for a batch against ``snapshot`` (None: no products)."""
        if snapshot is not self._snapshot:
            self._follow(snapshot)
        return self._tensor

    def _follow(self, snapshot: BankSnapshot) -> None:
        """Adopt a new snapshot's records where they changed (re-registration, feedback)."""
        self._snapshot = snapshot
        self.calibrator.forget(snapshot.products)
        with self._lock:
            for product, stats in snapshot.normals.items():
                if self._seen.get(product) != _key(stats):
                    self.calibrator.adopt(stats, force=True)
                    self._seen[product] = _key(stats)
                    self._stored[product] = stats.revision  # 0 for registration statistics: no record stored
                    if not stats.measured:
                        self.log.warning("calibration_unmeasured", product=product, bank_version=stats.bank_version,
                                         hint="registered before normal statistics were measured: register it "
                                              "again from 30 or more good images")
                    elif stats.thin:
                        self.log.warning("calibration_thin", product=product, count=stats.count, source=stats.source,
                                         hint="threshold uncertain until the stream or feedback refines it")
        self._rebuild()

    def _rebuild(self) -> None:
        snap = self._snapshot
        if snap is None or snap.tensors is None:
            self._tensor = None
            return
        rows = []
        for i in range(snap.tensors.stats.shape[0]):
            s = self.calibrator.current(snap.name(i))
            rows.append((s.u, s.gamma) if s is not None else tuple(snap.tensors.stats[i].tolist()))
        self._tensor = torch.tensor(rows, dtype=torch.float32)
        self.metrics.set_calibration({p: self.current(p).summary() for p in snap.products if self.current(p)})

    def current(self, product: str) -> NormalStats | None:
        return self.calibrator.current(product)

    def summaries(self) -> dict[str, dict]:
        """Each product's statistics in service, for the heartbeat."""
        snap = self._snapshot
        return {p: s.summary() for p in (snap.products if snap else ()) if (s := self.current(p)) is not None}

    def observe(self, snapshot: BankSnapshot, scored: Sequence[Scored]) -> None:
        """Learn from one batch's engine outcomes (frames routed to a product only)."""
        if snapshot is not self._snapshot:
            self._follow(snapshot)
        changed = False
        for s in scored:
            if s.product is None or s.raw_score is None or s.reason not in (None, ANOMALY):
                continue
            before = self.calibrator.current(s.product)
            new = self.calibrator.observe(s.product, s.raw_score, s.verdict == "fail")
            if new is None:
                continue
            changed = True
            kind = "frozen" if new.frozen and not before.frozen else "unfrozen" if before.frozen and not new.frozen else "stream"
            self.metrics.calibration_update(s.product, kind)
            self.log.info("calibration_" + kind, product=s.product, u=round(new.u, 6), gamma=round(new.gamma, 6),
                          count=new.count, revision=new.revision)
            with self._lock:
                self._seen[s.product] = _key(new)
            self._writer.submit(self._persist, new)
        if changed:
            self._rebuild()

    def _persist(self, stats: NormalStats) -> None:
        with self._lock:
            expect = self._stored.get(stats.product, 0)
        try:
            written = self.store.put_normal(self.line, stats, expect_revision=expect, notify=False)
        except (StoreError, OSError) as err:
            self.metrics.calibration_update(stats.product, "persist_failed")
            self.log.warning("calibration_persist_failed", product=stats.product, error=str(err))
            return
        if not written:  # feedback or a re-registration got there first: the next snapshot brings it
            self.log.info("calibration_superseded", product=stats.product, revision=stats.revision)
            return
        with self._lock:
            self._stored[stats.product] = stats.revision

    def close(self, timeout: float | None = None) -> None:
        """Finish pending writes (the drain at shutdown keeps what was learned)."""
        self._writer.shutdown(wait=True)
