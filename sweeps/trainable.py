"""The Ray Tune adapter: the one place where sparse_core meets Ray.

``train_trial`` is a Tune function trainable around ``sparse_core.train.run``. Its config is
``{"trial": {"cell": label, "flat": {dotted key: value}}, "meta": {...}}``: the flat config
becomes a ``Config``, every epoch is logged to MLflow and reported to Tune, with checkpoints of
the trainer's full state (``torch.save``d), and a retried trial continues from
``tune.get_checkpoint()`` inside the same MLflow run.

The subtle point is cost. A checkpoint, with the MLflow write of the buffered epochs before it,
is taken at the end of each stage (pre-training, pruning, RigL or post-training) and otherwise
once ``CHECKPOINT_EVERY_S`` have passed since the last one: each costs a ``torch.save``, a copy
into Tune's storage and an experiment-state snapshot on the driver, each MLflow write a SQLite
transaction, and done every epoch they doubled the time of a digits-MLP trial
(benchmarks/sweep_efficiency.py). Epochs of a minute (VGG-16) are still each checkpointed; a crash
loses at most ``CHECKPOINT_EVERY_S`` of work. Every epoch is reported to Tune (a scheduler such as
ASHA needs it) unless ``meta["report_every_s"]`` asks for at most one report per that many seconds
between stage ends: each report waits for the driver to take it (~8 ms here), and ablation grids,
which have no scheduler, use 1 s.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import torch
from ray import tune

import sparse_core
from sparse_core.config import from_flat, run_key, to_flat
from sparse_core.train import run as run_pipeline, total_epochs

from . import tracking

CHECKPOINT_FILE = "state.pt"
# Scalars passed to Tune (schedulers, searchers, progress); MLflow gets every metric.
_REPORTED = ("test_acc", "test_loss", "train_loss", "density", "seconds")
CHECKPOINT_EVERY_S = 10.0  # wall seconds between checkpoints inside a stage (stage ends always checkpoint)


def resources(cpus: float, gpus: float) -> dict:
    return {"cpu": cpus, "gpu": gpus}


def _load_state(checkpoint: tune.Checkpoint | None) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, CHECKPOINT_FILE), weights_only=False, map_location="cpu")


def train_trial(config: dict) -> None:
    trial, meta = config["trial"], config["meta"]
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one INFO line per checkpoint otherwise
    cfg = from_flat(trial["flat"])
    torch.set_num_threads(max(1, int(meta.get("cpus", 1))))
    state = _load_state(tune.get_checkpoint())
    resumed_at = len(state["history"]) if state is not None else None
    tags = {"sparse_core_version": sparse_core.__version__}
    if meta.get("git_commit"):
        tags["git_commit"] = meta["git_commit"]
    mlrun = tracking.TrialRun(meta["tracking_uri"], meta["experiment_id"], sweep=meta["sweep"], cell=trial["cell"],
                              flat=to_flat(cfg), run_key=run_key(cfg), trial_id=tune.get_context().get_trial_id(),
                              tags=tags).open(resumed_at_epoch=resumed_at)
    epoch = resumed_at or 0
    last_round = cfg.prune.rounds - 1 if cfg.prune.density < 1.0 else 0
    stage_epochs = {"pre": cfg.train.pre_epochs, "round": cfg.prune.round_epochs, "post": cfg.train.post_epochs,
                    "rigl": total_epochs(cfg)}
    last_sync = last_report = time.monotonic()
    report_every_s = float(meta.get("report_every_s", 0.0))

    def log(metrics: dict, checkpoint) -> None:
        nonlocal epoch, last_sync, last_report
        mlrun.log_step(metrics)
        stage = metrics["stage"]
        if stage == "rigl_init" or (stage == "prune" and metrics["round"] != last_round):
            return  # cheap steps: not worth a report each (SynFlow has 100 rounds)
        if stage == "prune":
            report = {"test_acc": metrics["test_acc_after_prune"], "density": metrics["density"],
                      "seconds": metrics["seconds"]}
        else:
            epoch = metrics["epoch"]
            report = {k: metrics[k] for k in _REPORTED if k in metrics}
        report.update(epoch=epoch, epochs=total_epochs(cfg), stage=stage)
        stage_end = stage == "prune" or metrics["stage_epoch"] == stage_epochs[stage]
        now = time.monotonic()
        if not stage_end and now - last_sync < CHECKPOINT_EVERY_S:
            if now - last_report >= report_every_s:
                tune.report(report)
                last_report = now
            return
        mlrun.flush()  # before the checkpoint: a retry from it finds these epochs in the run
        with tempfile.TemporaryDirectory() as d:
            torch.save(checkpoint(), os.path.join(d, CHECKPOINT_FILE))
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
        last_sync = last_report = time.monotonic()

    try:
        with tempfile.TemporaryDirectory() as d:  # meta["export"]: the compact model as an artifact
            path = os.path.join(d, tracking.EXPORT_ARTIFACT) if meta.get("export") else None
            result = run_pipeline(cfg, log, state, export_path=path)
            if path:
                mlrun.log_export(path)
        mlrun.finish(result)
    except BaseException as e:
        mlrun.fail(e)
        raise
    tune.report({"final": 1, "epoch": result["epochs"], "epochs": result["epochs"], "stage": "final",
                 "test_acc": result["test_acc"], "best_test_acc": result["best_test_acc"],
                 "density": result["density"], "seconds": result["seconds"],
                 "n_collapsed_layers": len(result["collapsed_layers"]), "run_key": result["run_key"],
                 "mlflow_run_id": mlrun.run_id})
