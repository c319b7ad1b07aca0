"""Model artifact: bit-exact round trip and refusal of mismatches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inspector.artifact import ArtifactError, load_artifact, read_card, save_artifact
from inspector.model import InspectionModel

from .conftest import tiny_config


@pytest.fixture
def saved(tmp_path: Path, tiny_model: InspectionModel) -> Path:
    with torch.no_grad():  # make the heads non-trivial so a round trip has something to lose
        for p in tiny_model.flows.parameters():
            p.add_(0.01 * torch.randn_like(p))
        tiny_model.cada.target_stats.copy_(torch.tensor([1.5, 0.3, 2.0]))
    save_artifact(tiny_model, tmp_path / "model", "ab" * 32, training={"thresholds": {"cada": 1.2}})
    return tmp_path / "model"


def test_round_trip_is_bit_exact(saved: Path, tiny_model: InspectionModel) -> None:
    model, card = load_artifact(saved)
    original = tiny_model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert card.training["thresholds"] == {"cada": 1.2}
    assert card.backbone["channels"] == list(tiny_model.channels)
    assert card.model_config == tiny_model.cfg
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        feats = tiny_model.extract(images)
        assert all(torch.equal(a, b) for a, b in zip(feats, model.extract(images)))


def _edit_card(path: Path, **changes) -> None:
    card = json.loads((path / "card.json").read_text())
    for dotted, value in changes.items():
        node = card
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (path / "card.json").write_text(json.dumps(card))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"schema_version": 99}, "schema 99"),
        ({"backbone__channels": [1, 2, 3]}, "channels"),
        ({"backbone__name": "resnet34"}, "backbone name"),
        ({"config__flow__blocks": 3}, "do not fit"),
        ({"config__flow__colour": 3}, "does not match this code"),
        ({"surprise": 1}, "unknown fields"),
    ],
)
def test_mismatched_card_is_refused(saved: Path, changes: dict, message: str) -> None:
    _edit_card(saved, **changes)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(saved)


def test_replaced_weights_are_refused(saved: Path) -> None:
    state = load_file(str(saved / "model.safetensors"))
    key = next(k for k in state if k.startswith("flows."))
    state[key] = state[key] + 1e-3
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(ArtifactError, match="digest differs"):
        load_artifact(saved)


def test_missing_artifact_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a model artifact"):
        read_card(tmp_path)
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not a valid model card"):
        read_card(tmp_path)


def test_overwrite_is_atomic_and_replaces(saved: Path, tiny_model: InspectionModel) -> None:
    first = read_card(saved).model_id
    with torch.no_grad():
        next(tiny_model.flows.parameters()).add_(1.0)
    save_artifact(tiny_model, saved, None)
    assert read_card(saved).model_id != first
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model"]  # no temporary leftovers
