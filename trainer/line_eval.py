"""What a mixed line sees: rates at the one shipped threshold, and after a simulated stream.

The product's promise is that one line threshold holds for products the model never saw. For
each unseen (target) class this measures, at the shipped threshold on the calibrated scale:

* the false-reject and escape rates (``frr``, ``escape``);
* the oracles: the escape rate of the class's own threshold (on its own good test images) set
  at the same false-reject rate as the shipped threshold's (``oracle_escape``: did the scale
  cost ranking?) and at the target rate (``target_oracle_escape``: what a perfect per-class
  calibration at the target gives; a threshold that meets the FRR target by rejecting nothing
  shows up as an escape far above it);
* the leave-one-class-out false-reject rate: a threshold set at the target rate on the *other*
  target classes' good test images, applied to this one (``loco_frr``);
* a simulated stream (``simulate_stream``): the product registered from only its k shots
  (leave-one-out statistics), then a few hundred frames in order, good ones from its
  ``train/good`` images not used for registration with defects mixed in, the statistics
  updated as the worker's ``StreamCalibrator`` would; the rates on the test set are followed
  after every refresh, on the test defects the stream did not show (``held_out``);
* the same stream with bank growth (``simulate_growing_stream``): frames that qualify join the
  product's bank as ``inspector.banks.growth`` decides, the bank is rebuilt when they would
  double it, and every later frame and the test set are scored against the grown bank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

import torch

from inspector.banks.growth import BankGrowth, GrowthConfig, grow_bank
from inspector.banks.normal import NormalStats, StreamCalibrator, StreamConfig, calibrated
from inspector.banks.register import raw_scores_against
from inspector.model import InspectionModel
from inspector.model.bank import Coreset, ProductBank

from . import metrics


def class_rates(labels: np.ndarray, scores: np.ndarray, threshold: float, frr_target: float) -> dict[str, float]:
    """FRR and escape at ``threshold``; the escape of the class's own threshold at that same FRR
    (``oracle_escape``) and at ``frr_target`` (``target_oracle_escape``)."""
    rates = metrics.rate_at_threshold(labels, scores, threshold)
    good = scores[labels == 0]
    same = metrics.rate_at_threshold(labels, scores, metrics.threshold_at_false_reject_rate(good, rates["false_reject_rate"]))
    target = metrics.rate_at_threshold(labels, scores, metrics.threshold_at_false_reject_rate(good, frr_target))
    return {"frr": rates["false_reject_rate"], "escape": rates["escape_rate"],
            "oracle_frr": same["false_reject_rate"], "oracle_escape": same["escape_rate"],
            "target_oracle_escape": target["escape_rate"]}


def line_rates(class_of: np.ndarray, labels: np.ndarray, scores: np.ndarray, classes: Sequence[str],
               threshold: float, frr_target: float) -> dict[str, dict[str, float]]:
    """Per class: ``class_rates`` plus the leave-one-class-out false-reject rate."""
    out = {}
    for c, name in enumerate(classes):
        sel = class_of == c
        rates = class_rates(labels[sel], scores[sel], threshold, frr_target)
        others = (class_of != c) & (labels == 0)
        if others.any():
            loco = metrics.threshold_at_false_reject_rate(scores[others], frr_target)
            rates["loco_frr"] = float((scores[sel & (labels == 0)] > loco).mean())
        out[name] = rates
    return out


@dataclass(frozen=True)
class StreamPlan:
    """A simulated stream for one class: good frames' raw scores in order, defects mixed in."""

    raw: np.ndarray  # (F,) raw scores in stream order
    defect: np.ndarray  # (F,) bool


@dataclass(frozen=True)
class StreamOrder:
    """A simulated stream as indices: frame ``i`` is good frame ``index[i]`` or, where
    ``defect[i]``, defect ``index[i]`` (drawn with replacement)."""

    index: np.ndarray  # (F,) int
    defect: np.ndarray  # (F,) bool


def stream_order(n_good: int, n_defects: int, frames: int, defect_rate: float,
                 rng: np.random.Generator) -> StreamOrder:
    """Interleave ``frames`` frames: defects at ``defect_rate`` (drawn with replacement), the rest good in order."""
    n_defect = int(round(frames * defect_rate)) if n_defects else 0
    n_good = min(frames - n_defect, n_good)
    is_defect = np.zeros(n_good + n_defect, dtype=bool)
    is_defect[rng.choice(len(is_defect), size=n_defect, replace=False)] = True
    index = np.empty(len(is_defect), dtype=np.int64)
    index[~is_defect] = np.arange(n_good)
    index[is_defect] = rng.choice(n_defects, size=n_defect, replace=True)
    return StreamOrder(index, is_defect)


def held_out(order: StreamOrder, n_defects: int) -> np.ndarray:
    """(n_defects,) bool: the defects ``order`` never streams. The rates after a stream are measured
    on these only: a defect the stream saw may have joined the grown bank or moved the statistics,
    and scoring it again would count what the stream taught as detection (or as an escape)."""
    keep = np.ones(n_defects, dtype=bool)
    keep[order.index[order.defect]] = False
    return keep


def plan_of(order: StreamOrder, good_raw: np.ndarray, defect_raw: np.ndarray) -> StreamPlan:
    """The raw scores of ``order``'s frames."""
    raw = np.where(order.defect, np.asarray(defect_raw)[np.where(order.defect, order.index, 0)] if len(defect_raw) else 0.0,
                   np.asarray(good_raw)[np.where(order.defect, 0, order.index)])
    return StreamPlan(raw.astype(np.float64), order.defect.copy())


def stream_plan(good_raw: np.ndarray, defect_raw: np.ndarray, frames: int, defect_rate: float,
                rng: np.random.Generator) -> StreamPlan:
    """Interleave ``frames`` frames: defects at ``defect_rate`` (drawn with replacement), the rest good in order."""
    return plan_of(stream_order(len(good_raw), len(defect_raw), frames, defect_rate, rng), good_raw, defect_raw)


def simulate_stream(start: NormalStats, plan: StreamPlan, threshold: float, cfg: StreamConfig,
                    test_labels: np.ndarray, test_raw: np.ndarray) -> dict[str, Any]:
    """Run the worker's stream update over ``plan``; rates on the test set after every change.

    Returns:
        ``{"trace": [{"frames", "frr", "escape", "u", "gamma", "frozen"}...], "frr", "escape",
        "frames", "stream_frr"}`` with the final rates and the false-reject rate seen on the
        stream's own good frames.
    """
    calib = StreamCalibrator(cfg)
    calib.adopt(start)

    def point(frames: int) -> dict[str, Any]:
        s = calib.current(start.product)
        r = metrics.rate_at_threshold(test_labels, calibrated(test_raw, s.u, s.gamma), threshold)
        return {"frames": frames, "frr": r["false_reject_rate"], "escape": r["escape_rate"],
                "u": s.u, "gamma": s.gamma, "frozen": s.frozen}

    trace = [point(0)]
    rejected_good = 0
    for i, (raw, defect) in enumerate(zip(plan.raw, plan.defect)):
        s = calib.current(start.product)
        failed = bool(calibrated(raw, s.u, s.gamma) > threshold)
        rejected_good += int(failed and not defect)
        if calib.observe(start.product, float(raw), failed) is not None:
            trace.append(point(i + 1))
    last = point(len(plan.raw))
    return {"trace": trace, "frr": last["frr"], "escape": last["escape"], "frames": len(plan.raw),
            "stream_frr": rejected_good / max(1, int((~plan.defect).sum()))}


def simulate_growing_stream(
    model: InspectionModel, start: NormalStats, bank: ProductBank, images: int, order: StreamOrder,
    good_feats: Sequence[torch.Tensor], defect_feats: Sequence[torch.Tensor], threshold: float,
    cfg: StreamConfig, growth_cfg: GrowthConfig, test_feats: Sequence[torch.Tensor], test_labels: np.ndarray,
    coreset: Coreset = None, frr_target: float = 0.01,
) -> dict[str, Any]:
    """``simulate_stream`` with bank growth: the product starts from ``bank`` (``images`` images)
    and ``start``; frames are scored against the bank in service when they arrive.

    Returns:
        as ``simulate_stream``, plus ``bank_images`` (after the stream), ``growths``
        (``{"frame", "images", "ratio"}`` per rebuild), ``joined`` (the stream positions of the
        frames that joined the bank, in order), ``bank``, the bank in service at the end, and
        ``oracle_escape`` / ``target_oracle_escape``: the escape of the grown bank's scores at
        their own threshold at the stream's false-reject rate and at ``frr_target`` (how well the
        grown bank ranks, apart from where the stream's statistics put the line threshold).
    """
    product = start.product
    calib = StreamCalibrator(cfg)
    calib.adopt(start)
    growth = BankGrowth(growth_cfg)
    growth.start(product, images)
    current = {"bank": bank}

    def frame_feats(rows: Sequence[int]) -> list[torch.Tensor]:
        return _stream_feats(order, good_feats, defect_feats, rows)

    def test_raw() -> np.ndarray:
        return raw_scores_against(model, test_feats, current["bank"])

    scored: dict[int, float] = {}

    def raw_of(i: int) -> float:
        if i not in scored:  # score the next few frames against the bank in service now
            rows = list(range(i, min(i + 8, len(order.index))))
            for r, v in zip(rows, raw_scores_against(model, frame_feats(rows), current["bank"])):
                scored[r] = float(v)
        return scored[i]

    test = {"raw": test_raw()}

    def point(frames: int) -> dict[str, Any]:
        return _trace_point(calib.current(product), test_labels, test["raw"], threshold, frames, growth.images(product))

    trace, growths, joined, rejected_good = [point(0)], [], [], 0
    for i, defect in enumerate(order.defect):
        raw = raw_of(i)
        s = calib.current(product)
        failed = bool(calibrated(raw, s.u, s.gamma) > threshold)
        rejected_good += int(failed and not defect)
        changed = calib.observe(product, raw, failed) is not None
        s = calib.current(product)
        growth.offer(product, i, raw, not failed, s.frozen, calib.recent(product))
        if growth.due(product):
            rows = [int(r) for r in growth.take(product)]
            joined.extend(rows)
            grown = grow_bank(model, current["bank"], growth.images(product), frame_feats(rows),
                              [scored[r] for r in rows], s, coreset)
            growth.grown(product, len(rows))
            calib.rescale(product, grown.ratio, grown.stats)
            current["bank"] = grown.bank
            scored = {r: v for r, v in scored.items() if r <= i}  # later frames meet the grown bank
            test["raw"] = test_raw()
            growths.append({"frame": i + 1, "images": growth.images(product), "ratio": round(grown.ratio, 4)})
            changed = True
        if changed:
            trace.append(point(i + 1))
    last = point(len(order.index))
    s = calib.current(product)
    own = class_rates(test_labels, calibrated(test["raw"], s.u, s.gamma), threshold, frr_target)
    return {"trace": trace, "frr": last["frr"], "escape": last["escape"], "frames": len(order.index),
            "stream_frr": rejected_good / max(1, int((~order.defect).sum())),
            "bank_images": growth.images(product), "growths": growths, "joined": joined, "bank": current["bank"],
            "oracle_escape": own["oracle_escape"], "target_oracle_escape": own["target_oracle_escape"]}


def _stream_feats(order: StreamOrder, good_feats: Sequence[torch.Tensor], defect_feats: Sequence[torch.Tensor],
                  rows: Sequence[int]) -> list[torch.Tensor]:
    """Per level, the features of the stream's frames at positions ``rows`` (good or defect)."""
    return [torch.stack([level_defect[order.index[r]] if order.defect[r] else level_good[order.index[r]] for r in rows])
            for level_good, level_defect in zip(good_feats, defect_feats)]


def _trace_point(s: NormalStats, test_labels: np.ndarray, test_raw: np.ndarray, threshold: float, frames: int,
                 bank_images: int) -> dict[str, Any]:
    """The test set's rates under the product's current statistics, after ``frames`` frames."""
    r = metrics.rate_at_threshold(test_labels, calibrated(test_raw, s.u, s.gamma), threshold)
    return {"frames": frames, "frr": r["false_reject_rate"], "escape": r["escape_rate"],
            "u": s.u, "gamma": s.gamma, "frozen": s.frozen, "bank_images": bank_images}
