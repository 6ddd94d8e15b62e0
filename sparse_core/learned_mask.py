"""Learned masks during pre-pruning training, registered by ``mask.kind``.

``sigmoid``: continuous sparsification (Savarese et al. 2020): m = sigmoid(beta * s), beta raised
geometrically from 1 to ``beta_final`` over pre-training, s starting at ``mask.init`` = 3 (m = 0.95: at
s = 0 every weight is halved and a 6-layer net computes with 1/64 of its function and gradients), L1
pressure ``lambda * sum(m)`` (so each score feels lambda * dm/ds, whatever the network's size) that,
with ``mask.target``, acts only while the mean mask is above a target density falling geometrically
from 1 to ``prune.density`` over pre-training: the mask is steered to the density it will be pruned to.
Under ZerO most weights are exactly 0 and dL/ds = dL/d(w m) * w * dm/ds is 0 for them; the weights
themselves get gradient (dL/dw = dL/d(w m) * m, with m = 0.95) and leave 0 in the first steps, after
which their scores learn too. That is why the start near 1 matters most for ZerO.
``gates``: Srinivas et al. 2016: a gate g in [0, 1] per weight, clipped after every step, the
forward pass uses the binary gate (g > 0.5) with a straight-through gradient, and the penalty
``lambda_l1 * sum(g) + lambda_bin * sum(g * (1 - g))`` pushes gates to be sparse and binary.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import MaskConfig
from .masks import prunable_layers
from .registry import MASK_KINDS


class MaskKind:
    def init_score(self, weight: torch.Tensor, cfg: MaskConfig) -> torch.Tensor:
        raise NotImplementedError

    def forward_mask(self, score: torch.Tensor, beta: float) -> torch.Tensor:
        """What multiplies the weight in the forward pass."""
        raise NotImplementedError

    def value(self, score: torch.Tensor, beta: float) -> torch.Tensor:
        """The mask value reported and used for pruning (no gradient path needed)."""
        return self.forward_mask(score, beta)

    def penalty(self, score: torch.Tensor, beta: float, cfg: MaskConfig) -> torch.Tensor:
        """Per-copy penalty (K,) of a stacked score (K, ...)."""
        raise NotImplementedError

    def after_step(self, score: torch.Tensor) -> None:
        pass


@MASK_KINDS.register("none")
class NoMask(MaskKind):
    pass


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    """sigmoid computed in float64 and rounded back: a packed score tensor puts copy k's entries at other
    positions of the vectorised kernel than a single run does, and float32 sigmoid differs by an ulp
    between the vector body and the scalar tail; in float64 that ulp almost never survives the rounding,
    so a copy's mask is its single run's."""
    return torch.sigmoid(x.double()).to(x.dtype) if x.dtype == torch.float32 else torch.sigmoid(x)


@MASK_KINDS.register("sigmoid")
class SigmoidMask(MaskKind):
    def init_score(self, weight, cfg):
        return torch.full_like(weight, cfg.init)

    def forward_mask(self, score, beta):
        return _sigmoid(beta * score)

    def soft_sum(self, score, beta, m: torch.Tensor | None = None) -> torch.Tensor:
        """sum(m) per copy: the L1 penalty's sum and, divided by the count, the soft density (``m``: the
        forward pass's mask values, when it has them: the same values, one sigmoid pass fewer)."""
        return (_sigmoid(beta * score) if m is None else m).flatten(1).sum(1)

    def penalty(self, score, beta, cfg):
        return cfg.lambda_l1 * self.soft_sum(score, beta)


@MASK_KINDS.register("gates")
class Gates(MaskKind):
    def init_score(self, weight, cfg):
        return torch.full_like(weight, min(max(cfg.gate_init, 0.0), 1.0))

    def forward_mask(self, score, beta):
        hard = (score > 0.5).to(score.dtype)
        return score + (hard - score).detach()  # straight-through: value of hard, gradient of g

    def value(self, score, beta):
        return (score > 0.5).to(score.dtype)

    def penalty(self, score, beta, cfg):
        return (cfg.lambda_l1 * score + cfg.lambda_bin * (score * (1 - score))).flatten(1).sum(1)

    @torch.no_grad()
    def after_step(self, score):
        score.clamp_(0.0, 1.0)


def get(name: str) -> MaskKind:
    return MASK_KINDS.get(name, "mask.kind")()


def beta_at(epoch: int, pre_epochs: int, cfg: MaskConfig) -> float:
    """Geometric temperature schedule: 1 at the first pre-training epoch, beta_final at the last."""
    if pre_epochs <= 1:
        return 1.0 if pre_epochs == 0 else cfg.beta_final
    return float(cfg.beta_final ** (epoch / (pre_epochs - 1)))


def attach(model: nn.Module, cfg: MaskConfig) -> list[nn.Parameter]:
    """Give every prunable layer a learned mask score; returns the score parameters."""
    kind = get(cfg.kind)
    scores = []
    for layer in prunable_layers(model).values():
        layer.mask_kind = kind
        layer.mask_score = nn.Parameter(kind.init_score(layer.weight.detach(), cfg))
        scores.append(layer.mask_score)
    return scores


def set_beta(model: nn.Module, beta: float) -> None:
    for layer in prunable_layers(model).values():
        layer.mask_beta = beta


def beta(model: nn.Module) -> float | None:
    """The current temperature of the model's learned mask (None without one)."""
    return next((l.mask_beta for l in prunable_layers(model).values() if getattr(l, "mask_score", None) is not None), None)


def target_at(epoch: int, pre_epochs: int, density: float) -> float:
    """Target mean mask during pre-training epoch ``epoch``: density^((epoch + 1) / pre_epochs), so it
    falls geometrically from 1 and is ``density`` in the last epoch."""
    return float(density ** ((epoch + 1) / max(pre_epochs, 1)))


def score_params(model: nn.Module) -> list[nn.Parameter]:
    return [l.mask_score for l in prunable_layers(model).values() if getattr(l, "mask_score", None) is not None]


def penalties(scores: list[tuple[MaskKind, torch.Tensor, float, torch.Tensor | None]], cfg: MaskConfig,
              targets: torch.Tensor | None = None) -> torch.Tensor:
    """Per-copy mask penalty (K,) summed over layers, from (kind, stacked score (K, ...), beta, the forward
    pass's mask values or None) per layer;
    with ``targets`` (K,) (sigmoid masks and ``mask.target``) a copy's penalty is switched off, without a
    host sync, while its mean soft mask is at or below its target."""
    total, soft, n = None, None, 0
    for kind, score, beta, values in scores:
        if hasattr(kind, "soft_sum"):  # the forward pass's sigmoid serves the penalty and the gate
            m = kind.soft_sum(score, beta, values)
            p = cfg.lambda_l1 * m
            if targets is not None:
                soft, n = (m.detach() if soft is None else soft + m.detach()), n + score[0].numel()
        else:
            p = kind.penalty(score, beta, cfg)
        total = p if total is None else total + p
    if soft is not None:
        total = total * (soft / n > targets).to(total.dtype)
    return total


def penalty(model: nn.Module, cfg: MaskConfig, target: float | None = None) -> torch.Tensor:
    """``penalties`` of one model (a pack of one)."""
    scores = [(l.mask_kind, l.mask_score.unsqueeze(0), l.mask_beta, None) for l in prunable_layers(model).values()
              if getattr(l, "mask_score", None) is not None]
    targets = None if target is None else torch.tensor([target], dtype=scores[0][1].dtype)
    return penalties(scores, cfg, targets)[0]


def after_step(model: nn.Module) -> None:
    for layer in prunable_layers(model).values():
        if getattr(layer, "mask_score", None) is not None:
            layer.mask_kind.after_step(layer.mask_score)


@torch.no_grad()
def values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Current mask value m by parameter name (empty without a learned mask)."""
    return {name: layer.mask_kind.value(layer.mask_score, layer.mask_beta)
            for name, layer in prunable_layers(model).items() if getattr(layer, "mask_score", None) is not None}


@torch.no_grad()
def stats(model: nn.Module, zero_at_init: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean mask value and the fraction below 0.5, split by weights exactly 0 at init and the rest
    (ZerO + learned mask collapses; this split shows why)."""
    vals = values(model)
    if not vals:
        return {}
    allv = torch.cat([v.flatten() for v in vals.values()])
    zero_sel = torch.cat([zero_at_init[n].flatten().to(allv.device) for n in vals])
    below = allv < 0.5
    # soft density: the mean mask; hard: the share that pruning at 0.5 would keep; binary gap: mean
    # distance to the nearest of 0 and 1 (0 = converged to a binary mask)
    out = {"mask_mean": float(allv.mean()), "mask_below_half": float(below.float().mean()),
           "mask_soft_density": float(allv.mean()), "mask_hard_density": float((~below).float().mean()),
           "mask_binary_gap": float(torch.minimum(allv, 1 - allv).mean())}
    for tag, sel in (("zero_init", zero_sel), ("nonzero_init", ~zero_sel)):
        n = int(sel.sum())
        out[f"mask_below_half_{tag}"] = float(below[sel].float().mean()) if n else float("nan")
    return out


@torch.no_grad()
def fold(model: nn.Module) -> None:
    """End of pre-training: multiply each weight by its mask value and remove the scores, leaving
    the plain layer (the network function is kept up to the soft mask's residue)."""
    for layer in prunable_layers(model).values():
        if getattr(layer, "mask_score", None) is not None:
            layer.weight.mul_(layer.mask_kind.value(layer.mask_score, layer.mask_beta))
            layer.mask_score = None
            layer.mask_kind = None
