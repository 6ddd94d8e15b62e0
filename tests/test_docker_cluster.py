"""The docker stack's own commands, run here on loopback: the exact `mlflow server` command of
compose.yaml (against SQLite, and against the throw-away PostgreSQL that .ci/run starts) and the
exact `ray start` commands of the head and the worker (token auth on, two nodes on 127.0.0.1),
with only addresses, ports, paths and resources changed (tests/cluster_harness.py). The slow
tests start the two-node cluster, and run the smoke sweep against that server and through
`ray job submit` on that cluster.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from cluster_harness import (WORKER_CPUS, clean_env, healthcheck_argv, http_get, kill_marked,
                             log_and_read_back, postgres_bin, require_sweep_script, running_mlflow,
                             running_ray_cluster, start, stop, finished_runs)
from docker_spec import RAY_CLI, ROOT, SWEEP_SCRIPT, backend_driver, env_of, get_opt, service


# ============================================================================= MLflow server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mlflow")
    with running_mlflow(f"sqlite:///{workdir / 'mlflow.db'}", workdir) as server:
        yield server


def test_compose_mlflow_server_command_serves_runs_and_artifacts(mlflow_server, tmp_path):
    log_and_read_back(mlflow_server, tmp_path)
    api = f"{mlflow_server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    # The Ray containers call the server "mlflow:5000": allowed. Any other name: refused.
    assert http_get(api, {"Host": "mlflow:5000"})[0] == 200
    assert http_get(api, {"Host": "127.0.0.1:5000"})[0] == 200
    status, body = http_get(api, {"Host": "evil.example.com"})
    assert status == 403, (status, body)
    # compose's health check, pointed at this port, passes.
    port = mlflow_server.url.rsplit(":", 1)[1]
    r = subprocess.run(healthcheck_argv(service("mlflow"), "5000", int(port)), capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_compose_mlflow_server_command_on_postgres(postgres, tmp_path):
    """The same command against a real PostgreSQL (the one .ci/run starts), the password given only
    as PGPASSWORD: compose's backend URI with only the host and port changed."""
    pg = service("postgres")
    user, db = env_of(pg)["POSTGRES_USER"], env_of(pg)["POSTGRES_DB"]
    assert (postgres.user, postgres.database) == (user, db), "the test server's user and database are compose's"
    # compose's health check (pg_isready), pointed at this port.
    hc = healthcheck_argv(pg, "5432", postgres.port)
    pg_isready = postgres_bin("pg_isready")
    assert pg_isready, "pg_isready is not installed (Debian: apt-get install postgresql-client)"
    hc = [pg_isready if a == "pg_isready" else a for a in hc] + [f"--port={postgres.port}"]
    assert subprocess.run(hc, capture_output=True, timeout=30).returncode == 0
    importlib.import_module(backend_driver())  # the driver compose's URI names is installed (the test extra)
    backend = get_opt(service("mlflow")["command"], "--backend-store-uri")
    backend = backend.replace("@postgres:5432/", f"@{postgres.host}:{postgres.port}/")
    assert backend == postgres.backend() and postgres.password not in backend
    with running_mlflow(backend, tmp_path, {"PGPASSWORD": postgres.password}) as server:
        run_id = log_and_read_back(server, tmp_path)
    with postgres.connect() as con:
        assert con.execute("select status from runs where run_uuid = %s", (run_id,)).fetchone() == ("FINISHED",)


# ============================================================================= Ray head + worker (slow)


@pytest.fixture(scope="module")
def ray_cluster(mlflow_server):
    with running_ray_cluster(mlflow_server.url) as cluster:
        yield cluster


@pytest.mark.slow  # two Ray nodes on 2 cores: about a minute to start
def test_compose_ray_commands_start_a_two_node_cluster_with_token_auth(ray_cluster):
    c = ray_cluster
    nodes = c.alive_nodes()
    assert len(nodes) == 2 and len({n["node_id"] for n in nodes}) == 2
    assert sum(n["is_head_node"] for n in nodes) == 1
    # compose's head offers no CPU and no GPU: trials can only go to workers.
    cpus = {n["is_head_node"]: n["resources_total"].get("CPU", 0) for n in nodes}
    assert cpus == {True: 0, False: WORKER_CPUS}, cpus
    # Token auth is on although nothing but compose's entrypoint and environment turned it on.
    assert json.loads(http_get(f"{c.dashboard}/api/authentication_mode")[1])["authentication_mode"] == "token"
    assert http_get(f"{c.dashboard}/api/jobs/")[0] == 401
    assert http_get(f"{c.dashboard}/api/jobs/", {"Authorization": "Bearer wrong"})[0] in (401, 403)
    assert http_get(f"{c.dashboard}/api/jobs/", {"Authorization": f"Bearer {c.token}"})[0] == 200
    # The README's client: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, no token file.
    listed = subprocess.run([RAY_CLI, "list", "nodes", "--address", c.dashboard, "--format", "json"],
                            env=c.client_env(), capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert sum(n["state"] == "ALIVE" for n in json.loads(listed.stdout)) == 2
    # Without RAY_AUTH_MODE the token is not sent and the cluster refuses the client.
    env = c.client_env()
    del env["RAY_AUTH_MODE"]
    refused = subprocess.run([RAY_CLI, "list", "nodes", "--address", c.dashboard, "--format", "json"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    # compose's health check of the head, pointed at this dashboard port.
    port = int(c.dashboard.rsplit(":", 1)[1])
    r = subprocess.run(healthcheck_argv(service("ray-head"), "8265", port), capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr


# ============================================================================= the sweep (slow)


@pytest.mark.slow
def test_smoke_sweep_logs_finished_runs_to_the_compose_mlflow_server(mlflow_server, tmp_path):
    require_sweep_script()
    base = Path(tempfile.mkdtemp(prefix="swdt", dir="/tmp"))
    marker = uuid.uuid4().hex
    # A local ray.init() writes ~/.ray/auth_token: give it a HOME of its own.
    env = clean_env(marker, HOME=str(base / "home"), RAY_TMPDIR=str(base / "t"))
    argv = [sys.executable, SWEEP_SCRIPT, "--preset", "smoke", "--mlflow-uri", mlflow_server.url,
            "--experiment", "docker-check", "--storage-path", str(tmp_path / "ray_results")]
    proc = start(argv, base / "sweep.log", env, cwd=ROOT)
    try:
        proc.popen.wait(timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail(f"smoke sweep still running after 900 s\n{proc.tail()}")
    finally:
        stop(proc)
        kill_marked(marker)
    try:
        assert proc.popen.returncode == 0, proc.tail()
        finished_runs(mlflow_server, "docker-check")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_job_submit_runs_the_smoke_sweep_driver_on_head_trials_on_worker(ray_cluster, mlflow_server):
    require_sweep_script()
    c = ray_cluster
    # KubeRay's entrypoint has no --working-dir: a job starts in the raylet's directory, which is
    # the image's WORKDIR (here: the repository, where the head was started).
    for _ in range(3):
        probe = subprocess.run([RAY_CLI, "job", "submit", "--address", c.dashboard, "--", "python", "-c",
                                f"import pathlib, sys; sys.exit(not pathlib.Path('{SWEEP_SCRIPT}').is_file())"],
                               env=c.client_env(), capture_output=True, text=True, timeout=300,
                               cwd=tempfile.gettempdir())
        # a loaded head can answer before its job agent registers; Ray then asks to try again later
        if "No available agent to submit job" not in probe.stdout + probe.stderr:
            break
        time.sleep(5)
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
    # The README's submission, with loopback addresses for MLflow and storage.
    storage = c.base / "ray_results"
    submission = f"docker-job-{uuid.uuid4().hex[:8]}"
    argv = [RAY_CLI, "job", "submit", "--address", c.dashboard, "--working-dir", ".", "--submission-id", submission,
            "--", "python", SWEEP_SCRIPT, "--preset", "smoke", "--experiment", "docker-job",
            "--mlflow-uri", mlflow_server.url, "--storage-path", str(storage)]
    try:
        job = subprocess.run(argv, env=c.client_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        subprocess.run([RAY_CLI, "job", "stop", "--address", c.dashboard, submission], env=c.client_env(),
                       capture_output=True, timeout=120)
        pytest.fail("the smoke sweep job did not finish in 900 s")
    assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, job.stdout[-6000:] + job.stderr[-3000:]
    finished_runs(mlflow_server, "docker-job")
    # Which node ran each trial: the pid in Tune's result.json is the trial actor's pid.
    trial_pids = set()
    for result in storage.rglob("result.json"):
        for line in result.read_text().splitlines():
            if line.strip():
                trial_pids.add(json.loads(line)["pid"])
    assert trial_pids, f"no Tune result.json under --storage-path {storage}"
    listed = subprocess.run([RAY_CLI, "list", "actors", "--address", c.dashboard, "--detail", "--format", "json",
                             "--limit", "10000"], env=c.client_env(), capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    actors = json.loads(listed.stdout)
    node_of_pid = {a["pid"]: a["node_id"] for a in actors}
    head = next(n["node_id"] for n in c.alive_nodes() if n["is_head_node"])
    worker = next(n["node_id"] for n in c.alive_nodes() if not n["is_head_node"])
    # The driver ran on the head (its job supervisor is there), every trial on the worker: the
    # worker set up the uploaded working dir, imported the code, logged to MLflow and wrote to
    # the storage the driver read.
    (supervisor,) = [a for a in actors if a["class_name"] == "JobSupervisor" and submission in (a["name"] or "")]
    assert supervisor["node_id"] == head
    assert {node_of_pid.get(pid) for pid in trial_pids} == {worker}, (
        f"trial pids {sorted(trial_pids)} ran on nodes {[node_of_pid.get(p) for p in trial_pids]}; worker {worker}")
