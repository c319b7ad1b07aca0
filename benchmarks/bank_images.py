"""Detection against the number of good images in a product's bank (training-free distance).

Per class of the industrial set (every class is unseen here: nothing is fitted) and per draw,
a random pool of good ``train`` images is drawn; for each bank size n the first n images of the
pool form the bank exactly as registration builds it (every position, capped at ``coreset``
vectors per level by the two-level k-center of ``build_fold_banks``), and the
class's test images (features extracted once) are scored against it exactly as the worker
scores them. Records class-separated image AUROC per bank size and cap, with the split means of
the accuracy benchmark's target classes, and the scoring time per image and the bank's build time (the coreset search).

    python benchmarks/bank_images.py --sizes 4,8,16,32,50 --coresets 1024,4096
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from inspector.banks.register import fold_of, raw_scores_against
from inspector.model import InspectionModel, ModelConfig, load_backbone_weights
from inspector.model.bank import build_fold_banks
from trainer import metrics
from trainer.data import ImageCache, list_classes, list_samples
from trainer.features import extract_features

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import SPLITS, commit, machine, parse_checked  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def caps(text: str) -> list[int | None]:
    return [None if x == "all" else int(x) for x in text.split(",") if x]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/industrial")
    p.add_argument("--weights", default="../shared/weights/resnet18-imagenet1k-l1-l3.safetensors")
    p.add_argument("--classes", default="", help="comma-separated (default: all)")
    p.add_argument("--sizes", default="4,8,16,32,50", help="good images in the bank")
    p.add_argument("--coresets", default="1024,4096", help="caps on vectors per level ('all': none)")
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--test-per-class", type=int, default=150)
    p.add_argument("--input-size", type=int, default=256)
    p.add_argument("--out", default="benchmarks/results/bank_images.json")
    args = parse_checked(p)
    base = ModelConfig()
    cfg = dataclasses.replace(base, backbone=dataclasses.replace(base.backbone, input_size=args.input_size))
    model = InspectionModel(cfg)
    load_backbone_weights(model.backbone, args.weights)
    model.eval()
    classes = args.classes.split(",") if args.classes else list_classes(args.data)
    sizes, coresets = ints(args.sizes), caps(args.coresets)
    out = Path(args.out)
    result: dict = {
        "commit": commit(), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {"sizes": sizes, "coresets": coresets, "draws": args.draws,
                     "test_per_class": args.test_per_class, "input_size": args.input_size},
        "classes": {},
    }
    t_start = time.perf_counter()
    for cls in classes:
        rng = np.random.default_rng(0)
        test = list_samples(args.data, cls, "test")
        keep = rng.choice(len(test), size=min(args.test_per_class, len(test)), replace=False)
        test_cache = ImageCache.load([test[i] for i in sorted(keep)], args.input_size)
        test_feats = [f.float() for f in extract_features(model, test_cache.images, progress=False)]
        pool_all = list_samples(args.data, cls, "train")
        rows: dict[str, list[float]] = {}
        cost: dict[str, list[float]] = {}
        build: dict[str, list[float]] = {}
        for draw in range(args.draws):
            order = rng.permutation(len(pool_all))[: max(sizes)]
            pool = ImageCache.load([pool_all[i] for i in order], args.input_size)
            pool_feats = [f.float() for f in extract_features(model, pool.images, progress=False)]
            for n in sizes:
                if n > len(order):
                    continue
                for cap in coresets:
                    t0 = time.perf_counter()
                    bank, _ = build_fold_banks([f[:n] for f in pool_feats], fold_of(n, draw), cap, seed=draw)
                    build_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    scores = raw_scores_against(model, test_feats, bank)
                    per_image = (time.perf_counter() - t0) / len(scores)
                    key = f"{n}/{cap or 'all'}"
                    rows.setdefault(key, []).append(metrics.roc_auc(test_cache.labels, scores))
                    cost.setdefault(key, []).append(per_image * 1000)
                    build.setdefault(key, []).append(build_s)
                    print(f"{cls} draw {draw} images {n} coreset {cap}: AUROC {rows[key][-1]:.3f} "
                          f"({per_image * 1000:.0f} ms/img, bank {build_s:.1f} s) [{time.perf_counter() - t_start:.0f} s]", flush=True)
        result["classes"][cls] = {k: {"auroc": round(float(np.mean(v)), 4), "ms_per_image": round(float(np.median(cost[k])), 1),
                                      "bank_seconds": round(float(np.median(build[k])), 2)}
                                  for k, v in rows.items()}
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        result["splits"] = {
            name: {k: round(float(np.mean([result["classes"][c][k]["auroc"] for c in targets])), 4)
                   for k in rows if all(c in result["classes"] for c in targets)}
            for name, (_source, targets) in SPLITS.items()
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
