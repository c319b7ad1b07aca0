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
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from trainer.benchmark import commit, engine_throughput, machine

from inspector.artifact import load_artifact
from inspector.banks import encode_bank, open_store
from inspector.banks.register import read_shots, register_product
from inspector.decode import encode_jpeg
from inspector.testkit import default_artifact, free_port, wait_for_worker
from inspector.wire import FrameHeader, Result, encode_frame
from trainer.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "weights" / "resnet18-imagenet1k-l1-l3.safetensors"
PRODUCTS = ("tiles", "rings")
OVERLOAD = 1.5  # offered load of the saturation run, as a multiple of engine capacity
DRAIN_S = 30.0  # after the last send, wait this long at most for the remaining results
READY_TIMEOUT_S = 300.0  # model load and warm-up on a slow machine


def prepare(workdir: Path, artifact: str | None, device: str) -> tuple[Path, Path, list[bytes]]:
    """An artifact, a file bank store with two products, and JPEG frames of both."""
    data = generate_dataset(workdir / "data", classes=PRODUCTS, n_train=8, n_test_good=8, n_test_defect=8,
                            size=256, seed=0)
    if artifact is None:
        artifact = str(default_artifact(workdir / "model", weights=WEIGHTS))
    model, card = load_artifact(artifact)
    store = open_store(f"file://{workdir / 'banks'}")
    for p in PRODUCTS:
        images = read_shots([data / p / "train" / "good"], model.input_size)
        reg = register_product(model, card.signature, card.model_id, p, images, model.cfg.bank.images, model.cfg.bank.coreset,
                               min_images=model.cfg.bank.shots)
        store.put("1", encode_bank(reg.bank, reg.meta), reg.meta)
    frames = []
    for p in PRODUCTS:
        for f in sorted((data / p / "test").rglob("*.png")):
            frames.append(encode_jpeg(read_shots([f], model.input_size)[0].pixels))
    return Path(artifact), workdir / "banks", frames


def start_worker(artifact: Path, banks: Path, args, ingest: str, publish: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "inspector", "run", "--line", "1", "--artifact", str(artifact),
           "--store", f"file://{banks}", "--bind", ingest, "--publish-bind", publish, "--http-port", "0",
           "--device", args.device, "--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms),
           "--deadline-ms", "600000", "--heatmaps", "fail", "--set", f"engine.batch_sizes={args.max_batch}",
           "--queue-size", str(args.queue_size), "--log-level", "warning"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(cmd, env=env)


def one_run(push, sub, frames: list[bytes], rate: float, seconds: float, poisson: bool, tag: str) -> dict:
    """Send at ``rate`` fps for ``seconds`` on an absolute schedule; collect every result."""
    rng = np.random.default_rng(0)
    n = max(1, int(rate * seconds))
    gaps = rng.exponential(1.0 / rate, n) if poisson else np.full(n, 1.0 / rate)
    schedule = np.concatenate([[0.0], np.cumsum(gaps)[:-1]])
    sent: dict[str, int] = {}
    received: dict[str, tuple[Result, int]] = {}

    def receive() -> None:
        end = None
        while True:
            if sub.poll(100):
                r, _ = Result.from_frames(sub.recv_multipart())
                if r.frame_id.startswith(tag):
                    received[r.frame_id] = (r, time.time_ns())
            if len(sent) == n and end is None:
                end = time.monotonic() + DRAIN_S
            if end is not None and (len(received) >= n or time.monotonic() > end):
                return

    rx = threading.Thread(target=receive)
    rx.start()
    t0 = time.monotonic()
    for i, at in enumerate(schedule):
        delay = t0 + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        fid = f"{tag}-{i}"
        h = FrameHeader(frame_id=fid, camera="bench", ts_ns=time.time_ns(), encoding="jpeg")
        sent[fid] = h.ts_ns
        push.send_multipart(encode_frame(h, frames[i % len(frames)]))
    send_s = time.monotonic() - t0
    rx.join()
    e2e = np.array([(done - sent[f]) / 1e6 for f, (r, done) in received.items()])
    worker_total = np.array([r.latency_ms.total for r, _ in received.values()])
    verdicts: dict[str, int] = {}
    for r, _ in received.values():
        verdicts[r.verdict] = verdicts.get(r.verdict, 0) + 1
    served = [done for r, done in received.values() if r.verdict in ("pass", "fail")]
    span = (max(served) - min(sent.values())) / 1e9 if served else float("nan")
    pct = lambda a, q: round(float(np.percentile(a, q)), 1) if len(a) else None  # noqa: E731
    return {
        "offered_fps": round(rate, 3), "arrivals": "poisson" if poisson else "periodic", "sent": n,
        "send_seconds": round(send_s, 2), "results": len(received), "verdicts": verdicts,
        "throughput_fps": round(len(served) / span, 3) if served else 0.0,
        "e2e_ms": {"p50": pct(e2e, 50), "p95": pct(e2e, 95), "p99": pct(e2e, 99), "max": pct(e2e, 100)},
        "worker_total_ms": {"p50": pct(worker_total, 50), "p99": pct(worker_total, 99)},
        "accounted": len(received) == n,
    }


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
    artifact, banks, frames = prepare(work, args.artifact, args.device)
    engine = engine_throughput(artifact, f"file://{banks}", "1", args.max_batch, args.device, args.repeats)
    print(f"[latency] engine: batch {args.max_batch} in {engine['batch_seconds_median']}s -> {engine['fps']} fps",
          file=sys.stderr)
    ingest, publish = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    proc = start_worker(artifact, banks, args, ingest, publish)
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
            r = one_run(push, sub, frames, fraction * engine["fps"], args.seconds, poisson, f"run{k}")
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
    sat = runs[-1]
    half = [r for r in runs if r["load"] == 0.5]
    bound = 2 * engine["batch_seconds_median"] * 1000 + args.max_delay_ms
    result = {
        "machine": machine(), "commit": commit(), "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": vars(args), "engine": engine, "runs": runs,
        "bars": {
            "saturation_over_engine": round(sat["throughput_fps"] / engine["fps"], 3),
            "saturation_bar": 0.9,
            "p99_at_half_load_ms": [r["e2e_ms"]["p99"] for r in half],
            "p99_bound_ms": round(bound, 1),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result["bars"], indent=2))
    return 0


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
