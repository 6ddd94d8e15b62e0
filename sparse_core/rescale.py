"""Signal-preserving rescale after pruning a *trained* network (``prune.rescale``).

Pruning removes most of each unit's inputs while its bias stays: the linear part W x of every
pre-activation shrinks (by ~sqrt(density) for random pruning), the bias wins, and in a deep network
without normalisation the units die (random pruning of a trained digits MLP to 10 % ends at chance).
``sqrt`` multiplies each layer's kept weights by sqrt(kept before / kept after), the variance
argument of Kaiming init; ``data`` measures instead: on a fixed batch, each layer's kept weights are
scaled so that the std of its linear part equals what the unpruned network had there, layer by layer
in one forward pass (each layer sees the already-corrected output of the layers before it).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .masks import hooked_eval_forward, prunable_layers


def _bias(layer: nn.Module, out: torch.Tensor) -> torch.Tensor | float:
    if layer.bias is None:
        return 0.0
    return layer.bias.view(1, -1, *([1] * (out.dim() - 2)))


@torch.no_grad()
def linear_std(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Std of every prunable layer's linear part (output minus bias) on the batch ``x``, eval mode."""
    out: dict[str, float] = {}
    hooked_eval_forward(model, x, lambda m, o, name: out.__setitem__(name, float((o - _bias(m, o)).std())))
    return out


@torch.no_grad()
def recalibrate(model: nn.Module, x: torch.Tensor, reference: dict[str, float]) -> dict[str, float]:
    """Scale each prunable layer's weights so its linear-part std on ``x`` equals ``reference``; returns
    the factors. Layers with nothing left (std 0) keep factor 1."""
    scales: dict[str, float] = {}

    def hook(m, o, name):
        bias = _bias(m, o)
        std = float((o - bias).std())
        s = reference[name] / std if std > 0 and math.isfinite(std) and reference.get(name, 0) > 0 else 1.0
        scales[name] = s
        return (o - bias) * s + bias  # what the next layer sees: the corrected signal

    hooked_eval_forward(model, x, hook)
    layers = prunable_layers(model)
    for name, s in scales.items():
        layers[name].weight.mul_(s)
    return scales


@torch.no_grad()
def sqrt_density(model: nn.Module, before: dict[str, torch.Tensor] | None, after: dict[str, torch.Tensor]) -> dict[str, float]:
    """Multiply each layer's kept weights by sqrt(kept before / kept after) (before None = dense)."""
    scales = {}
    for name, layer in prunable_layers(model).items():
        kept = int(after[name].sum())
        prior = layer.weight.numel() if before is None else int(before[name].sum())
        scales[name] = math.sqrt(prior / kept) if kept else 1.0
        layer.weight.mul_(scales[name])
    return scales
