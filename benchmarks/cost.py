"""Inference cost of the inspection model: multiply-accumulates by stage and measured CPU time.

    python benchmarks/cost.py [--artifact DIR | --input-size S --coreset A,B,C] [--batch 1,8] [--products 2]
                              [--repeats 5]

MACs are counted with ``torch.utils.flop_counter`` (FLOPs / 2) for one image; times are medians
over ``--repeats`` runs after a warm-up, per stage and for the whole ``forward`` (the served graph:
``served_stages`` names the stages it runs for the model's scoring and calibration mode, and
``gmacs_served`` counts it whole). ``matmul_gmacs`` is a plain 4096 x 4096 fp32 matmul measured in
the same run, and ``achieved_gmac_per_s`` the served graph's MACs over its time per image.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.benchmark import commit, machine, matmul_gmacs, served_gmacs

from inspector.artifact import load_artifact
from inspector.cli import coreset_arg
from inspector.model.bank import bank_capacity
from inspector.model import Analysis, InspectionModel, ModelConfig, build_bank, stack_banks


def stages(model: InspectionModel, images: torch.Tensor, bank) -> dict[str, callable]:
    """Closures that run one stage each, on inputs prepared by the earlier stages."""
    feats = model.extract(images)
    hint = torch.full((len(images),), -1)
    product, _ = model.route(feats[-1], bank, hint)
    residuals = [model.residual(l, f, bank.features[l][product])[0] for l, f in enumerate(feats)]
    constrained = [model.constraintors[l](r) for l, r in enumerate(residuals)]
    maps = [-model.level_logp(l, r) for l, r in enumerate(residuals)]
    raw = model.fuse(maps)
    u, gamma = model.cada(feats[-1])
    analysis = Analysis(raw, raw, product, torch.ones(len(raw)), (u, gamma), (u, gamma))

    def flows() -> None:
        for l, c in enumerate(constrained):
            b, ch, h, w = c.shape
            x = c.flatten(2).transpose(1, 2).reshape(b * h * w, ch)
            model.flows[l](x, c=[getattr(model, f"pos{l}").repeat(b, 1)])

    return {
        "backbone": lambda: model.extract(images),
        "routing": lambda: model.route(feats[-1], bank, hint),
        "residual (nearest neighbour)": lambda: [model.residual(l, f, bank.features[l][product]) for l, f in enumerate(feats)],
        "constraintor": lambda: [model.constraintors[l](r) for l, r in enumerate(residuals)],
        "flow": flows,
        "fuse + blur": lambda: model.fuse(maps),
        "CADA head": lambda: model.cada(feats[-1]),
        "calibrate + score": lambda: model.inspect(analysis),
    }


def served_stages(model: InspectionModel) -> list[str]:
    """The stages the served graph runs for the model's scoring and calibration mode."""
    score = model.cfg.score
    flows = ["constraintor", "flow"] if score.scoring == "flow" else []
    cada = ["CADA head"] if score.calibration == "cada" else []
    return ["backbone", "routing", "residual (nearest neighbour)", *flows, "fuse + blur", *cada, "calibrate + score"]


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--products", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--input-size", type=int, help="without --artifact: the default model at this input size")
    p.add_argument("--coreset", type=coreset_arg, help="without --artifact: this cap per level instead of the default")
    p.add_argument("--out", default="benchmarks/results/cost.json")
    args = p.parse_args()
    if args.artifact and (args.input_size or args.coreset):
        p.error("--input-size and --coreset apply to the default model, not to an --artifact")
    cfg = ModelConfig()
    if args.input_size:
        cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, input_size=args.input_size))
    if args.coreset:
        cfg = dataclasses.replace(cfg, bank=dataclasses.replace(cfg.bank, coreset=args.coreset))
    model = load_artifact(args.artifact)[0] if args.artifact else InspectionModel(cfg).eval()
    s = model.input_size
    torch.manual_seed(0)
    with torch.no_grad():
        shots = model.extract(torch.randint(0, 256, (model.cfg.bank.shots * args.products, s, s, 3), dtype=torch.uint8))
        k = model.cfg.bank.shots
        bank = stack_banks([build_bank([f[i * k:(i + 1) * k] for f in shots], model.cfg.bank.coreset).with_stats(0.0, 1.0)
                            for i in range(args.products)], bank_capacity(model))  # the served capacity
        one = torch.randint(0, 256, (1, s, s, 3), dtype=torch.uint8)
        macs = {}
        for name, fn in stages(model, one, bank).items():
            with FlopCounterMode(display=False) as counter:
                fn()
            macs[name] = counter.get_total_flops() / 2
        result = {"machine": machine(), "commit": commit(), "input_size": s,
                  "bank_vectors_per_level": [t.shape[1] for t in bank.features],
                  "gmacs_per_image": {k: round(v / 1e9, 4) for k, v in macs.items()},
                  "gmacs_total": round(sum(macs.values()) / 1e9, 3),
                  "scoring": model.cfg.score.scoring, "calibration": model.cfg.score.calibration,
                  "served_stages": served_stages(model),
                  "gmacs_served": round(served_gmacs(model, model.cfg.score.calibration, args.products), 3),
                  "timing": {}}
        for b in [int(x) for x in args.batch.split(",")]:
            images = torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8)
            per_stage = {n: median_seconds(fn, args.repeats) / b * 1e3 for n, fn in stages(model, images, bank).items()}
            total = median_seconds(lambda: model(images, bank), args.repeats) / b * 1e3
            result["timing"][f"batch{b}"] = {"forward_ms_per_image": round(total, 2),
                                             "achieved_gmac_per_s": round(result["gmacs_served"] / total * 1e3, 1),
                                             "stage_ms_per_image": {k: round(v, 2) for k, v in per_stage.items()}}
        result["matmul_gmacs"] = round(matmul_gmacs(), 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
