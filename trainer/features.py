"""Backbone feature cache: the backbone is frozen, so training reads its features once.

Features are kept in fp16 per level, ``(N, C, H, W)``; at 256 input with resnet18 that is
about 0.9 MB per image.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from inspector.model import InspectionModel

CACHE_DTYPE = torch.float16


@torch.no_grad()
def extract_features(
    model: InspectionModel,
    images: np.ndarray,
    batch: int = 16,
    desc: str | None = None,
    progress: bool = True,
) -> list[torch.Tensor]:
    """Backbone features of uint8 ``(N, S, S, 3)`` images, per level ``(N, C, H, W)`` fp16."""
    if len(images) == 0:
        raise ValueError("no images to extract features from")
    chunks: list[list[torch.Tensor]] = []
    bar = tqdm(total=len(images), desc=desc or "features", unit="img", disable=not progress, leave=False)
    for start in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch]))
        chunks.append([f.to(CACHE_DTYPE) for f in model.extract(x)])
        bar.update(len(x))
    bar.close()
    return [torch.cat([c[l] for c in chunks]) for l in range(len(chunks[0]))]


def select(features: Sequence[torch.Tensor], index: Sequence[int] | np.ndarray | torch.Tensor) -> list[torch.Tensor]:
    """The same rows of every level, as float32."""
    idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
    return [f[idx].float() for f in features]


def map_batches(
    count: int, batch: int, fn: Callable[[np.ndarray], None], desc: str, progress: bool = True
) -> None:
    """Call ``fn`` on consecutive index batches of ``range(count)`` with a progress bar."""
    bar = tqdm(total=count, desc=desc, unit="img", disable=not progress, leave=False)
    for start in range(0, count, batch):
        idx = np.arange(start, min(count, start + batch))
        fn(idx)
        bar.update(len(idx))
    bar.close()
