"""The Ray Tune adapter: the one place where sparse_core meets Ray.

``train_trial`` is a Tune function trainable around ``sparse_core.train.run``. Its config is
``{"trial": {"cell": label, "flat": {dotted key: value}}, "meta": {...}}`` (a packed trial,
``{"trials": [...], "meta": {...}}``, is trained by ``sweeps/pack_trial.py``): the flat config
becomes a ``Config``, every epoch is logged to MLflow and reported to Tune, with checkpoints of
the trainer's full state (``torch.save``d, loaded by ``sparse_core.checkpoint.load_state``), and a
retried, resumed or re-run trial continues its run_key's MLflow run from the newest checkpoint
(``_newest_state``). A trial whose run_key is FINISHED, or claimed by a live trial of another
sweep, reports ``skipped`` and trains nothing (``tracking.TrialRun.open``).

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

import errno
import logging
import math
import os
import posixpath
import re
import tempfile
import time

import torch
from ray import tune

import sparse_core
from sparse_core.checkpoint import CheckpointError, load_state
from sparse_core.config import from_flat, run_key, to_flat
from sparse_core.train import run as run_pipeline, total_epochs

from . import relay, tracking

CHECKPOINT_FILE = "state.pt"
# Scalars passed to Tune (schedulers, searchers, progress); MLflow gets every metric.
_REPORTED = ("val_acc", "val_loss", "test_acc", "test_loss", "train_loss", "density", "seconds")
CHECKPOINT_EVERY_S = 10.0  # wall seconds between checkpoints inside a stage (stage ends always checkpoint)
# TESTING ONLY: "N" makes every checkpoint write from a trial process's Nth on fail as on a full disk (ENOSPC).
FAULT_ENOSPC_ENV = "SWEEPS_FAULT_ENOSPC_AT"
_checkpoint_writes = 0


def write_checkpoint(path: str, state: dict | None = None, data: bytes | None = None) -> None:
    """A trial's checkpoint file: ``state`` (``torch.save``d) or its bytes already serialised."""
    global _checkpoint_writes
    _checkpoint_writes += 1
    at = os.environ.get(FAULT_ENOSPC_ENV)
    if at and _checkpoint_writes >= int(at):
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {FAULT_ENOSPC_ENV})", path)
    if data is None:
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            f.write(data)


def resources(cpus: float, gpus: float) -> dict:
    return {"cpu": cpus, "gpu": gpus}


def _location(checkpoint: tune.Checkpoint) -> str:
    """The trial dir holding ``checkpoint``, as a path or URI that ``pyarrow.fs`` opens again."""
    parent = posixpath.dirname(checkpoint.path.rstrip("/"))
    kind = checkpoint.filesystem.type_name
    return parent if kind == "local" else f"{kind}://{parent}"


def copy_file(key: str) -> str:
    """The checkpoint file of one copy of a packed trial (``state_<run_key>.pt``)."""
    return f"state_{key}.pt"


def _newest_state(checkpoint: tune.Checkpoint | None, run_dir: str | None,
                  names: tuple[str, ...] = (CHECKPOINT_FILE,), cfg=None) -> dict | None:
    """The newest loadable trainer state among the checkpoints next to Tune's ``checkpoint`` and in
    ``run_dir`` (the trial dir recorded in the MLflow run this trial continues). ``names``: the state's
    file names in a checkpoint dir, first found wins (a run_key's state is ``state.pt`` in a single
    trial's dir, ``state_<run_key>.pt`` in a packed one's: a run may continue in either shape).

    Tune's own pick can be stale: a driver killed between two snapshots of its experiment state
    restores a trial from an older checkpoint (or from one already deleted) though newer ones exist.
    A damaged checkpoint (the crash hit its copy), or with ``cfg`` one whose content is not a state of
    ``cfg``'s run (``sparse_core.checkpoint.check_state``), is passed over; if none loads, the trial
    fails with the loader's one-line reason rather than silently starting again.
    """
    import pyarrow.fs as pafs

    places = [_location(checkpoint)] if checkpoint is not None else []
    places += [run_dir] if run_dir and run_dir not in places else []
    found = []  # (mtime, dir name, filesystem, dir path, file name)
    for place in places:
        try:
            fs, base = pafs.FileSystem.from_uri(place)
            for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
                if info.type == pafs.FileType.Directory and re.fullmatch(r"checkpoint_\d+", info.base_name):
                    for name in names:
                        state_file = fs.get_file_info(f"{info.path}/{name}")
                        if state_file.type == pafs.FileType.File:
                            found.append((state_file.mtime_ns or 0, info.base_name, fs, info.path, name))
                            break
        except (OSError, ValueError, pafs.ArrowException) as e:  # e.g. the old trial dir is gone
            logging.getLogger(__name__).warning("cannot list checkpoints in %s: %s", place, e)
    if not found and checkpoint is not None:  # Tune's checkpoint outside a trial dir's checkpoint_N layout
        fs = checkpoint.filesystem
        there = [n for n in names if fs.get_file_info(f"{checkpoint.path}/{n}").type == pafs.FileType.File]
        if there or names[0] == CHECKPOINT_FILE:  # a single trial's checkpoint without its file: an error
            found.append((0, "", fs, checkpoint.path, (there or names)[0]))
    errors = []
    for _, _, fs, path, name in sorted(found, key=lambda f: f[:2], reverse=True):
        try:
            with tune.Checkpoint(path, filesystem=fs).as_directory() as d:
                return load_state(os.path.join(d, name), cfg)
        except (CheckpointError, OSError) as e:
            logging.getLogger(__name__).warning("skipping checkpoint %s: %s", path, e)
            errors.append(e)
    if errors:
        raise CheckpointError(f"no usable checkpoint for this trial: {errors[0]}")
    return None


def _report_skipped(mlrun, cfg) -> None:
    """A trial with nothing to train: its run_key is FINISHED, or another sweep runs it now."""
    metrics = mlrun.other_final
    n = total_epochs(cfg)
    tune.report({"final": 1, "skipped": mlrun.skip, "epoch": n, "epochs": n, "stage": "final",
                 "val_acc": metrics.get("val_acc", math.nan), "test_acc": metrics.get("test_acc", math.nan),
                 "best_val_acc": metrics.get("best_val_acc", math.nan), "density": metrics.get("density", math.nan),
                 "seconds": 0.0, "run_key": mlrun.run_key, "mlflow_run_id": mlrun.other_id})


def setup(meta: dict) -> dict:
    """Per-process settings of a trial (threads, log level); returns the provenance tags of its runs."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one INFO line per checkpoint otherwise
    torch.set_num_threads(max(1, int(meta.get("cpus", 1))))
    tags = {"sparse_core_version": sparse_core.__version__}
    if meta.get("git_commit"):
        tags["git_commit"] = meta["git_commit"]
    return tags


def train_trial(config: dict) -> None:
    if "trials" in config:  # a packed trial: several configs trained together (sweeps/pack_trial.py)
        from .pack_trial import train_pack

        return train_pack(config)
    trial, meta = config["trial"], config["meta"]
    tags = setup(meta)
    cfg = from_flat(trial["flat"])
    mlrun = relay.trial_run(meta["tracking_uri"], meta["experiment_id"], sweep=meta["sweep"], cell=trial["cell"],
                            flat=to_flat(cfg), run_key=run_key(cfg), trial_id=tune.get_context().get_trial_id(),
                            tags=tags).open()
    if mlrun.skip:  # FINISHED already, or claimed by a live trial of another sweep on this store
        _report_skipped(mlrun, cfg)
        return
    try:
        state = _newest_state(tune.get_checkpoint(), mlrun.checkpoint_dir, (CHECKPOINT_FILE, copy_file(mlrun.run_key)),
                              cfg)
    except CheckpointError as e:
        mlrun.fail(e)
        raise
    resumed_at = len(state["history"]) if state is not None else None
    mlrun.resumed(resumed_at)
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
            report = {k: metrics[k] for k in _REPORTED if k in metrics}
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
            mlrun.set_checkpoint_dir(_location(saved))
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
                 "val_acc": result["val_acc"], "test_acc": result["test_acc"], "best_val_acc": result["best_val_acc"],
                 "density": result["density"], "seconds": result["seconds"],
                 "n_collapsed_layers": len(result["collapsed_layers"]), "run_key": result["run_key"],
                 "mlflow_run_id": mlrun.run_id})
