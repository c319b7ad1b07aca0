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
  after every refresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from inspector.banks.normal import NormalStats, StreamCalibrator, StreamConfig, calibrated

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


def stream_plan(good_raw: np.ndarray, defect_raw: np.ndarray, frames: int, defect_rate: float,
                rng: np.random.Generator) -> StreamPlan:
    """Interleave ``frames`` frames: defects at ``defect_rate`` (drawn with replacement), the rest good in order."""
    n_defect = int(round(frames * defect_rate)) if len(defect_raw) else 0
    n_good = min(frames - n_defect, len(good_raw))
    is_defect = np.zeros(n_good + n_defect, dtype=bool)
    is_defect[rng.choice(len(is_defect), size=n_defect, replace=False)] = True
    raw = np.empty(len(is_defect))
    raw[~is_defect] = good_raw[:n_good]
    raw[is_defect] = rng.choice(defect_raw, size=n_defect, replace=True)
    return StreamPlan(raw, is_defect)


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
