"""Deployment files in docker/, checked against each other, against pyproject.toml and against
the real CLIs they call (no Docker engine needed: the containers themselves cannot run here).

The stack's commands run live on loopback in test_docker_cluster.py.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from cluster_harness import clean_env
from docker_spec import (DOCKER, PG_DRIVER_PACKAGES, RAY_NODES, ROOT, SWEEP_SCRIPT, backend_driver, compose,
                         depends_condition, dockerfile, env_of, get_opt, mounts_of, pinned_ray_version, ports_of,
                         project_image, pyproject, rayjob, rayjob_docs, rayjob_pod_specs, service, set_opt)


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
