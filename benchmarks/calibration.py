"""Which normal statistic puts products on one scale: the normalisations compared on real data.

Training-free (the served distance map), all five industrial classes treated as unseen. Per class
and draw: k random good shots form the bank; up to ``--max-images`` further good images are scored
against it (the product's cross-scored normal sample); a test sample is scored against it. For
each normalisation (``inspector.banks.normal.METHODS``) and number N of good images, each class's
scores are put on the common scale with ``scale_of`` and the script reports:

* per-class: mean over classes of each class's image AUROC (no normalisation changes it);
* mixed: image AUROC of all classes' test images pooled under one threshold; gap = mixed - per-class;
* LOCO FRR: a threshold at ``--frr`` false rejects on the *other* classes' normal samples (on the
  common scale), applied to this class's good test images (does a line threshold hold for a
  product that had no say in it?), and its escape rate next to the *target oracle* (the class's
  own threshold at the target rate): a scale can meet the FRR target by landing the threshold
  above a product's whole good distribution, which the escape excess shows;
* the same with ``--defect-rate`` of the class's defective test images mixed into its normal
  sample (a stream's statistics see a few defects).

N = k means leave-one-out scores of the shots; ``quantile90`` is the quantile method anchored
at the 90th percentile instead of ``QUANTILE_HIGH``. Raw scores are cached per draw (``--cache``), so a
rerun that only changes the normalisations takes seconds. Writes ``benchmarks/results/calibration.json``
and ``.md``::

    python benchmarks/calibration.py            # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from trainer.benchmark import commit, inputs_present, machine

from inspector.banks.normal import METHODS, QUANTILE_HIGH, calibrated, scale_of
from inspector.model import InspectionModel, ModelConfig, build_bank, load_backbone_weights
from trainer import metrics
from trainer.data import ImageCache, list_samples
from trainer.features import extract_features
from inspector.banks.register import raw_scores_against

CLASSES = ("ball_screw", "commutator", "magnetic_tile", "pcb", "solar_cell")


def class_scores(model: InspectionModel, root: str, cls: str, args: argparse.Namespace,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Raw scores of one class: leave-one-out shots, the normal sample and the test sample."""
    k = model.cfg.bank.shots
    pool = list_samples(root, cls, "train")
    picked = rng.choice(len(pool), size=min(len(pool), k + args.max_images), replace=False)
    train = ImageCache.load([pool[i] for i in picked], model.input_size)
    feats = [f.float() for f in extract_features(model, train.images, progress=False)]
    shots = [f[:k] for f in feats]
    bank = build_bank(shots, model.cfg.bank.coreset)
    tests = list_samples(root, cls, "test")
    keep = rng.choice(len(tests), size=min(len(tests), args.test_per_class), replace=False)
    test = ImageCache.load([tests[i] for i in sorted(keep)], model.input_size)
    test_feats = extract_features(model, test.images, progress=False)
    return {
        "loo": model.leave_one_out_scores(shots).numpy(),
        "normal": raw_scores_against(model, [f[k:] for f in feats], bank),
        "test": raw_scores_against(model, test_feats, bank),
        "labels": test.labels,
    }


def evaluate(scores: dict[str, dict[str, np.ndarray]], method: str | None, n: int | str,
             frr: float, defect_rate: float, rng: np.random.Generator,
             quantile_high: float = QUANTILE_HIGH) -> dict[str, float]:
    """Per-class and mixed AUROC, and LOCO false-reject and escape rates, for one normalisation
    and normal-sample size.

    LOCO: each class in turn is the unseen product; the line threshold is set at ``frr`` on the
    other classes' normal samples (on the common scale) and applied to its test images. Its
    escape rate is compared with the *target oracle*: the class's own threshold at ``frr`` on its
    good test images (what a perfectly calibrated threshold at the target rate would catch).
    """
    calibrated_test, calibrated_normal, labels, aurocs = [], [], [], []
    for s in scores.values():
        normal = s["loo"] if n == "loo" else s["normal"][:n]
        if defect_rate:
            defects = s["test"][s["labels"] == 1]
            normal = np.concatenate([normal, rng.choice(defects, size=int(round(len(normal) * defect_rate)))])
        u, gamma = scale_of(normal, method, quantile_high) if method else (0.0, 1.0)
        calibrated_test.append(calibrated(s["test"], u, gamma))
        calibrated_normal.append(calibrated(normal, u, gamma))
        labels.append(s["labels"])
        aurocs.append(metrics.roc_auc(s["labels"], s["test"]))
    loco, escape, oracle = [], [], []
    for i in range(len(scores)):
        others = np.concatenate([c for j, c in enumerate(calibrated_normal) if j != i])
        t = metrics.threshold_at_false_reject_rate(others, frr)
        good, bad = calibrated_test[i][labels[i] == 0], calibrated_test[i][labels[i] == 1]
        loco.append(float((good > t).mean()))
        escape.append(float((bad <= t).mean()))
        own = metrics.threshold_at_false_reject_rate(good, frr)
        oracle.append(float((bad <= own).mean()))
    excess = np.asarray(escape) - np.asarray(oracle)
    held = held_out_threshold(scores, method, n, frr, quantile_high) if not defect_rate else {}
    mixed = metrics.roc_auc(np.concatenate(labels), np.concatenate(calibrated_test))
    return {"per_class": float(np.mean(aurocs)), "mixed": mixed, "gap": mixed - float(np.mean(aurocs)),
            "loco_frr": float(np.mean(loco)), "loco_frr_max": float(np.max(loco)),
            "escape": float(np.mean(escape)), "target_oracle_escape": float(np.mean(oracle)),
            "excess_escape": float(excess.mean()), "excess_escape_max": float(excess.max()),
            "per_class_frr": dict(zip(scores, loco)), "per_class_excess": dict(zip(scores, excess.tolist())),
            **held}


HELD_OUT = slice(50, 100)  # good images never in a normal sample of at most 50: where the threshold is placed


def held_out_threshold(scores: dict[str, dict[str, np.ndarray]], method: str | None, n: int | str, frr: float,
                       quantile_high: float) -> dict[str, float]:
    """LOCO as the trainer places the line threshold: on the other classes' *held-out* good images
    (``HELD_OUT``, never in a normal sample), each calibrated by its class's statistics of its
    first ``n`` images. A scale whose upper anchor misplaces the tail shows here: in-sample
    scores of the normal sample itself sit below the anchor by construction."""
    if n == "loo" or n > HELD_OUT.start or any(len(s["normal"]) < HELD_OUT.stop for s in scores.values()):
        return {}
    cal = {}
    for c, s in scores.items():
        u, gamma = scale_of(s["normal"][:n], method, quantile_high) if method else (0.0, 1.0)
        cal[c] = (calibrated(s["normal"][HELD_OUT], u, gamma), calibrated(s["test"], u, gamma), s["labels"])
    frrs, excess = [], []
    for c in scores:
        t = metrics.threshold_at_false_reject_rate(np.concatenate([cal[o][0] for o in scores if o != c]), frr)
        _, test, lab = cal[c]
        good, bad = test[lab == 0], test[lab == 1]
        own = metrics.threshold_at_false_reject_rate(good, frr)
        frrs.append(float((good > t).mean()))
        excess.append(float((bad <= t).mean() - (bad <= own).mean()))
    return {"held_frr": float(np.mean(frrs)), "held_frr_max": float(np.max(frrs)),
            "held_excess": float(np.mean(excess)), "held_excess_max": float(np.max(excess))}


def draw_scores(model: InspectionModel, args: argparse.Namespace, d: int, t0: float) -> dict[str, dict[str, np.ndarray]]:
    """Raw scores of every class for draw ``d``, from ``--cache`` when computed before with the
    same settings (the features are the expensive part; every variant reuses them)."""
    key = f"d{d}-n{args.max_images}-t{args.test_per_class}"
    path = Path(args.cache) / f"calibration-scores-{key}.npz" if args.cache else None
    if path is not None and path.is_file():
        flat = np.load(path)
        return {c: {f: flat[f"{c}/{f}"] for f in ("loo", "normal", "test", "labels")} for c in CLASSES}
    rng = np.random.default_rng(d)
    scores = {}
    for c in CLASSES:
        scores[c] = class_scores(model, args.data, c, args, rng)
        print(f"[calibration] draw {d}: scored {c} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{f"{c}/{f}": np.asarray(v) for c, s in scores.items() for f, v in s.items()})
    return scores


def markdown(result: dict, table: dict, held_rows: dict, args) -> list[str]:
    """The comparison as Markdown lines (written beside the JSON)."""
    lines = [f"# Normal statistics compared (training-free distance, {len(CLASSES)} classes, "
             f"{args.draws} draws, {args.test_per_class} test images per class, LOCO FRR target {args.frr:.0%})",
             "", f"commit {result['commit']}, {result['machine']['cpu']}, {result['date']}", "",
             "LOCO: each class in turn unseen, the line threshold at the target on the other classes' normal",
             "samples. Escape excess: the class's escape rate at that threshold minus its escape at its own",
             "threshold at the target rate (the target oracle); mean over classes and the worst class.", "",
             "| normalisation (N good images) | per-class | mixed | gap (pts) | LOCO FRR mean | LOCO FRR worst class "
             "| escape | target-oracle escape | escape excess mean | escape excess worst |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        lines.append(f"| {name} | {r['per_class']:.3f} | {r['mixed']:.3f} | {100 * r['gap']:+.1f} | "
                     f"{100 * r['loco_frr']:.1f}% | {100 * r['loco_frr_max']:.1f}% | {100 * r['escape']:.1f}% | "
                     f"{100 * r['target_oracle_escape']:.1f}% | {100 * r['excess_escape']:+.1f} | "
                     f"{100 * r['excess_escape_max']:+.1f} |")
    lines += ["", "## The line threshold placed on held-out good images (as `inspector train` places it)", "",
              f"Each class's statistics from its first N good images; the threshold at {args.frr:.0%} false rejects on "
              f"the other classes' good images {HELD_OUT.start}-{HELD_OUT.stop - 1} (never in a normal sample), "
              "calibrated by their own class's statistics; applied to this class's test images.", "",
              "| normalisation (N good images) | FRR mean | FRR worst class | escape excess mean | escape excess worst |",
              "|---|---|---|---|---|"]
    for name, r in held_rows.items():
        lines.append(f"| {name} | {100 * r['held_frr']:.1f}% | {100 * r['held_frr_max']:.1f}% | "
                     f"{100 * r['held_excess']:+.1f} | {100 * r['held_excess_max']:+.1f} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/industrial")
    p.add_argument("--weights", default="../shared/weights/resnet18-imagenet1k-l1-l3.safetensors")
    p.add_argument("--out", default="benchmarks/results/calibration")
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--max-images", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--sizes", default="16,30,46,50,100")
    p.add_argument("--frr", type=float, default=0.01)
    p.add_argument("--defect-rate", type=float, default=0.05)
    p.add_argument("--cache", default="runs/calibration", help="raw scores per draw, reused by later runs ('' = none)")
    args = p.parse_args()
    if not inputs_present(args.data, args.weights):
        return 2
    model = InspectionModel(ModelConfig()).eval()
    load_backbone_weights(model.backbone, args.weights)
    sizes = [int(x) for x in args.sizes.split(",")]
    rows: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    for d in range(args.draws):
        scores = draw_scores(model, args, d, t0)
        q = [("quantile", QUANTILE_HIGH), ("quantile90", 0.90)]
        named = [(m, m, QUANTILE_HIGH) for m in METHODS if m != "quantile"] + [(name, "quantile", h) for name, h in q]
        variants = [("none", None, "loo", 0.0, QUANTILE_HIGH)]
        variants += [(f"{label} (k={model.cfg.bank.shots} leave-one-out)", m, "loo", 0.0, h) for label, m, h in named]
        variants += [(f"{label} ({n})", m, n, 0.0, h) for n in sizes for label, m, h in named]
        variants += [(f"{label} ({sizes[-1]}, +{args.defect_rate:.0%} defects)", m, sizes[-1], args.defect_rate, h)
                     for label, m, h in named]
        for name, method, n, rate, high in variants:
            rows.setdefault(name, []).append(evaluate(scores, method, n, args.frr, rate, np.random.default_rng(d), high))
    table = {name: {k: float(np.mean([r[k] for r in rs])) for k in rs[0] if not k.startswith("per_class_")}
             for name, rs in rows.items()}
    held_rows = {name: r for name, r in table.items() if "held_frr" in r}
    for name, rs in rows.items():
        for k in ("per_class_frr", "per_class_excess"):
            table[name][k] = {c: float(np.mean([r[k][c] for r in rs])) for c in CLASSES}
    result = {"commit": commit(), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "settings": {k: v for k, v in vars(args).items()}, "classes": CLASSES, "table": table,
              "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = markdown(result, table, held_rows, args)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
