"""What the backends' builds share: example serving inputs, the dynamic batch, the build error."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.export import Dim

from ..model import InspectionModel
from ..model.bank import BANK_DTYPE, ProductBank, bank_capacity, stack_banks


class CompileError(RuntimeError):
    """A backend cannot build the program here; the message says what is missing."""


def example_inputs(model: InspectionModel, batch: int, products: int, seed: int = 0,
                   bank_dtype: torch.dtype = BANK_DTYPE) -> tuple[torch.Tensor, ...]:
    """Flat serving inputs of the right shapes: random frames and random banks at full capacity,
    the bank tensors in ``bank_dtype`` (what the program takes: its backend's ``bank_dtype``).

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
    """``torch.export`` shapes: images and hint batch-dynamic, the bank tensors fixed."""
    batch = Dim("batch", min=batch_min, max=batch_max)
    return ({0: batch}, {0: batch}, None, None, *([None] * levels))
