"""Masked layers and the helpers that keep pruned weights exactly zero.

A ``MaskedLinear``/``MaskedConv2d`` is an ``nn.Linear``/``nn.Conv2d`` whose forward pass uses
``weight * mask`` (and, during learned-mask pre-training, ``* m(score)``). The mask is a
non-persistent buffer, so the state dict has exactly the keys of the plain layer and loads
into the plain architecture. Masks travel as bool tensors keyed by parameter name.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Masked:
    weight: nn.Parameter
    weight_mask: torch.Tensor | None  # float 0/1 buffer (same dtype as weight) or None = dense
    mask_score: nn.Parameter | None  # learned-mask score (pre-training only), else None
    mask_kind = None  # learned_mask.MaskKind that maps the score to a soft mask
    mask_beta: float = 1.0  # sigmoid temperature of the learned mask

    def _init_mask_slots(self) -> None:
        self.register_buffer("weight_mask", None, persistent=False)
        self.mask_score = None

    def masked_weight(self) -> torch.Tensor:
        w = self.weight
        if self.mask_score is not None:
            w = w * self.mask_kind.forward_mask(self.mask_score, self.mask_beta)
        if self.weight_mask is not None:
            w = w * self.weight_mask
        return w


class MaskedLinear(nn.Linear, _Masked):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask_slots()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


class MaskedConv2d(nn.Conv2d, _Masked):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask_slots()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


PRUNABLE_TYPES = (nn.Linear, nn.Conv2d)


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Weight-parameter name -> layer, for every Linear/Conv layer (the prunable weights)."""
    return {f"{name}.weight" if name else "weight": m for name, m in model.named_modules()
            if isinstance(m, PRUNABLE_TYPES)}


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: layer.weight for name, layer in prunable_layers(model).items()}


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Bool masks by parameter name (all True for a layer without a mask)."""
    out = {}
    for name, layer in prunable_layers(model).items():
        mask = getattr(layer, "weight_mask", None)
        out[name] = torch.ones_like(layer.weight, dtype=torch.bool) if mask is None else mask.bool()
    return out


@torch.no_grad()
def set_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> None:
    """Install masks (bool, by parameter name) and zero the pruned weights; None removes them."""
    for name, layer in prunable_layers(model).items():
        if masks is None:
            layer.weight_mask = None
            continue
        mask = masks[name].to(device=layer.weight.device)
        if mask.shape != layer.weight.shape:
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, weight has {tuple(layer.weight.shape)}")
        layer.weight_mask = mask.to(layer.weight.dtype)
        layer.weight.mul_(layer.weight_mask)


_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@torch.no_grad()
def enforce_masks(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                  layers: list[nn.Module] | None = None) -> None:
    """Re-apply every mask after an optimizer step: pruned weights and their optimizer state -> 0.

    ``layers`` (``list(prunable_layers(model).values())``, built once) saves walking the model on
    every step; all multiplies go out as one ``_foreach_mul_``.
    """
    tensors, masks = [], []
    for layer in layers if layers is not None else prunable_layers(model).values():
        mask = getattr(layer, "weight_mask", None)
        if mask is None:
            continue
        tensors.append(layer.weight)
        masks.append(mask)
        state = optimizer.state.get(layer.weight) if optimizer is not None else None
        for key in _STATE_KEYS if state else ():
            if torch.is_tensor(state.get(key)):
                tensors.append(state[key])
                masks.append(mask)
    if tensors:
        torch._foreach_mul_(tensors, masks)


@torch.no_grad()
def zero_where(weight: torch.Tensor, where: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """Set ``weight`` and its optimizer state (momentum, Adam moments) to 0 at ``where``."""
    weight.masked_fill_(where, 0.0)
    state = optimizer.state.get(weight, {})
    for key in _STATE_KEYS:
        if torch.is_tensor(state.get(key)):
            state[key].masked_fill_(where, 0.0)


@contextlib.contextmanager
def masks_bypassed(model: nn.Module) -> Iterator[None]:
    """Forward with the raw weights (pruned ones are exactly 0, so outputs are unchanged) so that
    backward gives the dense gradient of every weight — what RigL grows by."""
    saved = {name: layer.weight_mask for name, layer in prunable_layers(model).items()
             if getattr(layer, "weight_mask", None) is not None}
    layers = prunable_layers(model)
    for name in saved:
        layers[name].weight_mask = None
    try:
        yield
    finally:
        for name, mask in saved.items():
            layers[name].weight_mask = mask


def count(masks: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(kept, total) over all masks."""
    kept = sum(int(m.sum()) for m in masks.values())
    return kept, sum(m.numel() for m in masks.values())


def layer_density(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(m.float().mean()) for name, m in masks.items()}
