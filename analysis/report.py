"""One folder with the tables, the plots and a self-contained index.html, also logged to MLflow.

index.html embeds its images as base64 (it works copied alone) and links the PDF, CSV, LaTeX and
Markdown files beside it by relative paths (they work when the folder is copied). The files are
logged as artifacts of a run named "analysis" tagged cell=analysis, which the loader skips.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import logging
import os

import pandas as pd

import sparse_core
from runstore import client as store_client
from runstore import claim_alive_here, mark_training_experiment, this_claim

from . import efficiency, mask_plot, plots
from .load import ANALYSIS_CELL, AnalysisError, apply_filters, experiment_ids, load_runs
from .table import EXTENSIONS, FORMATS, REF, Table, ablation_table, cell_parts, col_label, grid, notes, uniform_n

log = logging.getLogger("analysis")


def _html_table(table: Table) -> str:
    per_cell_n = not uniform_n(table)
    head = "".join(f"<th>{html.escape(col_label(table.cols, c))}</th>" for c in table.col_order)
    body = []
    for r, cells in grid(table):
        tds = []
        for cell in cells:
            text, suffix = (html.escape(s) for s in cell_parts(table, cell, per_cell_n))
            tds.append(f"<td>{f'<b>{text}</b>' if cell['mark'] == REF else text}{suffix}</td>")
        body.append(f"<tr><th>{html.escape(str(r))}</th>{''.join(tds)}</tr>")
    return (f"<table><thead><tr><th>{html.escape(table.rows)}</th>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _figure(out: str, paths: list[str], caption: str) -> str:
    png, pdf = (os.path.basename(p) for p in paths)
    with open(os.path.join(out, png), "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}" data-file="{png}">'
            f'<figcaption>{html.escape(caption)} (<a href="{png}">PNG</a>, <a href="{pdf}">PDF</a>)</figcaption></figure>')


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}th,td{padding:.3em .8em;border-bottom:1px solid #ccc}"
        "td{text-align:right;font-variant-numeric:tabular-nums}thead th{border-bottom:2px solid #444}"
        "img{max-width:100%}figure{margin:1.5em 0}.meta{color:#555;font-size:.9em}")


def build(uri: str, experiments: list[str], out: str, metric: str = "test_acc", rows: str = "cell",
          cols: str = "prune.density", filters: list[str] | None = None, statuses=("FINISHED",),
          layer_density: float | None = None, log_to_mlflow: bool = True, include_search: bool = False,
          reference=None) -> dict:
    """Write the report into ``out``; returns {"files": [...], "run_id": analysis run id or None}."""
    df = apply_filters(load_runs(uri, experiments, statuses, include_search), filters)
    table = ablation_table(df, metric, rows, cols, reference)  # bad input raises before any file is written
    density = plots.pick_density(df, layer_density)
    os.makedirs(out, exist_ok=True)
    files = []
    for fmt, render in FORMATS.items():
        path = os.path.join(out, f"table.{EXTENSIONS[fmt]}")
        with open(path, "w") as f:
            f.write(render(table))
        files.append(path)
    figures = []
    if cols == plots.DENSITY:
        paths = plots.accuracy_vs_density(df, os.path.join(out, "accuracy_vs_density"), metric, rows,
                                          reference=reference, table=table)  # the table above: cols == DENSITY
        figures.append(_figure(out, paths, f"{metric} vs density, one line per {rows}"))
        files += paths
    else:
        log.info("no accuracy-vs-density plot: the columns are %s, not %s", cols, plots.DENSITY)
    try:
        paths = plots.layer_density_plot(df, os.path.join(out, "layer_density"), density, rows, uri,
                                         plots.cell_styles(table.row_order))  # the accuracy plot's colours
        figures.append(_figure(out, paths, f"per-layer density at density {100 * density:g} % (--layer-density; "
                                             f"default the lowest, where the summary starts), one series per {rows}"))
        files += paths
    except AnalysisError as e:  # no layer_density.json artifacts: the rest of the report still stands
        log.warning("no per-layer density plot: %s", e)
    if not mask_plot.masked_runs(df).empty:
        paths = mask_plot.mask_density_plot(mask_plot.history_frame(df, uri), os.path.join(out, "mask_density"))
        figures.append(_figure(out, paths, "learned mask: soft and hard density against the target over pre-training"))
        files += paths
    paths = efficiency.write(df, out)  # [] (and a warning) for runs without size/latency figures
    if paths:
        figures.append(_figure(out, paths[:2], "model file size and CPU inference latency vs density (sparse / dense); "
                                               "table: efficiency.md"))
        files += paths
    run_id = None
    client = store_client(uri)
    tags = _tags(experiments, metric, rows, cols, filters, len(df))
    if log_to_mlflow:
        run_id = _open_run(client, experiments[0], tags)
    try:
        index = os.path.join(out, "index.html")
        with open(index, "w") as f:
            f.write(_page(df, table, figures, files, uri, experiments, filters, run_id))
        files.append(index)
        if run_id is not None:
            client.log_artifacts(run_id, out)
            client.set_terminated(run_id)
            _replace_older(client, run_id, tags[SCOPE_TAG])
            log.info("logged %d files to run %s (name 'analysis') in experiment %r", len(files), run_id, experiments[0])
    except BaseException as e:  # interrupted (Ctrl-C, SIGTERM) or failed: the report's run never stays RUNNING
        if run_id is not None:
            _end_run(client, run_id, "FAILED" if isinstance(e, Exception) else "KILLED", f"{type(e).__name__}: {e}")
        raise
    return {"files": files, "run_id": run_id}


SCOPE_TAG = "analysis.scope"  # experiments | metric | rows | cols | filters: one report run per scope


def _tags(experiments: list[str], metric: str, rows: str, cols: str, filters, runs: int) -> dict:
    return {"cell": ANALYSIS_CELL, "analysis.metric": metric, "analysis.rows": rows, "analysis.cols": cols,
            "analysis.filters": " ".join(filters or []), "analysis.experiments": ",".join(experiments),
            "analysis.runs": str(runs), "sparse_core_version": sparse_core.__version__,
            SCOPE_TAG: " | ".join([",".join(experiments), metric, rows, cols, " ".join(sorted(filters or []))])}


def _replace_older(client, run_id: str, scope: str) -> None:
    """Delete the earlier finished report runs of the same scope: a rebuilt report replaces its run."""
    exp_id = client.get_run(run_id).info.experiment_id
    old = client.search_runs([exp_id], f"tags.cell = '{ANALYSIS_CELL}' and attributes.status != 'RUNNING'",
                             max_results=1000)
    for run in old:
        if run.info.run_id != run_id and run.data.tags.get(SCOPE_TAG) == scope:
            client.delete_run(run.info.run_id)
            log.info("deleted the earlier report run %s of the same scope", run.info.run_id)


STALE_ELSEWHERE_S = 3600.0  # a RUNNING report run made on another host counts as abandoned after this


def _open_run(client, experiment: str, tags: dict) -> str:
    """The report's run, claimed by this process; report runs whose process is gone (killed while it
    logged them) are closed first, so none stays RUNNING."""
    exp_id = experiment_ids(client, [experiment])[experiment]
    mark_training_experiment(client, client.get_experiment(exp_id))  # opens in the UI's training view
    running = client.search_runs([exp_id], f"tags.cell = '{ANALYSIS_CELL}' and attributes.status = 'RUNNING'",
                                 max_results=1000)
    now_ms = dt.datetime.now().timestamp() * 1000
    for run in running:
        alive = claim_alive_here(run.data.tags.get("claimed_by", ""))
        if alive is False or (alive is None and now_ms - (run.info.start_time or 0) > STALE_ELSEWHERE_S * 1000):
            _end_run(client, run.info.run_id, "KILLED", "the report's process ended before it finished this run")
    return client.create_run(exp_id, run_name="analysis", tags={**tags, "claimed_by": this_claim()}).info.run_id


def _end_run(client, run_id: str, status: str, reason: str) -> None:
    try:
        client.set_tag(run_id, "error", reason[:4000])
        client.set_terminated(run_id, status)
    except Exception as e:  # noqa: BLE001 - the error that ended the report matters more
        log.warning("could not close the report's run %s: %s", run_id, e)


def _page(df: pd.DataFrame, table: Table, figures: list[str], files: list[str], uri: str, experiments: list[str],
          filters: list[str] | None, run_id: str | None) -> str:
    left = df.attrs.get("left_out", {})
    meta = [f"experiment(s): {', '.join(experiments)}", f"tracking URI: {uri}", f"runs: {len(df)}"
            + (" (left out: " + ", ".join(f"{n} {k}" for k, n in sorted(left.items())) + ")" if left else ""),
            f"filters: {' '.join(filters) if filters else 'none'}",
            f"{table.rows} ({len(table.row_order)}, what this report covers): {', '.join(map(str, table.row_order))}",
            f"generated {dt.datetime.now().isoformat(timespec='seconds')} by sparse_core {sparse_core.__version__}"]
    if run_id:
        meta.append(f"MLflow run: {run_id} (name 'analysis')")
    links = " · ".join(f'<a href="{os.path.basename(p)}">{os.path.basename(p)}</a>' for p in files
                       if p.endswith((".md", ".csv", ".tex")))
    note_html = "".join(f"<p>{html.escape(n)}</p>" for n in notes(table))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Analysis: {html.escape(', '.join(experiments))}"
            f"</title><style>{_CSS}</style></head><body><h1>Ablation: {html.escape(', '.join(experiments))}</h1>"
            f"<ul class='meta'>{''.join(f'<li>{html.escape(m)}</li>' for m in meta)}</ul>"
            f"<h2>{html.escape(table.metric)} by {html.escape(table.rows)} and {html.escape(table.cols)}</h2>"
            f"{_html_table(table)}{note_html}<p>Table files: {links}</p><h2>Plots</h2>{''.join(figures)}"
            f"</body></html>\n")

