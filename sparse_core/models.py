"""Models: the MNIST MLP and the CIFAR VGG-16 (BatchNorm, global average pool).

Every hidden layer is a ``Block``: layer -> norm -> (+ alpha * P(x) soft skip) -> activation.
The soft skip and the SiLU blend of ``Activation`` are switched off (alpha = 0, t = 1) outside
post-pruning training, and then the forward pass is exactly the plain architecture's.

``packed_forward`` runs K copies of a model at once (``sparse_core.packed``): every parameter is
stacked with a leading copy dimension, each copy sees its own batch, and a Linear layer is one
``baddbmm`` over the copies, a Conv layer one grouped convolution (channels of copy k are group k).
The module itself only lends its structure and its soft-schedule values (shared by the copies).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from .config import ModelConfig
from .masks import MaskedConv2d, MaskedLinear, declared_prunable, effective_weights
from .registry import MODELS


class _ReLUUnitGradAtZero(torch.autograd.Function):
    """ReLU whose derivative at exactly 0 is 1 (ZerO: many pre-activations start at 0). The backward keeps
    the gradient where x >= 0, i.e. where x > -(the smallest subnormal): one ``threshold_backward`` (ReLU's
    own kernel), bitwise ``grad * (x >= 0)`` for every non-NaN x, without a bool mask and its float copy."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        info = torch.finfo(x.dtype)  # the smallest subnormal of x's type: smallest normal x epsilon
        return torch.ops.aten.threshold_backward(grad, x, -info.smallest_normal * info.eps)


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
        # SiLU in float64, rounded back: in a pack, copy k's activations sit at other positions of the
        # vectorised kernel than in a single run, and float32 SiLU differs by an ulp between its vector
        # body and its scalar tail (see learned_mask._sigmoid)
        silu = F.silu(x.double()).to(x.dtype) if x.dtype == torch.float32 else F.silu(x)
        return (1.0 - self.t) * silu + self.t * self.relu(x)


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


def packed_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """K linear layers at once: h (K, B, in), weight (K, out, in), bias (K, out) or None."""
    if bias is None:
        return torch.bmm(h, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))


def match_last(x: torch.Tensor, width: int) -> torch.Tensor:
    """``match_width`` on the last dimension (packed MLP features are (K, B, F))."""
    if x.shape[-1] >= width:
        return x[..., :width]
    return F.pad(x, [0, width - x.shape[-1]])


class MLP(nn.Module):
    packed_eval = True  # its packed forward has no train/eval-mode layer: the trainer evaluates copies packed

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

    def packed_forward(self, x: torch.Tensor, weight, param, channels_last: bool = False) -> torch.Tensor:
        """x (K, B, ...) -> logits (K, B, classes); ``weight(prefix)`` is the stacked effective weight
        of a prunable layer, ``param(name)`` any other stacked parameter (None if absent)."""
        h = x.flatten(2)
        for i, block in enumerate(self.blocks):
            z = packed_linear(h, weight(f"blocks.{i}.layer"), param(f"blocks.{i}.layer.bias"))
            if block.skip_alpha:
                z = z + block.skip_alpha * match_last(h, z.shape[-1])
            h = block.act(z)
        return packed_linear(h, weight("head"), param("head.bias"))


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

    def packed_forward(self, x: torch.Tensor, weight, param, channels_last: bool = False) -> torch.Tensor:
        """x (K, B, C, H, W) -> logits (K, B, classes): copy k's channels are group k of every
        convolution (layout (B, K * C, H, W)) and of BatchNorm (stacked running statistics);
        ``channels_last``: the activations in channels-last memory format (``train.channels_last``)."""
        k, b = x.shape[:2]
        h = x.transpose(0, 1).reshape(b, -1, *x.shape[3:])
        if channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        for i, m in enumerate(self.features):
            if not isinstance(m, Block):
                h = m(h)  # max-pool: per channel
                continue
            w = weight(f"features.{i}.layer")  # (K, out, in, kh, kw)
            conv = m.layer
            z = F.conv2d(h, w.reshape(-1, *w.shape[2:]), None, conv.stride, conv.padding, conv.dilation, groups=k)
            z = _packed_batch_norm(z, m.norm, f"features.{i}.norm", param)
            if m.skip_alpha and h.shape[2:] == z.shape[2:]:
                src = h.view(b, k, -1, *h.shape[2:]).movedim(2, -1)
                z = z + m.skip_alpha * match_last(src, w.shape[1]).movedim(-1, 2).reshape(z.shape)
            h = m.act(z)
        pooled = F.adaptive_avg_pool2d(h, 1).view(b, k, -1).transpose(0, 1)  # (K, B, C)
        return packed_linear(pooled, weight("head"), param("head.bias"))


def _packed_batch_norm(z: torch.Tensor, bn: nn.BatchNorm2d, prefix: str, param) -> torch.Tensor:
    """BatchNorm2d of K copies in the grouped layout; running statistics update in place in the stacks."""
    mean, var = param(f"{prefix}.running_mean"), param(f"{prefix}.running_var")
    if bn.training and bn.track_running_stats:
        if bn.momentum is None:
            raise ValueError("packed BatchNorm needs a momentum (the cumulative average is per copy)")
        param(f"{prefix}.num_batches_tracked").add_(1)
    use_batch = bn.training or mean is None
    return F.batch_norm(z, None if mean is None else mean.view(-1), None if var is None else var.view(-1),
                        param(f"{prefix}.weight").view(-1), param(f"{prefix}.bias").view(-1),
                        use_batch, bn.momentum or 0.0, bn.eps)


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


def derived_packed_forward(model: nn.Module, x: torch.Tensor, weight, param,
                           channels_last: bool = False) -> torch.Tensor:
    """The packed forward of any model, derived from its one ``forward``: ``vmap`` over the copies of
    ``functional_call`` with each copy's slice of the stacks; a prunable layer's weight is its stacked
    effective weight ``weight(prefix)`` (``masks.effective_weights``). A model may define its own
    ``packed_forward(x, weight, param, channels_last)`` as a fast path (the MLP's and VGG's), checked
    against this one in tests/test_model_contract.py."""
    prunable = {f"{n}.weight" if n else "weight" for n in declared_prunable(model)}
    tensors = {}
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        if name.rpartition(".")[2] in ("weight_mask", "mask_score"):
            continue
        tensors[name] = weight(name[:-len(".weight")]) if name in prunable else param(name)
    with effective_weights():
        return vmap(lambda t, xk: functional_call(model, t, (xk,)), randomness="different")(tensors, x)


def soft_modules(model: nn.Module) -> tuple[list[Activation], list[Block]]:
    acts = [m for m in model.modules() if isinstance(m, Activation)]
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    return acts, blocks
