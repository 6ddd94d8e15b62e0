"""Masked layers and the helpers that keep pruned weights exactly zero.

A ``MaskedLinear``/``MaskedConv2d`` is an ``nn.Linear``/``nn.Conv2d`` whose forward pass uses
``weight * mask`` (and, during learned-mask pre-training, ``* m(score)``). The mask is a
non-persistent buffer, so the state dict has exactly the keys of the plain layer and loads
into the plain architecture. Masks travel as bool tensors keyed by parameter name.
"""

from __future__ import annotations

import contextlib
import weakref

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
        if _EFFECTIVE.on:  # the weight handed in is already the effective one (a derived packed forward)
            return self.weight
        return masked_weight(self.weight, self.weight_mask, self.mask_kind, self.mask_score, self.mask_beta)


class _Effective:
    on = False


_EFFECTIVE = _Effective()


@contextlib.contextmanager
def effective_weights():
    """Within: a masked layer's ``weight`` is taken as its effective weight (``masked_weight`` of the
    stacked weights, computed once by the trainer), not masked again."""
    _EFFECTIVE.on = True
    try:
        yield
    finally:
        _EFFECTIVE.on = False


class _ZeroedMasked(torch.autograd.Function):
    """``w * mask`` where ``w`` is already exactly 0 wherever ``mask`` is 0: the forward is ``w`` itself
    (bitwise what the product gives: w * 1 = w, (+-0) * 0 = +-0), the backward ``grad * mask`` (the
    product's gradient) written in ``w``'s own layout, so the gradient is accumulated without a copy."""

    @staticmethod
    def forward(ctx, w, mask):
        ctx.save_for_backward(mask)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return torch.mul(grad, mask, out=torch.empty_like(mask)), None


def masked_weight(w: torch.Tensor, mask: torch.Tensor | None, kind=None, score: torch.Tensor | None = None,
                  beta: float = 1.0, noise: torch.Tensor | None = None, zeroed: bool = False) -> torch.Tensor:
    """The effective weight of a prunable layer: w * m(score) (a learned mask, ``noise`` its draws) * mask.
    The one place it is computed: a layer's forward and the trainer's packed forward (stacked copies) use it.
    ``zeroed``: the caller guarantees ``w`` is exactly 0 where ``mask`` is 0 (the trainer's enforced
    invariant), so the product is ``w`` and only its gradient is masked (``_ZeroedMasked``)."""
    if score is not None:
        w = w * kind.forward_mask(score, beta, noise)
    elif zeroed and mask is not None:
        return _ZeroedMasked.apply(w, mask)
    if mask is not None:
        w = w * mask
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


def declared_prunable(model: nn.Module) -> list[str]:
    """The names of the model's prunable layers: what ``model.prunable_layers()`` declares (a layer of
    any type with a ``weight`` and, to be pruned, the masked-layer slots of ``_Masked``), by default
    every Linear/Conv layer."""
    declare = getattr(model, "prunable_layers", None)
    if declare is not None:
        return list(declare())
    return [name for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]


_PRUNABLE: "weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]]" = weakref.WeakKeyDictionary()


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Weight-parameter name -> layer, for every layer the model declares prunable (``declared_prunable``).
    Found once per model object and kept while the model lives (models are never restructured; the
    learned mask asks for them at every training step); a copy of the dict is returned."""
    found = _PRUNABLE.get(model)
    if found is None:
        modules = dict(model.named_modules())
        found = {f"{name}.weight" if name else "weight": modules[name] for name in declared_prunable(model)}
        _PRUNABLE[model] = found
    return dict(found)


def hooked_eval_forward(model: nn.Module, x: torch.Tensor, hook) -> None:
    """One eval-mode forward pass of ``x`` with ``hook(layer, output, name)`` on every prunable layer (its return
    value, if not None, replaces the layer's output); the hooks are removed and the model's mode restored."""
    hooks = [layer.register_forward_hook(lambda m, i, o, name=name: hook(m, o, name))
             for name, layer in prunable_layers(model).items()]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


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
def zero_where(weight: torch.Tensor, where: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """Set ``weight`` and its optimizer state (momentum, Adam moments) to 0 at ``where``."""
    weight.masked_fill_(where, 0.0)
    state = optimizer.state.get(weight, {})
    for key in _STATE_KEYS:
        if torch.is_tensor(state.get(key)):
            state[key].masked_fill_(where, 0.0)


def count(masks: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(kept, total) over all masks."""
    kept = sum(int(m.sum()) for m in masks.values())
    return kept, sum(m.numel() for m in masks.values())


def layer_density(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(m.float().mean()) for name, m in masks.items()}
