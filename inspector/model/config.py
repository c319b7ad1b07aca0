"""Frozen configuration of the inspection model, one dataclass per stage.

The configuration travels inside the model card (see ``inspector.artifact``), so every consumer
reads input size, normalisation, levels and flow shape from the artifact, never from literals.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CALIBRATION_MODES = ("cada", "bank", "none")
CONSTRAINTORS = ("conv", "identity")
SCORINGS = ("distance", "flow")


@dataclass(frozen=True)
class BackboneConfig:
    """The frozen feature extractor (DESIGN section 4, backbone row)."""

    name: str = "resnet18"
    out_indices: tuple[int, ...] = (1, 2, 3)
    input_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class BankConfig:
    """Reference bank shape: the fewest good images a product is registered from (``shots``, also
    the plain-distance baseline's bank), the most images in its bank, the coreset cap per level
    and the matmul's chunk of bank vectors and tile of query positions."""

    shots: int = 4
    images: int = 64  # most images whose positions enter a product's bank (the most diverse when more)
    # Max vectors per level (greedy k-center): one cap for every level or one per level; None keeps
    # every position. Levels 2 and 3 keep 4096: they carry the pixel maps of 50-image banks, and
    # cost little to search (benchmarks/results/bank_caps_pixel.json).
    coreset: int | tuple[int | None, ...] | None = (1024, 4096, 4096)
    chunk: int = 2048  # bank vectors per matmul chunk: bounds (B, P, chunk) similarity memory
    # Query positions per matmul: a (B, 256, chunk) similarity block stays in cache while its
    # maximum is taken. The nearest-neighbour step of a batch of 4 at the default capacity took
    # 92.9 ms against 137.6 with every query at once (benchmarks/results/nearest.json).
    query_tile: int | None = 256


@dataclass(frozen=True)
class FlowConfig:
    """Position-conditioned normalizing flow per level (DESIGN section 4, flow row)."""

    blocks: int = 8
    pos_dims: int = 128
    hidden_ratio: float = 1.0  # subnet hidden width as a multiple of its input width
    clamp: float = 1.9
    # What the flow reads: "conv" is ResAD's constraintor (conv3x3 + BN + ReLU) on the residual;
    # "identity" is the residual itself, scaled by sqrt(C) so that an untrained flow scores each
    # level as the nearest-neighbour distance 1 - cos (see InspectionModel.level_logp).
    constraintor: str = "identity"
    position: bool = True  # condition the flow on the 2-D position code (else on zeros)

    def __post_init__(self) -> None:
        if self.constraintor not in CONSTRAINTORS:
            raise ValueError(f"constraintor must be one of {CONSTRAINTORS}, got {self.constraintor!r}")


@dataclass(frozen=True)
class CadaConfig:
    """Class-agnostic regressor of each image's normal map mean and max (CADA)."""

    hidden: int = 256
    dropout: float = 0.25


@dataclass(frozen=True)
class ScoreConfig:
    """Raw map, calibration and verdict settings."""

    blur_sigma: float = 4.0
    # What the raw map is: "distance" is the training-free 1 - cos to the nearest bank vector
    # (levels 1-3, the flows are not run); "flow" is the fitted flows' -log p. The trainer ships
    # "flow" only where a held-out source class shows it ranks defects better (issue
    # "per-product calibration", point 5).
    scoring: str = "distance"
    top_fraction: float = 0.01  # image score = mean of the top 1% calibrated pixels (CADA)
    calibration: str = "bank"
    # How each product's (u, gamma) come from its good images' cross-scored raw scores
    # (``inspector.banks.normal.METHODS``); the line threshold is a number on that scale, so
    # registration uses the card's normalisation, never a code default.
    normalisation: str = "q90"
    threshold: float = 1.0
    # Cosine of mean-pooled level-3 prototypes. With ImageNet resnet18 features, different
    # products still reach 0.60-0.89 (ReLU features are all positive) and a product's own frames
    # 0.84-1.0 (benchmarks/results/banks.md), so a gate of 0.5 would never fire.
    min_route_similarity: float = 0.85

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATION_MODES:
            raise ValueError(
                f"calibration must be one of {CALIBRATION_MODES}, got {self.calibration!r}"
            )
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        from ..banks.normal import METHODS  # here: the banks package imports the model at load time

        if self.normalisation not in METHODS:
            raise ValueError(f"normalisation must be one of {METHODS}, got {self.normalisation!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The whole model's configuration, as stored in the model card."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    cada: CadaConfig = field(default_factory=CadaConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``.

        Cards written before ``bank.images`` existed served banks of exactly ``shots`` images.
        Cards written before ``flow.constraintor`` existed were all fitted with the conv
        constraintor, so a card without the field reads as ``"conv"``, not as today's default.
        Cards written before ``score.normalisation`` existed placed their threshold on the
        ``max`` scale, and read as ``"max"``.
        """
        flow = data.get("flow")
        if isinstance(flow, dict) and "constraintor" not in flow:
            data = {**data, "flow": {**flow, "constraintor": "conv"}}
        score = data.get("score")
        if isinstance(score, dict) and "scoring" not in score:  # cards from before the field served their flows
            score = {**score, "scoring": "flow"}
            data = {**data, "score": score}
        if isinstance(score, dict) and "normalisation" not in score:  # their thresholds are on the max scale
            data = {**data, "score": {**score, "normalisation": "max"}}
        bank = data.get("bank")
        if isinstance(bank, dict) and "images" not in bank:  # cards from before the field: a bank of k shots, uncapped
            data = {**data, "bank": {"coreset": None, **bank, "images": bank.get("shots", 4)}}
        return _build(cls, data)


def _build(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name) if _has_defaults(cls) else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _has_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` re-exported for callers that build variants of a config."""
    return dataclasses.replace(cfg, **changes)
