"""Model artifact: safetensors weights plus a JSON model card (DESIGN section 4).

An artifact is a directory holding ``model.safetensors`` (every tensor of the model, the frozen
backbone included, so it is self-contained) and ``card.json``. Loading checks the card against
the code and the weights against the card, and refuses a mismatch with a message that says what
differs and what to do.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .model import InspectionModel, ModelConfig
from .model.backbone import state_sha256

SCHEMA_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"


class ArtifactError(ValueError):
    """An artifact cannot be loaded: missing, damaged, or made for other code."""


@dataclass(frozen=True)
class ModelCard:
    """Metadata that travels with the weights; consumers read shapes and settings only here."""

    config: dict[str, Any]
    backbone: dict[str, Any]
    weights_sha256: str
    schema_version: int = SCHEMA_VERSION
    code_version: str = __version__
    false_reject_rate: float | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        """Short stable identifier: the first 12 hex digits of the weights digest."""
        return self.weights_sha256[:12]

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.config)

    @property
    def signature(self) -> str:
        """What a reference bank must have been built with to be usable by this model."""
        return backbone_signature(self.backbone)

    def to_json(self) -> str:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["model_id"] = self.model_id
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelCard":
        data = json.loads(text)
        data.pop("model_id", None)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ArtifactError(f"model card has unknown fields {sorted(unknown)}")
        return cls(**data)


def backbone_info(model: InspectionModel, weights_sha256: str | None) -> dict[str, Any]:
    """The backbone part of a card: name, weights digest, input and feature geometry."""
    cfg = model.cfg.backbone
    return {
        "name": cfg.name,
        "weights_sha256": weights_sha256,
        "input_size": cfg.input_size,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "color": "RGB",
        "out_indices": list(cfg.out_indices),
        "channels": list(model.channels),
        "strides": list(model.strides),
    }


def backbone_signature(info: dict[str, Any]) -> str:
    """A bank is usable only by models whose backbone, weights and input geometry match."""
    digest = (info.get("weights_sha256") or "random")[:16]
    return (
        f"{info['name']}@{digest}:{info['input_size']}:"
        f"{','.join(map(str, info['out_indices']))}:"
        f"{','.join(f'{v:.4f}' for v in info['mean'])}/{','.join(f'{v:.4f}' for v in info['std'])}"
    )


def save_artifact(
    model: InspectionModel,
    path: str | Path,
    backbone_weights_sha256: str | None,
    **card_fields: Any,
) -> ModelCard:
    """Write ``model`` to the directory ``path`` atomically; return its card."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    card = ModelCard(
        config=model.cfg.to_dict(),
        backbone=backbone_info(model, backbone_weights_sha256),
        weights_sha256=state_sha256(state),
        **card_fields,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    save_file(state, str(tmp / WEIGHTS_FILE))
    (tmp / CARD_FILE).write_text(card.to_json())
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old)
    return card


def read_card(path: str | Path) -> ModelCard:
    """Read and validate an artifact's card without loading weights."""
    card_path = Path(path) / CARD_FILE
    if not card_path.is_file():
        raise ArtifactError(f"{path} is not a model artifact: {CARD_FILE} not found")
    try:
        card = ModelCard.from_json(card_path.read_text())
    except (json.JSONDecodeError, TypeError) as err:
        raise ArtifactError(f"{card_path} is not a valid model card: {err}") from err
    if card.schema_version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has model card schema {card.schema_version}, this code reads "
            f"{SCHEMA_VERSION}: retrain or convert the artifact with a matching version"
        )
    return card


def load_artifact(path: str | Path, map_location: str = "cpu") -> tuple[InspectionModel, ModelCard]:
    """Load an artifact, refusing any mismatch between card, code and weights."""
    card = read_card(path)
    try:
        cfg = card.model_config
    except (ValueError, TypeError) as err:
        raise ArtifactError(f"{path}: model card config does not match this code: {err}") from err
    model = InspectionModel(cfg)
    _check_geometry(model, card, path)
    state = _read_weights(Path(path) / WEIGHTS_FILE)
    if state_sha256(state) != card.weights_sha256:
        raise ArtifactError(
            f"{path}: weights digest differs from the card's {card.model_id}: "
            "the weights file is damaged or was replaced; restore or re-export the artifact"
        )
    _check_keys(model, state, path)
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), card


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ArtifactError(f"{path} not found: the artifact is incomplete")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several types for a damaged file
        raise ArtifactError(f"cannot read {path}: {err}") from err


def _check_geometry(model: InspectionModel, card: ModelCard, path: str | Path) -> None:
    expected = backbone_info(model, card.backbone.get("weights_sha256"))
    for key in ("name", "input_size", "out_indices", "channels", "strides"):
        if card.backbone.get(key) != expected[key]:
            raise ArtifactError(
                f"{path}: card says backbone {key}={card.backbone.get(key)!r} but this code "
                f"builds {expected[key]!r}: the artifact was made for another backbone or timm"
            )


def _check_keys(model: InspectionModel, state: dict[str, torch.Tensor], path: str | Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise ArtifactError(
            f"{path}: weights do not fit the model the card describes: missing {missing[:3]}, "
            f"unexpected {extra[:3]}, wrong shapes {shapes[:3]}"
        )


