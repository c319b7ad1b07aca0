"""Source-class training material: fit normals, held-out normals, anomalies, their features."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from inspector.model import InspectionModel
from inspector.model.bank import position_vectors

from .anomalies import AnomalySynthesizer
from .data import ImageCache, list_samples
from .features import extract_features


@dataclass
class ClassMaterial:
    """One source class, ready for fitting.

    Attributes:
        name: class name.
        fit: per level ``(N, C, H, W)`` fp16 features of the normal images used for fitting
            (queries and reference shots).
        holdout: per level features of normal images never used in fitting (CADA validation and
            the threshold).
        anomalous: per level features of anomalous images (synthetic, then labelled real ones).
        masks: ``(M, S, S)`` bool masks of the anomalous images.
        source: ``(M,)`` index into ``fit`` of the normal image an anomaly was made from
            (``-1`` for a real anomaly), so its own source is never one of its shots.
    """

    name: str
    fit: list[torch.Tensor]
    holdout: list[torch.Tensor]
    anomalous: list[torch.Tensor]
    masks: torch.Tensor
    source: torch.Tensor
    _unit: list[torch.Tensor] | None = None

    @property
    def fit_unit(self) -> list[torch.Tensor]:
        """``fit`` as per-position unit vectors, ``(N, H*W, C)`` fp16 per level (bank material)."""
        if self._unit is None:
            self._unit = [
                torch.cat([position_vectors(f[i : i + 16]) for i in range(0, len(f), 16)]).half()
                for f in self.fit
            ]
        return self._unit


def split_normals(count: int, cap: int, holdout_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle ``range(count)``, keep at most ``cap``, split off a held-out part (at least 1)."""
    order = rng.permutation(count)[: min(count, cap)]
    n_hold = max(1, int(round(holdout_fraction * len(order))))
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def synthesize(images: np.ndarray, rng: np.random.Generator, per_image: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``per_image`` synthetic anomalies of every image: images, masks and source indices."""
    synth = AnomalySynthesizer()
    out_images, out_masks, sources = [], [], []
    for i in range(len(images)):
        for _ in range(per_image):
            donor = images[rng.integers(len(images))]
            image, mask = synth(images[i], rng, source=donor)
            out_images.append(image)
            out_masks.append(mask)
            sources.append(i)
    return np.stack(out_images), np.stack(out_masks), np.asarray(sources)


def _rot90(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(images, 1, axes=(1, 2)))


def _invert(images: np.ndarray) -> np.ndarray:
    return 255 - images if images.ndim == 4 else images  # masks (3-D) are unchanged


def _zoom(images: np.ndarray) -> np.ndarray:
    """The central half of every image (or mask), scaled back up 2x by pixel repetition."""
    side = images.shape[1]
    lo = side // 4
    centre = images[:, lo : lo + side // 2, lo : lo + side // 2]
    return np.ascontiguousarray(centre.repeat(2, axis=1).repeat(2, axis=2))


# Appearance changes that turn one source class into another-looking product with the same
# kind of normal variation and defects: more, and more varied, classes for the class-agnostic
# stages to learn from. Each applies to uint8 images (N, S, S, 3) and bool masks (N, S, S).
VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rot90": _rot90,
    "invert": _invert,
    "zoom": _zoom,
}


def check_views(views: Sequence[str]) -> tuple[str, ...]:
    """``views`` as a tuple; a name that is not in :data:`VIEWS` is a ``ValueError``."""
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"unknown source views {unknown}; known: {', '.join(VIEWS)}")
    return tuple(views)


@dataclass
class _Loaded:
    fit: np.ndarray
    holdout: np.ndarray
    anomalous: np.ndarray
    masks: np.ndarray
    source: np.ndarray


def _load_class(
    root: str | Path, name: str, size: int, cap: int, holdout_fraction: float,
    anomalies_per_image: int, real_anomalies: bool, rng: np.random.Generator,
) -> _Loaded:
    train = list_samples(root, name, "train")
    fit_idx, hold_idx = split_normals(len(train), cap, holdout_fraction, rng)
    fit_cache = ImageCache.load([train[i] for i in fit_idx], size)
    hold_cache = ImageCache.load([train[i] for i in hold_idx], size)
    syn_images, syn_masks, sources = synthesize(fit_cache.images, rng, anomalies_per_image)
    anomalous, masks = [syn_images], [syn_masks]
    if real_anomalies:
        real = [s for s in list_samples(root, name, "test") if s.label == 1]
        cache = ImageCache.load(real, size) if real else None
        if cache is not None and cache.has_mask.any():
            keep = cache.has_mask
            anomalous.append(cache.images[keep])
            masks.append(cache.masks[keep])
            sources = np.concatenate([sources, np.full(int(keep.sum()), -1)])
    return _Loaded(fit_cache.images, hold_cache.images, np.concatenate(anomalous), np.concatenate(masks), sources)


def _material(model: InspectionModel, name: str, data: _Loaded, progress: bool) -> ClassMaterial:
    return ClassMaterial(
        name=name,
        fit=extract_features(model, data.fit, desc=f"{name} normal", progress=progress),
        holdout=extract_features(model, data.holdout, desc=f"{name} held-out", progress=progress),
        anomalous=extract_features(model, data.anomalous, desc=f"{name} anomalous", progress=progress),
        masks=torch.from_numpy(data.masks),
        source=torch.from_numpy(data.source).long(),
    )


def prepare_class(
    model: InspectionModel,
    root: str | Path,
    name: str,
    cap: int,
    holdout_fraction: float,
    anomalies_per_image: int,
    real_anomalies: bool,
    rng: np.random.Generator,
    progress: bool = True,
    views: Sequence[str] = (),
) -> list[ClassMaterial]:
    """Load, split, synthesise anomalies and extract features for one source class.

    Returns the class itself, then one class per name in ``views`` (see :data:`VIEWS`), named
    ``<class>~<view>``: the same images, anomalies and masks with that appearance change.
    """
    check_views(views)
    data = _load_class(root, name, model.input_size, cap, holdout_fraction, anomalies_per_image, real_anomalies, rng)
    out = [_material(model, name, data, progress)]
    for view in views:
        f = VIEWS[view]
        changed = _Loaded(f(data.fit), f(data.holdout), f(data.anomalous), f(data.masks), data.source)
        out.append(_material(model, f"{name}~{view}", changed, progress))
    return out


def prepare_sources(
    model: InspectionModel,
    root: str | Path,
    classes: Sequence[str],
    cap: int,
    holdout_fraction: float,
    anomalies_per_image: int,
    real_anomalies: bool,
    seed: int,
    progress: bool = True,
    views: Sequence[str] = (),
) -> list[ClassMaterial]:
    """:func:`prepare_class` for every source class, with a progress bar over classes."""
    rng = np.random.default_rng(seed)
    out = []
    for name in tqdm(classes, desc="preparing source classes", unit="class", disable=not progress):
        out += prepare_class(
            model, root, name, cap, holdout_fraction, anomalies_per_image, real_anomalies, rng, progress, views
        )
    return out


def data_digest(root: str | Path, classes: Sequence[str]) -> str:
    """sha256 over the relative paths and sizes of every file of the given classes."""
    digest = hashlib.sha256()
    root = Path(root)
    for name in sorted(classes):
        for path in sorted((root / name).rglob("*")):
            if path.is_file():
                digest.update(f"{path.relative_to(root)}|{path.stat().st_size}\n".encode())
    return digest.hexdigest()
