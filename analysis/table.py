"""Ablation table: variants x densities, mean ± std of a final metric over seeds.

The subtle point: a mean over seeds is only a mean over seeds if nothing else varies inside a
(row, column) group. ``check_axes`` refuses to average over any other config key that varies there
and names it, so a stray learning-rate trial never hides inside a "seed average".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from sparse_core.config import FIELD_TYPES, NOT_IDENTITY

from .load import AnalysisError, metric_columns

SEED = "seed"
DAGGER = "†"
# Settings that never change a result (where a run ran, how it was tested): the keys run_key leaves out.
IGNORED_AXES = NOT_IDENTITY  # settings that never change a result (where it ran, test hooks)
_LOWER_IS_BETTER = ("loss", "seconds", "flops", "collapsed")


def check_key(df: pd.DataFrame, key: str, option: str) -> None:
    if key not in df.columns:
        raise AnalysisError(f"{option} {key!r} is not a column; valid: {', '.join(map(str, df.columns))}")


def check_metric(df: pd.DataFrame, metric: str) -> None:
    metrics = metric_columns(df)
    if metric not in metrics:
        raise AnalysisError(f"--metric {metric!r} is not a metric of these runs; metrics: {', '.join(sorted(metrics))}")


def check_axes(df: pd.DataFrame, group_by: list[str]) -> None:
    """Raise if a config key other than ``group_by`` and the seed varies within one group."""
    keys = [k for k in FIELD_TYPES if k in df.columns and k not in group_by and k != SEED and k not in IGNORED_AXES]
    counts = df.groupby(group_by, dropna=False)[keys].nunique(dropna=False)
    varying = [k for k in keys if (counts[k] > 1).any()]
    if not varying:
        return
    where = []
    for key in varying:
        group = counts.index[counts[key] > 1][0]
        group = group if isinstance(group, tuple) else (group,)
        inside = df
        for col, value in zip(group_by, group):
            inside = inside[inside[col] == value]
        values = ", ".join(map(str, sorted(inside[key].unique())))
        label = ", ".join(f"{c}={v}" for c, v in zip(group_by, group))
        where.append(f"{key} (e.g. within {label}: {values})")
    example = df[varying[0]].mode().iloc[0]  # the most common value: usually the one the sweep meant
    raise AnalysisError(
        f"refusing to average over config key(s) that vary within a ({', '.join(group_by)}) group but are not "
        f"the rows, columns or seed: {'; '.join(where)}. Keep one value with --filter, e.g. "
        f"--filter {varying[0]}={example}, or make it an axis (--rows {varying[0]})")


def is_percent(metric: str) -> bool:
    return metric.endswith("acc")


def higher_is_better(metric: str) -> bool:
    return not any(word in metric for word in _LOWER_IS_BETTER)


@dataclass
class Table:
    cells: pd.DataFrame  # one row per (row, col): mean, std, n, seeds, collapsed, best (metric units)
    rows: str
    cols: str
    metric: str
    row_order: list
    col_order: list


def ablation_table(df: pd.DataFrame, metric: str = "test_acc", rows: str = "cell", cols: str = "prune.density") -> Table:
    check_metric(df, metric)
    check_key(df, rows, "--rows")
    check_key(df, cols, "--cols")
    if rows == cols:
        raise AnalysisError(f"--rows and --cols are both {rows!r}")
    check_axes(df, [rows, cols])
    data = df.assign(_collapsed=collapsed_flags(df))
    cells = []
    for (r, c), g in data.groupby([rows, cols], sort=False):
        values = g[metric].dropna()
        cells.append({rows: r, cols: c, "metric": metric, "mean": values.mean() if len(values) else math.nan,
                      "std": values.std(ddof=1) if len(values) > 1 else math.nan, "n": len(values),
                      "seeds": ";".join(str(s) for s in sorted(g.loc[values.index, SEED])),
                      "collapsed": bool(g["_collapsed"].any())})
    cells = pd.DataFrame(cells)
    best = cells.groupby(cols)["mean"].transform("max" if higher_is_better(metric) else "min")
    cells["best"] = cells["mean"].notna() & (cells["mean"] == best)
    col_order = sorted(cells[cols].unique(), reverse=cols == "prune.density")  # the field reads 10 % -> 0.1 %
    row_order = sorted(cells[rows].unique(), key=str)
    cells = cells.set_index([rows, cols]).reindex(pd.MultiIndex.from_product([row_order, col_order], names=[rows, cols]))
    cells = cells.reset_index()
    cells["n"] = cells["n"].fillna(0).astype(int)
    cells["best"] = cells["best"].fillna(False).astype(bool)
    cells["collapsed"] = cells["collapsed"].fillna(False).astype(bool)
    cells["metric"] = metric
    return Table(cells, rows, cols, metric, row_order, col_order)


def collapsed_flags(df: pd.DataFrame) -> pd.Series:
    """True where a run ended with at least one layer that has no weight left: the n_collapsed_layers
    metric where a run has it, else the collapsed_layers tag (comma-separated names, empty if none)."""
    tag = df["collapsed_layers"] if "collapsed_layers" in df.columns else pd.Series("", index=df.index)
    from_tag = tag.map(lambda v: isinstance(v, str) and v.strip() != "").astype(bool)
    if "n_collapsed_layers" not in df.columns:
        return from_tag
    n = df["n_collapsed_layers"]
    return (n > 0).where(n.notna(), from_tag).astype(bool)


# ---- output --------------------------------------------------------------------------------------
def col_label(cols: str, value) -> str:
    if cols == "prune.density":
        return f"{100 * value:g} %"
    return f"{cols}={value}"


def _number(table: Table, value: float) -> str:
    return f"{100 * value:.2f}" if is_percent(table.metric) else f"{value:.4g}"


def cell_parts(table: Table, cell: pd.Series, per_cell_n: bool) -> tuple[str, str]:
    """(value text, suffix) e.g. ("91.23 ± 0.45", " (n=2)†")."""
    if cell["n"] == 0:
        return "–", ""
    text = _number(table, cell["mean"])
    if cell["n"] > 1:
        text += f" ± {_number(table, cell['std'])}"
    suffix = f" (n={cell['n']})" if per_cell_n else ""
    return text, suffix + (DAGGER if cell["collapsed"] else "")


def grid(table: Table):
    cells = table.cells.set_index([table.rows, table.cols])
    for r in table.row_order:
        yield r, [cells.loc[(r, c)] for c in table.col_order]


def notes(table: Table) -> list[str]:
    ns = sorted(set(table.cells.loc[table.cells["n"] > 0, "n"]))
    unit = " (%)" if is_percent(table.metric) else ""
    seeds = f"n = {ns[0]} seed(s) per cell" if len(ns) == 1 else "n seeds per cell in brackets"
    better = "highest" if higher_is_better(table.metric) else "lowest"
    out = [f"{table.metric}{unit}, mean ± std over seeds; {seeds}; bold: {better} in its column."]
    if table.cols == "prune.density":
        out.append("Columns: prune.density, the fraction of prunable weights kept.")
    if table.cells["collapsed"].any():
        out.append(f"{DAGGER}: at least one seed ended with a collapsed layer (no weight left in it).")
    return out


def uniform_n(table: Table) -> bool:
    return len(set(table.cells.loc[table.cells["n"] > 0, "n"])) <= 1


def to_markdown(table: Table) -> str:
    per_cell_n = not uniform_n(table)
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join([esc(table.rows)] + [col_label(table.cols, c) for c in table.col_order]) + " |",
             "|---|" + "---:|" * len(table.col_order)]
    for r, cells in grid(table):
        out = []
        for cell in cells:
            text, suffix = cell_parts(table, cell, per_cell_n)
            out.append((f"**{text}**" if cell["best"] else text) + suffix)
        lines.append("| " + " | ".join([esc(r)] + out) + " |")
    return "\n".join(lines + [""] + notes(table)) + "\n"


def to_csv(table: Table) -> str:
    """Long form, metric units (fractions for accuracies), one row per (row, col); `best` flags the column best."""
    return table.cells.to_csv(index=False)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def to_latex(table: Table) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); \\input it inside a table environment."""
    per_cell_n = not uniform_n(table)
    header = [tex_escape(table.rows)] + [tex_escape(col_label(table.cols, c)).replace(r" \%", r"\,\%")
                                         for c in table.col_order]
    lines = ["% " + line for line in notes(table)]
    lines += [r"\begin{tabular}{l" + "r" * len(table.col_order) + "}", r"\toprule", " & ".join(header) + r" \\",
              r"\midrule"]
    for r, cells in grid(table):
        out = []
        for cell in cells:
            text, suffix = cell_parts(table, cell, per_cell_n)
            text = text.replace("±", r"$\pm$").replace("–", "--")
            suffix = suffix.replace(DAGGER, r"$^\dagger$").replace("(n=", r"\,{\scriptsize(n=").replace(")", ")}")
            out.append((rf"\textbf{{{text}}}" if cell["best"] else text) + suffix)
        lines.append(" & ".join([tex_escape(r)] + out) + r" \\")
    lines.append(r"\bottomrule")
    if table.cells["collapsed"].any():
        lines.append(rf"\multicolumn{{{len(table.col_order) + 1}}}{{l}}{{\footnotesize $^\dagger$ layer collapse "
                     r"in at least one seed} \\")
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"


FORMATS = {"markdown": to_markdown, "csv": to_csv, "latex": to_latex}
EXTENSIONS = {"markdown": "md", "csv": "csv", "latex": "tex"}
