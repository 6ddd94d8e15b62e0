"""The hook protocol: what a method may do to the training loop, and at which point.

The loop (``trainer.Trainer``) owns the steps; a method (a learned mask, RigL, gradual pruning, a
post-pruning trick's schedule) is a ``Hook`` that the loop calls at these points, and only there:

- ``before_step(trainer, stage)``: before the forward of an optimizer step. May put schedule values
  into the copies' models (a soft trick's value, a mask's temperature), draw this step's noise
  (``trainer.noise``) and ask for the raw weights in the forward (``trainer.bypass``); both are
  cleared by the loop after the forward.
- ``loss(trainer, stage, losses)``: the per-copy losses (K,) after the forward; returns them with
  the method's penalty added.
- ``after_step(trainer, stage)``: after the optimizer step and the masks' enforcement (the copies'
  ``seg_step`` counts the step). May change its own parameters or the copies' masks, through
  ``trainer.per_copy_masks``.
- ``epoch_end(trainer, state, step, metrics)``: a copy's end of a training epoch, after its
  evaluation; may add to the epoch's ``metrics`` and the run's marks.
- ``before_prune(trainer, state)`` / ``after_prune(trainer, state, metrics)``: around a copy's
  pruning round.

``active(stage)`` says in which stages the step points are called. ``for_pack`` lists the hooks of a
pack's methods, in the order they act. Adding a method is one hook class here plus its test.
"""

from __future__ import annotations

import torch

from . import learned_mask
from .optim import per_copy
from .plan import cubic


class Hook:
    """No-op defaults of every point (see the module docstring)."""

    def active(self, stage: str) -> bool:
        return False

    def before_step(self, trainer, stage: str) -> None:
        pass

    def loss(self, trainer, stage: str, losses: torch.Tensor) -> torch.Tensor:
        return losses

    def after_step(self, trainer, stage: str) -> None:
        pass

    def epoch_end(self, trainer, state, step, metrics: dict) -> None:
        pass

    def before_prune(self, trainer, state) -> None:
        pass

    def after_prune(self, trainer, state, metrics: dict) -> None:
        pass


class SoftSchedules(Hook):
    """The post-pruning tricks' schedules (``post_prune.SoftSchedule``): each step's value before its
    forward, the epoch's last value in its metrics."""

    def __init__(self):
        self.soft = None  # the lead's schedule of the current epoch (Trainer.train_epoch sets it)

    def active(self, stage: str) -> bool:
        return stage in ("post", "rigl")

    def before_step(self, trainer, stage: str) -> None:
        if self.soft is not None:
            self.soft.set(trainer.lead.seg_step)

    def epoch_end(self, trainer, state, step, metrics: dict) -> None:
        if state.soft is not None:
            metrics.update(state.soft.current)  # each schedule trick's value (soft_t, skip_alpha, ...)


class LearnedMask(Hook):
    """A learned mask's pre-training (``learned_mask.py``): temperature and noise before the forward,
    the density penalty, the multipliers' ascent and the scores' clamps after the step, its state in
    the epoch's metrics, its fold into the weights before pruning and its overlap with the pruned set."""

    def __init__(self, trainer):
        copies = trainer.copies
        self.dual: torch.Tensor | None = None  # (K,) Lagrange multipliers of a steered learned mask
        if all(getattr(t, "mask_dual", None) is not None for t in copies):
            self.dual = torch.stack([t.mask_dual for t in copies])
            for k, t in enumerate(copies):  # each copy's multipliers are a view of the stack
                t.mask_dual = self.dual[k]
        # each copy's lowest keep probability of a steered mask (learned_mask.RESIDUE x its density)
        self.floor = None if self.dual is None else per_copy(
            [learned_mask.RESIDUE * t.cfg.prune.density for t in copies], self.dual)
        self.targets = self.density = None
        self.hard: dict[int, dict] = {}  # id(state) -> the mask's own choice before the fold

    def active(self, stage: str) -> bool:
        return stage == "pre"

    def scores(self, trainer) -> list[tuple]:
        return [(layer.mask_kind, trainer.stacks[f"{name[:-len('weight')]}mask_score"], layer.mask_beta)
                for name, layer in trainer.layers.items() if layer.mask_score is not None]

    def _noise(self, trainer) -> dict[str, torch.Tensor]:
        """Each copy's U(0, 1) draws for a stochastic mask, from its own ``mask`` generator (a single run's)."""
        noise = {}
        for name, layer in trainer.layers.items():
            if layer.mask_score is not None and layer.mask_kind.stochastic:
                shape, dev = layer.weight.shape, layer.weight.device
                noise[name[:-len(".weight")]] = torch.stack(
                    [torch.rand(shape, generator=c.gen["mask"]) for c in trainer.copies]).to(dev)
        return noise

    def before_step(self, trainer, stage: str) -> None:
        lead = trainer.lead
        beta = learned_mask.beta_at(lead.seg_step, lead.seg_total, lead.cfg.mask)
        for c in trainer.copies:  # the lead's layers drive the packed forward, each copy's its own evaluation
            learned_mask.set_beta(c.model, beta)
        trainer.noise = self._noise(trainer)
        self.targets = None
        if self.dual is not None:  # each copy's target expected density after this step
            values = [learned_mask.target_at(lead.seg_step + 1, lead.seg_total, c.cfg.prune.density, c.cfg.mask)
                      for c in trainer.copies]
            self.targets = per_copy(values, self.dual)

    def loss(self, trainer, stage: str, losses: torch.Tensor) -> torch.Tensor:
        penalty, self.density = learned_mask.penalties(self.scores(trainer), self.targets, self.dual,
                                                       trainer.lead.cfg.mask.rho)
        return losses + penalty

    def after_step(self, trainer, stage: str) -> None:
        if self.density is not None:
            learned_mask.dual_ascent(self.dual, self.density, self.targets, trainer.lead.cfg.mask.dual_lr)
            self.density = None
        for kind, score, beta in self.scores(trainer):
            kind.after_step(score, beta, self.floor)

    def epoch_end(self, trainer, state, step, metrics: dict) -> None:
        if step.stage != "pre":
            return
        cfg = state.cfg
        out = {"mask_beta": learned_mask.beta(state.model)}
        if state.mask_dual is not None:
            out["mask_target"] = learned_mask.target_at(state.seg_step, state.seg_total, cfg.prune.density, cfg.mask)
            out["mask_lambda"] = float(state.mask_dual)
        metrics.update(out, **learned_mask.stats(state.model, state.zero_at_init))
        if step.stage_end:
            state.marks.update({k: metrics[k] for k in state.MASK_MARKS if k in metrics})

    def before_prune(self, trainer, state) -> None:
        self.hard[id(state)] = {n: h.cpu() for n, h in learned_mask.hard_set(state.model).items()}
        learned_mask.fold(state.model)  # every pruner scores the network as it computes (w <- w * m)

    def after_prune(self, trainer, state, metrics: dict) -> None:
        hard = self.hard.pop(id(state), None)
        if hard:  # overlap of the learned mask's own choice and the pruned set
            masks = state.current_masks()
            jac = learned_mask.jaccard(hard, {n: m.cpu() for n, m in masks.items()})
            metrics["mask_jaccard"] = state.marks["mask_jaccard"] = jac


class RigLUpdates(Hook):
    """RigL's drop/grow: an update step's forward with the raw weights (a dense gradient), then each
    copy's masks updated from its own slice of the gradient; its regrown count in the epoch's metrics."""

    def __init__(self):
        self.update = False

    def active(self, stage: str) -> bool:
        return stage == "rigl"

    def before_step(self, trainer, stage: str) -> None:
        lead = trainer.lead
        self.update = lead.rigl is not None and lead.rigl.is_update_step(lead.seg_step + 1)
        trainer.bypass = self.update

    def after_step(self, trainer, stage: str) -> None:
        if self.update:
            self.update = False
            trainer.per_copy_masks(lambda k, c: _rigl_update(trainer, k, c))

    def epoch_end(self, trainer, state, step, metrics: dict) -> None:
        if state.rigl is not None and step.stage == "rigl":
            metrics["rigl_regrown"] = state.rigl.regrown


def _rigl_update(trainer, k: int, c) -> None:
    own = dict(c.model.named_parameters())
    for name in c.masks:
        own[name].grad = trainer.stacks[name].grad[k]
    c.set_masks(c.rigl.update(c.model, c.masks, c.opt, c.seg_step))
    for name in c.masks:
        own[name].grad = None


class GradualPruning(Hook):
    """Gradual magnitude pruning (Zhu & Gupta): each copy re-pruned to the cubic schedule's density
    after the stage's pruning steps (``plan.gradual_steps``)."""

    def active(self, stage: str) -> bool:
        return stage == "gradual"

    def after_step(self, trainer, stage: str) -> None:
        if trainer.lead.seg_step in trainer.lead.gradual_at:
            trainer.per_copy_masks(lambda k, c: c.mask_to(cubic(c.cfg.prune.density, c.seg_step, c.seg_total)))


def for_pack(trainer) -> list[Hook]:
    """The hooks of a pack's methods (its copies share them: they differ only in packable values)."""
    cfg = trainer.lead.cfg
    hooks: list[Hook] = []
    if cfg.mask.kind != "none":
        hooks.append(LearnedMask(trainer))
    hooks.append(SoftSchedules())
    if cfg.train.method == "rigl":
        hooks.append(RigLUpdates())
    if cfg.prune.gradual_epochs:
        hooks.append(GradualPruning())
    return hooks
