"""RigL (Evci et al. 2020): dynamic sparse training from a random sparse start.

Every ``delta_t`` optimizer steps until ``end_fraction`` of training, in each layer: drop the
n = f(t) * active smallest-|w| active weights and grow the n inactive ones with the largest
|dense gradient|; f(t) = alpha / 2 * (1 + cos(pi t / T_end)). Grown weights start at 0 with zero
optimizer state. Per-layer counts never change.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import RiglConfig
from .masks import prunable_weights, zero_where
from .pruning import masks_from_scores


def initial_masks(model: nn.Module, density: float, cfg: RiglConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random sparse start at the target density, ERK or uniform per-layer densities."""
    scores = {n: torch.rand(w.shape, generator=generator).to(w.device) for n, w in prunable_weights(model).items()}
    return masks_from_scores(scores, density, "erk" if cfg.distribution == "erk" else "layerwise")


class RigL:
    def __init__(self, cfg: RiglConfig, total_steps: int):
        self.cfg = cfg
        self.t_end = int(cfg.end_fraction * total_steps)
        self.regrown = 0  # connections grown so far (a sanity figure for the log)

    def drop_fraction(self, step: int) -> float:
        return self.cfg.alpha / 2 * (1 + math.cos(math.pi * step / self.t_end)) if self.t_end else 0.0

    def is_update_step(self, step: int) -> bool:
        """``step`` counts optimizer steps from 1; updates happen every delta_t before T_end."""
        return step % self.cfg.delta_t == 0 and step < self.t_end

    @torch.no_grad()
    def update(self, model: nn.Module, masks: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               step: int) -> dict[str, torch.Tensor]:
        """New masks after one drop/grow; needs the dense gradient in ``w.grad``."""
        frac = self.drop_fraction(step)
        new_masks = {}
        for name, w in prunable_weights(model).items():
            mask = masks[name]
            active = int(mask.sum())
            n = min(int(frac * active), mask.numel() - active)
            if n <= 0 or w.grad is None:
                new_masks[name] = mask
                continue
            flat_mask = mask.flatten()
            # drop: the n active weights of smallest magnitude (inactive ones can't be picked)
            drop_score = torch.where(flat_mask, w.abs().flatten(), torch.full_like(w.flatten(), math.inf))
            drop = torch.sort(drop_score, stable=True).indices[:n]
            after_drop = flat_mask.clone()
            after_drop[drop] = False
            # grow: the n weights not active after the drop with the largest |dense gradient|
            grow_score = torch.where(after_drop, torch.full_like(w.flatten(), -math.inf), w.grad.abs().flatten())
            grow = torch.sort(grow_score, descending=True, stable=True).indices[:n]
            new = after_drop.clone()
            new[grow] = True
            newly = new & ~flat_mask
            self.regrown += int(newly.sum())
            # grown weights start at exactly 0 with zero optimizer state (also regrown-just-dropped ones)
            zero_where(w, (new & ~after_drop).view_as(w), optimizer)
            new_masks[name] = new.view_as(mask)
        return new_masks
