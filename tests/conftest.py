"""Fixtures shared by the test modules.

- Every test runs without ``RAY_ADDRESS`` and ``MLFLOW_TRACKING_URI`` (autouse, whole session):
  an in-process ``sweeps.launch.connect()`` then starts a local runtime instead of joining a
  developer's cluster, and no code under test falls back to a tracking server named in the shell.
  Subprocesses inherit the cleaned environment.
- ``ray_runtime``: one local Ray runtime for the whole session (through ``launch.connect``, so the
  tests get what a local sweep gets), started by the first test that asks for it.
- ``postgres``: the PostgreSQL server ``.ci/run`` starts for the slow suite; skips without one.
- ``torch_one_thread``: torch on one thread for the test (tiny models: extra threads only spin,
  and on a loaded machine they cost 10x).
- ``sweep_store`` (a SQLite MLflow store and Tune storage in a temporary dir) and ``smoke_sweep``
  (``ablation_grid.py --preset smoke`` into its experiment ``smoke``, run once): shared by
  ``test_sweeps.py`` and ``test_packing.py`` for the whole session, so the suite pays for one.

Helpers that are not fixtures live in plain modules beside the tests (``docker_spec.py``,
``cluster_harness.py``) and are imported by name.
"""

from __future__ import annotations

import pytest

OUTSIDE_TARGETS = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")


@pytest.fixture(scope="session", autouse=True)
def no_outside_targets():
    with pytest.MonkeyPatch.context() as mp:
        for name in OUTSIDE_TARGETS:
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def ray_runtime():
    """A local Ray runtime: 2 CPUs, a 100 MB object store, no dashboard; shut down at session end."""
    from sweeps import launch

    started = launch.connect(num_cpus=2, object_store_memory=100 * 1024**2)
    yield
    if started:
        launch.shutdown()


@pytest.fixture(scope="session")
def postgres():
    """The PostgreSQL server that ``bash .ci/run`` starts for the slow suite (``cluster_harness.Postgres``,
    named by $SWEEPS_TEST_POSTGRES_URI and $SWEEPS_TEST_POSTGRES_PASSWORD_FILE); skips without it."""
    from cluster_harness import POSTGRES_URI_VAR, postgres_from_env

    pg = postgres_from_env()
    if pg is None:
        pytest.skip(f"no PostgreSQL for the tests: {POSTGRES_URI_VAR} is not set (bash .ci/run starts one)")
    return pg


@pytest.fixture
def torch_one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sweep_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweeps")
    return {"uri": f"sqlite:///{d}/mlflow.db", "storage": str(d / "ray_results"), "dir": d}


@pytest.fixture(scope="session")
def smoke_sweep(ray_runtime, sweep_store):
    """The whole leave-one-out design on the smoke preset (36 trials; packed by default)."""
    from sweep_cli import grid_args, run_cli
    from sweeps import ablation_grid

    code, out = run_cli(ablation_grid.main, grid_args(sweep_store, "smoke"))
    return {"code": code, "out": out}
