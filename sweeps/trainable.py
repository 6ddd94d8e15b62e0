"""The Ray Tune adapter: the one place where sparse_core meets Ray.

``train_trial`` is Tune's function trainable. Its config is ``{"trials": [{"cell": label, "flat":
{dotted key: value}}, ...], "meta": {...}}`` (``sweeps/packing.py``; a single trial is a pack of one):
the copies train together through ``sparse_core.runner.run_packed``, each copy its own MLflow run. Per
copy: its run_key's run is claimed (``tracking.TrialRun.open``: a copy whose run_key is FINISHED or
claimed by a live trial of another sweep is skipped, the others train), continued from its newest
checkpoint (``trial_sync.newest_state``: this trial's checkpoints, or the trial dir its run records),
logged step by step, finished with its own final metrics, tags and artifacts. A copy that fails alone
(``run_packed`` returns its exception, e.g. a diverged loss, or its checkpoints do not load) ends
FAILED at once while the others carry on: such a failure repeats on a retry. Anything that ends the
whole trial (a crash, ``train.fail_at_epoch``) fails every unfinished copy's run, and Tune's retry
continues each copy from its own checkpoint (``retries``, ``resumed_at_epoch`` per run). Copies that
share a pre-training (``sparse_core/prefix.py``: e.g. several cells of one seed) get its epochs logged
when it ends, without a state: their first snapshot is one of their own steps. What goes to Tune
meanwhile (reports, checkpoints, the last report) is ``sweeps/trial_sync.py``'s.
"""

from __future__ import annotations

import logging
import os
import tempfile

import torch
from ray import tune

import sparse_core
from runstore import ROLE_TAG
from sparse_core.checkpoint import CheckpointError
from sparse_core.config import from_flat, run_key, to_flat
from sparse_core.results import RunResult
from sparse_core.runner import run_packed

from . import packing, relay, tracking
from .trial_sync import Copy, TrialSync, final_report, newest_state


def resources(cpus: float, gpus: float) -> dict:
    return {"cpu": cpus, "gpu": gpus}


def setup(meta: dict) -> dict:
    """Per-process settings of a trial (threads, log level); returns the provenance tags of its runs."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one INFO line per checkpoint otherwise
    torch.set_num_threads(max(1, int(meta.get("cpus", 1))))
    tags = {"sparse_core_version": sparse_core.__version__}
    if meta.get("git_commit"):
        tags["git_commit"] = meta["git_commit"]
    return tags


def claim(specs: list[dict], meta: dict) -> list[Copy]:
    """The copies of a trial, each with its MLflow run opened (claimed, or ``skip`` set)."""
    tags = setup(meta)
    if len(specs) > 1:
        tags["pack_size"] = len(specs)
    trial_id = tune.get_context().get_trial_id()
    copies = []
    for spec in specs:
        cfg = from_flat(spec["flat"])
        role = {ROLE_TAG: spec["role"]} if spec.get("role") else {}  # baseline or method (a design's trial)
        mlrun = relay.trial_run(meta["tracking_uri"], meta["experiment_id"], sweep=meta["sweep"], cell=spec["cell"],
                                flat=to_flat(cfg), run_key=run_key(cfg), trial_id=trial_id, tags={**tags, **role},
                                parent_run_id=meta.get("parent_run_id")).open()
        copies.append(Copy(spec["cell"], cfg, mlrun))
    return copies


def restore(copies: list[Copy]) -> None:
    """Each copy that trains continues from its newest checkpoint, if any; a copy none of whose
    checkpoints loads fails alone (never a silent start from scratch)."""
    checkpoint = tune.get_checkpoint()
    for c in copies:
        if c.mlrun.skip:  # FINISHED already, or claimed by a live trial of another sweep on this store
            continue
        try:
            c.state = newest_state(checkpoint, c.mlrun.checkpoint_dir, c.key, c.cfg)
        except CheckpointError as e:
            c.error = e
            c.mlrun.fail(e)
            continue
        if c.state is not None:
            c.pos, c.epoch = c.state["step_idx"], len(c.state["history"])
            c.mlrun.resumed(c.epoch)
            c.mlrun.restore(c.state["history"])  # its epochs that never reached the run (flushes are not writes)
            c.snap(c.state)  # kept in every checkpoint until this copy logs a newer one
            c.snapped = False


def train_trial(config: dict) -> None:
    meta = config["meta"]
    copies = claim(packing.specs(config), meta)
    restore(copies)
    train = [c for c in copies if not c.mlrun.skip and c.error is None]
    if train:
        _train(train, meta)
    tune.report(final_report(copies))


def _train(train: list[Copy], meta: dict) -> None:
    """Train the copies (each from its state when it continues) and close their MLflow runs: FINISHED with
    the result (and, with ``meta["export"]``, the compact model as an artifact), or failed with the error."""
    sync = TrialSync(train, float(meta.get("report_every_s", 0.0)))
    try:
        with tempfile.TemporaryDirectory() as d:  # meta["export"]: each compact model as its run's artifact
            paths = [os.path.join(d, f"{i}.safetensors") if meta.get("export") else None for i in range(len(train))]
            states = [c.state for c in train]
            for c in train:
                c.state = None  # run_packed holds them now
            results = run_packed([c.cfg for c in train], [sync.log_for(c) for c in train], states, paths)
            del states
            for c, result, path in zip(train, results, paths):
                if isinstance(result, BaseException):  # this copy alone failed (e.g. diverged); the rest carry on
                    c.error = result
                    c.mlrun.fail(result)
                    continue
                if path:
                    c.mlrun.log_export(path)
                result = RunResult.from_dict(result)
                c.mlrun.finish(result)
                c.result = result
    except BaseException as e:
        for c in train:
            if c.result is None and c.error is None:
                c.error = e
                c.mlrun.fail(e)
        raise
