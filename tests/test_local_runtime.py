"""The local Ray runtime a sweep starts (``sweeps.launch.connect``), through a real runtime.

Ray starts workers at nice 15 (``RAY_worker_niceness``), so on a laptop every trial yields to any
other job; a local runtime from ``connect`` runs them at the driver's priority instead.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.usefixtures("ray_runtime")  # tests/conftest.py: launch.connect(num_cpus=2, ...)


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
