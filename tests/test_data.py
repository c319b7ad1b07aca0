"""Tests for the MVTec-layout loader (trainer.data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.data import (
    DatasetError,
    ImageCache,
    Sample,
    list_classes,
    list_samples,
    load_image,
    load_mask,
)

REAL_ROOT = Path("/work/shared/data/industrial")
SIZE = 16


def _save(array: np.ndarray, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _rgb(rng: np.random.Generator, h: int = 30, w: int = 40) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _make_widget(root: Path, rng: np.random.Generator) -> None:
    """Class with every image flavour, a stray text file and partial masks."""
    good = root / "widget" / "train" / "good"
    _save(_rgb(rng), good / "a.jpg", format="JPEG")
    _save(rng.integers(0, 256, size=(24, 24), dtype=np.uint8), good / "b.png")
    sixteen = np.full((20, 20), 65535, dtype=np.uint16)
    sixteen[:, 10:] = 257 * 100  # exactly 100 on the 8-bit scale
    _save(sixteen, good / "c.png")
    _save(_rgb(rng, 12, 12), good / "D.BMP", format="BMP")
    (good / "notes.txt").write_text("not an image")
    _save(_rgb(rng), good / ".hidden.png")
    test = root / "widget" / "test"
    _save(_rgb(rng), test / "good" / "g1.png")
    _save(_rgb(rng), test / "crack" / "c1.png")
    _save(_rgb(rng), test / "crack" / "c2.png")
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:4, :4] = 255
    _save(mask, root / "widget" / "ground_truth" / "crack" / "c1_mask.png")


def _make_plain(root: Path, rng: np.random.Generator) -> None:
    """Class without any ground_truth folder (image-level labels only)."""
    _save(_rgb(rng), root / "plain" / "train" / "good" / "x.png")
    _save(_rgb(rng), root / "plain" / "test" / "good" / "y.png")
    _save(_rgb(rng), root / "plain" / "test" / "bad" / "z.png")


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    _make_widget(tmp_path, rng)
    _make_plain(tmp_path, rng)
    (tmp_path / "notaclass" / "test").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "good" / "readme.txt").write_text("no images")
    return tmp_path


def test_list_classes(tree: Path) -> None:
    assert list_classes(tree) == ["empty", "plain", "widget"]


def test_train_samples_sorted_and_filtered(tree: Path) -> None:
    samples = list_samples(tree, "widget", "train")
    assert [s.path.name for s in samples] == ["D.BMP", "a.jpg", "b.png", "c.png"]
    assert all(s.split == "train" and s.defect == "good" and s.label == 0 for s in samples)
    assert all(s.mask_path is None and s.cls == "widget" for s in samples)


def test_test_samples_labels_and_masks(tree: Path) -> None:
    samples = list_samples(tree, "widget", "test")
    names = [(s.defect, s.path.name, s.label) for s in samples]
    assert names == [("crack", "c1.png", 1), ("crack", "c2.png", 1), ("good", "g1.png", 0)]
    assert samples[0].mask_path is not None and samples[0].mask_path.name == "c1_mask.png"
    assert samples[1].mask_path is None
    plain = list_samples(tree, "plain", "test")
    expected = [("bad", 1, None), ("good", 0, None)]
    assert [(s.defect, s.label, s.mask_path) for s in plain] == expected


def test_sample_is_frozen(tree: Path) -> None:
    sample = list_samples(tree, "plain", "train")[0]
    with pytest.raises(AttributeError):
        sample.label = 1  # type: ignore[misc]


@pytest.mark.parametrize("name", ["a.jpg", "b.png", "c.png", "D.BMP"])
def test_load_image_is_rgb_uint8(tree: Path, name: str) -> None:
    image = load_image(tree / "widget" / "train" / "good" / name, SIZE)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8


def test_grayscale_becomes_three_equal_channels(tree: Path) -> None:
    image = load_image(tree / "widget" / "train" / "good" / "b.png", None)
    assert image.shape == (24, 24, 3)
    assert np.array_equal(image[..., 0], image[..., 1])
    assert np.array_equal(image[..., 0], image[..., 2])


def test_sixteen_bit_scaled_to_eight_bit(tree: Path) -> None:
    image = load_image(tree / "widget" / "train" / "good" / "c.png", None)
    assert image.shape == (20, 20, 3)
    assert (image[:, :10] == 255).all()  # 65535 is full scale
    assert (image[:, 10:] == 100).all()  # 257 * 100 maps exactly to 100


def test_palette_and_rgba_converted(tmp_path: Path) -> None:
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    palette = Image.fromarray(np.zeros((10, 10), dtype=np.uint8), mode="P")
    palette.putpalette([200, 0, 0] * 256)
    palette.save(tmp_path / "pal.png")
    for name in ("rgba.png", "pal.png"):
        image = load_image(tmp_path / name, None)
        assert image.shape == (10, 10, 3)
        assert (image[..., 0] == 200).all() and (image[..., 1:] == 0).all()


def test_bilinear_resize_of_constant_image_is_exact(tmp_path: Path) -> None:
    _save(np.full((7, 9, 3), 77, dtype=np.uint8), tmp_path / "flat.png")
    assert (load_image(tmp_path / "flat.png", 32) == 77).all()


def test_load_mask_nearest_resize(tree: Path) -> None:
    crack = list_samples(tree, "widget", "test")[0]
    up = load_mask(crack, SIZE)
    expected = np.zeros((SIZE, SIZE), dtype=bool)
    expected[:8, :8] = True  # the 4x4 block of an 8x8 mask, scaled by 2 without blur
    assert up.dtype == bool and np.array_equal(up, expected)
    down = load_mask(crack, 4)
    assert np.array_equal(down, np.pad(np.ones((2, 2), bool), ((0, 2), (0, 2))))
    assert load_mask(crack, None).shape == (8, 8)


def test_load_mask_normal_and_missing(tree: Path) -> None:
    samples = list_samples(tree, "widget", "test")
    good = samples[2]
    assert not load_mask(good, SIZE).any() and load_mask(good, SIZE).shape == (SIZE, SIZE)
    assert load_mask(good, None).shape == (30, 40)  # the image's own (height, width)
    assert load_mask(samples[1], SIZE) is None


def test_dataset_errors_name_the_path(tree: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere"):
        list_classes(tree / "nowhere")
    with pytest.raises(DatasetError, match="nowhere"):
        list_samples(tree / "nowhere", "widget", "train")
    with pytest.raises(DatasetError, match="ghost"):
        list_samples(tree, "ghost", "train")
    with pytest.raises(DatasetError, match="empty"):
        list_samples(tree, "empty", "train")
    with pytest.raises(DatasetError, match="notaclass"):
        list_samples(tree, "notaclass", "train")
    with pytest.raises(DatasetError, match="split"):
        list_samples(tree, "widget", "validation")
    assert issubclass(DatasetError, ValueError)


@pytest.mark.parametrize("workers", [1, 2])
def test_image_cache(tree: Path, workers: int) -> None:
    samples = list_samples(tree, "widget", "test")
    cache = ImageCache.load(samples, SIZE, workers=workers)
    assert len(cache) == 3 and cache.samples == samples
    assert cache.images.shape == (3, SIZE, SIZE, 3) and cache.images.dtype == np.uint8
    assert cache.masks.shape == (3, SIZE, SIZE) and cache.masks.dtype == bool
    assert cache.has_mask.tolist() == [True, False, True]
    assert cache.labels.tolist() == [1, 1, 0]
    assert cache.masks[0].sum() == 64 and not cache.masks[1:].any()  # 8x8 block, then none
    for i, sample in enumerate(samples):
        assert np.array_equal(cache.images[i], load_image(sample.path, SIZE))


@pytest.mark.real_data
@pytest.mark.skipif(not REAL_ROOT.is_dir(), reason=f"real dataset not present at {REAL_ROOT}")
def test_real_dataset_loads() -> None:
    classes = list_classes(REAL_ROOT)
    assert "solar_cell" in classes
    for cls in classes:
        train = list_samples(REAL_ROOT, cls, "train")[:2]
        test = [s for s in list_samples(REAL_ROOT, cls, "test") if s.label == 1]
        assert test, f"{cls} has no anomalous test image"
        cache = ImageCache.load(train + test[:2], 64)
        assert cache.images.shape == (4, 64, 64, 3)
        if cls == "solar_cell":
            assert all(s.mask_path is None for s in test)
            assert load_mask(test[0], 64) is None
        else:
            assert cache.has_mask.all()


def test_sample_fields() -> None:
    sample = Sample(Path("x.png"), "c", "test", "crack", 1, None)
    assert (sample.cls, sample.split, sample.defect, sample.label) == ("c", "test", "crack", 1)
