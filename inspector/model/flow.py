"""Position-conditioned normalizing flows over residual features (ResAD section 3.3).

Each level has a FrEIA ``SequenceINN`` of ``AllInOneBlock`` couplings, applied to every feature
position independently and conditioned on a 2-D sin/cos encoding of that position.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import nn

from .config import FlowConfig

SubnetConstructor = Callable[[int, int], nn.Module]
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_POS_BASE = 10000.0  # wavelength base of the sinusoidal encoding (Vaswani et al. 2017)


def mlp_subnet(hidden_ratio: float) -> SubnetConstructor:
    """Linear-ReLU-Linear subnet factory; the last layer starts at zero so blocks start near identity."""

    def build(c_in: int, c_out: int) -> nn.Module:
        hidden = max(1, int(round(hidden_ratio * c_in)))
        net = nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, c_out))
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
        return net

    return build


def build_flow(
    channels: int, cfg: FlowConfig, subnet_constructor: SubnetConstructor | None = None
) -> SequenceINN:
    """A flow over ``channels``-dim vectors conditioned on ``cfg.pos_dims``-dim positions."""
    subnet = subnet_constructor or mlp_subnet(cfg.hidden_ratio)
    flow = SequenceINN(channels)
    for _ in range(cfg.blocks):
        flow.append(
            AllInOneBlock,
            cond=0,
            cond_shape=(cfg.pos_dims,),
            subnet_constructor=subnet,
            affine_clamping=cfg.clamp,
            permute_soft=False,
        )
    _seed_permutations(flow, channels)
    return flow


@torch.no_grad()
def _seed_permutations(flow: SequenceINN, channels: int) -> None:
    """Replace each block's channel permutation, which FrEIA draws from numpy's global RNG, with
    one from a local generator, so that building a model is deterministic (the permutations are
    saved with the weights either way)."""
    gen = torch.Generator().manual_seed(channels)
    for block in flow.module_list:
        perm = torch.randperm(channels, generator=gen)
        w = torch.zeros(channels, channels)
        w[torch.arange(channels), perm] = 1.0
        block.w_perm.copy_(w.view_as(block.w_perm))
        block.w_perm_inv.copy_(w.t().contiguous().view_as(block.w_perm_inv))


def positional_encoding(height: int, width: int, dims: int) -> torch.Tensor:
    """2-D sinusoidal encoding, half the dims for rows and half for columns.

    Returns:
        ``(height * width, dims)`` float32, row-major over positions.
    """
    if dims % 4:
        raise ValueError(f"positional encoding dims must be a multiple of 4, got {dims}")
    quarter = dims // 4
    freqs = torch.exp(-math.log(_POS_BASE) * torch.arange(quarter, dtype=torch.float64) / quarter)
    ys = torch.arange(height, dtype=torch.float64)[:, None] * freqs  # (H, D/4)
    xs = torch.arange(width, dtype=torch.float64)[:, None] * freqs  # (W, D/4)
    enc_y = torch.cat([ys.sin(), ys.cos()], 1)[:, None, :].expand(height, width, 2 * quarter)
    enc_x = torch.cat([xs.sin(), xs.cos()], 1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([enc_y, enc_x], 2).reshape(height * width, dims).float()


def log_likelihood(z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """Per-dimension log-likelihood under a standard normal, reduced in fp32 (DESIGN section 4).

    ``logp = (-0.5 * |z|^2 + logdet) / C - 0.5 * log(2 pi)``.

    Args:
        z: ``(M, C)`` latents.
        log_det: ``(M,)`` log-determinant of the flow's Jacobian.
    """
    channels = z.shape[1]
    sq = z.float().pow(2).sum(1)
    return (-0.5 * sq + log_det.float()) / channels - _HALF_LOG_2PI
