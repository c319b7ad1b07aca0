"""``inspector compile``: the served graph exported and compiled for a backend, keyed to its build.

- ``onnx``: ``torch.onnx.export`` (dynamo exporter) with a dynamic batch and the banks as inputs
  at a fixed capacity; runs in onnxruntime (CPU-only line PCs) and feeds ``trtexec``.
- ``tensorrt``: ``torch.export`` of the same graph with a dynamic batch range, compiled with
  torch-tensorrt's dynamo path and saved as an exported program. torch-tensorrt is imported only
  here and in the worker's TensorRT runner; it is absent on development machines.
- ``inductor``: ``torch.compile`` happens when the worker starts (it cannot be saved); this
  command checks parity and times it.

Every saved program has a JSON sidecar (``inspector.engine.ProgramKey``): model digest, backend,
precision, batch range, bank capacity, calibration, input size, device and runtime version. The
worker refuses a program whose key does not match its own configuration and says what to rebuild.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.export import Dim, export

from inspector.artifact import ModelCard, load_artifact
from inspector.engine import PROGRAM_BANK_DTYPE, ProgramKey, bank_capacity, default_program_path, runtime_version
from inspector.model import InspectionModel
from inspector.model.bank import BANK_DTYPE, ProductBank, stack_banks
from inspector.model.serving import OUTPUT_NAMES, ServingGraph, input_names

ONNX_OPSET = 18  # the dynamo exporter's default opset; onnxruntime >= 1.14 and trtexec 8.6+ read it


class CompileError(RuntimeError):
    """A backend cannot build the program here; the message says what is missing."""


def example_inputs(model: InspectionModel, batch: int, products: int, seed: int = 0,
                   bank_dtype: torch.dtype = BANK_DTYPE) -> tuple[torch.Tensor, ...]:
    """Flat serving inputs of the right shapes: random frames and random banks at full capacity,
    the bank tensors in ``bank_dtype`` (what the program takes: ``PROGRAM_BANK_DTYPE``).

    Every product's bank is its own random unit vectors (and prototype), so routing has a clear
    winner: products with equal prototypes would tie, and runtimes may break ties differently.
    """
    gen = torch.Generator().manual_seed(seed)
    size = model.input_size
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen)
    capacity = bank_capacity(model)
    banks = [ProductBank(tuple(F.normalize(torch.randn(n, c, generator=gen), dim=1).to(BANK_DTYPE)
                               for n, c in zip(capacity, model.channels)),
                         F.normalize(torch.randn(model.channels[-1], generator=gen), dim=0),
                         torch.tensor([0.0, 1.0])) for _ in range(products)]
    bank = stack_banks(banks, capacity)
    hint = torch.full((batch,), -1, dtype=torch.long)
    return (images, hint, bank.prototypes, bank.stats, *(f.to(bank_dtype) for f in bank.features))


def dynamic_shapes(levels: int, batch_min: int, batch_max: int) -> tuple:
    batch = Dim("batch", min=batch_min, max=batch_max)
    return ({0: batch}, {0: batch}, None, None, *([None] * levels))


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
    levels = len(model.channels)
    if backend == "onnx":
        if precision != "fp32":
            raise CompileError("the onnx backend is built in fp32 (onnxruntime on CPU has no faster fp16 path); "
                               "use --precision fp32, or --backend tensorrt for fp16 on a GPU")
        path = Path(out) if out else default_program_path(artifact, backend, precision)
        key = _key(card, model, backend, precision, lo, hi, products, calibration, "cpu")
        t0 = time.perf_counter()
        export_onnx(graph, model, lo, hi, products, path)
        say(f"exported ONNX in {time.perf_counter() - t0:.1f}s: {path}")
        _write_key(path, key)
        return path, key, parity(graph, model, backend, path, batches, products)
    if backend == "tensorrt":
        path = Path(out) if out else default_program_path(artifact, backend, precision)
        key = compile_tensorrt(graph, model, card, lo, hi, products, precision, calibration, path, say)
        _write_key(path, key)
        return path, key, parity(graph, model, backend, path, batches, products)
    if backend == "inductor":
        return None, None, parity(graph, model, backend, None, batches, products)
    raise ValueError(f"unknown backend {backend!r}: use onnx, tensorrt or inductor")


def _key(card: ModelCard, model, backend, precision, lo, hi, products, calibration, device: str) -> ProgramKey:
    return ProgramKey(model_id=card.model_id, backend=backend, precision=precision, batch_min=lo, batch_max=hi,
                      capacity=list(bank_capacity(model)), products=products, calibration=calibration,
                      input_size=model.input_size, device=device, runtime=runtime_version(backend),
                      bank_dtype=str(PROGRAM_BANK_DTYPE[backend]).removeprefix("torch."))


def _write_key(path: Path, key: ProgramKey) -> None:
    path.with_suffix(".json").write_text(key.to_json())


def export_onnx(graph: ServingGraph, model: InspectionModel, lo: int, hi: int, products: int, path: Path) -> None:
    """ONNX with a dynamic batch dimension; bank inputs at their fixed capacity."""
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = len(model.channels)
    args = example_inputs(model, max(2, lo), products, bank_dtype=PROGRAM_BANK_DTYPE["onnx"])  # batch 1 would be specialised away
    torch.onnx.export(graph, args, str(path), dynamo=True, dynamic_shapes=dynamic_shapes(levels, lo, hi),
                      input_names=list(input_names(levels)), output_names=list(OUTPUT_NAMES),
                      opset_version=ONNX_OPSET, external_data=True, verbose=False)


def compile_tensorrt(graph, model, card, lo, hi, products, precision, calibration, path: Path, say) -> ProgramKey:
    """torch.export -> torch-tensorrt dynamo compile -> saved exported program."""
    try:
        import torch_tensorrt  # noqa: F401  (only here and in the worker's TensorRT runner)
    except ImportError as err:
        raise CompileError(
            "torch-tensorrt is not installed: on the line PC install the `tensorrt` extra "
            "(pip install 'inspector[tensorrt]' with NVIDIA's package index reachable)") from err
    if not torch.cuda.is_available():
        raise CompileError("TensorRT needs a CUDA GPU; none is visible")
    levels = len(model.channels)
    graph = graph.cuda()
    args = tuple(a.cuda() for a in example_inputs(model, max(2, lo), products, bank_dtype=PROGRAM_BANK_DTYPE["tensorrt"]))
    program = export(graph, args, dynamic_shapes=dynamic_shapes(levels, lo, hi))
    inputs = _trt_inputs(torch_tensorrt, args, lo, hi)
    t0 = time.perf_counter()
    compiled = torch_tensorrt.dynamo.compile(program, arg_inputs=inputs, **precision_kwargs(torch_tensorrt, precision))
    say(f"built TensorRT engine in {time.perf_counter() - t0:.0f}s")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch_tensorrt.save(compiled, str(path), output_format="exported_program", arg_inputs=list(args))
    return _key(card, model, "tensorrt", precision, lo, hi, products, calibration, torch.cuda.get_device_name())


def _trt_inputs(trt, args, lo: int, hi: int) -> list:
    """Batch-dynamic ``Input`` specs for images and hint; fixed ones for the bank tensors."""
    out = []
    for i, a in enumerate(args):
        if i < 2:  # images, hint: dynamic batch
            shape = list(a.shape)
            out.append(trt.Input(min_shape=[lo, *shape[1:]], opt_shape=[hi, *shape[1:]], max_shape=[hi, *shape[1:]],
                                 dtype=a.dtype))
        else:
            out.append(trt.Input(shape=list(a.shape), dtype=a.dtype))
    return out


def precision_kwargs(trt, precision: str) -> dict:
    """fp16 for the convolutions and matmuls, fp32 where the graph casts (|z|^2 and log-det sums).

    torch-tensorrt changed its precision API: releases with ``enable_autocast`` respect the
    graph's explicit dtypes and lower the rest to fp16 themselves; earlier ones take
    ``enabled_precisions``. Both keep the graph's explicit fp32 casts (``flow.log_likelihood``).
    """
    if precision == "fp32":
        return {}
    if precision != "fp16":
        raise ValueError(f"precision must be fp16 or fp32, got {precision!r}")
    params = inspect.signature(trt.dynamo.compile).parameters
    if "enable_autocast" in params:
        kwargs = {"use_explicit_typing": True, "enable_autocast": True}
        if "autocast_low_precision_type" in params:
            kwargs["autocast_low_precision_type"] = torch.float16
        return kwargs
    return {"enabled_precisions": {torch.float16, torch.float32}}


def parity(graph: ServingGraph, model: InspectionModel, backend: str, path: Path | None, batches: Sequence[int],
           products: int) -> dict:
    """Max |difference| of calibrated maps and scores against eager, per batch size, on random inputs."""
    from inspector.engine import make_runner

    runner = make_runner(backend, model, graph.calibration, path, device="cuda" if backend == "tensorrt" else "cpu")
    report = {}
    for b in sorted(set(batches)):
        args = example_inputs(model, b, products, seed=b, bank_dtype=PROGRAM_BANK_DTYPE[backend])
        with torch.inference_mode():
            want = graph(*args)
        got = runner(*args)
        report[str(b)] = {
            "map_max_abs": float((got[0].float().cpu() - want[0]).abs().max()),
            "score_max_abs": float((got[2].float().cpu() - want[2]).abs().max()),
        }
    return report
