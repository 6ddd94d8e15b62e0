"""Does the learned mask learn? Its density against the target over pre-training, one panel per density.

For every run with a learned mask steered to its density, the per-epoch ``mask_soft_density`` (expected
density: mean keep probability), ``mask_hard_density`` (share the mask keeps) and ``mask_target``. Cells
that differ only after pruning share their pre-training, so the lines are per pre-training (init and mask
kind: ``group``), one colour each in every panel, mean over seeds with a min–max band. A mask that does
not learn shows as a flat line far above the dashed target.
"""

from __future__ import annotations

import pandas as pd

from .load import AnalysisError, metric_histories
from .plots import DENSITY, readable_log_axis, save_figure

import matplotlib.pyplot as plt  # noqa: E402 - after .plots, which selects the file-only backend

KEYS = ("mask_soft_density", "mask_hard_density", "mask_target")


def masked_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The runs whose learned mask is steered to the density (``mask.target`` on a controlled kind)."""
    if "mask.kind" not in df.columns:
        return df.iloc[0:0]
    steered = df["mask.kind"].isin(["sigmoid", "hardconcrete"])
    if "mask.target" in df.columns:
        steered &= df["mask.target"].astype(bool)
    return df[steered]


def history_frame(df: pd.DataFrame, uri: str) -> pd.DataFrame:
    """Long form (run_id, cell, density, epoch, key, value) of the masked runs' per-epoch mask metrics."""
    runs = masked_runs(df)
    if runs.empty:
        raise AnalysisError("no run has a learned mask steered to its density")
    hist = metric_histories(uri, runs["run_id"], KEYS)
    meta = runs.set_index("run_id")[["cell", DENSITY]].copy()
    meta["group"] = [group_label(r) for _, r in runs.iterrows()]
    return hist.join(meta, on="run_id").rename(columns={DENSITY: "density"})


def group_label(flat) -> str:
    """What sets a pre-training apart in a design: the init and the mask kind."""
    return f"{flat['init.name']} init, {flat['mask.kind']} mask"


def mask_density_plot(hist: pd.DataFrame, stem: str) -> list[str]:
    """One panel per density: soft (solid) and hard (dotted) density per ``group`` against the target
    (dashed), log scale; returns [png, pdf]."""
    hist = hist.drop_duplicates(["run_id", "epoch", "key"])
    densities = sorted(hist["density"].unique(), reverse=True)
    groups = sorted(hist["group"].unique())
    colours = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    fig, axes = plt.subplots(1, len(densities), figsize=(4.2 * len(densities), 4.0), squeeze=False)
    for ax, density in zip(axes[0], densities):
        sel = hist[hist["density"] == density]
        target = sel[sel["key"] == "mask_target"].groupby("epoch")["value"].mean()
        ax.plot(target.index, target.values, color="black", ls="--", lw=1.5, label="target")
        for group in [g for g in groups if g in set(sel["group"])]:
            one = sel[sel["group"] == group].drop_duplicates(["cell"])["cell"]  # one cell stands for the group
            rows = sel[(sel["group"] == group) & (sel["cell"] == one.iloc[0])]
            for key, style in (("mask_soft_density", "-"), ("mask_hard_density", ":")):
                g = rows[rows["key"] == key].groupby("epoch")["value"]
                mean, lo, hi = g.mean(), g.min(), g.max()
                label = f"{group}: {'soft' if style == '-' else 'hard'} (n={g.size().max()})"
                ax.plot(mean.index, mean.values, color=colours[group], ls=style, lw=1.6, label=label)
                ax.fill_between(mean.index, lo.values, hi.values, color=colours[group], alpha=0.12, lw=0)
        ax.set_yscale("log")
        readable_log_axis(ax.yaxis, percent=True)
        ax.set_title(f"density {density:g}", fontsize=10)
        ax.set_xlabel("pre-training epoch")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("mask density (fraction)")
    axes[0][-1].legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.suptitle("learned mask vs target over pre-training: soft = expected density (mean p), hard = share "
                 "kept (p > 0.5); mean over seeds, band min–max; one line per pre-training", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, stem)
