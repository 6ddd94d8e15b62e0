"""The local Ray runtime a sweep starts (``sweeps.launch.connect``), through a real runtime.

Ray starts workers at nice 15 (``RAY_worker_niceness``), so on a laptop every trial yields to any
other job; a local runtime from ``connect`` runs them at the driver's priority instead, and starts
no worker that no trial asks for.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("ray_runtime")
_TINY = {"data.name": "digits", "model.width": 16, "model.depth": 2, "train.pre_epochs": 1, "train.post_epochs": 1,
         "prune.density": 0.1}  # tests/conftest.py: launch.connect(num_cpus=2, ...)


def test_local_workers_run_at_the_drivers_priority_and_connect_is_idempotent():
    import ray

    from sweeps import launch

    @ray.remote(num_cpus=1)
    def niceness() -> int:
        return os.nice(0)

    @ray.remote(num_cpus=1)
    class Probe:  # Tune's function trainables run in actors
        def niceness(self) -> int:
            return os.nice(0)

    driver = os.nice(0)
    assert ray.get(niceness.remote(), timeout=600) == driver
    probe = Probe.remote()
    try:
        assert ray.get(probe.niceness.remote(), timeout=600) == driver
    finally:
        ray.kill(probe)
    assert launch.connect() is False  # already connected: nothing started, nothing for the caller to shut down
    assert "RAY_ADDRESS" not in os.environ  # conftest: never a developer's cluster


_COUNT_WORKERS = """
import os, sys, time
from sweeps import launch

launch.connect(num_cpus=2)
started, seen = time.monotonic(), 0
while time.monotonic() - started < float(sys.argv[1]) and not seen:
    seen = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            session = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[3])
            args = open(f"/proc/{pid}/cmdline").read().split("\\0")
        except (OSError, IndexError, ValueError):
            continue
        worker = args[0].startswith("ray::IDLE") or (len(args) > 1 and args[1].endswith("default_worker.py"))
        seen += session == os.getsid(0) and worker
    time.sleep(0.2)
import ray
from sweeps import relay
print(relay.ADDRESS_ENV in ray.get_runtime_context().runtime_env.get("env_vars", {}), seen,
      round(time.monotonic() - started, 1))
"""


def test_a_local_runtime_starts_no_worker_that_no_trial_asks_for():
    """Ray pre-starts a worker per CPU for the job's runtime env, which Tune's trial actors never use
    (they carry a runtime env of their own), so a local runtime from ``connect`` starts none
    (``RAY_prestart_worker_first_driver=0``, ~0.85 CPU s each). The control, with Ray's default,
    sees them appear; the runtime under test is watched three times as long, at least 5 s. The
    control also has ``SWEEPS_RELAY=0``: its workers get no relay to write through."""
    import subprocess
    import sys

    def watch(window: float, **env) -> tuple[bool, int, float]:
        out = subprocess.run([sys.executable, "-c", _COUNT_WORKERS, str(window)], capture_output=True, text=True,
                             timeout=600, env={**os.environ, **env}, start_new_session=True)
        assert out.returncode == 0, out.stderr[-3000:]
        relayed, seen, after = out.stdout.split()[-3:]
        return relayed == "True", int(seen), float(after)

    relayed, seen, after = watch(120.0, RAY_prestart_worker_first_driver="1", SWEEPS_RELAY="0")  # a value given wins
    assert seen >= 1, "the control should see Ray's pre-started workers"
    assert not relayed
    assert watch(max(5.0, 3 * after))[:2] == (True, 0)


def test_a_trial_of_a_local_runtime_writes_through_the_relay_and_imports_no_mlflow(tmp_path):
    """A trial's process (an actor with a runtime env of its own, as Tune starts them) gets the driver's
    relay in its environment; its run lands in the store, claimed by that process, which never imported
    MLflow or SQLAlchemy (~4.5 CPU s per worker, sweeps/relay.py)."""
    import ray
    from mlflow import MlflowClient

    import runstore

    from sparse_core.config import from_flat, to_flat
    from sweeps import launch, relay
    from sweeps.designs import Trial as Trial_

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = runstore.experiment_id(uri, "relay")
    flat = to_flat(from_flat(_TINY))

    @ray.remote(num_cpus=1, runtime_env={"env_vars": {"PL_DISABLE_FORK": "1", "RELAY_TEST": str(tmp_path)}})
    class Trial:
        def run(self, uri: str, exp: str) -> dict:
            import sys

            import sweeps.trainable  # noqa: F401 - what a trial imports
            import sweeps.trial_sync  # noqa: F401
            from sparse_core.config import from_flat, run_key
            from sparse_core.train import run
            from sweeps import claims, relay

            cfg = from_flat(_TINY)
            mlrun = relay.trial_run(uri, exp, sweep="s", cell="base", flat=cfg.to_flat(), run_key=run_key(cfg)).open()
            mlrun.finish(run(cfg, lambda metrics, _: mlrun.log_step(metrics)))
            return {"kind": type(mlrun).__name__, "run_id": mlrun.run_id, "claim": claims.this_claim(),
                    "imported": sorted(m for m in ("mlflow", "sqlalchemy", "alembic") if m in sys.modules)}

    trial = Trial.remote()
    try:
        with launch.serving(relay.Scope.of(uri, exp, "s", [Trial_("base", flat)])):
            out = ray.get(trial.run.remote(uri, exp), timeout=600)
    finally:
        ray.kill(trial)
    token = relay._read_token(launch._relay.token_file).encode()
    logs = [p for p in Path(ray._private.worker._global_node.get_session_dir_path()).rglob("*") if p.is_file()]
    assert any(b"SWEEPS_RELAY_ADDRESS" in p.read_bytes() for p in logs)  # Ray logs the workers' environment
    assert not [p for p in logs if token in p.read_bytes()]  # which holds the token file's path, not the token
    assert out["kind"] == "RemoteRun" and out["imported"] == []
    stored = MlflowClient(uri).get_run(out["run_id"])
    assert stored.info.status == "FINISHED" and stored.data.tags["claimed_by"] == out["claim"]
    assert int(out["claim"].split("/")[1]) != os.getpid() and "final/test_acc" in stored.data.metrics
