"""What a trial writes to its MLflow run, buffered in the trial's process (``RunLog``), and when it is written.

Per-epoch and per-round metrics are buffered and written in few, large store calls: each call costs the
driver ~5-8 ms of CPU whatever its size, each row ~0.1 ms (benchmarks/mlflow_writes.py). The trainable calls
``flush()`` before every checkpoint, and it writes only when ``FLUSH_EVERY_S`` have passed since the run's last
write (so the MLflow UI still follows a long run) or when rows are pending that a checkpoint cannot restore
(``prune/``); ``finish()`` writes the rest with the results in one call, ``fail()`` what is pending. A trial
retried from a checkpoint whose epochs never reached the run logs them again from the checkpoint's history
(``restore``: every ``epoch/`` and ``trainer/`` key is in it), so every epoch is in the run exactly once
(tests/test_flush_policy.py). ``checkpoint_dir`` goes with the next write. Not logged per epoch (``NOT_LOGGED``:
no reader): ``trainer/seconds`` (the total is ``final/seconds``) and ``trainer/mask_mean`` (=
``trainer/mask_soft_density``). ``tracking.TrialRun`` writes a run itself, ``relay_client.RemoteRun`` through
the driver.
"""

from __future__ import annotations

import time

from runstore import PRUNE_PREFIX, finite, step_metrics

from sparse_core.results import StepEvent

FLUSH_EVERY_S = 30.0  # a checkpoint's flush writes when this long has passed since the run's last write


class RunLog:
    """What a trial writes to its run, buffered in the trial's process: the per-epoch and per-round
    metrics as (key, value, timestamp ms, step). ``TrialRun`` writes them to the store itself;
    ``sweeps/relay.py``'s ``RemoteRun`` hands them to the driver, which writes them. ``clock``: seconds,
    for ``FLUSH_EVERY_S`` (a replay sets its own: benchmarks/mlflow_writes.py)."""

    clock = staticmethod(time.monotonic)

    def __init__(self, run_key: str):
        self.run_key = run_key
        self.run_id: str | None = None
        self.skip: str | None = None  # "finished" or "claimed": do not train (see TrialRun.open)
        self.checkpoint_dir: str | None = None  # Tune trial dir of the continued run's checkpoints
        self.logged_epoch = 0  # epochs <= this are already in the run (from before a retry)
        self.logged_round = 0
        self._pending: list = []  # metrics not yet written (see flush)
        self._written_at: float | None = None  # clock() of the last write (None: since open)

    def _log(self, values: dict, step: int) -> None:
        now = int(time.time() * 1000)
        self._pending += [(k, float(v), now, step) for k, v in values.items() if finite(v)]

    def log_step(self, event: StepEvent | dict) -> None:
        """One step of a run's log (``runstore.step_metrics``), unless the run has it already (from before a retry)."""
        record = step_metrics(event if isinstance(event, StepEvent) else StepEvent.from_dict(event))
        if record is None:
            return
        kind, step, values = record
        if kind == "prune" and step > self.logged_round:
            self._log(values, step)
            self.logged_round = step
        elif kind == "epoch" and step > self.logged_epoch:
            self._log(values, step)
            self.logged_epoch = step

    def restore(self, history: list[dict]) -> None:
        """A trial continuing from a checkpoint: buffer its epochs that the run lacks (a flush before the
        checkpoint is not a write: the run may end before them) from the checkpoint's ``history``."""
        for epoch, metrics in enumerate(history[self.logged_epoch:], start=self.logged_epoch + 1):
            self.log_step({**metrics, "epoch": epoch})

    def due(self) -> bool:
        """Whether a checkpoint's flush writes: ``FLUSH_EVERY_S`` since the last write (or the first
        flush), or rows pending that no checkpoint restores (a pruning round's)."""
        now = self.clock()
        if self._written_at is None:
            self._written_at = now
        return now - self._written_at >= FLUSH_EVERY_S or any(m[0].startswith(PRUNE_PREFIX) for m in self._pending)

    def wrote(self) -> None:
        self._written_at = self.clock()
