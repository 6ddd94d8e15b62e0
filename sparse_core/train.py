"""The trainer: ``run(cfg, log, state) -> result``.

A run is a fixed plan of typed steps (``plan.py``: pre-training epochs, an optional gradual-pruning
stage, pruning rounds with optional training between them, post-training epochs; or RigL's epochs).
After every step the trainer can hand out its full state (weights, masks, optimizer, LR schedule,
RNG, position in the plan), and a state handed back continues the run to the same result.

Training runs through ``packed.Pack`` (``sparse_core/packed.py``): a single run is the pack of one, so
one hot loop serves single and packed runs; this module holds everything a run does per copy (its
plan, epochs' bookkeeping, pruning, RigL's start, evaluation, result). The logging callback ``log(metrics, checkpoint)`` receives each step's metrics (with ``stage_end`` and, for
pruning, ``last_prune``, so no reader re-derives the plan) and a zero-argument function that returns
that state, so a caller who does not checkpoint pays nothing for it.

Every epoch is evaluated on the validation split (``val_acc``) and on the test split (``test_acc``);
anything that selects (the best epoch, a tuner, a scheduler) reads validation only.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn

from . import connectivity, learned_mask, pruners, rescale, state
from .checks import validate_names
from .config import Config, run_key
from .data import TensorData, class_balanced_subset, load
from .export import figures
from .init import initialise
from .masks import count, get_masks, prunable_weights, set_masks
from .metrics import chance_marks, density_summary, evaluate, flops
from .models import build
from .packed import Pack
from .plan import PruneStep, TrainEpoch, derive_seed, gradual_steps, lr_factor, total_epochs
from .plan import build as build_plan
from .post_prune import SoftSchedule, loss_of, make_plain
from .pruning import collapsed, masks_from_scores, shuffle
from .rigl import RigL, initial_masks

__all__ = ["Trainer", "run", "plain_model", "total_epochs", "lr_factor", "derive_seed", "TrainingDiverged",
           "InjectedFailure", "resolve_device", "STATE_FORMAT"]
STATE_FORMAT = state.FORMAT

# log(metrics, checkpoint) after each plan step; checkpoint() gives the state after it. checkpoint is None for
# the epochs of a pre-training shared with other runs (sparse_core/prefix.py), handed to the log afterwards.
Log = Callable[[dict, Callable[[], dict] | None], None]
# a learned mask at the end of pre-training, and the overlap of its hard set with the pruned set (NaN without one)
MASK_MARKS = ("mask_target", "mask_soft_density", "mask_hard_density", "mask_binary_gap", "mask_jaccard")
GENERATORS = ("init", "data", "prune", "rigl", "reinit", "mask")  # the scoring batch draws from a fresh "score" seed each round (the same batch every round)


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite (scores and masks would be meaningless)."""


class InjectedFailure(RuntimeError):
    """Raised by ``train.fail_at_epoch`` (tests of retry-from-checkpoint)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available; use train.device=auto or cpu")
    return torch.device(name)


class Trainer:
    Diverged = TrainingDiverged

    def __init__(self, cfg: Config, log: Log | None = None, data: TensorData | None = None):
        validate_names(cfg)
        self.cfg, self.log = cfg, log or (lambda metrics, checkpoint: None)
        self.device = resolve_device(cfg.train.device)
        self.data = data if data is not None else load(cfg.data).to(self.device)  # a pack shares one copy
        self.gen = {n: torch.Generator().manual_seed(derive_seed(cfg.seed, n)) for n in GENERATORS}
        self.model = self._fresh_model(self.gen["init"])
        self.zero_at_init = {n: (w == 0).cpu() for n, w in prunable_weights(self.model).items()}
        self.amp = cfg.train.amp and self.device.type == "cuda"
        self.channels_last = cfg.train.channels_last and self.device.type == "cuda" and self.data.x_train.dim() == 4
        if cfg.mask.kind != "none":
            learned_mask.attach(self.model, cfg.mask, self.gen["mask"])
        self.plan = build_plan(cfg)
        self.post_loss = loss_of(cfg.to_flat())  # None: plain cross-entropy after pruning too
        self.step_idx = 0
        self.masks: dict[str, torch.Tensor] | None = None  # None = dense
        self.opt = None  # this copy's view of its pack's optimizer (packed.CopyOptimizer)
        self.opt_saved: dict | None = None  # a restored optimizer state, loaded when the pack is built
        self.own_pack: Pack | None = None  # the pack of one behind train_epoch/train_step/begin_segment
        self.segment: tuple | None = None  # (stage, round) the optimizer belongs to
        self.seg_step = 0  # optimizer steps taken in this segment
        self.seg_total = 0  # optimizer steps the segment will take
        self.gradual_at: set[int] = set()  # steps of a gradual stage after which the mask is re-pruned
        # the Lagrange multiplier of a learned mask steered to the density (a view into its pack's stack once packed)
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
            self.rewind_state = self._cpu_state_dict()

    # ---- construction ---------------------------------------------------------------------
    def _fresh_model(self, generator: torch.Generator) -> nn.Module:
        cfg = self.cfg
        model = build(cfg.model, self.data.in_shape, self.data.num_classes, unit_grad_at_zero=cfg.init.name == "zero")
        initialise(cfg.init.name, model, generator)
        model = model.to(self.device)
        if cfg.train.channels_last and self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model

    def _cpu_state_dict(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    # ---- state (sparse_core/state.py) -----------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs; tensors and plain containers only (weights_only=True loads it)."""
        return state.capture(self)

    def load_state_dict(self, saved: dict) -> None:
        state.restore(self, saved)

    # ---- steps ------------------------------------------------------------------------------
    def _segment_steps(self, epochs: int) -> int:
        return epochs * math.ceil(self.data.x_train.shape[0] / self.cfg.train.batch_size)

    def segment_extras(self, stage: str, total_steps: int) -> None:
        self.seg_total = total_steps
        self.rigl = RigL(self.cfg.rigl, total_steps, self.cfg.prune.density, self.cfg.prune.scope) \
            if stage == "rigl" else None
        self.gradual_at = set(gradual_steps(total_steps, self.cfg.prune.gradual_every)) if stage == "gradual" else set()

    def pack(self) -> Pack:
        """This run as a pack of one (what ``run`` trains through)."""
        if self.own_pack is None:
            self.own_pack = Pack([self])
        return self.own_pack

    def begin_segment(self, stage: str, rnd: int, total_steps: int) -> None:
        self.pack().begin_segment(stage, rnd, total_steps)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, stage: str, soft: SoftSchedule | None = None) -> torch.Tensor:
        """One optimizer step on a batch (``Pack.step`` with K = 1); returns the detached loss."""
        return self.pack().step(x.unsqueeze(0), y.unsqueeze(0), stage, soft)[0]

    def _evaluate(self) -> dict[str, float]:
        d, bs = self.data, self.cfg.train.eval_batch_size
        val_acc, val_loss = evaluate(self.model, d.x_val, d.y_val, bs, self.amp)
        test_acc, test_loss = evaluate(self.model, d.x_test, d.y_test, bs, self.amp)
        return {"val_acc": val_acc, "val_loss": val_loss, "test_acc": test_acc, "test_loss": test_loss}

    def train_epoch(self, step: TrainEpoch) -> dict:
        """One training epoch of the plan, evaluated on validation and test (as a pack of one)."""
        pack = self.pack()
        out = pack.train_epoch(step)
        if 0 in pack.failed:
            raise pack.failed[0]
        return out[0]

    def epoch_begin(self, step: TrainEpoch, total: int) -> SoftSchedule | None:
        """Per-copy set-up of a training epoch: the soft schedules (a learned mask's temperature and target
        follow the steps: ``Pack.step``)."""
        cfg, stage = self.cfg, step.stage
        soft = SoftSchedule(self.model, cfg.post, total) if stage in ("post", "rigl") else None
        self.model.train()
        return soft

    def epoch_end(self, step: TrainEpoch, loss_sum: float, batches: int, soft: SoftSchedule | None, total: int) -> dict:
        """Per-copy end of a training epoch: divergence check, plain network at the end of the soft
        schedules, evaluation, the epoch's metrics, the best epoch by validation, rewind point."""
        cfg, stage, epoch = self.cfg, step.stage, step.epoch
        learned = stage == "pre" and cfg.mask.kind != "none"
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(f"training diverged: the {stage} loss became non-finite in epoch {epoch + 1} "
                                   f"(train.lr={cfg.train.lr}); lower train.lr")
        if soft is not None and batches:
            soft.set(self.seg_step - 1)  # the value of the epoch's last step (the pack sets its lead's each step)
        if soft is not None and self.seg_step >= total:
            make_plain(self.model)  # the end of post-training is the plain network
        scores = self._evaluate()
        metrics = {"stage": stage, "round": step.round, "stage_epoch": epoch + 1, "stage_end": step.stage_end,
                   "train_loss": loss_sum / max(batches, 1), **scores,
                   "lr": self.opt.param_groups[0]["lr"], "density": self._density()}
        if learned:
            metrics.update(self._mask_metrics(epoch))
            if step.stage_end:
                self.marks.update({k: metrics[k] for k in MASK_MARKS if k in metrics})
        if soft is not None:
            metrics.update(soft.current)  # each schedule trick's value (soft_t, skip_alpha, ...)
        if self.rigl is not None and stage == "rigl":
            metrics["rigl_regrown"] = self.rigl.regrown
        if stage == "pre" and step.stage_end:
            self.marks.update(pre_val_acc=scores["val_acc"], pre_test_acc=scores["test_acc"])
        if stage in ("post", "rigl") and scores["val_acc"] > self.best.get("best_val_acc", -1.0):
            self.best = {"best_val_acc": scores["val_acc"], "best_val_epoch": len(self.history) + 1,
                         "test_acc_at_best_val": scores["test_acc"]}
        if stage == "pre" and epoch + 1 == cfg.prune.rewind_epoch:
            self.rewind_state = self._cpu_state_dict()
        return metrics

    def _mask_metrics(self, epoch: int) -> dict[str, float]:
        """A learned mask's state at the end of a pre-training epoch: temperature, the target density and
        the multipliers (steered masks), soft and hard density, binary gap."""
        cfg = self.cfg
        out = {"mask_beta": learned_mask.beta(self.model)}
        if self.mask_dual is not None:
            out["mask_target"] = learned_mask.target_at(self.seg_step, self.seg_total, cfg.prune.density, cfg.mask)
            out["mask_lambda"] = float(self.mask_dual)
        return {**out, **learned_mask.stats(self.model, self.zero_at_init)}

    def _score_inputs(self, pruner: str | None = None) -> pruners.ScoreInputs:
        x = y = None
        if pruners.needs_data(pruner or self.cfg.prune.pruner):
            x, y = self._scoring_batch()
        return pruners.ScoreInputs(x, y, self.data.in_shape, self.gen["prune"], self.cfg.prune)

    def _scoring_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "score"))  # the same batch every round
        return class_balanced_subset(self.data, self.cfg.prune.samples_per_class, g)

    def _mask_to(self, density: float, pruner: str | None = None) -> None:
        """Score (with ``prune.pruner`` or ``pruner``), keep the top ``density`` (weights pruned before stay
        pruned), install the masks."""
        pruner = pruner or self.cfg.prune.pruner
        scores = pruners.score(pruner, self.model, self._score_inputs(pruner))
        self.masks = masks_from_scores(scores, density, self.cfg.prune.scope, previous=self.masks)
        set_masks(self.model, self.masks)

    def prune(self, step: PruneStep) -> dict:
        """One pruning round of the plan (a no-op at density 1). A learned mask is folded into the
        weights first (w <- w * m), so every pruner scores the network as it computes."""
        p, trained = self.cfg.prune, bool(self.history)
        hard = {n: h.cpu() for n, h in learned_mask.hard_set(self.model).items()}  # the mask's choice, before the fold
        learned_mask.fold(self.model)
        if step.density < 1.0:
            if trained:  # prune.rescale: what the pruner registered (auto) or the user chose
                fix = p.rescale if p.rescale != "auto" else pruners.rescale_after_training(p.pruner)
            else:  # pruning at init: init.sparse_scale, measured against the dense init network
                fix = "data" if self.cfg.init.sparse_scale and self.cfg.init.name == "kaiming" else "none"
            fix = fix if not (step.last and p.reinit) and self.rewind_state is None else "none"
            x_cal = self._scoring_batch()[0] if fix == "data" else None
            reference = rescale.linear_std(self.model, x_cal) if x_cal is not None else None
            before = self.masks
            self._mask_to(step.density)
            if step.last and p.shuffle:
                self.masks = shuffle(self.masks, self.gen["prune"])
                set_masks(self.model, self.masks)
            if self.rewind_state is not None:
                self._rewind()
            if step.last and p.reinit:
                self._reinit()
            if step.last and p.reinit:
                self._scale_sparse_init()
            if fix == "sqrt":
                rescale.sqrt_density(self.model, before, self.masks)
            elif fix == "data":
                rescale.recalibrate(self.model, x_cal, reference)
        scores = self._evaluate()
        if step.last:
            self.marks.update(prune_val_acc=scores["val_acc"], prune_test_acc=scores["test_acc"])
        self.opt = self.segment = None
        if self.own_pack is not None:
            self.own_pack.sync_masks()
        masks = self.masks if self.masks is not None else get_masks(self.model)
        out = {"stage": "prune", "round": step.round, "last_prune": step.last, "stage_end": True,
               "val_acc_after_prune": scores["val_acc"], "test_acc_after_prune": scores["test_acc"],
               "density": self._density(), "n_collapsed_layers": len(collapsed(masks))}
        if hard:  # overlap of the learned mask's own choice and the pruned set
            jac = learned_mask.jaccard(hard, {n: m.cpu() for n, m in masks.items()})
            out["mask_jaccard"] = self.marks["mask_jaccard"] = jac
        return out

    @torch.no_grad()
    def _rewind(self) -> None:
        current = self.model.state_dict()
        self.model.load_state_dict({k: self.rewind_state[k].to(v.device) if k in self.rewind_state else v
                                    for k, v in current.items()})
        set_masks(self.model, self.masks)

    @torch.no_grad()
    def _reinit(self) -> None:
        fresh = self._fresh_model(self.gen["reinit"])
        for (name, w), new in zip(prunable_weights(self.model).items(), prunable_weights(fresh).values()):
            w.copy_(new)
        set_masks(self.model, self.masks)

    @torch.no_grad()
    def _scale_sparse_init(self) -> None:
        """Kaiming assumes every input is connected; with a fraction d of them kept, scaling by
        1/sqrt(d) restores the pre-activation variance, without which a deep sparse MLP's
        signal vanishes (Evci et al. 2022, "Gradient flow in sparse neural networks")."""
        if self.cfg.init.sparse_scale and self.cfg.init.name == "kaiming":
            rescale.sqrt_density(self.model, None, self.masks)

    def _density(self) -> float:
        if self.masks is None:
            return 1.0
        kept, total = count(self.masks)
        return kept / total

    # ---- run --------------------------------------------------------------------------------
    def check_injected_failure(self) -> None:
        fail_at = self.cfg.train.fail_at_epoch
        if fail_at >= 0 and not self.restored and len(self.history) + 1 == fail_at:
            raise InjectedFailure(f"train.fail_at_epoch={fail_at}: injected failure at the start of epoch {fail_at}")

    def rigl_init(self) -> dict:
        """RigL's sparse start at ``rigl.start_density`` (or the target): random, or a pruner's mask of the
        network at init in ``prune.rounds`` rounds, rescaled as pruning at init is (``init.sparse_scale``)."""
        r = self.cfg.rigl
        start = max(r.start_density, self.cfg.prune.density)
        if r.start == "random":
            self.masks = initial_masks(self.model, start, r, self.gen["rigl"])
            set_masks(self.model, self.masks)
            self._scale_sparse_init()
        else:
            x_cal = self._scoring_batch()[0] if self.cfg.init.sparse_scale and self.cfg.init.name == "kaiming" else None
            reference = rescale.linear_std(self.model, x_cal) if x_cal is not None else None
            rounds = self.cfg.prune.rounds
            for k in range(1, rounds + 1):
                self._mask_to(start ** (k / rounds), r.start)
            if x_cal is not None:
                rescale.recalibrate(self.model, x_cal, reference)
        return {"stage": "rigl_init", "stage_end": True, "density": self._density()}

    def finish_step(self, step, metrics: dict, seconds: float) -> None:
        """Book a finished plan step (``seconds``: this copy's share of it) and hand it to the log."""
        self.elapsed += seconds
        if isinstance(step, TrainEpoch):
            self.history.append(metrics)
            metrics = {**metrics, "epoch": len(self.history), "epochs": total_epochs(self.cfg)}
        metrics["seconds"] = self.elapsed
        self.log(metrics, self.state_dict)

    def run(self) -> dict:
        out = self.pack().run()[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def result(self) -> dict:
        masks = self.masks if self.masks is not None else get_masks(self.model)
        summary = density_summary(self.model, masks)
        flops_dense, flops_sparse = flops(self.model, self.data.in_shape, masks)
        eff = connectivity.effective(masks) or {"effective_density": float("nan"), "effective_weights": -1,
                                                 "effective_units": {}}
        final = self._evaluate()
        best = self.best or {"best_val_acc": final["val_acc"], "best_val_epoch": len(self.history),
                             "test_acc_at_best_val": final["test_acc"]}
        return {
            "run_key": run_key(self.cfg),
            **final,
            **best,
            **chance_marks(final["test_acc"], self.data.y_test, self.data.num_classes),  # chance_acc, at_chance
            **self.marks,
            "density": summary["density"],
            "density_target": self.cfg.prune.density,
            **{k: summary[k] for k in ("density_all", "kept_weights", "prunable_weights")},
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


def run(cfg: Config, log: Log | None = None, state: dict | None = None, export_path: str | None = None) -> dict[str, Any]:
    """Run the whole pipeline for ``cfg``; ``state`` (from a checkpoint) continues a run. The result
    carries the model's measured size and latency (``export.figures``); ``export_path`` also writes the
    compact model there."""
    trainer = Trainer(cfg, log)
    if state is not None:
        trainer.load_state_dict(state)
    result = trainer.run()
    result.update(figures(trainer, export_path))
    return result


def plain_model(cfg: Config, state_dict: dict, in_shape, num_classes: int) -> nn.Module:
    """The plain architecture (nn.Linear/nn.Conv2d, ReLU, no skips) loaded with a trained state."""
    model = build(cfg.model, in_shape, num_classes, plain=True)
    model.load_state_dict(state_dict)
    return model
