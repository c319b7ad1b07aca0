"""Class-generalizable evaluation: unseen target classes, k random shots, several draws.

For each draw every target class is registered from k random ``train/good`` images (with its
bank-mode statistics), and every test image is routed among all registered classes, as on a
mixed line. Each calibration mode (``cada``, ``bank``, ``none``) and the training-free
nearest-neighbour baseline is scored class-separated (mean over classes) and mixed (all classes
pooled, one threshold). Metrics are averaged over draws (DESIGN section 5).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from inspector.artifact import ModelCard
from inspector.banks.growth import GrowthConfig
from inspector.banks.normal import NormalStats, StreamConfig
from inspector.banks.register import RegisteredFeatures, pick_diverse, raw_scores_against, register_features
from inspector.model import InspectionModel, stack_banks
from inspector.model.bank import ProductBank, build_bank
from inspector.model.calibration import top_fraction_count
from inspector.model.config import CALIBRATION_MODES

from . import line_eval, metrics
from .data import ImageCache, list_samples
from .features import extract_features, select

BASELINE = "baseline"
MODES = (*CALIBRATION_MODES, BASELINE)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings."""

    draws: int = 3
    seed: int = 0
    batch: int = 8
    pixel_metrics: bool = True
    max_fpr: float = 0.3  # AUPRO integration limit (MVTec AD protocol)
    examples_per_class: int = 4  # heatmap overlays per class in the report
    registration_images: int = 50  # good train images each class is registered from (k shots + cross-scored rest)
    test_per_class: int | None = None  # random test images kept per class (None: all)
    stream_frames: int = 200  # simulated stream per class after registering from k shots only (0: none)
    stream_defect_rate: float = 0.05  # share of defective frames in the simulated stream
    # Draws that also simulate the stream with bank growth (inspector.banks.growth; 0: none). Each
    # costs about 4 minutes per split on 2 cores (every rebuild rescores the class's test set),
    # so one keeps the stream part of benchmarks/accuracy.py within its budget.
    stream_growth_draws: int = 1


@dataclass
class TestSet:
    """All target classes' test images, labels, masks and features, in one order."""

    classes: list[str]
    class_of: np.ndarray  # (N,) class index
    labels: np.ndarray  # (N,) 0/1
    masks: np.ndarray  # (N, S, S) bool
    has_mask: np.ndarray  # (N,) bool
    images: np.ndarray  # (N, S, S, 3) uint8
    features: list[torch.Tensor]
    names: list[str]


def load_test_set(
    model: InspectionModel, root: str | Path, classes: Sequence[str], progress: bool,
    per_class: int | None = None, seed: int = 0,
) -> TestSet:
    """Load every target class's test split and extract its backbone features once.

    ``per_class`` keeps at most that many random test images of each class (seeded by ``seed``).
    """
    rng = np.random.default_rng(seed)
    caches = []
    for c in classes:
        samples = list_samples(root, c, "test")
        if per_class is not None:
            keep = rng.choice(len(samples), size=min(per_class, len(samples)), replace=False)
            samples = [samples[i] for i in sorted(keep)]
        caches.append(ImageCache.load(samples, model.input_size))
    images = np.concatenate([c.images for c in caches])
    return TestSet(
        classes=list(classes),
        class_of=np.concatenate([np.full(len(c), i) for i, c in enumerate(caches)]),
        labels=np.concatenate([c.labels for c in caches]),
        masks=np.concatenate([c.masks for c in caches]),
        has_mask=np.concatenate([c.has_mask for c in caches]),
        images=images,
        features=extract_features(model, images, desc="test features", progress=progress),
        names=[f"{s.cls}/{s.defect}/{s.path.name}" for c in caches for s in c.samples],
    )


@dataclass
class DrawClass:
    """One class's registration in a draw: what the stream simulation starts from."""

    registered: RegisteredFeatures
    baseline: ProductBank  # the plain distance's bank: the k most diverse of the registration images
    shot_features: list[torch.Tensor]  # the k shots' features (leave-one-out start of the stream)
    unused: list[Any]  # train/good samples not used for registration (the stream's good frames)


@torch.no_grad()
def register_draw(
    model: InspectionModel, root: str | Path, classes: Sequence[str], rng: np.random.Generator,
    images: int | None = None,
) -> tuple[Any, Any, list[list[str]], list[DrawClass]]:
    """Register every class from ``images`` random train/good images as ``bank add`` does.

    Returns:
        stacked banks (calibrated by cross-scored normal statistics), stacked k-shot banks of the
        plain-distance baseline (the k most diverse of the same images), the bank images' file
        names per class, and per class what the stream simulation needs.
    """
    k = model.cfg.bank.shots
    n_images = max(k, images or k)
    banks, baselines, shot_names, info = [], [], [], []
    for cls in classes:
        pool = list_samples(root, cls, "train")
        chosen = sorted(rng.choice(len(pool), size=min(n_images, len(pool)), replace=False))
        picked = [pool[i] for i in chosen]
        cache = ImageCache.load(picked, model.input_size)
        feats = [f.float() for f in extract_features(model, cache.images, progress=False)]
        reg = register_features(model, cls, feats, model.cfg.bank.images, model.cfg.bank.coreset)
        shots = pick_diverse(feats[-1], k)
        baseline = build_bank([f[shots] for f in feats], model.cfg.bank.coreset)
        banks.append(reg.bank)
        baselines.append(baseline)
        shot_names.append([picked[i].path.name for i in reg.keep])
        used = set(chosen)
        info.append(DrawClass(reg, baseline, [f[shots] for f in feats], [p for i, p in enumerate(pool) if i not in used]))
    return stack_banks(banks), stack_banks(baselines), shot_names, info


@torch.no_grad()
def run_draw(model: InspectionModel, test: TestSet, bank: Any, baseline: Any, batch: int,
             progress: bool) -> dict[str, np.ndarray]:
    """Analyse every test image against the draw's banks, and its plain distance map against the
    baseline's k-shot banks; maps kept as float32 numpy."""
    keys = ("raw", "product", "similarity", "cada_u", "cada_gamma", "bank_u", "bank_gamma")
    out: dict[str, list] = {k: [] for k in (*keys, "nn")}
    n = len(test.labels)
    for start in tqdm(range(0, n, batch), desc="inspect", unit="batch", disable=not progress, leave=False):
        feats = select(test.features, range(start, min(n, start + batch)))
        a = model.analyse(feats, bank)
        for key, value in zip(keys, (a.raw_map[:, 0], a.product, a.route_similarity, *a.cada, *a.bank)):
            out[key].append(value.numpy())
        out["nn"].append(model.analyse(feats, baseline).nn_map[:, 0].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def mode_maps(draw: dict[str, np.ndarray], mode: str) -> np.ndarray:
    """``(N, S, S)`` maps of one mode: calibrated per image, raw, or the baseline's."""
    if mode == BASELINE:
        return draw["nn"]
    if mode == "none":
        return draw["raw"]
    u, gamma = draw[f"{mode}_u"], draw[f"{mode}_gamma"]
    spread = np.maximum(gamma - u, 1e-6)  # the model's floor on (gamma - u)
    return (draw["raw"] - u[:, None, None]) / spread[:, None, None]


def image_scores(maps: np.ndarray, fraction: float) -> np.ndarray:
    """Mean of the top ``fraction`` pixels of each map, as the model scores images."""
    flat = maps.reshape(len(maps), -1)
    k = top_fraction_count(flat.shape[1], fraction)
    return np.sort(np.partition(flat, -k, axis=1)[:, -k:], axis=1).mean(1)


def subset_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None,
    maps: np.ndarray | None,
    threshold: float | None,
    max_fpr: float,
) -> dict[str, float]:
    """Image AUROC/AP, optional pixel AUROC/AP and AUPRO, and rates at a threshold."""
    out = {
        "image_auroc": metrics.roc_auc(labels, scores),
        "image_ap": metrics.average_precision(labels, scores),
    }
    if masks is not None and masks.any():
        out["pixel_auroc"] = metrics.roc_auc(masks, maps)
        out["pixel_ap"] = metrics.average_precision(masks, maps)
        out["aupro"] = metrics.aupro(masks, maps, max_fpr=max_fpr)
    if threshold is not None:
        rates = metrics.rate_at_threshold(labels, scores, threshold)
        out["false_reject_rate"] = rates["false_reject_rate"]
        out["escape_rate"] = rates["escape_rate"]
    return out


def draw_metrics(
    test: TestSet, draw: dict[str, np.ndarray], thresholds: dict[str, float], cfg: EvalConfig, fraction: float
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Per mode: per-class and mixed metrics of one draw, and the image scores."""
    result: dict[str, Any] = {"routing_accuracy": float((draw["product"] == test.class_of).mean())}
    masked = [c for c in range(len(test.classes)) if test.has_mask[test.class_of == c].all()]
    pix_sel = np.isin(test.class_of, masked)
    scores_by_mode = {}
    for mode in MODES:
        maps = mode_maps(draw, mode)
        scores = image_scores(maps, fraction)
        scores_by_mode[mode] = scores
        per_class = {}
        for c, name in enumerate(test.classes):
            sel = test.class_of == c
            pix = cfg.pixel_metrics and c in masked
            per_class[name] = subset_metrics(
                test.labels[sel], scores[sel], test.masks[sel] if pix else None,
                maps[sel] if pix else None, thresholds.get(mode), cfg.max_fpr,
            )
        mixed = subset_metrics(test.labels, scores, None, None, thresholds.get(mode), cfg.max_fpr)
        if cfg.pixel_metrics and pix_sel.any():
            pixel = subset_metrics(test.labels[pix_sel], scores[pix_sel], test.masks[pix_sel], maps[pix_sel], None, cfg.max_fpr)
            mixed.update({k: v for k, v in pixel.items() if k.startswith(("pixel", "aupro"))})
        result[mode] = {"per_class": per_class, "mixed": mixed}
    return result, scores_by_mode


def summarise(draws: Sequence[dict[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    """Mean and standard deviation over draws of every metric; class-separated means added."""
    summary: dict[str, Any] = {"routing_accuracy": _mean_std([d["routing_accuracy"] for d in draws])}
    for mode in MODES:
        per_class = {
            c: _stat_dict([d[mode]["per_class"][c] for d in draws]) for c in classes
        }
        separated = {}
        for key in per_class[classes[0]]:
            vals = [[d[mode]["per_class"][c][key] for c in classes if key in d[mode]["per_class"][c]] for d in draws]
            separated[key] = _mean_std([float(np.mean(v)) for v in vals])
        summary[mode] = {
            "per_class": per_class,
            "class_separated_mean": separated,
            "mixed": _stat_dict([d[mode]["mixed"] for d in draws]),
        }
    return summary


def _stat_dict(records: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = sorted(set().union(*records))
    return {k: _mean_std([r[k] for r in records if k in r]) for k in keys}


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(np.nanmean(arr)), "std": float(np.nanstd(arr)), "n": int(len(arr))}


def evaluate(
    model: InspectionModel,
    card: ModelCard,
    root: str | Path,
    classes: Sequence[str],
    cfg: EvalConfig,
    out_dir: str | Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate on target classes; write ``report.json``, plots and an HTML index to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model.eval()
    test = load_test_set(model, root, classes, progress, per_class=cfg.test_per_class, seed=cfg.seed)
    thresholds = dict(card.training.get("thresholds", {}))
    fraction = model.cfg.score.top_fraction
    shipped = model.cfg.score.calibration
    frr_target = float(card.false_reject_rate) if card.false_reject_rate else 0.01
    per_draw, shots, first, lines = [], [], None, []
    for d in tqdm(range(cfg.draws), desc="shot draws", unit="draw", disable=not progress):
        rng = np.random.default_rng(cfg.seed + d)
        bank, baseline, names, info = register_draw(model, root, classes, rng, cfg.registration_images)
        draw = run_draw(model, test, bank, baseline, cfg.batch, progress)
        record, scores = draw_metrics(test, draw, thresholds, cfg, fraction)
        per_draw.append(record)
        shots.append(dict(zip(classes, names)))
        if shipped in thresholds:
            lines.append(draw_line(model, test, draw, scores[shipped], info, thresholds[shipped], frr_target, cfg, rng,
                                   grow=d < cfg.stream_growth_draws))
        if first is None:
            first = (draw, scores)
    report = {
        "model_id": card.model_id,
        "target_classes": list(classes),
        "source_classes": card.training.get("source_classes"),
        "shots": model.cfg.bank.shots,
        "bank_images": model.cfg.bank.images,
        "coreset": model.cfg.bank.coreset,
        "config": asdict(cfg),
        "thresholds": thresholds,
        "counts": {c: {"normal": int(((test.class_of == i) & (test.labels == 0)).sum()),
                       "anomalous": int(((test.class_of == i) & (test.labels == 1)).sum())}
                   for i, c in enumerate(classes)},
        "summary": summarise(per_draw, classes),
        "draws": per_draw,
        "shot_files": shots,
        "line": summarise_line(lines, classes, shipped, thresholds.get(shipped), frr_target, cfg) if lines else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out_dir / "report.json", report)
    write_plots(out_dir, test, first[0], first[1], thresholds, model.cfg.score.calibration, cfg, report["line"])
    return report


def draw_line(model: InspectionModel, test: TestSet, draw: dict[str, np.ndarray], scores: np.ndarray,
              info: Sequence[DrawClass], threshold: float, frr_target: float, cfg: EvalConfig,
              rng: np.random.Generator, grow: bool = False) -> dict[str, Any]:
    """One draw's line rates at the shipped threshold, and each class's simulated stream (with
    ``grow``, also the same stream with bank growth)."""
    out: dict[str, Any] = {"classes": line_eval.line_rates(test.class_of, test.labels, scores, test.classes,
                                                           threshold, frr_target), "stream": {}}
    if not cfg.stream_frames:
        return out
    if any(not ci.unused for ci in info):  # every good image went into registration: nothing left to stream
        return out
    for c, (name, ci) in enumerate(zip(test.classes, info)):
        sel = test.class_of == c
        start = NormalStats.from_registration(name, model.leave_one_out_scores(ci.shot_features).tolist(),
                                              ci.registered.normal.method)
        good = ci.unused[: cfg.stream_frames]
        cache = ImageCache.load(good, model.input_size)
        feats = extract_features(model, cache.images, progress=False)
        good_raw = raw_scores_against(model, feats, ci.baseline)  # the stream starts from the k shots' bank
        raw = raw_scores_against(model, test.features, ci.baseline, np.flatnonzero(sel))
        defect_raw = raw[test.labels[sel] == 1]
        order = line_eval.stream_order(len(good_raw), len(defect_raw), cfg.stream_frames, cfg.stream_defect_rate, rng)
        plan = line_eval.plan_of(order, good_raw, defect_raw)
        labels = test.labels[sel]
        keep = np.ones(len(labels), dtype=bool)  # after the stream: every good test image, the unseen defects
        keep[np.flatnonzero(labels == 1)] = line_eval.held_out(order, len(defect_raw))
        if not (labels[keep] == 1).any():
            raise ValueError(f"{name}: the stream showed every one of its {len(defect_raw)} test defects, "
                             "none is left to measure escapes on; lower --stream-frames or the defect rate")
        out["stream"][name] = line_eval.simulate_stream(start, plan, threshold, StreamConfig(), labels[keep], raw[keep])
        out["stream"][name]["start_count"] = start.count
        out["stream"][name]["test_defects"] = int((labels[keep] == 1).sum())
        if grow:
            rows = np.flatnonzero(sel)
            out.setdefault("growth", {})[name] = line_eval.simulate_growing_stream(
                model, start, ci.baseline, len(ci.shot_features[0]), order, [f.float() for f in feats],
                [f[rows[labels == 1]].float() for f in test.features], threshold, StreamConfig(),
                GrowthConfig(max_images=model.cfg.bank.images), [f[rows[keep]].float() for f in test.features],
                labels[keep], model.cfg.bank.coreset, frr_target)
            del out["growth"][name]["bank"]  # the report keeps numbers only
    return out


def summarise_line(lines: Sequence[dict[str, Any]], classes: Sequence[str], mode: str, threshold: float,
                   frr_target: float, cfg: EvalConfig) -> dict[str, Any]:
    """Means over draws of the line rates and the stream results; the first draw's traces."""
    keys = ("frr", "escape", "oracle_escape", "target_oracle_escape", "loco_frr")
    per_class = {c: {k: _mean_std([d["classes"][c][k] for d in lines])["mean"]
                     for k in keys if all(k in d["classes"][c] for d in lines)} for c in classes}
    out = {"mode": mode, "threshold": threshold, "frr_target": frr_target,
           "registration_images": cfg.registration_images, "draws": len(lines), "classes": per_class}
    if cfg.stream_frames and lines[0]["stream"]:
        out["stream"] = {
            "frames": cfg.stream_frames, "defect_rate": cfg.stream_defect_rate,
            "start_images": int(lines[0]["stream"][classes[0]]["start_count"]),
            "classes": {c: {k: _mean_std([d["stream"][c][k] for d in lines])["mean"]
                            for k in ("frr", "escape", "stream_frr", "test_defects")} for c in classes},
            "traces": {c: lines[0]["stream"][c]["trace"] for c in classes},
        }
        grown = [d for d in lines if "growth" in d]
        if grown:
            out["stream_growth"] = {
                "frames": cfg.stream_frames, "defect_rate": cfg.stream_defect_rate,
                "start_images": out["stream"]["start_images"], "draws": len(grown),
                "classes": {c: {k: _mean_std([d["growth"][c][k] for d in grown])["mean"]
                                for k in ("frr", "escape", "stream_frr", "bank_images", "oracle_escape",
                                          "target_oracle_escape") if all(k in d["growth"][c] for d in grown)}
                            for c in classes},
                # the stream without growth over the same draws, for a like-for-like comparison
                "without": {c: {k: _mean_std([d["stream"][c][k] for d in grown])["mean"] for k in ("frr", "escape")}
                            for c in classes},
                "traces": {c: grown[0]["growth"][c]["trace"] for c in classes},
                "growths": {c: grown[0]["growth"][c]["growths"] for c in classes},
            }
    return out


def write_json(path: Path, data: Any) -> None:
    """Write JSON with NaN written as null, so strict parsers accept it."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not np.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(data), indent=2))


def write_plots(
    out_dir: Path, test: TestSet, draw: dict[str, np.ndarray], scores: dict[str, np.ndarray],
    thresholds: dict[str, float], shipped_mode: str, cfg: EvalConfig, line: dict[str, Any] | None = None,
) -> None:
    """Score distributions before/after calibration, ROC curves, heatmap overlays, stream traces, an index page."""
    from . import report as plots

    stream = []
    if line and "stream" in line:
        plots.plot_stream_traces(line["stream"]["traces"], out_dir / "stream.png", line["frr_target"],
                                 title=f"After registering from {line['stream']['start_images']} good images: "
                                       "rates at the shipped threshold as the stream refines the statistics (draw 0)")
        stream = [("Self-calibration", [("stream.png", "false-reject and escape rate against stream length")])]

    classes = np.asarray(test.classes)[test.class_of]
    plots.plot_score_distributions(
        scores, test.labels, classes, out_dir / "scores.png", threshold_by_mode=thresholds,
        title="Image scores per class (draw 0): raw ('none') and calibrated",
    )
    curves = {}
    for mode, s in scores.items():
        fpr, tpr = roc_points(test.labels, s)
        curves[mode] = (fpr, tpr, metrics.roc_auc(test.labels, s))
    plots.plot_roc_curves(curves, out_dir / "roc_mixed.png", title="Mixed (all target classes, one threshold)")
    pick = example_indices(test, scores[shipped_mode], cfg.examples_per_class)
    maps = mode_maps(draw, shipped_mode)[pick]
    titles = [
        f"{test.names[i]} {scores[shipped_mode][i]:.2f} "
        f"{'FAIL' if scores[shipped_mode][i] > thresholds.get(shipped_mode, np.inf) else 'pass'}"
        for i in pick
    ]
    plots.plot_heatmap_grid(test.images[pick], maps, out_dir / "heatmaps.png", masks=test.masks[pick], titles=titles)
    plots.write_html_index(out_dir / "index.html", "Evaluation report", [
        ("Scores", [("scores.png", "image scores per class and mode, draw 0"), ("roc_mixed.png", "mixed ROC")]),
        ("Heatmaps", [("heatmaps.png", f"calibrated maps ({shipped_mode}), draw 0")]),
        *stream,
    ])


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve points (for plotting only)."""
    order = np.argsort(-scores, kind="stable")
    pos = labels[order] == 1
    tpr = np.concatenate([[0.0], np.cumsum(pos) / max(1, pos.sum())])
    fpr = np.concatenate([[0.0], np.cumsum(~pos) / max(1, (~pos).sum())])
    return fpr, tpr


def example_indices(test: TestSet, scores: np.ndarray, per_class: int) -> np.ndarray:
    """Per class: the highest-scoring anomalies and normals, half each."""
    picks = []
    for c in range(len(test.classes)):
        for label in (1, 0):
            idx = np.flatnonzero((test.class_of == c) & (test.labels == label))
            picks.extend(idx[np.argsort(-scores[idx])][: max(1, per_class // 2)])
    return np.asarray(picks)
