"""The GPU benchmark in one call: engine throughput by precision and batch size, ``torch.compile``
with CUDA graphs, and the worker's latency, related to the GPU's bf16 peak.

    bash benchmarks/gpu.sh --out DIR            # on the CUDA machine: sets up, then runs this
    python benchmarks/gpu.py [--out DIR] [--batches 1,2,4,8,16,32,64] [--compile-batches 1,8,32]
                             [--budget-s 330] [--device cuda] [--no-latency] [--repeats 10]

Stages, each written to ``DIR/gpu.json`` as soon as it ends (a run cut short keeps what it has):

1. The GPU's bf16 rate: an 8192 x 8192 x 8192 bf16 matmul (median of 10 after 3 warm-ups), next to
   the data-sheet dense bf16 peak when the device is one this file knows.
2. ``Engine.infer`` (the worker's call: uint8 frames in, scores and maps back on the host) on the
   default configuration (256 px, two products at the bank's full capacity) eager in fp32, fp16
   (the engine's ``precision = "fp16"``) and bf16 (autocast), at every ``--batches`` size.
3. The same graph under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) in bf16 at each
   ``--compile-batches`` size (one compilation per size; skipped when the time budget is spent).
4. ``benchmarks/latency.py`` on the device with short runs (50% and 90% load, 5 s each, and the
   overload run), when pyzmq is importable; else the reason is recorded.

Every throughput is also given as TFLOP/s on the served graph's multiply-accumulates
(``trainer.benchmark.served_gmacs``, 2 FLOP each) and as a fraction of the measured bf16 matmul
rate and of the data-sheet peak. The model is the default configuration with the offline ImageNet
backbone when ``../shared`` is present and random backbone weights otherwise: the same arithmetic,
which is what speed depends on. ``--budget-s`` bounds the whole run (the stages after it is spent
are skipped and say so): the default leaves room for the machine's start in 8 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from trainer.benchmark import (commit, config_artifact, machine, random_snapshot, run_in_bf16, served_gmacs,
                               time_engine)

from inspector.artifact import load_artifact
from inspector.worker.engine import Engine, EngineSettings
from inspector.model.bank import bank_capacity
from inspector.model import ModelConfig
from inspector.model.serving import ServingGraph

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peak from the vendors' data sheets (SXM parts), TFLOP/s.
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}
MATMUL_SIDE = 8192
COMPILE_RESERVE_S = 75  # a compilation plus its timing needs about this much of the budget
LATENCY_RESERVE_S = 120


def datasheet_peak(name: str) -> float | None:
    return next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)


def bf16_matmul_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    a = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device, dtype=torch.bfloat16)
    b = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * MATMUL_SIDE ** 3 / statistics.median(times) / 1e12


class Run:
    """The result document, written after every stage."""

    def __init__(self, out: Path, budget_s: float, doc: dict) -> None:
        self.out, self.deadline, self.doc = out, time.monotonic() + budget_s, doc
        self.out.mkdir(parents=True, exist_ok=True)
        self.save()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        (self.out / "gpu.json").write_text(json.dumps(self.doc, indent=2) + "\n")

    def say(self, msg: str) -> None:
        print(f"[gpu] {msg} ({self.left():.0f} s of the budget left)", file=sys.stderr, flush=True)


def rates(timing: dict, gmac: float, matmul: float | None, sheet: float | None) -> None:
    """Add TFLOP/s and fractions of the bf16 rates to each batch's timing, in place."""
    for row in timing.values():
        tflops = 2 * gmac * row["images_per_s"] / 1000
        row["tflops"] = round(tflops, 3)
        if matmul:
            row["fraction_of_bf16_matmul"] = round(tflops / matmul, 4)
        if sheet:
            row["fraction_of_bf16_peak"] = round(tflops / sheet, 4)


def eager_stage(run: Run, artifact: str, snap, args, batches: list[int], gmac: float) -> None:
    precisions = ["fp32", "fp16", "bf16"] if args.device == "cuda" else ["fp32"]
    for precision in precisions:
        if run.left() < 0:
            run.doc["eager"].append({"precision": precision, "skipped": "time budget spent"})
            continue
        settings = EngineSettings(device=args.device, backend="torch", batch_sizes=tuple(batches), products=args.products,
                                  precision="fp16" if precision == "fp16" else "fp32")
        engine = Engine(*load_artifact(artifact), settings)
        if precision == "bf16":
            run_in_bf16(engine)
        timing = time_engine(engine, snap, batches, args.repeats)
        rates(timing, gmac, run.doc["bf16_matmul_tflops"], run.doc["datasheet_bf16_tflops"])
        run.doc["eager"].append({"precision": precision, "batches": timing})
        run.save()
        run.say(f"eager {precision} done")
        del engine
        if args.device == "cuda":
            torch.cuda.empty_cache()


def compile_stage(run: Run, artifact: str, snap, args, batches: list[int], gmac: float) -> None:
    """bf16 autocast around ``torch.compile(mode="reduce-overhead")``: CUDA graphs on CUDA."""
    for b in batches:
        if run.left() < COMPILE_RESERVE_S + (LATENCY_RESERVE_S if not args.no_latency else 0):
            run.doc["compiled"].append({"batch": b, "skipped": "time budget spent"})
            run.save()
            continue
        engine = Engine(*load_artifact(artifact), EngineSettings(device=args.device, backend="torch", batch_sizes=(b,),
                                                                 products=args.products))
        graph = torch.compile(ServingGraph(engine.model, engine.calibration).eval(), mode="reduce-overhead",
                              dynamic=False)
        engine.runner = lambda *a, g=graph: g(*a)
        if args.device == "cuda":
            run_in_bf16(engine)
        try:
            timing = time_engine(engine, snap, [b], args.repeats)
        except Exception as err:  # a compiler failure is a result here, not the end of the run
            run.doc["compiled"].append({"batch": b, "error": f"{type(err).__name__}: {err}"[:2000]})
            run.save()
            continue
        rates(timing, gmac, run.doc["bf16_matmul_tflops"], run.doc["datasheet_bf16_tflops"])
        run.doc["compiled"].append({"batch": b, "precision": "bf16" if args.device == "cuda" else "fp32",
                                    "mode": "reduce-overhead", **timing[str(b)]})
        run.save()
        run.say(f"compiled batch {b} done")
        torch._dynamo.reset()


def latency_stage(run: Run, artifact: str, args) -> None:
    try:
        import zmq  # noqa: F401
    except ImportError:
        run.doc["latency"] = {"skipped": "pyzmq is not importable (gpu.sh installs it from runs/gpu-wheels)"}
        return
    left = run.left()
    if left < LATENCY_RESERVE_S / 2:
        run.doc["latency"] = {"skipped": "time budget spent"}
        return
    out = run.out / "latency"
    cmd = [sys.executable, str(REPO / "benchmarks" / "latency.py"), "--artifact", artifact, "--device", args.device,
           "--max-batch", str(args.latency_batch), "--max-delay-ms", "5", "--loads", "0.5,0.9", "--seconds", "5",
           "--repeats", str(args.repeats), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run(cmd, env=env, timeout=max(left, 30), capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        run.doc["latency"] = {"skipped": f"did not finish within the {left:.0f} s left of the budget"}
        return
    if proc.returncode != 0:
        run.doc["latency"] = {"error": proc.stderr[-3000:]}
        return
    result = json.loads(out.with_suffix(".json").read_text())
    run.doc["latency"] = {"config": result["config"], "engine": result["engine"], "bars": result["bars"],
                          "runs": [{k: r.get(k) for k in ("load", "arrivals", "e2e_ms", "throughput_fps")}
                                   for r in result["runs"]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "runs" / "gpu"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--compile-batches", default="1,8,32")
    p.add_argument("--products", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--latency-batch", type=int, default=16)
    p.add_argument("--budget-s", type=float, default=330.0)
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--missing", default="", help="packages the set-up could not provide (from gpu.sh)")
    args = p.parse_args(argv)
    started = time.monotonic()
    batches = [int(b) for b in args.batches.split(",") if b]
    name = torch.cuda.get_device_name() if args.device == "cuda" else machine()["cpu"]
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    artifact = config_artifact(ModelConfig(), work / "model")
    model, card = load_artifact(artifact)
    gmac = served_gmacs(model, card.model_config.score.calibration, args.products)
    run = Run(Path(args.out), args.budget_s, {
        "machine": machine(), "commit": commit(), "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "device": name,
        "torch": torch.__version__, "cuda": torch.version.cuda, "missing_packages": args.missing.split(),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "input_size": model.input_size, "products": args.products, "capacity": list(bank_capacity(model)),
        "scoring": card.model_config.score.scoring, "calibration": card.model_config.score.calibration,
        "gmac_per_image": round(gmac, 3), "datasheet_bf16_tflops": datasheet_peak(name),
        "bf16_matmul_tflops": None, "eager": [], "compiled": [], "latency": None,
    })
    matmul = bf16_matmul_tflops(args.device)
    run.doc["bf16_matmul_tflops"] = round(matmul, 1) if matmul else None
    run.save()
    run.say(f"{name}: bf16 matmul {run.doc['bf16_matmul_tflops']} TFLOP/s, {gmac:.2f} GMAC per image")
    snap = random_snapshot(model, args.products)
    eager_stage(run, artifact, snap, args, batches, gmac)
    compile_stage(run, artifact, snap, args, [int(b) for b in args.compile_batches.split(",") if b], gmac)
    if args.no_latency:
        run.doc["latency"] = {"skipped": "--no-latency"}
    else:
        latency_stage(run, artifact, args)
    best = [(r["precision"], b, v) for r in run.doc["eager"] for b, v in r.get("batches", {}).items()]
    best += [(f"compiled {c['precision']}", str(c["batch"]), c) for c in run.doc["compiled"] if "images_per_s" in c]
    if best:
        label, batch, top = max(best, key=lambda t: t[2]["images_per_s"])
        run.doc["best"] = {"what": label, "batch": int(batch), "images_per_s": top["images_per_s"],
                           "tflops": top["tflops"], "fraction_of_bf16_peak": top.get("fraction_of_bf16_peak"),
                           "fraction_of_bf16_matmul": top.get("fraction_of_bf16_matmul")}
    run.doc["seconds"] = round(time.monotonic() - started, 1)
    run.save()
    print(json.dumps({k: run.doc.get(k) for k in ("device", "bf16_matmul_tflops", "best", "seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
