"""Serving backends behind one registry: for each, the file its program is saved to, the dtype it
takes the bank tensors in, the runtime a saved program is bound to, and how a program is built
(``inspector compile``) and loaded (the engine's runner).

======== ========== ========== =========================================================
backend  saved as   bank dtype  built / loaded
======== ========== ========== =========================================================
torch    (nothing)  fp32       eager PyTorch when the worker starts
inductor (nothing)  fp32       ``torch.compile`` when the worker starts (cannot be saved)
onnx     ``.onnx``  fp32       ``torch.onnx.export`` (dynamo); onnxruntime
tensorrt ``.ep``    fp16       ``torch.export`` + torch-tensorrt; a saved exported program
======== ========== ========== =========================================================

A runner is ``(images, hint, prototypes, stats, *levels) -> Inspection fields``. Optional
runtimes (onnxruntime, torch-tensorrt) are imported only when their backend is built or loaded.
Every saved program has a JSON sidecar, its :class:`ProgramKey`; the engine refuses a program
whose key does not match its own configuration.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..model.bank import BANK_DTYPE
from ..backends import eager, onnx, tensorrt
from .common import CompileError, dynamic_shapes, example_inputs

__all__ = ["BACKENDS", "Backend", "CompileError", "ProgramKey", "Runner", "backend", "default_program_path",
           "dynamic_shapes", "example_inputs", "make_runner", "runtime_version"]

Runner = Callable[..., Sequence]

@dataclass(frozen=True)
class Backend:
    """One serving backend.

    Attributes:
        name: as in ``engine.backend`` and ``inspector compile --backend``.
        suffix: its saved program's file suffix; None when nothing is saved (built at start-up).
        bank_dtype: the dtype it takes the bank tensors in. The engine converts each snapshot's
            (stored fp16) banks to it once, when the snapshot comes into service.
        runtime: the runtime a program is bound to (a different one needs a rebuild).
        load: ``(model, calibration, program, device) -> Runner``.
        build: ``(graph, model, batch_min, batch_max, products, precision, path, say) -> device``,
            writing the program to ``path`` and returning the device it was built for; None when
            nothing is saved.
    """

    name: str
    suffix: str | None
    bank_dtype: torch.dtype
    runtime: Callable[[], str]
    load: Callable[..., Runner]
    build: Callable[..., str] | None = None


BACKENDS = {
    "torch": Backend("torch", None, torch.float32, eager.runtime, eager.load_eager),
    "inductor": Backend("inductor", None, torch.float32, eager.runtime, eager.load_inductor),
    "onnx": Backend("onnx", ".onnx", onnx.BANK_DTYPE, onnx.runtime, onnx.load, onnx.build),
    "tensorrt": Backend("tensorrt", ".ep", BANK_DTYPE, tensorrt.runtime, tensorrt.load, tensorrt.build),
}


def backend(name: str) -> Backend:
    """The registered backend ``name``; ValueError naming the choices otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"engine.backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return BACKENDS[name]


def runtime_version(name: str) -> str:
    """The runtime a program of backend ``name`` is bound to."""
    return backend(name).runtime()


def make_runner(name: str, model, calibration: str, program: Path | None, device: str = "cpu") -> Runner:
    """A callable ``(images, hint, prototypes, stats, *levels) -> Inspection fields`` for a backend."""
    return backend(name).load(model, calibration, program, device)


def default_program_path(artifact: str | Path, name: str, precision: str) -> Path:
    """Where ``inspector compile`` writes backend ``name``'s program inside an artifact."""
    return Path(artifact) / "compiled" / f"{name}-{precision}{backend(name).suffix}"


@dataclass(frozen=True)
class ProgramKey:
    """What a compiled program was built for; the worker refuses any difference."""

    model_id: str
    backend: str
    precision: str
    batch_min: int
    batch_max: int
    capacity: list[int]
    products: int
    calibration: str
    input_size: int
    device: str
    runtime: str
    bank_dtype: str = "float16"  # the bank inputs' dtype (keys written before it was recorded: the stored fp16)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, path: Path) -> "ProgramKey":
        side = path.with_suffix(".json")
        if not side.is_file():
            raise ValueError(f"compiled program {path} has no key file {side}: rebuild it with inspector compile")
        try:
            return cls(**json.loads(side.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{side} is not a valid program key ({err}): rebuild it with inspector compile") from err
