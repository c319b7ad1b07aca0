"""Raw-map smoothing, the CADA regressor and calibrated scoring (DESIGN section 4; CADA)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import CadaConfig

_TRUNCATE = 4.0  # Gaussian kernel radius in sigmas (as scipy.ndimage.gaussian_filter)
_MIN_SPREAD = 1e-6  # floor of (gamma - u): keeps the calibrated map finite


class GaussianBlur(nn.Module):
    """Fixed separable Gaussian blur as two convolutions, reflect-padded, exportable."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        radius = max(1, int(_TRUNCATE * sigma + 0.5))
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = (kernel / kernel.sum()).float()
        self.radius = radius
        self.register_buffer("kx", kernel.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("ky", kernel.view(1, 1, -1, 1), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Blur ``(B, 1, H, W)`` maps."""
        r = self.radius
        maps = F.conv2d(F.pad(maps, (r, r, 0, 0), mode="reflect"), self.kx)
        return F.conv2d(F.pad(maps, (0, 0, r, r), mode="reflect"), self.ky)


class CadaHead(nn.Module):
    """Predicts each image's normal raw-map mean ``u`` and max ``gamma`` from backbone features.

    conv3x3 + ReLU, global average pool, dropout, Linear(C, hidden), ReLU, dropout,
    Linear(hidden, 2). The outputs are standardised: ``u = mean_u + std_u * a`` and
    ``gamma = u + gap * softplus(d)``, so ``gamma > u`` by construction. The three target
    statistics are buffers the trainer sets from its targets (identity until then).
    """

    def __init__(self, channels: int, cfg: CadaConfig) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc1 = nn.Linear(channels, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, 2)
        self.register_buffer("target_stats", torch.tensor([0.0, 1.0, 1.0]))  # mean_u, std_u, gap

    def standardised(self, features: torch.Tensor) -> torch.Tensor:
        """The head's raw ``(B, 2)`` outputs ``(a, d)`` for ``(B, C, H, W)`` level features."""
        x = F.relu(self.conv(features)).mean(dim=(2, 3))
        x = F.relu(self.fc1(self.drop(x)))
        return self.fc2(self.drop(x))

    def decode(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map standardised outputs to ``(u, gamma)``, each ``(B,)``."""
        mean_u, std_u, gap = self.target_stats.unbind(0)
        u = mean_u + std_u * out[:, 0]
        return u, u + gap * F.softplus(out[:, 1])

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode(self.standardised(features))


def calibrate(raw: torch.Tensor, u: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``(raw - u) / (gamma - u)`` per image: normal regions land near 0 mean and 1 max.

    Args:
        raw: ``(B, 1, H, W)`` raw anomaly maps.
        u, gamma: ``(B,)`` normal mean and max of each image's map.
    """
    spread = (gamma - u).clamp_min(_MIN_SPREAD)
    return (raw - u.view(-1, 1, 1, 1)) / spread.view(-1, 1, 1, 1)


def top_fraction_count(pixels: int, fraction: float) -> int:
    """How many pixels the top-``fraction`` mean uses (at least one)."""
    return max(1, int(math.ceil(fraction * pixels)))


def top_fraction_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Image score: mean of the top ``fraction`` pixels of each ``(B, 1, H, W)`` map -> ``(B,)``."""
    flat = maps.flatten(1)
    k = top_fraction_count(flat.shape[1], fraction)
    return flat.topk(k, dim=1).values.mean(1)
