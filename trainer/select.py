"""Learned parts only where they earn it: leave-one-source-class-out selection of the scoring.

For each source class in turn, the flows are fitted on the *other* source classes and the held-out
class is scored two ways against banks of its own good images: by the fitted flows and by the
training-free distance they start from. The held-out class plays an unseen product; no target
class is ever looked at. The flows ship only if they rank the held-out classes' anomalies
(synthetic and labelled) above their held-out good images better than the distance does, on
average over the held-out classes (issue "per-product calibration", point 5).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from inspector.model import InspectionModel, build_bank, stack_banks
from inspector.model.calibration import top_fraction_mean

from . import metrics
from .dataset import ClassMaterial
from .features import select
from .fit import FitConfig, fit_flows

SCORE_BATCH = 8  # held-out images scored per pass


@torch.no_grad()
def held_out_aurocs(model: InspectionModel, mat: ClassMaterial, rng: np.random.Generator) -> dict[str, float]:
    """Image AUROC of the flow map and of the distance map on one class's held-out material.

    Normal images: the class's held-out good images; anomalous: its anomalies whose source image
    is not a shot. The bank is k random fit images, the same for both maps.
    """
    k = model.cfg.bank.shots
    shots = np.sort(rng.choice(mat.fit[0].shape[0], size=k, replace=False))
    keep = [i for i in range(mat.anomalous[0].shape[0]) if int(mat.source[i]) not in set(shots.tolist())]
    bank = stack_banks([build_bank(select(mat.fit, shots), model.cfg.bank.coreset)])
    scores: dict[str, list[torch.Tensor]] = {"flow": [], "distance": []}
    for feats in (mat.holdout, [f[keep] for f in mat.anomalous]):
        n = feats[0].shape[0]
        for start in range(0, n, SCORE_BATCH):
            rows = range(start, min(n, start + SCORE_BATCH))
            a = model.analyse(select(feats, rows), bank, torch.zeros(len(rows), dtype=torch.long))
            scores["flow"].append(top_fraction_mean(a.raw_map, model.cfg.score.top_fraction))
            scores["distance"].append(top_fraction_mean(a.nn_map, model.cfg.score.top_fraction))
    labels = np.concatenate([np.zeros(mat.holdout[0].shape[0]), np.ones(len(keep))])
    return {m: metrics.roc_auc(labels, torch.cat(v).numpy()) for m, v in scores.items()}


def select_scoring(model: InspectionModel, classes: Sequence[ClassMaterial], fit: FitConfig, workdir: Path,
                   resume: bool, progress: bool, seed: int = 0) -> dict[str, Any]:
    """Fit on all source classes but one, for each one; return the evidence and the choice.

    ``model`` is left untouched (each fold fits a copy that starts from its untrained flows).
    """
    if len(classes) < 2:
        return {"shipped": "distance", "reason": "one source class: none can be held out, so no evidence for the flows"}
    folds = {}
    for held in classes:
        fold = copy.deepcopy(model)
        fold.cfg = dataclasses.replace(fold.cfg, score=dataclasses.replace(fold.cfg.score, scoring="flow"))
        others = [c for c in classes if c is not held]
        fit_flows(fold, others, fit, workdir / f"select-{held.name}", resume=resume, progress=progress)
        fold.eval()
        folds[held.name] = held_out_aurocs(fold, held, np.random.default_rng(seed))
    gain = float(np.mean([f["flow"] - f["distance"] for f in folds.values()]))
    shipped = "flow" if gain > 0 else "distance"
    return {"shipped": shipped, "mean_gain": gain, "held_out": folds, "steps": fit.steps,
            "reason": f"fitted flows {'beat' if gain > 0 else 'did not beat'} the distance on held-out source "
                      f"classes by {gain:+.4f} image AUROC on average"}
