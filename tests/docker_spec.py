"""The deployment files in docker/ read into Python: compose.yaml, rayjob.yaml, the Dockerfile and
pyproject.toml, plus the argv edits that move a compose command onto loopback.

Shared by the static checks (test_docker_files.py) and the live stack (test_docker_cluster.py).
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SWEEP_SCRIPT = "sweeps/ablation_grid.py"
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


# Driver named in a SQLAlchemy URI -> the pip requirement that provides it.
PG_DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary"}


def backend_driver() -> str:
    """The PostgreSQL driver of compose's MLflow backend URI. It must be explicit: a bare
    postgresql:// means psycopg2 to SQLAlchemy < 2.1 and psycopg (3) from 2.1 on."""
    backend = get_opt(service("mlflow")["command"], "--backend-store-uri")
    m = re.match(r"postgresql\+(\w+)://", backend)
    assert m, f"name the driver in the backend URI (postgresql+psycopg://...), not {backend}"
    return m.group(1)
