"""TensorRT: ``torch.export`` of the served graph with a dynamic batch range, compiled with
torch-tensorrt's dynamo path and saved as an exported program. torch-tensorrt is imported only
here; it is absent on development machines."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch

from ..model.bank import BANK_DTYPE
from .common import CompileError, dynamic_shapes, example_inputs


def runtime() -> str:
    import tensorrt  # noqa: F401  (present wherever torch-tensorrt is)
    import torch_tensorrt

    return f"tensorrt {tensorrt.__version__}, torch-tensorrt {torch_tensorrt.__version__}"


def load(model, calibration: str, program: Path | None, device: str = "cuda"):
    try:
        import torch_tensorrt  # noqa: F401  (registers the TensorRT runtime ops the program calls)
    except ImportError as err:
        raise ValueError("engine.backend tensorrt needs torch-tensorrt: install the `tensorrt` extra") from err
    module = torch.export.load(str(program)).module()
    return lambda *args: module(*(a.cuda() for a in args))


def build(graph, model, lo: int, hi: int, products: int, precision: str, path: Path, say) -> str:
    """torch.export -> torch-tensorrt dynamo compile -> saved exported program. Returns the GPU's name."""
    try:
        import torch_tensorrt
    except ImportError as err:
        raise CompileError(
            "torch-tensorrt is not installed: on the line PC install the `tensorrt` extra "
            "(pip install 'inspector[tensorrt]' with NVIDIA's package index reachable)") from err
    if not torch.cuda.is_available():
        raise CompileError("TensorRT needs a CUDA GPU; none is visible")
    levels = len(model.channels)
    graph = graph.cuda()
    args = tuple(a.cuda() for a in example_inputs(model, max(2, lo), products, bank_dtype=BANK_DTYPE))
    program = torch.export.export(graph, args, dynamic_shapes=dynamic_shapes(levels, lo, hi))
    inputs = trt_inputs(torch_tensorrt, args, lo, hi)
    t0 = time.perf_counter()
    compiled = torch_tensorrt.dynamo.compile(program, arg_inputs=inputs, **precision_kwargs(torch_tensorrt, precision))
    say(f"built TensorRT engine in {time.perf_counter() - t0:.0f}s")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch_tensorrt.save(compiled, str(path), output_format="exported_program", arg_inputs=list(args))
    return torch.cuda.get_device_name()


def trt_inputs(trt, args, lo: int, hi: int) -> list:
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
