"""Tests for trainer.report."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.report import (
    plot_heatmap_grid,
    plot_roc_curves,
    plot_score_distributions,
    write_html_index,
)

MIN_SIDE = 150  # pixels; every figure is several inches wide at ~110 dpi
MIN_COLOURS = 10  # a rendered plot has far more distinct colours than a blank canvas


def _assert_valid_png(path: Path) -> None:
    """Checks that ``path`` is a non-trivial PNG image."""
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= MIN_SIDE
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(np.int64)
    packed = pixels @ np.array([1 << 16, 1 << 8, 1])  # one integer per RGB colour
    assert np.unique(packed).size >= MIN_COLOURS


def _scores_data(n_classes: int, seed: int = 0):
    """Labels, class names and raw/calibrated scores for ``n_classes`` classes."""
    rng = np.random.default_rng(seed)
    scales = [0.1, 5.0, 80.0][:n_classes]  # very different raw score scales
    labels, classes, raw, calibrated = [], [], [], []
    for index, scale in enumerate(scales):
        y = np.r_[np.zeros(12, dtype=int), np.ones(4, dtype=int)]
        z = rng.normal(size=y.size) + 4.0 * y
        labels.append(y)
        classes.append(np.full(y.size, f"class{index}"))
        raw.append(scale * (1.0 + 0.1 * z))
        calibrated.append(z)
    return (np.concatenate(labels), np.concatenate(classes),
            np.concatenate(raw), np.concatenate(calibrated))


def _heatmap_data(n: int, size: int = 16, seed: int = 0):
    """Random uint8 images, float maps and square masks of side ``size``."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    maps = rng.random((n, size, size))
    masks = np.zeros((n, size, size), dtype=bool)
    masks[:, 4:9, 5:10] = True
    return images, maps, masks


# ---------------------------------------------------------------------------
# plot_score_distributions
# ---------------------------------------------------------------------------


def test_score_distributions_three_classes_with_thresholds(tmp_path):
    labels, classes, raw, calibrated = _scores_data(3)
    out = plot_score_distributions(
        {"none": raw, "cada": calibrated, "bank": calibrated * 0.5},
        labels, classes, tmp_path / "scores.png",
        threshold_by_mode={"none": 10.0, "cada": 2.0, "bank": 1.0}, title="scores",
    )
    assert out == tmp_path / "scores.png"
    _assert_valid_png(out)


def test_score_distributions_one_class_without_threshold(tmp_path):
    labels, classes, raw, _ = _scores_data(1)
    out = plot_score_distributions({"none": raw}, labels, classes, str(tmp_path / "s.png"))
    assert isinstance(out, Path)
    _assert_valid_png(out)


def test_score_distributions_partial_thresholds_and_missing_anomalies(tmp_path):
    labels, classes, raw, calibrated = _scores_data(3)
    labels[classes == "class1"] = 0  # a class with no anomalous samples
    out = plot_score_distributions(
        {"none": raw, "cada": calibrated}, labels, classes,
        tmp_path / "nested" / "s.png", threshold_by_mode={"cada": 2.0},
    )
    _assert_valid_png(out)


def test_score_distributions_rejects_length_mismatch(tmp_path):
    labels, classes, raw, _ = _scores_data(2)
    with pytest.raises(ValueError, match="mode 'none'"):
        plot_score_distributions({"none": raw[:-1]}, labels, classes, tmp_path / "s.png")
    with pytest.raises(ValueError, match="at least one mode"):
        plot_score_distributions({}, labels, classes, tmp_path / "s.png")


# ---------------------------------------------------------------------------
# plot_heatmap_grid
# ---------------------------------------------------------------------------


def test_heatmap_grid_without_masks(tmp_path):
    images, maps, _ = _heatmap_data(4)
    out = plot_heatmap_grid(images, maps, tmp_path / "h.png")
    _assert_valid_png(out)


def test_heatmap_grid_masks_titles_and_partial_last_row(tmp_path):
    images, maps, masks = _heatmap_data(5)
    masks[1] = False  # an empty mask draws no contour
    titles = [f"pcb defect score {i:.2f} FAIL" for i in range(5)]
    out = plot_heatmap_grid(images, maps, tmp_path / "h.png", masks=masks,
                            titles=titles, columns=3, vmax=0.8, alpha=0.4)
    _assert_valid_png(out)


def test_heatmap_grid_single_sample_constant_map(tmp_path):
    images, _, masks = _heatmap_data(1)
    maps = np.zeros((1, 16, 16))  # default vmax equals vmin here
    out = plot_heatmap_grid(images, maps, tmp_path / "h.png", masks=masks, titles=["one"])
    _assert_valid_png(out)


@pytest.mark.parametrize(
    ("maps_shape", "masks_shape", "message"),
    [
        ((2, 16, 12), None, "maps must have shape"),
        ((3, 16, 16), None, "maps must have shape"),
        ((2, 16, 16), (2, 8, 8), "masks must have shape"),
    ],
)
def test_heatmap_grid_rejects_shape_mismatch(tmp_path, maps_shape, masks_shape, message):
    images, _, _ = _heatmap_data(2)
    masks = None if masks_shape is None else np.zeros(masks_shape, dtype=bool)
    with pytest.raises(ValueError, match=message):
        plot_heatmap_grid(images, np.zeros(maps_shape), tmp_path / "h.png", masks=masks)


def test_heatmap_grid_rejects_bad_images_and_titles(tmp_path):
    images, maps, _ = _heatmap_data(2)
    with pytest.raises(ValueError, match="images must have shape"):
        plot_heatmap_grid(images[..., 0], maps, tmp_path / "h.png")
    with pytest.raises(ValueError, match="titles must have 2 entries"):
        plot_heatmap_grid(images, maps, tmp_path / "h.png", titles=["only one"])
    with pytest.raises(ValueError, match="columns must be positive"):
        plot_heatmap_grid(images, maps, tmp_path / "h.png", columns=0)


# ---------------------------------------------------------------------------
# plot_roc_curves
# ---------------------------------------------------------------------------


def _roc(labels: np.ndarray, scores: np.ndarray):
    """Exact ROC points (no ties) and trapezoid AUC for the test data."""
    order = np.argsort(-scores)
    y = labels[order]
    tpr = np.r_[0.0, np.cumsum(y) / y.sum()]
    fpr = np.r_[0.0, np.cumsum(1 - y) / (1 - y).sum()]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return fpr, tpr, auc


@pytest.mark.parametrize("n_curves", [1, 3])
def test_roc_curves(tmp_path, n_curves):
    labels, _, raw, calibrated = _scores_data(3)
    candidates = {"none": raw, "cada": calibrated, "bank": -calibrated}
    curves = {name: _roc(labels, s) for name, s in list(candidates.items())[:n_curves]}
    out = plot_roc_curves(curves, tmp_path / "roc.png", title="ROC")
    _assert_valid_png(out)


# ---------------------------------------------------------------------------
# write_html_index
# ---------------------------------------------------------------------------


def test_html_index_escapes_text(tmp_path):
    out = write_html_index(
        tmp_path / "index.html", "Report <b>&",
        [("Scores <i>", [("scores.png", "<script>alert(1)</script>"),
                         ('odd "name".png', "plain")])],
    )
    text = out.read_text(encoding="utf-8")
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "Report &lt;b&gt;&amp;" in text
    assert "Scores &lt;i&gt;" in text
    assert 'src="odd &quot;name&quot;.png"' in text
    assert "http" not in text  # self-contained: no external assets
    assert text.startswith("<!DOCTYPE html>")
