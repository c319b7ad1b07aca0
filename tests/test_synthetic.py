"""Tests for the synthetic products (trainer.synthetic) and anomalies (trainer.anomalies)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer import anomalies as A
from trainer import synthetic as S
from trainer.data import list_classes, list_samples, load_image, load_mask

SIZE = 64  # small images keep the tests fast; defects are scaled to the image
COUNTS = dict(n_train=3, n_test_good=2, n_test_defect=6)  # two images per defect kind
SEEDS = range(5)


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    return S.generate_dataset(root, size=SIZE, seed=7, **COUNTS)


def test_same_seed_gives_identical_bytes(dataset: Path, tmp_path: Path) -> None:
    again = S.generate_dataset(tmp_path / "again", size=SIZE, seed=7, **COUNTS)
    first, second = _files(dataset), _files(again)
    assert first.keys() == second.keys() and len(first) == 3 * (3 + 2 + 6 + 6)  # 6 masks
    assert first == second


def test_different_seed_differs(dataset: Path, tmp_path: Path) -> None:
    other = _files(S.generate_dataset(tmp_path / "other", size=SIZE, seed=8, **COUNTS))
    first = _files(dataset)
    assert first.keys() == other.keys()
    images = [k for k in first if not k.endswith("_mask.png")]
    assert all(first[k] != other[k] for k in images)


def test_existing_class_folder_needs_overwrite(dataset: Path) -> None:
    with pytest.raises(FileExistsError):
        S.generate_dataset(dataset, classes=("tiles",), size=SIZE, **COUNTS)


def test_tree_loads_with_data_module(dataset: Path) -> None:
    assert list_classes(dataset) == ["rings", "tiles", "weave"]
    for cls in list_classes(dataset):
        train = list_samples(dataset, cls, "train")
        test = list_samples(dataset, cls, "test")
        assert len(train) == 3 and len(test) == 8
        defects = sorted({s.defect for s in test if s.label == 1})
        assert defects == sorted(S.DEFECTS[cls])
        for sample in test:
            image = load_image(sample.path, None)
            assert image.shape == (SIZE, SIZE, 3)
            if sample.label == 1:
                assert sample.mask_path is not None
                area = load_mask(sample, None).mean()
                assert S.MIN_DEFECT_AREA <= area <= S.MAX_DEFECT_AREA, (sample.path, area)


@pytest.mark.parametrize("product", S.PRODUCTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_defects_visible_small_and_on_the_good_instance(product: str, seed: int) -> None:
    for kind in S.DEFECTS[product]:
        good = S.render_good(product, np.random.default_rng(seed), SIZE)
        image, mask, name = S.render_defect(product, np.random.default_rng(seed), SIZE, kind)
        assert name == kind and image.dtype == np.uint8 and mask.dtype == bool
        assert S.MIN_DEFECT_AREA <= mask.mean() <= S.MAX_DEFECT_AREA
        change = A.mean_change(good, image, mask)
        assert change >= S.MIN_DEFECT_CHANGE, (product, kind, change)


def test_render_defect_random_kind_and_errors() -> None:
    _, _, name = S.render_defect("weave", np.random.default_rng(0), SIZE)
    assert name in S.DEFECTS["weave"]
    with pytest.raises(ValueError):
        S.render_good("teapot", np.random.default_rng(0), SIZE)
    with pytest.raises(ValueError):
        S.render_defect("tiles", np.random.default_rng(0), SIZE, "notch")


def _features(product: str) -> np.ndarray:
    """Mean RGB, luminance contrast and horizontal gradient energy per image."""
    rng = np.random.default_rng(0)
    images = np.stack([S.render_good(product, rng, SIZE) for _ in range(6)]).astype(float)
    lum = images.mean(axis=3)
    grad = np.abs(np.diff(lum, axis=2)).mean(axis=(1, 2))
    return np.column_stack([images.mean(axis=(1, 2)), lum.std(axis=(1, 2)), grad])


def test_products_look_different() -> None:
    feats = {p: _features(p) for p in S.PRODUCTS}
    spread = max(np.linalg.norm(f - f.mean(0), axis=1).max() for f in feats.values())
    for i, a in enumerate(S.PRODUCTS):
        for b in S.PRODUCTS[i + 1 :]:
            gap = np.linalg.norm(feats[a].mean(0) - feats[b].mean(0))
            # Products must be far apart compared with one product's natural variation.
            assert gap > 3.0 * spread, (a, b, gap, spread)


def test_good_images_vary_but_are_deterministic() -> None:
    for product in S.PRODUCTS:
        rng = np.random.default_rng(3)
        a, b = S.render_good(product, rng, SIZE), S.render_good(product, rng, SIZE)
        assert not np.array_equal(a, b)
        assert np.array_equal(a, S.render_good(product, np.random.default_rng(3), SIZE))


# ----------------------------------------------------------------------------
# Anomaly synthesis
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def normals() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [S.render_good(p, rng, 96) for p in S.PRODUCTS]


@pytest.mark.parametrize("kind", list(A.KINDS))
@pytest.mark.parametrize("seed", SEEDS)
def test_synthesizer_each_kind(normals: list[np.ndarray], kind: str, seed: int) -> None:
    synth = A.AnomalySynthesizer(kinds=(kind,))
    rng = np.random.default_rng(seed)
    for image in normals:
        out, mask, used = synth.sample(image, rng, source=normals[0] if seed % 2 else None)
        assert used == kind
        assert out.shape == image.shape and out.dtype == np.uint8
        assert mask.shape == image.shape[:2] and mask.dtype == bool and mask.any()
        assert np.array_equal(out[~mask], image[~mask])  # every kind is exact outside its mask
        assert A.mean_change(image, out, mask) >= A.MIN_MEAN_CHANGE


@pytest.mark.parametrize("seed", SEEDS)
def test_cut_paste_mask_is_exactly_the_changed_pixels(normals: list[np.ndarray], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for image in normals:
        out, mask = A.cut_paste(image, rng)
        delta = np.abs(out.astype(int) - image.astype(int)).max(axis=2)
        assert np.array_equal(mask, delta >= A.CUTPASTE_MIN_CHANGE)


@pytest.mark.parametrize("seed", SEEDS)
def test_scratch_mask_is_thin(normals: list[np.ndarray], seed: int) -> None:
    image = normals[1]
    out, mask = A.scratch(image, np.random.default_rng(seed))
    changed = (out != image).any(axis=2)
    assert changed.any() and not (changed & ~mask).any()
    assert mask.mean() < 0.15  # at most 3 strokes of <= 0.5 side x 6 px on a 96 px image


def test_texture_paste_with_source_and_given_mask(normals: list[np.ndarray]) -> None:
    region = np.zeros((96, 96), dtype=bool)
    region[10:30, 40:70] = True
    rng = np.random.default_rng(0)
    out, mask = A.texture_paste(normals[2], rng, source=normals[3], mask=region)
    assert np.array_equal(mask, region)
    assert np.array_equal(out[~region], normals[2][~region])


def test_fallback_on_flat_image() -> None:
    black = np.zeros((64, 64, 3), dtype=np.uint8)
    synth = A.AnomalySynthesizer(kinds=("cutpaste",))
    out, mask, used = synth.sample(black, np.random.default_rng(0))
    assert used == "fallback"  # a brightness-jittered copy of black is still black
    assert mask.any() and np.array_equal(out[~mask], black[~mask])
    assert (out[mask] == 128).all()  # shifted by half the uint8 range


def test_synthesizer_deterministic_and_weighted(normals: list[np.ndarray]) -> None:
    synth = A.AnomalySynthesizer(weights=(0.0, 0.0, 1.0))
    a = synth.sample(normals[0], np.random.default_rng(5))
    b = synth.sample(normals[0], np.random.default_rng(5))
    assert a[2] == b[2] == "scratch"
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(ValueError):
        A.AnomalySynthesizer(kinds=("melt",))
    with pytest.raises(ValueError):
        A.AnomalySynthesizer(weights=(1.0, -1.0, 1.0))


def test_synthesizer_rejects_bad_images() -> None:
    with pytest.raises(ValueError):
        A.AnomalySynthesizer()(np.zeros((8, 8), np.uint8), np.random.default_rng(0))


@pytest.mark.parametrize("size", [64, 256])
def test_perlin_mask_coverage(size: int) -> None:
    rng = np.random.default_rng(0)
    covers = [A.perlin_mask(size, rng).mean() for _ in range(40)]
    assert min(covers) >= A.MIN_COVER and max(covers) <= A.MAX_COVER


def test_perlin_noise_range_and_determinism() -> None:
    a = A.perlin_noise((64, 80), (4, 5), np.random.default_rng(1))
    b = A.perlin_noise((64, 80), (4, 5), np.random.default_rng(1))
    assert a.shape == (64, 80) and np.array_equal(a, b)
    assert np.abs(a).max() <= 1.0 + 1e-5  # sqrt(2) scaling bounds 2-D Perlin noise by 1
    assert a.std() > 0.1  # not degenerate
