"""The served graph with flat tensor inputs and outputs, for export and compiled backends.

``InspectionModel.forward`` takes the bank as a ``BankTensors`` record; exporters and runtimes
(ONNX, TensorRT) want a flat list of named tensors. This wrapper is exactly ``forward`` in a fixed
calibration mode, so what is compiled is what is served: only what that mode uses is computed
(``InspectionModel.analyse(served=...)``: no CADA head unless it calibrates by CADA, no distance
map beside a flow's).
"""

from __future__ import annotations

import torch
from torch import nn

from .bank import BankTensors
from .graph import InspectionModel

INPUT_NAMES_FIXED = ("images", "hint", "prototypes", "stats")
OUTPUT_NAMES = ("calibrated_map", "raw_map", "score", "product", "route_similarity", "u", "gamma")


def input_names(levels: int) -> tuple[str, ...]:
    """Names of the flat inputs: images, hint, prototypes, stats, then one bank tensor per level."""
    return INPUT_NAMES_FIXED + tuple(f"level{i}" for i in range(levels))


SERVED_LEVELS = 3  # exporters need a fixed signature; the default backbone serves levels 1-3


class ServingGraph(nn.Module):
    """``forward(images, hint, prototypes, stats, level0, level1, level2)`` -> ``Inspection`` fields.

    The bank levels are named arguments, not ``*levels``: ``torch.export`` and the ONNX exporter
    need one tensor per input. Models with another number of levels are refused here.

    Args:
        model: the inspection model (eval mode).
        calibration: the calibration mode baked into the graph (``cada``, ``bank`` or ``none``).
        trimmed: compute only what ``calibration`` uses (served); False computes every output of
            ``analyse`` as evaluation does (the untrimmed graph, for benchmarks).
    """

    def __init__(self, model: InspectionModel, calibration: str, trimmed: bool = True) -> None:
        super().__init__()
        if len(model.channels) != SERVED_LEVELS:
            raise ValueError(f"the served graph takes {SERVED_LEVELS} bank levels; this model has "
                             f"{len(model.channels)} (backbone out_indices)")
        self.model = model
        self.calibration = calibration
        self.trimmed = trimmed

    def forward(self, images: torch.Tensor, hint: torch.Tensor, prototypes: torch.Tensor, stats: torch.Tensor,
                level0: torch.Tensor, level1: torch.Tensor, level2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bank = BankTensors((level0, level1, level2), prototypes, stats)
        m = self.model
        return tuple(m.inspect(m.analyse(m.extract(images), bank, hint, served=self.calibration if self.trimmed else None), self.calibration))
