"""Accuracy on real data: fit on source classes, evaluate on unseen target classes.

Runs the two class-generalisation splits of the industrial set (or the ones given), each with
``inspector train`` then ``inspector eval`` semantics, and writes per split the artifact's card,
the evaluation report and plots, and a summary (JSON and Markdown) naming the machine and commit.

    python benchmarks/accuracy.py --data ../shared/data/industrial \
        --weights ../shared/weights/resnet18-imagenet1k-l1-l3.safetensors --out benchmarks/results/accuracy
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


from inspector.artifact import load_artifact
from inspector.banks.normal import METHODS
from inspector.cli.bank import coreset_arg
from inspector.cli.train import format_summary
from inspector.model import ModelConfig, ScoreConfig
from inspector.model.bank import describe_coreset
from inspector.model.config import CALIBRATION_MODES, CONSTRAINTORS, SCORINGS
from trainer.calibrate import THRESHOLD_RULES, CalibrationConfig
from trainer.evaluate import EvalConfig, evaluate
from trainer.fit import FitConfig
from trainer.benchmark import SPLITS, commit, machine, parse_checked
from trainer.train import TrainConfig, parse_views, train

def model_config(args: argparse.Namespace) -> ModelConfig:
    """The default model with the benchmark's flow and scoring flags applied."""
    base = ModelConfig()
    flow = dataclasses.replace(base.flow, constraintor=args.constraintor, position=not args.no_position)
    scoring = base.score.scoring if args.scoring == "select" else args.scoring
    score = dataclasses.replace(base.score, scoring=scoring, calibration=args.calibration,
                                normalisation=args.normalisation)
    bank = dataclasses.replace(base.bank, coreset=args.coreset or None, images=args.bank_images)
    return dataclasses.replace(base, flow=flow, score=score, bank=bank)


def run_split(name: str, args: argparse.Namespace) -> dict[str, object]:
    source, target = SPLITS[name]
    out = Path(args.out) / f"split{name}"
    cfg = TrainConfig(
        data=args.data, classes=source, weights=args.weights, images_per_class=args.images_per_class,
        synthetic_sources=tuple(n for n in args.synthetic_sources.split(",") if n),
        source_views=parse_views(args.source_views),
        select_scoring=args.scoring == "select",
        fit=FitConfig(steps=args.steps),
        calibration=CalibrationConfig(registration_images=args.registration_images, threshold_rule=args.threshold_rule),
    )
    t0 = time.perf_counter()
    artifact = Path(args.runs) / f"split{name}" / "model"
    reused = args.reuse_model and (artifact / "card.json").is_file()
    if not reused:
        train(model_config(args), cfg, artifact, Path(args.runs) / f"split{name}" / "work",
              resume=not args.no_resume, progress=not args.quiet)
    fit_seconds = None if reused else round(time.perf_counter() - t0, 1)
    model, card = load_artifact(Path(args.runs) / f"split{name}" / "model")
    t1 = time.perf_counter()
    eval_cfg = EvalConfig(draws=args.draws, registration_images=args.registration_images,
                          test_per_class=args.test_per_class or None, stream_frames=args.stream_frames,
                          stream_growth_draws=args.stream_growth_draws)
    report = evaluate(model, card, args.data, target, eval_cfg, out, progress=not args.quiet)
    (out / "card.json").write_text(card.to_json())
    summary = {"split": name, "source": source, "target": target, "fit_seconds": fit_seconds,
               "model_reused": bool(reused),
               "eval_seconds": round(time.perf_counter() - t1, 1), "table": format_summary(report),
               "bar": bar_keys(report, model.cfg.score)}
    summary["bar"]["threshold_rule"] = card.training.get("threshold_rule")
    print(f"== split {name}: fit on {source}, evaluate on {target}\n{summary['table']}", flush=True)
    return summary


def bar_keys(report: dict, score: ScoreConfig) -> dict[str, object]:
    """The split's numbers under the keys a script checks (issue "per-product calibration")."""
    s, line, mode = report["summary"], report["line"], score.calibration
    classes = report["target_classes"]
    out: dict[str, object] = {
        "targets": classes, "registration_images": line["registration_images"], "draws": line["draws"],
        "bank_images": report["bank_images"], "coreset": report["coreset"],
        "scoring": score.scoring, "calibration": mode, "normalisation": score.normalisation, "threshold": line["threshold"],
        "per_class_auroc": s[mode]["class_separated_mean"]["image_auroc"]["mean"],
        "mixed_auroc": s[mode]["mixed"]["image_auroc"]["mean"],
        "distance_per_class_auroc": s["baseline"]["class_separated_mean"]["image_auroc"]["mean"],
        "distance_mixed_auroc": s["baseline"]["mixed"]["image_auroc"]["mean"],
        "classes": {c: {"auroc": s[mode]["per_class"][c]["image_auroc"]["mean"],
                        "distance_auroc": s["baseline"]["per_class"][c]["image_auroc"]["mean"],
                        **line["classes"][c]} for c in classes},
    }
    if "stream" in line:
        st = line["stream"]
        out["stream"] = {"start_images": st["start_images"], "frames": st["frames"], "defect_rate": st["defect_rate"],
                         "classes": st["classes"]}
    if "stream_growth" in line:
        st = line["stream_growth"]
        out["stream_growth"] = {"start_images": st["start_images"], "frames": st["frames"], "draws": st["draws"],
                                "defect_rate": st["defect_rate"], "classes": st["classes"], "without": st["without"]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/industrial")
    p.add_argument("--weights", default="../shared/weights/resnet18-imagenet1k-l1-l3.safetensors")
    p.add_argument("--out", default="benchmarks/results/accuracy")
    p.add_argument("--runs", default="runs/accuracy", help="artifacts and checkpoints (not committed)")
    p.add_argument("--splits", default="A,B")
    p.add_argument("--steps", type=int, default=FitConfig.steps)
    p.add_argument("--images-per-class", type=int, default=TrainConfig.images_per_class)
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--synthetic-sources", default="", help="generated products added as source classes")
    p.add_argument("--source-views", default=",".join(TrainConfig.source_views),
                   help="appearance changes added as source classes (trainer.dataset.VIEWS)")
    p.add_argument("--constraintor", default=ModelConfig().flow.constraintor, choices=CONSTRAINTORS)
    p.add_argument("--no-position", action="store_true")
    p.add_argument("--scoring", default=ModelConfig().score.scoring, choices=("select", *SCORINGS),
                   help="select: leave-one-source-class-out choice, as inspector train does (4 fits per split)")
    p.add_argument("--calibration", default=ModelConfig().score.calibration, choices=CALIBRATION_MODES)
    p.add_argument("--normalisation", default=ModelConfig().score.normalisation, choices=METHODS)
    p.add_argument("--registration-images", type=int, default=50, help="good images each class is registered from")
    p.add_argument("--threshold-rule", default=CalibrationConfig.threshold_rule, choices=THRESHOLD_RULES,
                   help="how the source classes' held-out good scores place the line threshold")
    p.add_argument("--test-per-class", type=int, default=200, help="random test images per class (0: all)")
    p.add_argument("--stream-frames", type=int, default=200, help="simulated stream per class (0: none)")
    p.add_argument("--stream-growth-draws", type=int, default=1,
                   help="draws that also simulate the stream with bank growth (0: none; about 4 min per split each)")
    p.add_argument("--bank-images", type=int, default=ModelConfig().bank.images,
                   help="most registration images in a product's bank (4: the bank of k shots only)")
    p.add_argument("--coreset", type=coreset_arg, default=ModelConfig().bank.coreset,
                   help="bank vectors kept per level, one cap or one per level (greedy k-center; 0 or all: every "
                        "position; default 1024,4096,4096, benchmarks/results/bank_caps_pixel.json)")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--reuse-model", action="store_true",
                   help="evaluate the artifact an earlier run left under --runs instead of training it again "
                        "(for changes to the evaluation only; the summary says so)")
    p.add_argument("--quiet", action="store_true")
    args = parse_checked(p)
    settings = {"steps": args.steps if args.scoring == "flow" else 0, "images_per_class": args.images_per_class,
                "draws": args.draws, "registration_images": args.registration_images,
                "test_per_class": args.test_per_class, "stream_frames": args.stream_frames,
                "synthetic_sources": args.synthetic_sources, "source_views": args.source_views,
                "model": dataclasses.asdict(model_config(args))}
    measured = commit()  # the code this run measures: later commits during a long run do not count
    for s in args.splits.split(","):
        result = run_split(s.strip(), args)
        result.update(machine=machine(), commit=measured, date=time.strftime("%Y-%m-%d %H:%M:%S"), settings=settings)
        write_summary(Path(args.out), result)
    return 0


def write_summary(out: Path, result: dict[str, object]) -> None:
    """Merge one split's result into ``summary.json`` (other splits kept) and rewrite ``summary.md``.

    ``summary.json`` holds ``commit``, ``machine``, ``frr_target`` and ``splits`` keyed by split
    name, each with the bar's keys (``bar_keys``) beside the split's settings and printed table.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    splits = old.get("splits", {}) if isinstance(old.get("splits"), dict) else {}
    bar = result.pop("bar")
    splits[result["split"]] = {**bar, "run": result}
    ordered = {k: splits[k] for k in sorted(splits)}
    path.write_text(json.dumps({"commit": result["commit"], "machine": f"{result['machine']['cpu']}, "
                                f"{result['machine']['threads']} threads, torch {result['machine']['torch']}",
                                "frr_target": 0.01, "splits": ordered}, indent=2))
    lines = ["# Accuracy on unseen classes", ""]
    for name, s in ordered.items():
        r = s["run"]
        lines += [
            f"## Split {name}: fit on {', '.join(r['source'])}; unseen {', '.join(r['target'])}",
            f"measured {r['date']} on {r['machine']['cpu']} ({r['machine']['threads']} threads), "
            f"torch {r['machine']['torch']}, commit {r['commit']}",
            f"model score {json.dumps(r['settings']['model']['score'])}",
            ("fit reused from an earlier run (--reuse-model)" if r.get("fit_seconds") is None
             else f"fit {r['fit_seconds']:.0f} s") + f", evaluation {r['eval_seconds']:.0f} s (steps {r['settings']['steps']}, "
            f"registration images {r['settings'].get('registration_images')}, test images per class "
            f"{r['settings'].get('test_per_class') or 'all'}, draws {r['settings']['draws']}, bank coreset "
            f"{describe_coreset(r['settings']['model']['bank'].get('coreset'))} vectors per level)",
            "", "```", r["table"], "```", "",
        ]
    (out / "summary.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
