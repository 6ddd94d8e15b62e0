"""Deployment files in docker/: checked against each other and against pyproject.toml, and the
stack's own commands run here on loopback.

There is no Docker engine on our machines, so the containers themselves cannot run. What can run
does: the exact `mlflow server` command of compose.yaml (against SQLite, and against a throwaway
PostgreSQL when one is installed), and the exact `ray start` commands of the head and the worker
(token auth on, two nodes on 127.0.0.1), with only addresses, ports, paths and resources changed.
The slow tests run the smoke sweep against that server and through `ray job submit` on that
cluster.

Every process a test starts runs in its own session with a marker in its environment; teardown
stops it and then kills, by pid, whatever still carries the marker. `ray stop` is never used: it
would kill every Ray process on the machine, other people's included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SWEEP_SCRIPT = "sweeps/ablation_grid.py"
MARKER_VAR = "SPARSITY_DOCKER_TEST_ID"
RAY_NODES = ("ray-head", "ray-worker")
# The `ray` CLI of this interpreter (head, workers and client must run the same Ray).
RAY_CLI = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray") or "ray"


# ----------------------------------------------------------------------------- file readers


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned_ray_version() -> str:
    for dep in pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"ray(\[[^\]]*\])?\s*==\s*([0-9][0-9A-Za-z.]*)", dep.split(";")[0].strip())
        if m:
            return m.group(2)
    raise AssertionError("pyproject.toml has no exact `ray[...]==X` pin")


def project_image() -> str:
    project = pyproject()["project"]
    return f"{project['name']}:{project['version']}"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def service(name: str) -> dict:
    return compose()["services"][name]


def rayjob_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all((DOCKER / "rayjob.yaml").read_text()) if d]


def rayjob() -> dict:
    jobs = [d for d in rayjob_docs() if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, "docker/rayjob.yaml must hold exactly one RayJob"
    return jobs[0]


def rayjob_pod_specs() -> list[dict]:
    spec = rayjob()["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def ports_of(svc: dict) -> list[tuple[str, str]]:
    """(host ip, host port) of every published port, short or long syntax."""
    out = []
    for p in svc.get("ports", []):
        if isinstance(p, dict):
            out.append((str(p.get("host_ip", "")), str(p.get("published", ""))))
        else:
            parts = str(p).split(":")
            out.append((parts[0], parts[1]) if len(parts) == 3 else ("", parts[0]))
    return out


def with_defaults(text: str) -> str:
    """Compose's ${VAR:-default} interpolation with nothing set: the defaults."""
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", text)


def mounts_of(svc: dict) -> dict[str, tuple[str, bool]]:
    """container path -> (source, read_only) for the short volume syntax."""
    out = {}
    for v in svc.get("volumes", []):
        source, target, *opts = with_defaults(str(v)).split(":")
        out[target] = (source, "ro" in opts)
    return out


def env_of(svc: dict) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def depends_condition(svc: dict, on: str) -> str | None:
    deps = svc.get("depends_on", {})
    return deps.get(on, {}).get("condition") if isinstance(deps, dict) else None


# ----------------------------------------------------------------------------- CLI argv edits


def get_opt(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
    return None


def set_opt(argv: list[str], flag: str, value: str) -> list[str]:
    """Replace `--flag=v` / `--flag v` with `--flag=value`; append it when absent."""
    out, i, found = [], 0, False
    while i < len(argv):
        a = argv[i]
        if a == flag or a.startswith(flag + "="):
            if not found:
                out.append(f"{flag}={value}")
            found = True
            i += 2 if a == flag else 1
            continue
        out.append(a)
        i += 1
    return out if found else out + [f"{flag}={value}"]


def replace_opt(argv: list[str], flag: str, value: str) -> list[str]:
    """Like set_opt, but the option must already be in the command (the test fails otherwise)."""
    assert get_opt(argv, flag) is not None, f"{flag} missing from {shlex.join(argv)}"
    return set_opt(argv, flag, value)


def compose_unescape(s: str) -> str:
    # Compose turns $$ into a literal $; other ${VAR} would be interpolated, which we don't do here.
    assert "${" not in s.replace("$${", ""), f"interpolated variable in a command the tests run: {s}"
    return s.replace("$$", "$")


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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "MLFLOW_"))}
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


# ============================================================================= static checks


def test_compose_has_the_four_services_and_binds_ports_to_loopback():
    services = compose()["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker"} <= set(services)
    published = {name: ports_of(svc) for name, svc in services.items()}
    for name, ports in published.items():
        for host_ip, host_port in ports:
            assert host_ip == "127.0.0.1", f"{name} publishes port {host_port} on {host_ip or 'all interfaces'}"
    assert ("127.0.0.1", "5000") in published["mlflow"]
    assert ("127.0.0.1", "8265") in published["ray-head"]
    assert not published["postgres"] and not published["ray-worker"]


def test_compose_health_checks_and_start_order():
    services = compose()["services"]
    for name in ("postgres", "mlflow", "ray-head"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert depends_condition(services["mlflow"], "postgres") == "service_healthy"
    assert depends_condition(services["ray-head"], "mlflow") == "service_healthy"
    assert depends_condition(services["ray-worker"], "ray-head") == "service_healthy"


def test_compose_worker_reserves_an_nvidia_gpu():
    devices = service("ray-worker")["deploy"]["resources"]["reservations"]["devices"]
    gpu = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
    assert gpu, "ray-worker reserves no nvidia GPU"
    assert gpu[0].get("count") == "all" or int(gpu[0].get("count", 0)) >= 1
    assert "deploy" not in service("ray-head"), "the head runs no trials and needs no GPU"


def test_compose_ray_nodes_share_storage_auth_and_mlflow():
    head, worker, mlflow = service("ray-head"), service("ray-worker"), service("mlflow")
    top_volumes = compose().get("volumes", {})
    head_mounts, worker_mounts = mounts_of(head), mounts_of(worker)
    # Tune's storage_path: one named volume at the same path on every node.
    storage = "/shared/ray_results"
    assert head_mounts[storage][0] == worker_mounts[storage][0] in top_volumes
    # The token the head writes in ~/.ray is read by the worker from the same volume.
    assert head_mounts["/home/ray/.ray"] == (worker_mounts["/home/ray/.ray"][0], False)
    assert head_mounts["/home/ray/.ray"][0] in top_volumes
    for svc in (head, worker):
        env = env_of(svc)
        assert env.get("RAY_AUTH_MODE") == "token"
        assert env.get("MLFLOW_TRACKING_URI") == f"http://mlflow:{get_opt(mlflow['command'], '--port')}"
    # The worker joins the head's GCS by service name and port.
    head_port = get_opt(head["command"], "--port")
    assert get_opt(worker["command"], "--address") == f"ray-head:{head_port}"
    assert get_opt(head["command"], "--dashboard-port") == "8265"
    assert get_opt(head["command"], "--dashboard-host") == "0.0.0.0"  # reachable through the published port


# Driver named in a SQLAlchemy URI -> the pip requirement that provides it.
PG_DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary"}


def backend_driver() -> str:
    """The PostgreSQL driver of compose's MLflow backend URI. It must be explicit: a bare
    postgresql:// means psycopg2 to SQLAlchemy < 2.1 and psycopg (3) from 2.1 on."""
    backend = get_opt(service("mlflow")["command"], "--backend-store-uri")
    m = re.match(r"postgresql\+(\w+)://", backend)
    assert m, f"name the driver in the backend URI (postgresql+psycopg://...), not {backend}"
    return m.group(1)


def test_image_installs_the_driver_of_the_mlflow_backend_uri():
    driver = backend_driver()
    assert driver in PG_DRIVER_PACKAGES, driver
    runs = " ".join(args for kw, args in dockerfile() if kw == "RUN")
    assert f'"{PG_DRIVER_PACKAGES[driver]}==' in runs, f"the image does not install {PG_DRIVER_PACKAGES[driver]}"


def test_compose_keeps_the_password_in_the_env_file():
    pg, mlflow = service("postgres"), service("mlflow")
    assert env_of(pg)["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD")
    assert env_of(mlflow)["PGPASSWORD"].startswith("${POSTGRES_PASSWORD")
    backend = get_opt(mlflow["command"], "--backend-store-uri")
    assert re.fullmatch(r"postgresql\+\w+://[^:@/]+@postgres:5432/\w+", backend), f"password or host in {backend}"
    text = (DOCKER / "compose.yaml").read_text()
    assert "change-me" not in text
    example = (DOCKER / ".env.example").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=\S+", example, re.M)


def test_env_file_is_git_ignored_and_the_example_is_not():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and the repository's .git")
    for path in ("docker/.env", ".env"):
        r = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert r.returncode == 0, f"{path} is not git-ignored"
    r = subprocess.run(["git", "check-ignore", "-q", "docker/.env.example"], cwd=ROOT)
    assert r.returncode == 1, "docker/.env.example must be committed, but it is git-ignored"


def test_ray_version_matches_the_pin_everywhere():
    pin = pinned_ray_version()
    froms = [args for kw, args in dockerfile() if kw == "FROM"]
    assert froms == [f"rayproject/ray:{pin}-py311-gpu"]
    # The image's Python satisfies requires-python.
    minimum = re.search(r">=\s*3\.(\d+)", pyproject()["project"]["requires-python"]).group(1)
    assert int(re.search(r"-py3(\d+)-", froms[0]).group(1)) >= int(minimum)
    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == pin
    import ray

    assert ray.__version__ == pin, "the Ray installed here (the submitting client) differs from the pin"


def test_every_deployment_uses_the_project_image():
    image = project_image()
    for name in ("mlflow", "ray-head", "ray-worker"):
        assert service(name)["image"] == image, name
    images = [c["image"] for spec in rayjob_pod_specs() for c in spec["containers"]]
    assert images and set(images) == {image}
    assert f"docker build -f docker/Dockerfile -t {image} ." in (DOCKER / "README.md").read_text()


def test_dockerfile_user_workdir_layers_and_no_secrets():
    instructions = dockerfile()
    users = [args for kw, args in instructions if kw == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the image must end as a non-root user"
    assert users[-1] == "ray"
    workdirs = [args for kw, args in instructions if kw == "WORKDIR"]
    assert workdirs
    for spec in rayjob_pod_specs():
        for c in spec["containers"]:
            assert c.get("workingDir", workdirs[-1]) == workdirs[-1]
    # Dependencies are installed from pyproject.toml before any source is copied.
    copies = [(i, args) for i, (kw, args) in enumerate(instructions) if kw == "COPY"]
    first_source = min(i for i, args in copies if "pyproject.toml" not in args)
    dep_install = [i for i, (kw, args) in enumerate(instructions) if kw == "RUN" and "pip install" in args]
    assert dep_install and dep_install[0] < first_source, "deps must be installed before the code is copied"
    assert any("pip install" in args and "--no-deps ." in args for kw, args in instructions if kw == "RUN")
    # Every COPY source exists (a missing one fails the build).
    for _, args in copies:
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    for kw, args in instructions:
        if kw in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"PASSWORD|SECRET|TOKEN|API_KEY", args, re.I), f"secret-like {kw}: {args}"


def test_dockerignore_keeps_data_results_and_secrets_out():
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for needed in (".git", ".env", "data", "results", "mlflow.db", "mlruns", "mlartifacts", "ray_results",
                   "**/__pycache__"):
        assert needed in entries, f".dockerignore lacks {needed}"


def test_image_install_step_builds_from_exactly_the_copied_files(tmp_path):
    """`pip install --no-deps .` on only what the Dockerfile copies (pyproject's readme included)."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src = tmp_path / "src"
    src.mkdir()
    for kw, args in dockerfile():
        if kw != "COPY":
            continue
        for item in [a for a in args.split() if not a.startswith("--")][:-1]:
            path = ROOT / item
            if path.is_dir():
                shutil.copytree(path, src / item, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, src / item)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in pyproject()["tool"]["setuptools"]["packages"]:
        assert any(n.startswith(f"{package}/") and n.endswith(".py") for n in names), f"{package} not in the wheel"


def test_rayjob_spec():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster.get("authOptions", {}).get("mode") == "token"
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", SWEEP_SCRIPT]
    assert get_opt(argv, "--mlflow-uri") == "http://mlflow:5000"
    # --storage-path and --data-dir are on a ReadWriteMany claim mounted in every pod (the
    # driver on the head checks both, the trials on the workers use both).
    claims = {d["metadata"]["name"]: d for d in rayjob_docs() if d.get("kind") == "PersistentVolumeClaim"}
    for path in (get_opt(argv, "--storage-path"), get_opt(argv, "--data-dir")):
        for pod in rayjob_pod_specs():
            (container,) = pod["containers"]
            mount = [m for m in container["volumeMounts"] if m["mountPath"] == path]
            assert mount, f"{container['name']} does not mount {path}"
            volume = next(v for v in pod["volumes"] if v["name"] == mount[0]["name"])
            claim = volume["persistentVolumeClaim"]["claimName"]
            assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"]
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"


def test_rayjob_entrypoint_script_is_in_the_repository():
    # It runs in the image's WORKDIR, which holds the repository.
    script = shlex.split(rayjob()["spec"]["entrypoint"])[1]
    assert (ROOT / script).is_file(), f"the RayJob entrypoint runs {script}, which is not in the repository"


def readme_commands() -> list[list[str]]:
    """The shell commands in docker/README.md's bash blocks, continuations joined, shell-split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (DOCKER / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def one_command(prefix: list[str]) -> list[str]:
    found = [c for c in readme_commands() if c[:len(prefix)] == prefix]
    assert len(found) == 1, f"docker/README.md should have one `{' '.join(prefix)} ...` command, has {len(found)}"
    return found[0]


def published_to(svc: dict, container_port: str) -> str:
    """The loopback URL at which a service's container port is published."""
    for p in svc.get("ports", []):
        host_ip, host_port, target = str(p).split(":")
        if target == container_port:
            return f"http://{host_ip}:{host_port}"
    raise AssertionError(f"container port {container_port} is not published")


def sweep_dry_run(argv: list[str], tmp_path: Path) -> str:
    """Run a documented sweep command with --dry-run: the real CLI must accept every option.
    --data-dir points at a stand-in that has the file the pre-flight check looks for."""
    assert argv[:2] == ["python", SWEEP_SCRIPT], argv
    data = tmp_path / "data"
    (data / "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)
    (data / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
    (data / "cifar-10-batches-py" / "data_batch_1").touch()
    (data / "MNIST" / "raw" / "train-images-idx3-ubyte").touch()
    args = set_opt(argv[2:], "--data-dir", str(data)) if get_opt(argv, "--data-dir") else argv[2:]
    r = subprocess.run([sys.executable, SWEEP_SCRIPT, *args, "--dry-run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=clean_env("dry-run"))
    assert r.returncode == 0, f"{shlex.join(argv)} --dry-run failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}"
    return r.stdout


def test_readme_commands_match_the_files(tmp_path):
    readme = (DOCKER / "README.md").read_text()
    assert "## Running on a cluster" in readme
    image = project_image()
    assert ["docker", "build", "-f", "docker/Dockerfile", "-t", image, "."] in readme_commands()
    assert ["cp", "docker/.env.example", "docker/.env"] in readme_commands()
    for argv in readme_commands():  # every compose call, the one inside $(...) included
        if "compose" in argv:
            i = argv.index("compose")
            assert argv[i + 1:i + 5] == ["-f", "docker/compose.yaml", "--env-file", "docker/.env"], argv
    one_command(["docker", "compose", "-f", "docker/compose.yaml", "--env-file", "docker/.env", "up", "-d"])
    # The token: read from the file the head's entrypoint writes, in the volume both nodes mount.
    m = re.search(r"exec -T (\S+) cat (\S+)\)", readme)
    assert m and m.group(1) == "ray-head", "the README should read the token from ray-head"
    assert "ray get-auth-token --generate" in " ".join(service("ray-head")["entrypoint"])
    assert str(Path(m.group(2)).parent) in mounts_of(service("ray-head")) and Path(m.group(2)).name == "auth_token"
    assert ["export", "RAY_AUTH_MODE=token"] in readme_commands()
    # Submission: the published job API, the in-stack paths and addresses, the real sweep CLI.
    submit = one_command(["ray", "job", "submit"])
    assert get_opt(submit, "--address") == published_to(service("ray-head"), get_opt(service("ray-head")["command"],
                                                                                       "--dashboard-port"))
    assert get_opt(submit, "--working-dir") == "."
    entry = submit[submit.index("--") + 1:]
    for name in RAY_NODES:  # the driver (head) checks data and storage, the trials (worker) use them
        assert get_opt(entry, "--data-dir") in mounts_of(service(name))
        assert get_opt(entry, "--storage-path") in mounts_of(service(name))
        assert get_opt(entry, "--mlflow-uri") == env_of(service(name))["MLFLOW_TRACKING_URI"]
    sweep_dry_run(entry, tmp_path)
    # The analysis reads the experiment the sweep wrote, through the published MLflow port.
    report = one_command(["python", "-m", "analysis", "report"])
    assert get_opt(report, "--experiment") == get_opt(entry, "--experiment")
    assert get_opt(report, "--mlflow-uri") == published_to(service("mlflow"), get_opt(service("mlflow")["command"],
                                                                                        "--port"))
    assert f"MLflow UI at {get_opt(report, '--mlflow-uri')}" in readme
    from analysis.cli import parser as analysis_parser

    analysis_parser().parse_args(report[3:])  # exits (fails the test) on an option it lacks
    # Kubernetes.
    assert ["kubectl", "apply", "-f", "docker/rayjob.yaml"] in readme_commands()
    assert one_command(["kubectl", "get", "rayjob"])[3] == rayjob()["metadata"]["name"]
    assert rayjob()["spec"]["entrypoint"] in readme


def test_rayjob_entrypoint_is_accepted_by_the_sweep_cli(tmp_path):
    out = sweep_dry_run(shlex.split(rayjob()["spec"]["entrypoint"]), tmp_path)
    assert "dry run" in out


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


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mlflow")
    with running_mlflow(f"sqlite:///{workdir / 'mlflow.db'}", workdir) as server:
        yield server


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


def postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@pytest.mark.slow
def test_compose_mlflow_server_command_on_postgres(tmp_path):
    """The same command against a real PostgreSQL, the password given only as PGPASSWORD."""
    tools = {name: postgres_bin(name) for name in ("initdb", "pg_ctl", "createdb", "psql", "pg_isready")}
    missing = [n for n, path in tools.items() if path is None]
    if missing:
        pytest.skip(f"PostgreSQL binaries not installed ({', '.join(missing)}); e.g. apt-get install postgresql")
    driver = backend_driver()
    pytest.importorskip(driver, reason=f"{driver} not installed (the image installs {PG_DRIVER_PACKAGES.get(driver)})")
    as_postgres: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="pgdt", dir="/tmp"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_postgres = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
    password, port, marker = "pw-" + uuid.uuid4().hex, free_port(), uuid.uuid4().hex
    pwfile, data = base / "pw", base / "data"
    pwfile.write_text(password + "\n")
    if as_postgres:
        shutil.chown(pwfile, "postgres")
    env = clean_env(marker, PGPASSWORD=password)
    run = lambda argv, **kw: subprocess.run(as_postgres + argv, env=env, capture_output=True, text=True,  # noqa: E731
                                            timeout=120, **kw)
    pg = service("postgres")
    user, db = env_of(pg)["POSTGRES_USER"], env_of(pg)["POSTGRES_DB"]
    try:
        r = run([tools["initdb"], "-D", str(data), "-U", user, "--auth=scram-sha-256", f"--pwfile={pwfile}"])
        assert r.returncode == 0, r.stdout + r.stderr
        r = run([tools["pg_ctl"], "-D", str(data), "-l", str(base / "pg.log"), "-w", "start", "-o",
                 f"-p {port} -k {base} -c listen_addresses=127.0.0.1"])
        assert r.returncode == 0, r.stdout + r.stderr
        r = run([tools["createdb"], "-h", "127.0.0.1", "-p", str(port), "-U", user, db])
        assert r.returncode == 0, r.stderr
        # compose's health check (pg_isready), pointed at this port.
        hc = healthcheck_argv(pg, "5432", port)
        hc = [tools["pg_isready"] if a == "pg_isready" else a for a in hc] + [f"--port={port}"]
        assert subprocess.run(hc, capture_output=True, timeout=30).returncode == 0
        # compose's backend URI with only the host:port changed; no password in it.
        backend = get_opt(service("mlflow")["command"], "--backend-store-uri").replace("@postgres:5432/",
                                                                                     f"@127.0.0.1:{port}/")
        with running_mlflow(backend, tmp_path, {"PGPASSWORD": password}) as server:
            run_id = log_and_read_back(server, tmp_path)
        r = run([tools["psql"], "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", db, "-tAc",
                 f"select status from runs where run_uuid = '{run_id}'"])
        assert r.stdout.strip() == "FINISHED", r.stdout + r.stderr
    finally:
        if (data / "postmaster.pid").exists():
            run([tools["pg_ctl"], "-D", str(data), "-m", "immediate", "stop"])
        kill_marked(marker)
        shutil.rmtree(base, ignore_errors=True)


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


@pytest.fixture(scope="module")
def ray_cluster(mlflow_server):
    with running_ray_cluster(mlflow_server.url) as cluster:
        yield cluster


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


def test_top_level_readme_cluster_commands_are_the_ones_docker_readme_documents():
    """The README's 'Running on a cluster' block must not drift from docker/README.md."""
    section = (ROOT / "README.md").read_text().split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert blocks, "no bash block in the README's cluster section"
    documented = readme_commands()
    for line in blocks[0].replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            assert argv in documented, f"README command not in docker/README.md: {' '.join(argv)}"
