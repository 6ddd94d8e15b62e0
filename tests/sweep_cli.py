"""Helpers (not fixtures) for the sweep tests: run a sweep CLI in-process, read its runs back.

The shared smoke sweep that uses them is the session fixture ``smoke_sweep`` in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import io

import runstore


def run_cli(main, argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def runs(uri: str, experiment: str, status: str | None = None) -> list:
    """The trial runs (not the report's run, cell 'analysis', nor a sweep's parent run) of an experiment."""
    clauses = ["tags.cell != 'analysis'"] + ([f"attributes.status = '{status}'"] if status else [])
    return [r for r in runstore.search(uri, experiment, " and ".join(clauses))
            if r.data.tags.get(runstore.ROLE_TAG) != runstore.SWEEP_ROLE]


def grid_args(store, experiment, *extra):
    return ["--preset", "smoke", "--mlflow-uri", store["uri"], "--storage-path", store["storage"],
            "--experiment", experiment, *extra]


# A sweep script's main run in a fresh process: its exit code, whether it imported Ray, and its seconds.
TIMED_MAIN = """
import sys, time
from sweeps import {module} as m
t = time.time()
try:
    code = m.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(f"RESULT ray_imported={{'ray' in sys.modules}} seconds={{time.time() - t:.2f}} code={{code}}", file=sys.stderr)
"""
