"""Shot views: do rotated and flipped views of a product's good images in its bank rank defects
better, and can the product's good images alone say when?

Per class and draw, a pool of ``--images`` good ``train`` images forms the bank exactly as
registration builds it (``build_fold_banks``, the default cap per level), once from the images
as they are and once per view set from every image under every view of the set (``rot4``: the
four quarter turns; ``dihedral``: those and their mirror images), an image's views in its own
fold. Test images, as they are, are scored against each bank: image AUROC, and pixel AUROC and
AUPRO where every defect has a mask, with the scoring time per image and the bank's build time.

The decision statistic, from the pool alone: ``rotated``, the fraction of pool images whose most
similar other pool image (cosine of level-3 features pooled to a 4 x 4 grid) is found under a
view other than the identity, i.e. how often the product's parts arrive turned or mirrored
against each other.

    python benchmarks/shot_views.py --views rot4,dihedral --draws 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inspector.banks.register import fold_of
from inspector.model import InspectionModel, ModelConfig, load_backbone_weights
from inspector.model.bank import build_fold_banks

from trainer.data import ImageCache, list_classes, list_samples
from trainer.features import extract_features

from trainer.benchmark import SPLITS, commit, machine, parse_checked, pixel_metrics, scores_and_maps
from trainer import metrics


def _turn(k: int, mirror: bool):
    return lambda im: np.ascontiguousarray(np.rot90(im[:, :, ::-1] if mirror else im, k, axes=(0, 1)))


VIEW_SETS = {
    "rot4": [_turn(k, False) for k in range(4)],
    "dihedral": [_turn(k, m) for m in (False, True) for k in range(4)],
}


def descriptors(level3: torch.Tensor) -> torch.Tensor:
    """``(N, C, h, w)`` -> ``(N, C*16)`` unit vectors of the features pooled to 4 x 4."""
    return F.normalize(F.adaptive_avg_pool2d(level3.float(), 4).flatten(1), dim=1)


def rotated_fraction(model: InspectionModel, images: np.ndarray) -> float:
    """Fraction of images whose nearest other image (``descriptors``) is a turned or mirrored view."""
    views = VIEW_SETS["dihedral"]
    desc = torch.stack([descriptors(extract_features(model, np.stack([v(im) for im in images]), progress=False)[-1])
                        for v in views], 1)  # (N, V, D)
    ident = desc[:, 0]
    sim = torch.einsum("nd,mvd->nmv", ident, desc)  # (N, N, V): image n against every view of image m
    sim[torch.arange(len(images)), torch.arange(len(images))] = -2.0  # never itself
    best = sim.flatten(1).argmax(1) % len(views)
    return float((best != 0).float().mean())


def measure_class(model: InspectionModel, args, cls: str, view_sets: list[str], log) -> dict:
    rng = np.random.default_rng(0)
    test = list_samples(args.data, cls, "test")
    keep = rng.choice(len(test), size=min(args.test_per_class, len(test)), replace=False)
    cache = ImageCache.load([test[i] for i in sorted(keep)], model.input_size)
    test_feats = [f.float() for f in extract_features(model, cache.images, progress=False)]
    pixel = bool(cache.has_mask[cache.labels == 1].all())
    pool_all = list_samples(args.data, cls, "train")
    draws = []
    for draw in range(args.draws):
        order = rng.permutation(len(pool_all))[: args.images]
        pool = ImageCache.load([pool_all[i] for i in order], model.input_size)
        folds = fold_of(len(order), draw)
        row = {"rotated": round(rotated_fraction(model, pool.images), 4)}
        for name in ("plain", *view_sets):
            views = VIEW_SETS.get(name, [lambda im: im])
            images = np.concatenate([np.stack([v(im) for im in pool.images]) for v in views])
            feats = [f.float() for f in extract_features(model, images, progress=False)]
            t0 = time.perf_counter()
            bank, _ = build_fold_banks(feats, folds * len(views), model.cfg.bank.coreset, seed=draw)
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            scores, maps = scores_and_maps(model, test_feats, bank)
            per_image = (time.perf_counter() - t0) / len(scores)
            cell = {"auroc": round(float(metrics.roc_auc(cache.labels, scores)), 4),
                    "ms_per_image": round(per_image * 1000, 1), "bank_seconds": round(build_s, 2)}
            if pixel:
                cell |= {k: round(float(v), 4) for k, v in pixel_metrics(cache, maps).items()}
            row[name] = cell
            log(f"{cls} draw {draw} {name}: {cell} (rotated {row['rotated']})")
        draws.append(row)
    return {"pixel": pixel, "draws": draws}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/industrial")
    p.add_argument("--weights", default="../shared/weights/resnet18-imagenet1k-l1-l3.safetensors")
    p.add_argument("--classes", default="", help="comma-separated (default: all)")
    p.add_argument("--images", type=int, default=50, help="good images in the pool (the bank)")
    p.add_argument("--views", default="rot4,dihedral", help=f"view sets to compare: {', '.join(VIEW_SETS)}")
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--test-per-class", type=int, default=150)
    p.add_argument("--out", default="benchmarks/results/shot_views.json")
    args = parse_checked(p)
    view_sets = [v for v in args.views.split(",") if v]
    unknown = [v for v in view_sets if v not in VIEW_SETS]
    if unknown:
        p.error(f"unknown view sets {unknown}; known: {', '.join(VIEW_SETS)}")
    model = InspectionModel(ModelConfig())
    load_backbone_weights(model.backbone, args.weights)
    model.eval()
    classes = args.classes.split(",") if args.classes else list_classes(args.data)
    t0 = time.perf_counter()
    log = lambda msg: print(f"{msg} [{time.perf_counter() - t0:.0f} s]", flush=True)  # noqa: E731
    result: dict = {"commit": commit(), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "settings": {k: getattr(args, k) for k in ("images", "views", "draws", "test_per_class")}
                    | {"coreset": list(model.cfg.bank.coreset) if isinstance(model.cfg.bank.coreset, tuple)
                       else model.cfg.bank.coreset},
                    "splits": {n: {"source": list(s), "target": list(t)} for n, (s, t) in SPLITS.items()},
                    "classes": {}}
    out = Path(args.out)
    for cls in classes:
        result["classes"][cls] = measure_class(model, args, cls, view_sets, log)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))  # partial results as each class ends
    return 0


if __name__ == "__main__":
    sys.exit(main())
