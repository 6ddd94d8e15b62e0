"""Pruning scores, registered by their paper's name. Higher score = keep.

Every scorer has the signature ``score(model, inputs) -> {param name: score tensor}`` and never
changes the model it scores: the ones that run forward/backward passes work on a deep copy in
eval mode (BatchNorm statistics untouched), SynFlow's absolute values live only in its copy.
Pruned weights (already 0 under their mask) score as they come out; ``pruning`` makes sure they
stay pruned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import learned_mask
from .config import PruneConfig
from .masks import prunable_weights
from .registry import PRUNERS


@dataclass
class ScoreInputs:
    x: torch.Tensor | None  # fixed, seeded scoring batch (snip, grasp); None where unused
    y: torch.Tensor | None
    in_shape: tuple[int, ...]  # one input's shape (synflow's all-ones input)
    generator: torch.Generator  # the pruning generator (random)
    cfg: PruneConfig


def _scoring_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    clone = copy.deepcopy(model)
    if dtype is not None:
        clone = clone.to(dtype)
    clone.eval()  # BatchNorm uses running statistics; the original's are never touched
    for p in clone.parameters():
        p.requires_grad_(False)
    for w in prunable_weights(clone).values():
        w.requires_grad_(True)
        w.grad = None
    return clone


@PRUNERS.register("magnitude")
@torch.no_grad()
def magnitude(model: nn.Module, inputs: ScoreInputs) -> dict[str, torch.Tensor]:
    """|w| (after pre-training: magnitude pruning; at init: 'magnitude at init')."""
    return {name: w.detach().abs().clone() for name, w in prunable_weights(model).items()}


@PRUNERS.register("mask")
@torch.no_grad()
def mask(model: nn.Module, inputs: ScoreInputs) -> dict[str, torch.Tensor]:
    """|w * m|, m the learned mask value (sigmoid(beta s) or the binary gate). After the first pruning round
    the mask is folded into the weights (w <- w * m), so later rounds score |w|, the same quantity."""
    values = learned_mask.values(model)  # empty once folded into the weights (rounds after the first)
    return {name: (w.detach() * values[name] if values else w.detach()).abs()
            for name, w in prunable_weights(model).items()}


# rescale="data": random pruning of a trained digits MLP to 10 % ends at chance without it (validation
# accuracy 11.1 %) and at 97.2 % with it (seed 0). Where it was not shown to help, pruners keep "none":
# SNIP at 10 % lost 2.8 points of validation accuracy with it (86.1 -> 83.3), magnitude gained one image (0.7).
@PRUNERS.register("random", rescale="data")
@torch.no_grad()
def random(model: nn.Module, inputs: ScoreInputs) -> dict[str, torch.Tensor]:
    """Uniform random scores from the pruning generator."""
    return {name: torch.rand(w.shape, generator=inputs.generator).to(w.device)
            for name, w in prunable_weights(model).items()}


@PRUNERS.register("snip", needs_data=True)
def snip(model: nn.Module, inputs: ScoreInputs) -> dict[str, torch.Tensor]:
    """SNIP (Lee et al. 2019): |dL/dw * w| on the fixed scoring batch."""
    clone = _scoring_copy(model)
    F.cross_entropy(clone(inputs.x), inputs.y).backward()
    return {name: (w.grad * w).detach().abs() for name, w in prunable_weights(clone).items()}


@PRUNERS.register("grasp", needs_data=True)
def grasp(model: nn.Module, inputs: ScoreInputs) -> dict[str, torch.Tensor]:
    """GraSP (Wang et al. 2020): signed (H g) * w at temperature T; the LOWEST are pruned
    (removing them reduces gradient flow the least), as in the Synaptic-Flow reference code."""
    clone = _scoring_copy(model)
    weights = list(prunable_weights(clone).values())
    temp = inputs.cfg.grasp_temperature
    loss = F.cross_entropy(clone(inputs.x) / temp, inputs.y)
    g_stop = [g.detach() for g in torch.autograd.grad(loss, weights)]
    loss = F.cross_entropy(clone(inputs.x) / temp, inputs.y)
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    z = sum((g * s).sum() for g, s in zip(grads, g_stop))
    hg = torch.autograd.grad(z, weights)
    return {name: (h * w).detach() for (name, w), h in zip(prunable_weights(clone).items(), hg)}


@PRUNERS.register("synflow")
def synflow(model: nn.Module, inputs: ScoreInputs) -> dict[str, torch.Tensor]:
    """SynFlow (Tanaka et al. 2020), data-free: in a float64 copy with every parameter and buffer
    made non-negative, R = sum(f(1)); score |dR/dw * w|. The original keeps its signs. A model with a
    ``synflow_forward`` is scored through it instead of its forward (the ViT: docs/vit.md)."""
    clone = _scoring_copy(model, torch.float64)
    learned_mask.fold(clone)  # score the effective network w * m; |s| would change m
    with torch.no_grad():
        for t in list(clone.parameters()) + list(clone.buffers()):
            if t.is_floating_point():
                t.abs_()
    ones = torch.ones((1, *inputs.in_shape), dtype=torch.float64, device=next(clone.parameters()).device)
    # a model whose normalisations would make the score degenerate defines the network SynFlow scores (vit.py)
    getattr(clone, "synflow_forward", clone)(ones).sum().backward()
    return {name: (w.grad * w).detach().abs().float() for name, w in prunable_weights(clone).items()}


def score(name: str, model: nn.Module, inputs: ScoreInputs) -> dict[str, torch.Tensor]:
    return PRUNERS.get(name, "prune.pruner")(model, inputs)


def rescale_after_training(name: str) -> str:
    """What ``prune.rescale=auto`` means for pruner ``name`` (its registered ``rescale``, default none)."""
    return PRUNERS.meta(name, "prune.pruner").get("rescale", "none")


def needs_data(name: str) -> bool:
    """Whether pruner ``name`` scores on a batch of training data (registered with ``needs_data=True``)."""
    return bool(PRUNERS.meta(name, "prune.pruner").get("needs_data", False))
