"""The end of a sweep: what happened, in percent, with its uncertainty, and where to look next.

Per density (lowest first, where the methods differ): the reference, the best baseline of the design by
mean *validation* accuracy over its FINISHED seeds (selection never looks at test accuracy; a cell at
chance is never the reference), with its mean test accuracy and 95 % confidence interval; the cells
significantly better or worse than it (a paired t-test over seeds, Holm-corrected per density: the
report's own statistics, ``analysis.table.ablation_table``); the cells at chance, named; the cells where
a seed ended with a collapsed layer. Then the commands that open the MLflow UI on this store and
rebuild the report. The report itself (``analysis.report.build``: tables, plots and index.html, also
logged to MLflow as a run named ``analysis``) is written to ``reports/<sweep>/`` beside a SQLite store
(beside the current directory for a tracking server). Knows no Ray.
"""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass, field

import pandas as pd

import runstore

from . import tracking

REPORTS = "reports"  # folder beside the store that holds one report folder per sweep
_COLUMNS = ("cell", "prune.density", "seed", "val_acc", "test_acc", "n_collapsed_layers", "at_chance", "chance_acc")


@dataclass
class Outcome:
    """The FINISHED runs of a sweep's trials, one row each, and what is missing."""
    frame: pd.DataFrame  # columns _COLUMNS
    trials: int  # trials planned
    densities: tuple = ()  # every density planned
    baselines: tuple = ()  # the design's baseline cells (the reference is one of them)
    scope: str = ""  # what the sweep covers, e.g. "all 18 cells of design 'leave-one-out'"
    seeds: dict = field(default_factory=dict)  # (cell, density) -> seeds planned


def rows(trials, uri: str, experiment: str, baselines=(), scope: str = "") -> Outcome:
    """The FINISHED run of each of ``trials`` (by run_key, whichever sweep trained it) as one row."""
    finished = tracking.finished_by_run_key(uri, experiment)
    out, seeds = [], {}
    for t in trials:
        seeds[(t.cell, t.density)] = seeds.get((t.cell, t.density), 0) + 1
        run = finished.get(t.run_key)
        if run is not None:
            m = runstore.final_metrics(run.data.metrics, run.data.tags)  # full precision
            out.append({"cell": t.cell, "prune.density": t.density, "seed": t.seed, "val_acc": m.get("val_acc", math.nan),
                        "test_acc": m.get("test_acc", math.nan), "n_collapsed_layers": m.get("n_collapsed_layers", 0.0),
                        "at_chance": m.get("at_chance", math.nan), "chance_acc": m.get("chance_acc", math.nan)})
    return Outcome(pd.DataFrame(out, columns=list(_COLUMNS)), len(trials),
                   tuple(sorted({t.density for t in trials})), tuple(baselines), scope, seeds)


def scope_text(design: str, chosen: list[str], every: list[str], how: str = "") -> str:
    """What a sweep covers: all cells of its design, or which of them (``how``: where the subset comes from)."""
    if set(chosen) >= set(every):
        return f"all {len(every)} cells of design {design!r}"
    return f"{len(chosen)} of the {len(every)} cells of design {design!r}{f' ({how})' if how else ''}: {', '.join(chosen)}"


def _pct(value: float) -> str:
    return f"{100 * value:.2f}" if math.isfinite(value) else "-"


def _density(d: float) -> str:
    return f"{100 * d:g} %"


def _value(cell) -> str:
    """ "91.39 ± 1.20" (mean ± 95 % CI half-width, in %), or the mean alone with one seed."""
    text = _pct(cell["mean"])
    return text + (f" ± {_pct(cell['ci_high'] - cell['mean'])}" if math.isfinite(cell["ci_high"]) else "")


def _table(outcome: Outcome):
    """analysis.table's Table of test accuracy by cell and density (None when no run has finished)."""
    from analysis.table import ablation_table  # the report's CI and paired test: one implementation

    df = outcome.frame.dropna(subset=["test_acc"])
    if df.empty:
        return None
    base = set(outcome.baselines)
    if not base:
        return ablation_table(df, "test_acc", "cell", "prune.density")
    return ablation_table(df, "test_acc", "cell", "prune.density", baseline=lambda label: label in base)


def density_lines(outcome: Outcome, table, density: float) -> list[str]:
    """The lines of one density: reference, better / worse / not distinguishable, at chance, collapsed."""
    from analysis.table import BETTER, WORSE

    cells = table.cells[(table.cells["prune.density"] == density) & (table.cells["n"] > 0)]
    if cells.empty:
        return [f"  density {_density(density)}: no FINISHED run"]
    ref = table.reference.get(density)
    chance = list(cells.loc[cells["at_chance"], "cell"])
    if ref is None:
        head = "no reference: every baseline is at chance or has no validation accuracy"
    else:
        r = cells[cells["cell"] == ref].iloc[0]
        lo, hi = r["ci_low"], r["ci_high"]
        ci = f", 95 % CI {_pct(lo)}-{_pct(hi)}" if math.isfinite(hi) else " (one seed: no CI, no paired test)"
        head = f"reference {ref}: test {_value(r)}{ci}, {int(r['n'])}/{outcome.seeds.get((ref, density), r['n'])} seeds"
    out = [f"  density {_density(density)}: {head}"]
    for mark, word in ((BETTER, "better"), (WORSE, "worse")):
        hit = cells[(cells["mark"] == mark) & ~cells["at_chance"]].sort_values("mean", ascending=False)
        if len(hit):
            out.append(f"    {word}: " + ", ".join(f"{c['cell']} {_value(c)}" for _, c in hit.iterrows()))
    same = cells[(cells["mark"] == "") & ~cells["at_chance"] & cells["p_holm"].notna()]
    if len(same):
        out.append("    not distinguishable: " + ", ".join(same.sort_values("mean", ascending=False)["cell"]))
    untested = cells[(cells["mark"] == "") & ~cells["at_chance"] & cells["p_holm"].isna()]
    if ref is not None and len(untested):
        out.append("    not tested (fewer than 2 paired seeds): " + ", ".join(
            f"{c['cell']} {_value(c)}" for _, c in untested.sort_values("mean", ascending=False).iterrows()))
    if chance:
        out.append(f"    at chance: {', '.join(chance)}")
    frame = outcome.frame[outcome.frame["prune.density"] == density]
    collapsed = frame.groupby("cell")["n_collapsed_layers"].apply(lambda v: int((v > 0).sum()))
    if collapsed.any():
        out.append("    collapsed layers in " + ", ".join(
            f"{c} ({k}/{int((frame['cell'] == c).sum())})" for c, k in collapsed.items() if k))
    return out


def report_dir(uri: str, sweep: str) -> str:
    path = runstore.sqlite_path(uri)
    base = os.path.dirname(path) if path else os.getcwd()
    safe = "".join(ch if ch.isalnum() or ch in "-_.=+" else "_" for ch in sweep)
    return os.path.join(base, REPORTS, safe)


def report_command(uri: str, experiment: str, sweep: str, out: str, cells: list[str] | None = None) -> str:
    filters = [f"sweep={sweep}"] + [f"cell={c}" for c in cells or ()]
    return " ".join(["python -m analysis report", "--experiment", shlex.quote(experiment), "--mlflow-uri",
                     shlex.quote(uri), *(f"--filter {shlex.quote(f)}" for f in filters), "--out", shlex.quote(out)])


def write_report(uri: str, experiment: str, sweep: str, out: str,
                 cells: list[str] | None = None) -> tuple[list[str], str | None, str | None]:
    """(files, MLflow run id, None) or ([], None, why not): the report of this sweep's FINISHED runs
    (of ``cells`` only, when given: a --cells sweep reports what it covers)."""
    from mlflow.exceptions import MlflowException

    from analysis.load import AnalysisError
    from analysis.report import build

    try:
        result = build(uri, [experiment], out, filters=[f"sweep={sweep}"] + [f"cell={c}" for c in cells or ()])
    except (AnalysisError, MlflowException, OSError) as e:
        return [], None, str(getattr(e, "message", e))
    return result["files"], result["run_id"], None


def header(outcome: Outcome, sweep: str) -> list[str]:
    base = ", ".join(outcome.baselines) or "base, gmp, rigl, pruner=*"
    return [f"summary of sweep {sweep!r}" + (f", {outcome.scope}" if outcome.scope else "") + ":",
            "  test accuracy in %: mean ± half-width of the 95 % CI over FINISHED seeds. reference: the best "
            f"baseline ({base}) by mean validation accuracy, never one at chance on validation. better / worse: paired t-test "
            "over seeds against it, Holm-corrected per density, p < 0.05, as in the report's table"]


def lines(outcome: Outcome, *, uri: str, exp_id: str, experiment: str, sweep: str, report: str | None,
          report_error: str | None = None, cells: list[str] | None = None) -> list[str]:
    """The summary printed at the end of a sweep (``report``: the report folder, None if not written;
    ``cells``: the --cells subset the report was filtered to)."""
    out = header(outcome, sweep)
    table = _table(outcome)
    for density in sorted(outcome.densities):
        out += density_lines(outcome, table, density) if table is not None else [
            f"  density {_density(density)}: no FINISHED run"]
    missing = outcome.trials - len(outcome.frame)
    if missing:
        out.append(f"  {missing} of {outcome.trials} trials have no FINISHED run (failed or interrupted): not in "
                   f"these means")
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
    out.append(f"  {'rebuild it' if report else 'build it'}: {report_command(uri, experiment, sweep, folder, cells)}")
    return out
