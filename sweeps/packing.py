"""Packed trials: compatible trials trained together as one Tune trial (``sparse_core.packed``).

Trials whose configs have the same ``sparse_core.packed.pack_key`` (the same graph and plan shape:
they differ only in ``PACKABLE`` keys such as seed, density and learning rate) and the same design
cell are grouped, and so are trials of any cells with one pre-training at every density
(``sparse_core/prefix.py``: e.g. the pruner cells and the post-pruning tricks of a leave-one-out
design, per seed), which a Tune trial then trains once; each group is cut into packs of at most
``k`` copies, as even as possible (30 trials with k = 8: 8, 8, 7, 7), a cell's copies together.
Inside a Tune trial, copies of one ``pack_key`` train as one pack. Every Tune trial has the config
``{"trials": [{"cell", "flat"}, ...], "meta": {...}}`` (``sweeps/trainable.py``), every copy its own
MLflow run; with ``k = 1`` nothing is packed and each Tune trial is a pack of one.

The subtle point is the number of packs: fewer packs than trial slots would leave cores idle
(a pack trains on the resources of one trial), so ``packs(..., min_packs=slots)`` splits the
largest packs until there are as many packs as slots or every pack is one trial. Results do
not depend on the packing: every copy equals its single run.

Knows no Ray; ``pack_key`` is imported on first use (it brings torch).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable

DEFAULT_PACK = 16  # copies per Tune trial for MLPs and ViTs when --pack is not given: the CPU gain levels off near
# 16 (benchmarks/packed_trials.py), and the laptop preset at 16 needs 1.17x fewer CPU s than at 8 (benchmarks/README.md)
PACKED_MODELS = ("mlp", "vit")  # models packed by default; others (VGG-16: one copy fills a GPU share) run one per trial


def default_pack(model_name: str) -> int:
    """``--pack`` when not given: ``DEFAULT_PACK`` for small MLPs and ViTs, 1 (no packing) for other models."""
    return DEFAULT_PACK if model_name in PACKED_MODELS else 1


def _chunks(items: list, n: int) -> list[list]:
    """``items`` in order, cut into ``n`` runs whose lengths differ by at most one (longer first)."""
    base, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        size = base + (i < extra)
        out.append(items[start:start + size])
        start += size
    return out


def packs(trials: Iterable, k: int | None, min_packs: int = 1, key=None) -> list[list]:
    """``trials`` (``designs.Trial``) grouped by (cell, pack_key) and cut into packs of at most ``k``
    copies (``k`` None: ``default_pack`` of each group's model), at least ``min_packs`` packs where
    there are that many trials. ``key(trial)``: the grouping key (default: cell and ``pack_key``)."""
    if k is not None and k < 1:
        raise ValueError(f"--pack {k}: give at least 1 (1 = one trial per Tune trial, no packing)")
    if k == 1:  # no packing: the trials as they are, in their order
        return [[t] for t in trials]
    trials = list(trials)
    if key is None:
        key = group_key(trials, k)
    groups: dict = {}
    for t in trials:
        groups.setdefault(key(t), []).append(t)
    out = []
    for members in groups.values():
        order = {c: i for i, c in enumerate(dict.fromkeys(t.cell for t in members))}
        members = sorted(members, key=lambda t: order[t.cell])  # a cell's copies stay together: one pack
        size = k if k is not None else default_pack(members[0].flat.get("model.name", "mlp"))
        out += _chunks(members, math.ceil(len(members) / size))
    while len(out) < min_packs:
        largest = max(range(len(out)), key=lambda i: len(out[i]), default=None)
        if largest is None or len(out[largest]) < 2:
            break
        out[largest:largest + 1] = _chunks(out[largest], 2)
    return out


def group_key(trials: list, k: int | None = None):
    """The grouping of ``packs``: trials of several cells with one pre-training at every density (e.g.
    the pruner cells and the post-pruning tricks of a leave-one-out design, per seed) go together, and
    a Tune trial then trains that pre-training once (sparse_core/prefix.py); the rest by cell and
    ``pack_key`` (a cell's seeds and densities pack together; those of one seed still share theirs).
    Cells whose learned mask is steered to the density share one pre-training per density
    (``prefix.family_key``: e.g. full and its post-pruning ablations): they go together per seed where
    a cell alone cannot fill a pack of ``k`` (``default_pack`` if None; the laptop preset's 4 trials
    per cell), and by cell where it can: there a cell's full packs train cheaper than a shared
    pre-training per density would save (each pack would hold fewer copies of a cell)."""
    from sparse_core import prefix
    from sparse_core.config import from_flat
    from sparse_core.packed import pack_key

    cfgs = {t.run_key: from_flat(t.flat) for t in trials}
    shared = {key: prefix.family_key(c) for key, c in cfgs.items()}
    by_cell = {t.run_key: ("cell", t.cell, pack_key(cfgs[t.run_key])) for t in trials}
    size = Counter(by_cell.values())

    def own_packs(t) -> bool:  # a steered-mask cell that fills its packs alone
        full = k if k is not None else default_pack(t.flat.get("model.name", "mlp"))
        return not prefix.density_free(cfgs[t.run_key]) and size[by_cell[t.run_key]] >= full

    cells: dict = {}
    for t in trials:
        if not own_packs(t):
            cells.setdefault(shared[t.run_key], set()).add(t.cell)

    def key(t) -> tuple:
        pre = shared[t.run_key]
        if pre is None or own_packs(t) or len(cells[pre]) < 2:
            return by_cell[t.run_key]
        return "pre-training", pre
    return key


def spec(trial) -> dict:
    """A copy in a Tune trial's config: its cell, flat config and (a design's trial) its run's role tag."""
    out = {"cell": trial.cell, "flat": trial.flat}
    if getattr(trial, "role", None):
        out["role"] = trial.role
    return out


def param_space(packed: list[list], meta: dict) -> dict:
    """Tune's param_space: one Tune trial per pack (a pack of one trains exactly as its run alone)."""
    from ray import tune

    return {"trials": tune.grid_search([[spec(t) for t in p] for p in packed]), "meta": meta}


def specs(config: dict) -> list[dict]:
    """The ``{"cell", "flat"}`` of every copy of a Tune trial's config. A Tune run saved by an earlier
    version (``--resume``) may hold the former single-trial shape ``{"trial": {...}}``: a pack of one."""
    if "trials" in config:
        return list(config["trials"])
    return [config["trial"]] if "trial" in config else []


def _values(values) -> str:
    seen = list(dict.fromkeys(values))
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in seen)


def copy_label(s: dict) -> str:
    flat = s.get("flat", {})
    return f"{s.get('cell', '?')} d={flat.get('prune.density', float('nan')):g} s={flat.get('seed', '?')}"


def label(config: dict) -> str:
    """A pack of one's label: ``full d=0.1 s=0``; a pack: ``full d=0.1,0.01 s=0,1 (pack of 4)``."""
    copies = specs(config)
    if len(copies) < 2:
        return copy_label(copies[0]) if copies else "?"
    cells = _values(s.get("cell", "?") for s in copies)
    densities = _values(s.get("flat", {}).get("prune.density", float("nan")) for s in copies)
    seeds = _values(s.get("flat", {}).get("seed", "?") for s in copies)
    return f"{cells} d={densities} s={seeds} (pack of {len(copies)})"


def describe(packed: list[list], trials: int) -> str:
    """``72 trials in 13 packed trials of up to 8`` (or ``72 trials``: one per Tune trial)."""
    if all(len(p) == 1 for p in packed):
        return f"{trials} trials"
    return f"{trials} trials in {len(packed)} packed trials of up to {max(len(p) for p in packed)}"
