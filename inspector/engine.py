"""The engine: one batch of prepared frames -> scores, verdicts and maps, against a bank snapshot.

It owns the device, the precision and the thresholds; the model stays pure. The bank snapshot is
passed per call, so a bank swap takes effect between two batches and never inside one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .artifact import ModelCard
from .banks.watcher import BankSnapshot
from .model import InspectionModel
from .model.config import CALIBRATION_MODES

REASON_ANOMALY = "anomaly"  # score over the threshold
REASON_UNKNOWN = "unknown_product"  # no registered product matches the frame well enough
REASON_NO_PRODUCTS = "no_products"  # the line has no product registered yet


@dataclass(frozen=True)
class EngineSettings:
    """Serving settings; ``None`` takes the model card's value."""

    device: str = "auto"
    precision: str = "fp32"
    calibration: str | None = None
    threshold: float | None = None
    min_route_similarity: float | None = None
    threads: int | None = None


@dataclass(frozen=True)
class Scored:
    """One frame's outcome from the engine."""

    verdict: str  # "pass" | "fail"
    reason: str | None
    score: float | None
    product: str | None
    route_similarity: float | None
    heatmap: np.ndarray | None  # (S, S) float32 calibrated map


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("engine.device is cuda but no CUDA device is visible")
    return torch.device(name)


class Engine:
    """Runs the model on batches against bank snapshots.

    Args:
        model: the loaded model (its card describes it).
        card: the artifact's model card: thresholds, calibration, gate.
        settings: serving overrides.
    """

    def __init__(self, model: InspectionModel, card: ModelCard, settings: EngineSettings = EngineSettings()) -> None:
        self.card = card
        self.device = pick_device(settings.device)
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if settings.precision not in ("fp32", "fp16"):
            raise ValueError(f"engine.precision must be fp32 or fp16, got {settings.precision!r}")
        if settings.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("engine.precision fp16 needs a CUDA device; use fp32 on CPU")
        self.fp16 = settings.precision == "fp16"
        self.model = model.to(self.device).eval()
        score = card.model_config.score
        self.calibration = settings.calibration or score.calibration
        if self.calibration not in CALIBRATION_MODES:
            raise ValueError(f"calibration must be one of {CALIBRATION_MODES}, got {self.calibration!r}")
        card_thresholds = card.training.get("thresholds", {}) if isinstance(card.training, dict) else {}
        self.threshold = float(
            settings.threshold if settings.threshold is not None
            else card_thresholds.get(self.calibration, score.threshold)
        )
        self.min_route_similarity = float(
            settings.min_route_similarity if settings.min_route_similarity is not None else score.min_route_similarity
        )
        self.input_size = model.input_size
        self._bank_device: tuple[int, object] | None = None

    def _bank(self, snapshot: BankSnapshot):
        """The snapshot's tensors on the engine's device, moved once per snapshot."""
        if self._bank_device is None or self._bank_device[0] != id(snapshot):
            t = snapshot.tensors
            moved = type(t)(tuple(f.to(self.device) for f in t.features), t.prototypes.to(self.device),
                            t.stats.to(self.device))
            self._bank_device = (id(snapshot), moved)
        return self._bank_device[1]

    @torch.inference_mode()
    def infer(self, pixels: np.ndarray, hints: Sequence[str | None], snapshot: BankSnapshot,
              maps: bool = True) -> list[Scored]:
        """Score ``(B, S, S, 3)`` uint8 RGB frames.

        Args:
            pixels: frames already resized to the model's input size.
            hints: per frame, the header's product name or None to route by prototype.
            snapshot: the banks in service for this batch.
            maps: also return the calibrated maps (for heatmaps).
        """
        n = len(hints)
        if snapshot.tensors is None:
            return [Scored("fail", REASON_NO_PRODUCTS, None, None, None, None) for _ in range(n)]
        hint_rows = [(-1 if h is None else snapshot.index(h)) for h in hints]
        unknown_hint = [r is None for r in hint_rows]
        hint = torch.tensor([0 if r is None else r for r in hint_rows], dtype=torch.long, device=self.device)
        images = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.fp16 else contextlib.nullcontext()
        with autocast:
            ins = self.model.inspect(self.model.analyse(self.model.extract(images), self._bank(snapshot), hint),
                                     self.calibration)
        score = ins.score.float().cpu().numpy()
        product = ins.product.cpu().numpy()
        sim = ins.route_similarity.float().cpu().numpy()
        cal = ins.calibrated_map[:, 0].float().cpu().numpy() if maps else None
        out = []
        for i in range(n):
            heat = cal[i] if cal is not None else None
            name = snapshot.name(int(product[i]))
            if unknown_hint[i]:
                out.append(Scored("fail", REASON_UNKNOWN, None, hints[i], None, None))
            elif hints[i] is None and sim[i] < self.min_route_similarity:
                out.append(Scored("fail", REASON_UNKNOWN, float(score[i]), None, float(sim[i]), heat))
            elif score[i] > self.threshold:
                out.append(Scored("fail", REASON_ANOMALY, float(score[i]), name, float(sim[i]), heat))
            else:
                out.append(Scored("pass", None, float(score[i]), name, float(sim[i]), heat))
        return out
