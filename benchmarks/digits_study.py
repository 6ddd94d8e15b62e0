"""The accuracy-vs-density study on the digits MLP, through the sweep and analysis packages.

Study: the ``digits-study`` preset (sweeps/presets.py) x the ``leave-one-out`` design
(sweeps/designs.py): the full pipeline and its leave-one-out ablation, the plain baseline with
each component added, every baseline pruner (magnitude = ``base``, random, SNIP, GraSP, SynFlow
with 100 rounds), gradual magnitude pruning (``gmp``) and RigL, at densities 10 %, 3 %, 1 %,
0.5 %, 0.3 % and 0.1 %, seeds 0-4, through ``sweeps.ablation_grid`` (Ray Tune, one MLflow run
each). Then ``analysis`` prints the ablation table (mean ± 95 % CI, paired tests against the best
baseline by validation) and saves the accuracy-vs-density plots (PNG + PDF), and a last table puts
the full pipeline next to the best baseline per density (both picked by validation accuracy).

Tuning (``--tune``): one ``sweeps.optuna_search`` per compared method (``SEARCHES``: the full
pipeline and every baseline), each with the same budget (same number of samples, same epochs,
TPE seeded, at density 1 %, on a seed the study does not use), each picked by validation accuracy.
Their best settings are *printed*, not applied: they go into the preset's ``cell_overrides`` by
hand, with a comment saying where each came from, so the study itself is reproducible from the
preset alone.

Everything lands in ``--out`` (default results/digits_study/): mlflow.db (SQLite store),
ray_results/, ablation_table.md/.csv, accuracy_vs_density*.png/.pdf, layer_density.png/.pdf,
tuning.json. Re-running skips trials already FINISHED in the store (the sweep's idempotency).

    python benchmarks/digits_study.py --tune        # tuning (~2 min) then the study (~2.5 min) on 2 CPU cores
    python benchmarks/digits_study.py               # the study with the preset's settings
    python benchmarks/digits_study.py --tune-only   # only the searches
    python benchmarks/digits_study.py --tiny        # smoke: 2 densities, 1 seed, 4 cells, tiny MLP (~30 s)

One local Ray runtime serves every sweep of the run (started here, shut down at the end);
``RAY_ADDRESS`` is ignored so the study never lands on somebody else's cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root, run as a script

PRESET = "digits-study"
EXPERIMENT = "digits-study"
FULL = "full"
# One search per compared method, every one with the same budget (--samples), selected on validation
# accuracy: the full pipeline and every baseline of the study (gmp as its cell splits the epochs).
SEARCHES = {
    "full": ["init.name=zero", "mask.kind=sigmoid", "prune.pruner=mask", "post.label_smoothing=true",
             "post.soft_activation=true", "post.soft_skip=true"],
    "base": [],  # one-shot magnitude
    "gmp": ["train.pre_epochs=5", "prune.gradual_epochs=20", "train.post_epochs=5"],
    "synflow": ["prune.pruner=synflow", "prune.rounds=100"],
    "snip": ["prune.pruner=snip"],
    "grasp": ["prune.pruner=grasp"],
    "random": ["prune.pruner=random"],
    "rigl": ["train.method=rigl"],
}
TINY_SEARCHES = ("full", "synflow")  # the smoke run exercises the path, not the fairness
BASELINES = ("base", "gmp", "pruner=random", "pruner=snip", "pruner=grasp", "pruner=synflow", "rigl")  # base = magnitude
# The tiny run: a 16-unit, 2-layer MLP, 1 + 2 epochs, 4 cells, 2 densities, 1 seed.
TINY_SET = ["model.width=16", "model.depth=2", "train.pre_epochs=1", "train.post_epochs=2"]
TINY_CELLS = "full,base,pruner=synflow,rigl"


def _quiet_sweep(fn, argv: list[str]) -> int:
    """Run a sweep CLI in-process with its progress on stderr (stdout keeps the study's tables)."""
    with contextlib.redirect_stdout(sys.stderr):
        return fn(argv)


def tune(args, uri: str, storage: str) -> dict:
    """One Optuna search per method, the same budget each, best by validation accuracy; returns
    {name: {best_val_acc, test_acc_of_best, settings, trials, wall_s, ...}}."""
    from sweeps import optuna_search, tracking

    out = {}
    for name, method in SEARCHES.items():
        if args.tiny and name not in TINY_SEARCHES:
            continue
        sweep = f"tune-{name}"
        argv = ["--preset", PRESET, "--density", str(args.tune_density), "--seed", str(args.tune_seed),
                "--num-samples", str(args.samples), "--sampler-seed", "0", "--name", sweep,
                "--experiment", f"{args.experiment}-tuning", "--mlflow-uri", uri, "--storage-path", storage,
                "--cpus-per-trial", "1", "--max-failures", "0"]  # a diverged sample fails the same way again
        for s in method + args.set:
            argv += ["--set", s]
        experiment = f"{args.experiment}-tuning"

        def mine(status, experiment=experiment, sweep=sweep):
            return [r for r in tracking.load_runs(uri, experiment, sweep=sweep, status=status)
                    if r["prune.density"] == args.tune_density and r["seed"] == args.tune_seed]

        done = mine(None)
        if len(done) >= args.samples:  # this search already ran into this store: read it back
            print(f"[digits_study] Optuna search {name!r}: {len(done)} runs already in {experiment!r}, not re-run",
                  file=sys.stderr, flush=True)
        else:
            print(f"[digits_study] Optuna search {name!r}: {args.samples} samples at density {args.tune_density:g}, "
                  f"seed {args.tune_seed}", file=sys.stderr, flush=True)
            code = _quiet_sweep(optuna_search.main, argv)
            if code != 0:  # a diverged sample can fail; it still counts against the budget
                print(f"[digits_study] warning: Optuna search {name!r} exited {code} (failed trials)",
                      file=sys.stderr, flush=True)
        raw = tracking.search(uri, experiment, f"tags.sweep = '{sweep}'")
        span = (max(r.info.end_time or r.info.start_time for r in raw) - min(r.info.start_time for r in raw)) / 1000
        every = mine(None)
        runs = [r for r in every if r["status"] == "FINISHED" and math.isfinite(r.get("val_acc", math.nan))]
        if not runs:
            raise SystemExit(f"error: Optuna search {name!r} finished no trial")
        runs.sort(key=lambda r: r["val_acc"], reverse=True)  # selection on validation, never test
        knobs = [k for k in optuna_search.SPACE if len({r[k] for r in runs}) > 1]
        best = runs[0]
        out[name] = {"method": method, "samples": args.samples, "finished": len(runs),
                     "failed": sum(r["status"] == "FAILED" for r in every), "span_s": round(span, 1),
                     "density": args.tune_density, "seed": args.tune_seed, "best_val_acc": best["val_acc"],
                     "test_acc_of_best": best["test_acc"],
                     "best_settings": {k: best[k] for k in knobs}, "best_run_id": best["run_id"],
                     "top5_val_acc": [r["val_acc"] for r in runs[:5]],
                     "median_val_acc": runs[len(runs) // 2]["val_acc"]}
    return out


def print_tuning(results: dict) -> None:
    print("## Optuna searches (TPE, sampler seed 0, the same samples and epochs for every method; picked by "
          "validation accuracy; span: first trial start -> last trial end)\n")
    print("| search | samples (finished, failed) | span s | best val acc | its test acc | median val | top 5 val | "
          "best settings |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for name, r in results.items():
        top = ", ".join(f"{100 * a:.1f}" for a in r["top5_val_acc"])
        settings = ", ".join(f"{k}={v:.4g}" for k, v in r["best_settings"].items())
        print(f"| {name} | {r['samples']} ({r['finished']}, {r['failed']}) | {r['span_s']:.0f} | "
              f"{100 * r['best_val_acc']:.2f} | {100 * r['test_acc_of_best']:.2f} | {100 * r['median_val_acc']:.2f} | "
              f"{top} | {settings} |")
    print()


def study(args, uri: str, storage: str) -> int:
    from sweeps import ablation_grid

    argv = ["--preset", PRESET, "--design", "leave-one-out", "--experiment", args.experiment, "--mlflow-uri", uri,
            "--storage-path", storage, "--cpus-per-trial", "1", "--name", PRESET, "--no-report"]  # its own below
    if args.densities:
        argv += ["--densities", args.densities]
    if args.seeds:
        argv += ["--seeds", args.seeds]
    if args.cells:
        argv += ["--cells", args.cells]
    for s in args.set:
        argv += ["--set", s]
    print(f"[digits_study] study: ablation_grid.py {' '.join(argv)}", file=sys.stderr, flush=True)
    return _quiet_sweep(ablation_grid.main, argv)


def analyse(args, uri: str) -> dict:
    """Ablation table (printed + .md/.csv), plots (PNG + PDF), full pipeline vs best baseline."""
    from analysis import plots
    from analysis.load import load_runs
    from analysis.table import ablation_table, to_csv, to_markdown

    df = load_runs(uri, [args.experiment])
    df = df[df["sweep"] == PRESET].reset_index(drop=True)
    table = ablation_table(df, "test_acc", "cell", "prune.density")
    text = to_markdown(table)
    print("## Ablation table: final test accuracy (%) by cell and density\n")
    print(text)
    files = []
    for name, body in (("ablation_table.md", text), ("ablation_table.csv", to_csv(table))):
        path = os.path.join(args.out, name)
        with open(path, "w") as f:
            f.write(body)
        files.append(path)
    files += plots.accuracy_vs_density(df, os.path.join(args.out, "accuracy_vs_density"), "test_acc", "cell",
                                       title="digits MLP: every cell of the leave-one-out design")
    contenders = df[df["cell"].isin((FULL,) + BASELINES)]
    files += plots.accuracy_vs_density(contenders, os.path.join(args.out, "accuracy_vs_density_contenders"),
                                       "test_acc", "cell",
                                       title="digits MLP: full pipeline vs baselines; mean and 95 % CI over seeds")
    files += plots.layer_density_plot(contenders, os.path.join(args.out, "layer_density"), 0.01
                                      if (contenders["prune.density"] == 0.01).any() else None, "cell", uri)
    comparison(table, ablation_table(df, "val_acc", "cell", "prune.density"))
    return {"files": files, "table": table}


def comparison(table, val_table) -> None:
    """Per density: the full pipeline, the best leave-one-out variant and the best baseline, both picked
    by mean validation accuracy (never test), shown with their test accuracy."""
    cells = table.cells.set_index(["cell", "prune.density"])
    val = val_table.cells.set_index(["cell", "prune.density"])

    def get(cell, d):
        if (cell, d) not in cells.index:
            return math.nan, math.nan
        row = cells.loc[(cell, d)]
        return row["mean"], row["ci_high"] - row["mean"]

    def fmt(m, s):
        if not math.isfinite(m):
            return "–"
        return f"{100 * m:.2f}" + (f" ± {100 * s:.2f}" if math.isfinite(s) else "")

    def val_mean(cell, d):
        m = val.loc[(cell, d), "mean"] if (cell, d) in val.index else math.nan
        return m if math.isfinite(m) else -1.0

    variants = [c for c in table.row_order if str(c).startswith("full")]
    print("## Full pipeline vs the best baseline (final test accuracy %, mean ± 95 % CI; picks by validation)\n")
    print("| density | full | best full-* variant | best baseline | full − best baseline |")
    print("|---|---:|---:|---:|---:|")
    for d in table.col_order:
        fm, fs = get(FULL, d)
        vbest = max(variants, key=lambda c, d=d: val_mean(c, d))
        bbest = max((b for b in BASELINES if b in table.row_order), key=lambda c, d=d: val_mean(c, d), default=None)
        bm, bs = get(bbest, d) if bbest else (math.nan, math.nan)
        diff = f"{100 * (fm - bm):+.2f}" if math.isfinite(fm) and math.isfinite(bm) else "–"
        print(f"| {100 * d:g} % | {fmt(fm, fs)} | {vbest}: {fmt(*get(vbest, d))} | {bbest}: {fmt(bm, bs)} | {diff} |")
    print()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "digits_study"),
                   help="output folder (default results/digits_study/)")
    p.add_argument("--experiment", default=EXPERIMENT, help="MLflow experiment of the study (default %(default)s; "
                                                            "the searches use <experiment>-tuning)")
    p.add_argument("--mlflow-uri", help="tracking URI (default sqlite:///<out>/mlflow.db)")
    p.add_argument("--tune", action="store_true", help="run the two Optuna searches first")
    p.add_argument("--tune-only", action="store_true", help="run only the two Optuna searches")
    p.add_argument("--samples", type=int, default=60, help="samples per Optuna search (default %(default)s)")
    p.add_argument("--tune-density", type=float, default=0.01, help="density the searches tune at (default 0.01)")
    p.add_argument("--tune-seed", type=int, default=3, help="config seed of the searches; not one of the study's "
                                                           "(default %(default)s)")
    p.add_argument("--densities", help="override the preset's densities (comma list)")
    p.add_argument("--seeds", help="override the preset's seeds (comma list)")
    p.add_argument("--cells", help="only these design cells (comma list)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every trial of the searches and the study (repeatable)")
    p.add_argument("--tiny", action="store_true",
                   help="smoke run: tiny MLP, 1+2 epochs, densities 0.1,0.01, seed 0, cells "
                        f"{TINY_CELLS}; with --tune, 2 samples per search")
    args = p.parse_args(argv)
    if args.tiny:
        args.set = TINY_SET + args.set
        args.densities = args.densities or "0.1,0.01"
        args.seeds = args.seeds or "0"
        args.cells = args.cells or TINY_CELLS
        args.samples = 2 if args.samples == p.get_default("samples") else args.samples
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    uri = args.mlflow_uri or f"sqlite:///{os.path.join(args.out, 'mlflow.db')}"
    storage = os.path.join(args.out, "ray_results")

    os.environ.pop("RAY_ADDRESS", None)  # always a local runtime of our own
    import torch

    from sweeps import launch

    print(f"# torch {torch.__version__} | {os.cpu_count()} CPU(s) | device cpu | out {args.out}")
    started = time.time()
    walls: dict[str, float] = {}
    launch.connect(num_cpus=os.cpu_count() or 1)
    try:
        tuning = None
        if args.tune or args.tune_only:
            t0 = time.time()
            tuning = tune(args, uri, storage)
            walls["tuning"] = time.time() - t0
            with open(os.path.join(args.out, "tuning.json"), "w") as f:
                json.dump(tuning, f, indent=2)
            print_tuning(tuning)
        if args.tune_only:
            print(f"wall: {walls['tuning']:.0f}s tuning")
            return 0
        t0 = time.time()
        code = study(args, uri, storage)
        walls["study sweep"] = time.time() - t0
    finally:
        launch.shutdown()
    t0 = time.time()
    result = analyse(args, uri)
    walls["analysis"] = time.time() - t0
    walls["total"] = time.time() - started
    print("files:\n" + "\n".join(f"  {path}" for path in result["files"]))
    print("wall: " + ", ".join(f"{k} {v:.0f}s" for k, v in walls.items()))
    return code


if __name__ == "__main__":
    sys.exit(main())
