"""Which parts of the model help on unseen classes: short fits of model variants, one split.

Fits each variant's constraintors and flows on the split's source classes and follows the fit:
at step 0 and at every checkpoint it scores a fixed sample of the unseen classes' test images
against fixed banks (the same shots for every variant) and records image AUROC of the raw map
per class and mixed, next to the training-free nearest-neighbour baseline on the same banks.
Source material, test features and banks are prepared once per run (the backbone is frozen),
so variants after the first start fitting at once: name them all in one ``--variants``.

    python benchmarks/ablation.py --split A --variants conv,identity --steps 600
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from inspector.model import InspectionModel, ModelConfig, load_backbone_weights
from trainer import metrics
from trainer.dataset import VIEWS, prepare_sources
from trainer.evaluate import TestSet, image_scores, load_test_set, register_draw, run_draw
from trainer.fit import FitConfig, fit_flows

from trainer.benchmark import SPLITS, commit, machine, parse_checked

ALL_VIEWS = tuple(VIEWS)
VARIANTS: dict[str, tuple[dict, dict, tuple[str, ...]]] = {
    # name: (FlowConfig changes, FitConfig changes, source views)
    "conv": ({"constraintor": "conv"}, {}, ()),
    "identity": ({"constraintor": "identity"}, {}, ()),
    "identity-nopos": ({"constraintor": "identity", "position": False}, {}, ()),
    "identity-normal": ({"constraintor": "identity"}, {"anomaly_fraction": 0.0}, ()),
    "conv-nopos": ({"constraintor": "conv", "position": False}, {}, ()),
    "identity-views": ({"constraintor": "identity"}, {}, ALL_VIEWS),
    "identity-nopos-views": ({"constraintor": "identity", "position": False}, {}, ALL_VIEWS),
    "identity-small": ({"constraintor": "identity", "blocks": 2, "hidden_ratio": 0.25}, {}, ()),
    "conv-views": ({"constraintor": "conv"}, {}, ALL_VIEWS),
}


def variant_config(name: str, steps: int, checkpoint_every: int) -> tuple[ModelConfig, FitConfig]:
    flow_changes, fit_changes, _ = VARIANTS[name]
    base = ModelConfig()
    cfg = dataclasses.replace(base, flow=dataclasses.replace(base.flow, **flow_changes))
    fit = FitConfig(steps=steps, checkpoint_every=checkpoint_every, **fit_changes)
    return cfg, fit


def draw_banks(model: InspectionModel, root: str, classes, draws: int, seed: int):
    """Per draw, the stacked banks of every target class from k random train/good images."""
    rng = np.random.default_rng(seed)
    return [register_draw(model, root, classes, rng)[0] for _ in range(draws)]


def score(model: InspectionModel, test: TestSet, banks, fraction: float) -> dict[str, object]:
    """Image AUROC of the raw map and the baseline, per class and mixed, mean over draws."""
    rows = {"model": [], "baseline": []}
    for bank in banks:
        draw = run_draw(model, test, bank, bank, batch=8, progress=False)
        for key, maps in (("model", draw["raw"]), ("baseline", draw["nn"])):
            s = image_scores(maps, fraction)
            per = [metrics.roc_auc(test.labels[test.class_of == c], s[test.class_of == c]) for c in range(len(test.classes))]
            rows[key].append(per + [float(np.mean(per)), metrics.roc_auc(test.labels, s)])
    names = [*test.classes, "separated", "mixed"]
    return {k: dict(zip(names, np.mean(v, axis=0).round(4).tolist())) for k, v in rows.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/industrial")
    p.add_argument("--weights", default="../shared/weights/resnet18-imagenet1k-l1-l3.safetensors")
    p.add_argument("--split", default="A", choices=sorted(SPLITS))
    p.add_argument("--variants", default="conv,identity")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--images-per-class", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=150)
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--coreset", type=int, default=1024, help="bank vectors per level (speed; see banks.md)")
    p.add_argument("--runs", default="runs/ablation")
    p.add_argument("--out", default="benchmarks/results/ablation")
    args = parse_checked(p)
    source, target = SPLITS[args.split]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / f"split{args.split}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    base = ModelConfig()
    probe = InspectionModel(dataclasses.replace(base, bank=dataclasses.replace(base.bank, coreset=args.coreset)))
    load_backbone_weights(probe.backbone, args.weights)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    views = tuple(v for v in ALL_VIEWS if any(v in VARIANTS[n][2] for n in names))
    material = prepare_sources(probe, args.data, source, args.images_per_class, 0.3, 1, True, 0, views=views)
    test = load_test_set(probe, args.data, target, True, per_class=args.test_per_class)
    banks = draw_banks(probe, args.data, target, args.draws, 0)
    fraction = probe.cfg.score.top_fraction
    for name in names:
        cfg, fit = variant_config(name, args.steps, args.checkpoint_every)
        model = InspectionModel(cfg)
        load_backbone_weights(model.backbone, args.weights)
        model.eval()
        views = VARIANTS[name][2]
        classes = [m for m in material if "~" not in m.name or m.name.split("~")[1] in views]
        trace: list[dict] = []
        t0 = time.perf_counter()

        def follow(step: int) -> None:
            """Score the model now; the result file is rewritten, so a stopped run keeps its trace."""
            trace.append({"step": step, **score(model, test, banks, fraction)})
            print(f"{name} step {step}: {json.dumps(trace[-1])}", flush=True)
            results[name] = {
                "model": dataclasses.asdict(cfg.flow), "views": list(views), "fit": dataclasses.asdict(fit),
                "trace": trace, "seconds": round(time.perf_counter() - t0, 1),
                "settings": {k: getattr(args, k) for k in ("images_per_class", "test_per_class", "draws", "coreset")},
                "source": source, "target": target, "machine": machine(), "commit": commit(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            results_path.write_text(json.dumps(results, indent=2))

        follow(0)
        fit_flows(model, classes, fit, Path(args.runs) / f"split{args.split}" / name, resume=False, on_checkpoint=follow)
    return 0


if __name__ == "__main__":
    sys.exit(main())
