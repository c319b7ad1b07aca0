"""Which rule places the line threshold: a study on raw scores computed once per class and draw.

Every class of the industrial set is registered, per draw, from ``--registration-images`` random
``train/good`` images exactly as ``inspector bank add`` does (``register_features``: the bank,
cross-scored normal statistics); then ``--holdout`` further ``train/good`` images and up to
``--test-per-class`` test images are scored against the bank. The raw scores are cached
(``--cache``), so every normalisation and threshold rule below is evaluated on the same numbers.

For each split of the accuracy benchmark the threshold is placed from the split's *source*
classes only, by each rule:

* ``pooled``: the target false-reject quantile of all source classes' held-out good scores
  pooled (what ``inspector train`` did: the class with the heaviest tail sets it);
* ``class_median`` / ``class_mean``: the median / mean over source classes of each class's own
  target quantile (one heavy-tailed source class does not set the line);
* ``unit``: 1.0 on the calibrated scale, no source data (with ``median_max``: a part fails when
  it scores above the highest of the product's own registration images);

each from the source classes' held-out ``train/good`` images (``train``: the registration
distribution) or their ``test/good`` images (``test``: what a registered product meets in
production). The target classes' rates at that threshold are the accuracy benchmark's bar; the
leave-one-source-class-out (LOCO) numbers use source classes only (threshold from the other
sources, rates on the left-out one's test images) and are what ``inspector train`` may choose by.

    python benchmarks/threshold_rules.py                      # about 10 min on 2 cores
    python benchmarks/threshold_rules.py --cache runs/threshold_scores.json   # rules only, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from inspector.banks.normal import METHODS, calibrated, scale_of
from inspector.banks.register import raw_scores_against, register_features
from inspector.model import InspectionModel, ModelConfig, load_backbone_weights
from trainer import metrics
from trainer.calibrate import place_threshold
from trainer.data import ImageCache, list_classes, list_samples
from trainer.features import extract_features
from trainer.features import select as select_rows

from trainer.benchmark import SPLITS, commit, machine, parse_checked

RULES = ("pooled", "class_median", "class_mean", "unit")
HOLDOUTS = ("train", "test")


def class_scores(model: InspectionModel, args, cls: str, t_start: float) -> dict:
    """Per draw: registration scores, held-out train/good raw scores, test raw scores and labels."""
    rng = np.random.default_rng(0)
    train = list_samples(args.data, cls, "train")
    test = list_samples(args.data, cls, "test")
    keep = sorted(rng.choice(len(test), size=min(args.test_per_class, len(test)), replace=False))
    test_cache = ImageCache.load([test[i] for i in keep], model.input_size)
    orders = [rng.permutation(len(train))[: args.registration_images + args.holdout] for _ in range(args.draws)]
    used = sorted(set(np.concatenate(orders).tolist()))  # only the train images some draw uses are read
    row_of = {i: r for r, i in enumerate(used)}
    train_cache = ImageCache.load([train[i] for i in used], model.input_size)
    test_feats = [f.float() for f in extract_features(model, test_cache.images, progress=False)]
    train_feats = [f.float() for f in extract_features(model, train_cache.images, progress=False)]
    draws = []
    for draw, order in enumerate(orders):
        order = np.asarray([row_of[int(i)] for i in order])
        reg, held = order[: args.registration_images], order[args.registration_images :]
        r = register_features(model, cls, select_rows(train_feats, np.sort(reg)), model.cfg.bank.images,
                              model.cfg.bank.coreset, seed=draw)
        draws.append({
            "registration": [round(float(x), 6) for x in r.normal.registration],
            "holdout": [round(float(x), 6) for x in raw_scores_against(model, train_feats, r.bank, held.tolist())],
            "test": [round(float(x), 6) for x in raw_scores_against(model, test_feats, r.bank)],
        })
        print(f"{cls} draw {draw}: {len(reg)} registered, {len(held)} held out, {len(keep)} test "
              f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
    return {"labels": test_cache.labels.tolist(), "draws": draws}


def calibrate_draw(d: dict, labels: np.ndarray, method: str) -> dict[str, np.ndarray]:
    u, gamma = scale_of(d["registration"], method)
    test = calibrated(np.asarray(d["test"]), u, gamma)
    return {"train": calibrated(np.asarray(d["holdout"]), u, gamma), "test": test[labels == 0],
            "test_all": test}


def place(rule: str, per_class_good: list[np.ndarray], rate: float) -> float:
    """The trainer's ``place_threshold`` on per-class arrays, plus ``unit`` (1.0, no source data)."""
    if rule == "unit":
        return 1.0
    class_of = np.concatenate([np.full(len(g), i) for i, g in enumerate(per_class_good)])
    return place_threshold(np.concatenate(per_class_good), class_of, rate, rule)


def rates_at(classes: list[str], cal: dict, labels: dict, threshold: float, rate: float) -> dict:
    """Per class, means over draws: frr, escape, target_oracle_escape and their gap."""
    out = {}
    for c in classes:
        rows = []
        for d in cal[c]:
            r = metrics.rate_at_threshold(labels[c], d["test_all"], threshold)
            good = d["test_all"][labels[c] == 0]
            own = metrics.rate_at_threshold(labels[c], d["test_all"], metrics.threshold_at_false_reject_rate(good, rate))
            rows.append((r["false_reject_rate"], r["escape_rate"], own["escape_rate"]))
        frr, esc, own = (float(np.mean(x)) for x in zip(*rows))
        out[c] = {"frr": round(frr, 4), "escape": round(esc, 4), "target_oracle_escape": round(own, 4),
                  "gap": round(esc - own, 4)}
    return out


def bar(per_class: dict) -> dict:
    """The accuracy bar: mean FRR <= 2%, every FRR <= 3%, mean escape gap <= 10 points."""
    frr = [v["frr"] for v in per_class.values()]
    gap = float(np.mean([v["gap"] for v in per_class.values()]))
    return {"mean_frr": round(float(np.mean(frr)), 4), "max_frr": round(float(max(frr)), 4), "mean_gap": round(gap, 4),
            "met": bool(np.mean(frr) <= 0.02 and max(frr) <= 0.03 and gap <= 0.10)}


def evaluate(scores: dict, rate: float) -> dict:
    labels = {c: np.asarray(v["labels"]) for c, v in scores.items()}
    out: dict = {}
    for method in METHODS:
        cal = {c: [calibrate_draw(d, labels[c], method) for d in v["draws"]] for c, v in scores.items()}
        for split, (source, target) in SPLITS.items():
            if not all(c in cal for c in (*source, *target)):
                continue
            for holdout in HOLDOUTS:
                for rule in RULES:
                    if rule == "unit" and holdout == "test":
                        continue
                    good = [np.concatenate([d[holdout] for d in cal[c]]) for c in source]
                    t = place(rule, good, rate)
                    targets = rates_at(list(target), cal, labels, t, rate)
                    loco = {}
                    for i, left in enumerate(source):
                        t_loco = place(rule, [g for j, g in enumerate(good) if j != i], rate)
                        loco.update(rates_at([left], cal, labels, t_loco, rate))
                    key = f"{method}/{holdout}/{rule}" if rule != "unit" else f"{method}/-/unit"
                    out.setdefault(split, {})[key] = {"threshold": round(t, 4), "targets": targets,
                                                      "bar": bar(targets), "loco": loco, "loco_bar": bar(loco)}
        names = list(cal)
        for holdout in HOLDOUTS:
            for rule in RULES:
                if rule == "unit":
                    continue
                per, thr = {}, []
                for c in names:  # each class unseen in turn: the threshold from all the others
                    good = [np.concatenate([d[holdout] for d in cal[o]]) for o in names if o != c]
                    thr.append(place(rule, good, rate))
                    per.update(rates_at([c], cal, labels, thr[-1], rate))
                out.setdefault("each_unseen", {})[f"{method}/{holdout}/{rule}"] = {
                    "thresholds": [round(t, 4) for t in thr], "threshold_range": round(max(thr) - min(thr), 4),
                    "classes": per, "bar": bar(per)}
    return out


def scale_spread(scores: dict) -> dict[str, dict[str, float]]:
    """Per normalisation and class: how much the product's upper anchor ``gamma`` moved between
    registration draws (standard deviation over mean): the noise a registration adds to its scale."""
    out: dict[str, dict[str, float]] = {}
    for method in METHODS:
        for c, v in scores.items():
            g = np.asarray([scale_of(d["registration"], method)[1] for d in v["draws"]])
            out.setdefault(method, {})[c] = round(float(g.std() / g.mean()), 4)
    return out


def table(result: dict) -> str:
    cv = result.get("gamma_cv", {})
    classes = sorted(next(iter(cv.values()), {}))
    lines = ["gamma's spread between registration draws (standard deviation / mean), per class"]
    lines.append(f"{'normalisation':14s} " + " ".join(f"{c[:13]:>13s}" for c in classes))
    for method, per in cv.items():
        lines.append(f"{method:14s} " + " ".join(f"{per[c]:13.3f}" for c in classes))
    lines += ["", "each class unseen in turn, the threshold from the other four "
             "(range: how far the line threshold moved between those source sets)",
             f"{'normalisation/holdout/rule':34s} {'range':>6s} {'FRR':>6s} {'maxFRR':>6s} {'gap':>6s} {'maxgap':>6s} bar"]
    for key, r in result["splits"].get("each_unseen", {}).items():
        b = r["bar"]
        worst = max(v["gap"] for v in r["classes"].values())
        lines.append(f"{key:34s} {r['threshold_range']:6.3f} {b['mean_frr']:6.3f} {b['max_frr']:6.3f} "
                     f"{b['mean_gap']:6.3f} {worst:6.3f} {'yes' if b['met'] else 'no'}")
    lines.append("")
    for split, rows in result["splits"].items():
        if split not in SPLITS:
            continue
        source, target = SPLITS[split]
        lines.append(f"split {split}: threshold from {', '.join(source)}; targets {', '.join(target)}")
        lines.append(f"{'normalisation/holdout/rule':34s} {'thr':>6s} {'FRR':>6s} {'maxFRR':>6s} {'gap':>6s} bar "
                     f"| LOCO {'FRR':>6s} {'maxFRR':>6s} {'gap':>6s} bar")
        for key, r in rows.items():
            b, lb = r["bar"], r["loco_bar"]
            lines.append(f"{key:34s} {r['threshold']:6.3f} {b['mean_frr']:6.3f} {b['max_frr']:6.3f} {b['mean_gap']:6.3f} "
                         f"{'yes' if b['met'] else 'no ':3s} |      {lb['mean_frr']:6.3f} {lb['max_frr']:6.3f} "
                         f"{lb['mean_gap']:6.3f} {'yes' if lb['met'] else 'no'}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/industrial")
    p.add_argument("--weights", default="../shared/weights/resnet18-imagenet1k-l1-l3.safetensors")
    p.add_argument("--classes", default="", help="comma-separated (default: all)")
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--registration-images", type=int, default=50)
    p.add_argument("--holdout", type=int, default=60, help="held-out train/good images scored per draw")
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--frr-target", type=float, default=0.01)
    p.add_argument("--cache", default="runs/threshold_scores.json", help="raw scores: reused when present")
    p.add_argument("--out", default="benchmarks/results/threshold_rules.json")
    args = parse_checked(p)
    cache = Path(args.cache)
    t_start = time.perf_counter()
    if cache.exists():
        cached = json.loads(cache.read_text())
        print(f"raw scores from {cache} (commit {cached['commit']})")
    else:
        model = InspectionModel(ModelConfig())
        load_backbone_weights(model.backbone, args.weights)
        model.eval()
        classes = args.classes.split(",") if args.classes else list_classes(args.data)
        cached = {"commit": commit(), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "settings": {k: getattr(args, k) for k in ("draws", "registration_images", "holdout", "test_per_class")}
                  | {"coreset": list(ModelConfig().bank.coreset), "input_size": ModelConfig().backbone.input_size},
                  "classes": {}}
        for cls in classes:
            cached["classes"][cls] = class_scores(model, args, cls, t_start)
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(cached))
        cached["seconds"] = round(time.perf_counter() - t_start, 1)
        cache.write_text(json.dumps(cached))
    result = {k: cached[k] for k in ("commit", "machine", "date", "settings")} | {
        "scores_seconds": cached.get("seconds"), "frr_target": args.frr_target,
        "splits": evaluate(cached["classes"], args.frr_target), "gamma_cv": scale_spread(cached["classes"])}
    text = table(result)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    st = result["settings"]
    out.with_suffix(".md").write_text(
        "# Line threshold rules and normalisations (training-free distance, raw scores computed once)\n\n"
        f"commit {result['commit']}, {result['machine']['cpu']} ({result['machine']['threads']} threads), {result['date']}; {st['draws']} draws, "
        f"{st['registration_images']} registration images, {st['holdout']} held-out train/good and up to "
        f"{st['test_per_class']} test images per class and draw, coreset {st['coreset']}, "
        f"{st['input_size']} px; scores {result['scores_seconds']} s. FRR target {args.frr_target:.0%}; gap: escape "
        "rate minus the class's own threshold's at the target rate; bar: mean FRR <= 2%, every FRR <= 3%, "
        "mean gap <= 10 points. LOCO: source classes only.\n\n"
        f"```\n{text}\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
