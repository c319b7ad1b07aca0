"""Soak: the real worker for a long run at 70% of capacity, with bank changes and a Redis restart.

    python benchmarks/soak.py [--minutes 30] [--size 256] [--load 0.7] [--bank-every-s 60]
                              [--redis-restart-at 0.5] [--redis-down-s 5] [--sample-s 5]
                              [--warmup-s S] [--device cpu] [--out benchmarks/results/soak] [--keep-work]

1. Starts its own ``redis-server`` (free port, append-only file in a temporary folder) and
   registers two generated products there; the model is the default configuration at
   ``--size`` px (256 by default: what a line runs) with the offline ImageNet backbone when
   ``../shared/weights`` has it, and untrained heads (latency and memory do not depend on them).
2. Measures the engine's own throughput at ``--max-batch`` (median of repeats): the capacity.
3. Runs ``inspector run`` as a separate process and pushes JPEG frames (``inspector.tools.camera``,
   periodic, open loop) at ``--load`` x capacity for ``--minutes``; a subscriber records every
   result (the format of ``inspector tail --record``). Meanwhile, every ``--bank-every-s``
   seconds ``inspector bank add`` re-registers one of the products (alternating), and at
   ``--redis-restart-at`` of the run Redis is stopped for ``--redis-down-s`` seconds and
   started again. Every ``--sample-s`` seconds the worker's RSS (``/proc/<pid>/status`` VmRSS),
   open file descriptors (``/proc/<pid>/fd``) and threads are sampled, with its metrics.
4. At the end: the worker is stopped with SIGTERM, and :mod:`inspector.tools.reconcile` joins the
   send record with the subscriber's results and with the Redis results stream.

Bars: after the warm-up (``--warmup-s``; by default the first five minutes of a full run, the
first third of a short one), RSS grows less than 5% (median of the first sampled minute against
median of the last), open file descriptors do not grow at all, latency does not drift (first
against last full minute after warm-up: p50 within 1.2x, p99 within 1.5x; the p99 bar is wider
because the ``bank add`` process of each minute shares the 2 cores with the worker for 7-15 s,
measured at 256 px, and the queue it builds sets that minute's p99), and
every frame sent has exactly one result (none missing, none duplicated, in the subscriber's
record and in the Redis stream). Writes ``<out>.json`` and ``<out>.png``; a run shorter than 30
minutes says so in the file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import zmq

from trainer.benchmark import OFFLINE_WEIGHTS, engine_throughput, machine

from inspector.artifact import load_artifact
from inspector.testkit import RedisServer, default_artifact, free_port, wait_for_worker
from inspector.banks import encode_bank, open_store
from inspector.banks.register import read_shots, register_product
from inspector.tools.camera import CameraConfig, FrameSource, publish_frames
from inspector.tools.reconcile import read_result_records, read_result_stream, read_sent, reconcile, stream_key
from inspector.wire import Result
from trainer.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]
PRODUCTS = ("tiles", "rings")
LINE = "1"
FULL_RUN_MINUTES = 30  # the soak the bars are meant for; shorter runs are marked as such
S_PER_MIN = 60
NS_PER_S = 1_000_000_000
MS_PER_S = 1000
MIB = 1024 * 1024
KIB = 1024
RSS_GROWTH_BAR = 0.05  # RSS after warm-up may grow less than 5% over the run
FD_GROWTH_BAR = 0  # open file descriptors may not grow at all
P50_DRIFT_BAR = 1.2  # last minute's p50 over the first's
P99_DRIFT_BAR = 1.5  # wider: a bank add shares the cores for a few seconds of each minute
READY_TIMEOUT_S = 300.0  # model load and warm-up of a 256 px model on a slow machine
DRAIN_S = 60.0  # after the last frame, wait this long at most for the remaining results
STOP_TIMEOUT_S = 120.0  # SIGTERM drains the queue: at most a few batches at 70% load
RECV_POLL_MS = 100  # bounds how late the receiver notices the end of the run
ENGINE_REPEATS = 7
DEADLINE_MS = 60_000  # frames never time out in the soak: latency is measured, not clipped
PERCENTILES = (50, 99)
# The worker's RSS steps up over its first few bank swaps (the allocator settles on a working set
# for the padded bank tensors; measured: ~5 swaps, then it moves within about +-50 MiB around a
# flat floor) so the default warm-up covers the first five bank changes of a full run.
WARMUP_MAX_S = 300.0
WARMUP_SHARE = 3  # a short run leaves out its first third
OPERATOR_POLL_S = 1.0  # the operator thread re-checks its schedule and the end of the run this often


def head_commit() -> str:
    """The checked-out commit, read from ``.git`` files (no git process), or "unknown"."""
    try:
        head = (REPO / ".git" / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[len("ref: "):]
        path = REPO / ".git" / ref
        if path.is_file():
            return path.read_text().strip()
        for line in (REPO / ".git" / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


def prepare(work: Path, size: int, redis_url: str) -> tuple[Path, Path]:
    """A model artifact and two products registered in Redis; returns (artifact, data root)."""
    data = generate_dataset(work / "data", classes=PRODUCTS, n_train=8, n_test_good=8, n_test_defect=8,
                            size=size, seed=0)
    model, card = load_artifact(default_artifact(work / "model", size, OFFLINE_WEIGHTS))
    store = open_store(redis_url)
    for p in PRODUCTS:
        images = read_shots([data / p / "train" / "good"], model.input_size)
        reg = register_product(model, card.signature, card.model_id, p, images, model.cfg.bank.images, model.cfg.bank.coreset,
                               min_images=model.cfg.bank.shots)
        store.put(LINE, encode_bank(reg.bank, reg.meta), reg.meta)
    store.close()
    return work / "model", data


def start_worker(args, artifact: Path, redis_url: str, ingest: str, publish: str, http_port: int,
                 log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "inspector", "run", "--line", LINE, "--artifact", str(artifact),
           "--store", redis_url, "--bind", ingest, "--publish-bind", publish, "--http-port", str(http_port),
           "--device", args.device, "--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms),
           "--deadline-ms", str(DEADLINE_MS), "--heatmaps", "fail", "--set", f"engine.batch_sizes={args.max_batch}"]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=out, stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, ingest: str, publish: str, log: Path) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(publish)
    push = ctx.socket(zmq.PUSH)
    push.connect(ingest)
    try:
        wait_for_worker(push, sub, READY_TIMEOUT_S, alive=lambda: proc.poll() is None,
                        why_dead=lambda: log.read_text()[-3000:])
    finally:
        push.close(0)
        sub.close(0)
        ctx.term()


class Receiver(threading.Thread):
    """Records every result header (``inspector tail --record`` format) and its receive time."""

    def __init__(self, publish: str, record: Path) -> None:
        super().__init__(name="receiver", daemon=True)
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, f"result.{LINE}.".encode())
        self.sub.setsockopt(zmq.RCVHWM, 0)  # never drop: the soak accounts for every result
        self.sub.connect(publish)
        self.record = record
        self.stop = threading.Event()
        self.received: list[tuple[Result, int]] = []  # (result, receive time ns)

    def run(self) -> None:
        with open(self.record, "w", encoding="utf-8") as out:
            while not self.stop.is_set():
                if not self.sub.poll(RECV_POLL_MS):
                    continue
                result, _ = Result.from_frames(self.sub.recv_multipart())
                now = time.time_ns()
                if result.frame_id:  # the readiness probes' error results name no frame
                    out.write(result.to_json().decode("utf-8") + "\n")
                    self.received.append((result, now))
        self.sub.close(0)
        self.ctx.term()


def proc_sample(pid: int) -> dict:
    status = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            status[key] = value.split()
    return {"rss_mib": round(int(status["VmRSS"][0]) * KIB / MIB, 2), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(status["Threads"][0])}


def scrape(port: int) -> dict:
    """A few gauges and counters from ``/metrics`` (None where the scrape fails)."""
    wanted = {"inspector_queue_depth": "queue_depth", "inspector_stream_lost_total": "stream_lost",
              "inspector_stream_buffered": "stream_buffered", "inspector_bank_epoch": "bank_epoch",
              "inspector_dropped_total": "dropped"}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return {v: None for v in wanted.values()}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[wanted[name]] = float(value)
    return out


class Monitor(threading.Thread):
    """Samples the worker process and its metrics every ``every_s`` seconds."""

    def __init__(self, pid: int, http_port: int, every_s: float, t0: float) -> None:
        super().__init__(name="monitor", daemon=True)
        self.pid, self.http_port, self.every_s, self.t0 = pid, http_port, every_s, t0
        self.stop = threading.Event()
        self.samples: list[dict] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                sample = {"t_s": round(time.monotonic() - self.t0, 1), **proc_sample(self.pid)}
            except (OSError, KeyError):
                return  # the worker is gone
            self.samples.append({**sample, **scrape(self.http_port)})
            self.stop.wait(self.every_s)


def line_operator(args, redis: RedisServer, artifact: Path, data: Path, t0: float, stop: threading.Event,
             events: list[dict]) -> None:
    """Bank changes every ``--bank-every-s`` (alternating products) and one Redis restart."""
    duration = args.minutes * S_PER_MIN
    restart_at = args.redis_restart_at * duration
    next_bank = args.bank_every_s
    restarted = False
    k = 0
    while not stop.is_set():
        now = time.monotonic() - t0
        if not restarted and now >= restart_at:
            redis.stop()
            events.append({"t_s": round(now, 1), "event": "redis_stopped"})
            stop.wait(args.redis_down_s)
            redis.start()
            events.append({"t_s": round(time.monotonic() - t0, 1), "event": "redis_started"})
            restarted = True
            continue
        if now >= next_bank:
            product = PRODUCTS[k % len(PRODUCTS)]
            k += 1
            t_add = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-m", "inspector", "bank", "add", "--line", LINE, "--product", product,
                 "--store", redis.url, "--artifact", str(artifact), str(data / product / "train" / "good")],
                env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
            events.append({"t_s": round(now, 1), "event": "bank_add", "product": product, "rc": proc.returncode,
                           "seconds": round(time.monotonic() - t_add, 2),
                           **({"stderr": proc.stderr[-500:]} if proc.returncode else {})})
            next_bank += args.bank_every_s
            continue
        upcoming = next_bank if restarted else min(next_bank, restart_at)
        stop.wait(min(OPERATOR_POLL_S, max(0.0, upcoming - now)))


def per_minute(received: list[tuple[Result, int]], t0_ns: int) -> list[dict]:
    """End-to-end latency (capture to receipt) percentiles per minute of capture time."""
    buckets: dict[int, list[float]] = {}
    for result, recv_ns in received:
        minute = (result.ts_ns - t0_ns) // (S_PER_MIN * NS_PER_S)
        buckets.setdefault(int(minute), []).append((recv_ns - result.ts_ns) / (NS_PER_S / MS_PER_S))
    return [{"minute": m, "n": len(v), **{f"p{q}_ms": round(float(np.percentile(v, q)), 1) for q in PERCENTILES}}
            for m, v in sorted(buckets.items())]


def median_of(samples: list[dict], key: str, lo: float, hi: float) -> float | None:
    values = [s[key] for s in samples if lo <= s["t_s"] < hi]
    return statistics.median(values) if values else None


def judge(args, samples: list[dict], minutes: list[dict], accounting: dict) -> dict:
    after = [s for s in samples if s["t_s"] >= args.warmup_s]
    last_t = samples[-1]["t_s"] if samples else 0.0
    rss_first = median_of(samples, "rss_mib", args.warmup_s, args.warmup_s + S_PER_MIN)
    rss_last = median_of(samples, "rss_mib", last_t - S_PER_MIN, last_t + 1)
    rss_growth = (rss_last / rss_first - 1) if rss_first and rss_last else None
    fd_first, fd_last = (after[0]["fds"], after[-1]["fds"]) if after else (None, None)
    run_s = args.minutes * S_PER_MIN
    full = [m for m in minutes if m["minute"] * S_PER_MIN >= args.warmup_s and (m["minute"] + 1) * S_PER_MIN <= run_s]
    first, last = (full[0], full[-1]) if full else (None, None)
    drift = {q: round(last[f"{q}_ms"] / first[f"{q}_ms"], 3) if first else None for q in ("p50", "p99")}
    bars = {
        "rss_first_minute_mib": rss_first, "rss_last_minute_mib": rss_last,
        "rss_growth": round(rss_growth, 4) if rss_growth is not None else None, "rss_growth_bar": RSS_GROWTH_BAR,
        "fds_after_warmup": fd_first, "fds_at_end": fd_last, "fds_max_after_warmup": max((s["fds"] for s in after), default=None),
        "fd_growth_bar": FD_GROWTH_BAR,
        "latency_first_minute": first, "latency_last_minute": last,
        "p50_drift": drift["p50"], "p50_drift_bar": P50_DRIFT_BAR, "p99_drift": drift["p99"], "p99_drift_bar": P99_DRIFT_BAR,
    }
    bars["passed"] = {
        "rss": rss_growth is not None and rss_growth < RSS_GROWTH_BAR,
        "fds": fd_first is not None and fd_last - fd_first <= FD_GROWTH_BAR,
        "latency_drift": drift["p50"] is not None and drift["p50"] <= P50_DRIFT_BAR and drift["p99"] <= P99_DRIFT_BAR,
        "accounting": accounting["results_record"]["ok"] and accounting["redis_stream"]["ok"]
        and accounting["stream_lost"] == 0,
    }
    return bars


def account(redis_url: str, work: Path, sent, summary, exit_code: int, final_metrics: dict) -> dict:
    """Every sent frame against the results received on the PUB socket and in the Redis stream."""
    store = open_store(redis_url)
    from_stream = reconcile(sent, read_result_stream(store.client, stream_key("inspector", LINE)))
    store.close()
    from_record = reconcile(sent, read_result_records([work / "results.jsonl"]))
    return {"sent": summary.sent, "not_sent": summary.not_sent, "worker_exit_code": exit_code,
            "results_record": _accounting(from_record), "redis_stream": _accounting(from_stream),
            "stream_lost": final_metrics.get("stream_lost"), "dropped": final_metrics.get("dropped")}


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    (work / "redis").mkdir()
    redis = RedisServer(work / "redis", fsync_always=False)
    redis.start()
    proc = None
    try:
        artifact, data = prepare(work, args.size, redis.url)
        engine = engine_throughput(artifact, redis.url, LINE, args.max_batch, args.device, ENGINE_REPEATS)
        rate = args.load * engine["fps"]
        print(f"[soak] engine {engine['fps']} fps at batch {args.max_batch}; sending {rate:.2f} fps for "
              f"{args.minutes} min", file=sys.stderr)
        ingest, publish, http_port = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}", free_port()
        log = work / "worker.log"
        proc = start_worker(args, artifact, redis.url, ingest, publish, http_port, log)
        receiver = Receiver(publish, work / "results.jsonl")
        receiver.start()
        wait_ready(proc, ingest, publish, log)
        t0, t0_ns = time.monotonic(), time.time_ns()
        monitor = Monitor(proc.pid, http_port, args.sample_s, t0)
        monitor.start()
        events: list[dict] = []
        stop_operator = threading.Event()
        op = threading.Thread(target=line_operator, args=(args, redis, artifact, data, t0, stop_operator, events), daemon=True)
        op.start()
        source = FrameSource.from_folder(data)
        camera = CameraConfig(connect=ingest, camera="soak", rate_fps=rate, duration_s=args.minutes * S_PER_MIN,
                              run_id="soak", hint=False)
        summary = publish_frames(source, camera, record=work / "sent.jsonl")
        stop_operator.set()
        op.join()
        sent = read_sent([work / "sent.jsonl"])
        end = time.monotonic() + DRAIN_S
        while len(receiver.received) < len(sent) and time.monotonic() < end:
            time.sleep(RECV_POLL_MS / MS_PER_S)
        final_metrics = scrape(http_port)
        monitor.stop.set()
        monitor.join()
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(STOP_TIMEOUT_S)
        receiver.stop.set()
        receiver.join()
        accounting = account(redis.url, work, sent, summary, exit_code, final_metrics)
        minutes = per_minute(receiver.received, t0_ns)
        return {"engine": engine, "offered_fps": round(rate, 3), "achieved_send_fps": round(summary.rate_fps, 3),
                "samples": monitor.samples, "events": events, "latency_per_minute": minutes,
                "accounting": accounting, "bars": judge(args, monitor.samples, minutes, accounting),
                "worker_log_tail": log.read_text(errors="replace")[-2000:] if exit_code else ""}
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        redis.stop()
        if args.keep_work:
            print(f"[soak] work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _accounting(rec) -> dict:
    return {"ok": rec.ok, "sent": rec.sent, "results": rec.results, "missing": len(rec.missing),
            "duplicated": len(rec.duplicated), "verdicts": rec.verdicts, "first_missing": list(rec.missing[:10])}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=False)
    t = [s["t_s"] / S_PER_MIN for s in samples]
    axes[0].plot(t, [s["rss_mib"] for s in samples], marker=".")
    axes[0].set_ylabel("RSS (MiB)")
    axes[1].plot(t, [s["fds"] for s in samples], marker=".", label="open fds")
    axes[1].plot(t, [s["threads"] for s in samples], marker=".", label="threads")
    axes[1].set_ylabel("count")
    axes[1].legend(fontsize=7)
    for ax in axes[:2]:
        for e in result["events"]:
            color = "tab:red" if e["event"].startswith("redis") else "tab:gray"
            ax.axvline(e["t_s"] / S_PER_MIN, color=color, linewidth=0.6, alpha=0.6)
        ax.axvline(result["config"]["warmup_s"] / S_PER_MIN, color="black", linestyle=":", linewidth=0.8)
        ax.set_xlabel("minutes (gray: bank add, red: Redis stop/start, dotted: end of warm-up)")
    minutes = result["latency_per_minute"]
    for q in PERCENTILES:
        axes[2].plot([m["minute"] for m in minutes], [m[f"p{q}_ms"] for m in minutes], marker="o", label=f"p{q}")
    axes[2].set_xlabel("minute of the run")
    axes[2].set_ylabel("end-to-end latency (ms)")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"soak {result['config']['minutes']} min at {result['config']['load']:.0%} of "
                 f"{result['engine']['fps']} fps ({result['config']['size']} px)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=FULL_RUN_MINUTES)
    p.add_argument("--size", type=int, default=256, help="model input size (256: the default model)")
    p.add_argument("--load", type=float, default=0.7, help="offered load as a fraction of engine throughput")
    p.add_argument("--bank-every-s", type=float, default=60.0, help="seconds between bank changes")
    p.add_argument("--redis-restart-at", type=float, default=0.5, help="fraction of the run")
    p.add_argument("--redis-down-s", type=float, default=5.0)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--warmup-s", type=float, default=None,
                   help=f"seconds left out of the bars (default: a third of the run, at most {WARMUP_MAX_S:g})")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary folder (data, logs, records)")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-delay-ms", type=float, default=10.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak"))
    args = p.parse_args(argv)
    if args.warmup_s is None:
        args.warmup_s = min(WARMUP_MAX_S, args.minutes * S_PER_MIN / WARMUP_SHARE)
    measured = run(args)
    short = args.minutes < FULL_RUN_MINUTES
    result = {
        "machine": machine(), "commit": head_commit(), "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "short_run": short,
        "note": (f"a short {args.minutes:g}-minute run that checks the soak end to end; the bars are meant for "
                 f"{FULL_RUN_MINUTES} minutes" if short else f"the full {FULL_RUN_MINUTES}-minute soak"),
        "config": vars(args), **measured,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"bars": result["bars"], "accounting": result["accounting"]}, indent=2))
    return 0 if all(result["bars"]["passed"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
