"""The in-process backends: eager PyTorch, and ``torch.compile`` (inductor) when the worker starts."""

from __future__ import annotations

import torch

from ..model.serving import ServingGraph


def runtime() -> str:
    return f"torch {torch.__version__}"


def load_eager(model, calibration: str, program=None, device: str = "cpu"):
    graph = ServingGraph(model, calibration).eval()
    return lambda *args: graph(*args)


def load_inductor(model, calibration: str, program=None, device: str = "cpu"):
    graph = torch.compile(ServingGraph(model, calibration).eval(), dynamic=True)
    return lambda *args: graph(*args)
