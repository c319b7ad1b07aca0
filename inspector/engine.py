"""The engine: one batch of prepared frames -> scores, verdicts and maps, against a bank snapshot.

It owns the device, the precision and the thresholds; the model stays pure. The bank snapshot is
passed per call, so a bank swap takes effect between two batches and never inside one.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .artifact import ModelCard
from .banks.watcher import BankSnapshot
from .model import InspectionModel, verdicts
from .model.bank import BANK_DTYPE, level_caps
from .model.config import CALIBRATION_MODES
from .model.serving import ServingGraph, input_names
from .wire import ANOMALY, NO_PRODUCTS, UNKNOWN_PRODUCT


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


def bank_vectors(model: InspectionModel, images: int, coreset) -> tuple[int, ...]:
    """Vectors per level of a bank of ``images`` images under ``coreset``: every position, or the
    level's cap."""
    full = [images * h * w for h, w in model.grids]
    return tuple(min(f, cap) if cap else f for f, cap in zip(full, level_caps(coreset, len(full))))


def bank_capacity(model: InspectionModel) -> tuple[int, ...]:
    """Vectors per level a bank may hold: every position of the bank's most ``images``, or the
    coreset cap of that level."""
    return bank_vectors(model, model.cfg.bank.images, model.cfg.bank.coreset)


@dataclass(frozen=True)
class ProgramKey:
    """What a compiled program was built for; the worker refuses any difference."""

    model_id: str
    backend: str
    precision: str
    batch_min: int
    batch_max: int
    capacity: list[int]
    products: int
    calibration: str
    input_size: int
    device: str
    runtime: str
    bank_dtype: str = "float16"  # the bank inputs' dtype (keys written before it was recorded: the stored fp16)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, path: Path) -> "ProgramKey":
        side = path.with_suffix(".json")
        if not side.is_file():
            raise ValueError(f"compiled program {path} has no key file {side}: rebuild it with inspector compile")
        try:
            return cls(**json.loads(side.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{side} is not a valid program key ({err}): rebuild it with inspector compile") from err


def runtime_version(backend: str) -> str:
    """The runtime a program of ``backend`` is bound to (a different one needs a rebuild)."""
    if backend == "onnx":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    if backend == "tensorrt":
        import tensorrt  # noqa: F401  (present wherever torch-tensorrt is)
        import torch_tensorrt

        return f"tensorrt {tensorrt.__version__}, torch-tensorrt {torch_tensorrt.__version__}"
    return f"torch {torch.__version__}"


PROGRAM_SUFFIX = {"onnx": ".onnx", "tensorrt": ".ep"}
# The dtype each backend takes the bank tensors in. The engine converts a snapshot's (stored fp16)
# banks to it once, when the snapshot comes into service, not in the graph on every batch: fp32 for
# eager, inductor and ONNX; TensorRT programs take the stored fp16 and convert inside the engine
# they build. A compiled program's key records the dtype it was built for.
PROGRAM_BANK_DTYPE = {"torch": torch.float32, "inductor": torch.float32, "onnx": torch.float32, "tensorrt": BANK_DTYPE}


def default_program_path(artifact: str | Path, backend: str, precision: str) -> Path:
    return Path(artifact) / "compiled" / f"{backend}-{precision}{PROGRAM_SUFFIX[backend]}"


Runner = Callable[..., Sequence]


def make_runner(backend: str, model: InspectionModel, calibration: str, program: Path | None,
                device: str = "cpu") -> Runner:
    """A callable ``(images, hint, prototypes, stats, *levels) -> Inspection fields`` for a backend."""
    if backend == "torch":
        graph = ServingGraph(model, calibration).eval()
        return lambda *args: graph(*args)
    if backend == "inductor":
        graph = torch.compile(ServingGraph(model, calibration).eval(), dynamic=True)
        return lambda *args: graph(*args)
    if backend == "onnx":
        return _onnx_runner(program, len(model.channels))
    if backend == "tensorrt":
        return _tensorrt_runner(program)
    raise ValueError(f"engine.backend must be torch, inductor, onnx or tensorrt, got {backend!r}")


def _onnx_runner(program: Path, levels: int) -> Runner:
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ValueError("engine.backend onnx needs onnxruntime: install the `onnx` extra") from err
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(program), providers=providers)
    names = input_names(levels)

    def run(*args: torch.Tensor) -> list[torch.Tensor]:
        feed = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
        return [torch.from_numpy(o) for o in session.run(None, feed)]

    return run


def _tensorrt_runner(program: Path) -> Runner:
    try:
        import torch_tensorrt  # noqa: F401  (registers the TensorRT runtime ops the program calls)
    except ImportError as err:
        raise ValueError("engine.backend tensorrt needs torch-tensorrt: install the `tensorrt` extra") from err
    module = torch.export.load(str(program)).module()
    return lambda *args: module(*(a.cuda() for a in args))


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
        self.bank_dtype = PROGRAM_BANK_DTYPE.get(settings.backend, torch.float32)
        if settings.backend in ("onnx", "tensorrt"):
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
        (``PROGRAM_BANK_DTYPE``), moved and converted once per snapshot.

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
