"""A run's pruning steps (``PruneSteps``, a part of ``run_state.RunState``): a pruning round of the plan
(score, keep the top density, shuffle, rewind, re-initialise, rescale) and RigL's sparse start, on the
run's own module. A learned mask is folded into the weights before a round by its hook
(``hooks.LearnedMask.before_prune``)."""

from __future__ import annotations

import torch

from . import pruners, rescale
from .data import class_balanced_subset
from .masks import count, prunable_weights, set_masks
from .plan import PruneStep, derive_seed
from .pruning import collapsed, masks_from_scores, shuffle
from .rigl import initial_masks


class PruneSteps:
    def _score_inputs(self, pruner: str | None = None) -> pruners.ScoreInputs:
        x = y = None
        if pruners.needs_data(pruner or self.cfg.prune.pruner):
            x, y = self.scoring_batch()
        return pruners.ScoreInputs(x, y, self.data.in_shape, self.gen["prune"], self.cfg.prune)

    def scoring_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "score"))  # the same batch every round
        return class_balanced_subset(self.data, self.cfg.prune.samples_per_class, g)

    def mask_to(self, density: float, pruner: str | None = None) -> None:
        """Score (with ``prune.pruner`` or ``pruner``), keep the top ``density`` (weights pruned before stay
        pruned), install the masks."""
        pruner = pruner or self.cfg.prune.pruner
        scores = pruners.score(pruner, self.model, self._score_inputs(pruner))
        self.set_masks(masks_from_scores(scores, density, self.cfg.prune.scope, previous=self.masks))

    def _rescale_kind(self, step: PruneStep) -> str:
        p = self.cfg.prune
        if self.history:  # prune.rescale: what the pruner registered (auto) or the user chose
            fix = p.rescale if p.rescale != "auto" else pruners.rescale_after_training(p.pruner)
        else:  # pruning at init: init.sparse_scale, measured against the dense init network
            fix = "data" if self.cfg.init.sparse_scale and self.cfg.init.name == "kaiming" else "none"
        return fix if not (step.last and p.reinit) and self.rewind_state is None else "none"

    def prune(self, step: PruneStep) -> dict:
        """One pruning round of the plan (a no-op at density 1)."""
        p = self.cfg.prune
        if step.density < 1.0:
            fix = self._rescale_kind(step)
            x_cal = self.scoring_batch()[0] if fix == "data" else None
            reference = rescale.linear_std(self.model, x_cal) if x_cal is not None else None
            before = self.masks
            self.mask_to(step.density)
            if step.last and p.shuffle:
                self.set_masks(shuffle(self.masks, self.gen["prune"]))
            if self.rewind_state is not None:
                self._rewind()
            if step.last and p.reinit:
                self._reinit()
                self._scale_sparse_init()
            if fix == "sqrt":
                rescale.sqrt_density(self.model, before, self.masks)
            elif fix == "data":
                rescale.recalibrate(self.model, x_cal, reference)
        scores = self.evaluate()
        if step.last:
            self.marks.update(prune_val_acc=scores["val_acc"], prune_test_acc=scores["test_acc"])
        self.opt = self.segment = None
        return {"stage": "prune", "round": step.round, "last_prune": step.last, "stage_end": True,
                "val_acc_after_prune": scores["val_acc"], "test_acc_after_prune": scores["test_acc"],
                "density": self.density(), "n_collapsed_layers": len(collapsed(self.current_masks()))}

    @torch.no_grad()
    def _rewind(self) -> None:
        current = self.model.state_dict()
        self.model.load_state_dict({k: self.rewind_state[k].to(v.device) if k in self.rewind_state else v
                                    for k, v in current.items()})
        set_masks(self.model, self.masks)

    @torch.no_grad()
    def _reinit(self) -> None:
        fresh = self.fresh_model(self.gen["reinit"])
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

    def density(self) -> float:
        if self.masks is None:
            return 1.0
        kept, total = count(self.masks)
        return kept / total

    def rigl_init(self) -> dict:
        """RigL's sparse start at ``rigl.start_density`` (or the target): random, or a pruner's mask of the
        network at init in ``prune.rounds`` rounds, rescaled as pruning at init is (``init.sparse_scale``)."""
        r = self.cfg.rigl
        start = max(r.start_density, self.cfg.prune.density)
        if r.start == "random":
            self.set_masks(initial_masks(self.model, start, r, self.gen["rigl"]))
            self._scale_sparse_init()
        else:
            x_cal = self.scoring_batch()[0] if self.cfg.init.sparse_scale and self.cfg.init.name == "kaiming" else None
            reference = rescale.linear_std(self.model, x_cal) if x_cal is not None else None
            rounds = self.cfg.prune.rounds
            for k in range(1, rounds + 1):
                self.mask_to(start ** (k / rounds), r.start)
            if x_cal is not None:
                rescale.recalibrate(self.model, x_cal, reference)
        return {"stage": "rigl_init", "stage_end": True, "density": self.density()}
