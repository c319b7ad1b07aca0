"""``inspector demo``: the whole train-and-evaluate path on generated products, in minutes on a CPU.

It writes a synthetic mixed line of four products, fits a small model on two of them, and
evaluates it on the two it never saw, with 4 shots each, writing a report with plots.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

SOURCE = ("tiles", "rings")
TARGET = ("weave", "dots")
DEMO_SIZE = 128  # input size: a quarter of the default's pixels keeps the demo to minutes on 2 cores


def run_demo(out: Path, weights: str | None, steps: int, progress: bool = True) -> int:
    """Run the demo into ``out``; return the process exit code."""
    from trainer.calibrate import CalibrationConfig
    from trainer.evaluate import EvalConfig, evaluate
    from trainer.fit import FitConfig
    from trainer.synthetic import generate_dataset
    from trainer.train import TrainConfig, train

    from .artifact import load_artifact
    from .cli import format_summary
    from .model import ModelConfig

    t0 = time.perf_counter()
    data = out / "data"
    if not data.exists():
        generate_dataset(data, classes=SOURCE + TARGET, n_train=40, n_test_good=12, n_test_defect=12, size=DEMO_SIZE, seed=0)
    print(f"[demo] synthetic line of {len(SOURCE + TARGET)} products in {data}")
    if weights:
        print(f"[demo] backbone: pretrained weights {weights}")
    else:
        print("[demo] backbone: no weights file found, using RANDOM weights (pass --weights or set "
              "INSPECTOR_BACKBONE_WEIGHTS for meaningful features)", file=sys.stderr)
    cfg = ModelConfig()
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, input_size=DEMO_SIZE))
    train_cfg = TrainConfig(
        data=str(data), classes=SOURCE, weights=weights, images_per_class=40,
        fit=FitConfig(steps=steps, window=32, checkpoint_every=max(1, steps)),
        calibration=CalibrationConfig(targets_per_class=24, epochs=30),
    )
    artifact = out / "model"
    card = train(cfg, train_cfg, artifact, out / "work", resume=False, progress=progress)
    print(f"[demo] trained model {card.model_id} on {', '.join(SOURCE)} in {card.training['seconds']['total']:.0f}s")
    model, card = load_artifact(artifact)
    report = evaluate(model, card, data, TARGET, EvalConfig(draws=2), out / "report", progress=progress)
    print(f"[demo] evaluation on unseen {', '.join(TARGET)}:")
    print(format_summary(report))
    print(f"[demo] report {out / 'report' / 'index.html'}; total {time.perf_counter() - t0:.0f}s")
    return 0
