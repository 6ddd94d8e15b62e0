"""A trainer's full state as a checkpoint: capture it after any plan step, restore it into a fresh
``Trainer`` of the same config, and the run continues to the same result.

The state holds tensors, numbers, strings, lists, tuples and dicts only, so it loads with
``torch.load(..., weights_only=True)`` (``sparse_core.checkpoint``): a checkpoint can never run code.
"""

from __future__ import annotations

import copy

from . import learned_mask
from .config import from_flat, run_key
from .masks import set_masks
from .plan import TrainEpoch

FORMAT = 4  # 2: validation metrics, typed plan (the position is an index into plan.build(cfg)); 3: packed optimizer
# state; 4: the learned mask's multipliers and its noise generator


def capture(trainer) -> dict:
    return {
        "format": FORMAT,
        "config": trainer.cfg.to_flat(),
        "step_idx": trainer.step_idx,
        "model": trainer._cpu_state_dict(),
        "has_mask_scores": bool(learned_mask.score_params(trainer.model)),
        "mask_beta": learned_mask.beta(trainer.model),  # the fold at pruning uses the last epoch's temperature
        "mask_dual": None if trainer.mask_dual is None else trainer.mask_dual.detach().cpu().clone(),
        "masks": None if trainer.masks is None else {n: m.cpu().clone() for n, m in trainer.masks.items()},
        "optimizer": trainer.opt.state_dict() if trainer.opt else None,  # the LR schedule is a function of seg_step
        "segment": trainer.segment,
        "seg_step": trainer.seg_step,
        "generators": {n: g.get_state() for n, g in trainer.gen.items()},
        "rewind_state": trainer.rewind_state,
        "history": copy.deepcopy(trainer.history),
        "best": dict(trainer.best),
        "marks": dict(trainer.marks),
        "rigl_regrown": trainer.rigl.regrown if trainer.rigl else trainer.rigl_regrown,
        "elapsed": trainer.elapsed,
    }


def restore(trainer, state: dict) -> None:
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint format {state.get('format')!r} is not {FORMAT} (written by another version "
                         f"of sparse_core); delete it to start afresh")
    saved = from_flat(state["config"])
    if run_key(saved) != run_key(trainer.cfg):
        raise ValueError(f"checkpoint belongs to a different config (run_key {run_key(saved)} != "
                         f"{run_key(trainer.cfg)})")
    if not state["has_mask_scores"]:
        learned_mask.fold(trainer.model)  # the scores were folded into the weights before this point
    elif state.get("mask_beta") is not None:
        learned_mask.set_beta(trainer.model, state["mask_beta"])
    trainer.model.load_state_dict(state["model"])
    trainer.masks = None if state["masks"] is None else {n: m.to(trainer.device) for n, m in state["masks"].items()}
    if trainer.masks is not None:
        set_masks(trainer.model, trainer.masks)
    if state["mask_dual"] is not None:
        trainer.mask_dual = state["mask_dual"].to(trainer.device).clone()
    trainer.step_idx = state["step_idx"]
    trainer.segment, trainer.seg_step = state["segment"], state["seg_step"]
    if state["optimizer"] is not None:  # loaded into the packed optimizer when the run's pack is built
        step = trainer.plan[trainer.step_idx] if trainer.step_idx < len(trainer.plan) else None
        total = trainer._segment_steps(step.epochs) if isinstance(step, TrainEpoch) else 0
        trainer.segment_extras(trainer.segment[0], total)
        trainer.opt_saved = state["optimizer"]
        if trainer.rigl is not None:
            trainer.rigl.regrown = state["rigl_regrown"]
    trainer.rigl_regrown = state["rigl_regrown"]
    for n, g in trainer.gen.items():
        g.set_state(state["generators"][n])
    trainer.rewind_state = state["rewind_state"]
    trainer.history = state["history"]
    trainer.best, trainer.marks = dict(state["best"]), dict(state["marks"])
    trainer.elapsed = state["elapsed"]
    trainer.restored = True
