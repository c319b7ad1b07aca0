"""The live line page: what an operator watches, served by the worker's HTTP server.

``LiveState`` keeps, in memory and bounded, what the page shows: per-product verdict counts
in one-minute buckets over the last ``window_min`` minutes, recent end-to-end latencies and the
last ``recent_failed`` failed frames (their model input and calibrated map; PNGs are encoded
when a browser asks, on the HTTP thread, never on the publisher's). The publisher hands it every
result after the result is out (``observe``), so the page never delays or costs a result.

Routes (``inspector.worker.metrics.HealthServer``): ``GET /`` the page (plain HTML and a script that
polls ``/live/state.json`` every second: no front-end build), ``GET /live/state.json``,
``GET /live/frames/<frame_id>/frame.png`` and ``.../overlay.png``, and ``POST /live/feedback``
with ``{"frame_id": ...}``: "this part is good". Feedback is refused (403) unless the line config
sets ``[live] feedback = true``. The HTTP bind is the access control: whoever can reach the port
can confirm parts, which re-measures a product's statistics (README, "The live page").
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ..decode import encode_png, heat_overlay
from ..wire import FAIL, PASS, Result

SECONDS_PER_MINUTE = 60
LATENCIES_KEPT = 2000  # end-to-end latencies behind the page's percentiles
MAX_FEEDBACK_BODY = 4096  # bytes of a feedback request: a frame id, nothing more
NO_PRODUCT = "(no product)"  # the page's row for frames no product was judged as (errors, unknown parts)


class FeedbackError(Exception):
    """A feedback request that cannot be applied; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class FailedFrame:
    """One failed frame as the page shows it."""

    seq: int
    result: Result
    pixels: np.ndarray | None
    calibrated: np.ndarray | None
    raw_score: float | None
    bank_version: int | None
    confirmed: bool = False
    _png: dict[str, bytes] = field(default_factory=dict)

    def header(self) -> dict[str, Any]:
        r = self.result
        return {"seq": self.seq, "frame_id": r.frame_id, "camera": r.camera, "product": r.product,
                "reason": r.reason, "score": r.score, "threshold": r.threshold, "ts_ns": r.ts_ns,
                "has_image": self.pixels is not None, "confirmed": self.confirmed}

    def png(self, kind: str) -> bytes | None:
        """``frame`` (the model input) or ``overlay`` (red where the calibrated map is high)."""
        if self.pixels is None or kind not in ("frame", "overlay"):
            return None
        if kind not in self._png:
            if kind == "frame":
                self._png[kind] = encode_png(self.pixels)
            else:
                heat = self.calibrated if self.calibrated is not None else np.zeros(self.pixels.shape[:2], np.float32)
                self._png[kind] = encode_png(heat_overlay(self.pixels, heat))
        return self._png[kind]


class LiveState:
    """What the live page shows, bounded in memory; every method is thread-safe.

    Args:
        recent_failed: failed frames kept for the page.
        window_min: minutes of per-product counts kept.
        status: returns the line status (ready, model, bank epoch, products and their statistics).
        confirm: applies "this part is good" for ``(product, raw_score, bank_version)`` and returns
            a summary of the statistics change; None disables feedback.
        clock: wall-clock seconds (tests pass their own).
    """

    def __init__(self, recent_failed: int, window_min: int, status: Callable[[], Mapping[str, Any]],
                 confirm: Callable[[str, float, int], Mapping[str, Any]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.window_min = window_min
        self._status = status
        self._confirm = confirm
        self._clock = clock
        self._lock = threading.Lock()
        self._seq = 0
        self._failed: collections.deque[FailedFrame] = collections.deque(maxlen=recent_failed)
        self._latency: collections.deque[float] = collections.deque(maxlen=LATENCIES_KEPT)
        self._minutes: dict[int, dict[str, dict[str, int]]] = {}

    @property
    def feedback_enabled(self) -> bool:
        return self._confirm is not None

    def observe(self, result: Result, pixels: np.ndarray | None = None, calibrated: np.ndarray | None = None,
                raw_score: float | None = None, bank_version: int | None = None) -> None:
        """One published result (called by the publisher after it is out)."""
        minute = int(self._clock() // SECONDS_PER_MINUTE)
        product = result.product or NO_PRODUCT
        with self._lock:
            self._seq += 1
            counts = self._minutes.setdefault(minute, {}).setdefault(product, {})
            counts[result.verdict] = counts.get(result.verdict, 0) + 1
            for old in [m for m in self._minutes if m <= minute - self.window_min]:
                del self._minutes[old]
            if result.latency_ms.total is not None:
                self._latency.append(float(result.latency_ms.total))
            if result.verdict == FAIL:
                self._failed.appendleft(FailedFrame(self._seq, result, pixels, calibrated, raw_score, bank_version))

    def state(self) -> dict[str, Any]:
        """The page's JSON: status, per-product counts and rates, latency percentiles, failed frames."""
        now_minute = int(self._clock() // SECONDS_PER_MINUTE)
        with self._lock:
            per: dict[str, dict[str, int]] = {}
            for minute, products in self._minutes.items():
                if minute > now_minute - self.window_min:
                    for product, counts in products.items():
                        into = per.setdefault(product, {})
                        for verdict, n in counts.items():
                            into[verdict] = into.get(verdict, 0) + n
            lat = np.asarray(self._latency, dtype=np.float64)
            failed = [f.header() for f in self._failed]
            seq = self._seq
        products = {}
        for product, counts in sorted(per.items()):
            judged = counts.get(PASS, 0) + counts.get(FAIL, 0)
            products[product] = {"counts": counts, "fail_rate": counts.get(FAIL, 0) / judged if judged else None}
        latency = ({f"p{q}": round(float(np.percentile(lat, q)), 1) for q in (50, 95, 99)} | {"n": int(lat.size)}
                   if lat.size else {"n": 0})
        return {"seq": seq, "status": dict(self._status()), "window_min": self.window_min, "products": products,
                "latency_ms": latency, "failed": failed, "feedback": self.feedback_enabled}

    def image(self, frame_id: str, kind: str) -> bytes | None:
        """A kept failed frame's PNG, or None when the frame is no longer (or never was) kept."""
        with self._lock:
            frame = next((f for f in self._failed if f.result.frame_id == frame_id), None)
        return frame.png(kind) if frame is not None else None

    def feedback(self, frame_id: str) -> dict[str, Any]:
        """Confirm a kept failed frame as a good part; raises ``FeedbackError`` with the status."""
        if self._confirm is None:
            raise FeedbackError(403, "feedback is off on this line: set [live] feedback = true in the line config")
        with self._lock:
            frame = next((f for f in self._failed if f.result.frame_id == frame_id), None)
        if frame is None:
            raise FeedbackError(404, f"frame {frame_id!r} is not among the recent failed frames; confirm it with "
                                     "`inspector bank feedback --archived` if the archive kept it")
        if frame.confirmed:
            raise FeedbackError(409, f"frame {frame_id!r} was already confirmed good")
        if frame.raw_score is None or frame.result.product is None or frame.bank_version is None:
            raise FeedbackError(422, f"frame {frame_id!r} has no score against a product's bank "
                                     f"({frame.result.reason or 'not routed'}): nothing to learn from it")
        out = dict(self._confirm(frame.result.product, frame.raw_score, frame.bank_version))
        frame.confirmed = True
        return {"frame_id": frame_id, "product": frame.result.product, **out}
