"""ONNX: ``torch.onnx.export`` (dynamo exporter) with a dynamic batch and the banks as inputs at a
fixed capacity; runs in onnxruntime (CPU-only line PCs) and feeds ``trtexec``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.serving import OUTPUT_NAMES, input_names
from .common import CompileError, dynamic_shapes, example_inputs

ONNX_OPSET = 18  # the dynamo exporter's default opset; onnxruntime >= 1.14 and trtexec 8.6+ read it
BANK_DTYPE = torch.float32  # the bank inputs' dtype (the registry's bank_dtype for onnx)


def runtime() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


def load(model, calibration: str, program: Path | None, device: str = "cpu"):
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ValueError("engine.backend onnx needs onnxruntime: install the `onnx` extra") from err
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(program), providers=providers)
    names = input_names(len(model.channels))

    def run(*args: torch.Tensor) -> list[torch.Tensor]:
        feed = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
        return [torch.from_numpy(o) for o in session.run(None, feed)]

    return run


def build(graph, model, lo: int, hi: int, products: int, precision: str, path: Path, say) -> str:
    """ONNX with a dynamic batch dimension; bank inputs at their fixed capacity. Returns "cpu"."""
    if precision != "fp32":
        raise CompileError("the onnx backend is built in fp32 (onnxruntime on CPU has no faster fp16 path); "
                           "use --precision fp32, or --backend tensorrt for fp16 on a GPU")
    import time

    path.parent.mkdir(parents=True, exist_ok=True)
    levels = len(model.channels)
    args = example_inputs(model, max(2, lo), products, bank_dtype=BANK_DTYPE)  # batch 1 would be specialised away
    t0 = time.perf_counter()
    torch.onnx.export(graph, args, str(path), dynamo=True, dynamic_shapes=dynamic_shapes(levels, lo, hi),
                      input_names=list(input_names(levels)), output_names=list(OUTPUT_NAMES),
                      opset_version=ONNX_OPSET, external_data=True, verbose=False)
    say(f"exported ONNX in {time.perf_counter() - t0:.1f}s: {path}")
    return "cpu"
