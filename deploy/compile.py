"""``inspector compile``: the served graph built for a backend, keyed to its build.

What each backend saves and how it is built and loaded is the registry ``inspector.backends``
(onnx: ``torch.onnx.export`` for onnxruntime and ``trtexec``; tensorrt: ``torch.export`` and
torch-tensorrt; inductor: ``torch.compile`` when the worker starts, so this command checks its
parity and times it). Every saved program has a JSON sidecar (``inspector.backends.ProgramKey``):
model digest, backend, precision, batch range, bank capacity, calibration, input size, device,
runtime version and bank dtype. The worker refuses a program whose key does not match its own
configuration and says what to rebuild.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from inspector.artifact import ModelCard, load_artifact
from inspector.backends import (BACKENDS, CompileError, ProgramKey, default_program_path, example_inputs,
                                make_runner, runtime_version)
from inspector.model.bank import bank_capacity
from inspector.model import InspectionModel
from inspector.model.serving import ServingGraph

__all__ = ["CompileError", "compile_program", "example_inputs", "parity"]


def compile_program(
    artifact: str | Path,
    backend: str,
    batches: Sequence[int],
    precision: str = "fp32",
    products: int = 16,
    calibration: str | None = None,
    out: str | Path | None = None,
    say: Callable[[str], None] = print,
) -> tuple[Path | None, ProgramKey | None, dict]:
    """Build ``backend``'s program for ``artifact``; return (path, key, parity report)."""
    model, card = load_artifact(artifact)
    calibration = calibration or card.model_config.score.calibration
    graph = ServingGraph(model, calibration).eval()
    lo, hi = min(batches), max(batches)
    if lo < 1:
        raise ValueError(f"batch sizes must be positive, got {list(batches)}")
    if backend not in BACKENDS or backend == "torch":
        raise ValueError(f"unknown backend {backend!r}: use onnx, tensorrt or inductor")
    spec = BACKENDS[backend]
    if spec.build is None:  # built when the worker starts: parity and timing only
        return None, None, parity(graph, model, backend, None, batches, products)
    path = Path(out) if out else default_program_path(artifact, backend, precision)
    device = spec.build(graph, model, lo, hi, products, precision, path, say)
    key = _key(card, model, backend, precision, lo, hi, products, calibration, device)
    _write_key(path, key)
    return path, key, parity(graph, model, backend, path, batches, products)


def _key(card: ModelCard, model, backend, precision, lo, hi, products, calibration, device: str) -> ProgramKey:
    return ProgramKey(model_id=card.model_id, backend=backend, precision=precision, batch_min=lo, batch_max=hi,
                      capacity=list(bank_capacity(model)), products=products, calibration=calibration,
                      input_size=model.input_size, device=device, runtime=runtime_version(backend),
                      bank_dtype=str(BACKENDS[backend].bank_dtype).removeprefix("torch."))


def _write_key(path: Path, key: ProgramKey) -> None:
    path.with_suffix(".json").write_text(key.to_json())


def parity(graph: ServingGraph, model: InspectionModel, backend: str, path: Path | None, batches: Sequence[int],
           products: int) -> dict:
    """Max |difference| of calibrated maps and scores against eager, per batch size, on random inputs."""
    runner = make_runner(backend, model, graph.calibration, path, device="cuda" if backend == "tensorrt" else "cpu")
    report = {}
    for b in sorted(set(batches)):
        args = example_inputs(model, b, products, seed=b, bank_dtype=BACKENDS[backend].bank_dtype)
        with torch.inference_mode():
            want = graph(*args)
        got = runner(*args)
        report[str(b)] = {
            "map_max_abs": float((got[0].float().cpu() - want[0]).abs().max()),
            "score_max_abs": float((got[2].float().cpu() - want[2]).abs().max()),
        }
    return report
