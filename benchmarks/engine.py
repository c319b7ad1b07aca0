"""Engine throughput per backend, precision and batch size, with the bank capacity as a parameter.

    python benchmarks/engine.py [--artifact DIR] [--backends torch,onnx,inductor] [--batches 1,2,4,8]
                                [--products 2] [--repeats 5] [--device auto]

Times ``Engine.infer`` (the worker's call: uint8 frames in, scores and maps out) on random frames
against a bank of ``--products`` products at the model's full capacity, after a warm-up (which
includes compiling for inductor). On CUDA it also runs fp16 and bf16 autocast for eager and
``torch.compile`` with CUDA graphs (``mode="reduce-overhead"``), and relates throughput to the
served graph's multiply-accumulates (``served_gmacs``, counted in the same run) to say how far
from peak it runs.
Without ``--artifact``: the default configuration (256 px) with the offline backbone and untrained
heads, the same arithmetic as a trained model. Results: ``benchmarks/results/engine-<device>.json``.

In the same run (unless ``--no-previous``) it times the configuration served before the engine
work: a bank of the 4 shots' every position (no coreset cap), scored by the flow, the whole graph
computed (CADA head, the distance map beside the flow's, as evaluation computes it), the bank
converted from fp16 on every batch and every query position in one matmul, eager, at batch 4; and a plain 4096 x 4096 fp32 matmul, this
machine's arithmetic rate. The top-level keys relate them: ``matmul_gmacs``,
``speedup_eager_batch4`` (the default eager over the previous eager at batch 4) and
``onnx_fraction_of_matmul`` (the ONNX backend's GMAC/s at batch 4, on the served graph's MACs,
over ``matmul_gmacs``). Absolute rates differ between instances of one machine kind: read the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from trainer.benchmark import (commit, config_artifact, machine, matmul_gmacs, random_snapshot, run_in_bf16,
                               served_gmacs, time_engine)

from deploy.compile import compile_program
from inspector.artifact import load_artifact
from inspector.worker.engine import Engine, EngineSettings
from inspector.model.bank import bank_capacity
from inspector.model import ModelConfig
from inspector.model.bank import BANK_DTYPE
from inspector.model.serving import ServingGraph

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact")
    p.add_argument("--backends", default="torch,onnx,inductor")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--products", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    p.add_argument("--no-previous", action="store_true", help="skip the previous configuration and the matmul")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    artifact = args.artifact or config_artifact(ModelConfig(), work / "model")
    model, card = load_artifact(artifact)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    snap = random_snapshot(model, args.products)
    variants = []
    for backend in args.backends.split(","):
        precisions = ["fp32"] + (["fp16", "bf16"] if device == "cuda" and backend in ("torch", "inductor") else [])
        for precision in precisions:
            variants.append((backend, precision))
    results = []
    for backend, precision in variants:
        settings = {"device": device, "backend": backend, "batch_sizes": tuple(batches), "products": args.products}
        if precision != "fp32":
            settings["precision"] = "fp16"  # bf16 is timed through autocast below
        if backend == "onnx":
            path, _, _ = compile_program(artifact, "onnx", batches, "fp32", args.products, out=work / "m.onnx",
                                         say=lambda m: print(f"[engine] {m}", file=sys.stderr))
            settings["compiled"] = str(path)
        t0 = time.perf_counter()
        engine = Engine(*load_artifact(artifact), EngineSettings(**settings))
        if precision == "bf16":
            engine.fp16 = False
            run_in_bf16(engine)
        setup_s = time.perf_counter() - t0
        timing = time_engine(engine, snap, batches, args.repeats)
        results.append({"backend": backend, "precision": precision, "setup_s": round(setup_s, 1), "batches": timing})
    gmac = served_gmacs(model, card.model_config.score.calibration, args.products)
    result = {"machine": machine(), "commit": commit(), "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
              "device": torch.cuda.get_device_name() if device == "cuda" else machine()["cpu"],
              "input_size": model.input_size, "products": args.products, "capacity": list(bank_capacity(model)),
              "scoring": card.model_config.score.scoring, "calibration": card.model_config.score.calibration,
              "gmac_per_image": round(gmac, 3), "results": results}
    for r in results:
        best = max(v["images_per_s"] for v in r["batches"].values())
        r["achieved_gmac_per_s"] = round(best * gmac, 1)
    if not args.no_previous:
        result.update(previous_and_ratios(results, gmac, work, device, args))
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"engine-{device}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({f"{r['backend']}/{r['precision']}": {b: v["images_per_s"] for b, v in r["batches"].items()}
                      for r in results}, indent=2))
    return 0


PREVIOUS_BATCH = 4


def previous_and_ratios(results: list[dict], gmac: float, work: Path, device: str, args) -> dict:
    """The previous configuration timed eager at batch 4, the matmul rate, and the ratios."""
    base = ModelConfig()
    cfg = dataclasses.replace(base, bank=dataclasses.replace(base.bank, coreset=None, images=base.bank.shots,
                                                             query_tile=None),
                              score=dataclasses.replace(base.score, scoring="flow"))
    artifact = config_artifact(cfg, work / "previous")
    model, card = load_artifact(artifact)
    engine = Engine(model, card, EngineSettings(device=device, batch_sizes=(PREVIOUS_BATCH,), products=args.products))
    full = ServingGraph(engine.model, engine.calibration, trimmed=False).eval()
    engine.runner = lambda *a: full(*a)
    engine.bank_dtype = BANK_DTYPE  # the bank reached the graph in fp16, converted on every batch
    timing = time_engine(engine, random_snapshot(model, args.products), [PREVIOUS_BATCH], args.repeats)
    previous_gmac = served_gmacs(model, engine.calibration, args.products, trimmed=False)
    rate = matmul_gmacs()
    print(f"[engine] matmul 4096: {rate:.1f} GMAC/s", file=sys.stderr)

    def at_batch(backend: str) -> float | None:
        row = next((r for r in results if r["backend"] == backend and r["precision"] == "fp32"), None)
        hit = row and row["batches"].get(str(PREVIOUS_BATCH))
        return hit["images_per_s"] if hit else None

    eager, onnx = at_batch("torch"), at_batch("onnx")
    prev = timing[str(PREVIOUS_BATCH)]["images_per_s"]
    return {
        "previous": {"what": "4-shot bank uncapped, flow scoring, whole graph, fp16 bank converted per batch, untiled queries, eager",
                     "capacity": list(bank_capacity(model)), "gmac_per_image": round(previous_gmac, 3),
                     "batches": timing},
        "matmul_gmacs": round(rate, 1),
        "images_per_s_eager_batch4": eager,
        "speedup_eager_batch4": round(eager / prev, 2) if eager else None,
        "onnx_fraction_of_matmul": round(onnx * gmac / rate, 3) if onnx else None,
    }


if __name__ == "__main__":
    sys.exit(main())
