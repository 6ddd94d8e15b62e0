"""Scores -> masks: a pure function of (scores, density, scope), with an exact kept count.

Scopes are registered by name: ``global`` (one threshold over all layers), ``layerwise`` (the
same density in every layer) and ``erk`` (Erdos-Renyi-Kernel per-layer densities). Ties at an
equal score are broken by position (stable sort), so the same scores always give the same mask.
"""

from __future__ import annotations

import math

import torch

from .masks import count
from .registry import SCOPES


class DensityError(RuntimeError):
    """The achieved density is not the requested one."""


def target_count(numel: int, density: float) -> int:
    return int(round(density * numel))


def first_k(flat: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Bool mask of the ``k`` entries of the 1-D ``flat`` that a stable sort (descending with ``largest``,
    else ascending) puts first: the ``k`` largest (smallest), ties going to the lower index. The same
    entries as ``torch.sort(flat, descending=largest, stable=True).indices[:k]``, found by one selection
    (``kthvalue``) and one comparison instead of a sort (a sort of the whole score is most of a pruning
    step's time); with a NaN, which sort ranks above everything, the sort itself decides."""
    n = flat.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k <= 0:
        return keep
    if k >= n:
        return keep.fill_(True)
    if bool(torch.isnan(flat).any()):
        keep[torch.sort(flat, descending=largest, stable=True).indices[:k]] = True
        return keep
    kth = torch.kthvalue(flat, n - k + 1 if largest else k).values
    keep = flat > kth if largest else flat < kth
    keep[(flat == kth).nonzero().flatten()[:k - int(keep.sum())]] = True
    return keep


def _top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    # NaN ranks last; infinities stay infinite (nan_to_num would make -inf, a pruned weight's score, finite)
    flat = torch.nan_to_num(score.flatten().double(), nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    return first_k(flat, k).view_as(score)


def _apportion(shares: dict[str, float], numels: dict[str, int], total: int) -> dict[str, int]:
    """Per-layer counts near ``shares[l] * numels[l]`` that add up to ``total`` exactly
    (largest remainder; each layer within one weight of its share)."""
    raw = {n: min(shares[n], 1.0) * numels[n] for n in shares}
    counts = {n: min(int(math.floor(v)), numels[n]) for n, v in raw.items()}
    left = total - sum(counts.values())
    by_remainder = sorted(shares, key=lambda n: -(raw[n] - counts[n]))
    for name in by_remainder:
        if left <= 0:
            break
        if counts[name] < numels[name]:
            counts[name] += 1
            left -= 1
    return counts


def _per_layer(scores: dict[str, torch.Tensor], densities: dict[str, float], density: float) -> dict[str, torch.Tensor]:
    numels = {n: s.numel() for n, s in scores.items()}
    counts = _apportion(densities, numels, target_count(sum(numels.values()), density))
    return {n: _top_k_mask(s, counts[n]) for n, s in scores.items()}


@SCOPES.register("global")
def global_scope(scores: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    names = list(scores)
    flat = torch.cat([scores[n].flatten().to(torch.float64) for n in names])
    keep = _top_k_mask(flat, target_count(flat.numel(), density))
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start:start + size].view_as(scores[n])
        start += size
    return out


@SCOPES.register("layerwise")
def layerwise_scope(scores: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    return _per_layer(scores, {n: density for n in scores}, density)


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel (Evci et al. 2020): density_l = eps * sum(shape_l) / prod(shape_l),
    eps solved so the total is ``density``; a layer that would exceed 1 is kept dense and eps
    re-solved for the rest."""
    numels = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / numels[n] for n, s in shapes.items()}
    budget = density * sum(numels.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        rest = budget - sum(numels[n] for n in dense)
        denom = sum(raw[n] * numels[n] for n in free)
        eps = rest / denom if denom > 0 else 0.0
        over = [n for n in free if eps * raw[n] > 1.0]
        if not over:
            break
        dense.add(max(over, key=lambda n: raw[n]))
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


@SCOPES.register("erk")
def erk_scope(scores: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    densities = erk_densities({n: tuple(s.shape) for n, s in scores.items()}, density)
    return _per_layer(scores, densities, density)


def masks_from_scores(scores: dict[str, torch.Tensor], density: float, scope: str,
                      previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Keep the top ``density`` fraction of weights by score; weights pruned in ``previous``
    stay pruned. Raises ``DensityError`` if the kept count is not the exact target."""
    if previous is not None:  # a NaN score (diverged weights) ranks lowest of the kept, above the pruned
        lowest = -torch.finfo(torch.float64).max
        scores = {n: torch.where(previous[n].to(s.device), torch.nan_to_num(s.double(), nan=lowest),
                                 torch.tensor(-math.inf, dtype=torch.float64, device=s.device))
                  for n, s in scores.items()}
    masks = SCOPES.get(scope, "prune.scope")(scores, density)
    if previous is not None:
        masks = {n: m & previous[n].to(m.device) for n, m in masks.items()}
    check_density(masks, density)
    return masks


def check_density(masks: dict[str, torch.Tensor], density: float) -> None:
    kept, total = count(masks)
    want = target_count(total, density)
    if kept != want:
        raise DensityError(f"pruning kept {kept} of {total} weights; density {density} asks for exactly {want}")


def collapsed(masks: dict[str, torch.Tensor]) -> list[str]:
    """Layers left with no weight at all (layer collapse: the network is disconnected)."""
    return [n for n, m in masks.items() if not bool(m.any())]


def schedule(density: float, rounds: int) -> list[float]:
    """Exponential schedule density_k = density^(k/n), k = 1..n (the last is ``density``)."""
    return [density ** (k / rounds) for k in range(1, rounds + 1)]


def shuffle(masks: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Sanity control: permute each layer's mask (same per-layer count, new positions)."""
    out = {}
    for n, m in masks.items():
        perm = torch.randperm(m.numel(), generator=generator).to(m.device)
        out[n] = m.flatten()[perm].view_as(m)
    return out
