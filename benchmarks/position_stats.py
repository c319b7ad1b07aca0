"""Per-position normal statistics: does normalising the distance map position by position by the
mean and spread of the product's own cross-scored good maps rank defects better, and can the
product's good images alone say when?

Per class and draw, a pool of good ``train`` images forms the bank exactly as registration
builds it (``build_fold_banks``: folds, coreset per level); every pool image's raw map is
cross-scored against the bank of the other folds. Per fold ``f`` the statistics are the mean and
spread, per cell of a ``g x g`` grid, of the maps of the images *outside* ``f`` (spread floored at
``--floor`` times the spread of every cell's values), so no image is ever normalised by statistics
that contain its own map; the served statistics use every pool image. Test images are scored
against the served bank, plain and normalised ``(map - mean) / spread`` (cells upsampled
bilinearly), for image AUROC, pixel AUROC and AUPRO (classes whose defects all have masks).

Decision statistics are computed from the pool's cross-scored maps alone, never the test set:

- ``agreement``: Pearson correlation of the cell means of two disjoint halves of the folds (do
  the product's good images agree, position by position, on where the distance is high);
- ``gain_nll``: held-out negative log-likelihood per cell of each fold's maps under a Gaussian per
  cell minus under one Gaussian for every cell, both fitted on the other folds (negative: the
  positions explain the good maps' variation);
- ``held_out_cv``: spread over mean of the pool images' image scores, each normalised by the
  statistics of the other folds (``plain``: of their plain cross-scored scores).

    python benchmarks/position_stats.py --grids 8,16,32 --draws 2
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
from inspector.model.bank import build_fold_banks, stack_banks
from inspector.model.graph import top_fraction_mean
from trainer import metrics
from trainer.data import ImageCache, list_classes, list_samples
from trainer.features import extract_features

from trainer.benchmark import SPLITS, commit, machine, parse_checked

BATCH = 8


@torch.no_grad()
def maps_hinted(model: InspectionModel, feats, stacked, hints) -> torch.Tensor:
    """``(N, S, S)`` raw maps of every image, image ``i`` against bank ``hints[i]``."""
    out = []
    for start in range(0, feats[0].shape[0], BATCH):
        part = [f[start : start + BATCH] for f in feats]
        hint = torch.as_tensor(list(hints[start : start + BATCH]), dtype=torch.long)
        out.append(model.analyse(part, stacked, hint).raw_map[:, 0])
    return torch.cat(out)


def cells(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """``(N, S, S)`` maps -> ``(N, g, g)`` cell means."""
    return F.adaptive_avg_pool2d(maps[:, None], grid)[:, 0]


def stats_of(cell_maps: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell mean and spread of ``(n, g, g)`` cell maps, the spread floored at ``floor`` times
    the spread of every cell value."""
    mean = cell_maps.mean(0)
    spread = cell_maps.std(0, unbiased=True) if cell_maps.shape[0] > 1 else torch.zeros_like(mean)
    return mean, spread.clamp_min(floor * float(cell_maps.std()))


def normalise(maps: torch.Tensor, mean: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """``(maps - mean) / spread`` with the cell statistics upsampled to the maps' size."""
    size = maps.shape[-2:]
    up = lambda t: F.interpolate(t[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]  # noqa: E731
    return (maps - up(mean)) / up(spread)


def decision_stats(cell_maps: torch.Tensor, folds: list[int], floor: float) -> dict[str, float]:
    """``agreement`` and ``gain_nll`` (module docstring) of one product's cross-scored cell maps."""
    member = np.asarray(folds)
    ids = sorted(set(folds))
    half = np.isin(member, ids[: len(ids) // 2])
    a, b = cell_maps[torch.from_numpy(half)].mean(0).flatten(), cell_maps[torch.from_numpy(~half)].mean(0).flatten()
    agreement = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    nll_pos, nll_one = [], []
    for f in ids:
        inside = torch.from_numpy(member == f)
        mean, spread = stats_of(cell_maps[~inside], floor)
        held = cell_maps[inside]
        nll_pos.append(float((torch.log(spread) + 0.5 * ((held - mean) / spread) ** 2).mean()))
        others = cell_maps[~inside]
        m1, s1 = others.mean(), others.std().clamp_min(1e-9)
        nll_one.append(float((torch.log(s1) + 0.5 * ((held - m1) / s1) ** 2).mean()))
    return {"agreement": round(agreement, 4), "gain_nll": round(float(np.mean(nll_pos) - np.mean(nll_one)), 4)}


def held_out_scores(maps: torch.Tensor, cell_maps: torch.Tensor, folds: list[int], floor: float,
                    fraction: float) -> np.ndarray:
    """Normalised image scores of the pool images, each by statistics of the other folds only."""
    member = np.asarray(folds)
    out = np.zeros(maps.shape[0], dtype=np.float32)
    for f in sorted(set(folds)):
        inside = torch.from_numpy(member == f)
        mean, spread = stats_of(cell_maps[~inside], floor)
        out[inside.numpy()] = top_fraction_mean(normalise(maps[inside], mean, spread)[:, None], fraction).numpy()
    return out


def evaluate(labels, masks, scores, maps, pixel: bool) -> dict[str, float]:
    out = {"auroc": metrics.roc_auc(labels, scores)}
    if pixel:
        m = maps.numpy()
        out |= {"pixel_auroc": metrics.roc_auc(masks, m), "aupro": metrics.aupro(masks, m, max_fpr=0.3)}
    return {k: round(float(v), 4) for k, v in out.items()}


def measure_class(model: InspectionModel, args, cls: str, grids: list[int], log) -> dict:
    """Per draw: the decision statistics per grid, and the plain and normalised test metrics."""
    rng = np.random.default_rng(0)
    fraction = model.cfg.score.top_fraction
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
        feats = [f.float() for f in extract_features(model, pool.images, progress=False)]
        folds = fold_of(len(order), draw)
        bank, fold_banks = build_fold_banks(feats, folds, model.cfg.bank.coreset, seed=draw)
        pool_maps = maps_hinted(model, feats, stack_banks(fold_banks), folds)
        test_maps = maps_hinted(model, test_feats, stack_banks([bank]), [0] * len(cache.labels))
        plain = top_fraction_mean(test_maps[:, None], fraction).numpy()
        pool_plain = top_fraction_mean(pool_maps[:, None], fraction).numpy()
        row = {"plain": {**evaluate(cache.labels, cache.masks, plain, test_maps, pixel),
                         "held_out_cv": round(float(pool_plain.std() / max(abs(pool_plain.mean()), 1e-9)), 4)},
               "grids": {}}
        for g in grids:
            cm = cells(pool_maps, g)
            mean, spread = stats_of(cm, args.floor)
            normed = normalise(test_maps, mean, spread)
            scores = top_fraction_mean(normed[:, None], fraction).numpy()
            held = held_out_scores(pool_maps, cm, folds, args.floor, fraction)
            row["grids"][str(g)] = {**decision_stats(cm, folds, args.floor),
                                    "held_out_cv": round(float(held.std() / max(abs(held.mean()), 1e-9)), 4),
                                    **evaluate(cache.labels, cache.masks, scores, normed, pixel)}
            log(f"{cls} draw {draw} grid {g}: {row['grids'][str(g)]} vs plain {row['plain']}")
        draws.append(row)
    return {"pixel": pixel, "draws": draws}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/industrial")
    p.add_argument("--weights", default="../shared/weights/resnet18-imagenet1k-l1-l3.safetensors")
    p.add_argument("--classes", default="", help="comma-separated (default: all)")
    p.add_argument("--images", type=int, default=50, help="good images in the pool (the bank)")
    p.add_argument("--grids", default="8,16,32", help="cells per side of the statistics")
    p.add_argument("--floor", type=float, default=0.1, help="spread floor, as a fraction of the global spread")
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--test-per-class", type=int, default=150)
    p.add_argument("--out", default="benchmarks/results/position_stats.json")
    args = parse_checked(p)
    model = InspectionModel(ModelConfig())
    load_backbone_weights(model.backbone, args.weights)
    model.eval()
    classes = args.classes.split(",") if args.classes else list_classes(args.data)
    grids = [int(g) for g in args.grids.split(",") if g]
    t0 = time.perf_counter()
    log = lambda msg: print(f"{msg} [{time.perf_counter() - t0:.0f} s]", flush=True)  # noqa: E731
    result: dict = {"commit": commit(), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "settings": {k: getattr(args, k) for k in ("images", "grids", "floor", "draws", "test_per_class")},
                    "splits": {n: {"source": list(s), "target": list(t)} for n, (s, t) in SPLITS.items()},
                    "classes": {}}
    out = Path(args.out)
    for cls in classes:
        result["classes"][cls] = measure_class(model, args, cls, grids, log)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))  # partial results as each class ends
    return 0


if __name__ == "__main__":
    sys.exit(main())
