"""Accuracy vs density (log axis, decreasing to the right) and per-layer density, as PNG and PDF.

The per-layer plot exists because layer collapse (a layer left with no weight, which disconnects the
network) is what separates pruners at 1 % and 0.1 % density; a collapsed layer is drawn as a red ×
on the bottom axis, since a zero has no place on a log scale.
"""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402

from .load import AnalysisError, layer_densities  # noqa: E402
from .table import ablation_table, check_key, is_baseline, is_percent  # noqa: E402

DENSITY = "prune.density"
X_LABEL = "density (fraction of weights kept)"
PNG_DPI = 150  # dots per inch of the PNG files (the PDFs are vector)


def save_figure(fig, stem: str) -> list[str]:
    """``stem``.png (150 dpi) and ``stem``.pdf, cropped to the figure's tight box; closes the figure;
    returns both paths. The box is computed once, by the layout pass ``bbox_inches="tight"`` makes at
    the PNG's dpi (the PNG is the same to the byte), and given to both: "tight" on each file would lay
    the figure out again for the PDF, about a quarter of the cost of writing both (text extents: log-axis
    tick labels, long legends). The PDF's page can differ from its own "tight" box by a few points."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    paths = [f"{stem}.png", f"{stem}.pdf"]
    dpi = fig.dpi
    fig.dpi = PNG_DPI
    try:
        fig.draw_without_rendering()
        box = fig.get_tightbbox(fig.canvas.get_renderer()).padded(plt.rcParams["savefig.pad_inches"])
    finally:
        fig.dpi = dpi
    fig.savefig(paths[0], dpi=PNG_DPI, bbox_inches=box)
    fig.savefig(paths[1], bbox_inches=box)
    plt.close(fig)
    return paths


def _legend(ax, title: str) -> None:
    """Outside the axes, on the right: with many variants an inside legend hides curves."""
    ax.legend(title=title, fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0, frameon=False)


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _style(i: int) -> tuple:
    """(colour, line style, marker) for the i-th variant: ten distinct hues with solid lines, then their
    light shades dashed, each with its own marker, so 18 ablation cells stay tellable apart."""
    k = i % 20
    colour = plt.get_cmap("tab20")((2 * k) % 20 + k // 10)  # ten distinct hues first, then their light shades
    return colour, ("-", "--", ":", "-.")[(i // 10) % 4], _MARKERS[(i + i // 10) % len(_MARKERS)]


def cell_styles(labels) -> dict:
    """{label: (colour, line style, marker)}, fixed for a whole report: every panel and plot draws a cell
    alike (labels in sorted order, as the table's rows)."""
    return {label: _style(i) for i, label in enumerate(sorted(set(labels), key=str))}


def chance_level(df: pd.DataFrame, metric: str) -> float | None:
    """The runs' mean chance accuracy (the best constant guess, ``chance_acc``), None where unknown."""
    if not is_percent(metric) or "chance_acc" not in df.columns or df["chance_acc"].isna().all():
        return None
    return float(df["chance_acc"].mean())


def _label(metric: str) -> str:
    return {"test_acc": "final test accuracy", "val_acc": "final validation accuracy",
            "test_acc_at_best_val": "test accuracy at the best validation epoch"}.get(metric, metric) + \
        (" (%)" if is_percent(metric) else "")


def dense_reference(df: pd.DataFrame, metric: str) -> tuple[float, str] | None:
    """(value, legend text): mean accuracy of plain dense pre-training (runs without a learned
    mask, whose pre-training is ordinary dense training), else the mean at density 1.0."""
    if "pre_test_acc" in df.columns and is_percent(metric):
        plain = df["mask.kind"] == "none" if "mask.kind" in df.columns else pd.Series(True, index=df.index)
        values = df.loc[plain, "pre_test_acc"].dropna()
        if len(values):
            return float(values.mean()), f"dense, after pre-training (mean of {len(values)} runs)"
    dense = df.loc[df[DENSITY] >= 1.0, metric].dropna()
    if len(dense):
        return float(dense.mean()), f"dense, density 1.0 (mean of {len(dense)} runs)"
    return None


PANEL_LINES = 8  # at most this many curves per panel: more cannot be told apart


def panels(labels: list, baseline=is_baseline) -> list[tuple[str, list]]:
    """Rows split into panels of at most PANEL_LINES curves: baselines (``baseline(label)``: the table's
    ``baselines``, from the runs' role tags), the full pipeline's leave-one-out cells, the one-component
    additions to the base, then anything else in chunks."""
    groups = {"baselines": [], "full pipeline, one component left out": [], "base + one component": [], "other": []}
    for label in labels:
        text = str(label)
        if baseline(label):
            groups["baselines"].append(label)
        elif text == "full" or text.startswith("full-"):
            groups["full pipeline, one component left out"].append(label)
        elif text.startswith("base+"):
            groups["base + one component"].append(label)
        else:
            groups["other"].append(label)
    if "base" in groups["baselines"] and groups["base + one component"]:
        groups["base + one component"].insert(0, "base")  # the line the additions are measured against
    if "full" in groups["full pipeline, one component left out"] and len(groups["baselines"]) < PANEL_LINES:
        groups["baselines"].append("full")  # the paper's pipeline against the baselines
    out = []
    for title, members in groups.items():
        for i in range(0, len(members), PANEL_LINES):
            part = members[i:i + PANEL_LINES]
            out.append((title if len(members) <= PANEL_LINES else f"{title} ({i // PANEL_LINES + 1})", part))
    return [(t, m) for t, m in out if m]


def _draw(ax, table, rows: str, members: list, scale: float, ref, xmap: dict | None = None, styles=None,
          chance: float | None = None) -> None:
    """``xmap`` {(row, density): x}: draw each point at that x (e.g. its mean effective density) instead of
    its nominal density; an x of 0 (a disconnected network) has no place on a log axis and is left out.
    ``styles``: cell_styles of the report; ``chance``: the chance accuracy, drawn as a line."""
    cells = table.cells[table.cells["n"] > 0]
    styles = styles or cell_styles(table.row_order)
    for row in members:
        g = cells[cells[rows] == row].sort_values(DENSITY)
        if g.empty:
            continue
        x, mean = g[DENSITY].to_numpy(), g["mean"].to_numpy() * scale
        if xmap is not None:
            x = np.array([xmap.get((row, d), np.nan) for d in x], dtype=float)
            x[~(x > 0)] = np.nan
        lo = g["ci_low"].fillna(g["mean"]).to_numpy() * scale
        hi = g["ci_high"].fillna(g["mean"]).to_numpy() * scale
        color, style, marker = styles[row]
        ax.plot(x, mean, marker=marker, ms=4.5, lw=1.8, ls=style, color=color, label=f"{row}")
        ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
        hit = g["collapsed"].to_numpy()
        if hit.any():
            ax.plot(x[hit], mean[hit], ls="none", marker="x", ms=8, mew=1.8, color="black", zorder=5)
        low = g["at_chance"].to_numpy(dtype=bool)
        if low.any():
            ax.plot(x[low], mean[low], ls="none", marker="o", ms=10, mfc="none", mec="red", mew=1.3, zorder=5)
    here = cells[cells[rows].isin(members)]
    if here["collapsed"].any():
        ax.plot([], [], ls="none", marker="x", ms=8, mew=1.8, color="black", label="layer collapse (any seed)")
    if here["at_chance"].any():
        ax.plot([], [], ls="none", marker="o", ms=10, mfc="none", mec="red", mew=1.3, label="at chance (most seeds)")
    if ref is not None:
        ax.axhline(ref[0] * scale, color="0.35", ls="--", lw=1.2, label=ref[1])
    if chance is not None:
        ax.axhline(chance * scale, color="red", ls=":", lw=1.2, label=f"chance: one constant guess ({chance * scale:.1f})")
    ax.set_xscale("log")
    if xmap is not None:  # effective densities fall anywhere: decades, labelled in %, sparser to the right
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g} %"))
        ax.invert_xaxis()
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        return
    ticks = sorted(cells[DENSITY].unique())
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{100 * t:g} %" for t in ticks])
    if len(ticks) > 1:
        pad = (math.log10(max(ticks)) - math.log10(min(ticks))) * 0.05
        ax.set_xlim(10 ** (math.log10(max(ticks)) + pad), 10 ** (math.log10(min(ticks)) - pad))
    else:
        ax.invert_xaxis()
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)  # below: no curve hidden


def accuracy_vs_density(df: pd.DataFrame, stem: str, metric: str = "test_acc", rows: str = "cell",
                        title: str | None = None, reference=None, table=None, x: str = DENSITY) -> list[str]:
    """Mean over seeds with its 95 % confidence band, one panel per group of at most PANEL_LINES curves
    (baselines; the full pipeline's ablations; base + one component); returns [png, pdf]. ``table``:
    ``ablation_table(df, metric, rows, DENSITY, reference)`` if the caller has it already. ``x``: the
    x axis, the nominal density or a per-run column such as ``effective_density`` (each point at its
    runs' mean)."""
    if table is None:  # same checks as the table: no hidden averaging
        table = ablation_table(df, metric, rows, DENSITY, reference)
    xmap = None
    if x != DENSITY:
        check_key(df, x, "--x")
        xmap = df.groupby([rows, DENSITY])[x].mean().to_dict()
    scale = 100.0 if is_percent(metric) else 1.0
    groups = panels(table.row_order, lambda label: label in table.baselines)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 5.6), sharey=True, squeeze=False)
    ref, styles, chance = dense_reference(df, metric), cell_styles(table.row_order), chance_level(df, metric)
    for ax, (panel_title, members) in zip(axes[0], groups):
        _draw(ax, table, rows, members, scale, ref, xmap, styles, chance)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel(("density (% of weights kept)" if xmap is None else f"{x} (mean over seeds)") + "  →  sparser")
    axes[0][0].set_ylabel(_label(metric))
    n = sorted(set(table.cells.loc[table.cells["n"] > 0, "n"]))
    seeds = f"{n[0]} seed(s)" if len(n) == 1 else f"{n[0]}–{n[-1]} seeds"
    band = "mean and 95 % confidence band over" if max(n) > 1 else "no confidence band with"
    against = "density" if xmap is None else x
    fig.suptitle(title or f"{_label(metric)} vs {against}: {band} {seeds}", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, stem)


def pick_density(df: pd.DataFrame, density: float | None) -> float:
    """``density`` if runs exist there, else the lowest density below 1 (where collapse shows first)."""
    present = sorted(df[DENSITY].unique())
    if density is None:
        below = [d for d in present if d < 1.0]
        return (below or present)[0]
    for d in present:
        if math.isclose(d, density, rel_tol=1e-9):
            return d
    raise AnalysisError(f"--layer-density {density:g}: no runs at that density; densities present: "
                        f"{', '.join(f'{d:g}' for d in present)}")


def layer_density_plot(df: pd.DataFrame, stem: str, density: float | None = None, rows: str = "cell",
                       uri: str | None = None, styles: dict | None = None) -> list[str]:
    """Kept fraction per prunable layer at one density: one line of markers per variant across the layers
    (mean over seeds, whiskers min-max), in the report's cell colours (``styles``, cell_styles)."""
    check_key(df, rows, "--rows")
    density = pick_density(df, density)
    sel = df[df[DENSITY] == density]
    per_run = layer_densities(uri or df.attrs["tracking_uri"], sel["run_id"], df.attrs.get("artifact_uris"))
    if not per_run:
        raise AnalysisError(f"no run at density {density:g} has a layer_density.json artifact")
    layers: list[str] = []
    for d in per_run.values():
        layers += [name for name in d if name not in layers]
    variants = [r for r in sorted(sel[rows].unique(), key=str) if sel.loc[sel[rows] == r, "run_id"].isin(per_run).any()]
    styles = styles or cell_styles(df[rows].unique())
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(layers) + 3.0), 4.6))
    x = np.arange(len(layers))
    kept = [v for d in per_run.values() for v in d.values() if v > 0]
    floor = min(kept + [density]) / 3  # the bottom of the log axis, where collapsed layers are marked
    any_collapse = False
    step = min(0.6 / max(len(variants), 1), 0.08)  # a small sideways shift per variant: no marker hides another
    for i, variant in enumerate(variants):
        ids = [r for r in sel.loc[sel[rows] == variant, "run_id"] if r in per_run]
        frame = pd.DataFrame([per_run[r] for r in ids]).reindex(columns=layers)
        mean, lo, hi = frame.mean(), frame.min(), frame.max()
        offset = x + step * (i - (len(variants) - 1) / 2)
        color, style, marker = styles[variant]
        ok = (mean > 0).to_numpy()
        ax.plot(offset[ok], mean[ok], ls=style, lw=1.2, marker=marker, ms=6, color=color, alpha=0.9,
                label=f"{variant} (n={len(ids)})")
        ax.errorbar(offset[ok], mean[ok], yerr=[(mean - lo)[ok], (hi - mean)[ok]], fmt="none", ecolor=color, lw=0.8)
        zero = (frame == 0).any().to_numpy()
        if zero.any():
            any_collapse = True
            ax.plot(offset[zero], [floor * 1.15] * int(zero.sum()), ls="none", marker="x", ms=8, mew=2, color=color)
    if any_collapse:
        ax.plot([], [], ls="none", marker="x", ms=8, mew=2, color="0.2", label="collapsed (0 kept, any seed)")
    ax.axhline(density, color="0.35", ls="--", lw=1.2, label=f"target density {density:g}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    readable_log_axis(ax.yaxis)
    ax.set_xticks(x)
    ax.set_xticklabels([name.removesuffix(".weight") for name in layers], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("prunable layer (input → output)")
    ax.set_ylabel("layer density (fraction kept)")
    ax.set_title(f"per-layer density at density {100 * density:g} %; markers: mean over seeds, whiskers: min–max; "
                 f"×: collapsed", fontsize=10)
    ax.grid(True, axis="y", which="major", alpha=0.3)
    _legend(ax, rows)
    return save_figure(fig, stem)


def readable_log_axis(axis, percent: bool = False) -> None:
    """Ticks at 1, 2 and 5 times each power of ten inside the axis' current limits (call it after drawing;
    every integer or half multiple where that gives fewer than three ticks), labelled as plain numbers (0.05, not 5×10⁻²): a log axis spanning about a decade otherwise shows one
    label or none."""
    lo, hi = sorted(axis.get_view_interval())
    first = math.floor(math.log10(lo)) if lo > 0 else -6
    for mantissas in ((1, 2, 5), range(1, 10), [m / 10 for m in range(10, 100, 5)]):  # finer until 3 ticks show
        ticks = [m * 10.0 ** k for k in range(first, math.ceil(math.log10(hi)) + 1) for m in mantissas]
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) >= 3:
            break
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:.4g} %" if percent else f"{v:.4g}"))
    axis.set_minor_locator(NullLocator())
