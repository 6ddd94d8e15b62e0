"""Learned masks during pre-pruning training, registered by ``mask.kind``.

Every kind maps a score tensor (one score per prunable weight) to what multiplies the weight in the
forward pass, and to a keep probability p in [0, 1] (its share of the expected density).

``sigmoid`` (continuous sparsification, Savarese et al. 2020, as in their code): m = sigmoid(beta s) /
sigmoid(s0). The scores start at ``mask.init`` = s0 = 0 (jittered, ``INIT_JITTER``), where the sigmoid is
steepest, and the rescale makes the mask start at 1 (without it a 6-layer net would start at 1/64 of its
signal); beta rises geometrically from 1 to ``mask.beta_final`` over the pre-training steps, so m ends
binary. p = sigmoid(beta s). Starting the scores high instead (s = 3, m = 0.95) saturates the sigmoid as
beta grows: no gradient reaches them and the mask never moves.

``hardconcrete`` (L0 regularisation, Louizos et al. 2018): stochastic gates z = min(1, max(0, sigmoid((log u
- log(1 - u) + log_alpha) / 2/3) * 1.2 - 0.1)), u ~ U(0, 1) drawn from the run's own ``mask`` generator every
step; evaluation, pruning and the fold use the deterministic gate min(1, max(0, sigmoid(log_alpha) * 1.2 -
0.1)). log_alpha starts at 3 (the gates start open: deterministic gate 1; at 0, Louizos' "drop rate 0.5",
the sampled gates of a 6-layer MLP were too noisy to learn at all) and stays at most log 100 (CoFiPruning's
bound). p = P(z != 0) = sigmoid(log_alpha - 2/3 log(0.1 / 1.1)).

Density is controlled, not guessed (``mask.target``, both kinds above): a target t falls geometrically from
the mask's initial expected density to ``prune.density`` over the first ``mask.warmup`` of pre-training and
is held there. The loss adds the augmented Lagrangian lambda (d - t) + rho / (2 t) (d - t)^2 (``mask.rho``),
whose d has the value of the hard density (the share with p > 0.5) and the gradient of the expected density
(mean p); after every step lambda takes a step of dual ascent, lambda += ``mask.dual_lr`` (d - t) / t. The
penalty acts on d, so each score feels the same pressure whatever its layer: no per-network weight to guess.
After every step the scores are clamped where the density term can still move them (``SIGMOID_LOGITS``,
``HC_LOG_ALPHA``, and a floor of ``RESIDUE`` x the target on a pruned weight's p). Under ZerO most weights
start at exactly 0 and their scores get no gradient from the task loss (dL/ds = dL/d(w m) w dm/ds); the
density term still reaches them (dd/ds does not involve w), so their masks close first, unless the weight
itself leaves 0 (dL/dw = dL/d(w m) m, with m = 1 at the start). docs/learned_mask.md: how and why.

``gates`` (Srinivas et al. 2016): a gate g in [0, 1] per weight, clipped after every step, the forward
pass uses the binary gate (g > 0.5) with a straight-through gradient, and the penalty ``lambda_l1 *
sum(g) + lambda_bin * sum(g * (1 - g))`` pushes gates to be sparse and binary (no density control).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

from .config import MaskConfig
from .masks import prunable_layers
from .registry import MASK_KINDS

HC_GAMMA, HC_ZETA, HC_TEMPERATURE = -0.1, 1.1, 2.0 / 3.0  # Louizos et al.'s stretch and temperature
HC_LOG_ALPHA0 = 3.0  # log_alpha at the start: P(z != 0) = 0.99, 80 % of the sampled gates exactly 1, deterministic gate 1
HC_LOG_ALPHA = (-10.0, math.log(1e2))  # log_alpha kept in this range after every step (CoFiPruning's upper bound)
# log_alpha = HC_SCORE_SCALE * score: with plain SGD on the scores, a unit-scale log_alpha moved too little in
# 10 epochs (no temperature amplifies its gradient, as beta does the sigmoid's); this is mask.lr x 500 for it.
HC_SCORE_SCALE = math.sqrt(500.0)
HC_SHIFT = -HC_TEMPERATURE * math.log(-HC_GAMMA / HC_ZETA)  # P(z != 0) = sigmoid(log_alpha + HC_SHIFT)
# With density control a pruned weight's keep probability stays >= RESIDUE x the target density: all pruned
# weights together add at most 5 % of the target to the expected density, and the density term can still
# reopen them (at a floor far below, the mask cannot recover from an overshoot below its target).
RESIDUE = 0.05
# The scores start at N(init, INIT_JITTER^2) (CoFiPruning starts its log_alphas so, std 0.01). Under ZerO most
# weights are 0 and get no task gradient: with one shared start their scores move in lockstep, and a
# density step moved all of them across 0 at once (hard density 0.97 -> 0.009 in one epoch at a 3 % target).
INIT_JITTER = 0.01
_EPS = 1e-6
# sigmoid: the logits beta * s stay in this range after every step. A kept weight's p stays <= 0.9975, where
# the density term can still move it (a saturated score gets no gradient and freezes the mask), and a
# pruned one's p >= 4.5e-5, a residue far below any density we study.
SIGMOID_LOGITS = (-10.0, 3.0)


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    """sigmoid computed in float64 and rounded back: a packed score tensor puts copy k's entries at other
    positions of the vectorised kernel than a single run does, and float32 sigmoid differs by an ulp
    between the vector body and the scalar tail; in float64 that ulp almost never survives the rounding,
    so a copy's mask is its single run's."""
    return torch.sigmoid(x.double()).to(x.dtype) if x.dtype == torch.float32 else torch.sigmoid(x)


class MaskKind:
    stochastic = False  # draws noise every training step (the pack passes it to forward_mask)
    controlled = False  # has an expected density the Lagrangian steers (mask.target)
    jitter = 0.0  # std of the scores' start around init_score, in score units (breaks ties; see attach)

    def __init__(self, cfg: MaskConfig):
        self.cfg = cfg

    def init_score(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_mask(self, score: torch.Tensor, beta: float, noise: torch.Tensor | None = None) -> torch.Tensor:
        """What multiplies the weight in a training forward pass (``noise``: U(0, 1) of the score's shape)."""
        return self.value(score, beta)

    def value(self, score: torch.Tensor, beta: float) -> torch.Tensor:
        """The deterministic mask: evaluation, the fold into the weights and the ``mask`` pruner use it."""
        raise NotImplementedError

    def keep_prob(self, score: torch.Tensor, beta: float) -> torch.Tensor:
        """p in [0, 1]: the chance the weight is kept (its share of the expected density)."""
        raise NotImplementedError

    def penalty(self, score: torch.Tensor, beta: float) -> torch.Tensor:
        """Per-copy fixed penalty (K,) of a stacked score (K, ...) (kinds or settings without density control)."""
        return self.cfg.lambda_l1 * self.keep_prob(score, beta).flatten(1).sum(1)

    def after_step(self, score: torch.Tensor, beta: float, floor: torch.Tensor | None = None) -> None:
        """After each optimizer step, in place. ``floor`` (K,): each copy's lowest keep probability (density
        control: ``RESIDUE`` x its density), else None."""


@MASK_KINDS.register("none")
class NoMask(MaskKind):
    pass


@MASK_KINDS.register("sigmoid")
class SigmoidMask(MaskKind):
    controlled = True
    jitter = INIT_JITTER

    def __init__(self, cfg):
        super().__init__(cfg)
        self.scale = 1.0 / (1.0 / (1.0 + math.exp(-cfg.init)))  # m = 1 at the start

    def init_score(self, weight):
        return torch.full_like(weight, self.cfg.init)

    def value(self, score, beta):
        return _sigmoid(beta * score) * self.scale

    def keep_prob(self, score, beta):
        return _sigmoid(beta * score)

    @torch.no_grad()
    def after_step(self, score, beta, floor=None):
        if floor is None:
            score.clamp_(SIGMOID_LOGITS[0] / beta, SIGMOID_LOGITS[1] / beta)
        else:
            score.clamp_(_per_copy(torch.logit(floor) / beta, score), torch.tensor(SIGMOID_LOGITS[1] / beta))


@MASK_KINDS.register("hardconcrete")
class HardConcrete(MaskKind):
    stochastic = controlled = True
    jitter = INIT_JITTER / HC_SCORE_SCALE  # INIT_JITTER in log_alpha

    def init_score(self, weight):
        return torch.full_like(weight, HC_LOG_ALPHA0 / HC_SCORE_SCALE)

    def _log_alpha(self, score: torch.Tensor) -> torch.Tensor:
        return score * HC_SCORE_SCALE

    def forward_mask(self, score, beta, noise=None):
        if noise is None:
            return self.value(score, beta)
        u = noise.clamp(_EPS, 1 - _EPS)
        s = _sigmoid((torch.log(u) - torch.log1p(-u) + self._log_alpha(score)) / HC_TEMPERATURE)
        return (s * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)

    def value(self, score, beta):
        return (_sigmoid(self._log_alpha(score)) * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)

    def keep_prob(self, score, beta):
        return _sigmoid(self._log_alpha(score) + HC_SHIFT)

    @torch.no_grad()
    def after_step(self, score, beta, floor=None):
        if floor is None:
            score.clamp_(HC_LOG_ALPHA[0] / HC_SCORE_SCALE, HC_LOG_ALPHA[1] / HC_SCORE_SCALE)
        else:
            score.clamp_(_per_copy((torch.logit(floor) - HC_SHIFT) / HC_SCORE_SCALE, score),
                         torch.tensor(HC_LOG_ALPHA[1] / HC_SCORE_SCALE))


@MASK_KINDS.register("gates")
class Gates(MaskKind):
    def init_score(self, weight):
        return torch.full_like(weight, min(max(self.cfg.gate_init, 0.0), 1.0))

    def forward_mask(self, score, beta, noise=None):
        hard = (score > 0.5).to(score.dtype)
        return score + (hard - score).detach()  # straight-through: value of hard, gradient of g

    def value(self, score, beta):
        return (score > 0.5).to(score.dtype)

    def keep_prob(self, score, beta):
        return score

    def penalty(self, score, beta):
        cfg = self.cfg
        return (cfg.lambda_l1 * score + cfg.lambda_bin * (score * (1 - score))).flatten(1).sum(1)

    @torch.no_grad()
    def after_step(self, score, beta, floor=None):
        score.clamp_(0.0, 1.0)


def _per_copy(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(K,) -> (K, 1, ...) broadcasting against a stacked (K, ...) tensor."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def get(cfg: MaskConfig) -> MaskKind:
    return MASK_KINDS.get(cfg.kind, "mask.kind")(cfg)


def steered(cfg: MaskConfig) -> bool:
    """Whether a Lagrangian steers this mask's expected density to ``prune.density``."""
    return cfg.kind != "none" and cfg.target and MASK_KINDS.get(cfg.kind, "mask.kind").controlled


def beta_at(step: int, total: int, cfg: MaskConfig) -> float:
    """Geometric temperature schedule over the pre-training steps: 1 at the first step (0), ``beta_final``
    at the last (``total - 1``)."""
    if total <= 1:
        return float(cfg.beta_final) if total == 1 else 1.0
    return float(cfg.beta_final ** (min(step, total - 1) / (total - 1)))


@functools.lru_cache(maxsize=None)
def start_density(cfg: MaskConfig) -> float:
    """The expected density of a fresh mask (where the target schedule starts; read every step, so cached)."""
    kind = get(cfg)
    return float(kind.keep_prob(kind.init_score(torch.zeros(1, dtype=torch.float64)), 1.0))


def target_at(step: int, total: int, density: float, cfg: MaskConfig) -> float:
    """Target expected density after pre-training step ``step`` (1-based) of ``total``: geometric from the
    mask's initial expected density to ``density`` over the first ``mask.warmup`` of the steps, then held."""
    start = max(start_density(cfg), density)
    frac = min(1.0, step / max(1.0, cfg.warmup * total))
    return float(start * (density / start) ** frac)


def attach(model: nn.Module, cfg: MaskConfig, generator: torch.Generator | None = None) -> list[nn.Parameter]:
    """Give every prunable layer a learned mask score (jittered by the kind's ``jitter`` from ``generator``
    when given); returns the score parameters."""
    kind = get(cfg)
    scores = []
    for layer in prunable_layers(model).values():
        score = kind.init_score(layer.weight.detach())
        if generator is not None and kind.jitter:
            noise = torch.randn(score.shape, generator=generator, dtype=score.dtype)
            score = score + kind.jitter * noise.to(score.device)
        layer.mask_kind = kind
        layer.mask_score = nn.Parameter(score)
        scores.append(layer.mask_score)
    return scores


def set_beta(model: nn.Module, beta: float) -> None:
    for layer in prunable_layers(model).values():
        layer.mask_beta = beta


def beta(model: nn.Module) -> float | None:
    """The current temperature of the model's learned mask (None without one)."""
    return next((l.mask_beta for l in prunable_layers(model).values() if getattr(l, "mask_score", None) is not None), None)


def score_params(model: nn.Module) -> list[nn.Parameter]:
    return [l.mask_score for l in prunable_layers(model).values() if getattr(l, "mask_score", None) is not None]


def penalties(scores: list[tuple[MaskKind, torch.Tensor, float]], targets: torch.Tensor | None,
              dual: torch.Tensor | None, rho: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-copy mask penalty (K,) from (kind, stacked score (K, ...), beta) per layer, and, with density
    control (``targets`` (K,), multipliers ``dual`` (K,)), the per-copy hard density (K,) it was computed
    at. The controlled penalty is the augmented Lagrangian lambda (d - t) + rho / (2 t) (d - t)^2, whose d
    has the value of the hard density (the share with p > 0.5: what the mask keeps) and the gradient of
    the expected one (mean p)."""
    if targets is None:
        total = None
        for kind, score, beta in scores:
            p = kind.penalty(score, beta)
            total = p if total is None else total + p
        return total, None
    kept, hard, n = None, None, 0
    for kind, score, beta in scores:
        p = kind.keep_prob(score, beta)
        dims = tuple(range(1, p.dim()))  # over each copy's entries (a sum, not a reshape: no copy in its backward)
        # the count of p > 0.5 as 0/1 in float32 or wider (exact below 2^24 per layer; a float comparison's output
        # is several times cheaper than a bool one here), then in float64 across layers
        ones = torch.empty_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
        s, h = p.sum(dims), torch.gt(p.detach(), 0.5, out=ones).sum(dims).double()
        kept, hard, n = (s if kept is None else kept + s), (h if hard is None else hard + h), n + p[0].numel()
    soft, hard = kept / n, hard.to(kept.dtype) / n
    gap = soft - soft.detach() + (hard - targets)
    return dual * gap + rho / 2 * gap * gap / targets, hard


@torch.no_grad()
def dual_ascent(dual: torch.Tensor, density: torch.Tensor, targets: torch.Tensor, lr: float) -> None:
    """One step of dual ascent on the multipliers (K,), in place, no host sync: lambda += lr (d - t) / t
    (relative to the target, so one step size serves 10 % and 0.1 %)."""
    dual.add_((density - targets) / targets, alpha=lr)


@torch.no_grad()
def values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Current deterministic mask value by parameter name (empty without a learned mask)."""
    return {name: layer.mask_kind.value(layer.mask_score, layer.mask_beta)
            for name, layer in prunable_layers(model).items() if getattr(layer, "mask_score", None) is not None}


@torch.no_grad()
def keep_probs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Current keep probability p by parameter name (empty without a learned mask)."""
    return {name: layer.mask_kind.keep_prob(layer.mask_score, layer.mask_beta)
            for name, layer in prunable_layers(model).items() if getattr(layer, "mask_score", None) is not None}


@torch.no_grad()
def hard_set(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights the mask keeps (p > 0.5), by parameter name (empty without a learned mask)."""
    return {name: p > 0.5 for name, p in keep_probs(model).items()}


@torch.no_grad()
def stats(model: nn.Module, zero_at_init: dict[str, torch.Tensor]) -> dict[str, float]:
    """Soft (expected) density, hard density (share with p > 0.5), binary gap (mean distance of p to the
    nearer of 0 and 1: 0 = a binary mask), and the share below 0.5 split by weights exactly 0 at init and
    the rest (ZerO + learned mask collapses; this split shows why)."""
    probs = keep_probs(model)
    if not probs:
        return {}
    allp = torch.cat([v.flatten() for v in probs.values()]).double()
    zero_sel = torch.cat([zero_at_init[n].flatten().to(allp.device) for n in probs])
    below = allp <= 0.5
    out = {"mask_mean": float(allp.mean()), "mask_below_half": float(below.double().mean()),
           "mask_soft_density": float(allp.mean()), "mask_hard_density": float((~below).double().mean()),
           "mask_binary_gap": float(torch.minimum(allp, 1 - allp).mean())}
    for tag, sel in (("zero_init", zero_sel), ("nonzero_init", ~zero_sel)):
        n = int(sel.sum())
        out[f"mask_below_half_{tag}"] = float(below[sel].double().mean()) if n else float("nan")
    return out


def jaccard(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a & b| / |a | b| of two bool masks by parameter name (1.0 when both are empty)."""
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / union if union else 1.0


@torch.no_grad()
def fold(model: nn.Module) -> None:
    """End of pre-training: multiply each weight by its deterministic mask value and remove the scores,
    leaving the plain layer (the network function is kept up to the soft mask's residue)."""
    for layer in prunable_layers(model).values():
        if getattr(layer, "mask_score", None) is not None:
            layer.weight.mul_(layer.mask_kind.value(layer.mask_score, layer.mask_beta))
            layer.mask_score = None
            layer.mask_kind = None
