"""The inspection graph: backbone -> bank residual -> constraintor -> flow -> calibrated map.

One pure ``nn.Module`` shared by the trainer, the worker and export (DESIGN section 4). It does
no I/O, no logging and no device choice. ``forward(images, bank, hint)`` is what is exported and
served; the trainer calls the stage methods for what its losses need.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import create_backbone
from .bank import (
    BankTensors,
    build_bank,
    nearest_neighbours,
    position_vectors,
    prototype_of,
    stack_banks,
)
from .calibration import CadaHead, GaussianBlur, calibrate, top_fraction_mean
from .config import ModelConfig
from .flow import SubnetConstructor, build_flow, log_likelihood, positional_encoding

_UINT8_MAX = 255.0


class Inspection(NamedTuple):
    """What ``forward`` returns for a batch of ``B`` images of size ``S``.

    Attributes:
        calibrated_map: ``(B, 1, S, S)`` map in the configured calibration.
        raw_map: ``(B, 1, S, S)`` blurred mean of per-level ``-log p``.
        score: ``(B,)`` mean of the top 1% calibrated pixels.
        product: ``(B,)`` int64 index of the product whose bank was used.
        route_similarity: ``(B,)`` cosine of the image prototype to that product's prototype.
        u: ``(B,)`` normal map mean used for calibration.
        gamma: ``(B,)`` normal map max used for calibration.
    """

    calibrated_map: torch.Tensor
    raw_map: torch.Tensor
    score: torch.Tensor
    product: torch.Tensor
    route_similarity: torch.Tensor
    u: torch.Tensor
    gamma: torch.Tensor


class Analysis(NamedTuple):
    """Everything evaluation needs from one pass, before a calibration mode is chosen.

    ``nn_map`` is the training-free baseline: blurred mean over levels of ``1 - cos`` to the
    nearest bank vector. ``cada`` and ``bank`` hold ``(u, gamma)`` from each calibration source.
    The served graph leaves out what its calibration mode does not use (``analyse(served=...)``):
    ``nn_map`` beside a flow's map, ``cada`` unless it calibrates by CADA.
    """

    raw_map: torch.Tensor
    nn_map: torch.Tensor | None
    product: torch.Tensor
    route_similarity: torch.Tensor
    cada: tuple[torch.Tensor, torch.Tensor] | None
    bank: tuple[torch.Tensor, torch.Tensor]


class Constraintor(nn.Sequential):
    """Shallow feature constraintor: conv3x3(C, C) + BN + ReLU (ResAD section 3.2)."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )


class ResidualScale(nn.Module):
    """The identity constraintor: the residual times ``sqrt(C)``.

    Residuals of unit vectors satisfy ``|r|^2 = 2 (1 - cos)``, so at the flow's identity start
    ``-log p`` per dimension is ``(1 - cos) + const`` at every level: the untrained model scores
    exactly as the nearest-neighbour baseline, and fitting learns a correction to it.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(math.sqrt(channels)), persistent=False)

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        return residual * self.scale


def build_constraintor(kind: str, channels: int) -> nn.Module:
    """The constraintor of a level for ``FlowConfig.constraintor``."""
    return Constraintor(channels) if kind == "conv" else ResidualScale(channels)


class InspectionModel(nn.Module):
    """ResAD residual flow with CADA calibration.

    Args:
        cfg: the model configuration (also stored in the model card).
        backbone: a frozen ``features_only`` extractor; built from ``cfg.backbone`` if omitted.
        subnet_constructor: flow coupling subnet factory ``f(c_in, c_out)``; tests inject small ones.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        backbone: nn.Module | None = None,
        subnet_constructor: SubnetConstructor | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else create_backbone(cfg.backbone)
        info = self.backbone.feature_info
        self.channels = tuple(info.channels())
        self.strides = tuple(info.reduction())
        size = cfg.backbone.input_size
        self.grids = tuple((size // s, size // s) for s in self.strides)
        self.register_buffer("mean", torch.tensor(cfg.backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.backbone.std).view(1, 3, 1, 1), persistent=False)
        for level, (h, w) in enumerate(self.grids):
            pos = positional_encoding(h, w, cfg.flow.pos_dims)
            if not cfg.flow.position:
                pos = torch.zeros_like(pos)  # same graph and shapes, no position information
            self.register_buffer(f"pos{level}", pos, persistent=False)
        self.constraintors = nn.ModuleList(build_constraintor(cfg.flow.constraintor, c) for c in self.channels)
        self.flows = nn.ModuleList(build_flow(c, cfg.flow, subnet_constructor) for c in self.channels)
        self.blur = GaussianBlur(cfg.score.blur_sigma)
        self.cada = CadaHead(self.channels[-1], cfg.cada)

    # -- lifecycle -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "InspectionModel":
        """Train mode for the heads; the backbone stays frozen in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def input_size(self) -> int:
        return self.cfg.backbone.input_size

    # -- stages ----------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, S, S, 3)`` uint8 RGB -> ``(B, 3, S, S)`` float, ImageNet-normalised."""
        x = images.permute(0, 3, 1, 2).float() / _UINT8_MAX
        return (x - self.mean) / self.std

    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features per level, ``(B, C_l, H_l, W_l)``, for uint8 images."""
        return list(self.backbone(self.preprocess(images)))

    def route(
        self, top_level: torch.Tensor, bank: BankTensors, hint: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick each image's product: the hint where ``hint >= 0``, else the best prototype.

        Returns:
            ``(product, similarity)``: ``(B,)`` int64 and ``(B,)`` cosine to that product.
        """
        sims = prototype_of(top_level) @ bank.prototypes.t()  # (B, P)
        product = torch.where(hint >= 0, hint, sims.argmax(dim=1))
        return product, sims.gather(1, product.unsqueeze(1)).squeeze(1)

    def residual(
        self, level: int, features: torch.Tensor, references: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual to the nearest reference vector at every position.

        Args:
            level: level index (selects nothing here; kept for symmetry with the other stages).
            features: ``(B, C, H, W)`` backbone features.
            references: ``(B, N, C)`` unit bank vectors, one bank per image.

        Returns:
            ``(residual, similarity)``: ``(B, C, H, W)`` query minus match in normalised space,
            and ``(B, 1, H, W)`` cosine to the match.
        """
        b, c, h, w = features.shape
        queries = position_vectors(features)  # (B, HW, C)
        sim, match = nearest_neighbours(queries, references, self.cfg.bank.chunk, self.cfg.bank.query_tile)
        res = (queries - match).transpose(1, 2).reshape(b, c, h, w)
        return res, sim.reshape(b, 1, h, w)

    def flow_logp(self, level: int, vectors: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Per-dimension log-likelihood of ``(M, C)`` vectors at flat ``(M,)`` grid positions."""
        cond = getattr(self, f"pos{level}")[positions]
        z, log_det = self.flows[level](vectors, c=[cond])
        return log_likelihood(z, log_det)

    def level_logp(self, level: int, residual: torch.Tensor) -> torch.Tensor:
        """Constrain a ``(B, C, H, W)`` residual map and score every position -> ``(B, 1, H, W)``."""
        b, c, h, w = residual.shape
        x = self.constraintors[level](residual).flatten(2).transpose(1, 2).reshape(b * h * w, c)
        cond = getattr(self, f"pos{level}").repeat(b, 1)  # (B*HW, D)
        z, log_det = self.flows[level](x, c=[cond])
        return log_likelihood(z, log_det).reshape(b, 1, h, w)

    def fuse(self, level_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Upsample per-level ``(B, 1, h, w)`` maps to ``S x S``, average, blur."""
        size = (self.input_size, self.input_size)
        ups = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in level_maps]
        return self.blur(torch.stack(ups).mean(0))

    # -- whole graph -----------------------------------------------------------------------
    def analyse(
        self, features: Sequence[torch.Tensor], bank: BankTensors, hint: torch.Tensor | None = None,
        served: str | None = None,
    ) -> Analysis:
        """Score backbone features against the bank; no calibration mode chosen yet.

        ``served``: a calibration mode to compute only what serving in that mode uses (the served
        graph): the CADA head only for ``cada``, and the distance map beside a flow's map not at
        all. The fields left out are None. ``None`` computes everything (evaluation).
        """
        if hint is None:
            hint = torch.full((features[0].shape[0],), -1, dtype=torch.long, device=features[0].device)
        product, similarity = self.route(features[-1], bank, hint)
        flows = self.cfg.score.scoring == "flow"
        anomaly, distance = [], []
        for level, feats in enumerate(features):
            refs = bank.features[level][product]  # (B, N, C)
            res, sim = self.residual(level, feats, refs)
            if flows:
                anomaly.append(-self.level_logp(level, res))
            distance.append(1.0 - sim)
        stats = bank.stats[product]  # (B, 2)
        nn_map = self.fuse(distance) if not (flows and served) else None
        return Analysis(
            raw_map=self.fuse(anomaly) if flows else nn_map,  # "distance" scoring runs no flow
            nn_map=nn_map,
            product=product,
            route_similarity=similarity,
            cada=self.cada(features[-1]) if served in (None, "cada") else None,
            bank=(stats[:, 0], stats[:, 1]),
        )

    @torch.no_grad()
    def raw_scores(self, features: Sequence[torch.Tensor], bank: BankTensors, hint: torch.Tensor) -> torch.Tensor:
        """``(B,)`` uncalibrated image scores (top-fraction mean of the raw map) against given banks.

        The same graph and arithmetic the worker serves, before calibration: calibrating the map
        by ``(raw - u) / (gamma - u)`` calibrates this score the same way, since the score is an
        order statistic of the map.
        """
        raw = self.analyse(features, bank, hint).raw_map
        return top_fraction_mean(raw, self.cfg.score.top_fraction)

    @torch.no_grad()
    def leave_one_out_scores(self, shot_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(k,)`` raw scores of each of k >= 2 shots against a bank of the other k-1.

        Args:
            shot_features: per level ``(k, C, H, W)`` backbone features of the shots.
        """
        k = shot_features[0].shape[0]
        if k < 2:
            raise ValueError("leave-one-out scores need at least 2 shots")
        banks = []
        for i in range(k):
            others = [j for j in range(k) if j != i]
            banks.append(build_bank([f[others] for f in shot_features], self.cfg.bank.coreset))
        hint = torch.arange(k, device=shot_features[0].device)
        return self.raw_scores(shot_features, stack_banks(banks), hint)

    def inspect(self, analysis: Analysis, calibration: str | None = None) -> Inspection:
        """Calibrate an analysis in mode ``cada``, ``bank`` or ``none`` (default: the config's)."""
        mode = calibration or self.cfg.score.calibration
        raw = analysis.raw_map
        if mode == "none":
            u = torch.zeros_like(analysis.route_similarity)
            gamma = torch.ones_like(u)
            calibrated = raw
        else:
            source = analysis.cada if mode == "cada" else analysis.bank
            if source is None:
                raise ValueError("this analysis was made for serving another calibration mode: it has no CADA output")
            u, gamma = source
            calibrated = calibrate(raw, u, gamma)
        score = top_fraction_mean(calibrated, self.cfg.score.top_fraction)
        return Inspection(calibrated, raw, score, analysis.product, analysis.route_similarity, u, gamma)

    def forward(
        self, images: torch.Tensor, bank: BankTensors, hint: torch.Tensor | None = None
    ) -> Inspection:
        """Inspect ``(B, S, S, 3)`` uint8 RGB images against stacked product banks.

        Args:
            images: uint8 RGB frames already resized to the model's input size.
            bank: stacked, padded product banks (see ``inspector.model.bank``).
            hint: ``(B,)`` int64 product index per frame, ``-1`` to route by prototype.
        """
        mode = self.cfg.score.calibration
        return self.inspect(self.analyse(self.extract(images), bank, hint, served=mode), mode)


def verdicts(score: Any, route_similarity: Any, hinted: Any, threshold: float,
             min_route_similarity: float) -> tuple[Any, Any]:
    """The served verdict rule: fail flags and unknown-product flags, each ``(B,)`` bool.

    A frame routed by its prototype (not ``hinted`` to a product by its header) whose route
    similarity is below ``min_route_similarity`` matches no registered product and fails as
    ``unknown_product`` whatever its score (DESIGN section 1, point 4); a hinted frame is scored
    against its product however it looks. Any other frame fails when its calibrated score is
    over ``threshold``, or is not a number (a score that cannot be read never passes a part).
    Works on NumPy arrays and torch tensors alike; the engine serves it.
    """
    unknown = ~hinted & (route_similarity < min_route_similarity)
    return unknown | ~(score <= threshold), unknown
