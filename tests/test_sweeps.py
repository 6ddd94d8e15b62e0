"""Sweeps through the real parts: a real Ray runtime, a real SQLite MLflow store, the real CLIs.

One smoke sweep (the whole leave-one-out design, 36 trials, packed by default into 18 Tune trials
of two) is shared with test_packing.py; the tests that need their own sweep keep it to a trial or two. ``-m slow`` adds the end-to-end
``ray start`` + ``ray job submit`` run and an interrupted-then-resumed sweep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import runstore
from sparse_core.config import FIELD_TYPES, from_flat, run_key, to_flat
from sweep_cli import TIMED_MAIN, grid_args, run_cli, runs
from sweeps import ablation_grid, designs, optuna_search, options, presets, summary

ROOT = Path(__file__).resolve().parent.parent
SMOKE_CELLS = len(designs.cells("leave-one-out"))
SMOKE_TRIALS = SMOKE_CELLS * len(presets.get("smoke").densities)


# ray_runtime (one local Ray runtime), sweep_store and smoke_sweep (the smoke sweep, shared with
# test_packing.py) come from tests/conftest.py.


@pytest.fixture(scope="module")
def store(sweep_store):
    return sweep_store


# ---- designs (no Ray) -------------------------------------------------------------------------
def test_leave_one_out_cells_are_distinct_valid_configs():
    trials, dups = designs.trials("leave-one-out", {}, (0.01,), (0,), 100)
    labels = [t.cell for t in trials]
    assert not dups and len(set(t.run_key for t in trials)) == len(trials)
    for c in designs.COMPONENT_NAMES:
        assert f"full-no_{c}" in labels and f"base+{c}" in labels
    assert {"full", "base", "rigl", "pruner=random", "pruner=snip", "pruner=grasp", "pruner=synflow"} <= set(labels)
    by = {t.cell: from_flat(t.flat) for t in trials}
    full = by["full"]
    assert (full.init.name, full.mask.kind, full.prune.pruner) == ("zero", "sigmoid", "mask")
    assert full.post.label_smoothing and full.post.soft_activation and full.post.soft_skip
    base = by["base"]
    assert (base.init.name, base.mask.kind, base.prune.pruner) == ("kaiming", "none", "magnitude")
    assert not (base.post.label_smoothing or base.post.soft_activation or base.post.soft_skip)
    assert by["full-no_mask"].prune.pruner == "magnitude" and by["full-no_mask"].mask.kind == "none"
    assert by["pruner=synflow"].prune.rounds == 100 and by["rigl"].train.method == "rigl"


def test_factorial_covers_every_combination_and_mask_kind_follows_set():
    trials, _ = designs.trials("factorial", {"mask.kind": "gates"}, (0.1,), (0,), 2)
    assert len(trials) == 2 ** len(designs.COMPONENT_NAMES) == len({t.run_key for t in trials})
    kinds = {from_flat(t.flat).mask.kind for t in trials}
    assert kinds == {"none", "gates"}


def test_set_on_a_design_key_is_refused():
    with pytest.raises(ValueError, match="init.name"):
        designs.trials("leave-one-out", {"init.name": "zero"}, (0.1,), (0,), 2)


def test_resume_finds_the_newest_run_and_says_what_tune_could_not_save(tmp_path):
    """--resume looks at the newest run of the sweep even if Tune cannot restore it (an older run must
    not stand in for it), and says why not: Tune writes its experiment state, then its search state,
    neither atomically; restoring without the search state resumes a trial with an empty config."""
    from sweeps import launch

    assert launch.latest_run(str(tmp_path), "s") is None
    old, new = tmp_path / "s-20261101-101010-7", tmp_path / "s-20261102-090000-12"
    (tmp_path / "s-x-20261103-000000-1").mkdir()  # another sweep's name, not a run of "s"
    for run in (old, new):
        run.mkdir()
    (old / "experiment_state-2026-11-01_10-10-10.json").write_text("{}")
    (old / "basic-variant-state-2026-11-01_10-10-10.json").write_bytes(b"\x80")
    assert launch.latest_run(str(tmp_path), "s") == str(new)
    assert launch.restore_problem(str(old)) is None
    assert launch.restore_problem(str(new)) == "Tune had not saved its state yet"
    (new / "experiment_state-2026-11-02_09-00-00.json").write_text('{"trial_data": [')
    assert launch.restore_problem(str(new)) == "its search state was never written"
    (new / "basic-variant-state-2026-11-02_09-00-00.json").write_bytes(b"\x80")
    assert launch.restore_problem(str(new)).startswith("its newest experiment state does not parse")
    (new / "experiment_state-2026-11-02_09-00-00.json").write_text('{"trial_data": []}')
    assert launch.restore_problem(str(new)) is None
    assert launch.run_exists(str(new)) and not launch.run_exists(str(tmp_path / "s-nope"))


def test_resume_restores_the_newest_run_of_the_same_trial_set(tmp_path):
    """A sweep name run with other --cells (another trial set) never stands in for this set's run."""
    from sweeps import tune_store

    base = {"data.name": "digits", "train.pre_epochs": 1, "train.post_epochs": 1}
    whole, _ = designs.trials("leave-one-out", base, (0.1,), (0,), 2)
    subset, _ = designs.trials("leave-one-out", base, (0.1,), (0,), 2, ["full", "base", "rigl"])
    assert tune_store.trial_set(whole) == tune_store.trial_set(list(reversed(whole)))  # order does not matter
    mine, other = tune_store.trial_set(whole), tune_store.trial_set(subset)
    assert mine != other
    legacy, run_a, run_b = (tmp_path / f"s-2026110{i}-000000-1" for i in (1, 2, 3))
    for run in (legacy, run_a, run_b):
        run.mkdir()
    tune_store.remember(str(tmp_path), run_a.name, mine, len(whole))
    tune_store.remember(str(tmp_path), run_b.name, other, len(subset))  # the newest: a --cells run
    assert json.loads((tmp_path / f"{run_b.name}.trials").read_text()) == {"trial_set": other, "trials": 3}
    assert tune_store.latest_run(str(tmp_path), "s", mine) == str(run_a)
    assert tune_store.latest_run(str(tmp_path), "s", other) == str(run_b)
    assert tune_store.latest_run(str(tmp_path), "s", "0" * 16) == str(legacy)  # a run with no set recorded
    assert tune_store.latest_run(str(tmp_path), "s") == str(run_b)


def test_resume_refills_a_checkpoint_tunes_state_names_but_had_deleted(tmp_path):
    """Seen in CI: the driver was killed after Tune deleted a trial's checkpoint_000001 (num_to_keep) and before
    its next snapshot of the experiment state, which still named it; Ray's restore of that trial then failed.
    The refill copies the trial's newest checkpoint under a missing name older than it; no other file changes."""
    from sweeps import tune_store

    run = tmp_path / "smoke-leave-one-out-20261208-033912-1"
    (run / "experiment_state-2026-12-08_03-39-12.json").parent.mkdir()
    (run / "experiment_state-2026-12-08_03-39-12.json").write_text(
        json.dumps({"trials": [["full_0", "{\"path\": \"full_0/checkpoint_000001\"}"], ["rigl_2", "checkpoint_000000"]]}))
    for trial, names in (("full_0", ("checkpoint_000002", "checkpoint_000003")), ("rigl_2", ()),
                         ("base_1", ("checkpoint_000000",))):
        (run / trial).mkdir()
        for i, name in enumerate(names):
            (run / trial / name).mkdir()
            (run / trial / name / "state_abc.pt").write_bytes(bytes([i]) * 8)
    # the names are read from the whole state, not per trial: full_0 also gets rigl_2's checkpoint_000000 (a
    # harmless copy of its newest, older by number, so never Tune's pick; deleted with the rest when it finishes)
    assert tune_store.refill_checkpoints(str(run)) == 2
    assert sorted(p.name for p in (run / "full_0").iterdir()) == [f"checkpoint_00000{i}" for i in (0, 1, 2, 3)]
    assert (run / "full_0" / "checkpoint_000001" / "state_abc.pt").read_bytes() == bytes([1]) * 8  # the newest
    assert not list((run / "rigl_2").iterdir())  # no checkpoint of its own: Tune starts it afresh, as before
    assert sorted(p.name for p in (run / "base_1").iterdir()) == ["checkpoint_000000"]  # it has the one named
    assert tune_store.refill_checkpoints(str(run)) == 0  # nothing left to refill
    assert tune_store.refill_checkpoints(str(tmp_path / "no-such-run")) == 0


def test_a_local_runtime_starts_with_token_auth_and_without_its_warning(tmp_path):
    code = ("import os\nfrom sweeps import launch\nlaunch.connect(num_cpus=1)\n"
            "print('mode', os.environ.get('RAY_AUTH_MODE'))\nlaunch.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "mode token" in proc.stdout  # token authentication stays on
    assert "Token authentication" not in proc.stderr and "RAY_AUTH_MODE" not in proc.stderr, proc.stderr


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert runstore.resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert runstore.resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert runstore.resolve_tracking_uri("sqlite:///x.db") == f"sqlite:///{tmp_path}/x.db"
    with pytest.raises(runstore.TrackingError, match="file store"):
        runstore.resolve_tracking_uri("./mlruns")


# ---- bad input fails fast, before Ray and before MLflow -----------------------------------------
_WRAPPER = TIMED_MAIN


@pytest.mark.parametrize("module,extra,message", [
    ("ablation_grid", ["--set", "prune.densty=0.1"], "unknown config key(s): prune.densty"),
    ("ablation_grid", ["--set", "typo=1"], "unknown config key(s): typo (did you mean train.amp or train.pre_epochs "
                                           "or train.post_epochs?); every key with its meaning: python -m sparse_core"),
    ("ablation_grid", ["--densities", "0,0.1"], "prune.density=0.0 is not valid"),
    ("ablation_grid", ["--densities", "1.5"], "prune.density=1.5 is not valid"),
    ("ablation_grid", ["--set", "prune.pruner=foo"], "prune.pruner='foo' is not a known pruner"),
    ("ablation_grid", ["--set", "data.name=mnist", "--data-dir", "{tmp}/no-such-dir"], "MNIST/raw"),
    ("ablation_grid", ["--mlflow-uri", "http://127.0.0.1:9"], "http://127.0.0.1:9 is not reachable"),
    ("optuna_search", ["--set", "train.method=nope"], "train.method='nope' is not valid"),
])
def test_bad_input_fails_fast_without_ray_or_runs(tmp_path, module, extra, message):
    db = tmp_path / "mlflow.db"
    argv = ["--preset", "smoke", "--storage-path", str(tmp_path / "ray")]
    if "--mlflow-uri" not in extra:
        argv += ["--mlflow-uri", f"sqlite:///{db}"]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    proc = subprocess.run([sys.executable, "-c", _WRAPPER.format(module=module), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert message in proc.stderr, proc.stderr
    assert "usage:" not in proc.stderr  # one line; the usage is for --help
    result = proc.stderr.strip().splitlines()[-1]
    assert "ray_imported=False" in result and "code=2" in result, result
    assert float(result.split("seconds=")[1].split()[0]) < 10
    assert not db.exists() and not (tmp_path / "ray").exists()  # no MLflow store, no Tune run


def test_a_sweep_whose_parent_lists_garbage_as_members_stops_before_ray(tmp_path):
    """The members list on a sweep's parent run is read from a store others write to: anything but run_keys stops
    the sweep with one line naming the file, before Ray starts and before any trial run exists."""
    from sweeps import sweep_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = runstore.experiment_id(uri, "garbage")
    parent = sweep_run.open_parent(uri, exp_id, "smoke-leave-one-out", {"preset": "smoke"})
    runstore.client(uri).log_dict(parent, {"run_keys": ["0123456789ab", "rm -rf /"]}, runstore.MEMBERS_ARTIFACT)
    argv = ["--preset", "smoke", "--cells", "rigl", "--mlflow-uri", uri, "--experiment", "garbage",
            "--storage-path", str(tmp_path / "ray")]
    proc = subprocess.run([sys.executable, "-c", _WRAPPER.format(module="ablation_grid"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert f"error: trials.json of sweep run {parent} is not" in proc.stderr, proc.stderr
    assert "Downloading artifacts" not in proc.stderr  # MLflow's progress bar stays off
    result = proc.stderr.strip().splitlines()[-1]
    assert "ray_imported=False" in result and "code=2" in result, result
    assert runs(uri, "garbage") == []


def test_laptop_preset_runs_three_paired_seeds_of_cells_that_answer_the_question():
    preset = presets.get("laptop")
    assert len(preset.seeds) >= 3
    code, out = run_cli(ablation_grid.main, ["--dry-run"])
    assert code == 0, out
    rows = [line.split() for line in out.splitlines() if line[:4].strip().isdigit() and line[4:6] == "  "]
    cells = {r[1] for r in rows}
    assert cells == set(preset.cells["leave-one-out"]) and len(cells) == 11
    assert {"full", "base", "gmp", "rigl"} <= cells and set(designs.baselines("leave-one-out")) & cells > {"base"}
    seeds = {}
    for _, cell, density, seed, *_ in rows:
        seeds.setdefault((cell, density), set()).add(int(seed))
    assert len(seeds) == 11 * len(preset.densities) and set(map(frozenset, seeds.values())) == {frozenset({0, 1, 2})}
    assert f"{len(rows)} trials in " in out and len(rows) == 132


# ---- the shared smoke sweep ---------------------------------------------------------------------
def test_smoke_sweep_one_finished_run_per_trial(smoke_sweep, store):
    assert smoke_sweep["code"] == 0, smoke_sweep["out"]
    out = smoke_sweep["out"]
    assert f"{SMOKE_TRIALS} trials ({SMOKE_TRIALS} launched, {SMOKE_TRIALS} trained, 0 skipped, 0 failed)" in out
    smoke = presets.get("smoke")
    expected, _ = designs.trials("leave-one-out", options.base_overrides(smoke.base, [], None), smoke.densities, (0,),
                                 smoke.synflow_rounds, cell_overrides=smoke.cell_overrides)
    finished = runs(store["uri"], "smoke", "FINISHED")
    assert len(finished) == len(runs(store["uri"], "smoke")) == SMOKE_TRIALS
    by_key = {r.data.tags["run_key"]: r for r in finished}
    assert set(by_key) == {t.run_key for t in expected}
    for t in expected:
        r = by_key[t.run_key]
        assert set(r.data.params) == set(FIELD_TYPES)
        assert to_flat(from_flat(r.data.params)) == t.flat  # params are the whole flat config
        tags = r.data.tags
        assert tags["cell"] == t.cell and tags["sweep"] == "smoke-leave-one-out" and tags["trial_id"]
        assert tags["sparse_core_version"] and "collapsed_layers" in tags
        assert tags["role"] == t.role == ("baseline" if t.cell in designs.baselines("leave-one-out") else "method")
        assert run_key(from_flat(r.data.params)) == tags["run_key"]
        for k in ("test_acc", "val_acc", "best_val_acc", "test_acc_at_best_val", "density", "density_all",
                  "flops_dense", "flops_sparse", "n_collapsed_layers", "seconds", "at_chance", "chance_acc") + (
                ("pre_val_acc", "pre_test_acc", "prune_val_acc", "prune_test_acc") if t.cell != "rigl" else ()):
            assert "final/" + k in r.data.tags, (t.cell, k)  # (RigL has no pre-training: NaN is not logged)
        assert abs(float(r.data.tags["final/density"]) - t.density) < 1e-3
        chance = r.data.metrics["final/at_chance"]  # 1 / 0 (a metric: the runs table averages it), as the tags say
        assert chance in (0.0, 1.0) and tags["at_chance"] == ("true" if chance else "false")
        assert float(r.data.tags["final/at_chance"]) == chance
        assert (chance == 1.0) == (float(r.data.tags["final/test_acc"]) < 1.5 * float(r.data.tags["final/chance_acc"]))
        assert not [k for k in r.data.metrics if "/" not in k]  # every chart in a named section
    c = runstore.client(store["uri"])
    full = by_key[next(t.run_key for t in expected if t.cell == "full")]
    steps = [m.step for m in c.get_metric_history(full.info.run_id, "epoch/val_acc")]
    assert steps == [1, 2, 3]  # pre 1 + post 2 epochs, step = global epoch
    assert [m.step for m in c.get_metric_history(full.info.run_id, "trainer/mask_soft_density")] == [1]
    assert not {"trainer/mask_mean", "trainer/seconds"} & set(full.data.metrics)  # runstore.NOT_LOGGED
    assert [m.step for m in c.get_metric_history(full.info.run_id, "prune/val_acc")] == [1]
    artifact = c.download_artifacts(full.info.run_id, "layer_density.json", str(store["dir"]))
    layer = json.loads(Path(artifact).read_text())
    assert layer and all(0 <= v <= 1 for v in layer.values())
    # progress lines, then the summary: one line per density, lowest first (reference by validation, in %,
    # or none when every baseline is at chance), where to look
    assert out.count("  done ") == SMOKE_TRIALS
    assert "sum of trial times" in out and "wall/sum" in out
    densities = presets.get("smoke").densities
    picks = [line for line in out.splitlines() if line.startswith("  density ")]
    assert [p.split(":")[0] for p in picks] == [f"  density {100 * d:g} %" for d in sorted(densities)]
    assert all((": reference " in p and "(one seed: no CI, no paired test)" in p) or ": no reference: " in p
               for p in picks), picks
    assert "summary of sweep 'smoke-leave-one-out', all 18 cells of design 'leave-one-out':" in out
    assert f"mlflow ui --backend-store-uri {store['uri']} --host 127.0.0.1 --port " in out
    report = summary.report_dir(store["uri"], "smoke-leave-one-out")
    assert report == str(store["dir"] / "reports" / "smoke-leave-one-out")
    assert f"report:     {report}/index.html" in out and Path(report, "index.html").exists()
    assert f"--filter sweep=smoke-leave-one-out --out {report}" in out
    (analysis,) = runstore.search(store["uri"], "smoke", "tags.cell = 'analysis'")  # the report, in MLflow too
    assert "index.html" in [a.path for a in c.list_artifacts(analysis.info.run_id)]
    # Tune's per-trial files: its JSON log only (MLflow has the metrics; no CSV, no TensorBoard events)
    trial_dirs = [d for d in Path(store["storage"]).glob("smoke-leave-one-out-*/*") if d.is_dir()]
    assert trial_dirs and all((d / "result.json").exists() for d in trial_dirs), trial_dirs
    assert not [f for d in trial_dirs for f in d.iterdir() if f.name == "progress.csv" or "tfevents" in f.name]
    # every trial finished: resume needs none of their checkpoints, and none is kept
    assert not [f for d in trial_dirs for f in d.iterdir() if f.name.startswith("checkpoint_")]
    from sweeps import tune_store

    sets = [json.loads(p.read_text()) for p in Path(store["storage"]).glob("smoke-leave-one-out-*.trials")]
    assert {"trial_set": tune_store.trial_set(expected), "trials": SMOKE_TRIALS} in sets  # --resume's trial set


def test_rerun_launches_nothing(smoke_sweep, store):
    before = len(runs(store["uri"], "smoke"))
    code, out = run_cli(ablation_grid.main, grid_args(store, "smoke", "--no-report"))
    assert code == 0
    assert f"skipping {SMOKE_TRIALS} of {SMOKE_TRIALS} trials" in out
    assert "writing the report" not in out and "  build it: python -m analysis report" in out
    assert f"(0 launched, 0 trained, {SMOKE_TRIALS} skipped, 0 failed)" in out
    assert len(runs(store["uri"], "smoke")) == before


def test_extra_density_launches_only_new_trials(smoke_sweep, store):
    before = len(runs(store["uri"], "smoke"))
    code, out = run_cli(ablation_grid.main, grid_args(store, "smoke", "--cells", "base,rigl",
                                                      "--densities", "0.1,0.01,0.05"))
    assert code == 0, out
    assert "6 trials (2 launched, 2 trained, 4 skipped, 0 failed)" in out
    new = runs(store["uri"], "smoke")
    assert len(new) == before + 2 and all(r.info.status == "FINISHED" for r in new)
    assert {r.data.params["prune.density"] for r in new if r.data.tags["cell"] in ("base", "rigl")} >= {"0.05"}


def test_a_sweep_has_one_parent_run_whose_children_are_its_trial_runs(smoke_sweep, store):
    # the smoke sweep, its re-run and a sweep adding a density (the tests above) share one parent
    c = runstore.client(store["uri"])
    exp = c.get_experiment_by_name("smoke")
    everything = runstore.search_ids(c, [exp.experiment_id])
    (parent,) = [r for r in everything if r.data.tags.get(runstore.ROLE_TAG) == runstore.SWEEP_ROLE]
    assert parent.data.tags["sweep"] == "smoke-leave-one-out" and parent.info.status == "FINISHED"
    trial_runs = runs(store["uri"], "smoke")
    assert trial_runs and all(r.data.tags[runstore.PARENT_TAG] == parent.info.run_id for r in trial_runs)
    assert parent.data.metrics["sweep/trials"] == 6 and parent.data.metrics["sweep/trained"] == 2  # the last call
    assert parent.data.tags["sweep.densities"] == "0.01,0.05,0.1" and parent.data.tags["sweep.cells"] == "base,rigl"
    # its members: every trial of every call (the whole design, then base and rigl at 0.05), trained or skipped
    smoke = presets.get("smoke")
    base = options.base_overrides(smoke.base, [], None)
    first = designs.trials("leave-one-out", base, smoke.densities, (0,), smoke.synflow_rounds,
                           cell_overrides=smoke.cell_overrides)[0]
    extra = designs.trials("leave-one-out", base, (0.05,), (0,), smoke.synflow_rounds, ["base", "rigl"],
                           smoke.cell_overrides)[0]
    assert runstore.read_members(c, parent.info.run_id) == {t.run_key for t in first + extra}
    summary = c.download_artifacts(parent.info.run_id, "summary.txt", store["storage"] + "-dl")
    assert "summary of sweep 'smoke-leave-one-out'" in Path(summary).read_text()
    assert "summary of sweep" in parent.data.tags["mlflow.note.content"]
    assert "report/index.html" in {f.path for f in c.list_artifacts(parent.info.run_id, "report")}
    # the runs table's shared view: one averaged row per cell and density of the sweep
    view = json.loads(exp.tags[runstore.VIEW_TAG])
    assert view["groupBy"] == runstore.GROUP_BY and view["groupBy"]["aggregateFunction"] == "average"
    assert view["groupsExpanded"][runstore.group_id("rigl", 0.05)] is False
    assert view["groupsExpanded"][runstore.group_id("full", 0.1)] is False  # groups of the first sweep stay


def test_failed_trial_resumes_from_checkpoint_as_one_run(smoke_sweep, store):
    code, out = run_cli(ablation_grid.main, grid_args(store, "retry", "--cells", "base", "--densities", "0.1",
                                                      "--set", "train.fail_at_epoch=2"))
    assert code == 0, out
    assert "retry base d=0.1 s=0" in out
    (run,) = runs(store["uri"], "retry")
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_at_epoch"] == "1"  # continued after epoch 1, not from scratch
    assert "InjectedFailure" in run.data.tags["retried_after"] and "error" not in run.data.tags
    c = runstore.client(store["uri"])
    for key in ("epoch/test_acc", "epoch/train_loss"):
        assert [m.step for m in c.get_metric_history(run.info.run_id, key)] == [1, 2, 3]
    # the same config, never interrupted, in the smoke sweep: identical result
    key = run.data.tags["run_key"]
    (plain,) = [r for r in runs(store["uri"], "smoke", "FINISHED") if r.data.tags["run_key"] == key]
    assert run.data.tags["final/test_acc"] == plain.data.tags["final/test_acc"]


def test_optuna_search_logs_runs_and_prints_overrides(smoke_sweep, store):
    code, out = run_cli(optuna_search.main, grid_args(store, "optuna", "--set", "mask.kind=sigmoid", "--set",
                                                      "prune.pruner=mask", "--set", "post.label_smoothing=true",
                                                      "--num-samples", "4", "--asha", "--max-concurrent", "2"))
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith("for ablation_grid.py:"))
    for knob in ("train.lr", "mask.warmup", "mask.lr", "post.smoothing"):
        assert f"--set {knob}=" in line
    all_runs = runs(store["uri"], "optuna")
    assert len(all_runs) == 4 and {r.data.tags["cell"] for r in all_runs} == {"optuna"}
    assert {r.info.status for r in all_runs} <= {"FINISHED", "KILLED"}  # ASHA stops are KILLED, never RUNNING
    lrs = {r.data.params["train.lr"] for r in all_runs}
    assert len(lrs) == 4  # TPE proposed four different learning rates
    # the printed best is the FINISHED run with the highest validation accuracy
    done = [r for r in all_runs if r.info.status == "FINISHED"]
    top = max(float(r.data.tags["final/val_acc"]) for r in done)
    picked = next(line for line in out.splitlines() if line.startswith("best by val_acc: "))
    assert f"val {100 * top:.2f} %" in picked  # (ties at the top are possible: any of them)
    assert any(r.info.run_id in picked for r in done if float(r.data.tags["final/val_acc"]) == top), picked
    assert "workflowType=machine_learning" in out


def test_optuna_search_continues_its_study_counting_the_earlier_trials(smoke_sweep, store):
    import optuna

    from sweeps import optuna_store

    args = ["--set", "mask.kind=sigmoid", "--set", "prune.pruner=mask", "--set", "post.label_smoothing=true",
            "--asha", "--max-concurrent", "2"]
    before = runs(store["uri"], "optuna")  # the search above: 4 trials, its study beside the store
    code, out = run_cli(optuna_search.main, grid_args(store, "optuna", *args, "--num-samples", "5"))
    assert code == 0, out
    assert "(4 done already, 1 to run)" in out and "1 trials (1 complete" in out
    assert len(runs(store["uri"], "optuna")) == len(before) + 1
    storage = optuna_store.storage_url(store["uri"])
    assert storage == "sqlite:///" + os.path.join(os.path.dirname(store["uri"][len("sqlite:///"):]), "optuna.db")
    (name,) = optuna.get_all_study_names(storage)
    states = [t.state.name for t in optuna.load_study(study_name=name, storage=storage).trials]
    assert len(states) == 5 and all(s in optuna_store.DONE for s in states)
    report = Path(summary.report_dir(store["uri"], "optuna-smoke"))
    assert {"optuna_history.png", "optuna_parallel.png", "index.html"} <= {f.name for f in report.iterdir()}
    code, out = run_cli(optuna_search.main, grid_args(store, "optuna", *args, "--num-samples", "5"))
    assert code == 0 and "the study already has 5 of 5 trials; nothing to run" in out
    assert len(runs(store["uri"], "optuna")) == len(before) + 1


def test_an_optuna_study_left_running_by_a_killed_driver_is_continued(tmp_path):
    import optuna

    from sweeps import optuna_store

    storage = optuna_store.storage_url(f"sqlite:///{tmp_path}/mlflow.db")
    assert storage == f"sqlite:///{tmp_path}/optuna.db"
    assert optuna_store.storage_url("http://127.0.0.1:5000", str(tmp_path / "s.db")) == f"sqlite:///{tmp_path}/s.db"
    name = optuna_store.study_name("optuna-x", {"seed": 0}, ["train.lr"], 0)
    assert name != optuna_store.study_name("optuna-x", {"seed": 1}, ["train.lr"], 0)  # another search, another study
    assert optuna_store.prepare(storage, name) == 0  # no study yet
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    for value in (0.5, 0.7):
        trial = study.ask()
        study.tell(trial, value)
    study.ask()  # the killed driver's trial: RUNNING for ever
    assert optuna_store.prepare(storage, name) == 2
    states = [t.state.name for t in optuna.load_study(study_name=name, storage=storage).trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]


def test_optuna_search_has_its_own_experiment_by_default():
    _, args = optuna_search.parse_args([])
    assert args.experiment == f"{options.DEFAULT_EXPERIMENT}-optuna" != ablation_grid.parse_args([])[1].experiment


def test_optuna_and_asha_rank_trials_by_validation_accuracy(ray_runtime, tmp_path):
    """The search's own TuneConfig (seeded TPE + ASHA) on trials whose val and test accuracy disagree."""
    from ray import tune

    def disagreeing_trial(config):  # nested: Ray ships it by value (workers cannot import this test module)
        for epoch in range(1, 5):  # x high: val_acc high, test_acc low
            tune.report({"epoch": epoch, "val_acc": config["x"] * epoch / 4,
                         "test_acc": (1 - config["x"]) * epoch / 4})

    cfg = from_flat({"train.pre_epochs": 1, "train.post_epochs": 3})  # 4 epochs; ASHA rungs from epoch 2
    tune_cfg = optuna_search.search_config(cfg, num_samples=8, sampler_seed=0, concurrent=2, asha=True)
    assert (tune_cfg.metric, tune_cfg.mode) == ("val_acc", "max")
    results = tune.Tuner(disagreeing_trial, param_space={"x": tune.uniform(0.0, 1.0)}, tune_config=tune_cfg,
                         run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()
    trials = [(r.config["x"], r.metrics["epoch"]) for r in results]
    complete = [r for r in results if r.metrics["epoch"] == 4]
    stopped = [x for x, epoch in trials if epoch < 4]
    best = optuna_search.best_result(complete)
    assert best.config["x"] == max(x for x, _ in trials)  # the highest val_acc, i.e. the lowest test_acc
    assert results.get_best_result().config["x"] == best.config["x"]
    assert stopped and max(stopped) < best.config["x"]  # ASHA stopped trials of lower val_acc


# ---- slow: the user's path through a real cluster -------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _readme_job_command(pwd: Path, address: str) -> list[str]:
    """The README's `ray job submit` example (Sweeps section), with $PWD standing for ``pwd``."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text().split("## Sweeps", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"\n    (RAY_AUTH_MODE=token ray job submit .*?)\n    ray stop", text, re.S)
    argv = shlex.split(block.replace("\\\n", " ").replace("$PWD", str(pwd)))
    assert argv[0] == "RAY_AUTH_MODE=token" and argv[argv.index("--address") + 1] == "http://127.0.0.1:8265"
    argv[argv.index("--address") + 1] = address
    return argv[1:]


@pytest.mark.slow
def test_ray_job_submit_end_to_end(tmp_path):
    """ray start --head (token auth on) -> the README's ray job submit -> runs in MLflow -> stop."""
    temp = Path(f"/tmp/rt{os.getpid()}")  # short: Ray's socket paths must stay under 107 bytes
    dash = _free_port()
    head = subprocess.Popen(["ray", "start", "--head", "--block", "--port", str(_free_port()), "--num-cpus", "2",
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                             "--ray-client-server-port", str(_free_port()), "--temp-dir", str(temp),
                             # the job agent's ports too: on a default port left bound by an earlier Ray (another
                             # test's), the agent never registers and every submission says "No available agent"
                             "--dashboard-agent-listen-port", str(_free_port()),
                             "--dashboard-agent-grpc-port", str(_free_port()),
                             "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
                             "--object-store-memory", str(100 * 1024**2)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_dashboard(dash, head)
        db = tmp_path / "mlflow.db"
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        env.pop("RAY_ADDRESS", None)
        deadline = time.time() + 300
        while True:
            proc = subprocess.run(_readme_job_command(tmp_path, f"http://127.0.0.1:{dash}"),
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            # on a loaded machine the head's job agent can register well after the dashboard answers;
            # Ray then refuses the submission with this message and asks to try again later
            if "No available agent to submit job" not in proc.stdout + proc.stderr or time.time() > deadline:
                break
            time.sleep(10)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        out = proc.stdout + proc.stderr
        assert "succeeded" in out and "launching 4 trials" in out and out.count("  done ") == 4, out[-4000:]
        finished = runs(f"sqlite:///{db}", "job-smoke", "FINISHED")
        assert len(finished) == 4 and {r.data.tags["cell"] for r in finished} == {"full", "base"}
        assert (tmp_path / "reports" / "smoke-leave-one-out" / "index.html").exists()  # beside the store
        assert list((tmp_path / "ray_results").glob("smoke-leave-one-out-*"))  # the absolute --storage-path
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops everything it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_dashboard(port: int, head: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError("ray start exited: " + (head.stdout.read() if head.stdout else ""))
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # it answers (401 without the token): up
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError("the Ray dashboard did not come up")


@pytest.mark.slow
def test_sweep_against_a_real_mlflow_server(tmp_path):
    """An http tracking URI: runs, params and the layer_density.json artifact go through the server."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art"),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                runstore.check_reachable(uri, timeout=2)
                break
            except runstore.TrackingError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(1)
        proc = subprocess.run([sys.executable, "sweeps/ablation_grid.py", "--preset", "smoke", "--cells", "base,rigl",
                               "--densities", "0.1", "--mlflow-uri", uri, "--storage-path", str(tmp_path / "ray")],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        finished = runs(uri, options.DEFAULT_EXPERIMENT, "FINISHED")
        assert len(finished) == 2
        c = runstore.client(uri)
        for r in finished:
            assert [a.path for a in c.list_artifacts(r.info.run_id)] == ["layer_density.json"]
            # the flat config, and the server's record of the claim (write-once, sweeps/claims.py)
            assert set(r.data.params) == set(FIELD_TYPES) | {runstore.CLAIM_PARAM + "1"}
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.slow
def test_interrupted_sweep_resumes(tmp_path):
    """Ctrl-C after the first finished trial, then --resume: every trial ends as one FINISHED run."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = [sys.executable, "sweeps/ablation_grid.py", "--preset", "smoke", "--cells", "full,base,rigl",
            "--densities", "0.1,0.05,0.01", "--mlflow-uri", uri, "--storage-path", str(tmp_path / "ray")]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("  done "):
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=900)
    assert proc.returncode == 1, "".join(lines) + rest
    assert "unfinished: continue with --resume" in rest, "".join(lines) + rest
    assert not runs(uri, "sparsity-sweep", "RUNNING")
    done = subprocess.run(argv + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    all_runs = runs(uri, "sparsity-sweep")
    assert len(all_runs) == 9 and {r.info.status for r in all_runs} == {"FINISHED"}
    assert len({r.data.tags["run_key"] for r in all_runs}) == 9
