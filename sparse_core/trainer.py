"""The trainer: it owns the training loop over K run states that share a computation graph.

Every run is a ``run_state.RunState`` (its own config, seeded generators, plan position, masks,
history and result), and every run, a single one included, trains through a ``Trainer``: the
single run is the pack of one. The trainer stacks each parameter and buffer of its K copies into
one tensor with a leading copy dimension and re-points each copy's parameters at its slice, so a
copy's own module (what evaluation, the pruners, rescaling, RigL, export and checkpoints use)
always sees the current weights, and the hot loop runs once for all K copies: per step, each copy's
batch from its own data generator, one packed forward (``model.packed_forward``: ``baddbmm`` per
linear layer, grouped convolutions; else ``models.derived_packed_forward``), per-copy losses, one
backward and an optimizer step with each copy's learning rate and weight decay. Masked-out weights
and their optimizer state stay exactly 0: the gradient is masked, so a step keeps them 0, and
``enforce`` zeroes them for all copies at once only where that could fail (new masks, each epoch's
start, a dense-gradient step); the forward then uses the weights without multiplying by the mask
(``masks.masked_weight(zeroed=True)``). What a method adds
(a learned mask, RigL, gradual pruning, the post-pruning schedules) it adds through the declared
hook points of ``hooks.py``. Every step that is not per-batch (pruning, evaluation, the result)
runs per copy on the copy's own module, with the same functions as a single run.

Copies may differ only in ``packed.PACKABLE`` values; ``packed.pack_key`` is equal for configs that
can share a pack. A copy whose loss becomes non-finite fails alone (its result is the
``TrainingDiverged`` error); the others carry on. Copies restored from checkpoints at different plan
positions train in separate packs.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import hooks as method_hooks
from .data import train_batches
from .masks import masked_weight, prunable_layers
from .metrics import evaluate_packed
from .models import derived_packed_forward
from .optim import CopyOptimizer, PackedOptimizer
from .packed import PACKABLE, pack_key
from .plan import PruneStep, TrainEpoch, lr_factor
from .post_prune import SoftSchedule
from .results import TrainingDiverged


class Trainer:
    def __init__(self, copies: list):
        keys = {pack_key(t.cfg) for t in copies}
        if len(keys) > 1:
            raise ValueError("these configs cannot share a pack: they differ in more than "
                             f"{', '.join(PACKABLE)} (pack_key {sorted(keys)})")
        if len({t.step_idx for t in copies}) > 1:
            raise ValueError("copies of a pack must be at the same plan step")
        self.copies, self.k, self.lead = copies, len(copies), copies[0]
        self.model = self.lead.model
        # the model's own fast path, else the packed forward derived from its forward
        self.forward = getattr(self.model, "packed_forward", None) or partial(derived_packed_forward, self.model)
        self.layers = prunable_layers(self.model)  # lead's layers: mask scores, beta, structure
        self.stacks: dict[str, torch.Tensor] = {}
        self.failed: dict[int, BaseException] = {}
        self._stack([dict(t.model.named_modules()) for t in copies])
        self.masks: dict[str, torch.Tensor] | None = None
        self.sync_masks()
        self.opt: PackedOptimizer | None = None
        self.bypass = False  # set by a hook before a step: forward with the raw weights (RigL's dense gradient)
        self.noise: dict[str, torch.Tensor] = {}  # set by a hook before a step: a stochastic mask's U(0, 1) draws
        self.hooks = method_hooks.for_pack(self)
        self.soft = next(h for h in self.hooks if isinstance(h, method_hooks.SoftSchedules))
        # per step point, the hooks of the current segment's stage that act there
        self.active: dict[str, list] = {"before_step": [], "loss": [], "after_step": []}
        if self.lead.segment is not None and self.lead.opt_saved is not None:  # restored mid-segment
            self._make_optimizer(self.lead.segment[0])
            for k, t in enumerate(copies):
                self.opt.load_copy(k, t.opt_saved)
                t.opt_saved = None

    # ---- stacking -------------------------------------------------------------------------
    @torch.no_grad()
    def _stack(self, modules: list[dict[str, nn.Module]]) -> None:
        lead = self.lead.model
        for name, _ in list(lead.named_parameters()) + list(lead.named_buffers()):
            prefix, _, attr = name.rpartition(".")
            if attr == "weight_mask":
                continue
            owners = [m[prefix] for m in modules]
            stacked = torch.stack([getattr(o, attr).detach() for o in owners])
            is_param = attr in owners[0]._parameters
            if is_param:
                stacked.requires_grad_(True)
            for k, o in enumerate(owners):  # the copy's own tensor becomes its slice of the stack
                if is_param:
                    o._parameters[attr] = nn.Parameter(stacked.detach()[k])
                else:
                    o._buffers[attr] = stacked[k]
            self.stacks[name] = stacked

    def sync_masks(self) -> None:
        """Stack the copies' masks (after per-copy pruning, RigL or a restore) and re-point each copy's
        mask at its slice."""
        per_copy = [prunable_layers(t.model) for t in self.copies]
        live = [layers for k, layers in enumerate(per_copy) if k not in self.failed]
        has = {getattr(layers[n], "weight_mask", None) is not None for layers in live for n in layers}
        self.zeroed = False  # the masked-out weights and optimizer state are exactly 0 (enforce() makes it so)
        if has == {False}:
            self.masks = None
            return
        if len(has) > 1:
            raise RuntimeError("some copies of a pack have masks and some do not")
        for k in self.failed:  # a failed copy is no longer pruned; it trains on (harmlessly) in its slice
            for layer in per_copy[k].values():
                if layer.weight_mask is None:
                    layer.weight_mask = torch.ones_like(layer.weight)
        self.masks = {}
        for name in per_copy[0]:
            stacked = torch.stack([layers[name].weight_mask for layers in per_copy])
            for k, layers in enumerate(per_copy):
                layers[name].weight_mask = stacked[k]
            self.masks[name] = stacked

    @torch.no_grad()
    def enforce(self) -> None:
        """Pruned weights and their optimizer state back to exactly 0, for all copies at once."""
        if self.masks is None:
            return
        self.zeroed = True
        tensors, masks = [], []
        for name, mask in self.masks.items():
            tensors.append(self.stacks[name])
            masks.append(mask)
            for buf in (self.opt.buffers.get(name, {}).values() if self.opt else ()):
                tensors.append(buf)
                masks.append(mask)
        torch._foreach_mul_(tensors, masks)

    def per_copy_masks(self, change: Callable) -> None:
        """``change(k, state)`` for every live copy (it sets the copy's masks), then the stacks re-synced."""
        for k, c in enumerate(self.copies):
            if k not in self.failed:
                change(k, c)
        self.sync_masks()
        self.enforce()  # newly pruned weights' momentum too

    # ---- the packed forward ---------------------------------------------------------------------
    def _weight(self, prefix: str) -> torch.Tensor:
        """The stacked effective weight of a prunable layer: w * m(score) * mask (the ``masked_weight``
        of every copy at once)."""
        name = f"{prefix}.weight"
        layer = self.layers[name]
        score = self.stacks[f"{prefix}.mask_score"] if layer.mask_score is not None else None
        mask = self.masks[name] if self.masks is not None and not self.bypass else None
        return masked_weight(self.stacks[name], mask, layer.mask_kind, score, layer.mask_beta, self.noise.get(prefix),
                             zeroed=self.zeroed)

    # ---- segments and steps -----------------------------------------------------------------
    def _make_optimizer(self, stage: str) -> None:
        t = self.lead.cfg.train
        scores = [n for n in self.stacks if n.endswith("mask_score")]
        live = {n for n, _ in self.model.named_parameters()}
        weights = [n for n in self.stacks if n in live and n not in scores]
        groups = [(weights, [c.cfg.train.lr for c in self.copies], [c.cfg.train.weight_decay for c in self.copies])]
        scores = [n for n in scores if n in live]
        if scores and stage == "pre":
            groups.append((scores, [c.cfg.mask.lr for c in self.copies], [0.0] * self.k))
        self.opt = PackedOptimizer(t.optimizer, t.momentum if t.optimizer == "sgd" else 0.0, groups, self.stacks)
        self.params = [self.stacks[n] for g in groups for n in g[0]]
        for k, c in enumerate(self.copies):
            c.opt = CopyOptimizer(self.opt, k, c)

    def begin_segment(self, stage: str, rnd: int, total_steps: int) -> None:
        """A new optimizer and LR schedule (and RigL, or the gradual steps) for a training segment, unless
        it is already running (a restored run keeps its loaded optimizer state)."""
        lead = self.lead
        active = [h for h in self.hooks if h.active(stage)]
        self.active = {point: [h for h in active if getattr(type(h), point) is not getattr(method_hooks.Hook, point)]
                       for point in ("before_step", "loss", "after_step")}  # only the hooks that act there
        if lead.segment != (stage, rnd) or lead.opt is None or self.opt is None:
            for c in self.copies:
                c.begin_segment(stage, rnd, total_steps)
            self._make_optimizer(stage)
        else:
            for c in self.copies:
                c.seg_total = total_steps

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, stage: str) -> torch.Tensor:
        """Per-copy mean loss (K,) of logits (K, B, C); each sample's gradient is 1/B, as in one run."""
        k, b = y.shape
        logits, y = logits.float().reshape(k * b, -1), y.reshape(-1)
        trick = self.lead.post_loss if stage in ("post", "rigl") else None
        per = trick(logits, y, self.lead.cfg.post) if trick is not None else F.cross_entropy(logits, y, reduction="none")
        return per.view(k, b).sum(1) / b

    def step(self, x: torch.Tensor, y: torch.Tensor, stage: str, soft: SoftSchedule | None = None) -> torch.Tensor:
        """One optimizer step of every copy on its batch (x (K, B, ...), y (K, B)): the hooks' before-step
        point, masks enforced if they changed, packed forward, per-copy loss (+ the hooks' penalties), backward,
        step (then masks enforced after a dense gradient), the hooks' after-step point. Returns the detached per-copy losses (no host sync). ``soft``: the
        lead's post-pruning schedule of this epoch (``train_epoch`` passes it)."""
        lead, active = self.lead, self.active
        if soft is not None:
            self.soft.soft = soft
        for h in active["before_step"]:
            h.before_step(self, stage)
        if not self.zeroed:  # new masks since the last step: zero what they prune before the forward
            self.enforce()
        dense = self.bypass  # a dense gradient updates the masked-out weights: enforce() after the step
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=lead.amp):
                logits = self.forward(x, self._weight, self.stacks.get, lead.channels_last)
            losses = self._loss(logits, y, stage)
            for h in active["loss"]:
                losses = h.loss(self, stage, losses)
        finally:
            self.bypass = False
            self.noise = {}
        for p in self.params:
            p.grad = None
        losses.sum().backward()
        # the gradients are read after the step only by a dense-gradient step's hook (RigL's update)
        self.opt.step(self.stacks, lr_factor(lead.cfg.train.schedule, lead.seg_step, lead.seg_total), keep_grads=dense)
        for c in self.copies:
            c.seg_step += 1
        if dense:
            self.enforce()
        for h in active["after_step"]:
            h.after_step(self, stage)
        return losses.detach()

    def batches(self):
        """Each copy's batches from its own data generator, stacked (the same draws as a single run)."""
        lead = self.lead
        d, bs = lead.data, lead.cfg.train.batch_size
        if d.augment or self.k == 1:
            for pairs in zip(*(train_batches(d, bs, c.gen["data"]) for c in self.copies)):
                yield torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            return
        n = d.x_train.shape[0]
        orders = torch.stack([torch.randperm(n, generator=c.gen["data"]) for c in self.copies]).to(d.x_train.device)
        for start in range(0, n, bs):  # index_select of the flat indices: the same rows as x[idx], a plain gather
            idx = orders[:, start:start + bs]
            flat = idx.flatten()
            yield (d.x_train.index_select(0, flat).view(*idx.shape, *d.x_train.shape[1:]),
                   d.y_train.index_select(0, flat).view(idx.shape))

    def train_epoch(self, step: TrainEpoch) -> dict[int, dict]:
        """One training epoch of every live copy, then each copy's end of epoch (evaluation, metrics,
        the hooks' epoch-end point); per copy, the epoch's metrics."""
        lead = self.lead
        total = lead.segment_steps(step.epochs)
        self.begin_segment(step.stage, step.round, total)
        for c in self.copies:
            c.epoch_begin(step, total)
        self.soft.soft = lead.soft
        self.zeroed = False  # per-copy changes between epochs (pruning, rewinds, restores): enforce once
        loss_sum = torch.zeros(self.k, device=lead.device)
        batches = 0
        for x, y in self.batches():
            loss_sum += self.step(x, y, step.stage)
            batches += 1
        self.soft.soft = None
        losses = loss_sum.tolist()  # one host sync per epoch
        for k, c in enumerate(self.copies):
            if k not in self.failed:
                try:
                    c.settle(step, losses[k], batches, total)
                except TrainingDiverged as e:  # this copy alone
                    self.failed[k] = e
        scores = self.evaluate()
        out = {}
        for k, c in enumerate(self.copies):
            if k in self.failed:
                continue
            out[k] = c.epoch_end(step, losses[k], batches, total, scores.get(k))
            for h in self.hooks:
                h.epoch_end(self, c, step, out[k])
        return out

    def evaluate(self) -> dict[int, dict[str, float]]:
        """Every live copy's validation and test scores from one packed forward per batch, where the model
        declares its packed forward fit for evaluation (``packed_eval``: nothing in it depends on the train/eval
        mode) and the lead is live (its modules hold the schedules' values); else {} (each copy evaluates
        itself)."""
        if not getattr(self.model, "packed_eval", False) or 0 in self.failed:
            return {}
        lead = self.lead
        d, bs = lead.data, lead.cfg.train.eval_batch_size

        def forward(x):
            return self.forward(x, self._weight, self.stacks.get, lead.channels_last)

        val = evaluate_packed(forward, self.k, d.x_val, d.y_val, bs, lead.amp)
        test = evaluate_packed(forward, self.k, d.x_test, d.y_test, bs, lead.amp)
        return {k: {"val_acc": val[k][0], "val_loss": val[k][1], "test_acc": test[k][0], "test_loss": test[k][1]}
                for k in range(self.k) if k not in self.failed}

    def prune_step(self, k: int, step) -> dict:
        """Copy ``k``'s pruning round (or RigL's sparse start), with the hooks' prune points around it."""
        c = self.copies[k]
        if not isinstance(step, PruneStep):
            return c.rigl_init()
        for h in self.hooks:
            h.before_prune(self, c)
        metrics = c.prune(c.plan[c.step_idx])  # the copy's own densities
        for h in self.hooks:
            h.after_prune(self, c, metrics)
        return metrics

    # ---- run ------------------------------------------------------------------------------------
    def run(self, until: int | None = None) -> list[dict | BaseException]:
        """Train every copy to the end of its plan; per copy, its result or the error that ended it.
        ``until``: stop before plan step ``until`` instead, and return nothing (shared pre-training)."""
        lead = self.lead
        end = len(lead.plan) if until is None else min(until, len(lead.plan))
        while lead.step_idx < end and len(self.failed) < self.k:
            started = time.perf_counter()
            step = lead.plan[lead.step_idx]
            live = [k for k in range(self.k) if k not in self.failed]
            if isinstance(step, TrainEpoch):
                for k in live:
                    self.copies[k].check_injected_failure()
                metrics = self.train_epoch(step)
            else:
                metrics = {k: self.prune_step(k, step) for k in live}
                self.sync_masks()
                if isinstance(step, PruneStep):
                    self.opt = None
            share = (time.perf_counter() - started) / max(len(live), 1)
            for k, c in enumerate(self.copies):
                c.step_idx += 1
                if k in metrics:
                    c.finish_step(step, metrics[k], share)
        if until is not None:
            return []
        return [self.failed[k] if k in self.failed else c.result() for k, c in enumerate(self.copies)]
