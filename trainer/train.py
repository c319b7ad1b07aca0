"""The whole fit: source material, flows, CADA head, threshold, artifact (DESIGN section 5)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from inspector.artifact import ModelCard, save_artifact
from inspector.model import InspectionModel, ModelConfig, load_backbone_weights

from . import calibrate
from .calibrate import CalibrationConfig
from .dataset import check_views, data_digest, prepare_sources
from .fit import FitConfig, fit_flows
from .select import select_scoring
from .synthetic import generate_dataset


@dataclass(frozen=True)
class TrainConfig:
    """What to fit on and how; stage settings nested."""

    data: str
    classes: tuple[str, ...]
    weights: str | None = None
    images_per_class: int = 200  # normal train images loaded per source class (fit + held out)
    holdout_fraction: float = 0.3
    anomalies_per_image: int = 1
    real_anomalies: bool = True  # also use the source classes' labelled anomalies (with masks)
    synthetic_sources: tuple[str, ...] = ()  # generated products added as extra source classes
    source_views: tuple[str, ...] = ()  # appearance changes of each source class added as classes (VIEWS)
    seed: int = 0
    # Choose the scoring by leave-one-source-class-out (trainer.select): fit the flows on all source
    # classes but one, for each one, and ship them only if they beat the distance on the held-out ones.
    select_scoring: bool = True
    fit: FitConfig = field(default_factory=FitConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out: str | Path,
    workdir: str | Path,
    resume: bool = True,
    progress: bool = True,
) -> ModelCard:
    """Fit a model on ``cfg.classes`` and write the artifact to ``out``."""
    t0 = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = InspectionModel(model_cfg)
    weights_sha = load_backbone_weights(model.backbone, cfg.weights) if cfg.weights else None
    classes = _sources(model, cfg, workdir, progress)
    t_prep = time.perf_counter() - t0
    selection = None
    if cfg.select_scoring:
        selection = select_scoring(model, classes, cfg.fit, workdir, resume, progress, cfg.seed)
        model_cfg = dataclasses.replace(model_cfg, score=dataclasses.replace(model_cfg.score, scoring=selection["shipped"]))
        model.cfg = model_cfg
    if model_cfg.score.scoring == "flow":
        stage1 = fit_flows(model, classes, cfg.fit, workdir, resume=resume, progress=progress)
    else:  # the distance is served: flows that never run are not fitted
        stage1 = {"steps": 0, "seconds": 0.0, "skipped": "scoring is distance: the flows are not run"}
    rng = np.random.default_rng(cfg.calibration.seed)
    t2 = time.perf_counter()
    train_set, val_set = calibrate.cada_targets(model, classes, cfg.calibration, rng, progress)
    stage2 = calibrate.fit_cada(model, train_set, val_set, cfg.calibration, progress)
    t3 = time.perf_counter()
    held = calibrate.holdout_scores(model, classes, cfg.calibration, rng, progress)
    rate, rule = cfg.calibration.target_false_reject_rate, cfg.calibration.threshold_rule
    thresholds = calibrate.thresholds(held, rate, rule)
    t4 = time.perf_counter()
    mode = model_cfg.score.calibration
    model.cfg = dataclasses.replace(
        model_cfg, score=dataclasses.replace(model_cfg.score, threshold=thresholds[mode])
    )
    seconds = {"prepare": round(t_prep, 1), "flows": round(stage1["seconds"], 1), "cada": round(t3 - t2, 1),
               "threshold": round(t4 - t3, 1), "total": round(time.perf_counter() - t0, 1)}
    training = _record(cfg, classes, held, thresholds, model_cfg, stage1, stage2, selection, seconds)
    card = save_artifact(
        model, out, weights_sha,
        false_reject_rate=cfg.calibration.target_false_reject_rate,
        training=training,
    )
    (workdir / "training_summary.json").write_text(json.dumps(training, indent=2))
    return card


def _sources(model: InspectionModel, cfg: TrainConfig, workdir: Path, progress: bool) -> list:
    """The source classes' material (``prepare_sources``), plus generated ones when asked for."""
    classes = prepare_sources(
        model, cfg.data, cfg.classes, cfg.images_per_class, cfg.holdout_fraction,
        cfg.anomalies_per_image, cfg.real_anomalies, cfg.seed, progress, views=cfg.source_views,
    )
    if cfg.synthetic_sources:
        root = generate_dataset(
            workdir / "synthetic", classes=cfg.synthetic_sources, n_train=cfg.images_per_class,
            n_test_good=0, n_test_defect=0, size=model.input_size, seed=cfg.seed, overwrite=True,
        )
        classes += prepare_sources(
            model, root, cfg.synthetic_sources, cfg.images_per_class, cfg.holdout_fraction,
            cfg.anomalies_per_image, False, cfg.seed, progress,
        )
    return classes


def _record(cfg: TrainConfig, classes: list, held: dict, thresholds: dict, model_cfg: ModelConfig, stage1: dict,
            stage2: dict, selection: dict | None, seconds: dict) -> dict:
    """What the model card records of the training run."""
    mode = model_cfg.score.calibration
    rate, rule = cfg.calibration.target_false_reject_rate, cfg.calibration.threshold_rule
    return {
        "source_classes": [c.name for c in classes],
        "data_digest": data_digest(cfg.data, cfg.classes),
        "config": json.loads(json.dumps(asdict(cfg))),
        "counts": {c.name: {"fit": int(c.fit[0].shape[0]), "holdout": int(c.holdout[0].shape[0]),
                            "anomalous": int(c.anomalous[0].shape[0])} for c in classes},
        "thresholds": thresholds,
        "threshold_rule": rule,
        "threshold_by_rule": {r: round(calibrate.place_threshold(held[model_cfg.score.calibration], held["class"], rate, r), 4)
                              for r in calibrate.THRESHOLD_RULES},
        # the shipped mode's threshold from each registration draw alone: its sampling spread
        "threshold_per_draw": [round(t, 4) for t in calibrate.threshold_per_draw(held, mode, rate, rule)],
        "holdout": {
            "n": int(len(held["cada"])),
            "routing_accuracy": float(held["routed_correctly"].mean()),
            "false_reject_rate": {m: float((held[m] > thresholds[m]).mean()) for m in thresholds},
            "per_class": calibrate.holdout_by_class(held, [c.name for c in classes], mode, thresholds[mode]),
        },
        "stage1": stage1,
        "scoring": {"shipped": model_cfg.score.scoring,
                    "selection": selection or "not run: the scoring was given (inspector train --scoring)"},
        "cada": stage2,
        "seconds": seconds,
    }


def parse_views(text: str) -> tuple[str, ...]:
    """``"rot90,zoom"`` -> ``("rot90", "zoom")``; ``""`` -> ``()``; unknown names are an error."""
    return check_views([n.strip() for n in text.split(",") if n.strip()])


def parse_classes(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"a,b,c"`` -> ``("a", "b", "c")``; empty names are an error."""
    names = tuple(n.strip() for n in (text.split(",") if isinstance(text, str) else text))
    if not names or any(not n for n in names):
        raise ValueError(f"expected comma-separated class names, got {text!r}")
    return names
