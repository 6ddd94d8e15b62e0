"""Ablation table: variants x densities, mean ± std of a final metric over seeds.

The subtle point: a mean over seeds is only a mean over seeds if nothing else varies inside a
(row, column) group. ``check_axes`` refuses to average over any other config key that varies there
and names it, so a stray learning-rate trial never hides inside a "seed average".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from runstore import BASELINE_ROLE, ROLE_TAG
from sparse_core.config import FIELD_TYPES, NOT_IDENTITY
from sparse_core.metrics import CHANCE_FACTOR

from . import stats
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
    cells: pd.DataFrame  # one row per (row, col): mean, std, n, ci_low, ci_high, p_value, p_holm, mark, ...
    rows: str
    cols: str
    metric: str
    row_order: list
    col_order: list
    reference: dict = field(default_factory=dict)  # column value -> reference row label
    reference_how: str = ""  # how the reference rows were chosen (for the footnote)
    baselines: list = field(default_factory=list)  # the rows that are baselines (``baseline_rule``), in row order


BETTER, WORSE, REF = "▲", "▼", "ref"
CHANCE = "chance"  # the mark of a cell whose seeds mostly ended at chance (never a reference)


def is_baseline(label) -> bool:
    """The label rule, for runs without a role tag (stores from before the tag): a method outside the
    paper's pipeline, the plain magnitude ``base``, another pruner, GMP, RigL."""
    label = str(label)
    return label in ("base", "gmp", "rigl") or label.startswith("pruner=")


def baseline_rule(df: pd.DataFrame, rows: str = "cell"):
    """``label -> bool``: is this row a baseline. A row whose runs carry the tag ``role`` (a sweep writes
    it from its design, ``sweeps.designs.baselines``) is one where a run's role is ``baseline``; a row none
    of whose runs carries it (runs from before the tag) falls back to the label rule ``is_baseline``."""
    role = (df[ROLE_TAG] if ROLE_TAG in df.columns else pd.Series("", index=df.index)).fillna("").astype(str)
    tagged, marked = set(df.loc[role != "", rows]), set(df.loc[role == BASELINE_ROLE, rows])
    return lambda label: label in marked if label in tagged else is_baseline(label)


def _per_seed(g: pd.DataFrame, metric: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in zip(g[SEED], g[metric]) if pd.notna(v)}


def _pick_reference(data: pd.DataFrame, rows: str, cols: str, col, reference, select: str, baseline) -> object:
    """The given reference row, else the baseline (any row if none is a baseline) with the best mean of
    ``select`` (validation accuracy) in this column: the comparator is never chosen on test data, nor
    among cells whose *validation* accuracy is at chance (``val_chance_flags``; None when every candidate is)."""
    here = data[data[cols] == col]
    if reference is not None:
        return reference if (here[rows] == reference).any() else None
    candidates = here[here[rows].map(baseline)]
    candidates = candidates if len(candidates) else here
    chance = candidates.groupby(rows)["_val_chance"].mean() > 0.5  # read on validation: test data chooses nothing
    candidates = candidates[~candidates[rows].map(chance).astype(bool)] if len(candidates) else candidates
    means = candidates.groupby(rows)[select].mean().dropna()
    if means.empty:
        return None
    return means.idxmax() if higher_is_better(select) else means.idxmin()


def _cell_summaries(data: pd.DataFrame, metric: str, rows: str, cols: str) -> pd.DataFrame:
    """Per (row, col): mean, std, n, 95 % CI over seeds, the seeds, and the collapsed / at-chance marks."""
    cells = []
    for (r, c), g in data.groupby([rows, cols], sort=False):
        values = g[metric].dropna()
        mean, lo, hi = stats.t_interval(values)
        cells.append({rows: r, cols: c, "metric": metric, "mean": mean,
                      "std": values.std(ddof=1) if len(values) > 1 else math.nan, "n": len(values),
                      "ci_low": lo, "ci_high": hi,
                      "seeds": ";".join(str(s) for s in sorted(g.loc[values.index, SEED])),
                      "collapsed": bool(g["_collapsed"].any()), "at_chance": bool(g["_chance"].mean() > 0.5)})
    return pd.DataFrame(cells)


def ablation_table(df: pd.DataFrame, metric: str = "test_acc", rows: str = "cell", cols: str = "prune.density",
                   reference=None, select_metric: str = "val_acc", baseline=None) -> Table:
    """Mean and 95 % CI per (row, col) over seeds, and a paired test of each cell against the column's reference
    row (``reference``, or the best baseline by mean ``select_metric``; ``baseline(label)``: is it one, by
    default ``baseline_rule``)."""
    check_metric(df, metric)
    check_key(df, rows, "--rows")
    check_key(df, cols, "--cols")
    if rows == cols:
        raise AnalysisError(f"--rows and --cols are both {rows!r}")
    if reference is not None and not (df[rows] == reference).any():
        raise AnalysisError(f"--reference {reference!r} is not a {rows} of these runs; choose from "
                            f"{', '.join(sorted(map(str, df[rows].unique())))}")
    check_axes(df, [rows, cols])
    baseline = baseline or baseline_rule(df, rows)
    how = f"the {rows} given by --reference" if reference is not None else None
    if select_metric not in df.columns or df[select_metric].isna().all():
        select_metric = metric  # runs from before the validation split: say so in the footnote
        how = how or f"the best baseline by mean {metric} (these runs have no validation accuracy)"
    how = how or f"the best baseline by mean {select_metric} (validation), never by test"
    data = df.assign(_collapsed=collapsed_flags(df), _chance=chance_flags(df), _val_chance=val_chance_flags(df))
    cells = _cell_summaries(data, metric, rows, cols)
    col_order = sorted(cells[cols].unique(), reverse=cols == "prune.density")  # the field reads 10 % -> 0.1 %
    row_order = sorted(cells[rows].unique(), key=str)
    cells = cells.set_index([rows, cols]).reindex(pd.MultiIndex.from_product([row_order, col_order], names=[rows, cols]))
    cells = cells.reset_index()
    cells["n"] = cells["n"].fillna(0).astype(int)
    cells[["collapsed", "at_chance"]] = cells[["collapsed", "at_chance"]].fillna(False).astype(bool)
    cells["metric"] = metric
    refs, p, p_holm, marks = {}, [math.nan] * len(cells), [math.nan] * len(cells), [""] * len(cells)
    for c in col_order:
        ref = _pick_reference(data, rows, cols, c, reference, select_metric, baseline)
        refs[c] = ref
        idx = [i for i in range(len(cells)) if cells.at[i, cols] == c]
        if ref is None:
            continue
        ref_seeds = _per_seed(data[(data[rows] == ref) & (data[cols] == c)], metric)
        for i in idx:
            if cells.at[i, rows] == ref:
                marks[i] = REF
                continue
            g = data[(data[rows] == cells.at[i, rows]) & (data[cols] == c)]
            p[i] = stats.paired_test(_per_seed(g, metric), ref_seeds).p_value
        adjusted = stats.holm([p[i] for i in idx])
        for i, q in zip(idx, adjusted):
            p_holm[i] = q
            if math.isfinite(q) and q < stats.ALPHA:
                better = (cells.at[i, "mean"] > cells.loc[(cells[rows] == ref) & (cells[cols] == c), "mean"].iloc[0])
                marks[i] = BETTER if better == higher_is_better(metric) else WORSE
    cells["reference"] = [refs.get(c) for c in cells[cols]]
    cells["p_value"], cells["p_holm"], cells["mark"] = p, p_holm, marks
    return Table(cells, rows, cols, metric, row_order, col_order, refs, how, [r for r in row_order if baseline(r)])


def collapsed_flags(df: pd.DataFrame) -> pd.Series:
    """True where a run ended with at least one layer that has no weight left: the n_collapsed_layers
    metric where a run has it, else the collapsed_layers tag (comma-separated names, empty if none)."""
    tag = df["collapsed_layers"] if "collapsed_layers" in df.columns else pd.Series("", index=df.index)
    from_tag = tag.map(lambda v: isinstance(v, str) and v.strip() != "").astype(bool)
    if "n_collapsed_layers" not in df.columns:
        return from_tag
    n = df["n_collapsed_layers"]
    return (n > 0).where(n.notna(), from_tag).astype(bool)


def val_chance_flags(df: pd.DataFrame) -> pd.Series:
    """True where a run's validation accuracy is below ``CHANCE_FACTOR`` x its ``chance_acc`` (one constant
    guess, the label prior): the chance test the reference's choice reads, never the test accuracy."""
    if "chance_acc" not in df.columns or "val_acc" not in df.columns:
        return pd.Series(False, index=df.index)
    return (df["val_acc"] < CHANCE_FACTOR * df["chance_acc"]).where(df["chance_acc"].notna(), False).astype(bool)


def chance_flags(df: pd.DataFrame) -> pd.Series:
    """True where a run's test accuracy ended at chance (its at_chance metric, sparse_core.metrics.at_chance);
    False where a run has none (runs logged before the flag)."""
    if "at_chance" not in df.columns:
        return pd.Series(False, index=df.index)
    return (df["at_chance"] > 0.5).where(df["at_chance"].notna(), False).astype(bool)


# ---- output --------------------------------------------------------------------------------------
def col_label(cols: str, value) -> str:
    if cols == "prune.density":
        return f"{100 * value:g} %"
    return f"{cols}={value}"


def _number(table: Table, value: float) -> str:
    return f"{100 * value:.2f}" if is_percent(table.metric) else f"{value:.4g}"


def cell_parts(table: Table, cell: pd.Series, per_cell_n: bool) -> tuple[str, str]:
    """(value text, suffix) e.g. ("91.23 ± 0.45", " ▲ (n=5)†"): mean ± 95 % CI half-width."""
    if cell["n"] == 0:
        return "–", ""
    text = _number(table, cell["mean"])
    if cell["n"] > 1 and math.isfinite(cell["ci_high"]):
        text += f" ± {_number(table, cell['ci_high'] - cell['mean'])}"
    mark = f" {cell['mark']}" if cell["mark"] in (BETTER, WORSE) else ""
    mark += f" ({CHANCE})" if cell.get("at_chance", False) else ""
    suffix = mark + (f" (n={cell['n']})" if per_cell_n else "")
    return text, suffix + (DAGGER if cell["collapsed"] else "")


def grid(table: Table):
    cells = table.cells.set_index([table.rows, table.cols])
    for r in table.row_order:
        yield r, [cells.loc[(r, c)] for c in table.col_order]


def notes(table: Table) -> list[str]:
    ns = sorted(set(table.cells.loc[table.cells["n"] > 0, "n"]))
    unit = " (%)" if is_percent(table.metric) else ""
    seeds = f"n = {ns[0]} seed(s) per cell" if len(ns) == 1 else "n seeds per cell in brackets"
    out = [f"{table.metric}{unit}: mean ± half-width of the 95 % confidence interval over seeds (Student t, n - 1 "
           f"degrees of freedom); {seeds}."]
    refs = {r for r in table.reference.values() if r is not None}
    if refs:
        where = (str(next(iter(refs))) if len(refs) == 1 else
                 "; ".join(f"{col_label(table.cols, c)}: {r}" for c, r in table.reference.items() if r is not None))
        out.append(f"Bold: the reference row of each column ({where}), {table.reference_how}. {BETTER} / {WORSE}: "
                   f"significantly better / worse than it: two-sided paired t-test over the seeds both rows have "
                   f"(same seed = same data order and init), Holm-corrected within the column, p < {stats.ALPHA}. "
                   f"Unmarked cells are not distinguishable from the reference at this n.")
    if table.cols == "prune.density":
        out.append("Columns: prune.density, the fraction of prunable weights kept.")
    if table.cells["at_chance"].any():
        out.append(f"({CHANCE}): at chance: most seeds ended with a test accuracy below 1.5 x that of one constant "
                   f"guess (sparse_core.metrics.at_chance); a reference is never at chance on validation.")
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
            out.append((f"**{text}**" if cell["mark"] == REF else text) + suffix)
        lines.append("| " + " | ".join([esc(r)] + out) + " |")
    return "\n".join(lines + [""] + notes(table)) + "\n"


def to_csv(table: Table) -> str:
    """Long form, metric units (fractions for accuracies), one row per (row, col), with the 95 % CI (ci_low,
    ci_high), the paired test against the column's reference (p_value, p_holm, mark) and the reference row."""
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
            chance = f" ({CHANCE})" in suffix
            suffix = suffix.replace(f" ({CHANCE})", "")
            suffix = suffix.replace(BETTER, r"$\blacktriangle$").replace(WORSE, r"$\blacktriangledown$")
            suffix = suffix.replace(DAGGER, r"$^\dagger$").replace("(n=", r"\,{\scriptsize(n=").replace(")", ")}")
            suffix += r"\,{\scriptsize chance}" if chance else ""
            out.append((rf"\textbf{{{text}}}" if cell["mark"] == REF else text) + suffix)
        lines.append(" & ".join([tex_escape(r)] + out) + r" \\")
    lines.append(r"\bottomrule")
    if table.cells["collapsed"].any():
        lines.append(rf"\multicolumn{{{len(table.col_order) + 1}}}{{l}}{{\footnotesize $^\dagger$ layer collapse "
                     r"in at least one seed} \\")
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"


FORMATS = {"markdown": to_markdown, "csv": to_csv, "latex": to_latex}
EXTENSIONS = {"markdown": "md", "csv": "csv", "latex": "tex"}
