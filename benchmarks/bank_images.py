"""Detection against the number of good images in a product's bank (training-free distance).

Per class of the industrial set (every class is unseen here: nothing is fitted) and per draw,
a random pool of good ``train`` images is drawn; for each bank size n the first n images of the
pool form the bank exactly as registration builds it (every position, capped at ``coreset``
vectors per level by the two-level k-center of ``build_fold_banks``), and the
class's test images (features extracted once) are scored against it exactly as the worker
scores them. Records class-separated image AUROC per bank size and cap, with the split means of
the accuracy benchmark's target classes, and the scoring time per image and the bank's build time (the coreset search).
A cap is one number for every level or one per level (``4096,1024,1024``). With ``--pixel``, pixel
AUROC and AUPRO of the served map on the classes with masks are recorded too, next to the plain
distance of a bank of the 4 most diverse pool images (the accuracy benchmark's baseline).

    python benchmarks/bank_images.py --sizes 4,8,16,32,50 --coresets 1024 4096
    python benchmarks/bank_images.py --sizes 50 --coresets 1024 4096,1024,1024 --pixel --classes pcb,solar_cell
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from inspector.banks.register import fold_of, pick_diverse, raw_scores_against
from inspector.model import InspectionModel, ModelConfig, load_backbone_weights
from inspector.model.bank import build_bank, build_fold_banks, describe_coreset, parse_coreset
from trainer import metrics
from trainer.data import ImageCache, list_classes, list_samples
from trainer.features import extract_features

from trainer.benchmark import SPLITS, commit, machine, parse_checked, pixel_metrics, scores_and_maps


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def caps(text: str):
    try:
        return parse_coreset(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None





def label(n: int | str, cap) -> str:
    return f"{n}/{describe_coreset(cap) if cap else 'all'}"


def measure_class(model: InspectionModel, args, cls: str, sizes, coresets, t_start: float):
    """Per bank key ``images/cap``: image AUROC, ms per image and bank build seconds per draw, and
    with ``--pixel`` on a class with masks the pixel metrics per draw (key ``distance4`` too)."""
    rng = np.random.default_rng(0)
    test = list_samples(args.data, cls, "test")
    keep = rng.choice(len(test), size=min(args.test_per_class, len(test)), replace=False)
    test_cache = ImageCache.load([test[i] for i in sorted(keep)], args.input_size)
    test_feats = [f.float() for f in extract_features(model, test_cache.images, progress=False)]
    want_pixel = args.pixel and bool(test_cache.has_mask[test_cache.labels == 1].all())
    pool_all = list_samples(args.data, cls, "train")
    rows: dict[str, list[float]] = {}
    cost: dict[str, list[float]] = {}
    build: dict[str, list[float]] = {}
    pixel: dict[str, dict[str, list[float]]] = {}

    def record(key: str, scores: np.ndarray, maps: np.ndarray | None, per_image: float, build_s: float) -> None:
        rows.setdefault(key, []).append(metrics.roc_auc(test_cache.labels, scores))
        cost.setdefault(key, []).append(per_image * 1000)
        build.setdefault(key, []).append(build_s)
        extra = ""
        if maps is not None:
            for m, v in pixel_metrics(test_cache, maps).items():
                pixel.setdefault(key, {}).setdefault(m, []).append(v)
            extra = f", pixel AUROC {pixel[key]['pixel_auroc'][-1]:.3f}, AUPRO {pixel[key]['aupro'][-1]:.3f}"
        print(f"{cls} {key}: AUROC {rows[key][-1]:.3f}{extra} ({per_image * 1000:.0f} ms/img, bank {build_s:.1f} s) "
              f"[{time.perf_counter() - t_start:.0f} s]", flush=True)

    for draw in range(args.draws):
        order = rng.permutation(len(pool_all))[: max(sizes)]
        pool = ImageCache.load([pool_all[i] for i in order], args.input_size)
        pool_feats = [f.float() for f in extract_features(model, pool.images, progress=False)]
        if want_pixel:  # the accuracy benchmark's baseline: the plain distance of the 4 most diverse images
            shots = pick_diverse(pool_feats[-1], model.cfg.bank.shots)
            base = build_bank([f[shots] for f in pool_feats], ModelConfig().bank.coreset)
            t0 = time.perf_counter()
            scores, maps = scores_and_maps(model, test_feats, base)
            record(f"distance{len(shots)}", scores, maps, (time.perf_counter() - t0) / len(scores), 0.0)
        for n in (s for s in sizes if s <= len(order)):
            for cap in coresets:
                t0 = time.perf_counter()
                bank, _ = build_fold_banks([f[:n] for f in pool_feats], fold_of(n, draw), cap, seed=draw)
                build_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                if want_pixel:
                    scores, maps = scores_and_maps(model, test_feats, bank)
                else:
                    scores, maps = raw_scores_against(model, test_feats, bank), None
                record(f"{label(n, cap)}", scores, maps, (time.perf_counter() - t0) / len(scores), build_s)
    return rows, cost, build, pixel


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/industrial")
    p.add_argument("--weights", default="../shared/weights/resnet18-imagenet1k-l1-l3.safetensors")
    p.add_argument("--classes", default="", help="comma-separated (default: all)")
    p.add_argument("--sizes", default="4,8,16,32,50", help="good images in the bank")
    p.add_argument("--coresets", nargs="+", type=caps, default=[1024, 4096],
                   help="caps to compare, each one number for every level or one per level ('all': none)")
    p.add_argument("--pixel", action="store_true", help="also pixel AUROC and AUPRO, with the 4-image distance")
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
    sizes, coresets = ints(args.sizes), args.coresets
    out = Path(args.out)
    result: dict = {
        "commit": commit(), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {"sizes": sizes, "coresets": [describe_coreset(c) for c in coresets], "draws": args.draws,
                     "pixel": args.pixel,
                     "test_per_class": args.test_per_class, "input_size": args.input_size},
        "classes": {},
    }
    t_start = time.perf_counter()
    for cls in classes:
        rows, cost, build, pixel = measure_class(model, args, cls, sizes, coresets, t_start)
        result["classes"][cls] = {k: {"auroc": round(float(np.mean(v)), 4), "ms_per_image": round(float(np.median(cost[k])), 1),
                                      "bank_seconds": round(float(np.median(build[k])), 2),
                                      **{m: round(float(np.mean(x)), 4) for m, x in pixel.get(k, {}).items()}}
                                  for k, v in rows.items()}
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        result["splits"] = {
            name: {k: round(float(np.mean([result["classes"][c][k]["auroc"] for c in targets])), 4)
                   for k in rows if all(k in result["classes"].get(c, {}) for c in targets)}
            for name, (_source, targets) in SPLITS.items()
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
