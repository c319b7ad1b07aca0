"""Loader for datasets stored in the MVTec-AD directory layout.

Layout::

    <root>/<class>/train/good/<image>
    <root>/<class>/test/<defect>/<image>            (defect "good" = normal)
    <root>/<class>/ground_truth/<defect>/<stem>_mask.png

Ground-truth masks are optional: a class may have no ``ground_truth`` folder
at all, or masks may be missing for single images. Such anomalous samples
carry an image-level label only (``Sample.mask_path is None``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from inspector.decode import load_image_file

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
SPLITS = ("train", "test")
GOOD = "good"
MASK_SUFFIX = "_mask"
DEFAULT_WORKERS = 2  # decoding is I/O and zlib bound; two threads saturate a small CPU

_UINT8_MAX = 255


class DatasetError(ValueError):
    """Raised when a dataset folder is missing, malformed or empty."""


@dataclass(frozen=True)
class Sample:
    """One image of the dataset with its labels.

    Attributes:
        path: Image file.
        cls: Product class (top-level folder name).
        split: ``"train"`` or ``"test"``.
        defect: Defect folder name; ``"good"`` for normal images.
        label: 0 for normal, 1 for anomalous.
        mask_path: Ground-truth mask file, or None when there is none.
    """

    path: Path
    cls: str
    split: str
    defect: str
    label: int
    mask_path: Path | None


def _is_visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _is_image_file(path: Path) -> bool:
    return _is_visible(path) and path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _is_image_file(p))


def _subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _is_visible(p))


def _require_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root does not exist or is not a folder: {root}")
    return root


def list_classes(root: str | Path) -> list[str]:
    """Lists the product classes of a dataset.

    Args:
        root: Dataset root folder.

    Returns:
        Sorted names of the sub-folders that contain ``train/good``.

    Raises:
        DatasetError: If ``root`` is not an existing folder.
    """
    root = _require_root(root)
    return [p.name for p in _subfolders(root) if (p / "train" / GOOD).is_dir()]


def _mask_index(folder: Path) -> dict[str, Path]:
    """Maps image stems to mask files found in one ground-truth folder."""
    index: dict[str, Path] = {}
    for path in _image_files(folder):
        stem = path.stem
        if not stem.endswith(MASK_SUFFIX):
            continue
        key = stem[: -len(MASK_SUFFIX)]
        # Prefer the canonical ".png" mask when several extensions exist.
        if key not in index or path.suffix.lower() == ".png":
            index[key] = path
    return index


def _train_samples(class_dir: Path, cls: str) -> list[Sample]:
    files = _image_files(class_dir / "train" / GOOD)
    return [Sample(p, cls, "train", GOOD, 0, None) for p in files]


def _test_samples(class_dir: Path, cls: str) -> list[Sample]:
    samples: list[Sample] = []
    for defect_dir in _subfolders(class_dir / "test"):
        defect = defect_dir.name
        label = 0 if defect == GOOD else 1
        masks = {} if label == 0 else _mask_index(class_dir / "ground_truth" / defect)
        for path in _image_files(defect_dir):
            samples.append(Sample(path, cls, "test", defect, label, masks.get(path.stem)))
    return samples


def list_samples(root: str | Path, cls: str, split: str) -> list[Sample]:
    """Lists the samples of one class and split in a deterministic order.

    Args:
        root: Dataset root folder.
        cls: Class folder name.
        split: ``"train"`` (only ``train/good``) or ``"test"`` (all defects).

    Returns:
        Samples sorted by defect folder, then by file name.

    Raises:
        DatasetError: If the root, the class or the split folder is missing,
            if ``split`` is unknown, or if the split holds no image.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = _require_root(root)
    class_dir = root / cls
    if not class_dir.is_dir():
        raise DatasetError(f"class folder does not exist: {class_dir}")
    split_dir = class_dir / split
    if not split_dir.is_dir():
        raise DatasetError(f"split folder does not exist: {split_dir}")
    if split == "train":
        samples = _train_samples(class_dir, cls)
    else:
        samples = _test_samples(class_dir, cls)
    if not samples:
        raise DatasetError(f"no image files found under {split_dir}")
    return samples


def load_image(path: str | Path, size: int | None) -> np.ndarray:
    """Reads an image as 8-bit RGB, optionally resized to a square, exactly as the worker serves
    the same file (``inspector.decode.load_image_file``: one reader for training, registration
    and serving).

    Args:
        path: Image file (PNG, JPEG, BMP, TIFF, ...).
        size: Output side length (bilinear resize), or None to keep the
            original size.

    Returns:
        uint8 array of shape (size, size, 3), or (H, W, 3) when size is None.

    Raises:
        DecodeError: the file is not a readable image (named in the message).
    """
    return load_image_file(path, size)


def _image_size(path: Path) -> tuple[int, int]:
    """Returns (height, width) of an image without decoding its pixels."""
    with Image.open(path) as img:
        width, height = img.size
    return height, width


def _read_mask(path: Path, size: int | None) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        array = np.asarray(img)
    binary = array != 0
    if binary.ndim == 3:
        binary = binary.any(axis=2)
    if size is None or binary.shape == (size, size):
        return binary
    as_image = Image.fromarray(binary.astype(np.uint8) * _UINT8_MAX, mode="L")
    return np.asarray(as_image.resize((size, size), Image.NEAREST)) != 0


def load_mask(sample: Sample, size: int | None) -> np.ndarray | None:
    """Reads the ground-truth mask of a sample.

    Args:
        sample: Sample to read the mask of.
        size: Output side length (nearest-neighbour resize), or None to keep
            the original size.

    Returns:
        bool array of shape (size, size) (or the image size when size is
        None), True on anomalous pixels. All False for a normal sample. None
        for an anomalous sample that has no mask file.
    """
    if sample.label == 0:
        shape = (size, size) if size is not None else _image_size(sample.path)
        return np.zeros(shape, dtype=bool)
    if sample.mask_path is None or not sample.mask_path.is_file():
        return None
    return _read_mask(sample.mask_path, size)


@dataclass
class ImageCache:
    """Images and masks of a list of samples, decoded once into memory.

    Attributes:
        samples: The samples, in the order of the arrays.
        images: uint8 array (N, S, S, 3).
        masks: bool array (N, S, S); all False where no mask is known.
        has_mask: bool array (N,); True where ``masks`` holds a pixel-exact
            ground truth (always for normal samples).
        labels: int64 array (N,) of image-level labels.
    """

    samples: list[Sample]
    images: np.ndarray
    masks: np.ndarray
    has_mask: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.samples)

    @classmethod
    def load(
        cls, samples: Sequence[Sample], size: int, workers: int = DEFAULT_WORKERS
    ) -> "ImageCache":
        """Decodes all samples with a small thread pool.

        Args:
            samples: Samples to load.
            size: Side length every image and mask is resized to.
            workers: Maximum number of decoding threads.

        Returns:
            The filled cache; array order follows ``samples``.
        """
        samples = list(samples)
        count = len(samples)
        images = np.zeros((count, size, size, 3), dtype=np.uint8)
        masks = np.zeros((count, size, size), dtype=bool)
        has_mask = np.zeros(count, dtype=bool)

        def decode(sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
            return load_image(sample.path, size), load_mask(sample, size)

        n_threads = max(1, min(workers, count))
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            for i, (image, mask) in enumerate(pool.map(decode, samples)):
                images[i] = image
                if mask is not None:
                    masks[i] = mask
                    has_mask[i] = True
        labels = np.array([s.label for s in samples], dtype=np.int64)
        return cls(samples, images, masks, has_mask, labels)
