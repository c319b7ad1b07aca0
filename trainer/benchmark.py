"""What every benchmark shares: the class-generalisation splits, the machine and commit a number
was measured on, the check for the shared inputs, and the measurement helpers more than one
benchmark uses. Benchmarks import this module (part of the project), never each other.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from inspector.model import InspectionModel, stack_banks
from inspector.model.graph import top_fraction_mean

from . import metrics

SPLITS = {
    "A": (("magnetic_tile", "ball_screw", "commutator"), ("pcb", "solar_cell")),
    "B": (("pcb", "solar_cell", "commutator"), ("magnetic_tile", "ball_screw")),
}


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "platform": platform.platform(),
    }


def inputs_present(*paths: str) -> bool:
    """True when every shared input exists; otherwise say which is missing on stderr."""
    for path in paths:
        if not Path(path).exists():
            print(f"error: {path} not found (this benchmark needs the shared data and weights)", file=sys.stderr)
            return False
    return True


def parse_checked(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line; exit 2, saying what is missing, when the shared inputs are absent."""
    args = parser.parse_args()
    if not inputs_present(args.data, args.weights):
        raise SystemExit(2)
    return args


def commit() -> str:
    """The repository's HEAD commit, with ``-dirty`` when the tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


SCORE_BATCH = 8


@torch.no_grad()
def scores_and_maps(model: InspectionModel, feats, bank) -> tuple[np.ndarray, np.ndarray]:
    """Raw image scores and ``(N, S, S)`` raw maps of every test image against one bank, hinted."""
    stacked, scores, maps = stack_banks([bank]), [], []
    for start in range(0, feats[0].shape[0], SCORE_BATCH):
        part = [f[start : start + SCORE_BATCH] for f in feats]
        raw = model.analyse(part, stacked, torch.zeros(part[0].shape[0], dtype=torch.long)).raw_map
        scores.append(top_fraction_mean(raw, model.cfg.score.top_fraction).numpy())
        maps.append(raw[:, 0].numpy())
    return np.concatenate(scores), np.concatenate(maps)


def pixel_metrics(cache, maps: np.ndarray) -> dict[str, float]:
    """Pixel AUROC and AUPRO (FPR <= 0.3) of the maps, on a class whose defects all have masks."""
    return {"pixel_auroc": metrics.roc_auc(cache.masks, maps), "aupro": metrics.aupro(cache.masks, maps, max_fpr=0.3)}


def engine_throughput(artifact: Path, store_url: str, line: str, batch: int, device: str, repeats: int) -> dict:
    """The engine's own throughput at ``batch`` on the line's registered banks (median of repeats)."""
    from inspector.artifact import load_artifact
    from inspector.banks import BankWatcher, open_store
    from inspector.worker.engine import Engine, EngineSettings

    model, card = load_artifact(artifact)
    engine = Engine(model, card, EngineSettings(device=device))
    store = open_store(store_url)
    w = BankWatcher(store, line, card.signature, model.channels)
    w.refresh()
    store.close()
    x = np.random.default_rng(0).integers(0, 255, (batch, model.input_size, model.input_size, 3), dtype=np.uint8)
    engine.infer(x, [None] * batch, w.snapshot)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.infer(x, [None] * batch, w.snapshot)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"batch": batch, "batch_seconds_median": round(t, 4), "fps": round(batch / t, 3),
            "batch_seconds": [round(v, 4) for v in times]}


def served_gmacs(model: InspectionModel, calibration: str, products: int = 2, trimmed: bool = True) -> float:
    """Multiply-accumulates (GMAC) of one image through the served graph in ``calibration`` mode
    (``torch.utils.flop_counter``, FLOPs / 2), against banks at the model's full capacity;
    ``trimmed`` as for ``ServingGraph``."""
    from torch.utils.flop_counter import FlopCounterMode

    from inspector.backends import example_inputs
    from inspector.model.serving import ServingGraph

    graph = ServingGraph(model, calibration, trimmed).eval()
    args = example_inputs(model, 1, products, bank_dtype=torch.float32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        graph(*args)
    return counter.get_total_flops() / 2 / 1e9


def matmul_gmacs(size: int = 4096, repeats: int = 3) -> float:
    """This machine's plain fp32 matmul rate (GMAC/s): ``size x size`` by ``size x size``,
    the median of ``repeats`` after a warm-up, on torch's threads."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return size ** 3 / statistics.median(times) / 1e9


# --- engine and worker timing, shared by engine.py, gpu.py, latency.py and scaleout.py ---------

REPO = Path(__file__).resolve().parents[1]
OFFLINE_WEIGHTS = REPO.parent / "shared" / "weights" / "resnet18-imagenet1k-l1-l3.safetensors"
BENCH_PRODUCTS = ("tiles", "rings")  # the generated products the latency benchmarks serve
DRAIN_S = 30.0  # after the last send, wait this long at most for the remaining results


def random_snapshot(model: InspectionModel, products: int):
    """A bank snapshot of ``products`` products of random features at the model's full capacity."""
    from inspector.banks import build_snapshot
    from inspector.banks.record import BankMeta
    from inspector.model.bank import bank_capacity
    from inspector.model import build_bank

    banks = {}
    for p in range(products):
        feats = [torch.randn(model.cfg.bank.shots, c, h, w) for c, (h, w) in zip(model.channels, model.grids)]
        bank = build_bank(feats, model.cfg.bank.coreset).with_stats(0.0, 1.0)
        banks[f"p{p}"] = (bank, BankMeta(f"p{p}", "", 4, [], [list(f.shape) for f in bank.features], 0.0, 1.0, "", ""))
    return build_snapshot(1, banks, bank_capacity(model), products)


def time_engine(engine, snap, batches, repeats: int) -> dict:
    """Median ``Engine.infer`` time per batch size on random frames, after one warm-up call each."""
    out = {}
    size = engine.input_size
    for b in batches:
        x = np.random.default_rng(b).integers(0, 255, (b, size, size, 3), dtype=np.uint8)
        t0 = time.perf_counter()
        engine.infer(x, [None] * b, snap)  # warm-up (and compilation for this shape)
        warm = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.infer(x, [None] * b, snap)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        out[str(b)] = {"batch_ms": round(1000 * t, 2), "images_per_s": round(b / t, 2), "warmup_s": round(warm, 2)}
        print(f"[engine] {engine.backend} batch {b}: {1000 * t:.1f} ms, {b / t:.2f} img/s", file=sys.stderr)
    return out


def config_artifact(cfg, path: Path) -> str:
    """An artifact of ``cfg`` with the offline backbone (when present) and untrained heads."""
    from inspector.testkit import config_artifact as save

    return str(save(cfg, path, OFFLINE_WEIGHTS))


def run_in_bf16(engine) -> None:
    """Run the engine's graph under bf16 autocast (CUDA only)."""
    run = engine.runner

    def bf16(*args):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return run(*args)

    engine.runner = bf16


def serving_fixture(workdir: Path, artifact: str | None) -> tuple[Path, Path, list[bytes]]:
    """An artifact (the default model when None), a file bank store with two generated products
    on line 1, and 256 px JPEG frames of both."""
    from inspector.artifact import load_artifact
    from inspector.banks import encode_bank, open_store
    from inspector.banks.register import read_shots, register_product
    from inspector.decode import encode_jpeg
    from inspector.testkit import default_artifact

    from .synthetic import generate_dataset

    data = generate_dataset(workdir / "data", classes=BENCH_PRODUCTS, n_train=8, n_test_good=8, n_test_defect=8,
                            size=256, seed=0)
    if artifact is None:
        artifact = str(default_artifact(workdir / "model", weights=OFFLINE_WEIGHTS))
    model, card = load_artifact(artifact)
    store = open_store(f"file://{workdir / 'banks'}")
    for p in BENCH_PRODUCTS:
        images = read_shots([data / p / "train" / "good"], model.input_size)
        reg = register_product(model, card.signature, card.model_id, p, images, model.cfg.bank.images, model.cfg.bank.coreset,
                               min_images=model.cfg.bank.shots)
        store.put("1", encode_bank(reg.bank, reg.meta), reg.meta)
    frames = []
    for p in BENCH_PRODUCTS:
        for f in sorted((data / p / "test").rglob("*.png")):
            frames.append(encode_jpeg(read_shots([f], model.input_size)[0].pixels))
    return Path(artifact), workdir / "banks", frames


def start_worker(artifact: Path, banks: Path, ingest: str, publish: str, device: str, max_batch: int,
                 max_delay_ms: float, queue_size: int, extra: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    """``inspector run`` for line 1 as a separate process, serving ``banks`` (a file store)."""
    cmd = [sys.executable, "-m", "inspector", "run", "--line", "1", "--artifact", str(artifact),
           "--store", f"file://{banks}", "--bind", ingest, "--publish-bind", publish, "--http-port", "0",
           "--device", device, "--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms),
           "--deadline-ms", "600000", "--heatmaps", "fail", "--set", f"engine.batch_sizes={max_batch}",
           "--queue-size", str(queue_size), "--log-level", "warning", *extra]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=path, **(env or {})))


def open_loop(push, sub, frames: list[bytes], rate: float, seconds: float, poisson: bool, tag: str) -> dict:
    """Send at ``rate`` fps for ``seconds`` on an absolute schedule (open loop: sending never waits
    for results); collect every result; latency percentiles, throughput and the accounting."""
    from inspector.wire import FrameHeader, Result, encode_frame

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
