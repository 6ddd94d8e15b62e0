"""Post-pruning training tricks: label smoothing, soft activation, soft skip connections.

The soft schedules run over the first ``post.soft_fraction`` of post-training (measured in
optimizer steps); after that t = 1 (plain ReLU) and alpha = 0 (no skips), so the trained network
is exactly the plain architecture.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PostConfig
from .models import soft_modules


def smoothed_targets(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """1 - a on the true class and a / (C - 1) on every other class (PyTorch's built-in spreads
    a / C over all classes, the true one included)."""
    q = torch.full((y.shape[0], num_classes), smoothing / (num_classes - 1), device=y.device)
    q.scatter_(1, y[:, None], 1.0 - smoothing)
    return q


def smoothed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    q = smoothed_targets(y, logits.shape[1], smoothing).to(logits.dtype)
    return -(q * F.log_softmax(logits, dim=1)).sum(1).mean()


def soft_state(progress: float, cfg: PostConfig) -> tuple[float, float]:
    """(t, alpha) at ``progress`` in [0, 1] of post-training: t rises 0 -> 1 and alpha falls
    alpha0 -> 0 linearly over the first soft_fraction, then stay at 1 and 0."""
    frac = min(max(progress / cfg.soft_fraction, 0.0), 1.0)
    t = frac if cfg.soft_activation else 1.0
    alpha = cfg.skip_alpha0 * (1.0 - frac) if cfg.soft_skip else 0.0
    return t, alpha


class SoftSchedule:
    """Sets every Activation's t and every Block's skip alpha at each post-training step."""

    def __init__(self, model: nn.Module, cfg: PostConfig, total_steps: int):
        self.acts, self.blocks = soft_modules(model)
        self.cfg, self.total = cfg, max(total_steps, 1)
        self.active = cfg.soft_activation or cfg.soft_skip
        self._last: tuple[float, float] | None = None

    def set(self, step: int) -> tuple[float, float]:
        t, alpha = soft_state(step / self.total, self.cfg) if self.active else (1.0, 0.0)
        if (t, alpha) != self._last:  # nothing to write on most steps once the schedule has ended
            for a in self.acts:
                a.t = t
            for b in self.blocks:
                b.skip_alpha = alpha
            self._last = (t, alpha)
        return t, alpha

    @property
    def current(self) -> tuple[float, float] | None:
        """(t, alpha) as last set, None before the first step."""
        return self._last


def make_plain(model: nn.Module) -> None:
    """Turn every soft trick off (t = 1, alpha = 0): the plain network."""
    acts, blocks = soft_modules(model)
    for a in acts:
        a.t = 1.0
    for b in blocks:
        b.skip_alpha = 0.0
