"""The tuned study: every compared method gets the same Optuna budget, then its best settings run on
seeds the search never saw, paired across methods.

For each method (``METHODS``) and each density (default 1 % and 0.3 %), a TPE search (Optuna, sampler
seed 0) of ``--trials`` trials on config seed 0 maximises **validation** accuracy (``objective`` reads
nothing else of a run's result; a test checks it), over the method's knobs (``space``: the learning rate
and weight decay for every method, plus what the method itself has: the learned mask's learning rate and
target warm-up, the post-pruning tricks' knobs, RigL's drop fraction, update interval and start density).
Then each method's best settings train with seeds 1-5 (``--confirm-seeds``), and ``analysis.table`` gives
mean, 95 % CI and the paired test against the best method by validation accuracy, per density. Every
method trains 30 epochs, as in the defaults study. Each search's cost (trials, CPU seconds) is recorded.

Runs as a plain process pool (no Ray, no MLflow: what is studied is the methods, not the sweep
machinery); results append to ``<out>/searches.jsonl`` and ``<out>/confirm.jsonl`` (a re-run skips what
is there), tables to ``<out>/table_tuned.md`` and ``<out>/tuning.md``.

    python benchmarks/tuned_study.py --trials 12 --workers 2     # 5-10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]  # the repository and benchmarks/

DIGITS = {"data.name": "digits", "model.name": "mlp", "train.pre_epochs": 10, "train.post_epochs": 20,
          "train.latency_rounds": 0}
PIPELINE = {"init.name": "zero", "mask.kind": "sigmoid", "prune.pruner": "mask", "post.label_smoothing": True,
            "post.soft_activation": True, "post.soft_skip": True}
# method -> flat overrides on DIGITS (30 epochs each, as in the defaults study)
# (labels as the design's, so analysis.table knows the baselines: base, gmp, rigl, pruner=*)
METHODS = {
    "full": PIPELINE,
    "base+mask": {"mask.kind": "sigmoid", "prune.pruner": "mask"},
    "base+mask(hardconcrete)": {"mask.kind": "hardconcrete", "prune.pruner": "mask"},
    "gmp": {"train.pre_epochs": 5, "prune.gradual_epochs": 20, "train.post_epochs": 5},
    "pruner=imp": {"prune.rounds": 5, "prune.round_epochs": 2, "train.post_epochs": 12},  # iterative magnitude
    "pruner=synflow": {"prune.pruner": "synflow", "prune.rounds": 100},
    "pruner=snip": {"prune.pruner": "snip"},
    "pruner=grasp": {"prune.pruner": "grasp"},
    "pruner=random": {"prune.pruner": "random"},
    "rigl": {"train.method": "rigl", "rigl.start": "synflow", "prune.rounds": 100, "rigl.start_density": 0.3,
             "rigl.delta_t": 20},
}
COMMON = {"train.lr": ("log", 0.005, 0.3), "train.weight_decay": ("log", 1e-5, 1e-2)}


def space(flat: dict) -> dict:
    """The knobs a search tunes for a method (its flat config): COMMON plus the method's own."""
    from sparse_core.registry import TRICKS

    out = dict(COMMON)
    if flat.get("mask.kind", "none") != "none":
        out.update({"mask.lr": ("log", 0.01, 1.0), "mask.warmup": ("float", 0.1, 0.9)})
    for name in TRICKS:
        if flat.get(TRICKS.get(name).switch):
            out.update({k: ("float", lo, hi) for k, (_, lo, hi) in TRICKS.get(name).knobs.items()})
    if flat.get("train.method") == "rigl":
        out.update({"rigl.alpha": ("float", 0.1, 0.5), "rigl.delta_t": ("int", 5, 100),
                    "rigl.start_density": ("float", 0.05, 0.5)})
    return out


def objective(result: dict) -> float:
    """What a search maximises: validation accuracy of the final model, nothing else of the result."""
    return result["val_acc"]


def _suggest(trial, knobs: dict) -> dict:
    out = {}
    for key, (kind, lo, hi) in knobs.items():
        if kind == "log":
            out[key] = trial.suggest_float(key, lo, hi, log=True)
        elif kind == "int":
            out[key] = trial.suggest_int(key, int(lo), int(hi), log=True)
        else:
            out[key] = trial.suggest_float(key, lo, hi)
    return out


def search(job: tuple) -> dict:
    """One method's search at one density: ``trials`` TPE trials on seed 0; its best by validation."""
    method, density, trials = job
    import optuna
    import torch

    from sparse_core.config import from_flat
    from sparse_core.train import TrainingDiverged, run

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    flat = {**DIGITS, **METHODS[method], "prune.density": density, "seed": 0}
    knobs = space(flat)
    started = time.process_time()

    def one(trial) -> float:
        try:
            return objective(run(from_flat({**flat, **_suggest(trial, knobs)})))
        except TrainingDiverged:
            return 0.0  # a diverged sample counts against the budget, at chance's floor

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(one, n_trials=trials)
    return {"method": method, "density": density, "trials": trials, "knobs": sorted(knobs),
            "cpu_s": round(time.process_time() - started, 1), "best_val_acc": study.best_value,
            "best_settings": study.best_params, "values": [t.value for t in study.trials]}


def confirm(job: tuple) -> dict:
    """A method's best settings at one density and one seed the search never used."""
    method, density, settings, seed = job
    import torch

    from sparse_core.config import from_flat
    from sparse_core.train import run

    torch.set_num_threads(1)
    flat = {**DIGITS, **METHODS[method], **settings, "prune.density": density, "seed": seed}
    r = run(from_flat(flat))
    r.pop("history")
    return {"cell": method, **r}


def _jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def _pool_map(fn, jobs: list, workers: int, path: str, label) -> list[dict]:
    out = []
    with mp.get_context("spawn").Pool(workers) as pool, open(path, "a") as f:
        for i, row in enumerate(pool.imap_unordered(fn, jobs), 1):
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            out.append(row)
            print(f"[{i}/{len(jobs)}] {label(row)}", flush=True)
    return out


def tuning_table(searches: list[dict]) -> str:
    lines = ["| method | density | trials | CPU s | best val acc | knobs searched | best settings |",
             "|---|---:|---:|---:|---:|---|---|"]
    for s in sorted(searches, key=lambda s: (s["density"], s["method"]), reverse=True):
        best = ", ".join(f"{k}={v:.3g}" for k, v in s["best_settings"].items())
        lines.append(f"| {s['method']} | {100 * s['density']:g} % | {s['trials']} | {s['cpu_s']:.0f} | "
                     f"{100 * s['best_val_acc']:.2f} | {', '.join(s['knobs'])} | {best} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=12, help="Optuna trials per method and density (the budget)")
    ap.add_argument("--densities", default="0.01,0.003")
    ap.add_argument("--confirm-seeds", default="1,2,3,4,5")
    ap.add_argument("--methods", help="comma separated (default: all of METHODS)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "tuned_study"))
    args = ap.parse_args(argv)
    methods = args.methods.split(",") if args.methods else list(METHODS)
    densities = [float(d) for d in args.densities.split(",")]
    seeds = [int(s) for s in args.confirm_seeds.split(",")]
    if 0 in seeds:
        raise SystemExit("error: --confirm-seeds must not include 0, the seed the searches use")
    os.makedirs(args.out, exist_ok=True)
    spath, cpath = os.path.join(args.out, "searches.jsonl"), os.path.join(args.out, "confirm.jsonl")
    have = {(s["method"], s["density"]): s for s in _jsonl(spath) if s["trials"] == args.trials}
    todo = [(m, d, args.trials) for d in densities for m in methods if (m, d) not in have]
    for s in _pool_map(search, todo, args.workers, spath, lambda s: f"search {s['method']} d={s['density']:g}: "
                       f"best val {100 * s['best_val_acc']:.2f} ({s['cpu_s']:.0f} CPU s)"):
        have[(s["method"], s["density"])] = s
    done = {(r["cell"], r["density_target"], r["config"]["seed"]) for r in _jsonl(cpath)}
    jobs = [(m, d, have[(m, d)]["best_settings"], s) for d in densities for m in methods for s in seeds
            if (m, d, s) not in done]
    _pool_map(confirm, jobs, args.workers, cpath, lambda r: f"confirm {r['cell']} d={r['density_target']:g} "
              f"s={r['config']['seed']}: test {100 * r['test_acc']:.2f}")
    return report(args.out, [have[(m, d)] for d in densities for m in methods], methods, densities, seeds)


def report(out: str, searches: list[dict], methods: list[str], densities: list[float], seeds: list[int]) -> int:
    from analysis.table import ablation_table, to_markdown
    from study_plain import frame

    rows = [r for r in _jsonl(os.path.join(out, "confirm.jsonl")) if r["cell"] in methods
            and r["density_target"] in densities and r["config"]["seed"] in seeds]
    table = to_markdown(ablation_table(frame(rows)))
    tuning = tuning_table(searches)
    for name, text in (("table_tuned.md", table), ("tuning.md", tuning)):
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
    print(tuning)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
