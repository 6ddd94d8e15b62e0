"""RigL (Evci et al. 2020): dynamic sparse training from a sparse start.

Every ``delta_t`` optimizer steps until ``end_fraction`` of training, in each layer: drop the
n = f(t) * active smallest-|w| active weights and grow the n inactive ones with the largest
|dense gradient|; f(t) = alpha / 2 * (1 + cos(pi t / T_end)). Grown weights start at 0 with zero
optimizer state (as jaxpruner resets them). Per-layer counts never change in a drop/grow.

The start (``rigl.start``, set up by the trainer): a random mask (ERK or uniform), or a pruner's mask of
the network at init: a random start at 1 % leaves most units of a 6-layer MLP without any input. With
``rigl.start_density`` above the target, GraNet's gradual variant (Liu et al. 2021): start denser and, at
each drop/grow update, first prune by magnitude to the density of a cubic schedule that reaches the
target at the last update.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import RiglConfig
from .masks import prunable_weights, zero_where
from .pruning import first_k, masks_from_scores


def initial_masks(model: nn.Module, density: float, cfg: RiglConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random sparse start at the target density, ERK or uniform per-layer densities."""
    scores = {n: torch.rand(w.shape, generator=generator).to(w.device) for n, w in prunable_weights(model).items()}
    return masks_from_scores(scores, density, "erk" if cfg.distribution == "erk" else "layerwise")


class RigL:
    def __init__(self, cfg: RiglConfig, total_steps: int, density: float = 1.0, scope: str = "global"):
        self.cfg = cfg
        self.t_end = int(cfg.end_fraction * total_steps)
        self.regrown = 0  # connections grown so far (a sanity figure for the log)
        self.density, self.scope = density, scope
        self.start = max(cfg.start_density, density)
        self.updates = list(range(cfg.delta_t, self.t_end, cfg.delta_t))  # the optimizer steps that update
        if self.start > density and not self.updates:
            raise ValueError(f"rigl.start_density={cfg.start_density} needs drop/grow updates to prune on, and "
                             f"{total_steps} steps with rigl.delta_t={cfg.delta_t} have none: lower rigl.delta_t")

    def density_at(self, step: int) -> float:
        """The gradual variant's density after the update at ``step``: cubic from the start density to the
        target over the updates (Zhu & Gupta's schedule), exactly the target from the last one on."""
        done = sum(1 for s in self.updates if s <= step)
        frac = done / len(self.updates) if self.updates else 1.0
        return self.density + (self.start - self.density) * (1.0 - frac) ** 3

    @torch.no_grad()
    def _prune_to(self, model: nn.Module, masks: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
        """Keep the largest-|w| active weights at ``density`` (pruned ones stay pruned)."""
        scores = {n: w.detach().abs() for n, w in prunable_weights(model).items()}
        return masks_from_scores(scores, density, self.scope, previous=masks)

    def drop_fraction(self, step: int) -> float:
        return self.cfg.alpha / 2 * (1 + math.cos(math.pi * step / self.t_end)) if self.t_end else 0.0

    def is_update_step(self, step: int) -> bool:
        """``step`` counts optimizer steps from 1; updates happen every delta_t before T_end."""
        return step % self.cfg.delta_t == 0 and step < self.t_end

    @torch.no_grad()
    def update(self, model: nn.Module, masks: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               step: int) -> dict[str, torch.Tensor]:
        """New masks after one drop/grow (the gradual variant prunes first); needs the dense gradient in
        ``w.grad``."""
        if self.start > self.density:
            masks = self._prune_to(model, masks, self.density_at(step))
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
            after_drop = flat_mask & ~first_k(drop_score, n, largest=False)
            # grow: the n weights not active after the drop with the largest |dense gradient|
            grow_score = torch.where(after_drop, torch.full_like(w.flatten(), -math.inf), w.grad.abs().flatten())
            new = after_drop | first_k(grow_score, n)
            newly = new & ~flat_mask
            self.regrown += int(newly.sum())
            # grown weights start at exactly 0 with zero optimizer state (also regrown-just-dropped ones)
            zero_where(w, (new & ~after_drop).view_as(w), optimizer)
            new_masks[name] = new.view_as(mask)
        return new_masks
