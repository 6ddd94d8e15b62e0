"""The README's commands keep saying what they do: each one-run example is a valid config, and each sweep
and search command runs as written (with ``--dry-run``: the trial table, nothing trained) and plans the
number of trials the README gives. The main job itself, the ``ray job submit`` block and the cluster block
have their own tests (test_sweeps, test_docker_files)."""

from __future__ import annotations

import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

from sparse_core.config import from_flat, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def commands(prefix: str) -> list[list[str]]:
    """The README's indented command lines that start with ``prefix``, continuations joined, comments cut."""
    text = re.sub(r"\\\n\s+", " ", (ROOT / "README.md").read_text())
    found = []
    for line in text.splitlines():
        if line.startswith("    ") and line.strip().startswith(prefix):
            found.append(shlex.split(line.strip().split("  #", 1)[0]))
    return found


def test_the_one_run_examples_are_valid_configs():
    runs = commands("python -m sparse_core")
    assert len(runs) >= 3
    for argv in runs:
        pairs = [a for a in argv[3:] if "=" in a and not a.startswith("-")]
        from_flat(parse_overrides(pairs))  # raises naming the key if the README drifts from the config


def _dry_run(argv: list[str], cwd: Path) -> str:
    proc = subprocess.run([sys.executable, *argv[1:], "--dry-run"], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{' '.join(argv)}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout


def test_the_sweep_commands_run_as_written_and_plan_what_the_readme_says(tmp_path):
    sweeps = commands("python sweeps/") + commands("python -m sweeps")
    assert any("ablation_grid.py" in a[1] for a in sweeps) and any("optuna_search.py" in a[1] for a in sweeps)
    readme = (ROOT / "README.md").read_text()
    main_job = re.search(r"The main job trains (\d+) runs", readme)
    study = re.search(r"--preset digits-study\s+#\s*(\d+) cells x (\d+) densities x (\d+) seeds", readme)
    assert main_job and study
    expected = {(): int(main_job.group(1)), ("--preset", "digits-study"): math.prod(map(int, study.groups()))}
    for argv in sweeps:
        argv = [a.replace("$PWD", str(tmp_path)) for a in argv]
        argv[1] = str(ROOT / argv[1]) if argv[1].startswith("sweeps/") else argv[1]
        out = _dry_run([a for a in argv if a != "--dry-run"], tmp_path)
        key = tuple(argv[2:])
        if key in expected:
            assert f"{expected[key]} trials" in out, f"{' '.join(argv)} does not plan {expected[key]} trials:\n{out[-800:]}"
    assert not list(tmp_path.glob("mlflow.db*")) and not (tmp_path / "ray_results").exists()  # nothing started


def test_the_analysis_commands_parse():
    """Each analysis command's subcommand and options exist (parsed by the CLI's own parser, nothing read)."""
    from analysis.cli import parser

    found = commands("python -m analysis")
    assert {a[3] for a in found} >= {"table", "plot", "report"}
    for argv in found:
        args = parser().parse_args(argv[3:])  # exits 2 on an unknown option or a bad value
        assert args.experiment == ["sparsity-sweep"]
