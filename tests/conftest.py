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


def tiny_config(size: int = 64, blocks: int = 2, calibration: str = "cada", scoring: str = "flow") -> ModelConfig:
    """A model small enough for unit tests: 64 px input, 2 flow blocks, 8 position dims.

    It serves its flows by default, so the flow paths stay under test; ``scoring="distance"``
    gives the shipped training-free default.
    """
    base = ModelConfig()
    return ModelConfig(
        backbone=BackboneConfig(input_size=size),
        bank=BankConfig(shots=4, chunk=64),
        flow=FlowConfig(blocks=blocks, pos_dims=8),
        cada=CadaConfig(hidden=16),
        score=type(base.score)(calibration=calibration, scoring=scoring),
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


# -- Redis: a real server, never a mock ------------------------------------------------------------
import uuid

from inspector.testkit import RedisServer as _RedisServer
from inspector.testkit import free_port  # noqa: F401  (tests import it from here)


class RedisServer(_RedisServer):
    """``inspector.testkit.RedisServer`` that fails the test, saying why, when Redis cannot start."""

    def __init__(self, directory: Path) -> None:
        try:
            super().__init__(directory)
        except RuntimeError as err:
            pytest.fail(str(err))

    def start(self) -> "RedisServer":
        try:
            return super().start()
        except RuntimeError as err:
            pytest.fail(str(err))


@pytest.fixture
def redis_server(tmp_path: Path):
    """A Redis server owned by one test (for stop/start tests)."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """The shared test Redis: ``$INSPECTOR_TEST_REDIS_URL`` (set by scripts/test.sh) or our own."""
    url = os.environ.get("INSPECTOR_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of its own per test, so tests sharing one Redis never see each other."""
    return f"test-{uuid.uuid4().hex[:12]}"
