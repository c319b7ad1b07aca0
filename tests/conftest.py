"""Shared fixtures: tiny model configurations and paths to the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from inspector.model import BackboneConfig, BankConfig, CadaConfig, FlowConfig, InspectionModel, ModelConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("INSPECTOR_SHARED", REPO.parent / "shared"))
REAL_DATA = SHARED / "data" / "industrial"
REAL_WEIGHTS = SHARED / "weights" / "resnet18-imagenet1k-l1-l3.safetensors"


def tiny_config(size: int = 64, blocks: int = 2, calibration: str = "cada") -> ModelConfig:
    """A model small enough for unit tests: 64 px input, 2 flow blocks, 8 position dims."""
    base = ModelConfig()
    return ModelConfig(
        backbone=BackboneConfig(input_size=size),
        bank=BankConfig(shots=4, chunk=64),
        flow=FlowConfig(blocks=blocks, pos_dims=8),
        cada=CadaConfig(hidden=16),
        score=type(base.score)(calibration=calibration),
    )


@pytest.fixture
def tiny_model() -> InspectionModel:
    torch.manual_seed(0)
    return InspectionModel(tiny_config()).eval()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def require_real(path: Path) -> Path:
    """Skip, saying what is missing, when the shared real data or weights are absent."""
    if not path.exists():
        pytest.skip(f"{path} is missing: this test needs the shared real data/weights next to the repository")
    return path
