"""Two workers on one line: does throughput add?

    python benchmarks/scaleout.py [--artifact DIR] [--threads 1] [--seconds 30] [--load 1.5]
                                  [--max-batch 4] [--out benchmarks/results/scaleout.json]

Real worker processes (``inspector run``) serve one line from one file bank store; one sender's
PUSH socket connects to every worker's PULL endpoint (ZeroMQ spreads the frames among them) and one
SUB socket to every worker's PUB, as the README's "Two or more workers on one line" describes. Each
worker's engine runs ``--threads`` intra-op threads (``engine.threads``), so the cores given to one
worker are the same in both configurations. The sender offers ``--load`` times what the
configuration could serve if throughput added (open loop, periodic, JPEG frames of two products),
so every configuration runs saturated; throughput is the scored results per second.

Configurations, in one run: 1 worker, 2 workers. ``adds`` is the 2-worker throughput over twice
the 1-worker throughput (1.0: it adds exactly). On a machine with fewer cores than the workers'
threads and their decode pools need together, the workers share cores and ``adds`` falls short
for that reason alone: the machine and its core count are recorded. Every frame must get exactly
one result (``accounted``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import zmq

from trainer.benchmark import commit, engine_throughput, machine, open_loop, serving_fixture, start_worker

from inspector.testkit import free_port, wait_for_worker

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 300.0


def serve(workers: int, artifact: Path, banks: Path, frames: list[bytes], rate: float, args) -> dict:
    endpoints = [(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}") for _ in range(workers)]
    extra = ["--set", f"engine.threads={args.threads}", "--set", "ingest.decode_workers=1"]
    procs = [start_worker(artifact, banks, i, p, "cpu", args.max_batch, args.max_delay_ms, 64, extra,
                          {"OMP_NUM_THREADS": str(args.threads)}) for i, p in endpoints]
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"result.1.")
    sub.setsockopt(zmq.RCVHWM, 0)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    try:
        for k, (ingest, publish) in enumerate(endpoints):
            # Ready one worker at a time: a PUSH with several peers would spread the probes.
            probe = ctx.socket(zmq.PUSH)
            probe.connect(ingest)
            sub.connect(publish)
            wait_for_worker(probe, sub, READY_TIMEOUT_S)
            probe.close(0)
            print(f"[scaleout] worker {k + 1} of {workers} ready", file=sys.stderr, flush=True)
        for ingest, _ in endpoints:
            push.connect(ingest)
        time.sleep(0.5)  # let every PUSH connection complete, so the spread starts even
        result = open_loop(push, sub, frames, rate, args.seconds, False, f"w{workers}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
        push.close(0)
        sub.close(0)
        ctx.term()
    result["workers"] = workers
    print(f"[scaleout] {workers} worker(s): {result['throughput_fps']} fps of {result['offered_fps']} offered, "
          f"verdicts {result['verdicts']}", file=sys.stderr, flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-delay-ms", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--load", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scaleout.json"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="scaleout-"))
    artifact, banks, frames = serving_fixture(work, args.artifact)
    engine = engine_throughput(artifact, f"file://{banks}", "1", args.max_batch, "cpu", args.repeats)
    print(f"[scaleout] engine at {args.threads} thread(s), batch {args.max_batch}: {engine['fps']} fps",
          file=sys.stderr, flush=True)
    runs = [serve(n, artifact, banks, frames, args.load * n * engine["fps"], args) for n in (1, 2)]
    one, two = runs
    result = {
        "machine": machine(), "commit": commit(), "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cores": os.cpu_count(), "config": vars(args), "engine_one_worker": engine, "runs": runs,
        "adds": round(two["throughput_fps"] / (2 * one["throughput_fps"]), 3),
        "two_over_one": round(two["throughput_fps"] / one["throughput_fps"], 3),
        "accounted": all(r["accounted"] for r in runs),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("adds", "two_over_one", "accounted")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
