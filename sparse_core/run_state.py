"""One run's state: ``RunState`` (what a run is between the trainer's steps).

A run is a fixed plan of typed steps (``plan.py``: pre-training epochs, an optional gradual-pruning
stage, pruning rounds with optional training between them, post-training epochs; or RigL's epochs).
The loop that walks it is ``trainer.Trainer``'s (a single run is its pack of one); this module holds
what a run does per copy: its construction, the bookkeeping of an epoch's end (divergence check,
evaluation, the best epoch by validation, the rewind point), the log, the result, and its full state
as a checkpoint. Its pruning steps are ``run_prune.PruneSteps``.

After every step the run can hand out its full state (weights, masks, optimizer, LR schedule, RNG,
position in the plan): tensors, numbers, strings, lists, tuples and dicts only, so it loads with
``torch.load(..., weights_only=True)`` (``sparse_core.checkpoint``), and a state handed back continues
the run to the same result. The logging callback ``log(metrics, checkpoint)`` receives each step's
metrics (a ``results.StepEvent`` as a dict, with ``stage_end`` and, for pruning, ``last_prune``, so no
reader re-derives the plan) and a zero-argument function that returns that state, so a caller who
does not checkpoint pays nothing for it.

Every epoch is evaluated on the validation split (``val_acc``) and on the test split (``test_acc``);
anything that selects (the best epoch, a tuner, a scheduler) reads validation only.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn as nn

from . import connectivity, learned_mask
from .checks import validate_names
from .config import Config, from_flat, run_key
from .data import TensorData, load
from .init import initialise
from .masks import get_masks, prunable_weights, set_masks
from .metrics import chance_marks, density_summary, evaluate, flops
from .models import build
from .plan import TrainEpoch, derive_seed, gradual_steps, total_epochs
from .plan import build as build_plan
from .post_prune import SoftSchedule, loss_of, make_plain
from .pruning import collapsed
from .results import InjectedFailure, TrainingDiverged
from .rigl import RigL
from .run_prune import PruneSteps

# log(metrics, checkpoint) after each plan step; checkpoint() gives the state after it. checkpoint is None for
# the epochs of a pre-training shared with other runs (sparse_core/runner.py), handed to the log afterwards.
Log = Callable[[dict, Callable[[], dict] | None], None]
# a learned mask at the end of pre-training, and the overlap of its hard set with the pruned set (NaN without one)
MASK_MARKS = ("mask_target", "mask_soft_density", "mask_hard_density", "mask_binary_gap", "mask_jaccard")
GENERATORS = ("init", "data", "prune", "rigl", "reinit", "mask")  # the scoring batch draws from a fresh "score" seed each round (the same batch every round)
FORMAT = 4  # 2: validation metrics, typed plan (the position is an index into plan.build(cfg)); 3: packed optimizer
# state; 4: the learned mask's multipliers and its noise generator


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available; use train.device=auto or cpu")
    return torch.device(name)


class RunState(PruneSteps):
    Diverged = TrainingDiverged
    MASK_MARKS = MASK_MARKS

    def __init__(self, cfg: Config, log: Log | None = None, data: TensorData | None = None):
        validate_names(cfg)
        self.cfg, self.log = cfg, log or (lambda metrics, checkpoint: None)
        self.device = resolve_device(cfg.train.device)
        self.data = data if data is not None else load(cfg.data).to(self.device)  # a pack shares one copy
        self.gen = {n: torch.Generator().manual_seed(derive_seed(cfg.seed, n)) for n in GENERATORS}
        self.model = self.fresh_model(self.gen["init"])
        self.zero_at_init = {n: (w == 0).cpu() for n, w in prunable_weights(self.model).items()}
        self.amp = cfg.train.amp and self.device.type == "cuda"
        self.channels_last = cfg.train.channels_last and self.device.type == "cuda" and self.data.x_train.dim() == 4
        if cfg.mask.kind != "none":
            learned_mask.attach(self.model, cfg.mask, self.gen["mask"])
        self.plan = build_plan(cfg)
        self.post_loss = loss_of(cfg.to_flat())  # None: plain cross-entropy after pruning too
        self.step_idx = 0
        self.masks: dict[str, torch.Tensor] | None = None  # None = dense
        self.opt = None  # this copy's view of its trainer's optimizer (optim.CopyOptimizer)
        self.opt_saved: dict | None = None  # a restored optimizer state, loaded when the trainer is built
        self.segment: tuple | None = None  # (stage, round) the optimizer belongs to
        self.seg_step = 0  # optimizer steps taken in this segment
        self.seg_total = 0  # optimizer steps the segment will take
        self.gradual_at: set[int] = set()  # steps of a gradual stage after which the mask is re-pruned
        self.soft: SoftSchedule | None = None  # the current epoch's post-pruning schedules
        # the Lagrange multiplier of a learned mask steered to the density (a view into its trainer's stack)
        self.mask_dual = torch.zeros((), device=self.device) if learned_mask.steered(cfg.mask) else None
        self.rigl: RigL | None = None
        self.rigl_regrown = 0
        self.rewind_state: dict | None = None
        self.history: list[dict] = []
        self.best: dict = {}  # best_val_acc, best_val_epoch, test_acc_at_best_val (post-pruning epochs)
        self.marks = {k: float("nan") for k in ("pre_val_acc", "pre_test_acc", "prune_val_acc", "prune_test_acc")
                      + MASK_MARKS}
        self.restored = False
        self.elapsed = 0.0
        if cfg.prune.rewind_epoch == 0 and cfg.train.method == "prune":
            self.rewind_state = self.cpu_state_dict()

    # ---- construction ---------------------------------------------------------------------
    def fresh_model(self, generator: torch.Generator) -> nn.Module:
        cfg = self.cfg
        model = build(cfg.model, self.data.in_shape, self.data.num_classes, unit_grad_at_zero=cfg.init.name == "zero")
        initialise(cfg.init.name, model, generator)
        model = model.to(self.device)
        if cfg.train.channels_last and self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model

    def cpu_state_dict(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    # ---- segments and epochs ----------------------------------------------------------------
    def segment_steps(self, epochs: int) -> int:
        return epochs * math.ceil(self.data.x_train.shape[0] / self.cfg.train.batch_size)

    def segment_extras(self, stage: str, total_steps: int) -> None:
        self.seg_total = total_steps
        self.rigl = RigL(self.cfg.rigl, total_steps, self.cfg.prune.density, self.cfg.prune.scope) \
            if stage == "rigl" else None
        self.gradual_at = set(gradual_steps(total_steps, self.cfg.prune.gradual_every)) if stage == "gradual" else set()

    def begin_segment(self, stage: str, rnd: int, total_steps: int) -> None:
        if stage == "gradual":
            learned_mask.fold(self.model)  # a learned mask ends with pre-training
        self.segment, self.seg_step = (stage, rnd), 0
        self.segment_extras(stage, total_steps)

    def evaluate(self) -> dict[str, float]:
        d, bs = self.data, self.cfg.train.eval_batch_size
        was_training = self.model.training
        self.model.eval()  # once for both sets
        val_acc, val_loss = evaluate(self.model, d.x_val, d.y_val, bs, self.amp)
        test_acc, test_loss = evaluate(self.model, d.x_test, d.y_test, bs, self.amp)
        self.model.train(was_training)
        return {"val_acc": val_acc, "val_loss": val_loss, "test_acc": test_acc, "test_loss": test_loss}

    def epoch_begin(self, step: TrainEpoch, total: int) -> None:
        """Per-copy set-up of a training epoch: the post-pruning schedules."""
        self.soft = SoftSchedule(self.model, self.cfg.post, total) if step.stage in ("post", "rigl") else None
        if not self.model.training:  # evaluate() restores the mode: usually nothing to walk
            self.model.train()

    def settle(self, step: TrainEpoch, loss_sum: float, batches: int, total: int) -> None:
        """Per-copy end of a training epoch's training: divergence check, the soft schedules' values of the
        epoch's last step, the plain network at their end. The network is then the one ``epoch_end`` evaluates."""
        soft = self.soft
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(f"training diverged: the {step.stage} loss became non-finite in epoch "
                                   f"{step.epoch + 1} (train.lr={self.cfg.train.lr}); lower train.lr")
        if soft is not None and batches:
            soft.set(self.seg_step - 1)  # the value of the epoch's last step (the trainer sets its lead's each step)
        if soft is not None and self.seg_step >= total:
            make_plain(self.model)  # the end of post-training is the plain network

    def epoch_end(self, step: TrainEpoch, loss_sum: float, batches: int, total: int,
                  scores: dict[str, float] | None = None) -> dict:
        """Per-copy end of a training epoch, after ``settle``: evaluation (``scores``, when the trainer
        evaluated the copies together), the epoch's metrics, the best epoch by validation, rewind point (a
        method's metrics are its hook's ``epoch_end``)."""
        cfg, stage, epoch = self.cfg, step.stage, step.epoch
        scores = scores if scores is not None else self.evaluate()
        metrics = {"stage": stage, "round": step.round, "stage_epoch": epoch + 1, "stage_end": step.stage_end,
                   "train_loss": loss_sum / max(batches, 1), **scores,
                   "lr": self.opt.param_groups[0]["lr"], "density": self.density()}
        if stage == "pre" and step.stage_end:
            self.marks.update(pre_val_acc=scores["val_acc"], pre_test_acc=scores["test_acc"])
        if stage in ("post", "rigl") and scores["val_acc"] > self.best.get("best_val_acc", -1.0):
            self.best = {"best_val_acc": scores["val_acc"], "best_val_epoch": len(self.history) + 1,
                         "test_acc_at_best_val": scores["test_acc"]}
        if stage == "pre" and epoch + 1 == cfg.prune.rewind_epoch:
            self.rewind_state = self.cpu_state_dict()
        return metrics

    # ---- run --------------------------------------------------------------------------------
    def check_injected_failure(self) -> None:
        fail_at = self.cfg.train.fail_at_epoch
        if fail_at >= 0 and not self.restored and len(self.history) + 1 == fail_at:
            raise InjectedFailure(f"train.fail_at_epoch={fail_at}: injected failure at the start of epoch {fail_at}")

    def finish_step(self, step, metrics: dict, seconds: float) -> None:
        """Book a finished plan step (``seconds``: this copy's share of it) and hand it to the log."""
        self.elapsed += seconds
        if isinstance(step, TrainEpoch):
            self.history.append(metrics)
            metrics = {**metrics, "epoch": len(self.history), "epochs": total_epochs(self.cfg)}
        metrics["seconds"] = self.elapsed
        self.log(metrics, self.state_dict)

    def result(self) -> dict:
        """The run's result (``results.RunResult`` as a dict)."""
        masks = self.current_masks()
        summary = density_summary(self.model, masks)
        flops_dense, flops_sparse = flops(self.model, self.data.in_shape, masks)
        eff = connectivity.effective(masks) or {"effective_density": float("nan"), "effective_weights": -1,
                                                 "effective_units": {}}
        final = self.evaluate()
        best = self.best or {"best_val_acc": final["val_acc"], "best_val_epoch": len(self.history),
                             "test_acc_at_best_val": final["test_acc"]}
        return {
            "run_key": run_key(self.cfg), **final, **best, **self.marks,
            **chance_marks(final["test_acc"], self.data.y_test, self.data.num_classes),  # chance_acc, at_chance
            "density": summary["density"],
            "density_target": self.cfg.prune.density,
            "density_all": summary["density_all"],
            "kept_weights": summary["kept_weights"],
            "prunable_weights": summary["prunable_weights"],
            "layer_density": summary["layer_density"],
            **eff,  # effective_density, effective_weights, effective_units (sparse_core/connectivity.py)
            "collapsed_layers": collapsed(masks),
            "flops_dense": flops_dense,
            "flops_sparse": flops_sparse,
            "rigl_regrown": self.rigl.regrown if self.rigl else self.rigl_regrown,
            "seconds": self.elapsed,
            "epochs": len(self.history),
            "data_sizes": self.data.sizes,
            "device": str(self.device),
            "config": self.cfg.to_flat(),
            "history": self.history,
        }

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs; tensors and plain containers only (weights_only=True loads it)."""
        return {
            "format": FORMAT,
            "config": self.cfg.to_flat(),
            "step_idx": self.step_idx,
            "model": self.cpu_state_dict(),
            "has_mask_scores": bool(learned_mask.score_params(self.model)),
            "mask_beta": learned_mask.beta(self.model),  # the fold at pruning uses the last epoch's temperature
            "mask_dual": None if self.mask_dual is None else self.mask_dual.detach().cpu().clone(),
            "masks": None if self.masks is None else {n: m.cpu().clone() for n, m in self.masks.items()},
            "optimizer": self.opt.state_dict() if self.opt else None,  # the LR schedule is a function of seg_step
            "segment": self.segment,
            "seg_step": self.seg_step,
            "generators": {n: g.get_state() for n, g in self.gen.items()},
            "rewind_state": self.rewind_state,
            "history": copy.deepcopy(self.history),
            "best": dict(self.best),
            "marks": dict(self.marks),
            "rigl_regrown": self.rigl.regrown if self.rigl else self.rigl_regrown,
            "elapsed": self.elapsed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (``state_dict`` of a run of the same config)."""
        if state.get("format") != FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r} is not {FORMAT} (written by another version "
                             f"of sparse_core); delete it to start afresh")
        saved = from_flat(state["config"])
        if run_key(saved) != run_key(self.cfg):
            raise ValueError(f"checkpoint belongs to a different config (run_key {run_key(saved)} != "
                             f"{run_key(self.cfg)})")
        if not state["has_mask_scores"]:
            learned_mask.fold(self.model)  # the scores were folded into the weights before this point
        elif state.get("mask_beta") is not None:
            learned_mask.set_beta(self.model, state["mask_beta"])
        self.model.load_state_dict(state["model"])
        masks = state["masks"]
        self.masks = None if masks is None else {n: m.to(self.device) for n, m in masks.items()}
        if self.masks is not None:
            set_masks(self.model, self.masks)
        if state["mask_dual"] is not None:
            self.mask_dual = state["mask_dual"].to(self.device).clone()
        self.step_idx, self.segment, self.seg_step = state["step_idx"], state["segment"], state["seg_step"]
        if state["optimizer"] is not None:  # loaded into the packed optimizer when the run's trainer is built
            step = self.plan[self.step_idx] if self.step_idx < len(self.plan) else None
            self.segment_extras(self.segment[0], self.segment_steps(step.epochs) if isinstance(step, TrainEpoch) else 0)
            self.opt_saved = state["optimizer"]
            if self.rigl is not None:
                self.rigl.regrown = state["rigl_regrown"]
        self.rigl_regrown = state["rigl_regrown"]
        for n, g in self.gen.items():
            g.set_state(state["generators"][n])
        self.rewind_state = state["rewind_state"]
        self.history = state["history"]
        self.best, self.marks = dict(state["best"]), dict(state["marks"])
        self.elapsed = state["elapsed"]
        self.restored = True

    # ---- masks ----------------------------------------------------------------------------------
    def set_masks(self, masks: dict[str, torch.Tensor] | None) -> None:
        self.masks = masks
        set_masks(self.model, masks)

    def current_masks(self) -> dict[str, torch.Tensor]:
        return self.masks if self.masks is not None else get_masks(self.model)
