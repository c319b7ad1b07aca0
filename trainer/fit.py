"""Stage 1: fit constraintors and flows on source classes (ResAD; DESIGN section 5).

Each step samples query images from several source classes (normal or anomalous) and draws k
reference shots per query from that class's normal images, never the query itself nor the
image an anomaly was made from. Residuals are computed only inside a random window per query
(one pixel of halo per level, so the constraintor's 3x3 convolution sees exactly what it sees at
inference), which keeps a step cheap on a CPU while every level gets positions every step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from inspector.model import InspectionModel

from .checkpoint import load_checkpoint, save_checkpoint
from .dataset import ClassMaterial


@dataclass(frozen=True)
class FitConfig:
    """Stage-1 training settings."""

    steps: int = 1500
    batch: int = 8  # query images per step
    window: int = 64  # training window side in input pixels (a multiple of the coarsest stride)
    lr: float = 5e-4
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    anomaly_fraction: float = 0.5  # share of queries that are anomalous
    boundary_quantile: float = 0.05  # normal boundary: this quantile of normal log-likelihoods (BGAD)
    boundary_margin: float = 0.1  # anomalous boundary sits this far (per dim) below the normal one
    shell_margin: float = 0.5  # anomalies pushed beyond r * (1 + margin)
    invariance_weight: float = 0.1
    checkpoint_every: int = 250
    log_every: int = 25
    seed: int = 0


@dataclass
class Window:
    """A training window of one query, in input pixels: top-left corner and side."""

    top: int
    left: int
    side: int


@dataclass
class Query:
    """One drawn query with everything its losses need."""

    material: ClassMaterial
    row: int
    anomalous: bool
    shots: np.ndarray
    window: Window

    def level(self, l: int) -> torch.Tensor:
        source = self.material.anomalous if self.anomalous else self.material.fit
        return source[l][self.row].float()

    def mask(self) -> torch.Tensor | None:
        return self.material.masks[self.row] if self.anomalous else None



class QuerySampler:
    """Draws queries, their shots and their windows from prepared source classes."""

    def __init__(self, classes: Sequence[ClassMaterial], shots: int, window: int, stride: int, size: int):
        self.classes = classes
        self.shots = shots
        self.window = window
        self.stride = stride
        self.size = size

    def draw(self, rng: np.random.Generator, anomalous: bool) -> Query:
        """One query of a random class: its row, k shot rows in ``fit`` and its window."""
        c = int(rng.integers(len(self.classes)))
        mat = self.classes[c]
        if anomalous:
            row = int(rng.integers(len(mat.masks)))
            exclude = int(mat.source[row])
            window = self._window_on(mat.masks[row], rng)
        else:
            row = int(rng.integers(mat.fit[0].shape[0]))
            exclude = row
            window = self._random_window(rng)
        pool = np.setdiff1d(np.arange(mat.fit[0].shape[0]), [exclude])
        shots = rng.choice(pool, size=min(self.shots, len(pool)), replace=False)
        return Query(mat, row, anomalous, shots, window)

    def _random_window(self, rng: np.random.Generator) -> Window:
        cells = (self.size - self.window) // self.stride + 1
        top, left = rng.integers(cells, size=2) * self.stride
        return Window(int(top), int(left), self.window)

    def _window_on(self, mask: torch.Tensor, rng: np.random.Generator) -> Window:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(ys) == 0:
            return self._random_window(rng)
        i = int(rng.integers(len(ys)))
        top = self._aligned(int(ys[i]) - self.window // 2)
        left = self._aligned(int(xs[i]) - self.window // 2)
        return Window(top, left, self.window)

    def _aligned(self, pos: int) -> int:
        pos = min(max(pos, 0), self.size - self.window)
        return pos - pos % self.stride


def window_features(level: torch.Tensor, window: Window, stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut ``window`` (plus a one-position halo) from one image's ``(C, H, W)`` level features.

    Returns:
        ``(crop, valid, positions)``: ``(C, h+2, w+2)`` features (zero outside the map),
        ``(1, h+2, w+2)`` validity, and ``(h*w,)`` flat grid positions of the interior.
    """
    c, height, width = level.shape
    side = window.side // stride
    y, x = window.top // stride, window.left // stride
    padded = F.pad(level, (1, 1, 1, 1))
    valid = F.pad(torch.ones(1, height, width), (1, 1, 1, 1))
    crop = padded[:, y : y + side + 2, x : x + side + 2]
    ok = valid[:, y : y + side + 2, x : x + side + 2]
    rows = torch.arange(y, y + side)[:, None] * width + torch.arange(x, x + side)[None, :]
    return crop, ok, rows.reshape(-1)


def window_labels(mask: torch.Tensor | None, window: Window, stride: int) -> torch.Tensor:
    """Per-position labels in a window: 0 normal, 1 anomalous (>= half covered), -1 ignored."""
    side = window.side // stride
    if mask is None:
        return torch.zeros(side * side, dtype=torch.long)
    cut = mask[window.top : window.top + window.side, window.left : window.left + window.side]
    frac = F.avg_pool2d(cut[None, None].float(), stride).reshape(-1)
    labels = torch.full_like(frac, -1, dtype=torch.long)
    labels[frac == 0] = 0
    labels[frac >= 0.5] = 1  # a position is anomalous when at least half its cell is
    return labels


def draw_queries(sampler: QuerySampler, batch: int, anomaly_fraction: float, rng: np.random.Generator) -> list[Query]:
    """A step's queries; at least one normal query so normal losses are always defined."""
    return [sampler.draw(rng, i > 0 and rng.random() < anomaly_fraction) for i in range(batch)]


def level_batch(
    model: InspectionModel, queries: Sequence[Query], level: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual windows of one level for a step.

    Returns:
        ``(constrained, residual, positions, labels)``: ``(M, C)`` constraintor outputs and
        ``(M, C)`` residuals at the windows' interior positions, ``(M,)`` grid positions,
        ``(M,)`` labels (0 normal, 1 anomalous, -1 ignored).
    """
    stride = model.strides[level]
    crops, valid, positions, labels, refs = [], [], [], [], []
    for q in queries:
        crop, ok, pos = window_features(q.level(level), q.window, stride)
        crops.append(crop)
        valid.append(ok)
        positions.append(pos)
        labels.append(window_labels(q.mask(), q.window, stride))
        shots = q.material.fit_unit[level][torch.as_tensor(q.shots)]  # (k, HW, C)
        refs.append(shots.reshape(-1, shots.shape[2]))
    res, _ = model.residual(level, torch.stack(crops), torch.stack(refs))
    res = res * torch.stack(valid)  # positions outside the map are zero, as the conv's padding
    con = model.constraintors[level](res)[:, :, 1:-1, 1:-1]
    channels = res.shape[1]
    flat = lambda t: t.flatten(2).transpose(1, 2).reshape(-1, channels)  # noqa: E731  (B,C,h,w)->(M,C)
    return flat(con), flat(res[:, :, 1:-1, 1:-1]), torch.cat(positions), torch.cat(labels)


def level_losses(
    model: InspectionModel, level: int, batch: tuple, radius: float, cfg: FitConfig
) -> dict[str, torch.Tensor]:
    """Flow likelihood with boundary push-pull, and the constraintor's shell and invariance terms."""
    constrained, residual, positions, labels = batch
    logp = model.flow_logp(level, constrained, positions)
    normal, anomalous = labels == 0, labels == 1
    lp_n, lp_a = logp[normal], logp[anomalous]
    b_n = torch.quantile(lp_n.detach(), cfg.boundary_quantile)
    zero = logp.new_zeros(())
    out = {
        "nll": -lp_n.mean(),
        "push_pull": F.relu(b_n - lp_n).mean(),
        "shell": zero,
        "invariance": zero,
        "logp_normal": lp_n.detach().mean(),
        "logp_anomalous": lp_a.detach().mean() if anomalous.any() else zero,
    }
    if anomalous.any():
        out["push_pull"] = out["push_pull"] + F.relu(lp_a - (b_n - cfg.boundary_margin)).mean()
    # the identity constraintor has no parameters: shell and invariance terms exist only for conv
    if model.cfg.flow.constraintor == "conv":
        norms = constrained.norm(dim=1)
        out["shell"] = F.relu(norms[normal] - radius).pow(2).mean() / radius**2
        if anomalous.any():
            outer = radius * (1.0 + cfg.shell_margin)
            out["shell"] = out["shell"] + F.relu(outer - norms[anomalous]).pow(2).mean() / radius**2
            out["invariance"] = (constrained[anomalous] - residual[anomalous]).pow(2).sum(1).mean()
    out["loss"] = out["nll"] + out["push_pull"] + out["shell"] + cfg.invariance_weight * out["invariance"]
    return out


@torch.no_grad()
def initial_radii(model: InspectionModel, sampler: QuerySampler, rng: np.random.Generator, batch: int) -> list[float]:
    """Shell radius per level: the median norm of normal residuals on one batch of queries."""
    queries = [sampler.draw(rng, False) for _ in range(batch)]
    radii = []
    for level in range(len(model.channels)):
        _, residual, _, _ = level_batch(model, queries, level)
        radii.append(float(residual.norm(dim=1).median()))
    return radii


@torch.no_grad()
def match_constraintor_scale(model: InspectionModel, radii: Sequence[float]) -> None:
    """Start each constraintor's output norm near its level's residual norm.

    Batch norm makes every output channel unit-variance, so a ReLU output has norm about
    ``sqrt(C / 2)`` whatever the residual's scale; the shell radius and the invariance term live
    in residual units. Scaling the batch-norm weight to ``r * sqrt(2 / C)`` puts both on one
    scale from the first step instead of spending the early steps shrinking the output.
    """
    if model.cfg.flow.constraintor != "conv":
        return  # the identity constraintor has no scale to match
    for level, radius in enumerate(radii):
        norm = model.constraintors[level][1]
        norm.weight.fill_(radius * math.sqrt(2.0 / model.channels[level]))


def trainable_parameters(model: InspectionModel) -> list[torch.nn.Parameter]:
    """Stage-1 parameters: constraintors and flows (backbone frozen, CADA head later)."""
    return [p for m in (model.constraintors, model.flows) for p in m.parameters()]


def learning_rate(step: int, cfg: FitConfig) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 5% of the peak."""
    warm = max(1, cfg.steps // 20)  # 5% warm-up
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t)))  # floor at 5% of the peak


def fit_flows(
    model: InspectionModel,
    classes: Sequence[ClassMaterial],
    cfg: FitConfig,
    workdir: str | Path,
    resume: bool = True,
    progress: bool = True,
    on_checkpoint: Callable[[int], None] | None = None,
) -> dict[str, object]:
    """Train constraintors and flows; checkpoints and a JSON-lines log go to ``workdir``.

    ``on_checkpoint(step)``, if given, is called after every checkpoint with the model in eval
    mode (it is put back in train mode afterwards); benchmarks use it to follow a fit.

    Returns:
        Summary: steps, seconds, shell radii and the last logged losses.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    sampler = QuerySampler(classes, model.cfg.bank.shots, cfg.window, max(model.strides), model.input_size)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    meta = load_checkpoint(workdir / "stage1", model, optimizer, rng) if resume else None
    start = meta["step"] if meta else 0
    if meta:
        radii = meta["radii"]
    else:
        radii = initial_radii(model, sampler, rng, cfg.batch)
        match_constraintor_scale(model, radii)
    elapsed = meta["seconds"] if meta else 0.0
    log_path = workdir / "train_log.jsonl"
    model.train()
    last: dict[str, float] = {}
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="fit flows", unit="step", disable=not progress)
    t0 = time.perf_counter()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        queries = draw_queries(sampler, cfg.batch, cfg.anomaly_fraction, rng)
        levels = [level_losses(model, l, level_batch(model, queries, l), radii[l], cfg) for l in range(len(radii))]
        loss = torch.stack([lv["loss"] for lv in levels]).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable_parameters(model), cfg.grad_clip)
        optimizer.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            last = _log_step(log_path, step + 1, levels, loss, optimizer, elapsed + time.perf_counter() - t0)
            bar.set_postfix(loss=f"{last['loss']:.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            meta = {"step": step + 1, "radii": radii, "seconds": elapsed + time.perf_counter() - t0, "config": asdict(cfg)}
            save_checkpoint(workdir / "stage1", model, optimizer, rng, meta)
            if on_checkpoint is not None:
                model.eval()
                on_checkpoint(step + 1)
                model.train()
    model.eval()
    return {"steps": cfg.steps, "seconds": elapsed + time.perf_counter() - t0, "radii": radii, "last": last}


def _log_step(path: Path, step: int, levels: list[dict], loss: torch.Tensor, optimizer, seconds: float) -> dict[str, float]:
    record: dict[str, float] = {"step": step, "loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 2)}
    for l, lv in enumerate(levels):
        for name, value in lv.items():
            record[f"l{l}.{name}"] = round(float(value.detach()), 5)
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    return record
