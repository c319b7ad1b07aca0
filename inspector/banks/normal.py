"""A product's normal score statistics: what places it on the line's one calibrated scale.

Raw anomaly scores of different products live on different scales. Each product is placed on a
common one by statistics of its own good images' raw image scores, each image scored against a
bank that does not contain it (cross-scoring at registration), later refined from the live
stream and from operator feedback (DESIGN sections 1 and 4; issue "per-product calibration").

The calibrated score is ``(raw - u) / (gamma - u)``. With the default ``q90`` method ``u`` is 0
and ``gamma`` the 90th percentile of the good images' cross-scored raw scores, so **1.0 is a
score 9 in 10 of the product's registration images stay under** and a score is that multiple
of it, on every product; the line threshold (set by the trainer at the target false-reject rate
on held-out good images of its source products) lies about a fifth above 1. The scale has to
say where each product's good tail lies, which a spread measured in the bulk (a standard
deviation, an interquartile range) does not; the maximum of tens of images says it but is one
order statistic, and it moved the per-product scale by 2-7% between registration draws of 50
images against 0.6-3.4% for the 90th percentile. With the threshold placed as the trainer places
it, on raw scores of 5 registration draws per class (``benchmarks/threshold_rules.py``,
``benchmarks/results/threshold_rules.md``), ``q90`` met the accuracy bar on both splits (split
B: 1.3% mean false rejects, worst 2.0%, escapes 6 points under the products' own thresholds'),
where ``max`` missed split B's worst false-reject rate (3.0%); each product unseen in turn, the
line threshold moved by 0.035 between source sets against 0.061 on ``max``. Cards written
before the field record it as ``max`` and keep it (``ModelConfig.from_dict``): registration uses
the card's normalisation. Stream refreshes, whose samples hold defects, use a robust stand-in
(``stream_scale_of``). The map is calibrated with the same ``(u, gamma)`` (the image score is an
order statistic of the map, so it calibrates the same way).

Everything here is plain Python and numpy: no torch, no I/O.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np

NORMAL_SCHEMA = 1
METHODS = ("robust", "zscore", "quantile", "max", "median_max", "q90")
# Every split's bar met, each product unseen in turn and on both accuracy splits, with the
# threshold placed as the trainer places it: benchmarks/results/threshold_rules.md.
DEFAULT_METHOD = "q90"
# What records and cards written before the normalisation was recorded used.
LEGACY_METHOD = "max"
RATIO_METHODS = ("max", "q90")  # u is 0: a score is a multiple of the product's upper anchor
Q_RATIO = 0.9  # the "q90" method's anchor
SOURCES = ("registration", "stream", "feedback")
Z_HIGH = 2.326  # one-sided standard normal 99% quantile: calibrated 1.0 ~ the 99th percentile
IQR_TO_SIGMA = 1.349  # interquartile range of a standard normal: IQR / 1.349 estimates sigma
QUANTILE_HIGH = 0.95  # the "quantile" method's upper anchor, (s - median) / (q95 - median)
# Where the maximum of 50 normally distributed scores lies on average, in standard deviations
# above the median (Phi^-1(50/51)): the stream's robust stand-in for the "median_max" anchor.
Z_MAX_50 = 2.06
Z_95 = 1.645  # one-sided standard normal 95% quantile: the robust equivalent of the q95 anchor
# Where a stream refresh puts 1.0, in robust standard deviations above the median, per method
# (``stream_scale_of``); the others use Z_HIGH.
Z_90 = 1.2816  # one-sided standard normal 90% quantile: the robust equivalent of the q90 anchor
STREAM_ANCHOR_Z = {"quantile": Z_95, "max": Z_MAX_50, "median_max": Z_MAX_50, "q90": Z_90}
MIN_SPREAD_FRACTION = 0.02  # spread floor as a fraction of |u|: a few near-equal scores must not blow up the scale
RELIABLE_COUNT = 25  # fewer good-image scores than this and the product's threshold is uncertain (30 images - k shots)
MAX_KEPT_SCORES = 1024  # scores kept per source in a stats record: bounds its size (~20 KB of JSON)


class NormalStatsError(ValueError):
    """A statistics record or a score sample cannot be used; the message says why."""


def scale_of(scores: Sequence[float], method: str = DEFAULT_METHOD,
             quantile_high: float = QUANTILE_HIGH) -> tuple[float, float]:
    """``(u, gamma)`` of a sample of good images' raw scores.

    Methods (compared in ``benchmarks/calibration.py``):
        robust: median and ``Z_HIGH`` times IQR/1.349 (tolerates a few percent of defects);
        zscore: mean and ``Z_HIGH`` standard deviations;
        quantile: median and the ``quantile_high`` quantile (default ``QUANTILE_HIGH``);
        max: 0 and the maximum (1.0 = the highest score the good images reached);
        median_max: the median and the maximum (0 = the typical good part, 1.0 the highest);
        q90: 0 and the 90th percentile (1.0 = a score 9 in 10 good images stay under).

    Raises:
        NormalStatsError: fewer than 2 finite scores, or an unknown method.
    """
    s = _finite_sample(scores)
    if method == "robust":
        u, spread = _median_and_robust_spread(s, Z_HIGH)
    elif method == "zscore":
        u, spread = s.mean(), Z_HIGH * s.std(ddof=1)
    elif method == "quantile":
        u, high = np.quantile(s, [0.5, quantile_high])
        spread = high - u
    elif method == "max":
        u, spread = 0.0, s.max()
        if spread <= 0:  # an all-zero sample: no ratio scale exists
            spread = spread_floor(float(np.median(np.abs(s))) or 1.0)
    elif method == "median_max":
        u = np.median(s)
        spread = s.max() - u
    elif method == "q90":
        u, spread = 0.0, float(np.quantile(s, Q_RATIO))
        if spread <= 0:
            spread = spread_floor(float(np.median(np.abs(s))) or 1.0)
    else:
        raise NormalStatsError(f"unknown normalisation {method!r}: use one of {METHODS}")
    spread = max(float(spread), spread_floor(float(u)))
    return float(u), float(u) + spread


def _finite_sample(scores: Sequence[float]) -> np.ndarray:
    """The finite scores as float64; fewer than 2 is an error."""
    s = np.asarray([float(x) for x in scores], dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size < 2:
        raise NormalStatsError(f"normal statistics need at least 2 finite scores, got {s.size}")
    return s


def _median_and_robust_spread(s: np.ndarray, z: float) -> tuple[float, float]:
    """The median and ``z`` robust standard deviations (interquartile range / 1.349)."""
    q25, u, q75 = np.quantile(s, [0.25, 0.5, 0.75])
    return float(u), z * float(q75 - q25) / IQR_TO_SIGMA


def stream_scale_of(scores: Sequence[float], method: str) -> tuple[float, float]:
    """``(u, gamma)`` of a *stream* sample, robust to the defects it holds, on ``method``'s scale.

    A stream sample is not vouched for: a few percent of it are defects (or, for a product
    learning from passed frames only, its top is cut off at the threshold). An empirical 95th
    percentile breaks down at 5% contamination, and a maximum or a standard deviation at one
    outlier, so the stream measures the median and the interquartile range (which tolerate a
    quarter of the sample being off) and places the upper anchor where the record's method puts
    it for normally distributed scores: 1.645 sigma for ``quantile`` (its 95th percentile),
    ``Z_MAX_50`` for ``median_max`` and ``max`` (the expected maximum of a 50-image
    registration), 2.326 for ``zscore`` and ``robust``.
    """
    u, spread = _median_and_robust_spread(_finite_sample(scores), STREAM_ANCHOR_Z.get(method, Z_HIGH))
    spread = max(spread, spread_floor(u))
    if method in RATIO_METHODS:  # the ratio scale keeps its zero: only its upper anchor moves
        return 0.0, u + spread
    return u, u + spread


def spread_floor(u: float) -> float:
    """The least spread a scale gets: near-identical good images must not make it divide by ~0."""
    return max(MIN_SPREAD_FRACTION * abs(u), 1e-9)


def spread_is_floored(u: float, gamma: float) -> bool:
    """True when ``(u, gamma)`` sit on the floor: the good images scored (almost) identically."""
    return gamma - u <= spread_floor(u) * (1 + 1e-9)


def sample_is_degenerate(scores: Sequence[float]) -> bool:
    """True when the good images' scores (almost) all coincide (identical copies): their tail,
    which the scale rests on, was not measured, whatever the method made of it."""
    return spread_is_floored(*scale_of(scores, "median_max"))


def calibrated(raw: np.ndarray | float, u: float, gamma: float) -> np.ndarray | float:
    """``(raw - u) / (gamma - u)``: the score on the line's common scale."""
    return (raw - u) / (gamma - u)


def raw_from_calibrated(score: float, u: float, gamma: float) -> float:
    """Inverse of :func:`calibrated` (the worker recovers raw scores for the stream sample)."""
    return u + score * (gamma - u)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _floats(values: Sequence[float], name: str) -> list[float]:
    if not isinstance(values, (list, tuple)):
        raise NormalStatsError(f"{name} must be a list of numbers")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise NormalStatsError(f"{name} holds {v!r}, not a finite number")
        out.append(float(v))
    return out[-MAX_KEPT_SCORES:]


@dataclass(frozen=True)
class NormalStats:
    """A product's normal statistics in service, with the samples they came from.

    Attributes:
        product: the product name.
        bank_version: the bank version they belong to; a new registration starts afresh.
        method: how ``(u, gamma)`` were computed from the samples (``METHODS``).
        u, gamma: the calibration in service: score = (raw - u) / (gamma - u).
        source: what last set them: ``registration``, ``stream`` or ``feedback``.
        count: good-image (or stream-frame) scores behind them.
        registration: cross-scored raw scores of the registration images.
        feedback: raw scores of images an operator confirmed good.
        stream: the recent stream sample the last stream refresh used.
        revision: bumped on every write; a writer whose revision is stale loses (compare-and-set).
        frozen: stream learning is paused (a fail-rate jump: see ``StreamCalibrator``).
        updated_at: ISO 8601 UTC time of the last change.
    """

    product: str
    bank_version: int
    method: str
    u: float
    gamma: float
    source: str = "registration"
    count: int = 0
    registration: list[float] = field(default_factory=list)
    feedback: list[float] = field(default_factory=list)
    stream: list[float] = field(default_factory=list)
    revision: int = 0
    frozen: bool = False
    updated_at: str = ""
    schema: int = NORMAL_SCHEMA

    @property
    def thin(self) -> bool:
        """True while too few scores stand behind the statistics for a trustworthy threshold."""
        return self.count < RELIABLE_COUNT

    @property
    def measured(self) -> bool:
        """False for a bank registered before statistics were cross-scored: its ``(u, gamma)``
        are leave-one-out map statistics of its shots, not a sample of its good parts' scores."""
        return bool(self.registration or self.feedback or self.stream)

    @property
    def confirmed(self) -> int:
        """Good images behind the statistics that people vouched for (registration and feedback)."""
        return len(self.registration) + len(self.feedback)

    @classmethod
    def from_registration(cls, product: str, scores: Sequence[float], method: str = DEFAULT_METHOD,
                          bank_version: int = 0) -> "NormalStats":
        u, gamma = scale_of(scores, method)
        return cls(product, bank_version, method, u, gamma, "registration", len(scores),
                   registration=_floats(list(scores), "registration"), updated_at=_now())

    @classmethod
    def from_meta(cls, meta: Any) -> "NormalStats":
        """The registration statistics stored in a bank's metadata (``BankMeta``).

        Banks registered before statistics were cross-scored carry only ``u``/``gamma`` (the
        leave-one-out map mean and max of their shots): they are served as they are, marked thin.
        """
        normal = meta.normal if isinstance(meta.normal, dict) else {}
        scores = normal.get("scores", [])
        method = normal.get("method", LEGACY_METHOD)
        return cls(meta.product, meta.version, method if method in METHODS else LEGACY_METHOD, float(meta.u),
                   float(meta.gamma), "registration", len(scores) if scores else int(meta.shots),
                   registration=_floats(scores, "registration"), updated_at=meta.created_at)

    def with_feedback(self, scores: Sequence[float]) -> "NormalStats":
        """Confirmed-good scores join the registration sample; the scale is measured again from both."""
        feedback = _floats([*self.feedback, *scores], "feedback")
        sample = [*self.registration, *feedback]
        u, gamma = scale_of(sample, self.method)
        return replace(self, u=u, gamma=gamma, source="feedback", count=len(sample), feedback=feedback,
                       stream=[], frozen=False, revision=self.revision + 1, updated_at=_now())

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "NormalStats":
        """Parse and validate a stored record; anything malformed raises ``NormalStatsError``."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise NormalStatsError(f"normal statistics are not JSON: {err}") from err
        if not isinstance(data, dict) or data.get("schema") != NORMAL_SCHEMA:
            raise NormalStatsError(f"normal statistics schema {data.get('schema') if isinstance(data, dict) else None!r}, "
                                   f"this code reads {NORMAL_SCHEMA}")
        known = set(cls.__dataclass_fields__)
        try:
            stats = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise NormalStatsError(f"normal statistics fields: {err}") from err
        return stats.checked()

    def checked(self) -> "NormalStats":
        """This record, after checking every field a worker relies on."""
        if self.method not in METHODS:
            raise NormalStatsError(f"method {self.method!r} is not one of {METHODS}")
        if self.source not in SOURCES:
            raise NormalStatsError(f"source {self.source!r} is not one of {SOURCES}")
        for name in ("u", "gamma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise NormalStatsError(f"{name} is {v!r}, not a finite number")
        if not self.gamma > self.u:
            raise NormalStatsError(f"gamma {self.gamma} must exceed u {self.u}")
        for name in ("bank_version", "count", "revision"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise NormalStatsError(f"{name} is {v!r}, not a non-negative integer")
        for name in ("registration", "feedback", "stream"):
            _floats(getattr(self, name), name)
        return self

    def summary(self) -> dict[str, Any]:
        """What ``bank show``, ``/metrics`` and the heartbeat report (no samples)."""
        return {"u": self.u, "gamma": self.gamma, "method": self.method, "source": self.source,
                "count": self.count, "thin": self.thin, "measured": self.measured, "frozen": self.frozen,
                "revision": self.revision,
                "bank_version": self.bank_version, "updated_at": self.updated_at}


@dataclass(frozen=True)
class StreamConfig:
    """Self-calibration from the live stream (line config ``[calibration]``).

    Attributes:
        enabled: learn from the stream at all.
        window: recent scores kept per product; the refresh target is measured on them.
        min_count: scores of a product before its first refresh.
        refresh_every: new scores between two refreshes.
        max_step: per refresh, ``u`` moves at most this many current spreads and the spread
            changes by at most this factor (``1 + max_step`` up or down).
        freeze_jump: a refresh interval whose fail rate exceeds the rate before it by this much
            freezes learning for the product (a defect burst must not teach that defects are normal).
    """

    enabled: bool = True
    window: int = 200
    min_count: int = 50
    refresh_every: int = 25
    max_step: float = 0.5
    freeze_jump: float = 0.2

    def __post_init__(self) -> None:
        if self.window < 2 or self.min_count < 2 or self.refresh_every < 1:
            raise ValueError("calibration window and min_count must be at least 2, refresh_every at least 1")
        if self.min_count > self.window:
            raise ValueError(f"calibration min_count {self.min_count} exceeds the window {self.window}")
        if not self.max_step > 0 or not 0 < self.freeze_jump <= 1:
            raise ValueError("calibration max_step must be > 0 and freeze_jump in (0, 1]")


def bounded_step(current: tuple[float, float], target: tuple[float, float], max_step: float) -> tuple[float, float]:
    """Move ``(u, gamma)`` toward ``target`` by at most ``max_step`` (see ``StreamConfig``)."""
    u, spread = current[0], current[1] - current[0]
    tu, tspread = target[0], target[1] - target[0]
    new_u = min(max(tu, u - max_step * spread), u + max_step * spread)
    new_spread = min(max(tspread, spread / (1 + max_step)), spread * (1 + max_step))
    return new_u, new_u + new_spread


@dataclass
class _Track:
    """One product's stream state inside ``StreamCalibrator``."""

    stats: NormalStats
    scores: list[float] = field(default_factory=list)  # accepted recent raw scores (the window)
    fails: list[bool] = field(default_factory=list)  # their verdicts, for the fail-rate baseline
    pending: list[tuple[float, bool]] = field(default_factory=list)  # since the last refresh


class StreamCalibrator:
    """Refines each product's statistics from the scores of the frames the worker serves.

    What is learned from depends on what the statistics rest on:

    * a product registered from few good images (fewer than ``RELIABLE_COUNT`` registration and
      feedback scores) learns from every routed frame, pass or fail: its threshold may be far
      off, and scores of passed frames alone are cut off at it, so they could never loosen a
      product whose good parts are being rejected;
    * a product registered from enough good images learns from the frames it passes: its
      threshold sits near the top of its good parts, so the cut loses about 1% of them, while a
      stream with many defects (they fail) cannot teach it that defects are normal.

    Every ``refresh_every`` frames the interval is checked: if its fail rate jumped above the
    rate before it by ``freeze_jump``, the product is frozen and the interval's scores are
    discarded; otherwise they join the window and, once ``min_count`` scores are there, the
    statistics move toward the window's robust statistics (``stream_scale_of``) by at most ``max_step``.

    Not thread-safe: the worker's loop is its only caller.
    """

    def __init__(self, cfg: StreamConfig) -> None:
        self.cfg = cfg
        self._tracks: dict[str, _Track] = {}

    def current(self, product: str) -> NormalStats | None:
        track = self._tracks.get(product)
        return track.stats if track else None

    def adopt(self, stats: NormalStats, force: bool = False) -> None:
        """Serve ``stats`` for its product from now on, unless these or newer ones are in use.

        A new bank version (re-registration) or a newer revision (feedback) resets the product's
        stream state, and so does ``force``; the window restarts from the record's stream sample
        (a restart keeps what was learned).
        """
        track = self._tracks.get(stats.product)
        if not force and track is not None and (
                (track.stats.bank_version, track.stats.revision) >= (stats.bank_version, stats.revision)):
            return
        kept = list(stats.stream[-self.cfg.window:])
        self._tracks[stats.product] = _Track(stats, kept, [False] * len(kept))

    def recent(self, product: str) -> list[float]:
        """The raw scores in ``product``'s window (what its next refresh is measured on)."""
        track = self._tracks.get(product)
        return list(track.scores) if track else []

    def rescale(self, product: str, ratio: float, stats: NormalStats) -> None:
        """The product's bank grew (``inspector.banks.growth``): serve ``stats`` (already on the
        new bank's scale) and put the window's and pending scores on it by ``ratio``."""
        track = self._tracks.get(product)
        if track is None:
            return
        track.stats = stats
        track.scores = [s * ratio for s in track.scores]
        track.pending = [(s * ratio, f) for s, f in track.pending]

    def forget(self, keep: Sequence[str]) -> None:
        """Drop products no longer in service."""
        for product in set(self._tracks) - set(keep):
            del self._tracks[product]

    def observe(self, product: str, raw: float, failed: bool) -> NormalStats | None:
        """Record one frame; return the product's new statistics when this frame triggered a change."""
        track = self._tracks.get(product)
        if not self.cfg.enabled or track is None or not math.isfinite(raw):
            return None
        track.pending.append((float(raw), bool(failed)))
        if len(track.pending) < self.cfg.refresh_every:
            return None
        return self._refresh(track)

    def _refresh(self, track: _Track) -> NormalStats | None:
        cfg = self.cfg
        pending, track.pending = track.pending, []
        rate = sum(f for _, f in pending) / len(pending)
        before = sum(track.fails) / len(track.fails) if track.fails else rate
        stats = track.stats
        if track.fails and rate > before + cfg.freeze_jump:
            if stats.frozen:
                return None
            track.stats = replace(stats, frozen=True, revision=stats.revision + 1, updated_at=_now())
            return track.stats
        learn = pending if stats.confirmed < RELIABLE_COUNT else [(s, f) for s, f in pending if not f]
        track.scores = (track.scores + [s for s, _ in learn])[-cfg.window:]
        track.fails = (track.fails + [f for _, f in pending])[-cfg.window:]
        if len(track.scores) < cfg.min_count:
            if stats.frozen:
                track.stats = replace(stats, frozen=False, revision=stats.revision + 1, updated_at=_now())
                return track.stats
            return None
        target = stream_scale_of(track.scores, stats.method)
        u, gamma = bounded_step((stats.u, stats.gamma), target, cfg.max_step)
        track.stats = replace(stats, u=u, gamma=gamma, source="stream", count=len(track.scores),
                              stream=list(track.scores), frozen=False, revision=stats.revision + 1,
                              updated_at=_now())
        return track.stats
