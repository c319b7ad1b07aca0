"""Registering a product: its good images -> a reference bank and its normal statistics.

``inspector bank add`` calls this. The bank holds every position of up to the model's
``bank.images`` good images (the most diverse, by greedy k-center on the images' global
features, when more are offered), reduced to a coreset per level; every image is cross-scored
against a bank that does not contain it to measure the product's normal score statistics
(``inspector.banks.normal``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..decode import DecodeError, file_to_model_input
from ..model import InspectionModel
from ..model.bank import (BankTensors, Coreset, ProductBank, build_fold_banks, describe_coreset, greedy_k_center,
                          prototype_of, stack_banks)
from .normal import MIN_SPREAD_FRACTION, NormalStats, sample_is_degenerate, spread_is_floored
from .record import BankError, BankMeta, check_name, content_digest

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
EXTRACT_BATCH = 8  # images per backbone pass while registering: bounds memory on a small PC


@dataclass(frozen=True)
class ShotImage:
    """One offered image: its name, the sha256 of its file bytes and its resized RGB pixels."""

    name: str
    sha256: str
    pixels: np.ndarray  # (S, S, 3) uint8


@dataclass(frozen=True)
class Registration:
    """A product's bank and metadata; ``duplicates`` pairs each image left out as a copy (same
    content digest) with the image it repeats."""

    bank: ProductBank
    meta: BankMeta
    chosen: tuple[str, ...]
    duplicates: tuple[tuple[str, str], ...] = ()


def distinct_images(images: Sequence[ShotImage]) -> tuple[list[ShotImage], list[tuple[str, str]]]:
    """The images with copies (same content digest) removed, first occurrence kept, and the
    ``(copy, original)`` name pairs removed. A copy of a shot scored against the bank that holds
    the original would score as a perfect part and shrink the product's normal spread."""
    seen: dict[str, str] = {}
    kept, dropped = [], []
    for im in images:
        if im.sha256 in seen:
            dropped.append((im.name, seen[im.sha256]))
        else:
            seen[im.sha256] = im.name
            kept.append(im)
    return kept, dropped


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the image files of any folder (sorted, not recursive)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise BankError("no_images", f"{p} is neither an image file nor a folder")
    if not files:
        raise BankError("no_images", f"no images found in {', '.join(map(str, paths))}")
    return files


def read_shots(paths: Sequence[str | Path], size: int) -> list[ShotImage]:
    """Read and resize every offered image; an unreadable one is an error naming the file."""
    shots = []
    for path in expand_paths(paths):
        data = path.read_bytes()
        try:
            pixels = file_to_model_input(data, size)
        except (DecodeError, OSError) as err:
            raise BankError("bad_image", f"{path} is not a readable image: {err}") from err
        shots.append(ShotImage(path.name, hashlib.sha256(data).hexdigest(), pixels))
    return shots


@torch.no_grad()
def extract(model: InspectionModel, pixels: np.ndarray) -> list[torch.Tensor]:
    """Backbone features per level of ``(N, S, S, 3)`` uint8 images, in bounded batches."""
    device = next(model.parameters()).device
    parts = [model.extract(torch.from_numpy(pixels[i : i + EXTRACT_BATCH]).to(device))
             for i in range(0, len(pixels), EXTRACT_BATCH)]
    return [torch.cat([p[level] for p in parts]).cpu() for level in range(len(parts[0]))]


def pick_diverse(top_level: torch.Tensor, k: int, seed: int = 0) -> list[int]:
    """Indices of ``k`` diverse images by greedy k-center on their prototypes, in input order."""
    if top_level.shape[0] <= k:
        return list(range(top_level.shape[0]))
    return sorted(int(i) for i in greedy_k_center(prototype_of(top_level), k, seed))


SCORE_BATCH = 8  # images scored per pass against a bank: bounds the similarity blocks' memory


@torch.no_grad()
def raw_scores_against(model: InspectionModel, feats: Sequence[torch.Tensor], bank: ProductBank,
                       rows: Sequence[int] | None = None) -> np.ndarray:
    """Raw image scores of ``rows`` of ``feats`` (default: all) against one product's bank,
    hinted to it (no routing), in batches of ``SCORE_BATCH``: the served arithmetic before
    calibration. Registration, ``bank feedback`` and the evaluation all score this way."""
    rows = list(range(feats[0].shape[0])) if rows is None else list(rows)
    return raw_scores_hinted(model, feats, stack_banks([bank]), rows, [0] * len(rows))


@torch.no_grad()
def raw_scores_hinted(model: InspectionModel, feats: Sequence[torch.Tensor], stacked: BankTensors,
                      rows: Sequence[int], hints: Sequence[int]) -> np.ndarray:
    """Raw image scores of ``rows`` of ``feats``, row ``rows[i]`` against bank ``hints[i]`` of the
    stacked banks, in batches of ``SCORE_BATCH``."""
    out = [np.zeros(0, dtype=np.float32)]
    for start in range(0, len(rows), SCORE_BATCH):
        part = list(rows[start : start + SCORE_BATCH])
        hint = torch.as_tensor(list(hints[start : start + SCORE_BATCH]), dtype=torch.long)
        out.append(model.raw_scores([f[part].float() for f in feats], stacked, hint).cpu().numpy())
    return np.concatenate(out)


FOLDS = 5  # cross-scoring folds: every bank image is scored against a bank of the other 4/5


def fold_of(count: int, seed: int = 0) -> list[int]:
    """The cross-scoring fold of each of ``count`` >= 2 images: ``min(FOLDS, count)`` folds of
    near-equal size, assigned in a seeded random order (with ``count <= FOLDS``: leave-one-out)."""
    folds = min(FOLDS, count)
    order = np.random.default_rng(seed).permutation(count)
    out = [0] * count
    for pos, i in enumerate(order):
        out[int(i)] = pos % folds
    return out


@torch.no_grad()
def cross_scores(model: InspectionModel, feats: Sequence[torch.Tensor], keep: Sequence[int],
                 coreset: Coreset, seed: int = 0) -> tuple[ProductBank, np.ndarray, dict[str, object]]:
    """The served bank of the ``keep`` images, and raw scores of every image, none of them scored
    against a bank that contains it.

    The bank images are split into folds (``fold_of``); each is scored against a bank of the other
    folds, built like the served bank (``build_fold_banks``). Images not in the bank are scored
    against the served bank itself, exactly what the worker will compute for them.

    Returns:
        ``(bank, scores, how)``: the served bank, raw scores (bank images first, in ``keep`` order,
        then the held-out images) and how they were obtained (``scored``, ``folds``, ``held_out``).
    """
    keep = list(keep)
    folds = fold_of(len(keep), seed)
    bank_feats = [f[keep] for f in feats]
    bank, fold_banks = build_fold_banks(bank_feats, folds, coreset, seed)
    parts = [raw_scores_hinted(model, bank_feats, stack_banks(fold_banks), range(len(keep)), folds)]
    inside = set(keep)
    held = [i for i in range(feats[0].shape[0]) if i not in inside]
    if held:
        parts.append(raw_scores_against(model, feats, bank, held))
    k = len(fold_banks)
    how = {"scored": "leave_one_out" if k == len(keep) else "cross_fold", "folds": k, "held_out": len(held)}
    return bank, np.concatenate(parts), how


@dataclass(frozen=True)
class RegisteredFeatures:
    """A product's bank (carrying its calibration as ``stats``), its normal statistics, which of
    the images are in the bank, and how the statistics' scores were obtained."""

    bank: ProductBank
    normal: NormalStats
    keep: list[int]
    scored: dict[str, object]


def register_features(model: InspectionModel, product: str, feats: Sequence[torch.Tensor], bank_images: int,
                      coreset: Coreset = None, seed: int = 0, method: str | None = None) -> RegisteredFeatures:
    """Registration from backbone features: what ``inspector bank add``, the trainer's threshold and
    the evaluation all do with a product's good images, so their numbers are the served ones.

    Up to ``bank_images`` images (the most diverse when more are offered) form the bank, capped at
    ``coreset`` vectors per level; the normal statistics come from every image's cross-scored
    raw score (``cross_scores``), normalised by ``method`` (default: the card's
    ``score.normalisation``, the scale its line threshold was placed on).

    Args:
        feats: per level ``(N, C, H, W)`` features of the N >= 2 good images.
    """
    keep = pick_diverse(feats[-1], bank_images, seed)
    bank, scores, how = cross_scores(model, feats, keep, coreset, seed)
    normal = NormalStats.from_registration(product, scores.tolist(), method or model.cfg.score.normalisation)
    return RegisteredFeatures(bank.with_stats(normal.u, normal.gamma), normal, keep, how)


def register_product(
    model: InspectionModel,
    signature: str,
    model_id: str,
    product: str,
    images: Sequence[ShotImage],
    bank_images: int,
    coreset: Coreset = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    method: str | None = None,
    min_images: int | None = None,
) -> Registration:
    """Build ``product``'s bank and normal statistics from its good ``images``.

    Up to ``bank_images`` of them (the most diverse when more are offered) form the bank, capped at
    ``coreset`` vectors per level; every image is cross-scored against a bank that does not
    contain it (``cross_scores``), and the product's normal statistics come from those scores.
    With 30 or more images the statistics place the product on the line's scale; with fewer they
    are marked thin.

    Args:
        model: the serving model (eval mode); its backbone extracts the features.
        signature: the model's backbone signature, stored so a worker can refuse a mismatch.
        model_id: the artifact that measured the statistics.
        bank_images: most images in the bank.
        method: the normalisation (``inspector.banks.normal.METHODS``; default the card's).
        min_images: fewest distinct images accepted (default ``bank_images``; at least 2).
    """
    check_name("product", product)
    images, duplicates = _enough_distinct(images, bank_images, min_images)
    say = progress or (lambda _msg: None)
    if duplicates:
        say(f"{len(duplicates)} duplicate images (same content) counted once: "
            + ", ".join(f"{a} = {b}" for a, b in duplicates))
    say(f"extracting features of {len(images)} images")
    feats = extract(model, np.stack([im.pixels for im in images]))
    in_bank = min(bank_images, len(images))
    say(f"building the bank from {'the ' + str(in_bank) + ' most diverse' if in_bank < len(images) else 'all ' + str(in_bank)} "
        f"images (coreset {describe_coreset(coreset)}) and scoring {len(images)} images against banks that do not contain them")
    product_bank = register_features(model, product, feats, bank_images, coreset, seed, method)
    bank, normal, keep = product_bank.bank, product_bank.normal, product_bank.keep
    _warn_if_alike(product, normal, say)
    chosen = [images[i] for i in keep]
    meta = BankMeta(
        product=product,
        signature=signature,
        shots=len(chosen),
        images=[{"name": im.name, "sha256": im.sha256} for im in chosen],
        levels=[list(f.shape) for f in bank.features],
        u=normal.u,
        gamma=normal.gamma,
        model_id=model_id,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        content_sha256=content_digest(bank),
        coreset=list(coreset) if isinstance(coreset, (tuple, list)) else coreset,
        candidates=len(images),
        normal={**normal.summary(), **product_bank.scored, "scores": normal.registration},
    )
    return Registration(bank, meta, tuple(im.name for im in chosen), tuple(duplicates))


def _warn_if_alike(product: str, normal, say: Callable[[str], None]) -> None:
    """Say so when the good images scored almost identically: their tail could not be measured."""
    if spread_is_floored(normal.u, normal.gamma) or sample_is_degenerate(normal.registration):
        say(f"warning: the good images of {product} scored almost identically (copies of one part?): "
            f"their tail was not measured (a spread floor of {MIN_SPREAD_FRACTION:.0%} of the typical score "
            f"applies where the scale needs one); register from images of different parts")


def _enough_distinct(images: Sequence[ShotImage], bank_images: int,
                     min_images: int | None) -> tuple[list[ShotImage], list[tuple[str, str]]]:
    """The distinct images and the duplicates left out; BankError when fewer than a product needs."""
    need = max(2, bank_images if min_images is None else min_images)
    if bank_images < 2:
        raise BankError("too_few_shots", f"a bank needs at least 2 images, asked for {bank_images}")
    images, duplicates = distinct_images(images)
    if len(images) < need:
        raise BankError("too_few_images", f"{len(images)} distinct good images, fewer than the {need} a product needs"
                        + (f" ({len(duplicates)} duplicates left out)" if duplicates else "")
                        + f": give at least {need}, and 30 or more for trustworthy normal statistics")
    return images, duplicates
