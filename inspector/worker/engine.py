"""The engine: one batch of prepared frames -> scores, verdicts and maps, against a bank snapshot.

It owns the device, the precision and the thresholds; the model stays pure. The bank snapshot is
passed per call, so a bank swap takes effect between two batches and never inside one.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..artifact import ModelCard
from ..backends import ProgramKey, backend, make_runner, runtime_version
from ..banks.watcher import BankSnapshot
from ..model import InspectionModel, verdicts
from ..model.bank import bank_capacity
from ..model.config import CALIBRATION_MODES
from ..wire import ANOMALY, NO_PRODUCTS, UNKNOWN_PRODUCT


@dataclass(frozen=True)
class EngineSettings:
    """Serving settings; ``None`` takes the model card's value."""

    device: str = "auto"
    precision: str = "fp32"
    calibration: str | None = None
    threshold: float | None = None
    min_route_similarity: float | None = None
    threads: int | None = None
    backend: str = "torch"
    compiled: str = ""
    batch_sizes: tuple[int, ...] = (1,)
    products: int | None = None  # bank rows the engine is given (capacity_products)

    @classmethod
    def from_config(cls, engine, batch_sizes: tuple[int, ...], products: int | None) -> "EngineSettings":
        """The settings of a line config's ``[engine]`` (``inspector.config.EngineConfig``), field by
        field by name, with the batch sizes to warm up and the bank rows the engine is given."""
        names = {f.name for f in fields(cls)} - {"batch_sizes", "products"}
        return cls(**{n: getattr(engine, n) for n in names}, batch_sizes=batch_sizes, products=products)


@dataclass(frozen=True)
class Scored:
    """One frame's outcome from the engine."""

    verdict: str  # "pass" | "fail"
    reason: str | None
    score: float | None
    product: str | None
    route_similarity: float | None
    heatmap: np.ndarray | None  # (S, S) float32 calibrated map
    raw_score: float | None = None  # the uncalibrated score (self-calibration learns from it)


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
        self._bank_device: tuple[BankSnapshot, object] | None = None
        self.backend = settings.backend
        self.program = None
        spec = backend(settings.backend)
        self.bank_dtype = spec.bank_dtype
        if spec.suffix is not None:  # a saved program: checked against its key
            self.program, key = self._checked_program(settings)
            self.bank_dtype = getattr(torch, key.bank_dtype)
        self.runner = make_runner(settings.backend, self.model, self.calibration, self.program, str(self.device))

    def _checked_program(self, settings: EngineSettings) -> tuple[Path, ProgramKey]:
        """The compiled program and its key, refused unless the key matches this engine exactly."""
        path = Path(settings.compiled) if settings.compiled else None
        if path is None:
            raise ValueError(f"engine.backend {settings.backend} needs engine.compiled: the program written by "
                             f"inspector compile --backend {settings.backend}")
        if not path.exists():
            raise ValueError(f"compiled program {path} does not exist: build it with inspector compile "
                             f"--artifact ARTIFACT --backend {settings.backend}")
        key = ProgramKey.read(path)
        device = torch.cuda.get_device_name() if settings.backend == "tensorrt" and torch.cuda.is_available() else "cpu"
        want = {
            "model_id": self.card.model_id, "backend": settings.backend, "precision": settings.precision,
            "capacity": list(bank_capacity(self.model)), "calibration": self.calibration,
            "input_size": self.model.input_size, "runtime": runtime_version(settings.backend),
        }
        if settings.backend == "tensorrt":
            want["device"] = device
        if settings.products is not None:
            want["products"] = settings.products
        have = asdict(key)
        wrong = [f"{k} is {have[k]!r}, this worker needs {v!r}" for k, v in want.items() if have[k] != v]
        sizes = [b for b in settings.batch_sizes if not key.batch_min <= b <= key.batch_max]
        if sizes:
            wrong.append(f"batch range is {key.batch_min}..{key.batch_max}, this worker uses {sorted(settings.batch_sizes)}")
        if wrong:
            raise ValueError(
                f"compiled program {path} does not match: {'; '.join(wrong)}. Rebuild it: inspector compile "
                f"--artifact ARTIFACT --backend {settings.backend} --precision {settings.precision} --batch "
                f"{','.join(map(str, sorted(set(settings.batch_sizes))))} --products {settings.products or key.products}"
                + (f" --calibration {self.calibration}" if self.calibration else ""))
        return path, key

    def _bank(self, snapshot: BankSnapshot):
        """The snapshot's tensors on the engine's device, in the backend's bank dtype
        (``inspector.backends``), moved and converted once per snapshot.

        The cache holds the snapshot itself and compares identity: an ``id()`` could be reused by
        a new snapshot once the old one is freed, which would serve a stale bank.
        """
        if self._bank_device is None or self._bank_device[0] is not snapshot:
            t = snapshot.tensors
            moved = type(t)(tuple(f.to(self.device, self.bank_dtype) for f in t.features), t.prototypes.to(self.device),
                            t.stats.to(self.device))
            self._bank_device = (snapshot, moved)
        return self._bank_device[1]

    @torch.inference_mode()
    def infer(self, pixels: np.ndarray, hints: Sequence[str | None], snapshot: BankSnapshot,
              maps: bool = True, stats: torch.Tensor | None = None) -> list[Scored]:
        """Score ``(B, S, S, 3)`` uint8 RGB frames.

        Args:
            pixels: frames already resized to the model's input size.
            hints: per frame, the header's product name or None to route by prototype.
            snapshot: the banks in service for this batch.
            maps: also return the calibrated maps (for heatmaps).
            stats: ``(P, 2)`` normal statistics replacing the snapshot's rows (the worker's
                self-calibration); None serves the snapshot's.
        """
        n = len(hints)
        if snapshot.tensors is None:
            return [Scored("fail", NO_PRODUCTS, None, None, None, None) for _ in range(n)]
        hint_rows = [(-1 if h is None else snapshot.index(h)) for h in hints]
        unknown_hint = [r is None for r in hint_rows]
        hint = torch.tensor([0 if r is None else r for r in hint_rows], dtype=torch.long, device=self.device)
        images = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.fp16 else contextlib.nullcontext()
        bank = self._bank(snapshot)
        rows = bank.stats if stats is None else stats.to(device=self.device, dtype=bank.stats.dtype)
        with autocast:
            out = self.runner(images, hint, bank.prototypes, rows, *bank.features)
        cal_map, _, score, product, sim, u, gamma = (torch.as_tensor(o) for o in out[:7])
        raw = (u.float() + score.float() * (gamma.float() - u.float())).cpu().numpy()
        score = score.float().cpu().numpy()
        product = product.cpu().numpy()
        sim = sim.float().cpu().numpy()
        cal = cal_map[:, 0].float().cpu().numpy() if maps else None
        hinted = np.asarray([h is not None for h in hints])
        fail, unknown = verdicts(score, sim, hinted, self.threshold, self.min_route_similarity)
        out = []
        for i in range(n):
            heat = cal[i] if cal is not None else None
            name = snapshot.name(int(product[i]))
            if unknown_hint[i]:
                out.append(Scored("fail", UNKNOWN_PRODUCT, None, hints[i], None, None))
            elif unknown[i]:
                out.append(Scored("fail", UNKNOWN_PRODUCT, float(score[i]), None, float(sim[i]), heat))
            elif fail[i]:
                out.append(Scored("fail", ANOMALY, float(score[i]), name, float(sim[i]), heat, float(raw[i])))
            else:
                out.append(Scored("pass", None, float(score[i]), name, float(sim[i]), heat, float(raw[i])))
        return out
