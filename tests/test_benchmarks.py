"""Smoke tests of the benchmark scripts: each runs with ``--tiny`` and prints its table.

The figures of a tiny run mean nothing; speed is measured by running the scripts themselves
(benchmarks/README.md), never asserted here. ``--threads 1`` keeps the runs short on a shared
machine (with more torch threads than free cores, every parallel op can stall).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# script -> the column headers its table must print
SCRIPTS = {
    "step_overhead.py": ["plain ms", "sparse ms", "ratio [IQR]", "trainer ms"],
    "data_path.py": ["train_batches", "DataLoader", "speedup [IQR]"],
    "gpu_throughput.py": ["images/s", "epoch s", "ratio [IQR]", "sparse 0.01"],
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_tiny_run_prints_its_table(script):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--tiny", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"torch {__import__('torch').__version__}" in proc.stdout
    assert "# device " in proc.stdout
    for header in SCRIPTS[script]:
        assert header in proc.stdout, f"{header!r} missing from:\n{proc.stdout}"
    # every table row has a number in it
    table = proc.stdout.split("\n--")[-1]
    assert any(ch.isdigit() for ch in table)
