"""runstore (the MLflow store shared by sweeps and analysis), the end-of-sweep summary, and the small
user-facing checks of issue 14: all on a real SQLite MLflow store, no Ray.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import runstore
from analysis.cli import main as analysis_main
from analysis.load import load_runs
from sparse_core.config import from_flat, run_key
from sparse_core.metrics import at_chance, chance_accuracy
from sparse_core.train import run
from sweeps import designs, summary, tracking

ROOT = Path(__file__).resolve().parent.parent
TINY = {"data.name": "digits", "model.width": 16, "model.depth": 2, "train.pre_epochs": 1, "train.post_epochs": 2,
        "train.device": "cpu", "prune.density": 0.1}


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One store for the module (creating MLflow's schema takes seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


def _fake_run(c, exp_id, flat, cell, metrics, status="FINISHED", sweep="s"):
    """A run as TrialRun leaves it (params = the flat config, tags, final/ metrics), written directly."""
    from mlflow.entities import Metric, Param

    cfg = from_flat(flat)
    r = c.create_run(exp_id, tags={"cell": cell, "run_key": run_key(cfg), "sweep": sweep})
    c.log_batch(r.info.run_id, params=[Param(k, str(v)) for k, v in cfg.to_flat().items()],
                metrics=[Metric(k, v, 0, 3) for k, v in metrics.items()])
    c.set_terminated(r.info.run_id, status)
    return r.info.run_id


# ---- layering -------------------------------------------------------------------------------------
def test_analysis_and_runstore_never_import_sweeps_or_ray():
    code = ("import sys, analysis, analysis.cli, analysis.load, analysis.report, analysis.table, analysis.plots, "
            "runstore\nbad = sorted(m for m in sys.modules if m.split('.')[0] in ('sweeps', 'ray'))\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=600)
    for folder in ("analysis", "runstore"):
        for path in (ROOT / folder).glob("*.py"):
            text = path.read_text()
            assert "from sweeps" not in text and "import sweeps" not in text, path


# ---- experiments: open in MLflow's training view ---------------------------------------------------
def test_new_and_existing_experiments_are_marked_as_model_training(uri):
    c = MlflowClient(uri)
    new = c.get_experiment(runstore.experiment_id(uri, "fresh"))
    assert new.tags[runstore.EXPERIMENT_KIND_TAG] == runstore.EXPERIMENT_KIND == "custom_model_development"
    view = json.loads(new.tags[runstore.VIEW_TAG])
    assert "metrics.`final/val_acc`" in view["selectedColumns"] and view["orderByKey"] == "metrics.`final/val_acc`"
    # experiments made by older versions (no kind) or tagged GenAI are re-marked when we write to them
    old = c.create_experiment("old")
    genai = c.create_experiment("genai", tags={runstore.EXPERIMENT_KIND_TAG: "genai_development"})
    mine = c.create_experiment("mine", tags={runstore.EXPERIMENT_KIND_TAG: "classification"})
    for name, exp_id in (("old", old), ("genai", genai), ("mine", mine)):
        assert runstore.experiment_id(uri, name) == exp_id
    kinds = {n: c.get_experiment_by_name(n).tags[runstore.EXPERIMENT_KIND_TAG] for n in ("old", "genai", "mine")}
    assert kinds == {"old": "custom_model_development", "genai": "custom_model_development", "mine": "classification"}


def test_ui_link_opens_the_training_view_on_a_free_port(uri):
    import socket

    command, url = runstore.ui_link(uri, "7", port=5000)
    assert command == f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    assert url == ("http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=study"
                   "&workflowType=machine_learning")
    with socket.socket() as busy:  # something listens where the UI would go: the command names another port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        port = runstore.free_port(taken)
        assert port != taken and port > 0
        command, url = runstore.ui_link(uri, "7")
        chosen = int(command.rsplit("--port ", 1)[1])
        assert url.startswith(f"http://127.0.0.1:{chosen}/#/experiments/7/runs?")
        with socket.socket() as probe:  # the printed port is free to bind right now
            probe.bind(("127.0.0.1", chosen))
    command, url = runstore.ui_link("http://10.0.0.5:5000/", "7")
    assert command is None and url.startswith("http://10.0.0.5:5000/#/experiments/7/runs?")


# ---- metric names: curves, final values, read back ------------------------------------------------
def test_trial_run_names_metrics_by_prefix_and_analysis_reads_plain_keys(uri):
    cfg = from_flat(TINY)
    exp_id = runstore.experiment_id(uri, "names")
    mlrun = tracking.TrialRun(uri, exp_id, sweep="s", cell="base", flat=cfg.to_flat(), run_key=run_key(cfg)).open()
    result = run(cfg, lambda metrics, _: mlrun.log_step(metrics))
    mlrun.finish(result)
    c = MlflowClient(uri)
    metrics, tags = c.get_run(mlrun.run_id).data.metrics, c.get_run(mlrun.run_id).data.tags
    assert {k.split("/")[0] for k in metrics} == {"epoch", "final", "prune", "trainer"}  # nothing unprefixed
    assert sorted(k for k in metrics if k.startswith("epoch/")) == [f"epoch/{k}" for k in sorted(runstore.CURVES)]
    assert [m.step for m in c.get_metric_history(mlrun.run_id, "epoch/val_acc")] == [1, 2, 3]
    assert float(tags["final/test_acc"]) == result["test_acc"] and float(tags["final/val_acc"]) == result["val_acc"]
    assert metrics["final/test_acc"] == round(result["test_acc"], 4)  # shown rounded in the runs table
    assert {k for k in metrics if k.startswith("final/")} == {f"final/{k}" for k in runstore.FINAL_AS_METRICS}
    assert metrics["prune/density"] == pytest.approx(0.1, abs=1e-3)
    # an old-style run (final values without the prefix) reads the same
    _fake_run(c, exp_id, {**TINY, "seed": 1}, "base", {"test_acc": 0.5, "val_acc": 0.6, "flops_dense": 10.0})
    df = load_runs(uri, ["names"]).set_index("seed")
    assert df.loc[0, "test_acc"] == result["test_acc"] and df.loc[0, "flops_dense"] == result["flops_dense"]
    assert (df.loc[1, "test_acc"], df.loc[1, "val_acc"]) == (0.5, 0.6)
    assert "final/test_acc" not in df.columns


# ---- the SQLite store: WAL, read by plain sqlite3 ----------------------------------------------------
def test_a_new_store_is_in_wal_mode_and_plain_readers_see_unchecked_writes(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    c = runstore.client(uri)
    run_id = c.create_run(runstore.experiment_id(uri, "wal")).info.run_id
    c.set_tag(run_id, "checkpoint_dir", "/somewhere")
    with contextlib.closing(sqlite3.connect(db)) as con:  # set by MLflow's own connections (ours opens after)
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert (tmp_path / "mlflow.db-wal").stat().st_size > 0  # the writes are still in the log, not the file
    # a read-only plain reader (tests/test_faults.py polls so; analysis.cli checks the tables so) sees them
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as ro:
        assert ro.execute("SELECT value FROM tags WHERE run_uuid = ? AND key = 'checkpoint_dir'",
                          (run_id,)).fetchall() == [("/somewhere",)]
    import sqlalchemy

    with sqlalchemy.create_engine(uri).connect() as con:  # the listener covers every engine of the process
        assert con.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    with sqlalchemy.create_engine("sqlite://").connect() as con:  # in memory: left as it is
        assert con.exec_driver_sql("PRAGMA journal_mode").scalar() == "memory"


def _calls(monkeypatch, client, names):
    """Record which of ``client``'s methods are called, in order (they still run)."""
    seen = []
    for name in names:
        def spy(*args, _real=getattr(client, name), _name=name, **kwargs):
            seen.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(client, name, spy)
    return seen


@pytest.mark.parametrize("extra", [{"collapsed_layers": ["net.0.weight", "net.4.weight"], "device": "cpu",
                                    "sparse_path": "csr"}, {"collapsed_layers": []}])
def test_finish_writes_final_metrics_and_tags_in_one_batch(uri, monkeypatch, extra):
    cfg = from_flat({**TINY, "seed": 10 + len(extra)})
    mlrun = tracking.TrialRun(uri, runstore.experiment_id(uri, "finish"), sweep="s", cell="base",
                              flat=cfg.to_flat(), run_key=run_key(cfg)).open()
    mlrun.log_step({"epoch": 1, "stage": "post", "val_acc": 0.5, "lr": 0.1})  # buffered, not flushed yet
    result = {"test_acc": 0.9, "val_acc": 0.8, "density": 0.1, "epochs": 3, "latency_ratio_b1": math.nan,
              "layer_density": {"net.0.weight": 0.0, "net.2.weight": 0.25}, **extra,
              "n_collapsed_layers": len(extra["collapsed_layers"])}  # a result's final_fields (the relay's too)
    seen = _calls(monkeypatch, mlrun.client, ("log_batch", "set_tag", "log_dict", "set_terminated"))
    mlrun.write_final(result)
    assert seen == ["log_batch", "log_dict", "set_terminated"]
    c = MlflowClient(uri)
    run = c.get_run(mlrun.run_id)
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["collapsed_layers"] == ",".join(extra["collapsed_layers"])
    assert tags["device"] == extra.get("device", "")
    assert tags.get("sparse_path") == extra.get("sparse_path") and "heartbeat" in tags
    assert {k: v for k, v in metrics.items() if k.startswith("final/")} == {  # charted: these only
        "final/test_acc": 0.9, "final/val_acc": 0.8, "final/n_collapsed_layers": float(len(extra["collapsed_layers"]))}
    assert {k: float(v) for k, v in tags.items() if k.startswith("final/")} == {
        "final/test_acc": 0.9, "final/val_acc": 0.8, "final/density": 0.1, "final/epochs": 3.0,
        "final/n_collapsed_layers": float(len(extra["collapsed_layers"]))}  # NaN is not logged
    assert [m.step for m in c.get_metric_history(mlrun.run_id, "final/test_acc")] == [3]
    assert [(m.step, m.value) for m in c.get_metric_history(mlrun.run_id, "epoch/val_acc")] == [(1, 0.5)]
    assert metrics["trainer/lr"] == 0.1 and run.info.status == "FINISHED"
    path = c.download_artifacts(mlrun.run_id, "layer_density.json", str(Path(runstore.sqlite_path(uri)).parent))
    assert json.loads(Path(path).read_text()) == result["layer_density"]


def test_a_runs_metrics_and_tags_derive_from_the_typed_records():
    """``runstore.step_metrics`` / ``final_fields`` / ``final_record``: what the writers log, from a real
    run's ``StepEvent``s and ``RunResult`` (the collapsed-layer count is the result's own property)."""
    from sparse_core.results import RunResult, StepEvent
    from sparse_core.train import run

    seen = []
    result = RunResult.from_dict(run(from_flat({**TINY, "seed": 30}), lambda metrics, _: seen.append(metrics)))
    events = [StepEvent.from_dict(m) for m in seen]
    prune = next(e for e in events if e.stage == "prune")
    assert runstore.step_metrics(prune) == ("prune", prune.round + 1, {
        "prune/val_acc": prune.val_acc_after_prune, "prune/test_acc": prune.test_acc_after_prune,
        "prune/density": prune.density, "prune/n_collapsed_layers": prune.n_collapsed_layers})
    epoch = next(e for e in events if e.is_epoch)
    kind, step, values = runstore.step_metrics(epoch)
    assert (kind, step) == ("epoch", epoch.epoch) and values["epoch/val_acc"] == epoch.val_acc
    assert values["trainer/lr"] == epoch.lr and not {"epoch/stage", "trainer/stage_end", "trainer/epoch"} & set(values)
    fields = runstore.final_fields(result)
    assert fields == runstore.final_fields(result.to_dict())  # train.run's dict reads the same
    assert fields["n_collapsed_layers"] == result.n_collapsed_layers and fields["at_chance"] in (0.0, 1.0)
    assert set(fields) <= set(runstore.FINAL_FIELDS) and "history" not in fields and "config" not in fields
    metrics, tags = runstore.final_record({**fields, "collapsed_layers": ["a.weight", "b.weight"],
                                           "n_collapsed_layers": 2, "prefix_shared_by": 3})
    assert metrics == {f"final/{k}": round(fields[k], 4) if k != "n_collapsed_layers" else 2
                       for k in runstore.FINAL_AS_METRICS}
    assert tags["final/test_acc"] == repr(float(result.test_acc)) and tags["collapsed_layers"] == "a.weight,b.weight"
    assert tags["pretraining_shared_by"] == "3" and tags["at_chance"] in ("true", "false")


def test_write_writes_everything_in_batches_and_the_tags_once(uri, monkeypatch):
    cfg = from_flat({**TINY, "seed": 20})
    mlrun = tracking.TrialRun(uri, runstore.experiment_id(uri, "finish"), sweep="s", cell="base",
                              flat=cfg.to_flat(), run_key=run_key(cfg)).open()
    for step in range(1, 1201):
        mlrun._log({"trainer/x": step}, step)
    seen = _calls(monkeypatch, mlrun.client, ("log_batch",))
    mlrun.write({"a": "b"})
    assert seen == ["log_batch", "log_batch"] and not mlrun._pending
    c = MlflowClient(uri)
    assert [m.value for m in c.get_metric_history(mlrun.run_id, "trainer/x")] == list(range(1, 1201))
    assert c.get_run(mlrun.run_id).data.tags["a"] == "b"
    mlrun.write()
    assert seen == ["log_batch", "log_batch"]  # nothing pending and no tags: no write


# ---- analysis leaves Optuna search runs out -------------------------------------------------------
def test_search_runs_are_left_out_of_the_grid_table_unless_asked(uri):
    c = MlflowClient(uri)
    exp_id = runstore.experiment_id(uri, "mixed")
    for seed in (0, 1):
        _fake_run(c, exp_id, {**TINY, "seed": seed}, "base", {"final/test_acc": 0.8 + seed / 10})
    for lam in (1e-5, 1e-4, 1e-3):  # a search varies its knobs: averaging over them would be wrong
        _fake_run(c, exp_id, {**TINY, "mask.kind": "sigmoid", "prune.pruner": "mask", "mask.lambda_l1": lam},
                  runstore.SEARCH_CELL, {"final/test_acc": 0.5})
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = analysis_main(["table", "--experiment", "mixed", "--mlflow-uri", uri])
    assert code == 0, err.getvalue()
    assert "left out 3 Optuna search runs (cell 'optuna'; --include-search to use them)" in err.getvalue()
    assert "85.00" in out.getvalue() and "optuna" not in out.getvalue()
    df = load_runs(uri, ["mixed"], include_search=True)
    assert sorted(df["cell"]) == ["base", "base", "optuna", "optuna", "optuna"]


# ---- one reader of runs: runstore.run_rows, under analysis.load_runs and runstore.load_runs ---------
def test_analysis_and_runstore_read_the_same_rows(uri):
    c = MlflowClient(uri)
    exp_id = runstore.experiment_id(uri, "rows")
    _fake_run(c, exp_id, {**TINY, "seed": 0}, "base", {"final/test_acc": 0.5})
    newer = _fake_run(c, exp_id, {**TINY, "seed": 0}, "base", {"final/test_acc": 0.7})  # same run_key, newer
    _fake_run(c, exp_id, {**TINY, "seed": 1}, "base", {"final/test_acc": 0.6}, status="FAILED", sweep="t")
    df = load_runs(uri, ["rows"])
    assert list(df["run_id"]) == [newer] and df.attrs["left_out"] == {
        "FAILED": 1, "duplicate run_key (kept the newest)": 1}
    plain = runstore.load_runs(uri, "rows")  # no de-duplication here: both FINISHED copies, newest first
    assert [r["test_acc"] for r in plain] == [0.7, 0.5]
    assert {k: plain[0][k] for k in df.columns if k != "experiment"} == \
        {k: v for k, v in df.iloc[0].to_dict().items() if k != "experiment"}
    assert [r["seed"] for r in runstore.load_runs(uri, "rows", sweep="t", status=None)] == [1]
    assert runstore.load_runs(uri, "no-such-experiment") == []


def test_a_sweeps_runs_include_those_it_found_finished_by_another_sweep(uri):
    """Sweep b skips the runs sweep a finished and counts them as its own (its summary reads them by run_key), so
    ``--filter sweep=b`` (its report) must read them too: they are listed on b's parent run, not tagged b."""
    from analysis.load import AnalysisError, apply_filters
    from sweeps import sweep_run

    c = MlflowClient(uri)
    exp_id = runstore.experiment_id(uri, "two-sweeps")
    keys = [run_key(from_flat({**TINY, "seed": s})) for s in range(4)]
    for seed in (0, 1):
        _fake_run(c, exp_id, {**TINY, "seed": seed}, "base", {"final/test_acc": 0.5}, sweep="a")
    _fake_run(c, exp_id, {**TINY, "seed": 2}, "base", {"final/test_acc": 0.6}, sweep="b")
    _fake_run(c, exp_id, {**TINY, "seed": 3}, "base", {"final/test_acc": 0.7}, sweep="c")  # nobody lists it
    parent = sweep_run.open_parent(uri, exp_id, "b", {"preset": "tiny"}, run_keys=keys[:2])
    assert sweep_run.open_parent(uri, exp_id, "b", {"preset": "tiny"}, run_keys=keys[2:3]) == parent  # a re-run
    assert runstore.read_members(c, parent) == set(keys[:3])  # adds its keys to the earlier invocation's
    df = load_runs(uri, ["two-sweeps"])
    assert sorted(apply_filters(df, ["sweep=b"])["seed"]) == [0, 1, 2]
    assert sorted(apply_filters(df, ["sweep=a"])["seed"]) == [0, 1]  # a lists nothing: what it trained
    assert sorted(apply_filters(df, ["sweep=a", "sweep=c"])["seed"]) == [0, 1, 3]
    c.log_dict(parent, {"run_keys": [keys[0], "../../etc/passwd"]}, runstore.MEMBERS_ARTIFACT)  # not run_keys
    with pytest.raises(AnalysisError, match="trials.json of sweep run .* is not"):
        apply_filters(df, ["sweep=b"])


# ---- the end-of-sweep summary: reference by validation, CIs, paired tests, chance named ---------------
def test_sweep_summary_gives_reference_ci_paired_tests_and_chance_in_percent(uri):
    c = MlflowClient(uri)
    exp_id = runstore.experiment_id(uri, "grid")
    base = {k: v for k, v in TINY.items() if k != "prune.density"}
    cells = ["full", "base", "gmp", "rigl"]
    trials, _ = designs.trials("leave-one-out", base, (0.1, 0.01), (0, 1, 2), 2, cells)
    # (val, test) per seed. At 10 %: gmp has the best baseline val (rigl the best baseline test: never picked);
    # full is clearly better than gmp on every seed, base clearly worse. At 1 %: base is at chance with the
    # highest val of all baselines (never the reference), rigl is the reference, gmp is not distinguishable.
    acc = {("full", 0.1): ((0.90, 0.95), (0.91, 0.96), (0.92, 0.97)),
           ("gmp", 0.1): ((0.85, 0.80), (0.86, 0.81), (0.87, 0.82)),
           ("rigl", 0.1): ((0.70, 0.90), (0.71, 0.91), (0.72, 0.92)),
           ("base", 0.1): ((0.60, 0.50), (0.61, 0.52), (0.62, 0.51)),
           ("full", 0.01): ((0.50, 0.55), (0.40, 0.30), (0.60, 0.70)),
           ("gmp", 0.01): ((0.50, 0.60), (0.50, 0.40), (0.50, 0.50)),
           ("rigl", 0.01): ((0.60, 0.60), (0.60, 0.50), (0.60, 0.55)),
           ("base", 0.01): ((0.12, 0.10), (0.12, 0.10), (0.12, 0.10))}  # at chance on validation too
    for t in trials:
        if (t.cell, t.density, t.seed) == ("full", 0.01, 2):
            continue  # one trial never finished
        val, test = acc[(t.cell, t.density)][t.seed]
        collapsed = 1.0 if t.cell == "base" and t.density == 0.01 and t.seed == 0 else 0.0
        chance = 1.0 if t.cell == "base" and t.density == 0.01 else 0.0
        _fake_run(c, exp_id, t.flat, t.cell, {"final/val_acc": val, "final/test_acc": test, "final/at_chance": chance,
                                               "final/chance_acc": 0.1, "final/n_collapsed_layers": collapsed},
                  sweep="grid-s")
    outcome = summary.rows(trials, uri, "grid", designs.baselines("leave-one-out"),
                           summary.scope_text("leave-one-out", cells, [l for l, _ in designs.cells("leave-one-out")],
                                              "--cells"))
    text = "\n".join(summary.lines(outcome, uri=uri, exp_id=exp_id, experiment="grid", sweep="grid-s",
                                   report=None, report_error="no runs", cells=cells))
    lines = text.splitlines()
    assert lines[0] == ("summary of sweep 'grid-s', 4 of the 18 cells of design 'leave-one-out' (--cells): full, base, "
                        "gmp, rigl:")
    at = {d: lines.index(next(x for x in lines if x.startswith(f"  density {d}:"))) for d in ("1 %", "10 %")}
    assert at["1 %"] < at["10 %"]  # the lowest density leads
    low, high = lines[at["1 %"]:at["10 %"]], lines[at["10 %"]:]
    assert low[0] == "  density 1 %: reference rigl: test 55.00 ± 12.42, 95 % CI 42.58-67.42, 3/3 seeds"
    assert "    not distinguishable: gmp, full" in low and not [x for x in low if "better" in x or "worse" in x]
    assert "    not tested (fewer than 2 paired seeds)" not in text  # full has 2 seeds at 1 %: tested
    assert "    at chance: base" in low and "    collapsed layers in base (1/3)" in low
    assert high[0].startswith("  density 10 %: reference gmp: test 81.00 ± 2.48, 95 % CI 78.52-83.48, 3/3 seeds")
    assert "    better: full 96.00 ± 2.48, rigl 91.00 ± 2.48" in high
    assert "    worse: base 51.00 ± 2.48" in high
    assert "1 of 24 trials have no FINISHED run" in text
    assert f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port " in text
    assert "workflowType=machine_learning" in text and "report:     not written (no runs)" in text
    assert (f"python -m analysis report --experiment grid --mlflow-uri {uri} --filter sweep=grid-s --filter cell=full "
            f"--filter cell=base --filter cell=gmp --filter cell=rigl --out {summary.report_dir(uri, 'grid-s')}") in text
    assert summary.report_dir(uri, "grid-s") == str(Path(runstore.sqlite_path(uri)).parent / "reports" / "grid-s")


# ---- the CLI says when a run ends at chance ------------------------------------------------------
def test_chance_accuracy_is_the_best_constant_guess():
    y = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    assert chance_accuracy(y, 3) == 0.6 and chance_accuracy(torch.tensor([0, 1, 2, 3]), 10) == pytest.approx(0.25)
    assert at_chance(0.85, y, 3) and not at_chance(0.95, y, 3) and at_chance(math.nan, y, 3)


def test_cli_flags_a_run_that_ends_at_chance():
    """A learning rate of 1e-9 trains nothing: the JSON says at_chance and stderr says so, even with --quiet."""
    proc = subprocess.run([sys.executable, "-m", "sparse_core", "--quiet", "train.lr=1e-9", "train.pre_epochs=1",
                           "train.post_epochs=1", "model.width=16", "model.depth=2", "train.device=cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["at_chance"] is True
    assert "is at chance" in proc.stderr and "learned nothing" in proc.stderr


# ---- unknown keys -----------------------------------------------------------------------------------
@pytest.mark.parametrize("key,closest", [("prune.densty", "prune.density"), ("density", "prune.density"),
                                         ("post.label_smothing", "post.label_smoothing")])
def test_unknown_key_suggests_the_closest_first(key, closest):
    with pytest.raises(ValueError) as e:
        from_flat({key: 1})
    message = str(e.value)
    assert message.startswith(f"unknown config key(s): {key} (did you mean {closest}")
    assert message.count(" or ") <= 2 and "valid keys" not in message  # three suggestions at most, not all keys
    assert "python -m sparse_core --help" in message
