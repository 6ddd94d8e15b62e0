"""Uncertainty for ablation tables: a Student-t 95 % confidence interval per cell and a paired t-test
of every cell against a reference row, paired by seed, Holm-corrected within each column.

Runs with the same seed share the data order and the initialisation across methods (sparse_core
derives every generator from the seed), so the seed-wise difference removes that shared variance:
a paired test is the fair one. With n seeds there are n - 1 degrees of freedom; n < 2 gives no
interval and no test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05
CONFIDENCE = 0.95


def t_interval(values) -> tuple[float, float, float]:
    """(mean, ci_low, ci_high): mean ± t_{0.975, n-1} * sd / sqrt(n); NaN bounds when n < 2."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    from scipy import stats  # here, not at import: 1-2 s, and runs of one seed never need it

    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


@dataclass
class Paired:
    n: int  # seeds present in both rows
    diff: float  # mean of (cell - reference) over those seeds
    p_value: float  # two-sided paired t-test; NaN if n < 2 or every difference is identical


def paired_test(cell: dict[int, float], reference: dict[int, float]) -> Paired:
    """Two-sided paired t-test of {seed: value} against the reference's {seed: value}, over common seeds."""
    seeds = sorted(set(cell) & set(reference))
    a = np.asarray([cell[s] for s in seeds], dtype=float)
    b = np.asarray([reference[s] for s in seeds], dtype=float)
    if len(seeds) < 2:
        return Paired(len(seeds), float((a - b).mean()) if len(seeds) else math.nan, math.nan)
    d = a - b
    if np.all(d == d[0]):  # zero variance: the t statistic is undefined (scipy returns NaN or warns)
        return Paired(len(seeds), float(d.mean()), 0.0 if d[0] != 0 else 1.0)
    from scipy import stats

    return Paired(len(seeds), float(d.mean()), float(stats.ttest_rel(a, b).pvalue))


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count as a test)."""
    idx = [i for i, p in enumerate(p_values) if math.isfinite(p)]
    order = sorted(idx, key=lambda i: p_values[i])
    out = [math.nan] * len(p_values)
    running, m = 0.0, len(idx)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out
