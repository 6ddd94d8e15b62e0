"""Ablation designs: which method variants ("cells") a sweep runs.

The full pipeline of the method (docs/method.md) is five components on top of a plain baseline (Kaiming init,
no mask, magnitude pruning, plain post-training):

- ``zero_init``        ZerO initialisation
- ``mask``             a learned mask during pre-training, pruned by its scores (pruner=mask)
- ``label_smoothing``  post-prune label smoothing
- ``soft_activation``  post-prune SiLU -> ReLU blend
- ``soft_skip``        post-prune decaying identity skips

``leave-one-out``: ``full``, ``full-no_<c>`` for each component c, ``base``, ``base+<c>``, every other pruner on the base
(``pruner=random|snip|grasp|synflow``; ``base`` is the magnitude one), ``gmp`` (gradual magnitude
pruning, the strong simple baseline of Gale et al. 2019, re-split to the same epoch budget) and ``rigl``.
``factorial``: every combination of the five switches, labelled by the components that are on.
(There is no "mask learned, pruned by magnitude" cell: a learned mask is folded into the weights
before any pruner scores them, so magnitude and the mask pruner both score |w m|: the same mask;
the digits study measured the two cells identical to the last digit.)

A cell sets exactly the keys in ``DESIGN_KEYS``; everything else comes from the preset and
``--set``, except that a preset's ``cell_overrides`` (knobs tuned for some cells, e.g. the full
pipeline's mask penalty) apply to the cells whose label matches their pattern only. The learned mask uses ``mask.kind`` from ``--set`` (default sigmoid), so
``--set mask.kind=gates`` ablates the gates variant instead.
"""

from __future__ import annotations

import fnmatch
import itertools
from dataclasses import dataclass

from sparse_core.config import Config, from_flat, run_key, to_flat
from runstore import BASELINE_ROLE, METHOD_ROLE
from sparse_core.registry import TRICKS

# The plain baseline: what every cell starts from (every post-prune trick off).
BASE = {
    "train.method": "prune",  # init -> pre-train -> prune -> post-train
    "init.name": "kaiming",
    "mask.kind": "none",
    "prune.pruner": "magnitude",
    **{TRICKS.get(name).switch: False for name in TRICKS},
}
PIPELINE_NAMES = ("zero_init", "mask")  # the pipeline's components before pruning
BASELINE_PRUNERS = ("random", "snip", "grasp", "synflow")  # magnitude is the base cell itself
DESIGNS = ("leave-one-out", "factorial")


def component_names() -> tuple[str, ...]:
    """zero_init, mask, then every registered post-prune trick (sparse_core.post_prune)."""
    return PIPELINE_NAMES + tuple(TRICKS.names())


def design_keys() -> tuple[str, ...]:
    """Keys a design varies per trial: a --set on them would be silently overwritten, so it is refused."""
    return tuple(BASE) + ("prune.density", "seed")


COMPONENT_NAMES = component_names()
DESIGN_KEYS = design_keys()


@dataclass(frozen=True)
class Trial:
    cell: str  # design cell label, e.g. "full-no_soft_skip"
    flat: dict  # the complete flat config (every key)
    role: str | None = None  # its run's tag role: BASELINE_ROLE for a cell of ``baselines(design)``, else METHOD_ROLE

    @property
    def density(self) -> float:
        return self.flat["prune.density"]

    @property
    def seed(self) -> int:
        return self.flat["seed"]

    @property
    def run_key(self) -> str:
        return run_key(from_flat(self.flat))


def components(mask_kind: str) -> dict[str, dict]:
    """Overrides that switch each component on."""
    return {
        "zero_init": {"init.name": "zero"},
        "mask": {"mask.kind": mask_kind, "prune.pruner": "mask"},
        **{name: {TRICKS.get(name).switch: True} for name in TRICKS},
    }


def _with(parts: dict[str, dict], names) -> dict:
    out = {**BASE, **{TRICKS.get(name).switch: False for name in TRICKS}}  # a trick registered late is off too
    for n in names:
        out.update(parts[n])
    return out


def cells(design: str, mask_kind: str = "sigmoid", synflow_rounds: int = 100) -> list[tuple[str, dict]]:
    """(label, overrides) for every cell of ``design``, in a stable order."""
    parts = components(mask_kind)
    names = component_names()  # read now: a trick registered after import is a component too
    if design == "leave-one-out":
        out = [("full", _with(parts, names))]
        for c in names:
            out.append((f"full-no_{c}", _with(parts, [n for n in names if n != c])))
        out.append(("base", _with(parts, [])))
        out += [(f"base+{c}", _with(parts, [c])) for c in names]
        for p in BASELINE_PRUNERS:
            extra = {"prune.rounds": synflow_rounds} if p == "synflow" else {}
            out.append((f"pruner={p}", {**_with(parts, []), "prune.pruner": p, **extra}))
        out.append(("gmp", _with(parts, [])))  # epochs re-split in trials(): gmp_budget
        out.append(("rigl", {**_with(parts, []), **rigl_cell(synflow_rounds)}))
        return out
    if design == "factorial":
        out = []
        for on in itertools.product((False, True), repeat=len(names)):
            chosen = [n for n, flag in zip(names, on) if flag]
            label = "full" if len(chosen) == len(names) else "+".join(chosen) or "base"
            out.append((label, _with(parts, chosen)))
        return out
    raise ValueError(f"--design {design!r} is not known; choose one of {', '.join(DESIGNS)}")


def baselines(design: str) -> tuple[str, ...]:
    """The cells of ``design`` outside the paper's pipeline, among which a summary picks its reference:
    the plain magnitude ``base``, the other pruners, GMP and RigL (a factorial design has ``base`` only)."""
    if design == "leave-one-out":
        return ("base", *(f"pruner={p}" for p in BASELINE_PRUNERS), "gmp", "rigl")
    if design == "factorial":
        return ("base",)
    raise ValueError(f"--design {design!r} is not known; choose one of {', '.join(DESIGNS)}")


def rigl_cell(synflow_rounds: int) -> dict:
    """The design's RigL: chosen on validation accuracy at 1 % (digits, seeds 0-1, 30 epochs, rigl.delta_t 20)
    among random / SynFlow starts at the target or GraNet-style from 10 % / 30 %: a SynFlow start (its
    rounds) at 30 % density, pruned by magnitude to the target over the drop/grow updates (val 94.1 %;
    the random start at the target 19.1 %). docs/baselines.md has the table."""
    return {"train.method": "rigl", "rigl.start": "synflow", "prune.rounds": synflow_rounds, "rigl.start_density": 0.3}


def cell_extra(label: str, cell_overrides: dict[str, dict] | None) -> dict:
    """The overrides of every ``cell_overrides`` pattern (fnmatch, in order) that matches ``label``."""
    out: dict = {}
    for pattern, extra in (cell_overrides or {}).items():
        if fnmatch.fnmatchcase(label, pattern):
            out.update(extra)
    return out


def gmp_budget(flat: dict) -> dict:
    """Gradual magnitude pruning (Zhu & Gupta 2017) inside the same epoch budget as every other cell:
    of pre + post epochs, 1/6 dense, 2/3 pruning on the cubic schedule, the rest fine-tuning (chosen on
    validation accuracy, digits at 1 %, seed 0: 5/20/5 gives 89.6 %, 5/15/10 86.8 %, 10/10/10 86.1 %)."""
    total = int(flat.get("train.pre_epochs", 10)) + int(flat.get("train.post_epochs", 20))
    pre = max(1, round(total / 6))
    gradual = max(1, round(2 * total / 3))
    return {"train.pre_epochs": pre, "prune.gradual_epochs": gradual, "train.post_epochs": max(0, total - pre - gradual)}


def trials(design: str, base: dict, densities, seeds, synflow_rounds: int,
           only_cells: list[str] | None = None,
           cell_overrides: dict[str, dict] | None = None) -> tuple[list[Trial], list[tuple[Trial, str]]]:
    """Every (cell, density, seed) trial as a validated full flat config.

    ``cell_overrides``: {label pattern: flat overrides}, applied on top of ``base`` to the matching
    cells only (the design's own keys still win; a pattern may match no cell of this design).
    Returns (trials, duplicates): a trial whose run_key equals an earlier one's is dropped and
    listed in ``duplicates`` with the label it duplicates. Raises ValueError naming the cell
    and the bad key.
    """
    clash = sorted(set(base) & (set(design_keys()) - {"mask.kind"}))
    if clash:
        raise ValueError(f"--set {', '.join(clash)}: the design sets these per trial "
                         f"(use --densities / --seeds for prune.density / seed)")
    for pattern, extra in (cell_overrides or {}).items():
        bad = sorted(set(extra) & set(design_keys()))
        if bad:
            raise ValueError(f"cell override {pattern!r} sets {', '.join(bad)}: the design sets these per trial")
    mask_kind = base.get("mask.kind", "sigmoid")
    mask_kind = "sigmoid" if mask_kind == "none" else mask_kind
    base = {k: v for k, v in base.items() if k != "mask.kind"}
    chosen, base_cells = cells(design, mask_kind, synflow_rounds), baselines(design)
    if only_cells:
        known = [label for label, _ in chosen]
        unknown = [c for c in only_cells if c not in known]
        if unknown:
            raise ValueError(f"--cells {', '.join(unknown)} not in design {design!r}; choose from {', '.join(known)}")
        chosen = [(label, o) for label, o in chosen if label in only_cells]
    out: list[Trial] = []
    dups: list[tuple[Trial, str]] = []
    seen: dict[str, str] = {}
    for seed in seeds:
        for density in densities:
            for label, overrides in chosen:
                flat = {**base, **cell_extra(label, cell_overrides), **overrides, "prune.density": density,
                        "seed": seed}
                if label == "gmp":
                    flat.update(gmp_budget({**Config().to_flat(), **flat}))
                try:
                    cfg = from_flat(flat)
                except ValueError as e:
                    raise ValueError(f"cell {label!r} (density {density}, seed {seed}): {e}") from None
                trial = Trial(label, to_flat(cfg), BASELINE_ROLE if label in base_cells else METHOD_ROLE)
                key = run_key(cfg)
                if key in seen:
                    dups.append((trial, seen[key]))
                    continue
                seen[key] = label
                out.append(trial)
    return out, dups
