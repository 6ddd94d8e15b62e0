"""The Ray Tune adapter: the one place where sparse_core meets Ray.

``train_trial`` is a Tune function trainable around ``sparse_core.train.run``. Its config is
``{"trial": {"cell": label, "flat": {dotted key: value}}, "meta": {...}}`` (a packed trial,
``{"trials": [...], "meta": {...}}``, is trained by ``sweeps/pack_trial.py``): the flat config
becomes a ``Config``, every epoch is logged to MLflow and reported to Tune, with checkpoints of
the trainer's full state (``torch.save``d, loaded by ``sparse_core.checkpoint.load_state``), and a
retried, resumed or re-run trial continues its run_key's MLflow run from the newest checkpoint
(``trial_state.newest_state``). A trial whose run_key is FINISHED, or claimed by a live trial of another
sweep, reports ``skipped`` and trains nothing (``tracking.TrialRun.open``).

The subtle point is cost. A checkpoint, with the flush of the buffered epochs before it (a write when due:
``tracking.RunLog.due``; a retry logs the checkpoint's epochs its run lacks, ``RunLog.restore``),
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

import math
import os
import tempfile
import time

from ray import tune

from sparse_core.checkpoint import CheckpointError
from sparse_core.config import from_flat, run_key, to_flat
from sparse_core.train import run as run_pipeline, total_epochs

from . import relay, tracking
from .trial_state import (CHECKPOINT_EVERY_S, CHECKPOINT_FILE, REPORTED, copy_file, location, newest_state, setup,
                          write_checkpoint)

def resources(cpus: float, gpus: float) -> dict:
    return {"cpu": cpus, "gpu": gpus}


def _report_skipped(mlrun, cfg) -> None:
    """A trial with nothing to train: its run_key is FINISHED, or another sweep runs it now."""
    metrics = mlrun.other_final
    n = total_epochs(cfg)
    tune.report({"final": 1, "skipped": mlrun.skip, "epoch": n, "epochs": n, "stage": "final",
                 "val_acc": metrics.get("val_acc", math.nan), "test_acc": metrics.get("test_acc", math.nan),
                 "best_val_acc": metrics.get("best_val_acc", math.nan), "density": metrics.get("density", math.nan),
                 "seconds": 0.0, "run_key": mlrun.run_key, "mlflow_run_id": mlrun.other_id})


def train_trial(config: dict) -> None:
    if "trials" in config:  # a packed trial: several configs trained together (sweeps/pack_trial.py)
        from .pack_trial import train_pack

        return train_pack(config)
    trial, meta = config["trial"], config["meta"]
    tags = setup(meta)
    cfg = from_flat(trial["flat"])
    mlrun = relay.trial_run(meta["tracking_uri"], meta["experiment_id"], sweep=meta["sweep"], cell=trial["cell"],
                            flat=to_flat(cfg), run_key=run_key(cfg), trial_id=tune.get_context().get_trial_id(),
                            tags=tags, parent_run_id=meta.get("parent_run_id")).open()
    if mlrun.skip:  # FINISHED already, or claimed by a live trial of another sweep on this store
        _report_skipped(mlrun, cfg)
        return
    try:
        state = newest_state(tune.get_checkpoint(), mlrun.checkpoint_dir, (CHECKPOINT_FILE, copy_file(mlrun.run_key)),
                             cfg)
    except CheckpointError as e:
        mlrun.fail(e)
        raise
    resumed_at = len(state["history"]) if state is not None else None
    mlrun.resumed(resumed_at)
    if state is not None:
        mlrun.restore(state["history"])  # its epochs that never reached the run (flushes are not writes)
    epoch = resumed_at or 0
    last_sync = last_report = time.monotonic()
    report_every_s = float(meta.get("report_every_s", 0.0))

    def log(metrics: dict, checkpoint) -> None:
        nonlocal epoch, last_sync, last_report
        mlrun.log_step(metrics)
        stage = metrics["stage"]
        if stage == "rigl_init" or (stage == "prune" and not metrics["last_prune"]):
            return  # cheap steps: not worth a report each (SynFlow has 100 rounds)
        if stage == "prune":
            report = {"val_acc": metrics["val_acc_after_prune"], "test_acc": metrics["test_acc_after_prune"],
                      "density": metrics["density"], "seconds": metrics["seconds"]}
        else:
            epoch = metrics["epoch"]
            report = {k: metrics[k] for k in REPORTED if k in metrics}
        report.update(epoch=epoch, epochs=total_epochs(cfg), stage=stage)
        now = time.monotonic()
        if not metrics["stage_end"] and now - last_sync < CHECKPOINT_EVERY_S:
            if now - last_report >= report_every_s:
                tune.report(report)
                last_report = now
            return
        mlrun.flush()  # before the checkpoint: a retry from it finds these epochs in the run
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint(os.path.join(d, CHECKPOINT_FILE), checkpoint())
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
        saved = tune.get_checkpoint()  # the persisted copy: its trial dir goes into the run, once
        if saved is not None:
            mlrun.set_checkpoint_dir(location(saved))
        last_sync = last_report = time.monotonic()

    result = _train_and_finish(mlrun, cfg, log, state, meta)
    tune.report({"final": 1, "epoch": result["epochs"], "epochs": result["epochs"], "stage": "final",
                 "val_acc": result["val_acc"], "test_acc": result["test_acc"], "best_val_acc": result["best_val_acc"],
                 "density": result["density"], "seconds": result["seconds"],
                 "n_collapsed_layers": len(result["collapsed_layers"]), "run_key": result["run_key"],
                 "mlflow_run_id": mlrun.run_id})


def _train_and_finish(mlrun, cfg, log, state: dict | None, meta: dict) -> dict:
    """Train the run (from ``state`` when it continues) and close its MLflow run: FINISHED with the result
    (and, with ``meta["export"]``, the compact model as an artifact), or failed with the error."""
    try:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, tracking.EXPORT_ARTIFACT) if meta.get("export") else None
            result = run_pipeline(cfg, log, state, export_path=path)
            if path:
                mlrun.log_export(path)
        mlrun.finish(result)
    except BaseException as e:
        mlrun.fail(e)
        raise
    return result
