"""Issue 12's switches that give each method a fair chance: gradual magnitude pruning on the cubic
schedule, the signal-preserving rescale after pruning a trained network, a learned mask that starts
near 1 and is steered to the target density, and the pruner registry's metadata."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_core import learned_mask, pruners, rescale
from sparse_core.config import Config, MaskConfig
from sparse_core.masks import count, prunable_layers
from sparse_core.plan import PruneStep, TrainEpoch, build, cubic, gradual_steps, total_epochs
from sparse_core.pruning import target_count
from sparse_core.registry import PRUNERS
from sparse_core.trainer import Trainer as Loop
from sparse_core.train import RunState, fit, run

SYN = {"data.name": "synthetic", "data.synthetic_train": 640, "data.synthetic_test": 128, "model.width": 32,
       "model.depth": 3, "train.batch_size": 64}


def _cfg(**kw) -> Config:
    return Config().replace(**{**SYN, **kw})


# ---- gradual (GMP) ---------------------------------------------------------------------------
def test_cubic_schedule_formula():
    assert cubic(0.01, 0, 100) == 1.0 and cubic(0.01, 100, 100) == 0.01
    assert cubic(0.1, 50, 100) == pytest.approx(0.1 + 0.9 * 0.5 ** 3)
    assert gradual_steps(25, 10) == [10, 20, 25] and gradual_steps(20, 10) == [10, 20]


def test_gradual_pruning_density_after_every_step_is_the_cubic_schedule_exactly():
    cfg = _cfg(**{"train.pre_epochs": 1, "prune.gradual_epochs": 2, "prune.gradual_every": 3, "train.post_epochs": 1,
                  "prune.density": 0.02})
    trainer = RunState(cfg)
    seen = []
    original = trainer.mask_to

    def record(density):
        original(density)
        seen.append((trainer.seg_step, count(trainer.masks)))

    trainer.mask_to = record
    result = fit(trainer)
    total = trainer.segment_steps(2)  # the gradual stage's optimizer steps (10 batches x 2 epochs)
    in_stage, final = seen[:-1], seen[-1]  # the plan's closing prune step re-scores at the final density
    assert [s for s, _ in in_stage] == gradual_steps(total, 3)  # pruned on exactly these steps, nowhere else
    for step, (kept, n) in in_stage:
        assert kept == target_count(n, cubic(0.02, step, total)), step
    assert final[1] == in_stage[-1][1] == (target_count(n, 0.02), n)  # a no-op: the stage ended there
    assert result["density"] == pytest.approx(0.02, abs=1 / n)
    # the budget is the plan's: pre + gradual + post epochs, and the last post epoch keeps the final mask
    assert result["epochs"] == total_epochs(cfg) == 4
    assert [m["stage"] for m in result["history"]] == ["pre", "gradual", "gradual", "post"]


def test_gradual_and_exponential_rounds_are_exclusive_and_the_plan_says_where_stages_end():
    with pytest.raises(ValueError, match="prune.gradual_epochs=2.*prune.rounds=3"):
        _cfg(**{"prune.gradual_epochs": 2, "prune.rounds": 3})
    plan = build(_cfg(**{"train.pre_epochs": 2, "prune.rounds": 3, "prune.round_epochs": 1, "train.post_epochs": 2}))
    prunes = [s for s in plan if isinstance(s, PruneStep)]
    assert [p.last for p in prunes] == [False, False, True]
    ends = [s.stage for s in plan if isinstance(s, TrainEpoch) and s.stage_end]
    assert ends == ["pre", "round", "round", "post"]


# ---- rescale after pruning a trained network ------------------------------------------------------
def _trained(rescale_kind: str, pruner: str = "random", density: float = 0.1) -> RunState:
    cfg = Config().replace(**{"train.pre_epochs": 2, "train.post_epochs": 0, "prune.pruner": pruner,
                              "prune.density": density, "prune.rescale": rescale_kind})
    trainer = RunState(cfg)
    loop = Loop([trainer])
    for step in trainer.plan:
        if isinstance(step, TrainEpoch):
            trainer.history.append(loop.train_epoch(step)[0])
    return trainer


def _std_ratios(kind: str) -> dict[str, float]:
    """Per layer: std of the linear part after pruning to 10 % at random / before, on the scoring batch."""
    trainer = _trained(kind)
    x = trainer.scoring_batch()[0]
    dense = rescale.linear_std(trainer.model, x)
    trainer.prune(PruneStep(0, 0.1, True))
    sparse = rescale.linear_std(trainer.model, x)
    return {n: sparse[n] / dense[n] for n in dense}


def test_rescale_restores_the_pre_activation_scale_of_the_dense_network():
    none, sqrt, data = (_std_ratios(k) for k in ("none", "sqrt", "data"))
    # without a correction each layer keeps ~1/sqrt(10) of its signal and the loss compounds with depth
    assert max(none.values()) < 0.5 and min(none.values()) < 0.1, none
    # data: matched layer by layer on this batch
    assert all(abs(r - 1) < 0.10 for r in data.values()), data
    # sqrt: right in expectation per layer; it drifts with depth, but far less than no correction
    worst = lambda ratios: max(abs(math.log(r)) for r in ratios.values())  # noqa: E731
    assert worst(sqrt) < 0.5 * worst(none), (sqrt, none)


def test_rescale_is_skipped_at_init_and_with_reinit():
    # pruning at init uses init.sparse_scale instead; the data rescale must not stack on top of it
    a = run(_cfg(**{"train.pre_epochs": 0, "train.post_epochs": 1, "prune.rescale": "data", "prune.pruner": "random"}))
    b = run(_cfg(**{"train.pre_epochs": 0, "train.post_epochs": 1, "prune.rescale": "none", "prune.pruner": "random"}))
    assert a["test_acc"] == b["test_acc"] and a["history"] == b["history"]


# ---- a learned mask that can learn (closed forms: tests/test_learned_mask.py) ------------------------
def test_mask_stats_report_soft_and_hard_density_and_the_target():
    cfg = _cfg(**{"mask.kind": "sigmoid", "prune.pruner": "mask", "train.pre_epochs": 2, "train.post_epochs": 0,
                  "prune.density": 0.05})
    seen = []
    run(cfg, lambda m, c: seen.append(m))
    pre = [m for m in seen if m["stage"] == "pre"]
    assert pre[-1]["mask_target"] == pytest.approx(0.05) and pre[0]["mask_target"] >= pre[-1]["mask_target"]
    for m in pre:
        assert 0 <= m["mask_binary_gap"] <= 0.5 and 0 <= m["mask_hard_density"] <= 1
        assert m["mask_soft_density"] == m["mask_mean"]


def test_mask_pruner_works_over_several_rounds():
    cfg = _cfg(**{"mask.kind": "sigmoid", "prune.pruner": "mask", "train.pre_epochs": 1, "train.post_epochs": 1,
                  "prune.rounds": 3, "prune.round_epochs": 1, "prune.density": 0.05})
    result = run(cfg)
    assert result["density"] == pytest.approx(0.05, abs=1e-3) and result["epochs"] == total_epochs(cfg) == 4


# ---- the pruner registry carries what the trainer needs ------------------------------------------
def test_needs_data_comes_from_the_registry():
    assert {n for n in PRUNERS if pruners.needs_data(n)} == {"snip", "grasp"}
    # prune.rescale=auto: only random pruning, where it was measured to help, gets the data rescale
    assert {n for n in PRUNERS if pruners.rescale_after_training(n) == "data"} == {"random"}
    with pytest.raises(ValueError, match="no-such-pruner"):
        pruners.needs_data("no-such-pruner")


def test_a_toy_pruner_registered_in_one_place_is_run_by_the_trainer_with_its_data_batch():
    name = "toy_test_pruner"
    seen = {}

    if name not in PRUNERS:
        @PRUNERS.register(name, needs_data=True)
        def toy(model, inputs):
            seen["x"] = None if inputs.x is None else tuple(inputs.x.shape)
            return {n: layer.weight.detach().abs() for n, layer in prunable_layers(model).items()}

    result = run(_cfg(**{"prune.pruner": name, "train.pre_epochs": 1, "train.post_epochs": 1}))
    assert seen["x"] is not None and seen["x"][0] == 10 * 10  # samples_per_class x classes
    assert result["density"] == pytest.approx(0.1, abs=1e-3)
