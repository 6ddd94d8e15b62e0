"""The typed records a run hands out (``results.StepEvent``, ``results.RunResult``) and the trainer's
hook protocol (``hooks.py``): which point is called when, with what the copies' step counters say."""

from __future__ import annotations

import dataclasses

import pytest

from sparse_core.config import Config
from sparse_core.hooks import Hook
from sparse_core.results import RunResult, StepEvent
from sparse_core.train import RunState, run
from sparse_core.trainer import Trainer

SYN = {"data.name": "synthetic", "data.synthetic_train": 64, "data.synthetic_test": 32, "train.batch_size": 32,
       "model.width": 8, "model.depth": 2, "train.pre_epochs": 1, "train.post_epochs": 1, "prune.density": 0.2,
       "train.latency_rounds": 0}


def test_a_real_result_and_its_events_round_trip_through_the_typed_records():
    seen = []
    result = run(Config().replace(**SYN, **{"mask.kind": "sigmoid", "prune.pruner": "mask"}),
                 lambda m, c: seen.append(m))
    typed = RunResult.from_dict(result)
    assert typed.to_dict() == result
    assert typed.n_collapsed_layers == len(result["collapsed_layers"]) and typed.test_acc == result["test_acc"]
    assert {"mask_jaccard", "model_bytes_sparse", "pre_val_acc"} <= set(typed.extra)  # marks, export figures
    assert [e.stage for e in typed.events()] == ["pre", "post"]
    events = [StepEvent.from_dict(m) for m in seen]
    assert [e.to_dict() for e in events] == seen
    assert [e.stage for e in events] == ["pre", "prune", "post"] and [e.is_epoch for e in events] == [True, False, True]
    pre, prune = events[0], events[1]
    assert pre.epoch == 1 and pre.epochs == 2 and "mask_soft_density" in pre.extra
    assert prune.last_prune is True and prune.n_collapsed_layers == 0 and prune.train_loss is None
    assert set(prune.to_dict()) == set(seen[1])  # a field a step does not have stays absent
    with pytest.raises(TypeError):
        RunResult.from_dict({k: v for k, v in result.items() if k != "run_key"})
    assert "run_key" in {f.name for f in dataclasses.fields(RunResult)}


class Recorder(Hook):
    """A toy method: records each point's call with the lead's step counter, acts in post-training."""

    def __init__(self, penalty: float = 0.0):
        self.calls, self.penalty = [], penalty

    def active(self, stage):
        return stage == "post"

    def before_step(self, trainer, stage):
        self.calls.append(("before_step", stage, trainer.lead.seg_step))

    def loss(self, trainer, stage, losses):
        self.calls.append(("loss", stage, tuple(losses.shape)))
        return losses + self.penalty * sum((p ** 2).sum() for p in trainer.params)

    def after_step(self, trainer, stage):
        self.calls.append(("after_step", stage, trainer.lead.seg_step))

    def epoch_end(self, trainer, state, step, metrics):
        self.calls.append(("epoch_end", step.stage, metrics["stage_epoch"]))
        metrics["toy"] = 1.0

    def before_prune(self, trainer, state):
        self.calls.append(("before_prune", state.masks is None))

    def after_prune(self, trainer, state, metrics):
        self.calls.append(("after_prune", state.masks is None, metrics["stage"]))


def _run_with(hook: Hook) -> dict:
    states = [RunState(Config().replace(**SYN, seed=s)) for s in range(2)]
    trainer = Trainer(states)
    trainer.hooks.append(hook)
    return trainer.run()


def test_a_toy_hook_is_called_at_the_declared_points_only_in_its_stage():
    toy = Recorder()
    results = _run_with(toy)
    steps = 2  # 64 samples / 32 a batch, one post epoch; two copies: the per-copy points twice
    expected = [("epoch_end", "pre", 1)] * 2 + [("before_prune", True), ("after_prune", False, "prune")] * 2
    for s in range(steps):  # the step points of its stage only, once for the pack; after_step sees the step counted
        expected += [("before_step", "post", s), ("loss", "post", (2,)), ("after_step", "post", s + 1)]
    expected += [("epoch_end", "post", 1)] * 2
    assert toy.calls == expected
    assert all(m["toy"] == 1.0 for r in results for m in r["history"])


def test_a_hooks_penalty_changes_training_and_nothing_else_does():
    plain, same, penalised = (_run_with(Recorder(p)) for p in (0.0, 0.0, 0.5))
    loss = [[m["train_loss"] for m in r["history"]] for r in plain]
    assert loss == [[m["train_loss"] for m in r["history"]] for r in same]
    assert loss != [[m["train_loss"] for m in r["history"]] for r in penalised]
    assert [m["train_loss"] for m in plain[0]["history"]][0] == penalised[0]["history"][0]["train_loss"]  # pre: inactive
