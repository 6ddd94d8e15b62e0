"""What a sweep keeps beside its Tune runs under ``--storage-path``.

- The trial set each Tune run was made for: ``<run>.trials`` beside the run's folder holds a hash of the
  run_keys of the sweep's planned trials, so ``--resume`` restores the newest run of *this* trial set,
  never a run of the same sweep name made with other ``--cells``, densities or seeds.
- No checkpoints of trials that finished: ``--resume`` never trains a finished trial again (its run_key
  is FINISHED in MLflow), so only unfinished and failed trials keep theirs (Tune keeps the newest two of
  those: a crash while the newest is written still leaves the previous one).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil

TRIALS_SUFFIX = ".trials"  # <storage>/<run>.trials: the trial-set hash of the Tune run <storage>/<run>


def fs_of(path: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI such as s3://bucket/dir."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)


def trial_set(trials) -> str:
    """A hash of the run_keys of ``trials`` (order does not matter): the identity of a sweep's trial set."""
    keys = sorted(t.run_key for t in trials)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def remember(storage_path: str, run_name: str, key: str, trials: int) -> None:
    """Write the trial-set hash of the Tune run ``run_name`` beside it (best effort: without it, --resume
    treats the run as of an unknown set)."""
    fs, base = fs_of(storage_path)
    try:
        fs.create_dir(base, recursive=True)
        with fs.open_output_stream(f"{base.rstrip('/')}/{run_name}{TRIALS_SUFFIX}") as f:
            f.write(json.dumps({"trial_set": key, "trials": trials}).encode())
    except OSError:
        pass


def _set_of(fs, base: str, run_name: str) -> str | None:
    try:
        with fs.open_input_stream(f"{base.rstrip('/')}/{run_name}{TRIALS_SUFFIX}") as f:
            return json.loads(f.read().decode()).get("trial_set")
    except (OSError, ValueError, AttributeError):
        return None


def latest_run(storage_path: str, sweep: str, key: str | None = None) -> str | None:
    """Newest ``<sweep>-<timestamp>-<pid>`` Tune run under storage_path (of trial set ``key`` when given;
    a run without a recorded set counts as any set), whether Tune can restore it or not (see
    launch.restore_problem): an older run must not stand in for the one just interrupted."""
    import pyarrow.fs as pafs

    fs, base = fs_of(storage_path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError:
        return None
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith(sweep + "-") and i.base_name[len(sweep) + 1:].replace("-", "").isdigit())
    if key is not None:
        names = [n for n in names if _set_of(fs, base, n) in (key, None)]
    return storage_path.rstrip("/") + "/" + names[-1] if names else None


def drop_finished_checkpoints(results) -> int:
    """Delete the checkpoint folders of the Tune trials in ``results`` (a ResultGrid) whose every run
    finished or was skipped; returns how many trials were cleaned. Local storage only."""
    import os

    cleaned = 0
    for r in results:
        metrics, path = r.metrics or {}, getattr(r, "path", None)
        if r.error is not None or not metrics.get("final") or not path or "://" in path or not os.path.isdir(path):
            continue
        if "runs" in metrics and any(row.get("status") == "failed" for row in json.loads(metrics["runs"])):
            continue  # a packed copy failed: --resume retries it from its checkpoint
        gone = [d for d in os.listdir(path) if d.startswith("checkpoint_")]
        for d in gone:
            shutil.rmtree(os.path.join(path, d), ignore_errors=True)
        cleaned += bool(gone)
    return cleaned


def _checkpoint_index(name: str) -> int | None:
    m = re.fullmatch(r"checkpoint_(\d+)", name)
    return int(m.group(1)) if m else None


def refill_checkpoints(run_path: str) -> int:
    """Before ``--resume`` restores the Tune run at ``run_path``: a checkpoint its experiment state names but a
    trial folder lacks, where that folder holds newer ones, is refilled with a copy of the newest; returns how
    many. Tune deletes a trial's older checkpoints (``num_to_keep``) before its next snapshot of the state, so a
    driver killed in between leaves a state naming a deleted checkpoint, and Ray's restore of that trial fails
    ("does not exist on storage anymore") before the trial can look for its newest state itself
    (``trial_sync.newest_state``, which then picks the copy: the newest file). The names are read from the whole
    state, not per trial, so a trial may also get a copy under an older name only another trial's entry uses: a
    duplicate of its newest, deleted with its other checkpoints when it finishes."""
    import pyarrow.fs as pafs

    fs, base = fs_of(run_path)
    base = base.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        named: set[str] = set()
        for i in infos:
            if i.base_name.startswith("experiment_state-") and i.base_name.endswith(".json"):
                with fs.open_input_stream(i.path) as f:
                    named |= set(re.findall(r"checkpoint_\d{6}", f.readall().decode("utf-8", "replace")))
    except OSError:
        return 0
    refilled = 0
    for trial in (i for i in infos if i.type == pafs.FileType.Directory):
        have = {i.base_name: i.path for i in fs.get_file_info(pafs.FileSelector(trial.path))
                if i.type == pafs.FileType.Directory and _checkpoint_index(i.base_name) is not None}
        if not have:
            continue
        newest = max(have, key=_checkpoint_index)
        for name in sorted(named - set(have)):
            if _checkpoint_index(name) < _checkpoint_index(newest):
                fs.create_dir(f"{trial.path}/{name}")
                pafs.copy_files(have[newest], f"{trial.path}/{name}", source_filesystem=fs, destination_filesystem=fs)
                refilled += 1
    return refilled
