"""Post-pruning training tricks, registered by name: label smoothing, soft activation, soft skips.

A trick is one registered ``Trick``: the bool config key that switches it on (``post.<name>`` by
default), the knobs a search may tune, and its effect: a loss that replaces cross-entropy, and/or a
schedule value over post-training progress p in [0, 1] that ``apply`` puts into the model (its
``plain`` value is the ordinary network). The trainer, the sweeps' designs (one ``base+<name>`` /
``full-no_<name>`` cell each) and the Optuna space read the registry, so adding a trick is this file
plus its config fields.

The soft schedules run over the first ``post.soft_fraction`` of post-training (in optimizer steps);
after that t = 1 (plain ReLU) and alpha = 0 (no skips): the trained network is exactly the plain
architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PostConfig
from .models import soft_modules
from .registry import TRICKS


@dataclass(frozen=True)
class Trick:
    switch: str  # flat bool config key that turns the trick on
    knobs: dict = field(default_factory=dict)  # flat key -> (distribution, low, high) for searches
    loss: Callable[[torch.Tensor, torch.Tensor, PostConfig], torch.Tensor] | None = None  # replaces cross-entropy: per-sample losses
    value: Callable[[float, PostConfig], float] | None = None  # schedule value at post-training progress p
    apply: Callable[[nn.Module, float], None] | None = None  # puts a schedule value into the model
    plain: float | None = None  # the value at which the model is the plain architecture
    metric: str | None = None  # per-epoch metric name of the schedule value

    def enabled(self, flat: dict) -> bool:
        return bool(flat[self.switch])


def smoothed_targets(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """1 - a on the true class and a / (C - 1) on every other class (PyTorch's built-in spreads
    a / C over all classes, the true one included)."""
    q = torch.full((y.shape[0], num_classes), smoothing / (num_classes - 1), device=y.device)
    q.scatter_(1, y[:, None], 1.0 - smoothing)
    return q


def smoothed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float,
                           reduction: str = "mean") -> torch.Tensor:
    q = smoothed_targets(y, logits.shape[1], smoothing).to(logits.dtype)
    per = -(q * F.log_softmax(logits, dim=1)).sum(1)
    return per if reduction == "none" else per.mean()


def _ramp(progress: float, cfg: PostConfig) -> float:
    """0 -> 1 linearly over the first soft_fraction of post-training, then 1."""
    return min(max(progress / cfg.soft_fraction, 0.0), 1.0)


def _set_t(model: nn.Module, t: float) -> None:
    for a in soft_modules(model)[0]:
        a.t = t


def _set_alpha(model: nn.Module, alpha: float) -> None:
    for b in soft_modules(model)[1]:
        b.skip_alpha = alpha


SOFT_FRACTION = ("uniform", 0.1, 1.0)  # share of post-training the soft schedules run

TRICKS.register("label_smoothing")(Trick(
    switch="post.label_smoothing", knobs={"post.smoothing": ("uniform", 0.0, 0.3)},
    loss=lambda logits, y, cfg: smoothed_cross_entropy(logits, y, cfg.smoothing, reduction="none")))
TRICKS.register("soft_activation")(Trick(  # (1 - t) SiLU + t ReLU, t rising 0 -> 1
    switch="post.soft_activation", knobs={"post.soft_fraction": SOFT_FRACTION},
    value=_ramp, apply=_set_t, plain=1.0, metric="soft_t"))
TRICKS.register("soft_skip")(Trick(  # + alpha P(x) on every hidden layer, alpha falling alpha0 -> 0
    switch="post.soft_skip", knobs={"post.soft_fraction": SOFT_FRACTION},
    value=lambda p, cfg: cfg.skip_alpha0 * (1.0 - _ramp(p, cfg)), apply=_set_alpha, plain=0.0, metric="skip_alpha"))


def active(flat: dict) -> dict[str, Trick]:
    """The tricks a flat config switches on, by name."""
    return {name: TRICKS.get(name) for name in TRICKS if TRICKS.get(name).enabled(flat)}


def loss_of(flat: dict) -> Callable | None:
    """The post-training per-sample loss of the switched-on tricks (None: cross-entropy); at most one may set it."""
    losses = [(n, t.loss) for n, t in active(flat).items() if t.loss is not None]
    if len(losses) > 1:
        raise ValueError(f"post-prune tricks {', '.join(n for n, _ in losses)} each replace the loss: switch on one")
    return losses[0][1] if losses else None


def soft_state(progress: float, cfg: PostConfig) -> tuple[float, float]:
    """(t, alpha) of the soft activation and soft skip at ``progress`` (plain values where off)."""
    flat = {f"post.{k}": getattr(cfg, k) for k in ("soft_activation", "soft_skip")}
    out = []
    for name in ("soft_activation", "soft_skip"):
        trick = TRICKS.get(name)
        out.append(trick.value(progress, cfg) if trick.enabled(flat) else trick.plain)
    return out[0], out[1]


class SoftSchedule:
    """Puts every switched-on schedule trick's value into the model at each post-training step, writing
    only when a value changes (nothing to write on most steps once the schedules have ended)."""

    def __init__(self, model: nn.Module, cfg: PostConfig, total_steps: int):
        self.model, self.cfg, self.total = model, cfg, max(total_steps, 1)
        flat = {f"post.{f}": getattr(cfg, f) for f in cfg.__dataclass_fields__}
        self.tricks = {n: t for n, t in active(flat).items() if t.value is not None}
        self._last: dict[str, float] = {}

    def set(self, step: int) -> dict[str, float]:
        for name, trick in self.tricks.items():
            v = trick.value(step / self.total, self.cfg)
            if self._last.get(name) != v:
                trick.apply(self.model, v)
                self._last[name] = v
        return self.current

    @property
    def current(self) -> dict[str, float]:
        """{metric name: value} as last set (empty before the first step or with no schedule trick)."""
        return {self.tricks[n].metric: v for n, v in self._last.items()}


def make_plain(model: nn.Module) -> None:
    """Every schedule trick at its plain value: the plain network."""
    for name in TRICKS:
        trick = TRICKS.get(name)
        if trick.apply is not None:
            trick.apply(model, trick.plain)
