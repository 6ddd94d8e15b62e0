"""A small vision transformer (``model.name=vit``) whose every projection is a prunable Linear.

Patches of ``model.patch`` x ``model.patch`` pixels (0 = 2 for images of at most 16 pixels a side, else 4: digits
8x8 -> 16 tokens, CIFAR-10 32x32 -> 64) are flattened and embedded by one Linear (``embed``), a learned position
embedding is added (``pos``, initialised deterministically with the sine/cosine table, so no init draws it), then
``model.depth`` pre-norm blocks of width ``model.width``:

    z = z + out(attention(q(LN1 z), k(LN1 z), v(LN1 z)))      model.heads heads, softmax(q k^T / sqrt(d_head)) v
    z = z + fc2(fc1(LN2 z))                                    fc1 = Block(Linear(D, 2 D), GELU), fc2 Linear(2 D, D)

and the head reads the mean of the final LayerNorm's tokens (mean pooling, no class token: one parameter and one
token fewer, and as accurate as a class token for small ViTs, Beyer et al. 2022 "Better plain ViT baselines").
Prunable layers (``masks.prunable_layers``): ``embed``, ``blocks.i.attn.{q,k,v,out}``, ``blocks.i.fc1.layer``,
``blocks.i.fc2``, ``head``; LayerNorms and ``pos`` are dense and unpruned. Every Linear runs on a (tokens, features)
matrix, so a layer's forward hook sees the 2-D output that FLOP counting and ``prune.rescale=data`` read.

The post-pruning tricks (``sparse_core.post_prune``) act through the MLP's ``fc1`` Block: ``post.soft_activation``
blends (1 - t) SiLU + t GELU (SiLU = x sigmoid(x) is the softer gate of the family x sigmoid(a x) that has GELU at
a ~ 1.7 and ReLU at a -> inf, so the trick still runs from a softer gate to the plain one); ``post.soft_skip`` adds
the decaying alpha P(x) around ``fc1`` (the only layer followed by an activation; every block is already bypassed
by its residual, which stays). ``packed_forward`` runs K copies as the MLP's does (``models.packed_forward``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .masks import MaskedLinear
from .models import Activation, Block, match_last, packed_linear
from .registry import MODELS

MLP_RATIO = 2  # hidden units of a block's MLP per embedding unit (a ViT's usual 4 is twice the laptop budget)


class GELUActivation(Activation):
    """(1 - t) SiLU + t GELU (``Activation`` with GELU for its plain branch); t = 1 is the plain GELU."""

    def relu(self, x: torch.Tensor) -> torch.Tensor:
        # float64, rounded back, as Activation's SiLU: a copy of a pack sits at other positions of the vectorised
        # float32 kernel than its single run (an ulp apart between vector body and scalar tail)
        return F.gelu(x.double()).to(x.dtype) if x.dtype == torch.float32 else F.gelu(x)


def patch_side(cfg: ModelConfig, in_shape: tuple[int, ...]) -> int:
    return cfg.patch or (2 if max(in_shape[1:]) <= 16 else 4)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Images (N, C, H, W) -> patches (N * T, C * p * p), tokens in raster order."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n * (h // p) * (w // p), c * p * p)


def sincos(tokens: int, dim: int) -> torch.Tensor:
    """The transformer's sine/cosine position table (tokens, dim)."""
    pos = torch.arange(tokens, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(tokens, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table.float()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, heads: int) -> torch.Tensor:
    """Multi-head softmax attention of n sequences: q, k, v (n * T, D) -> (n * T, D). Written out (no fused kernel,
    whose choice could depend on the batch size): a copy of a pack computes what its single run does."""
    d = q.shape[-1]

    def split(z: torch.Tensor) -> torch.Tensor:
        return z.reshape(n, -1, heads, d // heads).transpose(1, 2)  # (n, heads, T, d_head)

    scores = split(q) @ split(k).transpose(-1, -2) * (d // heads) ** -0.5
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(-1, d)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, linear):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (linear(dim, dim) for _ in range(4))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, linear):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, linear)
        self.fc1 = Block(linear(dim, MLP_RATIO * dim), nn.Identity(), GELUActivation())
        self.fc2 = linear(MLP_RATIO * dim, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n, t, d = z.shape
        h = self.norm1(z).reshape(n * t, d)
        a = self.attn
        z = z + a.out(attend(a.q(h), a.k(h), a.v(h), n, a.heads)).view(n, t, d)
        return z + self.fc2(self.fc1(self.norm2(z).reshape(n * t, d))).view(n, t, d)


def _packed_norm(z: torch.Tensor, prefix: str, param, eps: float) -> torch.Tensor:
    """LayerNorm of K copies: z (K, ..., D), each copy with its own affine (K, D)."""
    w, b = param(f"{prefix}.weight"), param(f"{prefix}.bias")
    shape = (w.shape[0],) + (1,) * (z.dim() - 2) + (w.shape[1],)
    return torch.addcmul(b.view(shape), F.layer_norm(z, z.shape[-1:], eps=eps), w.view(shape))


def _affine(norm: nn.LayerNorm, z: torch.Tensor) -> torch.Tensor:
    return z * norm.weight + norm.bias


class ViT(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int, dim: int, depth: int, heads: int, patch: int,
                 linear):
        super().__init__()
        c, h, w = in_shape
        self.patch, self.tokens, self.dim = patch, (h // patch) * (w // patch), dim
        self.embed = linear(c * patch * patch, dim)
        self.pos = nn.Parameter(sincos(self.tokens, dim))
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, linear) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        z = self.embed(patchify(x, self.patch)).view(n, self.tokens, self.dim) + self.pos
        for block in self.blocks:
            z = block(z)
        return self.head(self.norm(z).mean(1))

    def synflow_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network SynFlow scores (``pruners.synflow``, all weights made nonnegative): every LayerNorm its affine
        part only, the softmax the unnormalised scores q k^T / (sqrt(d_head) T), GELU the identity (what ReLU is on
        nonnegative signals). Through LayerNorm and softmax the score is degenerate: their outputs do not grow with
        the weights before them, so q and k (seen only through a softmax of identical all-ones tokens) get ~1/1000
        of the other layers' score and 1 % by 20 rounds removes them all (docs/vit.md). Here R is a sum over paths
        of products of |w|, a path through attention crossing one q, one k and one v weight."""
        n = x.shape[0]
        z = self.embed(patchify(x, self.patch)).view(n, self.tokens, self.dim) + self.pos
        for block in self.blocks:
            _, t, d = z.shape
            a, heads = block.attn, block.attn.heads
            h = _affine(block.norm1, z).reshape(n * t, d)
            q, k, v = (u.reshape(n, t, heads, d // heads).transpose(1, 2) for u in (a.q(h), a.k(h), a.v(h)))
            s = q @ k.transpose(-1, -2) * ((d // heads) ** -0.5 / t)
            z = z + a.out((s @ v).transpose(1, 2).reshape(n * t, d)).view(n, t, d)
            z = z + block.fc2(block.fc1.layer(_affine(block.norm2, z).reshape(n * t, d))).view(n, t, d)
        return self.head(_affine(self.norm, z).mean(1))

    def packed_forward(self, x: torch.Tensor, weight, param, channels_last: bool = False) -> torch.Tensor:
        """x (K, B, C, H, W) -> logits (K, B, classes); ``weight(prefix)`` is a prunable layer's stacked effective
        weight, ``param(name)`` any other stacked parameter (``models.MLP.packed_forward``'s contract)."""
        k, b, t, d = x.shape[0], x.shape[1], self.tokens, self.dim

        def lin(h: torch.Tensor, prefix: str) -> torch.Tensor:  # (K, rows, in) -> (K, rows, out)
            return packed_linear(h, weight(prefix), param(f"{prefix}.bias"))

        z = lin(patchify(x.flatten(0, 1), self.patch).view(k, b * t, -1), "embed").view(k, b, t, d)
        z = z + param("pos")[:, None]
        for i, block in enumerate(self.blocks):
            pre = f"blocks.{i}"
            h = _packed_norm(z, f"{pre}.norm1", param, block.norm1.eps).view(k, b * t, d)
            heads = block.attn.heads
            a = attend(lin(h, f"{pre}.attn.q").view(k * b * t, d), lin(h, f"{pre}.attn.k").view(k * b * t, d),
                       lin(h, f"{pre}.attn.v").view(k * b * t, d), k * b, heads)
            z = z + lin(a.view(k, b * t, d), f"{pre}.attn.out").view(k, b, t, d)
            h = _packed_norm(z, f"{pre}.norm2", param, block.norm2.eps).view(k, b * t, d)
            u = lin(h, f"{pre}.fc1.layer")
            if block.fc1.skip_alpha:
                u = u + block.fc1.skip_alpha * match_last(h, u.shape[-1])
            z = z + lin(block.fc1.act(u), f"{pre}.fc2").view(k, b, t, d)
        pooled = _packed_norm(z, "norm", param, self.norm.eps).mean(2)  # (K, B, D)
        return lin(pooled, "head")


@MODELS.register("vit")
def vit(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int, plain: bool = False,
        unit_grad_at_zero: bool = False) -> nn.Module:
    """``unit_grad_at_zero`` (ZerO's ReLU derivative at 0) does not apply: GELU'(0) = 1/2 is already nonzero."""
    if len(in_shape) != 3:
        raise ValueError(f"model.name='vit' needs images (C, H, W); the data set gives inputs of shape "
                         f"{tuple(in_shape)}: use model.name=mlp")
    p = patch_side(cfg, in_shape)
    if in_shape[1] % p or in_shape[2] % p:
        raise ValueError(f"model.patch={p} does not divide the {in_shape[1]}x{in_shape[2]} images; choose a "
                         f"divisor of both sides (e.g. 2 or 4)")
    if cfg.width % cfg.heads:
        raise ValueError(f"model.heads={cfg.heads} does not divide model.width={cfg.width} (the embedding width); "
                         f"choose heads among {', '.join(str(h) for h in range(1, 17) if cfg.width % h == 0)}")
    return ViT(tuple(in_shape), num_classes, cfg.width, cfg.depth, cfg.heads, p,
               nn.Linear if plain else MaskedLinear)
