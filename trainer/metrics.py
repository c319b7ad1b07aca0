"""Evaluation metrics for image- and pixel-level anomaly detection.

Conventions shared by every function in this module:

* The positive class is "anomalous": label ``1`` (or ``True``) marks an
  anomalous sample or pixel, label ``0`` (or ``False``) a normal one.
* Higher scores mean "more anomalous".
* Inputs may have any shape; label and score arrays are flattened and must
  hold the same number of entries. NaN scores are rejected.

The ranking metrics (:func:`roc_auc`, :func:`average_precision`) and
:func:`aupro` are exact: they evaluate their curve at every distinct score
value, using one sort per class, cumulative sums and binary searches instead
of a loop over thresholds. They therefore scale to tens of millions of entries
(pixel-level evaluation).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = [
    "roc_auc",
    "average_precision",
    "aupro",
    "rate_at_threshold",
    "threshold_at_false_reject_rate",
]


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


def _as_binary(labels: np.ndarray, name: str) -> np.ndarray:
    """Returns ``labels`` flattened as a boolean array (True = anomalous)."""
    arr = np.asarray(labels).ravel()
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be bool or numeric 0/1, got dtype {arr.dtype}")
    positive = arr == 1
    if not np.all(positive | (arr == 0)):
        raise ValueError(f"{name} must contain only 0/1 (or False/True) values")
    return positive


def _as_scores(scores: np.ndarray, name: str) -> np.ndarray:
    """Returns ``scores`` flattened as a real-valued array without NaNs."""
    arr = np.asarray(scores).ravel()
    if arr.dtype == np.bool_ or arr.dtype.kind in "iu":
        arr = arr.astype(np.float64)
    elif arr.dtype.kind != "f":
        raise ValueError(f"{name} must be real-valued, got dtype {arr.dtype}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN values")
    return arr


def _paired(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validates a (labels, scores) pair and returns both flattened."""
    y = _as_binary(labels, "labels")
    s = _as_scores(scores, "scores")
    if y.size != s.size:
        raise ValueError(
            f"labels and scores must have the same number of entries, got {y.size} and {s.size}"
        )
    return y, s


# ---------------------------------------------------------------------------
# Shared sort-based curve machinery
# ---------------------------------------------------------------------------
#
# Every curve in this module comes from the rule "anomalous iff score >= t"
# swept over all distinct score values t. Rather than one argsort of all
# entries (slow and memory-hungry for tens of millions of pixels), each class
# is sorted on its own, and for every distinct positive score t the numbers of
# negatives scoring >= t and > t come from binary searches in the sorted
# negatives. Between two consecutive distinct positive scores only negatives
# cross the threshold, so the curve runs horizontally there: these counts
# rebuild it exactly, ties included.


def _group_ends(sorted_scores: np.ndarray) -> np.ndarray:
    """Returns the index of the last element of each run of equal scores.

    Args:
        sorted_scores: Scores sorted in either direction.

    Returns:
        Int array with one index per distinct score, in array order.
    """
    if sorted_scores.size == 0:
        return np.zeros(0, dtype=np.intp)
    changes = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    return np.append(changes, sorted_scores.size - 1)


def _negatives_at(
    sorted_negatives: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Counts the negatives scoring >= and > each threshold.

    Args:
        sorted_negatives: Negative-class scores sorted in ascending order.
        thresholds: Query thresholds.

    Returns:
        ``(n_ge, n_gt)``: int arrays shaped like ``thresholds``.
    """
    n = sorted_negatives.size
    n_ge = n - np.searchsorted(sorted_negatives, thresholds, side="left")
    n_gt = n - np.searchsorted(sorted_negatives, thresholds, side="right")
    return n_ge, n_gt


def _positive_steps(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Describes the curve at each distinct positive score, highest first.

    Args:
        labels: Flat boolean labels (True = positive = anomalous).
        scores: Flat scores, same size.

    Returns:
        ``(new_pos, neg_ge, neg_gt)``: for each distinct positive score ``t``
        in decreasing order, the number of positives scoring exactly ``t`` and
        the numbers of negatives scoring >= ``t`` and > ``t``.
    """
    positives = scores[labels]  # boolean indexing copies: safe to sort in place
    positives.sort()
    positives = positives[::-1]
    negatives = scores[~labels]
    negatives.sort()
    ends = _group_ends(positives)
    new_pos = np.diff(ends + 1, prepend=0)  # run lengths; ends + 1 = positives so far
    neg_ge, neg_gt = _negatives_at(negatives, positives[ends])
    return new_pos, neg_ge, neg_gt


# ---------------------------------------------------------------------------
# Ranking metrics
# ---------------------------------------------------------------------------


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve, anomalous (label 1) being the positive class.

    Equals the trapezoid-rule area under the ROC curve evaluated at every
    distinct score (``sklearn.metrics.roc_auc_score``): the fraction of
    (anomalous, normal) pairs ranked correctly, tied pairs counting half. The
    pair count is accumulated in exact integer arithmetic.

    Args:
        labels: Binary labels of any shape (bool or 0/1).
        scores: Anomaly scores with the same number of entries.

    Returns:
        The ROC AUC in [0, 1].

    Raises:
        ValueError: If the inputs are malformed or only one class is present.
    """
    y, s = _paired(labels, scores)
    n_pos = int(np.count_nonzero(y))
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            "ROC AUC is undefined when only one class is present: got "
            f"{n_pos} anomalous and {n_neg} normal entries"
        )
    new_pos, neg_ge, neg_gt = _positive_steps(y, s)
    below = n_neg - neg_ge  # negatives strictly below each positive score
    tied = neg_ge - neg_gt  # negatives equal to it
    # Twice the number of correctly ranked pairs (ties count 1 of 2); fits in
    # int64 for fewer than ~4e9 entries since it is at most 2 * n_pos * n_neg.
    twice_pairs = np.sum(new_pos * (2 * below + tied))
    return float(twice_pairs / (2.0 * n_pos * n_neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, as in ``sklearn.metrics.average_precision_score``.

    ``AP = sum_n (R_n - R_{n-1}) * P_n`` over the distinct score thresholds in
    decreasing order (ties grouped), with ``R_0 = 0`` and no interpolation.
    Thresholds that add no anomalous entry leave recall unchanged and drop out.

    Args:
        labels: Binary labels of any shape (bool or 0/1).
        scores: Anomaly scores with the same number of entries.

    Returns:
        The average precision in [0, 1].

    Raises:
        ValueError: If the inputs are malformed or there is no anomalous entry.
    """
    y, s = _paired(labels, scores)
    if not y.any():
        raise ValueError("average precision is undefined without anomalous (label 1) entries")
    new_pos, neg_ge, _ = _positive_steps(y, s)
    true_pos = np.cumsum(new_pos)
    precision = true_pos / (true_pos + neg_ge)
    return float(np.sum(new_pos * precision) / true_pos[-1])


# ---------------------------------------------------------------------------
# AUPRO (MVTec AD per-region overlap)
# ---------------------------------------------------------------------------


def _masks_and_maps(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validates AUPRO inputs; returns an (N, H, W) bool mask stack and flat scores."""
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.shape != maps.shape:
        raise ValueError(
            f"masks and maps must have the same shape, got {masks.shape} and {maps.shape}"
        )
    if maps.ndim == 2:  # a single (H, W) image
        masks = masks[np.newaxis]
    elif maps.ndim != 3:
        raise ValueError(f"masks and maps must have shape (N, H, W) or (H, W), got {maps.shape}")
    binary = _as_binary(masks, "masks").reshape(masks.shape)
    return binary, _as_scores(maps, "maps")


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels the connected anomalous regions of every image in one pass.

    Pixels are connected to their 8 in-plane neighbours and never across
    images, so region ids are unique over the whole stack.

    Args:
        masks: (N, H, W) boolean ground-truth masks.

    Returns:
        ``(region_ids, n_regions)``: flat per-pixel region ids (0 = normal,
        1..n_regions = anomalous region) and the number of regions.
    """
    structure = np.zeros((3, 3, 3), dtype=bool)  # 3x3x3 neighbourhood of a voxel
    structure[1] = True  # centre plane only: full 3x3 (8-connected) in-image
    region_ids, n_regions = ndimage.label(masks, structure=structure)
    return region_ids.ravel(), int(n_regions)


def _top_normal_scores(normal_scores: np.ndarray, max_fpr: float) -> np.ndarray:
    """Returns, sorted ascending, every normal score >= the FPR cutoff.

    The cutoff is the ``k``-th highest normal score, ``k = ceil(max_fpr * n)``:
    it is the highest threshold whose FPR reaches ``max_fpr``, so no lower
    threshold can affect the curve on [0, max_fpr]. Rounding in
    ``max_fpr * n`` can only raise ``k``, i.e. keep a few more (harmless)
    scores. Reorders ``normal_scores`` in place.
    """
    n = normal_scores.size
    k = min(max(math.ceil(max_fpr * n), 1), n)  # clamp to a valid rank 1..n
    normal_scores.partition(n - k)
    top = normal_scores[normal_scores >= normal_scores[n - k]]
    top.sort()  # in place: ``top`` is already a copy
    return top


def _region_steps(
    region_ids: np.ndarray, scores: np.ndarray, n_regions: int, cutoff: float
) -> tuple[np.ndarray, np.ndarray]:
    """PRO at every distinct anomalous-pixel score >= ``cutoff``.

    A pixel of region ``r`` adds ``1 / (n_regions * |r|)`` to PRO once the
    threshold reaches its score, so a cumulative sum over the anomalous pixels
    sorted by decreasing score, read at the end of each run of tied scores,
    gives PRO at each distinct threshold.

    Returns:
        ``(thresholds, pro)``: distinct scores in decreasing order and PRO at
        each (non-decreasing).
    """
    anomalous = region_ids > 0
    ids = region_ids[anomalous]
    pixel_scores = scores[anomalous]
    sizes = np.bincount(ids, minlength=n_regions + 1)
    weights = np.zeros(n_regions + 1)  # index 0 (normal) never used
    weights[1:] = 1.0 / (n_regions * sizes[1:])
    keep = pixel_scores >= cutoff
    pixel_scores = pixel_scores[keep]
    order = np.argsort(pixel_scores)[::-1]
    sorted_scores = pixel_scores[order]
    ends = _group_ends(sorted_scores)
    pro = np.cumsum(weights[ids[keep][order]])[ends]
    return sorted_scores[ends], np.minimum(pro, 1.0)  # clip float drift in the sum


def _pro_polyline(
    thresholds: np.ndarray, pro: np.ndarray, top_normals: np.ndarray, n_normal: int
) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (FPR, PRO) of the exact PRO curve down to the FPR cutoff.

    Before each distinct anomalous threshold ``t_j`` the curve runs
    horizontally at the previous PRO up to ``FPR(> t_j)``, then goes straight
    to ``(FPR(>= t_j), PRO_j)`` (vertically unless normal pixels tie at
    ``t_j``); after the last one it runs horizontally to the cutoff. The
    vertex (0, 0) is implied.

    Args:
        thresholds: Distinct anomalous scores >= the cutoff, decreasing.
        pro: PRO at each of them.
        top_normals: All normal scores >= the cutoff, sorted ascending.
        n_normal: Total number of normal pixels.

    Returns:
        ``(fpr, pro)`` vertex arrays, both non-decreasing.
    """
    n_ge, n_gt = _negatives_at(top_normals, thresholds)
    pro_before = np.concatenate(([0.0], pro))[:-1]  # PRO just above each threshold
    fpr = np.stack([n_gt, n_ge], axis=1).ravel() / n_normal
    pro = np.stack([pro_before, pro], axis=1).ravel()
    last_pro = pro[-1] if pro.size else 0.0
    return np.append(fpr, top_normals.size / n_normal), np.append(pro, last_pro)


def _normalised_partial_area(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Trapezoid area under (fpr, pro) on [0, max_fpr], divided by ``max_fpr``.

    The curve starts at (0, 0) (threshold above every score); ``fpr`` must be
    non-decreasing and reach ``max_fpr``. The curve is linearly interpolated
    at exactly ``max_fpr``.
    """
    x = np.concatenate(([0.0], fpr))  # prepend the (0, 0) vertex
    y = np.concatenate(([0.0], pro))
    # First vertex at or beyond max_fpr; x[0] = 0 < max_fpr, so end >= 1. The
    # clamp only matters if the last FPR rounds one ulp below max_fpr.
    end = min(int(np.searchsorted(x, max_fpr, side="left")), x.size - 1)
    x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
    y_at_max = y1 if x1 <= x0 else y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
    # Trapezoid rule: width times the mean (sum / 2) of the two heights.
    head = np.sum(np.diff(x[:end]) * (y[1:end] + y[: end - 1])) / 2.0
    tail = (max_fpr - x0) * (y0 + y_at_max) / 2.0
    return float((head + tail) / max_fpr)


def aupro(
    masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3, num_thresholds: int = 200
) -> float:
    """Normalised area under the per-region-overlap (PRO) curve (MVTec AD).

    Regions are the 8-connected components of each image's ground-truth mask.
    For a threshold ``t``, ``PRO(t)`` is the mean over all regions (of all
    images) of the fraction of the region's pixels with ``map >= t``, and
    ``FPR(t)`` the fraction of all normal pixels with ``map >= t``. The area
    under PRO over FPR in ``[0, max_fpr]`` (trapezoid rule, curve interpolated
    linearly at exactly ``max_fpr``) is divided by ``max_fpr``, so a perfect
    detector scores 1.0 and a random one about ``max_fpr / 2``.

    Threshold method: exact, no threshold grid. The curve is evaluated at
    every distinct map value, from above the highest value down to the
    highest normal-pixel value whose FPR reaches ``max_fpr`` (lower thresholds
    cannot affect the result). Anomalous pixels are sorted with their region
    weights and the normal pixels above the cutoff are sorted separately;
    cumulative sums and binary searches then give every (FPR, PRO) vertex.
    Tied normal and anomalous pixels produce a straight segment.

    Args:
        masks: Ground truth, shape (N, H, W) or (H, W), bool or 0/1.
        maps: Anomaly maps of the same shape; higher = more anomalous.
        max_fpr: Upper integration limit on the FPR axis, in (0, 1].
        num_thresholds: Has no effect: the exact computation needs no
            threshold grid. Accepted so that callers written for
            threshold-grid implementations keep working.

    Returns:
        The normalised AUPRO in [0, 1].

    Raises:
        ValueError: If the shapes differ, ``max_fpr`` is outside (0, 1], or
            there are no anomalous regions or no normal pixels.
    """
    del num_thresholds  # the exact computation needs no threshold grid
    if not 0.0 < max_fpr <= 1.0:  # FPR is a fraction
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    binary, scores = _masks_and_maps(masks, maps)
    region_ids, n_regions = _label_regions(binary)
    if n_regions == 0:
        raise ValueError("AUPRO is undefined: the masks contain no anomalous region")
    normal_scores = scores[region_ids == 0]
    if normal_scores.size == 0:
        raise ValueError("AUPRO is undefined: the masks contain no normal pixel")
    top_normals = _top_normal_scores(normal_scores, max_fpr)
    thresholds, pro = _region_steps(region_ids, scores, n_regions, top_normals[0])
    fpr, pro = _pro_polyline(thresholds, pro, top_normals, normal_scores.size)
    return _normalised_partial_area(fpr, pro, max_fpr)


# ---------------------------------------------------------------------------
# Operating-point metrics
# ---------------------------------------------------------------------------


def rate_at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Error rates of the decision rule "anomalous iff score > threshold".

    Args:
        labels: Binary labels of any shape (bool or 0/1; 1 = anomalous).
        scores: Anomaly scores with the same number of entries.
        threshold: Decision threshold.

    Returns:
        A dict with ``false_reject_rate`` (fraction of normal samples with
        score > threshold), ``escape_rate`` (fraction of anomalous samples with
        score <= threshold), ``n_normal`` and ``n_anomalous`` (ints). A rate
        whose class is empty is NaN.

    Raises:
        ValueError: If the inputs are malformed.
    """
    y, s = _paired(labels, scores)
    n_anomalous = int(np.count_nonzero(y))
    n_normal = int(y.size - n_anomalous)
    rejected_normal = int(np.count_nonzero(s[~y] > threshold))
    escaped = int(np.count_nonzero(s[y] <= threshold))
    return {
        "false_reject_rate": rejected_normal / n_normal if n_normal else math.nan,
        "escape_rate": escaped / n_anomalous if n_anomalous else math.nan,
        "n_normal": n_normal,
        "n_anomalous": n_anomalous,
    }


def threshold_at_false_reject_rate(normal_scores: np.ndarray, rate: float) -> float:
    """Smallest threshold rejecting at most ``rate`` of the given normal scores.

    With the rule "reject iff score > threshold", returns the smallest of the
    given scores ``t`` such that at most ``floor(rate * n)`` of the ``n``
    scores are strictly greater than ``t``; with ``rate = 0`` this is the
    maximum score.

    Finite-sample behaviour: the result is always one of the given scores,
    namely the ``(m + 1)``-th highest with ``m = floor(rate * n)`` (capped at
    ``n - 1``, so ``rate = 1`` gives the minimum; for ``rate < 1`` no real
    threshold below the result satisfies the condition either). On these
    scores the realised false-reject rate is ``m / n`` or lower (lower when
    the threshold value is tied), hence never above ``rate``; rates below
    ``1 / n`` all give the maximum. On fresh normal samples from the same
    continuous distribution the expected false-reject rate is
    ``(m + 1) / (n + 1)``, which may exceed ``rate`` (e.g. ``1 / (n + 1)`` for
    ``rate = 0``), so calibrate on enough normal samples for the target rate.

    Args:
        normal_scores: Scores of normal samples, any shape, at least one.
        rate: Target false-reject rate in [0, 1].

    Returns:
        The threshold, as a float.

    Raises:
        ValueError: If ``normal_scores`` is empty or ``rate`` is outside [0, 1].
    """
    s = np.sort(_as_scores(normal_scores, "normal_scores"))
    if s.size == 0:
        raise ValueError("normal_scores must contain at least one score")
    if not 0.0 <= rate <= 1.0:  # a rate is a fraction
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    # The small slack stops rate * n landing just below an integer through
    # binary rounding (0.29 * 100 == 28.999999999999996) from losing a sample.
    allowed = min(math.floor(rate * s.size + 1e-9), s.size - 1)  # keep index >= 0
    return float(s[s.size - 1 - allowed])
