"""Smoke tests of the benchmark scripts: each runs with ``--tiny`` and prints its table.

The sweep scripts (sweep_efficiency.py, digits_study.py) start their own local Ray runtime and
write a real SQLite MLflow store; ``RAY_ADDRESS`` is removed so they never join another cluster.

The figures of a tiny run mean nothing; speed is measured by running the scripts themselves
(benchmarks/README.md), never asserted here. ``--threads 1`` keeps the runs short on a shared
machine (with more torch threads than free cores, every parallel op can stall).
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import subprocess
import sys

import pytest

import runstore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# script -> the column headers its table must print
SCRIPTS = {
    "step_overhead.py": ["plain ms", "sparse ms", "ratio [IQR]", "trainer ms"],
    "data_path.py": ["train_batches", "DataLoader", "speedup [IQR]"],
    "gpu_throughput.py": ["images/s", "epoch s", "ratio [IQR]", "sparse 0.01"],
    "gpu_throughput.py --packed": ["trials/hour", "vs K=1", "ms/step"],
    "packed_trials.py": ["packed CPU s/trial", "CPU ratio [IQR]", "wall ratio [IQR]", "results identical: yes"],
    "packed_trials.py startup --repeats 1": ["trial CPU s", "import CPU s"],
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_tiny_run_prints_its_table(script):
    name, *extra = script.split()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *extra, "--tiny", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"torch {__import__('torch').__version__}" in proc.stdout
    assert "# device " in proc.stdout
    for header in SCRIPTS[script]:
        assert header in proc.stdout, f"{header!r} missing from:\n{proc.stdout}"
    # every table row has a number in it
    table = proc.stdout.split("\n--")[-1]
    assert any(ch.isdigit() for ch in table)


# ---- the sweep benchmarks: a real local Ray runtime and a real SQLite MLflow store -------------------

def _run(argv, timeout):
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow  # ~55 s on 2 idle cores (an 8-trial sweep + the plain loop): the longest default test; CI runs it
def test_sweep_efficiency_tiny_compares_the_sweep_with_the_plain_loop():
    out = _run([os.path.join(ROOT, "benchmarks", "sweep_efficiency.py"), "--tiny"], timeout=900)
    assert f"torch {__import__('torch').__version__}" in out and "# device " in out
    for header in ("wall ratio", "CPU ratio", "same results", "wall/ideal", "start-up", "trial workers (ray::)",
                   "(plain loop, whole process)"):
        assert header in out, f"{header!r} missing from:\n{out}"
    row = next(line for line in out.splitlines() if line.startswith("tiny "))
    fields = row.split()
    assert fields[1] == "8"
    sweep_wall, plain_wall, wall_ratio = map(float, fields[2:5])
    sweep_cpu, plain_cpu, cpu_ratio = map(float, fields[5:8])
    assert sweep_wall > 0 and plain_wall > 0 and wall_ratio == pytest.approx(sweep_wall / plain_wall, rel=0.03)
    assert sweep_cpu > 0 and plain_cpu > 0 and cpu_ratio == pytest.approx(sweep_cpu / plain_cpu, rel=0.03)
    assert fields[-1] == "8/8"  # every run_key: the same test accuracy in the sweep's MLflow store and the plain loop
    assert "the target wall ratio <= 0.6" in out


@pytest.mark.slow  # ~40 s: four fresh processes each importing MLflow, one creating a store
def test_mlflow_store_tiny_measures_creation_and_the_template_copy():
    out = _run([os.path.join(ROOT, "benchmarks", "mlflow_store.py"), "--tiny"], timeout=900)
    rows = {line.split("  ")[0]: line.split()[-2:] for line in out.splitlines()
            if line.startswith(("import mlflow ", "create ", "open existing ", "copy template + open "))}
    assert set(rows) == {"import mlflow", "create", "open existing", "copy template + open"}
    assert all(float(v) > 0 for pair in rows.values() for v in pair)


@pytest.mark.slow  # ~30 s: two 2-sample searches, an 8-trial study and the analysis on one Ray runtime
def test_digits_study_tiny_tunes_sweeps_and_analyses(tmp_path):
    out = _run([os.path.join(ROOT, "benchmarks", "digits_study.py"), "--tiny", "--tune", "--out", str(tmp_path)],
               timeout=900)
    # both searches ran with the same budget and printed their best settings
    assert "| full | 2 (2, 0) |" in out and "| synflow | 2 (2, 0) |" in out
    tuning = json.loads((tmp_path / "tuning.json").read_text())
    assert set(tuning["full"]["best_settings"]) == {"train.lr", "mask.warmup", "mask.lr", "post.smoothing",
                                                     "post.soft_fraction"}
    assert set(tuning["synflow"]["best_settings"]) == {"train.lr"}
    # the ablation table: one row per tiny cell, one column per density, through analysis
    table = (tmp_path / "ablation_table.md").read_text()
    assert table in out
    assert table.splitlines()[0] == "| cell | 10 % | 1 % |"
    rows = {line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:] if line.startswith("| ")}
    assert rows == {"full", "base", "pruner=synflow", "rigl"}
    assert "| density | full | best full-* variant | best baseline |" in out
    for stem in ("accuracy_vs_density", "accuracy_vs_density_contenders", "layer_density"):
        for ext in ("png", "pdf"):
            assert (tmp_path / f"{stem}.{ext}").stat().st_size > 1000
    # the preset's tuned knobs reached the cells they were tuned for, and only those
    from sparse_core.config import Config, from_flat
    from sweeps import presets, tracking

    runs = [r for r in tracking.search(f"sqlite:///{tmp_path}/mlflow.db", "digits-study")
            if r.data.tags.get(runstore.ROLE_TAG) != runstore.SWEEP_ROLE]  # the trials, not the sweep's parent run
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    preset = presets.get("digits-study")
    untuned = {**Config().to_flat(), **preset.base}
    for r in runs:
        cell, params = r.data.tags["cell"], from_flat(r.data.params).to_flat()
        expected = dict(untuned)
        for pattern, extra in preset.cell_overrides.items():
            if fnmatch.fnmatchcase(cell, pattern):
                expected.update(extra)
        for key in {k for extra in preset.cell_overrides.values() for k in extra}:
            assert params[key] == from_flat({key: expected[key]}).to_flat()[key], (cell, key)


def test_roofline_tiny_counts_work_below_the_machines_matmul_rate():
    """The FLOP count is the dense-equivalent work: a count 10x too high would put the trainers above
    the sgemm roofline, one 10x too low far below the K=1 floor it reaches here."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "roofline.py"), "--tiny"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| pack K=")]
    assert [r[1] for r in rows] == ["1", "2"]
    for r in rows:
        of_sgemm, of_bmm = float(r[4]), float(r[5].strip(" |"))
        assert 0.01 < of_sgemm < 1.2 and 0.01 < of_bmm < 1.5, r
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from roofline import executed_flop

    run = {"data_sizes": {"train": 10, "val": 3, "test": 2}, "prunable_weights": 100,
           "history": [{"stage": "pre"}] * 4 + [{"stage": "post"}] * 6}
    per_epoch = 100 * (6 * 10 + 2 * 5)
    assert executed_flop(run) == 10 * per_epoch
    assert executed_flop({**run, "prefix_shared_by": 4}) == 7 * per_epoch  # a shared pre-training counts once


@pytest.mark.slow  # one torch.compile in a fresh inductor cache: ~15-30 s, and it needs a C++ compiler
def test_compiled_step_tiny_times_the_same_step_three_ways():
    """The hand-written step it compares against is the trainer's own arithmetic (the script checks the weights
    after two steps: within 1e-5, 0 on the machines seen; a 1 % other learning rate gives 9e-5 and fails it), and
    each variant gets a positive, finite ratio to the trainer."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compiled_step.py"), "--tiny"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "# same step: yes (largest weight difference after two steps" in proc.stdout, proc.stdout
    row = proc.stdout.strip().splitlines()[-1].split()
    assert row[0] == "2", proc.stdout  # K = 2
    trainer_ms, eager_ms, compiled_ms = (float(v) for v in row[1:4])
    ratios = [float(row[4]), float(row[6])]  # eager / trainer, compiled / trainer (each followed by its IQR)
    assert all(0 < v < 1e3 for v in (trainer_ms, eager_ms, compiled_ms)), row
    assert all(0.05 < r < 20 for r in ratios) and float(row[-1]) > 0, row  # the compile took time


def test_sparse_latency_tiny_reports_finite_ratios_per_density_and_batch():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sparse_latency.py"), "--tiny"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert f"torch {__import__('torch').__version__}" in out and "# device cpu" in out
    assert "1 torch thread(s)" in out
    if not __import__("torch").cuda.is_available():
        assert "no CUDA device in this run: CPU rows only" in out
    header = next(line for line in out.splitlines() if line.startswith("device "))
    assert header.split() == ["device", "density", "batch", "dense", "ms", "sparse", "ms", "sparse/dense", "[IQR]",
                              "size", "ratio"]
    rows = [line.split() for line in out.splitlines() if line.startswith(("cpu ", "cuda "))]
    assert [(r[1], r[2]) for r in rows if r[0] == "cpu"] == [(d, b) for d in ("0.1", "0.01", "0.001")
                                                            for b in ("1", "256")]
    for r in rows:
        dense_ms, sparse_ms, ratio, size = float(r[3]), float(r[4]), float(r[5]), float(r[7])
        assert all(math.isfinite(v) and v > 0 for v in (dense_ms, sparse_ms, ratio, size)), r
        assert size < 1.0  # the compact export is smaller than the dense state dict at every density here


@pytest.mark.slow  # ~70 s: two smoke sweeps (2 cells), packed and not
def test_laptop_e2e_tiny_compares_two_sweeps_and_their_results():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "laptop_e2e.py"), "--tiny"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "before / now: CPU" in out and "trial workers (ray::)" in out, out
    assert "4 trials (cell, density, seed) in both stores (4 now, 4 before), 4 identical in final test and val" in out, out


@pytest.mark.slow  # ~90 s: the 4-run smoke sweep from this tree and from HEAD's archive, then one replay each
def test_mlflow_writes_tiny_replays_the_sweep_through_both_write_policies():
    out = _run([os.path.join(ROOT, "benchmarks", "mlflow_writes.py"), "--tiny", "--baseline", "HEAD"], timeout=900)
    assert "per-run final/val_acc and final/test_acc by run_key, 4 runs: identical in every job" in out
    rows = [line.replace("this tree", "this_tree").split() for line in out.splitlines()
            if line.startswith(("baseline ", "this tree "))]
    replay = [r for r in rows if len(r) == 8]  # variant, write CPU, open CPU, calls, log_batch, rows, us/row x2
    assert [r[0] for r in replay] == ["baseline", "this_tree"]
    assert all(float(r[1]) > 0 and int(r[5]) > 0 for r in replay)
    assert replay[0][3:6] == replay[1][3:6]  # HEAD against itself: the same store calls and rows
    assert "keys left out by this tree: none; rows stored twice: 0" in out
    assert "write CPU per baseline row, baseline / this tree: " in out


def test_study_plain_frame_carries_each_runs_chance_flag_for_the_plots():
    """The plain study's table frame keeps at_chance (a bool in the result) as 0/1, as MLflow stores it, so
    analysis marks the cells at chance in its tables and plots."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import study_plain

    from analysis.table import chance_flags

    flat = {"data.name": "digits", "model.width": 8, "model.depth": 1, "train.pre_epochs": 1, "train.post_epochs": 1,
            "train.batch_size": 256, "train.latency_rounds": 0, "prune.density": 0.1}
    (row,) = study_plain._pack([("base", flat)])
    rows = [{**row, "at_chance": flag, "run_key": f"{row['run_key']}{flag}"} for flag in (True, False)]
    df = study_plain.frame(rows)
    assert df["at_chance"].tolist() == [1.0, 0.0]
    assert chance_flags(df).tolist() == [True, False]
