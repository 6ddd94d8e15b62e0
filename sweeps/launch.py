"""Driver side of a sweep: connect to Ray, run (or restore) the Tuner, show progress.

Shared by ``ablation_grid.py`` and ``optuna_search.py``. Imported only after the command line
and every trial config have been checked, so bad input never starts Ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import ray
from ray import tune

from . import packing, relay, tracking
from .trainable import resources, train_trial
from .trial_sync import FAULT_ENOSPC_ENV
from .tune_store import fs_of, latest_run  # noqa: F401 - latest_run: --resume's pick, kept here for its callers

ROOT = Path(__file__).resolve().parent.parent
_relay: relay.Relay | None = None  # a local runtime's MLflow relay (connect)


# Tune snapshots its experiment state whenever old checkpoints are deleted (so --resume stays
# consistent) and warns about it every few seconds with short trials; the snapshots are cheap.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# The legacy output engine honours RunConfig(verbose=0): Progress below is the only live view.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Tune's default per-trial loggers are JSON, CSV and TensorBoard; run_config keeps only the JSON one
# (result.json: each trial's reports). MLflow has every metric already; the CSV file and the
# TensorBoard writer (a thread, a protobuf event per report) were driver work for every report.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


def _token_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def connect(**local) -> bool:
    """Join the cluster in RAY_ADDRESS (set inside ``ray job submit``) or start a local runtime
    (``local``: extra ``ray.init`` arguments for it, e.g. num_cpus).

    Returns True when this call started Ray (the caller then shuts it down).

    A local runtime's workers run at the user's priority: Ray starts workers at nice 15
    (``RAY_worker_niceness``, read by each worker from its environment) to keep a cluster node's
    raylet responsive, which on a laptop makes the trials yield to every other job. Ray's own job
    manager sets the same variable to 0 for its job supervisor. A value in the environment wins.

    A local runtime's trials write their MLflow runs through this process (``sweeps/relay.py``; off
    with ``SWEEPS_RELAY=0``); ``shutdown`` stops the relay with Ray.
    """
    global _relay
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:  # workers of a local runtime must import sweeps/ and sparse_core/ from this checkout
        # Ray pre-starts a worker per CPU for the job's runtime env, but Tune starts its trial actors
        # with one of their own (PL_DISABLE_FORK), so those workers only idle: ~0.85 CPU s each.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        # Ray turns token authentication on for a new local runtime and says so in a warning on every sweep:
        # it stays on, the notice is dropped (an explicitly disabled mode still gets Ray's own warning)
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_token_auth_notice)
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env_vars = {"PYTHONPATH": path, "RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0")}
        if os.environ.get(FAULT_ENOSPC_ENV):  # fault injection (tests) reaches the trials' processes
            env_vars[FAULT_ENOSPC_ENV] = os.environ[FAULT_ENOSPC_ENV]
        if relay.wanted():
            _relay = relay.Relay()
            env_vars.update(_relay.env)
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": env_vars}, **local)
    return True


def shutdown() -> None:
    """Stop what ``connect`` started: Ray, and the relay of a local runtime."""
    global _relay
    ray.shutdown()
    if _relay is not None:
        _relay.close()
        _relay = None


def serving(scope: relay.Scope):
    """The relay (if this driver runs one) serves the trials of ``scope`` for the duration of the block."""
    return _relay.serve(scope) if _relay is not None else contextlib.nullcontext()


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1))


def require_cpus(cpus: float) -> float:
    """``cpus``, or the end of the sweep when a trial asks for more CPUs than the cluster has (Tune would
    wait for ever): a runtime this process joined can be smaller than the machine ``options.check_args``
    measured."""
    if cpus > cluster_cpus():
        raise SystemExit(f"error: --cpus-per-trial {cpus:g} but the Ray cluster has {cluster_cpus():g} CPUs")
    return cpus


def fit(tuner: tune.Tuner, scope: relay.Scope):
    """``tuner.fit()``, the relay (if this driver runs one) serving the trials of ``scope`` meanwhile."""
    with serving(scope):
        return tuner.fit()


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def trial_label(trial) -> str:
    """``packing.label``; a search's trials (one copy each, of one cell) also carry their number."""
    copies = packing.specs(trial.config)
    label = packing.label(trial.config)
    return f"{label} #{trial.trial_id.rsplit('_', 1)[-1]}" if len(copies) == 1 and copies[0].get("cell") == "optuna" \
        else label


def _copies(trial) -> int:
    """Runs a Tune trial stands for: its copies (at least one)."""
    return max(1, len(packing.specs(trial.config)))


def _row_label(row: dict) -> str:
    return f"{row['cell']} d={row['density']:g} s={row['seed']}"


def trial_dirname(trial) -> str:
    """Short, unique and filesystem-safe (long config strings break: 'File name too long')."""
    cell = (packing.specs(trial.config) or [{}])[0].get("cell", "trial")
    safe = "".join(ch if ch.isalnum() or ch in "-_=+." else "_" for ch in cell)[:40]
    return f"{safe}_{trial.trial_id}"


_DISK_FULL = ("No space left on device", "database or disk is full", "[Errno 28]")


def disk_full(error_text: str | None) -> str | None:
    """The line of a trial's error that says the disk is full, or None."""
    for line in (error_text or "").splitlines()[::-1]:
        if any(mark in line for mark in _DISK_FULL):
            return line.strip()[:300]
    return None


class _DiskFullFilter(logging.Filter):
    """Tune logs each trial failure with its traceback; one that says the disk is full is dropped here and
    reported by ``Progress`` in one line instead (it stops the sweep, so the rest would only repeat it)."""

    def __init__(self, progress: "Progress"):
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        line = disk_full(str(error) if error is not None else record.getMessage())
        if line is None:
            return True
        self.progress.disk_is_full(line)
        return False


# Tune's log of each trial failure and of its own state's saving, Ray's of a failed trial task nobody
# waited for (Tune stopping the rest), and MLflow's of a store write (the relay writes in this process).
_FAILURE_LOGS = ("ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state", "ray._private.worker",
                 "mlflow.store.db.utils")


class _StopAll(tune.Stopper):
    """Stops the whole Tune run once ``Progress`` found a fault no retry can mend (a full disk)."""

    def __init__(self, progress: "Progress"):
        self.progress = progress

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.progress.stop_reason is not None


class Progress(tune.Callback):
    """One line per finished trial (per copy of a packed trial) plus a heartbeat: done/running/pending
    runs, best so far (by validation accuracy, never test), ETA. ``total``: runs, not Tune trials.

    Also closes the MLflow runs of a trial that errored for good or was stopped by a scheduler,
    so that no run is left RUNNING.
    """

    def __init__(self, total: int, tracking_uri: str, experiment_id: str, heartbeat_s: float = 30.0):
        self.total, self.uri, self.experiment_id, self.heartbeat_s = total, tracking_uri, experiment_id, heartbeat_s
        self.t0 = self.last_line = None
        self.best: tuple[float, str] | None = None
        self.epochs: dict[str, tuple[int, int, int]] = {}  # trial_id -> (epoch, epochs, copies) of running trials
        self.trial_seconds: dict[str, float] = {}
        self.failed_copies = 0  # copies of completed packed trials that failed alone
        self.runs = 0  # runs the Tune run stands for (its trials' copies, started or not)
        self.stop_reason: str | None = None  # set on a full disk: the whole sweep stops (_StopAll)

    def _status(self, trials, ended=None, ended_as: str = "TERMINATED") -> str:
        now = time.time()
        # The trial being reported on may not carry its final status yet.
        states = [(ended_as if t is ended else t.status, _copies(t)) for t in trials]
        done = sum(w for s, w in states if s in ("TERMINATED", "ERROR"))
        running = sum(w for s, w in states if s == "RUNNING")
        failed = sum(w for s, w in states if s == "ERROR") + self.failed_copies
        total = max(self.total, sum(w for _, w in states))
        frac = done + sum(w * e / max(n, 1) for e, n, w in self.epochs.values())
        elapsed = now - self.t0
        eta = _fmt_s(elapsed * (total - frac) / frac) if frac > 0 else "?"
        best = f"best val {100 * self.best[0]:.2f} % ({self.best[1]})" if self.best else "best -"
        fail = f", {failed} failed" if failed else ""
        return (f"{done}/{total} done, {running} running, {total - done - running} pending{fail} | {best} | "
                f"{_fmt_s(elapsed)} elapsed, ETA {eta}")

    def _print(self, text: str) -> None:
        self.last_line = time.time()
        print(text, flush=True)

    def on_step_begin(self, iteration, trials, **info):
        if self.t0 is None:
            self.t0 = self.last_line = time.time()

    def on_step_end(self, iteration, trials, **info):
        self.runs = sum(_copies(t) for t in trials)
        if self.t0 is not None and time.time() - self.last_line >= self.heartbeat_s:
            running = [f"{trial_label(t)} {e}/{n}" for t in trials if t.status == "RUNNING"
                       for e, n, _ in [self.epochs.get(t.trial_id, (0, 0, 1))]]
            self._print(f"[{self._status(trials)}] running: {'; '.join(running[:4])}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" in result and "epochs" in result:
            self.epochs[trial.trial_id] = (result["epoch"], result["epochs"], _copies(trial))
        self.trial_seconds[trial.trial_id] = result.get("time_total_s", 0.0)
        if not result.get("final"):
            return
        rows = json.loads(result["runs"])
        scored = [(r.get("val_acc", math.nan), _row_label(r) if len(rows) > 1 else trial_label(trial)) for r in rows]
        for val, label in scored:
            if math.isfinite(val) and (self.best is None or val > self.best[0]):
                self.best = (val, label)

    def _complete(self, trials, trial, last: dict) -> None:
        """One line per copy of a trial that ran to its end."""
        rows = json.loads(last["runs"])
        self.failed_copies += sum(r["status"] == "failed" for r in rows)
        took = (f"pack of {len(rows)}, " if len(rows) > 1 else "") + f"{last.get('time_total_s', 0):.1f}s"
        for i, r in enumerate(rows):
            status = f" [{self._status(trials, trial)}]" if i == len(rows) - 1 else ""
            label = _row_label(r) if len(rows) > 1 else trial_label(trial)
            if r["status"] == "failed":
                self._print(f"  FAILED {label}: {r.get('error', '')} ({took}){status}")
                continue
            what = f"val {100 * r.get('val_acc', math.nan):.2f} %, test {100 * r.get('test_acc', math.nan):.2f} %"
            if r.get("skipped") == "finished":
                what += " (FINISHED already)"
            elif r.get("skipped"):
                what = "skipped: running in another sweep"
            self._print(f"  done {label}: {what} ({took}){status}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.epochs.pop(trial.trial_id, None)
        last = trial.last_result or {}
        if last.get("final"):
            self._complete(trials, trial, last)
            return
        tracking.close_unfinished(self.uri, self.experiment_id, [trial.trial_id], "KILLED",
                                  "stopped early by the Tune scheduler")
        self._print(f"  done {trial_label(trial)}: stopped early ({last.get('time_total_s', 0):.1f}s) "
                    f"[{self._status(trials, trial)}]")

    def setup(self, **info):
        self._filter = _DiskFullFilter(self)
        for name in _FAILURE_LOGS:
            logging.getLogger(name).addFilter(self._filter)

    def on_experiment_end(self, trials, **info):
        if self.stop_reason is not None:
            return  # the disk is still full: what the driver writes next fails the same way, said once already
        for name in _FAILURE_LOGS:
            logging.getLogger(name).removeFilter(getattr(self, "_filter", None))

    def disk_is_full(self, line: str) -> None:
        """A trial failed on a full disk: the sweep stops (one line), since every retry and every other
        trial would fail the same way."""
        if self.stop_reason is None:
            self.stop_reason = line
            self._print(f"error: the disk is full ({line}): stopping the sweep; free space, then run it again "
                        f"(FINISHED runs are kept, the others continue from their checkpoints)")

    def _check_disk(self, trial) -> bool:
        """Whether ``trial`` failed on a full disk (its error file, where Tune's log did not say so already)."""
        if self.stop_reason is None:
            try:
                line = disk_full(trial.get_error())
            except Exception:  # noqa: BLE001 - the error file itself may be unreadable on a full disk
                line = None
            if line:
                self.disk_is_full(line)
        return self.stop_reason is not None

    def on_trial_recover(self, iteration, trials, trial, **info):
        if self._check_disk(trial):
            return
        self._print(f"  retry {trial_label(trial)}: failed, continuing from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.epochs.pop(trial.trial_id, None)
        full = self._check_disk(trial) or self.stop_reason is not None
        tracking.close_unfinished(self.uri, self.experiment_id, [trial.trial_id], "FAILED",
                                  f"disk full: {self.stop_reason}" if full else "trial errored (retries exhausted)")
        if full:
            return  # the one line about the disk said it
        where = getattr(trial, "error_file", None) or getattr(trial, "path", "")
        self._print(f"  FAILED {trial_label(trial)} (see {where}) [{self._status(trials, trial, 'ERROR')}]")


def run_config(name: str, storage_path: str, max_failures: int, callbacks: list) -> tune.RunConfig:
    from ray.tune.logger import JsonLoggerCallback

    progress = [c for c in callbacks if isinstance(c, Progress)]
    if os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS") == "1":
        callbacks = [*callbacks, JsonLoggerCallback()]
    return tune.RunConfig(
        name=name, storage_path=storage_path, verbose=0, callbacks=callbacks,
        stop=_StopAll(progress[0]) if progress else None,
        failure_config=tune.FailureConfig(max_failures=max_failures),
        # Two, not one: a crash while the newest is written still leaves the previous epoch's.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2))


def tuner(param_space: dict, *, cpus: float, gpus: float, tune_config: tune.TuneConfig,
          run_cfg: tune.RunConfig) -> tune.Tuner:
    return tune.Tuner(tune.with_resources(train_trial, resources(cpus, gpus)), param_space=param_space,
                      tune_config=tune_config, run_config=run_cfg)


def restore(path: str, *, cpus: float, gpus: float) -> tune.Tuner:
    return tune.Tuner.restore(path, tune.with_resources(train_trial, resources(cpus, gpus)),
                              resume_unfinished=True, resume_errored=True)


def restore_problem(path: str) -> str | None:
    """Why Tune cannot restore the run at ``path`` faithfully, or None. Tune writes its experiment state
    and then its search algorithm's state, not atomically: a driver killed in between (or while writing)
    leaves a state that ``Tuner.restore`` accepts but resumes wrongly, since without the searcher's
    state it generates trials from the param space, which ``tuner.pkl`` does not keep (one trial with
    an empty config)."""
    import pyarrow.fs as pafs
    from ray.tune.search import BasicVariantGenerator

    fs, base = _fs(path)
    try:
        names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))]
    except OSError as e:
        return f"cannot list it: {e}"
    states = sorted(n for n in names if n.startswith("experiment_state-") and n.endswith(".json"))
    searcher = BasicVariantGenerator.CKPT_FILE_TMPL.split("{}")[0]
    if not states:
        return "Tune had not saved its state yet"
    if not any(n.startswith(searcher) for n in names):
        return "its search state was never written"
    try:
        with fs.open_input_stream(f"{base.rstrip('/')}/{states[-1]}") as f:
            json.loads(f.readall())
    except (OSError, ValueError) as e:
        return f"its newest experiment state does not parse: {e}"
    return None


_fs = fs_of


def run_exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, base = _fs(path)
    try:
        return fs.get_file_info(base).type == pafs.FileType.Directory
    except OSError:
        return False
