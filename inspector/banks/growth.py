"""Growing a product's bank from the stream: a product registered from a few good images gains
reference images from its own production parts.

Why: statistics refined from the stream (``StreamCalibrator``) bring a product's false-reject
rate to the line's target, but its bank stays what registration gave it. With 4 images the good
parts' distances are large and spread out, so the scale that passes them is wide and defects
hide under it: the simulated stream lost up to 50 points of escape rate against a 50-image
registration (benchmarks/results/accuracy-3draws/summary.md).

What a frame must be to join the bank (``BankGrowth.offer``): passed, its product not frozen,
its statistics resting on at least ``min_count`` stream scores, and its raw score at or below
the ``below`` quantile of the product's recent scores (1.0, the default: every passed frame).
Only the better half (0.5) made the bank less diverse than the line's parts: on commutator, a
source class, over 2 draws, the grown bank's image AUROC fell to 0.820/0.823 against 0.850/0.821
with every passed frame, and escapes at the line threshold were 81%/57% against 52%/55%
(runs with ``below`` 0.8: 52%/60%). A defect that passed already escapes; its joining is bounded
by the freeze on fail-rate jumps. The bank doubles (4 -> 8 -> 16 -> 32 -> 64 images, ``max_images`` at most): a few
rebuilds in a product's life.

A rebuild (``grow_bank``) adds the candidates' positions to the bank (one k-center pass to the
card's coreset cap), cross-scores every candidate against a bank that does not contain it (the
old bank plus the other folds' candidates, as registration does), and measures how much the
larger bank lowered their scores: the ratio of the candidates' median raw score after to before.
Every sample behind the product's statistics is put on the new bank's scale by that ratio (the
candidates alone would be a biased sample: they were picked from the better half), and the
stream keeps refining them from there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..model import InspectionModel
from ..model.bank import (BANK_DTYPE, Coreset, ProductBank, _capped, level_caps, position_vectors, prototype_of,
                          stack_banks)
from .normal import NormalStats, _now
from .register import fold_of, raw_scores_hinted

RATIO_BOUNDS = (0.2, 1.5)  # a rebuild's score ratio outside these is clipped (a larger bank lowers scores)


@dataclass(frozen=True)
class GrowthConfig:
    """Bank growth from the stream.

    Attributes:
        enabled: grow banks at all.
        max_images: images a grown bank holds at most (the card's ``bank.images``).
        below: a frame joins only if its raw score is at or below this quantile of the recent scores.
        min_count: stream scores behind the statistics before any frame joins.
    """

    enabled: bool = True
    max_images: int = 64
    below: float = 1.0
    min_count: int = 50

    def __post_init__(self) -> None:
        if self.max_images < 2:
            raise ValueError(f"bank growth max_images must be at least 2, not {self.max_images}")
        if not 0.0 < self.below <= 1.0:
            raise ValueError(f"bank growth 'below' is a quantile in (0, 1], not {self.below}")
        if self.min_count < 2:
            raise ValueError(f"bank growth min_count must be at least 2, not {self.min_count}")


class BankGrowth:
    """Which frames of each product join its bank, and when the bank is rebuilt.

    Not thread-safe: one caller (the worker's loop, or the evaluation's stream) feeds it.
    """

    def __init__(self, cfg: GrowthConfig) -> None:
        self.cfg = cfg
        self._images: dict[str, int] = {}
        self._candidates: dict[str, list[object]] = {}

    def start(self, product: str, images: int) -> None:
        """Track ``product`` with a bank of ``images`` images (a registration resets it)."""
        self._images[product] = images
        self._candidates[product] = []

    def images(self, product: str) -> int:
        return self._images.get(product, 0)

    def offer(self, product: str, frame: object, raw: float, passed: bool, frozen: bool,
              recent: Sequence[float]) -> bool:
        """Keep ``frame`` (pixels, features: whatever the caller rebuilds from) as a candidate if
        it qualifies; True when it was kept."""
        cfg = self.cfg
        if (not cfg.enabled or product not in self._images or not passed or frozen
                or self._images[product] >= cfg.max_images or len(recent) < cfg.min_count
                or not np.isfinite(raw) or raw > float(np.quantile(np.asarray(recent, dtype=np.float64), cfg.below))):
            return False
        self._candidates[product].append(frame)
        return True

    def due(self, product: str) -> bool:
        """True when the candidates would double the bank (or fill it to ``max_images``)."""
        have = self._images.get(product, 0)
        want = min(have, self.cfg.max_images - have)
        return have > 0 and want > 0 and len(self._candidates.get(product, ())) >= max(2, want)

    def take(self, product: str) -> list[object]:
        """The candidates of a due rebuild (at most the room left), cleared."""
        room = self.cfg.max_images - self._images[product]
        out, self._candidates[product] = self._candidates[product][:room], []
        return out

    def grown(self, product: str, added: int) -> None:
        """Record a rebuild that added ``added`` images."""
        self._images[product] = min(self.cfg.max_images, self._images[product] + added)


@dataclass(frozen=True)
class GrownBank:
    """A rebuilt bank (carrying the rescaled statistics), the statistics, and what was measured."""

    bank: ProductBank
    stats: NormalStats
    ratio: float
    cross_scores: np.ndarray  # the candidates' raw scores against banks without them


@torch.no_grad()
def grow_bank(model: InspectionModel, bank: ProductBank, images: int, feats: Sequence[torch.Tensor],
              before: Sequence[float], stats: NormalStats, coreset: Coreset = None, seed: int = 0) -> GrownBank:
    """``bank`` (of ``images`` images) with the candidates whose features are ``feats`` added.

    Args:
        feats: per level ``(M, C, H, W)`` features of the M >= 2 candidate frames.
        before: their raw scores against ``bank`` (as they were served).
        stats: the product's statistics in service, on ``bank``'s scale.
    """
    m = feats[0].shape[0]
    if m < 2 or len(before) != m:
        raise ValueError(f"a bank grows from 2 or more candidates with their scores, got {m} and {len(before)}")
    caps = level_caps(coreset, len(feats))
    folds = fold_of(m, seed)
    member = torch.as_tensor(folds)
    fold_ids = sorted(set(folds))
    per_fold = [[_capped(position_vectors(level[member == f]).reshape(-1, level.shape[1]), cap, seed)
                 for level, cap in zip(feats, caps)] for f in fold_ids]
    weight = float(images)

    def union(parts: Sequence[int]) -> ProductBank:
        levels = tuple(_capped(torch.cat([bank.features[l].float(), *(per_fold[j][l] for j in parts)]), caps[l], seed)
                       .to(BANK_DTYPE).contiguous() for l in range(len(feats)))
        rows = torch.cat([torch.nonzero(member == fold_ids[j]).flatten() for j in parts])
        proto = bank.prototype.float() * weight + prototype_of(feats[-1][rows]).sum(0)
        return ProductBank(levels, F.normalize(proto, dim=0), torch.full((2,), float("nan")))

    everything = list(range(len(fold_ids)))
    fold_banks = [union([j for j in everything if j != i]) for i in everything]
    after = raw_scores_hinted(model, feats, stack_banks(fold_banks), range(m), folds)
    old = float(np.median(np.asarray(before, dtype=np.float64)))
    ratio = float(np.clip(np.median(after) / old, *RATIO_BOUNDS)) if old > 0 else 1.0
    scaled = replace(stats, u=stats.u * ratio, gamma=stats.gamma * ratio, source="stream",
                     registration=[s * ratio for s in stats.registration],
                     feedback=[s * ratio for s in stats.feedback], stream=[s * ratio for s in stats.stream],
                     revision=stats.revision + 1, updated_at=_now())
    served = union(everything)
    return GrownBank(served.with_stats(scaled.u, scaled.gamma), scaled, ratio, after)
