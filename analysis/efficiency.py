"""Model size and CPU inference latency against density: where sparsity starts to pay off.

Every run measures (``sparse_core.export.figures``) the size of its compact export against the
dense state dict, and the latency of a sparse execution path against the dense model, both as
ratios measured in one process. Here they are averaged per (model, density) into a table and a
two-panel plot. The subtle point: latency depends on the machine and the thread count each run
had, so the table keeps ``latency_threads`` and the break-even note names it; runs of convolutional
models have no sparse path (NaN ratio) and only show up in the size panel.
"""

from __future__ import annotations

import logging
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .load import AnalysisError  # noqa: E402
from .plots import readable_log_axis, save_figure  # noqa: E402

log = logging.getLogger("analysis")

DENSITY = "prune.density"
MODEL = "model.name"
NEEDED = ("model_bytes_dense", "model_bytes_sparse")
BATCHES = (1, 256)
COLUMNS = ["model", "density", "runs", "size ratio", "sparse KB", "dense KB"] + \
          [f"latency ratio b{b}" for b in BATCHES] + ["threads"]


def efficiency_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, density): mean size ratio (sparse file / dense state dict), sizes in KB,
    median sparse/dense latency ratio per batch size, the thread counts seen."""
    missing = [c for c in NEEDED + (DENSITY,) if c not in df.columns]
    if missing or df[list(NEEDED)].dropna().empty:
        raise AnalysisError(f"no size/latency figures in these runs ({', '.join(missing or NEEDED)} missing): they "
                            f"come from runs of sparse_core with compact export (issue 16); rerun the sweep")
    df = df.dropna(subset=list(NEEDED)).copy()
    df["_model"] = df[MODEL] if MODEL in df.columns else "model"
    df["_size"] = df["model_bytes_sparse"] / df["model_bytes_dense"]
    rows = []
    for (model, density), g in df.groupby(["_model", DENSITY], sort=True):
        row = {"model": model, "density": float(density), "runs": len(g), "size ratio": g["_size"].mean(),
               "sparse KB": g["model_bytes_sparse"].mean() / 1e3, "dense KB": g["model_bytes_dense"].mean() / 1e3}
        for b in BATCHES:
            col = f"latency_ratio_b{b}"
            row[f"latency ratio b{b}"] = g[col].median() if col in g.columns else math.nan
        threads = sorted({int(t) for t in g.get("latency_threads", pd.Series(dtype=float)).dropna()})
        row["threads"] = ",".join(map(str, threads)) or "-"
        rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.sort_values(["model", "density"], ascending=[True, False]).reset_index(drop=True)


def break_even(table: pd.DataFrame) -> list[str]:
    """Per model and batch size: the densest measured density at which sparse inference is faster."""
    notes = []
    for model, g in table.groupby("model", sort=True):
        threads = ",".join(sorted(set(g["threads"]) - {"-"})) or "?"
        for b in BATCHES:
            ratios = g[["density", f"latency ratio b{b}"]].dropna()
            if ratios.empty:
                notes.append(f"{model}, batch {b}: no sparse execution path measured")
                continue
            col = f"latency ratio b{b}"
            faster = ratios[ratios[col] < 1.0]
            if faster.empty:
                where = "slower than dense at every measured density"
            else:
                top = faster["density"].max()
                below = ratios[ratios["density"] <= top]
                where = f"faster than dense at density <= {top:g}" + \
                    ("" if (below[col] < 1.0).all() else " (not at every lower density)")
            notes.append(f"{model}, batch {b}: sparse inference {where} ({threads} CPU thread(s))")
    return notes


def to_markdown(table: pd.DataFrame) -> str:
    def fmt(col: str, v) -> str:
        if isinstance(v, float) and math.isnan(v):
            return "-"
        if col == "density":
            return f"{v:g}"
        if col in ("sparse KB", "dense KB"):
            return f"{v:,.1f}"
        if col == "size ratio" or col.startswith("latency"):
            return f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(c, r[c]) for c in COLUMNS) + " |" for _, r in table.iterrows()]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in break_even(table)) + "\n"


def _density_axis(ax, densities: list[float]) -> None:
    ax.set_xscale("log")
    if len(densities) > 1:
        lo, hi = math.log10(min(densities)), math.log10(max(densities))
        pad = (hi - lo) * 0.05
        ax.set_xlim(10 ** (hi + pad), 10 ** (lo - pad))  # decreasing: sparser to the right
    else:
        ax.invert_xaxis()
    ax.set_xticks(densities, [f"{100 * d:g} %" for d in densities], minor=False)
    ax.minorticks_off()
    readable_log_axis(ax.yaxis)
    ax.set_xlabel("density (% of weights kept)  →  sparser")
    ax.grid(True, which="major", alpha=0.3)


def efficiency_plot(table: pd.DataFrame, stem: str) -> list[str]:
    """Left: export size / dense size; right: sparse / dense CPU latency (1 = break-even). PNG + PDF."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    densities = sorted(table["density"].unique())
    colours = plt.get_cmap("tab10")
    for i, (model, g) in enumerate(table.groupby("model", sort=True)):
        g = g.sort_values("density")
        left.plot(g["density"], g["size ratio"], marker="o", color=colours(i), label=model)
        for b, style in zip(BATCHES, ("-", "--")):
            ratios = g[["density", f"latency ratio b{b}"]].dropna()
            if not ratios.empty:
                right.plot(ratios["density"], ratios[f"latency ratio b{b}"], marker="o", ls=style, color=colours(i),
                           label=f"{model}, batch {b}")
    left.plot(densities, densities, color="0.6", ls=":", label="ideal: values only")
    left.set_yscale("log")
    left.set_ylabel("export size / dense state dict")
    left.set_title("model file size (safetensors)", fontsize=10)
    right.axhline(1.0, color="0.35", ls="--", lw=1.2, label="break-even (sparse = dense)")
    right.set_yscale("log")
    threads = ",".join(sorted(set(table["threads"]) - {"-"})) or "?"
    right.set_ylabel("sparse / dense latency (< 1: sparse faster)")
    right.set_title(f"CPU inference latency, median ratio ({threads} thread(s))", fontsize=10)
    for ax in (left, right):
        _density_axis(ax, densities)
        ax.legend(fontsize=8)
    return save_figure(fig, stem)


def write(df: pd.DataFrame, out: str) -> list[str]:
    """``efficiency.png``/``.pdf`` and ``efficiency.md`` in ``out``; [] (with a warning) when the runs
    carry no size/latency figures, so that older runs still get the rest of a report."""
    try:
        table = efficiency_table(df)
    except AnalysisError as e:
        log.warning("no size/latency plot: %s", e)
        return []
    paths = efficiency_plot(table, os.path.join(out, "efficiency"))
    md = os.path.join(out, "efficiency.md")
    with open(md, "w") as f:
        f.write(to_markdown(table))
    return paths + [md]
