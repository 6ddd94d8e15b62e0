"""When a trial's rows reach its MLflow run (``sweeps/tracking.py``: ``RunLog.due``, ``restore``), on a
real SQLite store: a checkpoint's flush writes only when ``FLUSH_EVERY_S`` have passed or a pruning
round is pending, and a trial killed after a checkpoint whose epochs never reached the run logs each
epoch exactly once when it continues from that checkpoint."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

import runstore
from sparse_core.config import from_flat, run_key
from sparse_core.train import run
from sweeps import tracking

TINY = {"data.name": "digits", "model.width": 16, "model.depth": 2, "train.pre_epochs": 2, "train.post_epochs": 3,
        "train.device": "cpu", "prune.density": 0.1}


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


def _open(uri, experiment, cfg, now):
    mlrun = tracking.TrialRun(uri, runstore.experiment_id(uri, experiment), sweep="s", cell="base",
                              flat=cfg.to_flat(), run_key=run_key(cfg), trial_id="t0").open()
    mlrun.clock = lambda: now[0]
    return mlrun


def _spy(monkeypatch, mlrun) -> list:
    seen = []
    for name in ("log_batch", "set_tag"):
        def spy(*args, _real=getattr(mlrun.client, name), _name=name, **kwargs):
            seen.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(mlrun.client, name, spy)
    return seen


def test_a_checkpoint_flush_writes_when_due(uri, monkeypatch):
    cfg, now = from_flat({**TINY, "seed": 1}), [100.0]
    mlrun = _open(uri, "due", cfg, now)
    seen = _spy(monkeypatch, mlrun)
    c = MlflowClient(uri)
    mlrun.log_step({"epoch": 1, "stage": "pre", "val_acc": 0.5, "seconds": 1.0, "mask_mean": 0.4})
    mlrun.flush()
    mlrun.set_checkpoint_dir("/trials/t0")
    assert seen == [] and c.get_metric_history(mlrun.run_id, "epoch/val_acc") == []  # not due: nothing written
    now[0] += tracking.FLUSH_EVERY_S - 1
    mlrun.flush()
    assert seen == []
    mlrun.log_step({"stage": "prune", "round": 0, "last_prune": True, "val_acc_after_prune": 0.4,
                    "test_acc_after_prune": 0.3, "density": 0.1, "n_collapsed_layers": 0})
    mlrun.flush()  # a pruning round: no checkpoint holds it, so this flush writes (with the checkpoint's dir)
    run = c.get_run(mlrun.run_id)
    assert seen == ["log_batch"] and run.data.tags["checkpoint_dir"] == "/trials/t0"
    assert run.data.metrics == {"epoch/val_acc": 0.5, "prune/val_acc": 0.4, "prune/test_acc": 0.3,
                                "prune/density": 0.1, "prune/n_collapsed_layers": 0.0}  # NOT_LOGGED: not written
    mlrun.log_step({"epoch": 2, "stage": "post", "val_acc": 0.6})
    now[0] += tracking.FLUSH_EVERY_S - 1
    mlrun.flush()
    assert seen == ["log_batch"]
    now[0] += 1
    mlrun.flush()  # FLUSH_EVERY_S since the last write
    assert seen == ["log_batch"] * 2
    assert [m.step for m in c.get_metric_history(mlrun.run_id, "epoch/val_acc")] == [1, 2]


def _stored(c, run_id) -> dict:
    metrics = c.get_run(run_id).data.metrics
    return {k: [(m.step, m.value) for m in c.get_metric_history(run_id, k)] for k in metrics
            if not k.startswith("final/")}


def test_a_trial_killed_after_a_checkpoint_logs_each_epoch_once(uri, torch_one_thread):
    cfg, now = from_flat({**TINY, "seed": 2}), [0.0]
    plain = _open(uri, "plain", cfg, now)
    result = run(cfg, lambda m, _: plain.log_step(m))
    plain.finish(result)

    killed, states = _open(uri, "killed", cfg, now), {}

    def log(metrics, checkpoint):  # what the trainable does: a checkpoint (after its flush) at every stage end
        killed.log_step(metrics)    # (and, by CHECKPOINT_EVERY_S, here after every epoch)
        if (metrics.get("stage_end") or "epoch" in metrics) and checkpoint is not None:
            killed.flush()
            states[metrics.get("epoch")] = checkpoint()
    run(cfg, log)
    state = states[3]  # after the pruning and one post-training epoch; the process dies before finish
    c = MlflowClient(uri)
    written = _stored(c, killed.run_id)
    assert written and max(s for s, _ in written["epoch/val_acc"]) < len(state["history"])  # epochs lost

    retried = _open(uri, "killed", cfg, now)  # Ray's retry of the trial: continues its run
    assert retried.run_id == killed.run_id and retried.logged_epoch < len(state["history"])
    retried.restore(state["history"])
    finished = run(cfg, lambda m, _: retried.log_step(m), state)
    retried.finish(finished)
    assert finished["test_acc"] == result["test_acc"]
    again, once = _stored(c, retried.run_id), _stored(c, plain.run_id)
    assert again.keys() == once.keys() and any(k.startswith("trainer/") for k in once)
    for key, points in once.items():  # every epoch (and round) exactly once, with the uninterrupted run's values
        assert again[key] == points, key
