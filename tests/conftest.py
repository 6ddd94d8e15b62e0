"""Fixtures shared by the test modules.

- Every test runs without ``RAY_ADDRESS`` and ``MLFLOW_TRACKING_URI`` (autouse, whole session):
  an in-process ``sweeps.launch.connect()`` then starts a local runtime instead of joining a
  developer's cluster, and no code under test falls back to a tracking server named in the shell.
  Subprocesses inherit the cleaned environment.
- ``ray_runtime``: one local Ray runtime for the whole session (through ``launch.connect``, so the
  tests get what a local sweep gets), started by the first test that asks for it.
- ``torch_one_thread``: torch on one thread for the test (tiny models: extra threads only spin,
  and on a loaded machine they cost 10x).

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
    import ray

    from sweeps import launch

    started = launch.connect(num_cpus=2, object_store_memory=100 * 1024**2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def torch_one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
