"""Models: the MNIST MLP and the CIFAR VGG-16 (BatchNorm, global average pool).

Every hidden layer is a ``Block``: layer -> norm -> (+ alpha * P(x) soft skip) -> activation.
The soft skip and the SiLU blend of ``Activation`` are switched off (alpha = 0, t = 1) outside
post-pruning training, and then the forward pass is exactly the plain architecture's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .masks import MaskedConv2d, MaskedLinear
from .registry import MODELS


class _ReLUUnitGradAtZero(torch.autograd.Function):
    """ReLU whose derivative at exactly 0 is 1 (ZerO: many pre-activations start at 0)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x >= 0).to(grad.dtype)


class Activation(nn.Module):
    """(1 - t) * SiLU(x) + t * ReLU(x); t = 1 (the default) is the plain ReLU."""

    def __init__(self, unit_grad_at_zero: bool = False):
        super().__init__()
        self.unit_grad_at_zero = unit_grad_at_zero
        self.t = 1.0  # blend towards ReLU, set by the soft-activation schedule

    def relu(self, x: torch.Tensor) -> torch.Tensor:
        return _ReLUUnitGradAtZero.apply(x) if self.unit_grad_at_zero else F.relu(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.t >= 1.0:
            return self.relu(x)
        return (1.0 - self.t) * F.silu(x) + self.t * self.relu(x)


def match_width(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """The identity P(x) cropped or zero-padded to ``like``'s features/channels; None where the
    spatial shapes differ (no skip is possible there)."""
    if x.dim() != like.dim() or x.shape[2:] != like.shape[2:]:
        return None
    c_in, c_out = x.shape[1], like.shape[1]
    if c_in == c_out:
        return x
    if c_in > c_out:
        return x[:, :c_out]
    pad = [0, 0] * (x.dim() - 2) + [0, c_out - c_in]
    return F.pad(x, pad)


class Block(nn.Module):
    def __init__(self, layer: nn.Module, norm: nn.Module, act: Activation):
        super().__init__()
        self.layer, self.norm, self.act = layer, norm, act
        self.skip_alpha = 0.0  # soft-skip weight, set by the post-pruning schedule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.layer(x))
        if self.skip_alpha:
            skip = match_width(x, z)
            if skip is not None:
                z = z + self.skip_alpha * skip
        return self.act(z)


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, width: int, depth: int, linear, unit_grad: bool):
        super().__init__()
        dims = [in_features] + [width] * depth
        self.blocks = nn.ModuleList(
            Block(linear(a, b), nn.Identity(), Activation(unit_grad)) for a, b in zip(dims[:-1], dims[1:]))
        self.head = linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


VGG16_PLAN = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


class VGG(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, plan, width_mult: float, conv, linear, unit_grad: bool):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = max(1, int(round(item * width_mult)))
            layers.append(Block(conv(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), Activation(unit_grad)))
            c = out
        self.features = nn.Sequential(*layers)
        self.head = linear(c, num_classes)
        self.n_pools = sum(1 for item in plan if item == "M")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _layers(plain: bool):
    return (nn.Linear, nn.Conv2d) if plain else (MaskedLinear, MaskedConv2d)


@MODELS.register("mlp")
def mlp(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int, plain: bool = False,
        unit_grad_at_zero: bool = False) -> nn.Module:
    linear, _ = _layers(plain)
    return MLP(math.prod(in_shape), num_classes, cfg.width, cfg.depth, linear, unit_grad_at_zero)


@MODELS.register("vgg16")
def vgg16(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int, plain: bool = False,
          unit_grad_at_zero: bool = False) -> nn.Module:
    if len(in_shape) != 3 or min(in_shape[1:]) < 16:
        raise ValueError(f"model.name='vgg16' needs images of at least 16x16 pixels (4 max-pools); "
                         f"the data set gives inputs of shape {tuple(in_shape)}: use model.name=mlp")
    linear, conv = _layers(plain)
    return VGG(in_shape[0], num_classes, VGG16_PLAN, cfg.width_mult, conv, linear, unit_grad_at_zero)


def build(cfg: ModelConfig, in_shape, num_classes: int, plain: bool = False, unit_grad_at_zero: bool = False) -> nn.Module:
    return MODELS.get(cfg.name, "model.name")(cfg, tuple(in_shape), num_classes, plain, unit_grad_at_zero)


def soft_modules(model: nn.Module) -> tuple[list[Activation], list[Block]]:
    acts = [m for m in model.modules() if isinstance(m, Activation)]
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    return acts, blocks
