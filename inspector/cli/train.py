"""``inspector train``, ``inspector eval`` and ``inspector synth``: the trainer's commands. Each
parses, builds, calls and prints; the logic lives in ``trainer``, imported only when one runs."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from .bank import coreset_arg

DEFAULT_WEIGHTS_ENV = "INSPECTOR_BACKBONE_WEIGHTS"
SHARED_WEIGHTS = Path("shared/weights/resnet18-imagenet1k-l1-l3.safetensors")


def find_weights(explicit: str | None) -> str | None:
    """The backbone weights file: the flag, the environment, or ``../shared/weights`` if present."""
    if explicit:
        return explicit
    if os.environ.get(DEFAULT_WEIGHTS_ENV):
        return os.environ[DEFAULT_WEIGHTS_ENV]
    for base in (Path.cwd(), *Path.cwd().parents[:2]):
        candidate = base / SHARED_WEIGHTS
        if candidate.is_file():
            return str(candidate)
    return None


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="MVTec-layout root")
    p.add_argument("--classes", required=True, help="comma-separated source classes")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--weights", help=f"backbone safetensors (default: ${DEFAULT_WEIGHTS_ENV} or ../shared/weights)")
    p.add_argument("--random-backbone", action="store_true", help="fit on a randomly initialised backbone (for tests; detection will be poor)")
    p.add_argument("--workdir", help="checkpoints and logs (default: <out>.work)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--steps", type=int, help="flow training steps")
    p.add_argument("--batch", type=int, help="query images per step")
    p.add_argument("--images-per-class", type=int, help="normal images loaded per class")
    p.add_argument("--input-size", type=int, help="model input size S")
    p.add_argument("--shots", type=int, help="fewest good images a product is registered from; the flow's query "
                                              "banks and the plain-distance baseline use this many (default 4)")
    p.add_argument("--bank-images", type=int, help="most good images in a product's bank (default 64)")
    p.add_argument("--coreset", type=coreset_arg, help="cap on bank vectors per level: one for every level or one "
                                                     "per level (default 1024,4096,4096; 'all': no cap)")
    p.add_argument("--calibration", choices=("cada", "bank", "none"),  # model.config.CALIBRATION_MODES
                   help="shipped calibration mode (default bank: each product's own normal statistics)")
    p.add_argument("--normalisation", choices=("q90", "max", "median_max", "quantile", "zscore", "robust"),
                   # inspector.banks.normal.METHODS, without importing numpy
                   help="how each product's good images' scores set its scale (default q90: 0 and their 90th "
                        "percentile; benchmarks/results/threshold_rules.md compares them)")
    p.add_argument("--scoring", choices=("select", "distance", "flow"),  # "select" + model.config.SCORINGS
                   default="select",
                   help="raw map: 'select' (default) fits the flows with each source class held out in turn and "
                        "ships them only if they beat the training-free distance on the held-out classes; "
                        "'distance' ships the distance without fitting flows; 'flow' fits and ships the flows")
    p.add_argument("--registration-images", type=int,
                   help="good images each source class is registered from when the threshold is set (default 50)")
    p.add_argument("--constraintor", choices=("conv", "identity"),  # model.config.CONSTRAINTORS, without importing torch
                   help="what the flow reads: the conv constraintor's output or the scaled residual itself")
    p.add_argument("--no-position", action="store_true", help="do not condition the flows on position")
    p.add_argument("--source-views", default=None,
                   help="appearance changes added as extra source classes, e.g. rot90,invert,zoom ('' for none)")
    p.add_argument("--target-frr", type=float, help="false-reject rate the threshold is set at")
    p.add_argument("--threshold-rule", choices=("class_median", "pooled", "class_mean"),  # trainer.calibrate.THRESHOLD_RULES
                   help="how the source classes' held-out good images place the line threshold: 'class_median' "
                        "(default) the median of each class's own threshold at the target rate, 'pooled' all "
                        "classes' images together (the heaviest-tailed class sets it), 'class_mean' their mean")
    p.add_argument("--cada-epochs", type=int, help="CADA head epochs")
    p.add_argument("--synthetic-sources", default="",
                   help="generated products added as extra source classes, e.g. tiles,rings,weave,dots")
    p.add_argument("--no-real-anomalies", action="store_true",
                   help="use synthetic anomalies only, not the source classes' labelled ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--classes", required=True, help="comma-separated target classes")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--draws", type=int, default=3, help="random draws of shots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pixel-metrics", action="store_true")
    p.add_argument("--registration-images", type=int, default=50,
                   help="good train images each target class is registered from (k shots + cross-scored rest)")
    p.add_argument("--test-per-class", type=int, help="random test images kept per class (default: all)")
    p.add_argument("--stream-frames", type=int, default=200,
                   help="simulated stream per class, starting from k shots only (0: no stream)")
    p.add_argument("--stream-growth-draws", type=int, default=1,
                   help="draws whose simulated stream also grows each bank from its frames (0: none)")
    p.add_argument("--bank-images", type=int,
                   help="what-if: most images in a bank instead of the card's (the shipped threshold was set for the card's)")
    p.add_argument("--coreset", type=coreset_arg,
                   help="what-if: bank vectors per level instead of the card's, one cap or one per level "
                        "(0 or all: every position; the threshold was set for the card's)")
    p.add_argument("--quiet", action="store_true")


def _add_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--classes", default="tiles,rings,weave")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--train", type=int, default=30, help="good training images per class")
    p.add_argument("--test", type=int, default=10, help="good and defect test images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


def model_config_from(args: argparse.Namespace):
    """The model configuration with the flags that were given applied."""
    from ..model import ModelConfig

    cfg = ModelConfig()
    if args.input_size:
        cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, input_size=args.input_size))
    bank = {k: v for k, v in (("shots", args.shots), ("images", args.bank_images), ("coreset", args.coreset))
            if v is not None}
    if bank:
        cfg = dataclasses.replace(cfg, bank=dataclasses.replace(cfg.bank, **bank))
    scoring = args.scoring if args.scoring != "select" else None
    score = {k: v for k, v in (("calibration", args.calibration), ("scoring", scoring),
                               ("normalisation", args.normalisation)) if v}
    if score:
        cfg = dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, **score))
    flow = {k: v for k, v in (("constraintor", args.constraintor), ("position", False if args.no_position else None)) if v is not None}
    if flow:
        cfg = dataclasses.replace(cfg, flow=dataclasses.replace(cfg.flow, **flow))
    return cfg


def train_config_from(args: argparse.Namespace, weights: str | None):
    """The training configuration with the flags that were given applied."""
    from trainer.calibrate import CalibrationConfig
    from trainer.fit import FitConfig
    from trainer.train import TrainConfig, parse_classes, parse_views

    fit = FitConfig(seed=args.seed)
    fit = dataclasses.replace(fit, **{k: v for k, v in (("steps", args.steps), ("batch", args.batch)) if v})
    cal = CalibrationConfig(seed=args.seed)
    if args.target_frr is not None:
        cal = dataclasses.replace(cal, target_false_reject_rate=args.target_frr)
    if args.cada_epochs:
        cal = dataclasses.replace(cal, epochs=args.cada_epochs)
    if args.threshold_rule:
        cal = dataclasses.replace(cal, threshold_rule=args.threshold_rule)
    if args.registration_images:
        cal = dataclasses.replace(cal, registration_images=args.registration_images)
    extra = {"images_per_class": args.images_per_class} if args.images_per_class else {}
    extra["real_anomalies"] = not args.no_real_anomalies
    extra["select_scoring"] = args.scoring == "select"
    if args.synthetic_sources:
        extra["synthetic_sources"] = parse_classes(args.synthetic_sources)
    if args.source_views is not None:
        extra["source_views"] = parse_views(args.source_views)
    return TrainConfig(
        data=args.data, classes=parse_classes(args.classes), weights=weights,
        seed=args.seed, fit=fit, calibration=cal, **extra,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.train import train

    weights = None if args.random_backbone else find_weights(args.weights)
    if weights is None and not args.random_backbone:
        print("error: no backbone weights found; pass --weights FILE, set "
              f"${DEFAULT_WEIGHTS_ENV}, or pass --random-backbone to fit on random features",
              file=sys.stderr)
        return 2
    if weights is None:
        print("warning: backbone has RANDOM weights (--random-backbone); detection will be poor",
              file=sys.stderr)
    cfg = train_config_from(args, weights)
    workdir = args.workdir or f"{args.out}.work"
    card = train(model_config_from(args), cfg, args.out, workdir, resume=not args.no_resume, progress=not args.quiet)
    t = card.training
    print(f"artifact {args.out} model {card.model_id}")
    print(f"  source classes {', '.join(t['source_classes'])}; backbone weights {card.backbone['weights_sha256'] or 'RANDOM'}")
    sel = t["scoring"]["selection"]
    print(f"  scoring: {t['scoring']['shipped']}" + (f" ({sel['reason']})" if isinstance(sel, dict) else " (given)"))
    print(f"  thresholds at FRR {card.false_reject_rate} ({t.get('threshold_rule', 'pooled')}): "
          + ", ".join(f"{m} {v:.3f}" for m, v in t["thresholds"].items()))
    if t.get("threshold_per_draw"):
        per = t["threshold_per_draw"]
        print(f"  shipped mode's threshold from each registration draw alone: {min(per):.3f} to {max(per):.3f} "
              f"({len(per)} draws): how much it owes to which images registered the source classes")
    if t.get("threshold_by_rule"):
        print("  shipped mode's threshold by rule: " + ", ".join(f"{r} {v:.3f}" for r, v in t["threshold_by_rule"].items()))
    per_class = t["holdout"].get("per_class") or {}
    if per_class:
        print("  held-out good images at the shipped threshold: " + ", ".join(
            f"{c} median {s['median']:.2f}, p99 {s['p99']:.2f}, FRR {s['false_reject_rate']:.1%}" for c, s in per_class.items()))
    print("  time: " + ", ".join(f"{k} {v:.0f}s" for k, v in t["seconds"].items()))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from trainer.evaluate import EvalConfig, evaluate
    from trainer.train import parse_classes

    from ..artifact import load_artifact
    from ..model.bank import level_caps

    model, card = load_artifact(args.artifact)
    bank = {k: v for k, v in (("images", args.bank_images), ("coreset", args.coreset)) if v is not None}
    if args.bank_images is not None and args.bank_images < 1:
        raise SystemExit(f"error: --bank-images must be at least 1, got {args.bank_images}")
    if args.coreset is not None:
        try:
            level_caps(args.coreset, len(model.grids))
        except ValueError as err:
            raise SystemExit(f"error: --coreset: {err}") from None
    if bank:
        bank["coreset"] = bank.get("coreset", model.cfg.bank.coreset) or None
        model.cfg = dataclasses.replace(model.cfg, bank=dataclasses.replace(model.cfg.bank, **bank))
    cfg = EvalConfig(draws=args.draws, seed=args.seed, pixel_metrics=not args.no_pixel_metrics,
                     registration_images=args.registration_images, test_per_class=args.test_per_class,
                     stream_frames=args.stream_frames, stream_growth_draws=args.stream_growth_draws)
    report = evaluate(model, card, args.data, parse_classes(args.classes), cfg, args.out, progress=not args.quiet)
    print(format_summary(report))
    print(f"report: {Path(args.out) / 'report.json'}  plots: {Path(args.out) / 'index.html'}")
    return 0


def format_summary(report: dict) -> str:
    """A table: per mode, class-separated mean and mixed image AUROC, pixel AUROC, AUPRO."""
    s = report["summary"]
    lines = [
        f"targets {', '.join(report['target_classes'])}; {report['shots']} shots; "
        f"{report['config']['draws']} draws; routing accuracy {s['routing_accuracy']['mean']:.3f}",
        f"{'mode':<10}{'img AUROC sep':>15}{'img AUROC mixed':>17}{'pix AUROC':>11}{'AUPRO':>8}{'FRR':>7}{'escape':>8}",
    ]
    for mode in ("cada", "bank", "none", "baseline"):
        sep, mix = s[mode]["class_separated_mean"], s[mode]["mixed"]
        get = lambda d, k: f"{d[k]['mean']:.3f}" if k in d and d[k]["mean"] == d[k]["mean"] else "-"  # noqa: E731
        lines.append(
            f"{mode:<10}{get(sep, 'image_auroc'):>15}{get(mix, 'image_auroc'):>17}"
            f"{get(sep, 'pixel_auroc'):>11}{get(sep, 'aupro'):>8}"
            f"{get(mix, 'false_reject_rate'):>7}{get(mix, 'escape_rate'):>8}"
        )
    return "\n".join(lines + format_line(report.get("line")))


def format_line(line: dict | None) -> list[str]:
    """Per class: rates at the shipped threshold, the oracle, leave-one-class-out, after a stream."""
    if not line:
        return []
    out = ["", f"at the shipped threshold ({line['mode']} {line['threshold']:.3f}, set for FRR {line['frr_target']:.0%}; "
               f"registered from {line['registration_images']} good images):",
           f"{'class':<16}{'FRR':>7}{'escape':>8}{'own@FRR':>9}{'own@target':>11}{'LOCO FRR':>10}"
           + (f"{'stream FRR':>12}{'stream esc':>12}" if "stream" in line else "")
           + (f"{'grown FRR':>11}{'grown esc':>11}{'grown own@target':>18}{'bank':>6}" if "stream_growth" in line else "")]
    for c, r in line["classes"].items():
        row = (f"{c:<16}{r['frr']:>7.3f}{r['escape']:>8.3f}{r['oracle_escape']:>9.3f}"
               f"{r.get('target_oracle_escape', float('nan')):>11.3f}{r.get('loco_frr', float('nan')):>10.3f}")
        if "stream" in line:
            st = line["stream"]["classes"][c]
            row += f"{st['frr']:>12.3f}{st['escape']:>12.3f}"
        if "stream_growth" in line:
            g = line["stream_growth"]["classes"][c]
            row += (f"{g['frr']:>11.3f}{g['escape']:>11.3f}{g.get('target_oracle_escape', float('nan')):>18.3f}"
                    f"{g['bank_images']:>6.0f}")
        out.append(row)
    if "stream" in line:
        st = line["stream"]
        out.append("own@FRR, own@target: escape of the class's own threshold at the same FRR and at the target FRR")
        out.append(f"stream: {st['frames']} frames per class ({st['defect_rate']:.0%} defects) starting from "
                   f"{st['start_images']} good images; rates on the test set after it")
    if "stream_growth" in line:
        out.append("grown: the same stream with the bank grown from the frames that qualify "
                   "(inspector.banks.growth); grown own@target: the grown bank's escape at its own threshold at "
                   "the target FRR; bank: its images after the stream")
    return out


def cmd_synth(args: argparse.Namespace) -> int:
    from trainer.synthetic import generate_dataset
    from trainer.train import parse_classes

    root = generate_dataset(
        args.out, classes=parse_classes(args.classes), n_train=args.train, n_test_good=args.test,
        n_test_defect=args.test, size=args.size, seed=args.seed, overwrite=args.overwrite,
    )
    print(f"synthetic dataset written to {root}")
    return 0


def add_trainer_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``train``, ``eval`` and ``synth`` to the command line's subcommands."""
    _add_train(sub.add_parser("train", help="fit a model on source classes and write an artifact"))
    _add_eval(sub.add_parser("eval", help="evaluate an artifact on unseen target classes"))
    _add_synth(sub.add_parser("synth", help="write a synthetic MVTec-layout dataset"))


TRAINER_COMMANDS = {"train": cmd_train, "eval": cmd_eval, "synth": cmd_synth}
