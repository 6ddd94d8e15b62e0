"""analysis/ against a real MLflow SQLite store filled by real (tiny) trainer runs, written by the
sweep's own MLflow writer (sweeps.tracking.TrialRun).

The expected numbers are recomputed from what ``sparse_core.train.run`` returned, never read back
from the code under test.
"""

import base64
import io
import logging
import os
import subprocess
import sys
import time
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

import sparse_core
from sparse_core.config import FIELD_TYPES, from_flat, run_key
from sparse_core.train import InjectedFailure, run
from sweeps import tracking

from analysis import plots, report
from analysis.cli import main
from analysis.load import AnalysisError, apply_filters, load_runs
from analysis.table import ablation_table, to_csv, to_latex, to_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = {"data.name": "digits", "train.pre_epochs": 2, "train.post_epochs": 2, "model.width": 32, "model.depth": 2,
        "train.device": "cpu"}
CELLS = {"base": {}, "base+label_smoothing": {"post.label_smoothing": True}}
DENSITIES = [0.3, 0.05, 0.003]  # 0.003 of 3,392 weights: global magnitude empties a layer for seed 0
SEEDS = [0, 1, 2]  # three, so a median or a first-seed-only bug cannot pass for the mean


def trained_run(uri, exp_id, cell, flat, status="FINISHED"):
    """One trial through the sweep's real MLflow writer (sweeps.tracking.TrialRun), as the trainable does it."""
    cfg = from_flat(flat)
    mlrun = tracking.TrialRun(uri, exp_id, sweep="test-grid", cell=cell, flat=cfg.to_flat(), run_key=run_key(cfg),
                              tags={"sparse_core_version": sparse_core.__version__}).open()
    if status == "RUNNING":
        return cfg, None, mlrun.run_id
    try:
        result = run(cfg, lambda metrics, _: mlrun.log_step(metrics))
    except InjectedFailure as e:
        mlrun.fail(e)
        return cfg, None, mlrun.run_id
    mlrun.finish(result)
    return cfg, result, mlrun.run_id


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """Experiment "grid": 2 cells x 3 densities x 2 seeds finished, plus one FAILED and one RUNNING run.
    Experiment "extra": one finished run that differs from a grid run only in train.lr."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    grid, extra = tracking.experiment_id(uri, "grid"), tracking.experiment_id(uri, "extra")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 3-layer MLP: extra threads only spin, and on a loaded machine cost 10x
    try:
        results = []
        for cell, over in CELLS.items():
            for density in DENSITIES:
                for seed in SEEDS:
                    cfg, result, run_id = trained_run(uri, grid, cell, {**BASE, **over, "prune.density": density,
                                                                        "seed": seed})
                    results.append({"cell": cell, "density": density, "seed": seed, "cfg": cfg, "result": result,
                                    "run_id": run_id})
        _, none, failed = trained_run(uri, grid, "base", {**BASE, "prune.density": 0.05, "seed": 7,
                                                          "train.fail_at_epoch": 2})
        assert none is None
        running = trained_run(uri, grid, "base", {**BASE, "seed": 8}, status="RUNNING")[2]
        trained_run(uri, extra, "base", {**BASE, "prune.density": 0.3, "seed": 0, "train.lr": 0.1})
    finally:
        torch.set_num_threads(threads)
    return {"uri": uri, "client": MlflowClient(tracking_uri=uri), "results": results, "failed": failed,
            "running": running}


def expected(store, metric="test_acc"):
    rows = [{"cell": r["cell"], "prune.density": r["density"], "v": r["result"][metric],
             "collapsed": bool(r["result"]["collapsed_layers"])} for r in store["results"]]
    return pd.DataFrame(rows).groupby(["cell", "prune.density"]).agg(
        mean=("v", "mean"), std=("v", lambda v: np.std(v, ddof=1)), n=("v", "size"), collapsed=("collapsed", "any"))


def test_load_types_finals_and_left_out_runs(store, caplog):
    with caplog.at_level(logging.INFO, logger="analysis"):
        df = load_runs(store["uri"], ["grid"])
    assert len(df) == len(store["results"])
    assert df.attrs["left_out"] == {"FAILED": 1, "RUNNING": 1}
    assert "left out 1 FAILED, 1 RUNNING" in caplog.text
    assert {store["failed"], store["running"]}.isdisjoint(df["run_id"])
    assert set(FIELD_TYPES) <= set(df.columns) and {"cell", "run_key", "sweep"} <= set(df.columns)
    assert df["prune.density"].dtype == float and df["seed"].dtype == np.int64
    assert df["post.label_smoothing"].dtype == bool and df["model.width"].dtype == np.int64
    by_id = df.set_index("run_id")
    for r in store["results"]:
        row = by_id.loc[r["run_id"]]
        assert from_flat({k: row[k].item() if hasattr(row[k], "item") else row[k] for k in FIELD_TYPES}) == r["cfg"]
        assert row["test_acc"] == pytest.approx(r["result"]["test_acc"])  # the latest value, not epoch 1
        assert row["cell"] == r["cell"] and row["run_key"] == r["result"]["run_key"]
    everything = load_runs(store["uri"], ["grid"], statuses=["FINISHED", "FAILED", "RUNNING"])
    assert len(everything) == len(df) + 2


def _scipy_expectations(store, metric="test_acc"):
    """95 % t interval per cell and the paired t-test of base+label_smoothing against base, by seed,
    computed straight from the trainer's results with scipy."""
    from scipy import stats as st

    by = {}
    for r in store["results"]:
        by.setdefault((r["cell"], r["density"]), {})[r["seed"]] = r["result"][metric]
    ci, p = {}, {}
    for key, values in by.items():
        v = np.array([values[s] for s in SEEDS])
        ci[key] = st.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=st.sem(v)) if v.std() > 0 else (v.mean(),) * 2
    for d in DENSITIES:
        a = [by[("base+label_smoothing", d)][s] for s in SEEDS]
        b = [by[("base", d)][s] for s in SEEDS]
        diff = np.subtract(a, b)
        p[d] = st.ttest_rel(a, b).pvalue if diff.std() > 0 else (0.0 if diff[0] else 1.0)
    return ci, p


def test_table_means_ci_paired_tests_reference_and_collapse(store):
    df = load_runs(store["uri"], ["grid"])
    table = ablation_table(df)
    exp = expected(store)
    ci, p = _scipy_expectations(store)
    assert table.row_order == sorted(CELLS) and table.col_order == sorted(DENSITIES, reverse=True)
    cells = table.cells.set_index(["cell", "prune.density"])
    assert len(cells) == len(exp)
    for key, e in exp.iterrows():
        got = cells.loc[key]
        assert got["mean"] == pytest.approx(e["mean"]) and got["std"] == pytest.approx(e["std"])
        assert got["n"] == e["n"] == len(SEEDS) and got["collapsed"] == e["collapsed"]
        assert (got["ci_low"], got["ci_high"]) == pytest.approx(ci[key])
    assert exp["collapsed"].any(), "the grid should contain a collapsed layer so the marker is exercised"
    # at chance: most seeds' runs logged at_chance = 1; the grid has such cells and others
    chance = df.groupby(["cell", "prune.density"])["at_chance"].mean() > 0.5
    assert (cells["at_chance"] == chance.reindex(cells.index)).all() and chance.any() and not chance.all()
    # the reference is the only baseline, chosen by validation, unless it is at chance (then there is none);
    # the other row is tested against it
    from sparse_core.metrics import CHANCE_FACTOR

    val_chance = (df["val_acc"] < CHANCE_FACTOR * df["chance_acc"]).groupby([df["cell"], df["prune.density"]]).mean() > 0.5
    assert table.reference == {d: None if val_chance[("base", d)] else "base" for d in DENSITIES}  # read on validation
    assert None in table.reference.values() and "base" in table.reference.values()
    for d in DENSITIES:
        if table.reference[d] is None:
            assert (cells.xs(d, level=1)["mark"] == "").all() and cells.xs(d, level=1)["p_value"].isna().all()
            continue
        assert cells.loc[("base", d), "mark"] == "ref" and np.isnan(cells.loc[("base", d), "p_value"])
        got = cells.loc[("base+label_smoothing", d)]
        assert got["p_value"] == pytest.approx(p[d]) and got["p_holm"] == pytest.approx(p[d])  # one test per column
        want = "" if not p[d] < 0.05 else ("▲" if got["mean"] > cells.loc[("base", d), "mean"] else "▼")
        assert got["mark"] == want

    md = to_markdown(table).splitlines()
    assert md[0] == "| cell | 30 % | 5 % | 0.3 % |"
    for line, cell in zip(md[2:4], table.row_order):
        texts = [t.strip() for t in line.strip("|").split("|")]
        assert texts[0] == cell
        for text, density in zip(texts[1:], table.col_order):
            e, (_, hi) = exp.loc[(cell, density)], ci[(cell, density)]
            assert f"{100 * e['mean']:.2f} ± {100 * (hi - e['mean']):.2f}" in text
            assert text.startswith("**") == (cell == table.reference[density])  # bold: the reference
            assert text.endswith("†") == bool(e["collapsed"])
            assert ("(chance)" in text) == bool(chance[(cell, density)])
    text = to_markdown(table)
    assert f"n = {len(SEEDS)} seed(s) per cell" in text and "95 % confidence interval" in text
    assert "paired t-test" in text and "Holm" in text and "reference row of each column (base)" in text

    csv = pd.read_csv(io.StringIO(to_csv(table)))
    assert list(csv.columns[:2]) == ["cell", "prune.density"]
    assert {"ci_low", "ci_high", "p_value", "p_holm", "mark", "reference"} <= set(csv.columns)
    csv = csv.set_index(["cell", "prune.density"]).loc[exp.index]
    assert csv["mean"].to_numpy() == pytest.approx(exp["mean"])
    tex = to_latex(table)
    for piece in (r"\toprule", r"\midrule", r"\bottomrule", r"\textbf{", r"$\pm$", r"$^\dagger$", r"30\,\%",
                  r"base+label\_smoothing"):
        assert piece in tex
    body = "".join(line for line in tex.splitlines() if not line.startswith("%")).replace(r"\{", "").replace(r"\}", "")
    assert body.count("{") == body.count("}")


def test_stats_against_scipy_on_known_numbers():
    from scipy import stats as st

    from analysis.stats import holm, paired_test, t_interval
    a = [0.91, 0.93, 0.95, 0.90, 0.92]
    b = [0.89, 0.90, 0.94, 0.88, 0.90]
    mean, lo, hi = t_interval(a)
    assert (lo, hi) == pytest.approx(st.t.interval(0.95, 4, loc=np.mean(a), scale=st.sem(a)))
    test = paired_test(dict(enumerate(a)), dict(enumerate(b)))
    assert test.n == 5 and test.p_value == pytest.approx(st.ttest_rel(a, b).pvalue) and test.diff == pytest.approx(0.02)
    assert paired_test({0: 0.9, 1: 0.8, 7: 0.5}, {0: 0.85, 1: 0.8}).n == 2  # only seeds both rows have are paired
    assert np.isnan(paired_test({0: 0.9}, {0: 0.8}).p_value)
    assert holm([0.01, 0.04, float("nan"), 0.03]) == pytest.approx([0.03, 0.06, float("nan"), 0.06], nan_ok=True)


def test_reference_option_and_its_errors(store, capsys):
    df = load_runs(store["uri"], ["grid"])
    table = ablation_table(df, reference="base+label_smoothing")
    assert set(table.reference.values()) == {"base+label_smoothing"}
    with pytest.raises(AnalysisError, match="--reference 'nope'.*base, base\\+label_smoothing"):
        ablation_table(df, reference="nope")
    assert main(["table", "--experiment", "grid", "--mlflow-uri", store["uri"], "--reference", "nope"]) == 2
    assert "--reference 'nope'" in capsys.readouterr().err


def test_varying_axis_is_refused_and_filter_resolves_it(store, capsys):
    df = load_runs(store["uri"], ["grid", "extra"])
    with pytest.raises(AnalysisError, match=r"train\.lr.*--filter train\.lr="):
        ablation_table(df)
    filtered = ablation_table(apply_filters(df, ["train.lr=0.05"]))
    assert filtered.cells.equals(ablation_table(load_runs(store["uri"], ["grid"])).cells)
    uri = ["--mlflow-uri", store["uri"]]
    assert main(["table", "--experiment", "grid,extra", *uri]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "Traceback" not in err
    assert main(["table", "--experiment", "grid", "--experiment", "extra", *uri, "--filter", "train.lr=0.05",
                 "--format", "csv"]) == 0
    assert pd.read_csv(io.StringIO(capsys.readouterr().out))["n"].tolist() == [len(SEEDS)] * 6


@pytest.mark.parametrize("args, listed", [
    (["--experiment", "nope"], "existing experiments: Default, extra, grid"),
    (["--experiment", "grid", "--metric", "acc"], "test_acc_at_best_val"),
    (["--experiment", "grid", "--filter", "prune.dens=0.3"], "prune.density"),
    (["--experiment", "grid", "--filter", "prune.density=0.2"], "values present: 0.003, 0.05, 0.3"),
    (["--experiment", "grid", "--rows", "pruner"], "prune.pruner"),
])
def test_bad_names_exit_2_and_list_what_exists(store, capsys, args, listed):
    assert main(["table", "--mlflow-uri", store["uri"], *args]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and listed in last and "Traceback" not in err


def _check_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.std() > 0 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2


def _check_pdf(path):
    with open(path, "rb") as f:
        assert f.read(5) == b"%PDF-"


def test_plots_are_real_images(store, tmp_path):
    df = load_runs(store["uri"], ["grid"])
    files = plots.accuracy_vs_density(df, str(tmp_path / "acc"))
    files += plots.layer_density_plot(df, str(tmp_path / "layers"), 0.003)
    assert [os.path.basename(f) for f in files] == ["acc.png", "acc.pdf", "layers.png", "layers.pdf"]
    for f in files:
        (_check_png if f.endswith(".png") else _check_pdf)(f)
    assert plots.dense_reference(df, "test_acc")[0] == pytest.approx(
        np.mean([r["result"]["pre_test_acc"] for r in store["results"]]))
    with pytest.raises(AnalysisError, match="densities present: 0.003, 0.05, 0.3"):
        plots.layer_density_plot(df, str(tmp_path / "x"), 0.5)


def test_save_figure_png_is_the_tight_png_and_the_pdf_keeps_the_content(store, tmp_path, monkeypatch):
    """One tight box for both files: the PNG is byte for byte what ``bbox_inches="tight"`` writes; the PDF
    page is within a few points of its own tight box (it is laid out with other text metrics)."""
    import re

    from matplotlib.figure import Figure

    df = load_runs(store["uri"], ["grid"])
    real, tight = Figure.savefig, []

    def also_tight(fig, path, **kwargs):  # each file also as plain "tight" writes it, beside it
        tight.append(path)
        real(fig, path.replace(".p", "_tight.p"), **{**kwargs, "bbox_inches": "tight"})
        return real(fig, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", also_tight)
    files = plots.layer_density_plot(df, str(tmp_path / "layers"), 0.003)
    assert tight == files
    png, pdf = files
    assert open(png, "rb").read() == open(png.replace(".png", "_tight.png"), "rb").read()
    boxes = [[float(v) for v in re.search(rb"/MediaBox \[ ([^\]]+) \]", open(f, "rb").read()).group(1).split()]
             for f in (pdf, pdf.replace(".pdf", "_tight.pdf"))]
    assert boxes[0][2:] == pytest.approx(boxes[1][2:], abs=5.0)  # width and height in points


def test_layer_densities_by_artifact_root_equal_those_by_run_id(store):
    from analysis.load import layer_densities

    df = load_runs(store["uri"], ["grid"])
    ids = list(df["run_id"])
    fast = layer_densities(store["uri"], ids, df.attrs["artifact_uris"])
    assert set(df.attrs["artifact_uris"]) == set(ids)
    assert fast == layer_densities(store["uri"], ids) and len(fast) == len(ids)
    assert all(0 <= v <= 1 for d in fast.values() for v in d.values())


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.hrefs = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        if tag == "a":
            self.hrefs.append(a["href"])


def test_report_cli_writes_self_contained_html_and_logs_artifacts(store, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "analysis", "report", "--experiment", "grid", "--mlflow-uri",
                           store["uri"], "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "left out 1 FAILED, 1 RUNNING" in proc.stderr
    claimed = proc.stdout.split()
    names = {"table.md", "table.csv", "table.tex", "accuracy_vs_density.png", "accuracy_vs_density.pdf",
             "layer_density.png", "layer_density.pdf", "efficiency.png", "efficiency.pdf", "efficiency.md", "index.html"}
    assert {os.path.basename(p) for p in claimed} == names and all(os.path.isfile(p) for p in claimed)
    page = _Links()
    page.feed((out / "index.html").read_text())
    assert len(page.imgs) == 3
    for img in page.imgs:  # embedded, and the same bytes as the PNG beside it
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1]) == (out / img["data-file"]).read_bytes()
    assert {"table.md", "table.csv", "table.tex", "accuracy_vs_density.pdf", "layer_density.pdf"} <= set(page.hrefs)
    assert all((out / h).is_file() for h in page.hrefs)
    assert (out / "table.md").read_text() == to_markdown(ablation_table(load_runs(store["uri"], ["grid"])))

    client = store["client"]
    grid = client.get_experiment_by_name("grid").experiment_id
    runs = client.search_runs([grid], "tags.cell = 'analysis'")
    assert len(runs) == 1 and runs[0].info.run_name == "analysis" and runs[0].info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} == names
    again = load_runs(store["uri"], ["grid"])  # the analysis run is not a trial
    assert len(again) == len(store["results"]) and "analysis" not in set(again["cell"])
    assert again.attrs["left_out"] == {"FAILED": 1, "RUNNING": 1}
    assert f"cell ({again['cell'].nunique()}, what this report covers): " in (out / "index.html").read_text()
    rebuilt = report.build(store["uri"], ["grid"], str(tmp_path / "again"))["run_id"]  # replaces its run
    (only,) = client.search_runs([grid], "tags.cell = 'analysis'")
    assert only.info.run_id == rebuilt != runs[0].info.run_id
    other = report.build(store["uri"], ["grid"], str(tmp_path / "base"), filters=["cell=base"])["run_id"]
    assert {r.info.run_id for r in client.search_runs([grid], "tags.cell = 'analysis'")} == {rebuilt, other}


def test_report_refuses_before_writing_when_an_axis_varies(store, tmp_path):
    with pytest.raises(AnalysisError, match="train.lr"):
        report.build(store["uri"], ["grid", "extra"], str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_reads_the_same_runs_through_a_real_mlflow_server(store, tmp_path):
    """The http path: `mlflow server` on loopback over the same SQLite store (slow: the server takes ~10-30 s)."""
    import signal
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store["uri"],
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                time.sleep(0.5)
        over_http = load_runs(url, ["grid"])
        assert ablation_table(over_http).cells.equals(ablation_table(load_runs(store["uri"], ["grid"])).cells)
        assert over_http.attrs["left_out"] == {"FAILED": 1, "RUNNING": 1}
        files = plots.layer_density_plot(over_http, str(tmp_path / "layers"), 0.003, uri=url)
        _check_png(files[0])
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started, nothing else
        server.wait(timeout=30)


def test_dense_reference_ignores_learned_mask_pre_training():
    # a learned mask's pre-training is not plain dense training: it must not pull the line down
    import pandas as pd

    from analysis.plots import dense_reference

    df = pd.DataFrame({"mask.kind": ["none", "none", "sigmoid"], "pre_test_acc": [0.96, 0.98, 0.30],
                       "prune.density": [0.1, 0.01, 0.1], "test_acc": [0.9, 0.5, 0.2]})
    value, label = dense_reference(df, "test_acc")
    assert value == pytest.approx(0.97) and "2 runs" in label


def test_mask_density_plot_reads_the_masked_runs_histories_and_the_report_shows_it(store, tmp_path):
    """Runs of a learned mask steered to their density: their per-epoch soft / hard density and target
    come back from MLflow as logged, and the report draws them (mask_density.png)."""
    from analysis import mask_plot

    uri = store["uri"]
    exp = tracking.experiment_id(uri, "masked")
    flat = {**BASE, "mask.kind": "sigmoid", "prune.pruner": "mask", "prune.density": 0.05}
    results = {run_id: result for _, result, run_id in
               (trained_run(uri, exp, "base+mask", {**flat, "seed": s}) for s in (0, 1))}
    df = load_runs(uri, ["masked"])
    hist = mask_plot.history_frame(df, uri)
    assert set(hist["group"]) == {"kaiming init, sigmoid mask"}
    for run_id, result in results.items():
        pre = [m for m in result["history"] if m["stage"] == "pre"]
        for key in mask_plot.KEYS:
            got = hist[(hist["run_id"] == run_id) & (hist["key"] == key)].sort_values("epoch")["value"].tolist()
            assert got == pytest.approx([m[key] for m in pre])
    files = mask_plot.mask_density_plot(hist, str(tmp_path / "mask"))
    _check_png(files[0]) and _check_pdf(files[1])
    with pytest.raises(AnalysisError, match="no run has a learned mask"):
        mask_plot.history_frame(load_runs(uri, ["grid"]), uri)
    out = report.build(uri, ["masked"], str(tmp_path / "report"), log_to_mlflow=False)
    assert any(f.endswith("mask_density.png") for f in out["files"])


def test_effective_density_is_a_column_the_table_and_the_plot_can_use(store, tmp_path):
    df = load_runs(store["uri"], ["grid"])
    for r in store["results"]:  # as the trainer measured it, through MLflow
        row = df[df["run_key"] == r["result"]["run_key"]]
        assert row["effective_density"].iloc[0] == pytest.approx(r["result"]["effective_density"])
        assert 0 <= r["result"]["effective_density"] <= r["result"]["density"]
    assert "effective_density" in to_markdown(ablation_table(df, "effective_density"))
    files = plots.accuracy_vs_density(df, str(tmp_path / "eff"), x="effective_density")
    _check_png(files[0])
    with pytest.raises(AnalysisError, match="--x 'nope' is not a column"):
        plots.accuracy_vs_density(df, str(tmp_path / "x"), x="nope")


def test_a_boolean_filter_reads_booleans_as_the_config_does():
    df = pd.DataFrame({"post.soft_skip": [True, False, True], "run_id": ["a", "b", "c"]})
    assert list(apply_filters(df, ["post.soft_skip=Yes"])["run_id"]) == ["a", "c"]
    assert list(apply_filters(df, ["post.soft_skip=0"])["run_id"]) == ["b"]
    with pytest.raises(AnalysisError, match=r"post\.soft_skip=maybe: post\.soft_skip is true or false"):
        apply_filters(df, ["post.soft_skip=maybe"])


def test_a_baseline_is_known_by_its_runs_role_tag_not_its_label(tmp_path):
    """A design whose baseline has an unusual label ('magnitude-2019', role=baseline) and whose 'base' is a
    method (role=method): the table's reference is picked among the tagged baselines only (the best by
    validation, though 'base' has the better validation accuracy) and the plot draws it in the baselines'
    panel. Runs without the tag (an older store) fall back to the label rule."""
    from analysis.table import ablation_table, baseline_rule

    cells = {"magnitude-2019": ("baseline", 0.80), "rigl": ("baseline", 0.70), "base": ("method", 0.95),
             "full": ("method", 0.90)}
    df = pd.DataFrame([{"cell": c, "role": role, "prune.density": d, "seed": s, "val_acc": val + 0.01 * s,
                        "test_acc": val - 0.1 + 0.01 * s, "collapsed_layers": ""}
                       for c, (role, val) in cells.items() for d in (0.1, 0.01) for s in range(3)])
    table = ablation_table(df)
    assert table.reference == {0.1: "magnitude-2019", 0.01: "magnitude-2019"}
    assert table.baselines == ["magnitude-2019", "rigl"]
    assert plots.panels(table.row_order, lambda label: label in table.baselines)[0] == (
        "baselines", ["magnitude-2019", "rigl", "full"])  # the full pipeline drawn against the baselines
    assert plots.accuracy_vs_density(df, str(tmp_path / "acc"), table=table)
    older = df.drop(columns="role")  # no tag: 'base' and 'rigl' by their labels, the unusual label is a method
    assert ablation_table(older).reference == {0.1: "base", 0.01: "base"}
    assert [c for c in cells if baseline_rule(older)(c)] == ["rigl", "base"]
    mixed = df.assign(role=df["role"].where(df["cell"] != "base", ""))  # base's runs untagged: the label rule
    assert ablation_table(mixed).reference == {0.1: "base", 0.01: "base"}
