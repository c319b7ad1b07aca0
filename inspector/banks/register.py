"""Registering a product: a few good images -> a reference bank with bank-mode statistics.

``inspector bank add`` calls this. When more images are offered than shots wanted, the shots are
the most diverse ones: greedy k-center on the images' global (prototype) features, so the bank
covers the product's variation instead of k near-duplicates.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..decode import decode_image, pillow_to_rgb, resize_square
from ..model import InspectionModel
from ..model.bank import ProductBank, build_bank, greedy_k_center, prototype_of
from ..wire import FrameHeader
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
    bank: ProductBank
    meta: BankMeta
    chosen: tuple[str, ...]


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


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def to_model_input(data: bytes, size: int) -> np.ndarray:
    """Image file bytes -> ``(size, size, 3)`` uint8 RGB, exactly as the worker prepares a frame.

    PNG and JPEG go through the worker's own decoder (``inspector.decode``), so a product
    registered from files and the same images streamed by a camera give the same pixels; other
    formats (BMP, TIFF) are converted by Pillow the same way.
    """
    encoding = "png" if data.startswith(PNG_MAGIC) else "jpeg" if data.startswith(JPEG_MAGIC) else None
    if encoding is not None:
        header = FrameHeader(frame_id="shot", camera="bank", ts_ns=0, encoding=encoding)
        return resize_square(decode_image(header, data), size)
    with Image.open(io.BytesIO(data)) as img:
        return resize_square(pillow_to_rgb(img), size)


def read_shots(paths: Sequence[str | Path], size: int) -> list[ShotImage]:
    """Read and resize every offered image; an unreadable one is an error naming the file."""
    shots = []
    for path in expand_paths(paths):
        data = path.read_bytes()
        try:
            pixels = to_model_input(data, size)
        except (UnidentifiedImageError, OSError, ValueError) as err:  # DecodeError is a ValueError
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


def register_product(
    model: InspectionModel,
    signature: str,
    model_id: str,
    product: str,
    images: Sequence[ShotImage],
    shots: int,
    coreset: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Registration:
    """Build ``product``'s bank from ``images`` (at least 2: bank-mode statistics need k-1 >= 1).

    Args:
        model: the serving model (eval mode); its backbone extracts the features.
        signature: the model's backbone signature, stored so a worker can refuse a mismatch.
        model_id: the artifact that measures the bank-mode statistics.
        shots: images kept; with more offered, the ``shots`` most diverse are kept.
    """
    check_name("product", product)
    if shots < 2:
        raise BankError("too_few_shots", f"a bank needs at least 2 shots, asked for {shots}")
    if len(images) < 2:
        raise BankError("too_few_shots", f"a bank needs at least 2 images, got {len(images)}")
    say = progress or (lambda _msg: None)
    say(f"extracting features of {len(images)} images")
    feats = extract(model, np.stack([im.pixels for im in images]))
    keep = pick_diverse(feats[-1], shots, seed)
    chosen = [images[i] for i in keep]
    feats = [f[keep] for f in feats]
    say(f"building the bank from {len(chosen)} shots and measuring bank-mode statistics")
    bank = build_bank(feats, coreset, seed)
    u, gamma = model.bank_statistics(feats)
    bank = bank.with_stats(u, gamma)
    meta = BankMeta(
        product=product,
        signature=signature,
        shots=len(chosen),
        images=[{"name": im.name, "sha256": im.sha256} for im in chosen],
        levels=[list(f.shape) for f in bank.features],
        u=u,
        gamma=gamma,
        model_id=model_id,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        content_sha256=content_digest(bank),
        coreset=coreset,
        candidates=len(images),
    )
    return Registration(bank, meta, tuple(im.name for im in chosen))
