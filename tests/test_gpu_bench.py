"""The GPU benchmark's entry point (benchmarks/gpu.sh) runs wherever a CUDA machine is lent, once;
its CPU path runs here so the script cannot rot between loans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import REPO


def test_gpu_benchmark_entry_point_runs_and_records_each_stage(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    cmd = ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--out", str(out), "--device", "cpu", "--batches", "1",
           "--compile-batches", "", "--no-latency", "--repeats", "1", "--budget-s", "300"]
    proc = subprocess.run(cmd, env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "gpu.json").read_text())
    assert doc["missing_packages"] == []  # the test environment has every dependency
    assert doc["gmac_per_image"] > 1.0  # the served graph at 256 px: about 2.9 GMAC
    (eager,) = doc["eager"]  # CPU: fp32 only (fp16 and bf16 autocast are CUDA paths)
    assert eager["precision"] == "fp32"
    row = eager["batches"]["1"]
    assert row["images_per_s"] > 0
    # TFLOP/s is 2 FLOP per multiply-accumulate of the served graph at the measured rate.
    assert abs(row["tflops"] - 2 * doc["gmac_per_image"] * row["images_per_s"] / 1000) < 1e-3
    assert doc["compiled"] == [] and doc["latency"] == {"skipped": "--no-latency"}
    assert doc["best"]["what"] == "fp32" and doc["seconds"] > 0
