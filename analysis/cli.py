"""``python -m analysis {table,plot,report}``: ablation tables, plots and an HTML report from MLflow.

Bad input (an unknown experiment, metric or key; an axis that would be averaged over) prints one
``error:`` line listing what exists and exits 2; progress and counts go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sqlite3
import sys

from mlflow.exceptions import MlflowException

from runstore import TrackingError, check_reachable, resolve_tracking_uri, unwritable
from sparse_core.cli import OneLineParser

from .load import AnalysisError, apply_filters, load_runs, split_names
from .table import EXTENSIONS, FORMATS


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--experiment", action="append", required=True, metavar="NAME",
                   help="MLflow experiment to read (repeatable, or a comma list)")
    p.add_argument("--mlflow-uri", metavar="URI",
                   help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--metric", default="test_acc", help="final metric to tabulate/plot (default: test_acc)")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs with KEY=VALUE (repeatable; the same key twice keeps either value); sweep=NAME "
                        "keeps the sweep's runs, those it found FINISHED by another sweep included")
    p.add_argument("--rows", default="cell", help="column that makes the table rows / plot lines (default: the cell tag)")
    p.add_argument("--status", action="append", metavar="STATUS",
                   help="run statuses to include (repeatable or comma list; default: FINISHED)")
    p.add_argument("--reference", metavar="ROW",
                   help="row every cell is tested against (paired t-test by seed); default: per column, the "
                        "baseline (base, pruner=*, gmp, rigl) with the best mean validation accuracy")
    p.add_argument("--include-search", action="store_true",
                   help="also use the runs of Optuna searches (cell 'optuna'), left out by default")
    return p


def parser() -> argparse.ArgumentParser:
    main = OneLineParser(prog="python -m analysis", description="Ablation tables, plots and an HTML report from MLflow runs.")
    sub = main.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", parents=[_common()], help="ablation table: mean and 95 %% CI over seeds, paired tests against a reference row")
    t.add_argument("--cols", default="prune.density", help="column that makes the table columns (default: prune.density)")
    t.add_argument("--format", choices=list(FORMATS), help="markdown (default), csv or latex (booktabs)")
    t.add_argument("--out", metavar="FILE", help="write here instead of stdout (format inferred from .md/.csv/.tex)")
    p = sub.add_parser("plot", parents=[_common()], help="accuracy vs density, per-layer density, size and latency vs density (PNG + PDF)")
    p.add_argument("--out", default="plots", metavar="DIR", help="output folder (default: plots)")
    p.add_argument("--x", default="prune.density", metavar="COLUMN",
                   help="x axis of the accuracy plot: prune.density (default) or a per-run column such as "
                        "effective_density (weights on an input-to-output path)")
    p.add_argument("--layer-density", type=float, metavar="D",
                   help="density for the per-layer plot (default: the lowest below 1)")
    r = sub.add_parser("report", parents=[_common()], help="tables + plots + index.html, logged to MLflow")
    r.add_argument("--cols", default="prune.density", help="table columns (default: prune.density)")
    r.add_argument("--out", default="report", metavar="DIR", help="output folder (default: report)")
    r.add_argument("--layer-density", type=float, metavar="D",
                   help="density for the per-layer plot (default: the lowest below 1, the density the "
                        "sweep summary leads with)")
    r.add_argument("--no-mlflow-log", action="store_true", help="do not log the files to an 'analysis' MLflow run")
    return main


def _table(args, uri: str, experiments: list[str], statuses: list[str]) -> None:
    from .table import ablation_table

    fmt = args.format
    if fmt is None and args.out:
        fmt = {ext: name for name, ext in EXTENSIONS.items()}.get(os.path.splitext(args.out)[1].lstrip("."))
    df = apply_filters(load_runs(uri, experiments, statuses, args.include_search), args.filter)
    text = FORMATS[fmt or "markdown"](ablation_table(df, args.metric, args.rows, args.cols, args.reference))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def _plot(args, uri: str, experiments: list[str], statuses: list[str]) -> None:
    from . import efficiency, plots

    df = apply_filters(load_runs(uri, experiments, statuses, args.include_search), args.filter)
    files = plots.accuracy_vs_density(df, os.path.join(args.out, "accuracy_vs_density"), args.metric, args.rows,
                                      x=args.x)
    files += plots.layer_density_plot(df, os.path.join(args.out, "layer_density"), args.layer_density, args.rows, uri)
    files += efficiency.write(df, args.out)  # size and latency vs density ([] for runs without the figures)
    for path in files:
        print(path)


def _report(args, uri: str, experiments: list[str], statuses: list[str]) -> None:
    from . import report

    result = report.build(uri, experiments, args.out, args.metric, args.rows, args.cols, args.filter, statuses,
                          args.layer_density, log_to_mlflow=not args.no_mlflow_log,
                          include_search=args.include_search, reference=args.reference)
    for path in result["files"]:
        print(path)
    if result["run_id"]:
        print(f"MLflow run 'analysis': {result['run_id']}", file=sys.stderr)


class _Stderr(logging.Handler):
    """Plain lines on whatever sys.stderr is at the time (main() may run many times in one process)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(record.getMessage(), file=sys.stderr)


def _check_inputs(args, uri: str) -> None:
    """A SQLite file that is not MLflow's database, and an ``--out`` that cannot be written, as one
    ``AnalysisError`` line each."""
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    if path is not None:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as e:
            raise AnalysisError(f"{path} is not an SQLite database ({e}): pass the MLflow database with "
                                f"--mlflow-uri sqlite:///PATH") from None
        if "experiments" not in tables or "runs" not in tables:
            raise AnalysisError(f"{path} is an SQLite database but not MLflow's (no experiments/runs tables): pass "
                                f"the MLflow database with --mlflow-uri sqlite:///PATH")
    if args.out:
        why = unwritable(args.out, directory=args.command != "table")
        if why:
            raise AnalysisError(f"--out {args.out}: {why}; pass another --out")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logger = logging.getLogger("analysis")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
        logger.setLevel(logging.INFO)
    experiments = split_names(args.experiment)
    statuses = [s.upper() for s in split_names(args.status)] or ["FINISHED"]
    uri = args.mlflow_uri
    try:
        uri = resolve_tracking_uri(args.mlflow_uri)  # the sweeps' order: flag, $MLFLOW_TRACKING_URI, sqlite:///mlflow.db
        check_reachable(uri)  # seconds, not MLflow's minutes of retries, for a server that is down
        if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
            raise AnalysisError(f"no MLflow database at {uri}: pass --mlflow-uri or set MLFLOW_TRACKING_URI")
        _check_inputs(args, uri)  # before the loading, which takes a while on a big store
        {"table": _table, "plot": _plot, "report": _report}[args.command](args, uri, experiments, statuses)
    except (AnalysisError, TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MlflowException as e:
        print(f"error: MLflow at {uri}: {e.message}", file=sys.stderr)
        return 1
    return 0
