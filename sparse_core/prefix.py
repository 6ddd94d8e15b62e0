"""Shared pre-training: runs that differ only in what acts from pruning on train their pre-training once.

A pruning run's plan starts with ``train.pre_epochs`` epochs of dense (or learned-mask) training.
Nothing in them reads the ``POST_FORK`` settings (how, where and how far to prune, the post-pruning
tricks, the epochs after pruning) nor the density, unless ``mask.target`` steers a learned mask towards
it. So runs of one seed whose configs differ only there reach the same state at the end of
pre-training, bitwise (``tests/test_prefix.py`` checks every such setting), and ``runner.run_packed`` trains
that part once, for one of them, then starts each of the others from a copy of its state with the
pre-training epochs handed to its own log. Every run's log, history, checkpoints and result are
those of its own run from scratch; its ``seconds`` count the shared epochs in full. In a leave-one-out
ablation most cells share one pre-training (the pruner cells, the post-pruning tricks), and in a
density sweep every density of a cell does. Where a learned mask is steered to the density, the cells
that differ only after pruning still share one pre-training per density (``family_key``). The shared
pre-trainings that can share a pack (sparse_core/packed.py: e.g. one per density) train as one pack.
This module holds the keys; ``runner.share_prefixes`` trains the shared parts.

Not shared: RigL (sparse from the first step), runs with an injected failure (``train.fail_at_epoch``)
and runs restored from a checkpoint.
"""

from __future__ import annotations

from . import learned_mask
from .config import POST_FORK, Config  # POST_FORK: declared per field (sparse_core/config.py)
from .packed import config_hash
from .plan import TrainEpoch, build


def fork_point(cfg: Config) -> int:
    """Plan steps before the first one that can read a POST_FORK setting (0: nothing to share)."""
    if cfg.train.method != "prune" or cfg.train.fail_at_epoch >= 0:
        return 0
    steps = 0
    for step in build(cfg):
        if not (isinstance(step, TrainEpoch) and step.stage == "pre"):
            break
        steps += 1
    return steps


def density_free(cfg: Config) -> bool:
    """Whether the pre-training is the same at every density (it is unless a learned mask is steered to it)."""
    return not learned_mask.steered(cfg.mask)


def prefix_key(cfg: Config) -> str | None:
    """Equal for runs with the same pre-training (12 hex chars); None for a run that shares none."""
    if not fork_point(cfg):
        return None
    return config_hash(cfg, set(POST_FORK) | ({"prune.density"} if density_free(cfg) else set()))


def family_key(cfg: Config) -> str | None:
    """Equal for runs whose pre-training is the same but for the density a learned mask is steered to
    (``prefix_key`` itself where ``density_free``); None for a run that shares none. Runs of one family
    and one density share their pre-training (the sweeps group a family's cells into one trial)."""
    if not fork_point(cfg):
        return None
    return config_hash(cfg, set(POST_FORK) | {"prune.density"})
