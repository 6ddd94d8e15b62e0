"""Run the stack's own commands on loopback: compose's `mlflow server` and the head's and the
worker's `ray start`, with only addresses, ports, paths and resources changed.

Every process started here runs in its own session with a marker in its environment; teardown
stops it and then kills, by pid, whatever still carries the marker. `ray stop` is never used: it
would kill every Ray process on the machine, other people's included.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from docker_spec import (RAY_CLI, ROOT, SWEEP_SCRIPT, compose_unescape, env_of, get_opt, replace_opt, service,
                         set_opt)

MARKER_VAR = "SPARSITY_DOCKER_TEST_ID"


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marker_pids(marker: str) -> list[int]:
    needle = f"\0{MARKER_VAR}={marker}\0".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in b"\0" + (d / "environ").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


@dataclass
class Proc:
    popen: subprocess.Popen
    log: Path

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def start(argv: list[str], log: Path, env: dict, cwd: Path) -> Proc:
    with open(log, "wb") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    return Proc(p, log)


def stop(proc: Proc, timeout: float = 20) -> None:
    """SIGTERM the leader (`ray start --block` and `mlflow server` shut their children down),
    then SIGKILL its process group if anything is left."""
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(5)


def kill_marked(marker: str) -> None:
    for _ in range(3):
        pids = marker_pids(marker)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


def clean_env(marker: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "MLFLOW_", "SWEEPS_TEST_"))}
    env[MARKER_VAR] = marker
    env.update(extra)
    return env


def http_get(url: str, headers: dict | None = None, timeout: float = 5) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def wait_for(check, timeout: float, what: str, proc: Proc | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.popen.returncode}\n{proc.tail()}")
        with contextlib.suppress(OSError):
            result = check()
            if result:
                return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{proc.tail() if proc else ''}")


def healthcheck_argv(svc: dict, port_in_file: str, port: int) -> list[str]:
    """A compose health check in CMD form, pointed at our port (only the port changes)."""
    test = svc["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", "health checks are kept in CMD form"
    argv = [a.replace(port_in_file, str(port)) for a in test[1:]]
    if argv[0] == "python":
        argv[0] = sys.executable
    return argv


# ============================================================================= MLflow server


@dataclass
class MlflowServer:
    url: str
    artifacts: Path
    proc: Proc


def mlflow_server_argv(backend: str, artifacts: Path, port: int) -> list[str]:
    """compose.yaml's mlflow command with the backend, artifact store, host and port swapped,
    and one web worker instead of four (this machine has two cores)."""
    argv = list(service("mlflow")["command"])
    assert argv[:2] == ["mlflow", "server"], argv
    assert "--serve-artifacts" in argv
    argv = replace_opt(argv, "--backend-store-uri", backend)
    argv = replace_opt(argv, "--artifacts-destination", str(artifacts))
    argv = replace_opt(argv, "--host", "127.0.0.1")
    argv = replace_opt(argv, "--port", str(port))
    argv = set_opt(argv, "--workers", "1")
    return [sys.executable, "-m", "mlflow", *argv[1:]]


def compose_environment(name: str, **given: str) -> dict[str, str]:
    """A service's environment as compose gives it; values compose interpolates from
    docker/.env (${...}) are taken from `given` or left out."""
    env = {k: v for k, v in env_of(service(name)).items() if "${" not in v}
    env.update(given)
    return env


@contextlib.contextmanager
def running_mlflow(backend: str, workdir: Path, env_extra: dict | None = None):
    port, marker = free_port(), uuid.uuid4().hex
    artifacts = workdir / "mlartifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    env = clean_env(marker, **compose_environment("mlflow", **(env_extra or {})))
    proc = start(mlflow_server_argv(backend, artifacts, port), workdir / "mlflow.log", env, cwd=workdir)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_get(f"{url}/health")[0] == 200, 120, "mlflow server /health", proc)
        yield MlflowServer(url, artifacts, proc)
    finally:
        stop(proc)
        kill_marked(marker)


def log_and_read_back(server: MlflowServer, tmp_path: Path) -> str:
    """Log a run with a param, a metric and an artifact through the server; read all back."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    client = MlflowClient(tracking_uri=server.url)
    exp = client.create_experiment(f"docker-artifacts-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(exp).info.run_id
    client.log_param(run_id, "prune.density", "0.01")
    client.log_metric(run_id, "test_acc", 0.5)
    note = tmp_path / "note.txt"
    note.write_text("served through the tracking server\n")
    client.log_artifact(run_id, str(note))
    client.set_terminated(run_id)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"prune.density": "0.01"} and run.data.metrics == {"test_acc": 0.5}
    # Proxied artifacts: the client never touches the store's path, only the server does.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    got = download_artifacts(run_id=run_id, artifact_path="note.txt", dst_path=str(tmp_path / "dl"),
                             tracking_uri=server.url)
    assert Path(got).read_text() == note.read_text()
    assert [p.read_text() for p in server.artifacts.rglob("note.txt")] == [note.read_text()]
    return run_id


def postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


# ============================================================================= PostgreSQL (CI's)

POSTGRES_URI_VAR = "SWEEPS_TEST_POSTGRES_URI"  # postgresql+psycopg://user@host:port/db, no password
POSTGRES_PASSWORD_FILE_VAR = "SWEEPS_TEST_POSTGRES_PASSWORD_FILE"  # a file holding the password


@dataclass
class Postgres:
    """A running PostgreSQL server that the tests may create databases in (.ci/run starts one)."""
    host: str
    port: int
    user: str
    database: str
    password: str = field(repr=False)

    def backend(self, database: str | None = None) -> str:
        """compose's backend URI form: the driver named, no password (the server gets PGPASSWORD)."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database or self.database}"

    def connect(self, database: str | None = None):
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                               dbname=database or self.database, autocommit=True, connect_timeout=30)


def postgres_from_env() -> Postgres | None:
    """The server named by $SWEEPS_TEST_POSTGRES_URI (None without it). With it, psycopg must be
    installed (the test extra): CI fails rather than skip."""
    uri = os.environ.get(POSTGRES_URI_VAR)
    if not uri:
        return None
    import psycopg  # noqa: F401

    parts = urllib.parse.urlsplit(uri)
    pwfile = os.environ.get(POSTGRES_PASSWORD_FILE_VAR)
    password = Path(pwfile).read_text().strip() if pwfile else ""
    return Postgres(parts.hostname, parts.port or 5432, parts.username or "postgres", parts.path.lstrip("/"), password)


@contextlib.contextmanager
def postgres_database(pg: Postgres, prefix: str):
    """A new, empty database on ``pg`` (dropped afterwards); yields its backend URI."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with pg.connect() as con:
        con.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg.backend(name)
    finally:
        with pg.connect() as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def running_mlflow_on_postgres(pg: Postgres, workdir: Path, prefix: str):
    """compose's `mlflow server` on a new database of ``pg``, the password given as PGPASSWORD only
    (as compose does): nothing else started here sees it."""
    with postgres_database(pg, prefix) as backend, running_mlflow(backend, workdir, {"PGPASSWORD": pg.password}) as s:
        yield s


# ============================================================================= Ray head + worker


@dataclass
class RayCluster:
    dashboard: str
    token: str
    base: Path
    marker: str
    head: Proc
    worker: Proc

    def client_env(self, **extra: str) -> dict:
        """What a user's shell has after the README's exports (no token file in its HOME)."""
        home = self.base / "client-home"
        home.mkdir(exist_ok=True)
        return clean_env(self.marker, HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, **extra)

    def alive_nodes(self) -> list[dict]:
        status, body = http_get(f"{self.dashboard}/api/v0/nodes?limit=100&detail=true",
                                {"Authorization": f"Bearer {self.token}"})
        assert status == 200, (status, body)
        nodes = json.loads(body)["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]


# CPUs of the stand-in for the GPU worker: this machine's (2 here), no GPU.
WORKER_CPUS = max(1, min(2, os.cpu_count() or 1))


def ray_start_argv(name: str, gcs_port: int, temp_dir: Path) -> list[str]:
    """compose.yaml's `ray start` of a Ray service, moved to loopback. The head keeps its own
    resources (no CPU, no GPU: it runs the driver, never a trial); the worker gets this
    machine's CPUs instead of its GPU. --block stays: the process is the node, and stopping it
    stops the node's processes."""
    argv = [compose_unescape(a) for a in service(name)["command"]]
    assert argv[:2] == ["ray", "start"] and "--block" in argv, argv
    if name == "ray-head":
        assert "--head" in argv
        argv = replace_opt(argv, "--port", str(gcs_port))
        argv = replace_opt(argv, "--dashboard-host", "127.0.0.1")
        argv = replace_opt(argv, "--dashboard-port", str(free_port()))
        argv = set_opt(argv, "--ray-client-server-port", str(free_port()))
    else:
        argv = replace_opt(argv, "--address", f"127.0.0.1:{gcs_port}")
        argv = set_opt(argv, "--num-cpus", str(WORKER_CPUS))
        argv = set_opt(argv, "--num-gpus", "0")
    # Two nodes on one host: nothing on a fixed default port, and a temp dir of its own per node
    # (as each container has its own /tmp): with one shared temp dir the worker's runtime-env
    # agent deletes the job's working_dir, which is the driver's cwd on the head. Short paths:
    # Ray's unix sockets live there.
    argv = set_opt(argv, "--dashboard-agent-listen-port", str(free_port()))
    argv = set_opt(argv, "--min-worker-port", "0")
    argv = set_opt(argv, "--max-worker-port", "0")
    argv = set_opt(argv, "--temp-dir", str(temp_dir))
    if "--disable-usage-stats" not in argv:
        argv.append("--disable-usage-stats")
    return [RAY_CLI, *argv[1:]]


def service_entrypoint(name: str) -> list[str]:
    return [compose_unescape(a) for a in service(name).get("entrypoint", [])]


@contextlib.contextmanager
def running_ray_cluster(mlflow_url: str):
    base = Path(tempfile.mkdtemp(prefix="rdt", dir="/tmp"))  # short: Ray's unix sockets live under it
    marker, gcs_port = uuid.uuid4().hex, free_port()
    # One HOME for both nodes stands for the shared ray-auth volume; a fresh one, like a new
    # container, and never the user's own ~/.ray.
    home = base / "home"
    home.mkdir()
    # MLFLOW_TRACKING_URI: compose's http://mlflow:5000 becomes the loopback server.
    head_env = clean_env(marker, **compose_environment("ray-head", HOME=str(home), MLFLOW_TRACKING_URI=mlflow_url))
    worker_env = clean_env(marker, **compose_environment("ray-worker", HOME=str(home), MLFLOW_TRACKING_URI=mlflow_url))
    head = worker = None
    try:
        head_argv = ray_start_argv("ray-head", gcs_port, base / "h")
        # The head runs under its compose entrypoint (which makes the token), from the repository,
        # as it does from the image's WORKDIR.
        head = start(service_entrypoint("ray-head") + head_argv, base / "head.log", head_env, cwd=ROOT)
        dashboard = f"http://127.0.0.1:{get_opt(head_argv, '--dashboard-port')}"
        # The worker can join once the GCS listens; the dashboard comes up meanwhile.
        wait_for(lambda: socket.create_connection(("127.0.0.1", gcs_port), timeout=1).close() or True, 90,
                 "the head's GCS port", head)
        worker = start(ray_start_argv("ray-worker", gcs_port, base / "w"), base / "worker.log", worker_env, cwd=base)
        wait_for(lambda: http_get(f"{dashboard}/api/gcs_healthz")[0] == 200, 90, "ray head dashboard", head)
        token = (home / ".ray" / "auth_token").read_text().strip()
        cluster = RayCluster(dashboard, token, base, marker, head, worker)
        wait_for(lambda: len(cluster.alive_nodes()) == 2, 90, "two alive Ray nodes", worker)
        yield cluster
    finally:
        for proc in (worker, head):
            if proc is not None:
                stop(proc)
        kill_marked(marker)
        shutil.rmtree(base, ignore_errors=True)


def require_sweep_script() -> None:
    assert (ROOT / SWEEP_SCRIPT).is_file(), f"{SWEEP_SCRIPT} is not in the repository yet"


def finished_runs(server: MlflowServer, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server.url)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} on the server"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert runs, f"experiment {experiment!r} has no runs"
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    return runs
