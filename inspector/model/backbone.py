"""Frozen timm feature extractor and strict offline weight loading (DESIGN section 4)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from .config import BackboneConfig

_IGNORED_BUFFERS = ("num_batches_tracked",)  # batch-norm step counters carry no weights


class WeightsError(ValueError):
    """A backbone weights file is missing or does not fit the feature extractor."""


def create_backbone(cfg: BackboneConfig) -> nn.Module:
    """Build the timm ``features_only`` extractor with random weights, frozen and in eval mode."""
    try:
        net = timm.create_model(
            cfg.name, pretrained=False, features_only=True, out_indices=cfg.out_indices
        )
    except RuntimeError as err:  # timm raises RuntimeError for unknown model names
        raise WeightsError(f"timm cannot build backbone {cfg.name!r}: {err}") from err
    return freeze(net)


def freeze(net: nn.Module) -> nn.Module:
    """Put a module in eval mode and stop gradients to all its parameters."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def weight_keys(net: nn.Module) -> dict[str, torch.Size]:
    """Names and shapes of every tensor the extractor uses, without step counters."""
    return {
        k: v.shape
        for k, v in net.state_dict().items()
        if not k.endswith(_IGNORED_BUFFERS)
    }


def load_backbone_weights(net: nn.Module, path: str | Path) -> str:
    """Load a safetensors file strictly into ``net``; return the file's sha256.

    Every tensor the extractor uses must be in the file with the same shape, and the file must
    hold nothing else; otherwise :class:`WeightsError` says which keys differ.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"backbone weights file not found: {path}")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises several types for a damaged file
        raise WeightsError(f"cannot read backbone weights {path}: {err}") from err
    check_state_fits(net, state, source=str(path))
    net.load_state_dict(state, strict=False)
    return file_sha256(path)


def check_state_fits(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`WeightsError` unless ``state`` has exactly the extractor's keys and shapes."""
    expected = weight_keys(net)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or wrong:
        raise WeightsError(
            f"{source} does not fit the feature extractor: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} "
            f"({len(unexpected)}), wrong shape {wrong[:5]} ({len(wrong)})"
        )


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Order-independent sha256 of named tensors (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
