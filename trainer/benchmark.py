"""What every benchmark shares: the class-generalisation splits, the machine and commit a number
was measured on, the check for the shared inputs, and the measurement helpers more than one
benchmark uses. Benchmarks import this module (part of the project), never each other.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

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
    from inspector.engine import Engine, EngineSettings

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

    from deploy.compile import example_inputs
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
