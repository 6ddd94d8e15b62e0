"""Weight initialisations, registered by name: ``init(model, generator)`` in place."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .masks import PRUNABLE_TYPES
from .registry import INITS


def _reset_norms_and_biases(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, PRUNABLE_TYPES) and m.bias is not None:
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@INITS.register("kaiming")
@torch.no_grad()
def kaiming(model: nn.Module, generator: torch.Generator) -> None:
    """Kaiming-normal (fan_in, ReLU gain) for Linear/Conv weights, zero biases."""
    for m in model.modules():
        if isinstance(m, PRUNABLE_TYPES):
            fan_in = m.weight[0].numel()
            std = math.sqrt(2.0 / fan_in)
            m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)
    _reset_norms_and_biases(model)


def hadamard(p: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of size p (a power of two), entries +-1."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {p}")
    h = torch.ones(1, 1)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def zero_matrix(out_dim: int, in_dim: int) -> torch.Tensor:
    """ZerO's matrix (Zhao et al. 2022, Algorithm 1): the partial identity if out <= in, else the
    top-left (out, in) block of the Hadamard matrix H_m of size 2^m, m = ceil(log2(out)), times
    c = 2^(-(m-1)/2) (the paper's constant: sqrt(2) larger than an orthonormal 1/sqrt(2^m))."""
    if out_dim <= in_dim:
        return torch.eye(out_dim, in_dim)
    m = math.ceil(math.log2(out_dim))
    return hadamard(1 << m)[:out_dim, :in_dim] * 2.0 ** (-(m - 1) / 2)


@INITS.register("zero")
@torch.no_grad()
def zero(model: nn.Module, generator: torch.Generator) -> None:
    """ZerO (Zhao et al. 2022): deterministic; convs get the matrix at the kernel centre tap."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.copy_(zero_matrix(*m.weight.shape))
        elif isinstance(m, nn.Conv2d):
            out_c, in_c, kh, kw = m.weight.shape
            m.weight.zero_()
            m.weight[:, :, kh // 2, kw // 2] = zero_matrix(out_c, in_c)
    _reset_norms_and_biases(model)


def initialise(name: str, model: nn.Module, generator: torch.Generator) -> None:
    INITS.get(name, "init.name")(model, generator)
