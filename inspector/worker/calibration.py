"""The worker's calibration stage: each product's normal statistics in service, refined live.

The bank watcher hands snapshots whose ``normals`` are what the store holds (registration,
stream or feedback statistics). This stage feeds every routed frame's raw score to a
``StreamCalibrator``, serves the statistics it arrives at to the engine as the ``stats`` input
(no recompilation: they are a tensor input like the banks) and writes each change back to the
store off the hot path, compare-and-set, so a restart keeps what was learned and an operator's
feedback is never overwritten by a stale worker.

It also grows each product's bank from its own typical passed frames
(``inspector.banks.growth``): when they would double the bank, a background thread rebuilds it
and writes it to the store as a new version, compare-and-set on the version it grew from (an
operator's registration in between wins), with its statistics on the grown bank's scale; the
watcher then swaps it in like any bank change.

Failure modes and what is done about each are in the README ("Self-calibration").
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import torch

from ..banks.growth import BankGrowth, GrowthConfig, grow_bank
from ..banks.normal import NormalStats, StreamCalibrator, StreamConfig
from ..banks.record import BankError, BankMeta, content_digest, encode_bank
from ..banks.register import extract
from ..banks.stores import BankStore, StoreError
from ..banks.watcher import BankSnapshot
from ..config import CalibrationConfig
from .engine import Scored
from .metrics import WorkerMetrics
from ..wire import ANOMALY


def stream_config(cfg: CalibrationConfig) -> StreamConfig:
    """The line config's ``[calibration]`` as the calibrator's settings (validated there)."""
    return StreamConfig(cfg.stream, cfg.window, cfg.min_count, cfg.refresh_every, cfg.max_step, cfg.freeze_jump)


def growth_config(cfg: CalibrationConfig, card_images: int) -> GrowthConfig:
    """The line config's bank growth settings; a grown bank never exceeds the card's
    ``bank.images`` (the engine's bank capacity is sized for it)."""
    limit = min(cfg.grow_max_images or card_images, card_images)
    return GrowthConfig(enabled=cfg.stream and cfg.grow_bank and limit >= 2, max_images=max(2, limit),
                        below=cfg.grow_below, min_count=cfg.min_count)


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

    def __init__(self, cfg: CalibrationConfig, store: BankStore, line: str, metrics: WorkerMetrics, log: Any,
                 model: Any = None) -> None:
        self.calibrator = StreamCalibrator(stream_config(cfg))
        self.model = model  # the serving model's eager copy: extracts grown banks' features (None: no growth)
        card_images = model.cfg.bank.images if model is not None else 0
        self.growth = BankGrowth(growth_config(cfg, card_images) if model is not None
                                 else GrowthConfig(enabled=False))
        self._versions: dict[str, int] = {}  # bank version growth tracks, per product
        self._growing: set[str] = set()  # products whose rebuild is in flight
        self._grower = ThreadPoolExecutor(1, thread_name_prefix="bank-growth")
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
        for product in snapshot.products:  # a new version (registration or growth) starts growth over
            version = snapshot.versions[product]
            if self._versions.get(product) != version:
                self._versions[product] = version
                self.growth.start(product, int(snapshot.metas[product].shots))
        self._versions = {p: v for p, v in self._versions.items() if p in snapshot.versions}
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

    def observe(self, snapshot: BankSnapshot, scored: Sequence[Scored],
                pixels: Sequence[np.ndarray] | None = None) -> None:
        """Learn from one batch's engine outcomes (frames routed to a product only); with the
        frames' model-input ``pixels``, typical passed ones may join their product's bank."""
        if snapshot is not self._snapshot:
            self._follow(snapshot)
        changed = False
        for i, s in enumerate(scored):
            if s.product is None or s.raw_score is None or s.reason not in (None, ANOMALY):
                continue
            before = self.calibrator.current(s.product)
            new = self.calibrator.observe(s.product, s.raw_score, s.verdict == "fail")
            if pixels is not None:
                self._offer(snapshot, s, pixels[i])
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

    def _offer(self, snapshot: BankSnapshot, s: Scored, pixels: np.ndarray) -> None:
        product = s.product
        stats = self.calibrator.current(product)
        with self._lock:
            busy = product in self._growing
        if busy or stats is None or snapshot.versions.get(product) != self._versions.get(product):
            return
        if not self.growth.offer(product, (pixels, float(s.raw_score)), float(s.raw_score), s.verdict == "pass",
                                 stats.frozen, self.calibrator.recent(product)):
            return
        if not self.growth.due(product):
            return
        frames = self.growth.take(product)
        current = replace(stats, stream=self.calibrator.recent(product))
        with self._lock:
            self._growing.add(product)
        self.log.info("bank_growth_started", product=product, bank_version=snapshot.versions[product],
                      images=self.growth.images(product), adding=len(frames))
        self._grower.submit(self._grow, product, snapshot.versions[product], snapshot.banks[product],
                            snapshot.metas[product], current, frames)

    def _grow(self, product: str, version: int, bank: Any, meta: BankMeta, stats: NormalStats,
              frames: list[tuple[np.ndarray, float]]) -> None:
        """Rebuild ``product``'s bank with ``frames`` and write it (off the hot path)."""
        t0 = time.perf_counter()
        try:
            pixels = np.stack([f[0] for f in frames])
            feats = extract(self.model, pixels)
            grown = grow_bank(self.model, bank, int(meta.shots), feats, [f[1] for f in frames], stats,
                              self.model.cfg.bank.coreset)
            digests = [hashlib.sha256(np.ascontiguousarray(p).tobytes()).hexdigest() for p in pixels]
            normal = dict(meta.normal) if isinstance(meta.normal, dict) else {}
            normal.update(u=grown.stats.u, gamma=grown.stats.gamma, scores=list(grown.stats.registration))
            new_meta = BankMeta(
                product=product, signature=meta.signature, shots=int(meta.shots) + len(frames),
                images=[*meta.images, *({"name": f"stream-{d[:12]}", "sha256": d} for d in digests)],
                levels=[list(f.shape) for f in grown.bank.features], u=grown.stats.u, gamma=grown.stats.gamma,
                model_id=meta.model_id, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                content_sha256=content_digest(grown.bank), coreset=meta.coreset,
                candidates=int(meta.candidates) + len(frames),
                extra={**meta.extra, "grown_from": version, "grown_images": len(frames),
                       "growth_ratio": round(grown.ratio, 6)},
                normal=normal,
            )
            new_version, _ = self.store.put(self.line, encode_bank(grown.bank, new_meta), new_meta, expect_active=version)
            self.store.put_normal(self.line, replace(grown.stats, bank_version=new_version, revision=1),
                                  expect_revision=0, notify=True)
        except BankError as err:
            self.metrics.calibration_update(product, "growth_superseded")
            self.log.info("bank_growth_superseded", product=product, bank_version=version, detail=err.detail)
        except Exception as err:  # a failed rebuild costs the growth step, never a result
            self.metrics.calibration_update(product, "growth_failed")
            self.log.warning("bank_growth_failed", product=product, bank_version=version, error=repr(err))
        else:
            self.metrics.calibration_update(product, "grown")
            self.log.info("bank_grown", product=product, from_version=version, version=new_version,
                          images=new_meta.shots, ratio=round(grown.ratio, 4), seconds=round(time.perf_counter() - t0, 2))
        finally:
            with self._lock:
                self._growing.discard(product)

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
        """Finish pending rebuilds and writes (the drain at shutdown keeps what was learned)."""
        self._grower.shutdown(wait=True)
        self._writer.shutdown(wait=True)
