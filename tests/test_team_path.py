"""The team path: sweeps on the tracking server of docker/compose.yaml (its own `mlflow server`
command on loopback, PostgreSQL as the backend store, artifacts served by the server), on the
PostgreSQL that .ci/run starts (skipped without $SWEEPS_TEST_POSTGRES_URI). The faults of
tests/test_faults.py against that server, where claims are not locked but arbitrated by the server
(sweeps/claims.py): two drivers of one sweep at once, a driver killed with SIGKILL at ~40 % of the
sweep then re-run plainly, with --resume or by two drivers at once, Ctrl-C then a re-run, a trial's
worker process killed. Each ends with one FINISHED run per run_key and none RUNNING. Then the
analysis and the report read the runs back over HTTP, their artifacts proxied (``mlflow-artifacts:``).

One server for the module; each test has an experiment of its own. Every sweep runs with a marker
in its environment: whatever is left of it is killed by pid afterwards (tests/cluster_harness.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from cluster_harness import Proc, clean_env, kill_marked, running_mlflow_on_postgres, start
from test_faults import (LIMIT_S, ROOT, assert_drivers_shared, assert_one_finished_run_per_key,
                         assert_rerun_continued, newest_epoch, sweep_argv)

from sweeps import tracking

pytestmark = pytest.mark.slow
# A sparse stage of seconds (the smoke preset's takes ~0.1 s): 150 epochs of 16-sample batches after the
# pre-training's checkpoint, so a poll of the server sees the trial running before it ends.
LONG = ("--set", "train.post_epochs=150", "--set", "train.batch_size=16")
# Cells whose trials checkpoint at the end of their pre-training (RigL's first checkpoint is its last).
PRETRAINED = "full,base"


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    with running_mlflow_on_postgres(postgres, tmp_path_factory.mktemp("team"), "team") as s:
        yield s


@pytest.fixture
def marker():
    """The marker of this test's sweeps; afterwards their leftovers are killed."""
    m = uuid.uuid4().hex
    yield m
    kill_marked(m)


def team_argv(tmp_path, server, experiment, cells="full,base,rigl", densities="0.1,0.05", *extra):
    return sweep_argv(tmp_path, cells, densities, "--experiment", experiment, "--no-report", *extra, uri=server.url)


def sweep(argv, marker, log: Path) -> Proc:
    """A sweep driver in a session of its own (``os.killpg`` reaches its Ray runtime too), its output
    in ``log`` (a pipe nobody reads while the test polls the server could fill and stall it)."""
    return start(argv, log, clean_env(marker), ROOT)


def checkpointed(uri: str, experiment: str) -> tuple[int, list]:
    """(how many runs are FINISHED, the RUNNING runs that have a checkpoint)."""
    runs = tracking.search(uri, experiment)
    return (sum(r.info.status == "FINISHED" for r in runs),
            [r for r in runs if r.info.status == "RUNNING" and "checkpoint_dir" in r.data.tags])


def wait_for_checkpointed(proc, uri, experiment, finished_at_least: int = 0) -> list:
    """Polls until ``finished_at_least`` runs are FINISHED and one is RUNNING with a checkpoint."""
    deadline = time.time() + LIMIT_S
    while proc.poll() is None and time.time() < deadline:
        n_finished, running = checkpointed(uri, experiment)
        if n_finished >= finished_at_least and running:
            return running
        time.sleep(0.25)
    pytest.fail(f"no run RUNNING with a checkpoint after {finished_at_least} FINISHED (exit code {proc.poll()})")


def finished(uri: str, experiment: str) -> dict:
    return {r.info.run_id: r.info.end_time for r in tracking.search(uri, experiment, "attributes.status = 'FINISHED'")}


def rerun(argv, marker, *extra) -> subprocess.CompletedProcess:
    done = subprocess.run(argv + list(extra), cwd=ROOT, env=clean_env(marker), capture_output=True, text=True,
                          timeout=LIMIT_S)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


# ---- two drivers at once ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_drivers(server, tmp_path_factory):
    """Two drivers of the same sweep started together on one experiment of the server (new: no run yet)."""
    tmp, m = tmp_path_factory.mktemp("two"), uuid.uuid4().hex
    argv = team_argv(tmp, server, "team-two", "base,rigl")
    try:
        procs = [sweep(argv, m, tmp / f"driver{i}.log") for i in range(2)]
        for p in procs:
            p.popen.wait(timeout=LIMIT_S)
    finally:
        kill_marked(m)
    return [p.popen for p in procs], [p.log.read_text(errors="replace") for p in procs], "team-two"


def test_two_drivers_at_once_share_the_run_keys(server, two_drivers):
    procs, outs, experiment = two_drivers
    assert_drivers_shared(procs, outs)
    runs = assert_one_finished_run_per_key(server.url, 4, experiment)
    # each run was claimed through the server once: its claim.1 param names the trial's process
    assert all(r.data.tags["claimed_by"] == r.data.params["claim.1"].rsplit("@", 1)[0] for r in runs)


# ---- a killed driver, Ctrl-C, a killed trial worker -----------------------------------------------------
@pytest.mark.parametrize("again", ["plain", "resume", "twice-at-once"])
def test_driver_killed_at_40_percent_then_rerun(server, tmp_path, marker, again):
    """SIGKILL on the driver's process group at ~40 % of the sweep (six trials, one at a time: two
    FINISHED, the third past the checkpoint of its pre-training, in a sparse stage of seconds), then
    the same command, plainly, with --resume, or plainly by two drivers at once (both find the
    orphan: one takes it): the orphan continues in its run from its newest checkpoint, once, and
    the FINISHED runs stay as they were."""
    experiment = f"team-kill-{again}"
    argv = team_argv(tmp_path, server, experiment, PRETRAINED, "0.1,0.05,0.01", *LONG, "--pack", "1",
                     "--max-concurrent", "1")
    proc = sweep(argv, marker, tmp_path / "driver.log").popen
    wait_for_checkpointed(proc, server.url, experiment, finished_at_least=2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    kill_marked(marker)  # Ray's processes die with the driver; a laggard is killed like them
    orphans = {r.info.run_id: newest_epoch(r.data.tags["checkpoint_dir"], r.data.tags["run_key"])
               for r in checkpointed(server.url, experiment)[1]}
    assert orphans, "the kill should have left a RUNNING run with a checkpoint"
    before = finished(server.url, experiment)
    if again == "twice-at-once":
        drivers = [sweep(argv, marker, tmp_path / f"again{i}.log") for i in range(2)]
        for d in drivers:
            d.popen.wait(timeout=LIMIT_S)
        assert_drivers_shared([d.popen for d in drivers], [d.tail(10**7) for d in drivers])
    else:
        rerun(argv, marker, *(["--resume"] if again == "resume" else []))
    assert_rerun_continued(server.url, 6, before, orphans, experiment)


def test_ctrl_c_then_rerun(server, tmp_path, marker):
    """SIGINT once the first trial is done (``LONG``: the others are still running then): the driver
    closes its open runs (KILLED) and exits 1; the same command again finishes the rest, continuing
    the interrupted runs."""
    experiment = "team-sigint"
    argv = team_argv(tmp_path, server, experiment, "full,base,rigl", "0.1,0.05", *LONG)
    driver = sweep(argv, marker, tmp_path / "driver.log")
    deadline = time.time() + LIMIT_S
    while "\n  done " not in "\n" + driver.tail(10**7) and driver.popen.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    driver.popen.send_signal(signal.SIGINT)
    driver.popen.wait(timeout=LIMIT_S)
    assert driver.popen.returncode == 1, driver.tail()
    assert "unfinished: continue with --resume" in driver.tail(), driver.tail()
    assert not tracking.search(server.url, experiment, "attributes.status = 'RUNNING'")
    before = finished(server.url, experiment)
    assert before, driver.tail()
    rerun(argv, marker)
    runs = {r.info.run_id: r for r in assert_one_finished_run_per_key(server.url, 6, experiment)}
    assert all(runs[run_id].info.end_time == end for run_id, end in before.items())  # never trained again


def test_trial_worker_killed_is_retried_in_its_run(server, tmp_path, marker):
    """SIGKILL on the process of a running trial (``claimed_by`` names it) once it has a checkpoint:
    Ray retries the trial from that checkpoint, which continues the same run; the sweep succeeds.
    The sparse stage takes seconds (``LONG``), so that the trial still runs when the kill comes."""
    experiment = "team-worker"
    argv = team_argv(tmp_path, server, experiment, PRETRAINED, "0.1", *LONG)
    driver = sweep(argv, marker, tmp_path / "driver.log")
    victim = wait_for_checkpointed(driver.popen, server.url, experiment)[0]
    host, pid, _ = victim.data.tags["claimed_by"].rsplit("/", 2)
    assert host == socket.gethostname()
    os.kill(int(pid), signal.SIGKILL)
    assert driver.popen.wait(timeout=LIMIT_S) == 0, driver.tail()
    runs = {r.info.run_id: r for r in assert_one_finished_run_per_key(server.url, 2, experiment)}
    tags = runs[victim.info.run_id].data.tags
    assert tags["retries"] == "1" and tags["claimed_by"] != victim.data.tags["claimed_by"], tags
    assert int(tags["resumed_at_epoch"]) >= 1, tags  # from its checkpoint, not from scratch


# ---- analysis and report over HTTP ------------------------------------------------------------------
def test_analysis_report_over_http_with_proxied_artifacts(server, two_drivers, tmp_path):
    """The README's cluster step: `python -m analysis report --mlflow-uri http://...` reads the runs
    and their layer_density.json through the server and logs the report to the run 'analysis',
    whose artifacts the server stores (``mlflow-artifacts:``)."""
    _, _, experiment = two_drivers
    out = tmp_path / "report"
    env = clean_env(uuid.uuid4().hex)
    done = subprocess.run([sys.executable, "-m", "analysis", "report", "--experiment", experiment,
                           "--mlflow-uri", server.url, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=LIMIT_S)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "ignored params" not in done.stderr, done.stderr[-2000:]  # the claims are no config keys
    # the trials' layer_density.json, logged by the sweeps through the server, came back through it
    assert "no per-layer density plot" not in done.stderr and (out / "layer_density.png").is_file(), done.stderr
    assert (out / "index.html").is_file() and (out / "table.md").is_file()
    c = tracking.client(server.url)
    exp = c.get_experiment_by_name(experiment)
    trials = c.search_runs([exp.experiment_id], "tags.cell != 'analysis'")
    assert trials and all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in trials)
    (report,) = c.search_runs([exp.experiment_id], "tags.cell = 'analysis'")
    assert report.info.status == "FINISHED" and report.info.artifact_uri.startswith("mlflow-artifacts:")
    logged = {a.path for a in c.list_artifacts(report.info.run_id)}
    assert "index.html" in logged and "table.md" in logged, logged
    # the server wrote them, into its --artifacts-destination; the client never saw that path
    stored = {p.name for p in Path(server.artifacts).rglob("*") if report.info.run_id in p.parts}
    assert {"index.html", "table.md"} <= stored, stored
    table = (out / "table.md").read_text()
    assert "base" in table and "rigl" in table, table
