"""A run's plan: typed steps, the LR and pruning schedules, and the shared seed derivation.

The trainer walks the plan one step at a time; every reader of its log (CLI, Ray trainable, Optuna
search) gets what a step knows (``stage_end``, ``last_prune``) from the trainer instead of re-deriving
the plan from the config.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from .config import Config
from .pruning import schedule as exponential


@dataclass(frozen=True)
class TrainEpoch:
    stage: str  # pre | gradual | round | post | rigl
    round: int  # iterative-pruning round this training follows (0 elsewhere)
    epoch: int  # 0-based epoch within the stage
    epochs: int  # epochs in the stage

    @property
    def stage_end(self) -> bool:
        return self.epoch == self.epochs - 1


@dataclass(frozen=True)
class PruneStep:
    round: int  # 0-based pruning round
    density: float  # density after this round
    last: bool  # the final round: the post-pruning mask


@dataclass(frozen=True)
class RiglInit:
    pass


Step = TrainEpoch | PruneStep | RiglInit


def cubic(final: float, step: int, total: int) -> float:
    """Zhu & Gupta (2017): d_t = d_f + (1 - d_f) (1 - t/T)^3 for t in [0, T]; 1 at t = 0, d_f at t = T."""
    frac = min(max(step / total, 0.0), 1.0) if total > 0 else 1.0
    return final + (1.0 - final) * (1.0 - frac) ** 3


def gradual_steps(total: int, every: int) -> list[int]:
    """Optimizer steps (1-based) of a gradual stage after which the mask is re-pruned: every ``every``
    steps, and always the last one (which reaches the final density exactly)."""
    steps = list(range(every, total + 1, every))
    return steps if steps and steps[-1] == total else steps + [total]


def build(cfg: Config) -> list[Step]:
    t, p = cfg.train, cfg.prune
    if t.method == "rigl":
        total = t.pre_epochs + t.post_epochs
        return [RiglInit()] + [TrainEpoch("rigl", 0, e, total) for e in range(total)]
    steps: list[Step] = [TrainEpoch("pre", 0, e, t.pre_epochs) for e in range(t.pre_epochs)]
    if p.density < 1.0 and p.gradual_epochs:
        steps += [TrainEpoch("gradual", 0, e, p.gradual_epochs) for e in range(p.gradual_epochs)]
        steps.append(PruneStep(0, p.density, True))  # the gradual stage ended at exactly this density
    else:
        densities = exponential(p.density, p.rounds) if p.density < 1.0 else [1.0]
        for r, d in enumerate(densities):
            steps.append(PruneStep(r, d, r == len(densities) - 1))
            if r < len(densities) - 1:
                steps += [TrainEpoch("round", r, e, p.round_epochs) for e in range(p.round_epochs)]
    steps += [TrainEpoch("post", 0, e, t.post_epochs) for e in range(t.post_epochs)]
    return steps


def total_epochs(cfg: Config) -> int:
    """Training epochs in the run's plan (pre + gradual + iterative-round + post epochs, or RigL's)."""
    return sum(1 for step in build(cfg) if isinstance(step, TrainEpoch))


def derive_seed(seed: int, name: str) -> int:
    """Independent seed per named generator, so changing the pruner never moves the data order."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def lr_factor(kind: str, step: int, total: int) -> float:
    if kind == "constant" or total <= 0:
        return 1.0
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return 0.1 ** ((step >= 0.5 * total) + (step >= 0.75 * total))  # step
