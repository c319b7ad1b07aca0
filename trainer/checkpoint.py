"""Training checkpoints as safetensors + JSON (no pickle), for resume after an interruption."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TENSORS = "checkpoint.safetensors"
META = "checkpoint.json"


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    meta: dict[str, Any],
) -> None:
    """Write model, optimizer and RNG states; the JSON is renamed last so a crash leaves the old one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(folder / (TENSORS + ".tmp")))
    os.replace(folder / (TENSORS + ".tmp"), folder / TENSORS)
    record = dict(meta, param_groups=opt["param_groups"], numpy_rng=rng.bit_generator.state)
    (folder / (META + ".tmp")).write_text(json.dumps(record))
    os.replace(folder / (META + ".tmp"), folder / META)


def load_checkpoint(
    folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rng: np.random.Generator
) -> dict[str, Any] | None:
    """Restore states saved by :func:`save_checkpoint`; ``None`` when there is no checkpoint."""
    folder = Path(folder)
    if not (folder / META).is_file() or not (folder / TENSORS).is_file():
        return None
    meta = json.loads((folder / META).read_text())
    tensors = load_file(str(folder / TENSORS))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    rng.bit_generator.state = meta.pop("numpy_rng")
    torch.set_rng_state(tensors["rng.torch"])
    return meta
