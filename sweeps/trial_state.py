"""What a single and a packed Tune trial share: the checkpoint files (names, the newest usable state next
to Tune's checkpoint or in the trial dir a run records, writes with an injectable full disk), the scalars
reported to Tune and the per-process set-up. ``sweeps/trainable.py`` (a single trial) and
``sweeps/pack_trial.py`` (a pack) both import it; neither imports the other's internals.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import re

import torch
from ray import tune

import sparse_core
from sparse_core.checkpoint import CheckpointError, load_state

CHECKPOINT_FILE = "state.pt"
# Scalars passed to Tune (schedulers, searchers, progress); MLflow gets every metric.
REPORTED = ("val_acc", "val_loss", "test_acc", "test_loss", "train_loss", "density", "seconds")
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


def location(checkpoint: tune.Checkpoint) -> str:
    """The trial dir holding ``checkpoint``, as a path or URI that ``pyarrow.fs`` opens again."""
    parent = posixpath.dirname(checkpoint.path.rstrip("/"))
    kind = checkpoint.filesystem.type_name
    return parent if kind == "local" else f"{kind}://{parent}"


def copy_file(key: str) -> str:
    """The checkpoint file of one copy of a packed trial (``state_<run_key>.pt``)."""
    return f"state_{key}.pt"


def newest_state(checkpoint: tune.Checkpoint | None, run_dir: str | None,
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

    places = [location(checkpoint)] if checkpoint is not None else []
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


def setup(meta: dict) -> dict:
    """Per-process settings of a trial (threads, log level); returns the provenance tags of its runs."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one INFO line per checkpoint otherwise
    torch.set_num_threads(max(1, int(meta.get("cpus", 1))))
    tags = {"sparse_core_version": sparse_core.__version__}
    if meta.get("git_commit"):
        tags["git_commit"] = meta["git_commit"]
    return tags
