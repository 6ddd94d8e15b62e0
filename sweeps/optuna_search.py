"""Optuna (TPE) search over the continuous knobs of one fixed method, through Ray Tune.

    python sweeps/optuna_search.py --set init.name=zero --set mask.kind=sigmoid --set prune.pruner=mask \\
        --set post.label_smoothing=true --density 0.01 --num-samples 24 --asha

Only the knobs the method uses are searched (mask.* with a learned mask, post.smoothing with
label smoothing, post.soft_fraction with a soft schedule); ``--params`` picks them by hand.
Every trial is an MLflow run with cell ``optuna``, in its own experiment (default
``sparsity-sweep-optuna``, so the grid's tables never mix with it). Trials are ranked, stopped (ASHA)
and picked by validation accuracy (``val_acc``), never test accuracy; the best config is printed as
``--set`` overrides to paste into ``ablation_grid.py``. Trials are not packed (``ablation_grid.py --pack``):
TPE proposes one trial at a time from the results so far, and ASHA stops trials one at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: sweeps/ is on sys.path, the repo root is not
    _root = str(Path(__file__).resolve().parent.parent)
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = _root
    else:
        sys.path.insert(0, _root)

from sparse_core.cli import exit_now  # noqa: E402
from sparse_core.config import from_flat, run_key, to_flat  # noqa: E402
from sparse_core.registry import TRICKS  # noqa: E402
from runstore import SEARCH_CELL, ui_link  # noqa: E402
from sweeps import designs, optuna_store, options, packing, presets, relay, sweep_run, tracking  # noqa: E402

# knob -> (distribution, low, high, used when); log-uniform for scale-like knobs.
SPACE = {
    "train.lr": ("loguniform", 1e-3, 0.3, lambda c: True),  # peak learning rate of every stage
    # constant L1 pressure per mask entry: gates, or a mask without density control (mask.target=false)
    "mask.lambda_l1": ("loguniform", 1e-7, 1e-3, lambda c: c.mask.kind == "gates" or (c.mask.kind != "none"
                                                                                        and not c.mask.target)),
    "mask.lr": ("loguniform", 1e-2, 1.0, lambda c: c.mask.kind != "none"),  # learning rate of the mask scores
    # how fast a steered mask's target falls to the density (fraction of pre-training)
    "mask.warmup": ("uniform", 0.1, 0.9, lambda c: c.mask.kind in ("sigmoid", "hardconcrete") and c.mask.target),
    # each post-prune trick's knobs (sparse_core.post_prune), searched when the trick is on
    **{key: (*spec, lambda c, keys=tuple(n for n in TRICKS if key in TRICKS.get(n).knobs):
                  any(TRICKS.get(n).enabled(c.to_flat()) for n in keys))
       for name in TRICKS for key, spec in TRICKS.get(name).knobs.items()},
}
CELL = SEARCH_CELL
METRIC = "val_acc"  # what the search maximises, ASHA compares and the best pick uses


def parse_args(argv):
    parser = options.OneLineParser(prog="python sweeps/optuna_search.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="searchable knobs: " + ", ".join(SPACE))
    parser.add_argument("--preset", default="laptop", choices=list(presets.PRESETS),
                        help="base config (data, model, epochs, resources); default %(default)s")
    parser.add_argument("--density", type=float, default=0.01, help="prune.density, fixed (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="config seed, fixed (default %(default)s)")
    parser.add_argument("--params", help="comma separated knobs to search (default: those the method uses)")
    parser.add_argument("--num-samples", type=int, default=16, help="trials (default %(default)s)")
    parser.add_argument("--sampler-seed", type=int, default=0, help="TPE sampler seed (default %(default)s)")
    parser.add_argument("--asha", action="store_true",
                        help=f"stop weak trials early (ASHA on {METRIC}; rungs start after pruning)")
    parser.add_argument("--optuna-storage", metavar="URL",
                        help="Optuna storage of the study (an RDB URL or a SQLite file path; default: optuna.db beside "
                             "a SQLite MLflow store, else in the current directory); the same search run again "
                             "continues its study")
    options.add_common(parser, "optuna-<preset>")
    parser.set_defaults(max_concurrent=None, experiment=f"{options.DEFAULT_EXPERIMENT}-optuna")
    return parser, parser.parse_args(argv)


def plan(parser, args):
    preset = presets.get(args.preset)
    try:
        base = options.base_overrides(preset.base, args.set, args.data_dir)
        flat = {**base, "prune.density": args.density, "seed": args.seed}
        cfg = from_flat(flat)
        options.check_trials([flat])
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if args.params:
        knobs = [k.strip() for k in args.params.split(",") if k.strip()]
        unknown = [k for k in knobs if k not in SPACE]
        if unknown:
            parser.error(f"--params {', '.join(unknown)}: not searchable; choose from {', '.join(SPACE)}")
    else:
        knobs = [k for k, spec in SPACE.items() if spec[3](cfg)]
    if args.num_samples < 1:
        parser.error("--num-samples must be >= 1")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        parser.error("--max-concurrent must be >= 1")
    fixed = {k: v for k, v in from_flat(flat).to_flat().items() if k not in knobs}
    options.check_args(args, preset)
    return preset, cfg, fixed, knobs


def main(argv=None) -> int:
    started = time.time()
    parser, args = parse_args(argv)
    preset, cfg, fixed, knobs = plan(parser, args)  # every input checked, one line and exit 2 for a bad one
    sweep = args.name or f"optuna-{args.preset}"
    space_text = ", ".join(f"{k} ~ {SPACE[k][0]}({SPACE[k][1]:g}, {SPACE[k][2]:g})" for k in knobs)
    if args.dry_run:
        method = " ".join(f"{k}={fixed[k]}" for k in designs.BASE)
        print(f"sweep {sweep!r}: {args.num_samples} trials of TPE over {space_text}\n"
              f"fixed method: {method} prune.density={args.density:g} seed={args.seed}")
        return 0
    uri, exp_id, storage = options.targets(parser, args)
    study = (optuna_store.storage_url(uri, args.optuna_storage), optuna_store.study_name(sweep, fixed, knobs,
                                                                                         args.sampler_seed))
    done = optuna_store.prepare(*study)
    todo = max(0, args.num_samples - done)
    print(f"sweep {sweep!r}: {args.num_samples} trials, TPE over {space_text} | MLflow {uri} "
          f"experiment {args.experiment!r} | Optuna study {study[1]!r} in {study[0]}"
          + (f" ({done} done already, {todo} to run)" if done else ""), flush=True)
    settings = {"preset": args.preset, "density": args.density, "seed": args.seed, "knobs": ",".join(knobs),
                "num_samples": args.num_samples, "sampler_seed": args.sampler_seed, "asha": args.asha,
                "set": " ".join(args.set) or "(none)", "optuna_study": study[1], "optuna_storage": study[0]}
    parent = sweep_run.open_parent(uri, exp_id, sweep, settings)
    # a continued study seeds TPE past its first draws (the same seed would propose the trials it has again)
    results = _tune(args, preset, cfg, fixed, knobs, sweep, uri, exp_id, storage, study, todo, parent,
                    args.sampler_seed + done) if todo else []
    code, lines = summarize(results, sweep, started, knobs, args, uri, exp_id) if todo else \
        (0, [f"sweep {sweep!r}: the study already has {done} of {args.num_samples} trials; nothing to run"])
    if not todo:
        print(lines[0])
    folder = _report(uri, sweep, study, lines)
    sweep_run.close_parent(uri, parent, {"trials": args.num_samples, "launched": len(results), "done_before": done},
                           lines, folder, bool(code))
    return code


def _tune(args, preset, cfg, fixed, knobs, sweep, uri, exp_id, storage, study, todo: int, parent: str, seed: int):
    """The search's ``todo`` trials through Ray Tune, TPE seeded with ``seed``; Tune's results."""
    from ray import tune

    from sweeps import launch

    started_ray = launch.connect()
    try:
        have_gpus = launch.cluster_gpus()
        gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (preset.gpus_per_trial if have_gpus else 0.0)
        if gpus > 0 and not have_gpus:
            raise SystemExit(f"error: --gpus-per-trial {gpus} but the Ray cluster has no GPU")
        cpus = launch.require_cpus(args.cpus_per_trial or preset.cpus_per_trial)
        dist = {"loguniform": tune.loguniform, "uniform": tune.uniform}
        meta = {"sweep": sweep, "tracking_uri": uri, "experiment_id": exp_id, "cpus": cpus,
                "git_commit": tracking.git_commit(launch.ROOT), "parent_run_id": parent}
        concurrent = args.max_concurrent or max(1, int(launch.cluster_cpus() // cpus))
        tune_cfg = search_config(cfg, todo, seed, concurrent, args.asha, study=study,
                                 packs=(fixed, {k: dist[SPACE[k][0]](SPACE[k][1], SPACE[k][2]) for k in knobs}),
                                 trial_dirname_creator=launch.trial_dirname)
        name = f"{sweep}-{time.strftime('%Y%m%d-%H%M%S')}"
        progress = launch.Progress(todo, uri, exp_id)
        tuner = launch.tuner({"meta": meta}, cpus=cpus, gpus=gpus, tune_config=tune_cfg,
                             run_cfg=launch.run_config(name, storage, args.max_failures, [progress]))
        return launch.fit(tuner, relay.Scope(uri, exp_id, sweep, trial_set(fixed, knobs), storage, parent))
    finally:
        if started_ray:
            launch.shutdown()


def _report(uri: str, sweep: str, study: tuple[str, str], lines: list[str]) -> str | None:
    """Optuna's views of the study (``optuna_store.plots``) and the summary in ``reports/<sweep>/``; the
    folder, or None when nothing could be drawn."""
    from sweeps.summary import report_dir

    folder = report_dir(uri, sweep)
    try:
        files = optuna_store.plots(*study, folder)
    except Exception as e:  # noqa: BLE001 - the search's results are in MLflow and the study; the plots are extra
        print(f"note: Optuna's plots were not drawn: {str(e)[:200]}")
        return None
    if not files:
        return None
    images = "".join(f'<h2>{os.path.basename(f)[7:-4]}</h2><img src="{os.path.basename(f)}">' for f in files)
    text = "\n".join(lines).replace("&", "&amp;").replace("<", "&lt;")
    with open(os.path.join(folder, "index.html"), "w") as f:
        f.write(f"<!doctype html><title>{sweep}</title><h1>Optuna search {sweep}</h1><pre>{text}</pre>{images}")
    print(f"Optuna's views of the study: {os.path.join(folder, 'index.html')}")
    return folder


def summarize(results, sweep: str, started: float, knobs, args, uri: str, exp_id: str) -> tuple[int, list[str]]:
    """The search's closing lines, printed: its counts, the best trial by validation accuracy and its settings
    as ``--set`` overrides for the grid, the UI link; the exit code (1 if a trial failed or none completed)
    and the lines."""
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    ended = [r for r in results if r.error is None and r.metrics and r.metrics.get("final")]
    complete = [r for r in ended if not r.metrics.get("failed_copies")]  # its copy failed alone: e.g. it diverged
    failed = len(ended) - len(complete) + sum(1 for r in results if r.error is not None)
    seconds = sum(r.metrics.get("time_total_s", 0.0) for r in results if r.metrics)
    wall = time.time() - started
    say(f"sweep {sweep!r}: {len(results)} trials ({len(complete)} complete, {failed} failed, "
        f"{len(results) - len(complete) - failed} stopped early) | wall {wall:.1f}s | "
        f"sum of trial times {seconds:.1f}s")
    if not complete:
        say("no trial completed")
        return 1, lines
    best = best_result(complete)
    (spec,) = packing.specs(best.config)  # a search's trial is a pack of one
    tuned = {k: spec["flat"][k] for k in knobs}
    (run,) = json.loads(best.metrics["runs"])
    say(f"best by {METRIC}: val {100 * best.metrics[METRIC]:.2f} %, test {100 * best.metrics['test_acc']:.2f} % "
        f"(mlflow run {run.get('mlflow_run_id')}, experiment {args.experiment!r}):")
    for k, v in tuned.items():
        say(f"  {k} = {v:.6g}")
    extra = [s for s in args.set if s.split("=", 1)[0].strip() not in designs.DESIGN_KEYS]
    say("for ablation_grid.py: " + " ".join([f"--set {s}" for s in extra]
                                            + [f"--set {k}={_short(v)}" for k, v in tuned.items()]))
    command, url = ui_link(uri, exp_id)
    say(f"all trials in the MLflow UI: {url}" + (f" (serve it with: {command})" if command else ""))
    return (1 if failed else 0), lines


def trial_set(fixed: dict, knobs) -> Callable[[str, dict], tuple[str, dict] | None]:
    """The search's trials for the relay (``relay.Scope``): a config with the fixed values, each knob
    within its range of ``SPACE``, and ``key`` its run_key."""
    def trial(key: str, flat: dict) -> tuple[str, dict] | None:
        try:
            cfg = from_flat(flat)
        except (ValueError, TypeError, KeyError):
            return None
        norm = to_flat(cfg)
        if run_key(cfg) != key or any(norm.get(k) != v for k, v in fixed.items()):
            return None
        inside = all(SPACE[k][1] <= norm[k] <= SPACE[k][2] for k in knobs)
        return (CELL, norm) if inside else None

    return trial


def searcher(sampler_seed: int, study: tuple[str, str] | None = None, packs: tuple[dict, dict] | None = None):
    """Seeded TPE; ``study``: (Optuna storage URL, study name) that keeps the trials (``optuna_store``), else
    in memory. ``packs``: (fixed flat config, knob -> Tune domain): every suggestion becomes a Tune trial of
    one copy, ``{"trials": [{"cell": CELL, "flat": {...}}]}`` (``sweeps/packing.py``). Tune cannot search
    inside a list, so the searcher owns the knobs' space, named ``trial/flat/<knob>`` in the study (the
    names its trials have had: a study from before continues); without ``packs`` it takes Tune's param space."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class PackOfOne(OptunaSearch):
        def suggest(self, trial_id: str):
            config = super().suggest(trial_id)
            if isinstance(config, dict) and self.fixed is not None:
                config = {"trials": [{"cell": CELL, "flat": {**self.fixed, **config["trial"]["flat"]}}]}
            return config

    kept = {"storage": optuna_store.rdb(study[0]), "study_name": study[1]} if study else {}
    if packs is not None:
        kept.update(space={"trial": {"flat": packs[1]}}, metric=METRIC, mode="max")
    search = PackOfOne(sampler=optuna.samplers.TPESampler(seed=sampler_seed), **kept)
    search.fixed = dict(packs[0]) if packs is not None else None
    return search


def search_config(cfg, num_samples: int, sampler_seed: int, concurrent: int, asha: bool,
                  study: tuple[str, str] | None = None, packs: tuple[dict, dict] | None = None, **kwargs):
    """The TuneConfig of the search: ``searcher`` (at most ``concurrent`` trials at once) maximising
    ``METRIC``, with ASHA on the same metric when ``asha`` (rungs start at the first epoch after pruning)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from sparse_core.train import total_epochs

    search = ConcurrencyLimiter(searcher(sampler_seed, study, packs), max_concurrent=concurrent)
    scheduler = None
    if asha:
        epochs = total_epochs(cfg)
        first = 1 if cfg.train.method == "rigl" else min(epochs, epochs - cfg.train.post_epochs + 1)
        # max_t one past the last epoch: a trial that survives every rung must still send its final result.
        scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs + 1, grace_period=max(1, first), reduction_factor=2)
    return tune.TuneConfig(metric=METRIC, mode="max", search_alg=search, scheduler=scheduler,
                           num_samples=num_samples, reuse_actors=True, **kwargs)


def best_result(results):
    """The result with the highest ``METRIC`` (validation accuracy; a NaN never wins)."""
    def score(result) -> float:
        value = result.metrics.get(METRIC, math.nan)
        return value if math.isfinite(value) else -math.inf

    return max(results, key=score)


def _short(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else str(value)


if __name__ == "__main__":
    exit_now(main())
