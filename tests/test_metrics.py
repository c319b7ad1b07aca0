"""Tests for trainer.metrics."""

import math

import numpy as np
import pytest
from scipy import ndimage

from trainer.metrics import (
    aupro,
    average_precision,
    rate_at_threshold,
    roc_auc,
    threshold_at_false_reject_rate,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics")

# roc_auc / average_precision are exact computations, as are scikit-learn's;
# the two only differ in floating-point summation order, i.e. by a few ulps.
EXACT_TOL = 1e-12


# ---------------------------------------------------------------------------
# roc_auc / average_precision against scikit-learn
# ---------------------------------------------------------------------------


def _toy_data(seed: int, n: int, positive_fraction: float, decimals: int | None):
    """Random labels and label-correlated scores, optionally rounded to force ties."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < positive_fraction
    labels[0], labels[1] = True, False  # guarantee both classes
    scores = rng.normal(size=n) + labels * 0.8  # shift makes the AUC non-trivial
    if decimals is not None:
        scores = np.round(scores, decimals)
    return labels, scores


CASES = [
    # (n, positive fraction, rounding decimals or None)
    (50, 0.5, None),
    (1000, 0.5, None),
    (1000, 0.5, 0),  # heavy ties: only ~10 distinct values
    (1000, 0.5, 1),
    (5000, 0.02, None),  # imbalanced
    (5000, 0.02, 0),  # imbalanced and heavy ties
    (5000, 0.97, 1),  # imbalanced the other way
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,frac,decimals", CASES)
def test_roc_auc_matches_sklearn(seed, n, frac, decimals):
    labels, scores = _toy_data(seed, n, frac, decimals)
    expected = sklearn_metrics.roc_auc_score(labels, scores)
    assert abs(roc_auc(labels, scores) - expected) < EXACT_TOL
    # int labels and an arbitrary shape give the same answer
    assert abs(roc_auc(labels.astype(int).reshape(-1, 1), scores) - expected) < EXACT_TOL


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,frac,decimals", CASES)
def test_average_precision_matches_sklearn(seed, n, frac, decimals):
    labels, scores = _toy_data(seed, n, frac, decimals)
    expected = sklearn_metrics.average_precision_score(labels, scores)
    assert abs(average_precision(labels, scores) - expected) < EXACT_TOL
    assert abs(average_precision(labels.astype(np.int64), scores) - expected) < EXACT_TOL


def test_roc_auc_exact_small_values():
    # Perfect, inverted and fully tied rankings have known exact AUCs.
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(labels, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert roc_auc(labels, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert roc_auc(labels, np.zeros(4)) == 0.5


def test_roc_auc_accepts_2d_maps():
    # Pixel-level use: (N, H, W) arrays are flattened.
    rng = np.random.default_rng(3)
    labels = rng.random((4, 16, 16)) < 0.1
    scores = rng.random((4, 16, 16)) + labels
    expected = sklearn_metrics.roc_auc_score(labels.ravel(), scores.ravel())
    assert abs(roc_auc(labels, scores) - expected) < EXACT_TOL


@pytest.mark.parametrize("labels", [np.zeros(5, dtype=int), np.ones(5, dtype=bool)])
def test_roc_auc_raises_on_single_class(labels):
    with pytest.raises(ValueError, match="one class"):
        roc_auc(labels, np.arange(5.0))


def test_average_precision_raises_without_positives():
    with pytest.raises(ValueError, match="anomalous"):
        average_precision(np.zeros(5), np.arange(5.0))


def test_rejects_non_binary_labels_and_nan_scores():
    with pytest.raises(ValueError, match="0/1"):
        roc_auc(np.array([0, 1, 2]), np.arange(3.0))
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(np.array([0, 1, 1]), np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match="same number"):
        roc_auc(np.array([0, 1, 1]), np.arange(4.0))


# ---------------------------------------------------------------------------
# aupro
# ---------------------------------------------------------------------------


def _hand_case(last_quarter_score: float):
    """Two 8x8 images, 100 normal pixels, two regions (see the tests' docstrings)."""
    masks = np.zeros((2, 8, 8), dtype=bool)
    maps = np.zeros((2, 8, 8))
    # Image 0: region R1, 2x2 = 4 pixels, all at 0.9.
    masks[0, 0:2, 0:2] = True
    maps[0, 0:2, 0:2] = 0.9
    # Image 1: region R2, 4x6 = 24 pixels: 12 at 0.8, 6 at 0.45, 6 at the given score.
    masks[1, 2:6, 1:7] = True
    maps[1, 2:4, 1:7] = 0.8
    maps[1, 4, 1:7] = 0.45
    maps[1, 5, 1:7] = last_quarter_score
    # Normal pixels (128 - 28 = 100): 10 at 0.5, 10 at 0.4, the other 80 stay 0.
    normal = np.flatnonzero(~masks.ravel())
    maps.ravel()[normal[:10]] = 0.5
    maps.ravel()[normal[10:20]] = 0.4
    return masks, maps


# Exact inputs and a handful of additions: only float summation error remains.
AUPRO_EXACT_TOL = 1e-12


def test_aupro_hand_computed():
    """Hand derivation (100 normal pixels; R1: 4 px, R2: 24 px; PRO = mean of 2).

    Undetected quarter of R2 at -1, below every normal pixel. Curve points,
    threshold -> (FPR, PRO):
        0.9  -> (0.0, (1 + 0) / 2)        = (0.0, 0.5)
        0.8  -> (0.0, (1 + 12/24) / 2)    = (0.0, 0.75)
        0.5  -> (0.1, 0.75)               (10 normals at 0.5)
        0.45 -> (0.1, (1 + 18/24) / 2)    = (0.1, 0.875)
        0.4  -> (0.2, 0.875)              (10 more normals)
        0.0  -> (1.0, 0.875)              (the 80 remaining normals)
        -1   -> (1.0, 1.0)
    max_fpr = 0.3: area = 0.1 * 0.75 + 0.1 * 0.875 + 0.1 * 0.875 = 0.25
    (the vertical steps at FPR 0 and 0.1 have zero width); 0.25 / 0.3 = 5/6.
    max_fpr = 0.15 (interpolated inside the flat step 0.1 .. 0.2):
    area = 0.075 + 0.05 * 0.875 = 0.11875; 0.11875 / 0.15 = 19/24.
    """
    masks, maps = _hand_case(last_quarter_score=-1.0)
    assert abs(aupro(masks, maps, max_fpr=0.3) - 5 / 6) < AUPRO_EXACT_TOL
    assert abs(aupro(masks, maps, max_fpr=0.15) - 19 / 24) < AUPRO_EXACT_TOL
    # 0/1 integer masks are accepted too.
    assert abs(aupro(masks.astype(np.uint8), maps) - 5 / 6) < AUPRO_EXACT_TOL


def test_aupro_hand_computed_with_ties():
    """Same case, but the undetected quarter of R2 ties with the 80 normals at 0.

    The last two points merge into threshold 0 -> (1.0, 1.0), so the curve goes
    straight from (0.2, 0.875) to (1.0, 1.0); at FPR 0.3 it is
    0.875 + 0.125 * 0.1 / 0.8 = 0.890625.
    area = 0.075 + 0.0875 + 0.1 * (0.875 + 0.890625) / 2 = 0.25078125;
    0.25078125 / 0.3 = 0.8359375.
    """
    masks, maps = _hand_case(last_quarter_score=0.0)
    assert abs(aupro(masks, maps, max_fpr=0.3) - 0.8359375) < AUPRO_EXACT_TOL


def _random_masks(rng, n_images: int, size: int, region: int) -> np.ndarray:
    """One square region of side ``region`` at a random place in each image."""
    masks = np.zeros((n_images, size, size), dtype=bool)
    for i in range(n_images):
        r, c = rng.integers(0, size - region, size=2)
        masks[i, r : r + region, c : c + region] = True
    return masks


def test_aupro_perfect_detector_is_one():
    # Every anomalous pixel outranks every normal pixel: PRO = 1 from FPR = 0.
    rng = np.random.default_rng(10)
    masks = _random_masks(rng, 5, 32, 6)
    maps = np.where(masks, rng.uniform(0.6, 1.0, masks.shape), rng.uniform(0.0, 0.5, masks.shape))
    assert abs(aupro(masks, maps) - 1.0) < AUPRO_EXACT_TOL
    assert abs(aupro(masks, maps, max_fpr=1.0) - 1.0) < AUPRO_EXACT_TOL


def test_aupro_inverted_detector_is_zero():
    # Every anomalous pixel scores below every normal pixel: PRO = 0 until FPR = 1.
    rng = np.random.default_rng(11)
    masks = _random_masks(rng, 5, 32, 6)
    maps = np.where(masks, rng.uniform(0.0, 0.4, masks.shape), rng.uniform(0.5, 1.0, masks.shape))
    assert abs(aupro(masks, maps)) < AUPRO_EXACT_TOL


def test_aupro_random_scores():
    """Random maps: E[PRO(t)] = FPR(t), so AUPRO ~ (max_fpr^2 / 2) / max_fpr.

    That is 0.15 for max_fpr = 0.3 and 0.5 for max_fpr = 1. The 50 regions of
    16x16 hold 12,800 pixels; the standard error of PRO at FPR p is about
    sqrt(p (1 - p) / 12800) <= 0.0045, and the normalised area averages such
    errors, so a tolerance of 0.015 is more than 3 standard errors. (Normal
    pixels, ~192,000, make the FPR axis error negligible.)
    """
    rng = np.random.default_rng(12)
    masks = _random_masks(rng, 50, 64, 16)
    maps = rng.random(masks.shape)
    assert abs(aupro(masks, maps, max_fpr=0.3) - 0.15) < 0.015
    assert abs(aupro(masks, maps, max_fpr=1.0) - 0.5) < 0.015


def test_aupro_averages_over_regions_not_pixels():
    """A 2x2 region fully detected and a 6x10 region missed, one image.

    PRO = (1 + 0) / 2 = 0.5 at every FPR < 1, so AUPRO = 0.5; a pixel-weighted
    overlap would give 4 / 64 = 0.0625 instead.
    """
    masks = np.zeros((1, 16, 16), dtype=bool)
    maps = np.linspace(0.1, 0.9, 256).reshape(1, 16, 16)  # distinct normal scores
    masks[0, 1:3, 1:3] = True
    maps[0, 1:3, 1:3] = 1.0
    masks[0, 8:14, 3:13] = True
    maps[0, 8:14, 3:13] = 0.0
    assert abs(aupro(masks, maps) - 0.5) < AUPRO_EXACT_TOL


def test_aupro_uses_8_connectivity():
    """A detected 2x2 block touching an undetected pixel only diagonally.

    8-connected: one region of 5 pixels, PRO = 4/5 = 0.8 at every FPR < 1.
    (4-connectivity would give two regions and PRO = (1 + 0) / 2 = 0.5.)
    """
    masks = np.zeros((8, 8), dtype=bool)
    maps = np.linspace(0.1, 0.9, 64).reshape(8, 8)
    masks[1:3, 1:3] = True
    maps[1:3, 1:3] = 1.0
    masks[3, 3] = True
    maps[3, 3] = 0.0
    assert abs(aupro(masks, maps) - 0.8) < AUPRO_EXACT_TOL


def test_aupro_regions_do_not_connect_across_images():
    """Same-place regions in consecutive images are separate regions.

    Image 0: 2x2 region detected; image 1: 2x6 region at the same rows, missed.
    Separate regions: PRO = 0.5. Merged across images: 4 / 16 = 0.25.
    """
    masks = np.zeros((2, 8, 8), dtype=bool)
    maps = np.linspace(0.1, 0.9, 128).reshape(2, 8, 8)
    masks[0, 2:4, 2:4] = True
    maps[0, 2:4, 2:4] = 1.0
    masks[1, 2:4, 0:6] = True
    maps[1, 2:4, 0:6] = 0.0
    assert abs(aupro(masks, maps) - 0.5) < AUPRO_EXACT_TOL


def _reference_aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float) -> float:
    """Direct evaluation at every distinct map value, one threshold at a time."""
    regions = []  # (image index, boolean region mask)
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))  # 8-connectivity
        regions += [(i, labelled == r) for r in range(1, n + 1)]
    normal_scores = maps[~masks]
    fpr, pro = [0.0], [0.0]  # threshold above every score
    for t in np.unique(maps)[::-1]:
        fpr.append(np.mean(normal_scores >= t))
        pro.append(np.mean([np.mean(maps[i][region] >= t) for i, region in regions]))
    fpr, pro = np.array(fpr), np.array(pro)
    end = int(np.argmax(fpr >= max_fpr))  # first point at or past max_fpr
    x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
    y_end = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
    x = np.append(fpr[:end], max_fpr)
    y = np.append(pro[:end], y_end)
    return float(np.trapezoid(y, x) / max_fpr)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("max_fpr", [0.05, 0.3, 1.0])
def test_aupro_matches_direct_computation(seed, max_fpr):
    # Scores rounded to one decimal: many ties within and across classes.
    rng = np.random.default_rng(100 + seed)
    masks = _random_masks(rng, 4, 12, 4) | (rng.random((4, 12, 12)) < 0.08)
    maps = np.round(rng.random(masks.shape) + 0.3 * masks, 1)
    expected = _reference_aupro(masks, maps, max_fpr)
    # Both compute the same exact curve; they differ only in summation order.
    assert abs(aupro(masks, maps, max_fpr=max_fpr) - expected) < AUPRO_EXACT_TOL


def test_aupro_raises_without_regions_or_normals():
    maps = np.random.default_rng(13).random((2, 4, 4))
    with pytest.raises(ValueError, match="no anomalous region"):
        aupro(np.zeros((2, 4, 4), dtype=bool), maps)
    with pytest.raises(ValueError, match="no normal pixel"):
        aupro(np.ones((2, 4, 4), dtype=bool), maps)
    with pytest.raises(ValueError, match="max_fpr"):
        aupro(np.eye(4, dtype=bool)[None], maps[:1], max_fpr=0.0)
    with pytest.raises(ValueError, match="same shape"):
        aupro(np.zeros((2, 4, 4), dtype=bool), maps[:1])


# ---------------------------------------------------------------------------
# Operating-point metrics
# ---------------------------------------------------------------------------


def test_rate_at_threshold_exact():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.5, 0.6, 0.9, 0.5, 0.7, 1.0])
    rates = rate_at_threshold(labels, scores, 0.5)
    # Normals above 0.5: 0.6, 0.9 -> 2/4. Anomalies at or below 0.5: 0.5 -> 1/3.
    assert rates == {
        "false_reject_rate": 0.5,
        "escape_rate": 1 / 3,
        "n_normal": 4,
        "n_anomalous": 3,
    }


def test_rate_at_threshold_empty_class_is_nan():
    normal_only = rate_at_threshold(np.zeros(3, dtype=bool), np.array([1.0, 2.0, 3.0]), 2.0)
    assert normal_only["false_reject_rate"] == 1 / 3
    assert math.isnan(normal_only["escape_rate"])
    assert (normal_only["n_normal"], normal_only["n_anomalous"]) == (3, 0)
    anomalous_only = rate_at_threshold(np.ones(2, dtype=int), np.array([1.0, 2.0]), 1.0)
    assert math.isnan(anomalous_only["false_reject_rate"])
    assert anomalous_only["escape_rate"] == 0.5


@pytest.mark.parametrize(
    "rate,expected",
    [
        (0.0, 10.0),  # the maximum
        (0.05, 10.0),  # below 1/n: still the maximum
        (0.1, 9.0),  # one score (10) above 9
        (0.25, 8.0),  # floor(2.5) = 2 scores above 8
        (0.5, 5.0),
        (1.0, 1.0),  # everything may be rejected: the smallest given score
    ],
)
def test_threshold_at_false_reject_rate_exact(rate, expected):
    scores = np.arange(10.0, 0.0, -1.0)  # 10, 9, ..., 1 (order must not matter)
    assert threshold_at_false_reject_rate(scores, rate) == expected


def test_threshold_at_false_reject_rate_ties_and_rounding():
    tied = np.array([1.0, 2.0, 2.0, 2.0, 3.0])
    # rate 0.4 allows 2 rejections; at 2.0 only 1 score is above, at 1.0 four are.
    assert threshold_at_false_reject_rate(tied, 0.4) == 2.0
    assert threshold_at_false_reject_rate(tied, 0.2) == 2.0
    # 0.29 * 100 evaluates to 28.999999999999996 but must allow 29 rejections.
    hundred = np.arange(1.0, 101.0)
    threshold = threshold_at_false_reject_rate(hundred, 0.29)
    assert threshold == 71.0
    assert rate_at_threshold(np.zeros(100), hundred, threshold)["false_reject_rate"] == 0.29


def test_threshold_at_false_reject_rate_rejects_bad_input():
    with pytest.raises(ValueError):
        threshold_at_false_reject_rate(np.array([]), 0.1)
    with pytest.raises(ValueError):
        threshold_at_false_reject_rate(np.arange(3.0), 1.5)
