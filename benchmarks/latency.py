"""Open-loop latency and throughput of the worker through real sockets.

    python benchmarks/latency.py [--artifact DIR] [--max-batch 4] [--max-delay-ms 10]
                                 [--loads 0.25,0.5,0.75,0.9] [--seconds 20] [--device auto]

1. Engine throughput: ``Engine.infer`` alone at ``--max-batch`` on prepared frames (median of
   repeats) -> the capacity the worker is compared with.
2. The real worker (``inspector run`` as a separate process) serving two products; a sender
   pushes JPEG frames on a fixed schedule (periodic or Poisson arrivals, open loop: sending
   never waits for results) at each fraction of capacity, plus an overload run at 1.5x that
   measures throughput at saturation.
3. Per run: end-to-end latency (send -> result received) p50/p95/p99/max, the worker's own
   ``latency_ms.total``, throughput, and the accounting (sent = results, by verdict).

Bars (issue text): saturation throughput >= 90% of engine throughput at the same batch size;
at 50% load p99 < 2 x batch service time + max_delay_ms. Results: ``benchmarks/results/latency.json``
and ``latency.png``, with the machine and commit. Without ``--artifact`` the model is the default
configuration (256 px) with the offline ImageNet backbone and untrained heads: the arithmetic of a
trained model, which is what latency depends on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import zmq

from trainer.benchmark import commit, engine_throughput, machine, open_loop, serving_fixture, start_worker

from inspector.testkit import free_port, wait_for_worker

REPO = Path(__file__).resolve().parents[1]
OVERLOAD = 1.5  # offered load of the saturation run, as a multiple of engine capacity
READY_TIMEOUT_S = 300.0  # model load and warm-up on a slow machine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-delay-ms", type=float, default=10.0)
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--loads", default="0.25,0.5,0.75,0.9")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "latency"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="latency-"))
    artifact, banks, frames = serving_fixture(work, args.artifact)
    engine = engine_throughput(artifact, f"file://{banks}", "1", args.max_batch, args.device, args.repeats)
    print(f"[latency] engine: batch {args.max_batch} in {engine['batch_seconds_median']}s -> {engine['fps']} fps",
          file=sys.stderr)
    ingest, publish = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    proc = start_worker(artifact, banks, ingest, publish, args.device, args.max_batch, args.max_delay_ms,
                        args.queue_size)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"result.1.")
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(publish)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.connect(ingest)
    runs = []
    try:
        wait_for_worker(push, sub, READY_TIMEOUT_S)
        plan = [(float(f), poisson) for f in args.loads.split(",") for poisson in (False, True)]
        plan.append((OVERLOAD, False))
        for k, (fraction, poisson) in enumerate(plan):
            r = open_loop(push, sub, frames, fraction * engine["fps"], args.seconds, poisson, f"run{k}")
            r["load"] = fraction
            runs.append(r)
            print(f"[latency] load {fraction:.2f} {r['arrivals']}: p50 {r['e2e_ms']['p50']} p99 {r['e2e_ms']['p99']} ms, "
                  f"{r['throughput_fps']} fps, verdicts {r['verdicts']}", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(60)
        push.close(0)
        sub.close(0)
        ctx.term()
    result = {"machine": machine(), "commit": commit(), "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
              "config": vars(args), "engine": engine, "runs": runs, "bars": bars(runs, engine, args.max_delay_ms)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result["bars"], indent=2))
    return 0


def bars(runs: list[dict], engine: dict, max_delay_ms: float) -> dict:
    """The issue's bars: saturation (the last, overload run) over the engine's throughput, and p99
    at half load against 2 x batch service time + ``max_delay_ms``."""
    half = [r for r in runs if r["load"] == 0.5]
    bound = 2 * engine["batch_seconds_median"] * 1000 + max_delay_ms
    return {"saturation_over_engine": round(runs[-1]["throughput_fps"] / engine["fps"], 3), "saturation_bar": 0.9,
            "p99_at_half_load_ms": [r["e2e_ms"]["p99"] for r in half], "p99_bound_ms": round(bound, 1)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("periodic", "o"), ("poisson", "s")):
        rs = [r for r in result["runs"] if r["arrivals"] == kind and r["load"] < OVERLOAD]
        for q in ("p50", "p99"):
            ax.plot([r["load"] for r in rs], [r["e2e_ms"][q] for r in rs], marker=marker,
                    label=f"{kind} {q}", linestyle="-" if q == "p50" else "--")
    ax.axhline(result["bars"]["p99_bound_ms"], color="gray", linewidth=0.8, label="p99 bar at 50% load")
    ax.set_xlabel("offered load / engine throughput")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title(f"engine {result['engine']['fps']} fps at batch {result['engine']['batch']}; "
                 f"saturation {result['bars']['saturation_over_engine']:.2f}x")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
