"""The end of a sweep: what happened, in percent, and where to look next.

Per density: the best cell by mean *validation* accuracy over its FINISHED seeds (selection never
looks at test accuracy), shown with its mean test accuracy; the cells where a seed ended with a
collapsed layer (a layer with no weight left); then the commands that open the MLflow UI on this
store and rebuild the report. The report itself (``analysis.report.build``: tables, plots and
index.html, also logged to MLflow as a run named ``analysis``) is written to ``reports/<sweep>/``
beside a SQLite store (beside the current directory for a tracking server). Knows no Ray.
"""

from __future__ import annotations

import math
import os
import shlex
import statistics

import runstore

from . import tracking

REPORTS = "reports"  # folder beside the store that holds one report folder per sweep


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def rows(trials, uri: str, experiment: str) -> list[dict]:
    """One row per (cell, density) of ``trials``: FINISHED seeds, mean val/test accuracy, collapsed seeds."""
    finished = tracking.finished_by_run_key(uri, experiment)
    groups: dict[tuple[str, float], list] = {}
    for t in trials:
        groups.setdefault((t.cell, t.density), []).append(finished.get(t.run_key))
    out = []
    for (cell, density), runs in groups.items():
        done = [runstore.final_metrics(r.data.metrics) for r in runs if r is not None]
        out.append({"cell": cell, "density": density, "finished": len(done), "seeds": len(runs),
                    "val_acc": _mean(m.get("val_acc") for m in done),
                    "test_acc": _mean(m.get("test_acc") for m in done),
                    "collapsed": sum(m.get("n_collapsed_layers", 0) > 0 for m in done)})
    return out


def best_by_density(table: list[dict]) -> dict[float, dict | None]:
    """density -> the row with the highest mean val_acc (None when no cell has one)."""
    out: dict[float, dict | None] = {}
    for r in table:
        best = out.get(r["density"])
        if math.isfinite(r["val_acc"]) and (best is None or r["val_acc"] > best["val_acc"]):
            out[r["density"]] = r
        else:
            out.setdefault(r["density"], None)
    return out


def _pct(value: float) -> str:
    return f"{100 * value:.2f}" if math.isfinite(value) else "-"


def _density(d: float) -> str:
    return f"{100 * d:g} %"


def report_dir(uri: str, sweep: str) -> str:
    path = runstore.sqlite_path(uri)
    base = os.path.dirname(path) if path else os.getcwd()
    safe = "".join(ch if ch.isalnum() or ch in "-_.=+" else "_" for ch in sweep)
    return os.path.join(base, REPORTS, safe)


def report_command(uri: str, experiment: str, sweep: str, out: str) -> str:
    return " ".join(["python -m analysis report", "--experiment", shlex.quote(experiment), "--mlflow-uri",
                     shlex.quote(uri), "--filter", shlex.quote(f"sweep={sweep}"), "--out", shlex.quote(out)])


def write_report(uri: str, experiment: str, sweep: str, out: str) -> tuple[list[str], str | None, str | None]:
    """(files, MLflow run id, None) or ([], None, why not): the report of this sweep's FINISHED runs."""
    from mlflow.exceptions import MlflowException

    from analysis.load import AnalysisError
    from analysis.report import build

    try:
        result = build(uri, [experiment], out, filters=[f"sweep={sweep}"])
    except (AnalysisError, MlflowException, OSError) as e:
        return [], None, str(getattr(e, "message", e))
    return result["files"], result["run_id"], None


def lines(table: list[dict], *, uri: str, exp_id: str, experiment: str, sweep: str, report: str | None,
          report_error: str | None = None) -> list[str]:
    """The summary printed at the end of a sweep (``report``: the report folder, None if not written)."""
    out = [f"summary of sweep {sweep!r} (accuracy in %, mean over FINISHED seeds; best = highest mean validation "
           f"accuracy, shown with its test accuracy; not a significance claim: the report's table has the 95 % "
           f"intervals and the paired tests):"]
    best = best_by_density(table)
    for density in sorted(best, reverse=True):
        row = best[density]
        if row is None:
            pick = "no cell has a validation accuracy yet"
        else:
            pick = (f"best {row['cell']}: val {_pct(row['val_acc'])}, test {_pct(row['test_acc'])} "
                    f"({row['finished']}/{row['seeds']} seeds)")
        collapsed = [f"{r['cell']} ({r['collapsed']}/{r['finished']})" for r in table
                     if r["density"] == density and r["collapsed"]]
        out.append(f"  density {_density(density)}: {pick}"
                   + (f"; collapsed layers in {', '.join(collapsed)}" if collapsed else ""))
    missing = sum(r["seeds"] - r["finished"] for r in table)
    if missing:
        out.append(f"  {missing} of {sum(r['seeds'] for r in table)} trials have no FINISHED run (failed or "
                   f"interrupted): not in these means")
    command, url = runstore.ui_link(uri, exp_id)
    out.append("look at it:")
    if command:
        out.append(f"  MLflow UI:  {command}")
        out.append(f"              then open {url}")
    else:
        out.append(f"  MLflow UI:  {url}")
    folder = report or report_dir(uri, sweep)
    if report:
        out.append(f"  report:     {os.path.join(report, 'index.html')} (also in MLflow: run 'analysis')")
    elif report_error:
        out.append(f"  report:     not written ({report_error})")
    out.append(f"  {'rebuild it' if report else 'build it'}: {report_command(uri, experiment, sweep, folder)}")
    return out
