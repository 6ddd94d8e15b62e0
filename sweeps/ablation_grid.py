"""Ablation grid: every design cell x density x seed as Ray Tune trials, one MLflow run each.

    python sweeps/ablation_grid.py                       # laptop preset, leave-one-out design
    python sweeps/ablation_grid.py --preset smoke --dry-run
    ray job submit --working-dir . -- python sweeps/ablation_grid.py --preset paper-cifar \\
        --data-dir /data --mlflow-uri http://mlflow:5000 --storage-path /shared/ray_results

Trials whose run_key already has a FINISHED run in the experiment are skipped, so re-running a
sweep only runs what is missing; a run_key's run left RUNNING by a killed driver is continued (from
its newest checkpoint) rather than duplicated. ``--resume`` restores the latest interrupted Tune run
of the sweep; a trial that crashes is retried from its last checkpoint (``--max-failures``). Two
sweeps may share a store: each run_key is claimed by one trial (see sweeps/claims.py). ``--pack K``
trains up to K trials of a cell that differ only in seed, density or learning rates as one Tune trial
(sweeps/packing.py; every trial still its own MLflow run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: sweeps/ is on sys.path, the repo root is not
    _root = str(Path(__file__).resolve().parent.parent)
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = _root
    else:
        sys.path.insert(0, _root)

from sparse_core.cli import exit_now  # noqa: E402
from sparse_core.config import parse_overrides  # noqa: E402
from sweeps import claims, designs, options, packing, presets, relay, sweep_run, tracking, tune_store  # noqa: E402

# A grid has no scheduler: one Tune report per second (plus stage ends) keeps the progress line
# live without a driver round-trip per epoch (see sweeps/trial_sync.py).
REPORT_EVERY_S = 1.0


def parse_args(argv):
    parser = options.OneLineParser(
        prog="python sweeps/ablation_grid.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets:\n" + "\n".join(f"  {p.name:<12} {p.description}" for p in presets.PRESETS.values())
        + "\n\ndesigns: " + ", ".join(designs.DESIGNS) + " (see sweeps/designs.py)")
    parser.add_argument("--preset", default="laptop", choices=list(presets.PRESETS), help="default %(default)s")
    parser.add_argument("--design", default="leave-one-out", choices=designs.DESIGNS, help="default %(default)s")
    parser.add_argument("--cells", help="only these design cells, comma separated (e.g. full,base,rigl; default: the "
                                        "preset's cells of the design, else all)")
    parser.add_argument("--densities", help="comma separated fractions kept, e.g. 0.1,0.01 (default: the preset's)")
    parser.add_argument("--seeds", help="comma separated seeds, e.g. 0,1,2 (default: the preset's)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="RUN",
                        help="restore an interrupted sweep: the latest Tune run of this sweep under --storage-path, "
                             "or the named one")
    parser.add_argument("--no-report", action="store_true",
                        help="do not write the report (tables, plots, index.html) into reports/<sweep>/ beside the "
                             "MLflow store at the end")
    parser.add_argument("--pack", type=int, metavar="K",
                        help="train up to K compatible trials (same cell, differing only in seed, density, learning "
                             "rates or weight decay) together as one Tune trial on the resources of one trial, each "
                             "still its own MLflow run with the same result as alone; 1 = no packing (default: "
                             f"{packing.DEFAULT_PACK} for MLPs, 1 for other models; packs are split further while "
                             "there are fewer packs than trial slots)")
    parser.add_argument("--export", action="store_true",
                        help="log each finished trial's compact sparse model (sparse_core.export) as the MLflow "
                             "artifact model.safetensors")
    options.add_common(parser, "<preset>-<design>")
    return parser, parser.parse_args(argv)


def _numbers(parser, text: str | None, kind, what: str, default):
    if text is None:
        return tuple(default)
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        parser.error(f"--{what} {text!r}: give comma separated numbers")
    if not values:
        parser.error(f"--{what} is empty")
    return values


def plan(parser, args):
    """The validated trial list (raises SystemExit via parser.error on any bad input)."""
    preset = presets.get(args.preset)
    densities = _numbers(parser, args.densities, float, "densities", preset.densities)
    seeds = _numbers(parser, args.seeds, int, "seeds", preset.seeds)
    cells = ([c.strip() for c in args.cells.split(",") if c.strip()] if args.cells
             else list(preset.cells.get(args.design, ())) or None)
    try:
        base = options.base_overrides(preset.base, args.set, args.data_dir)
        given = set(parse_overrides(args.set))  # a --set key applies to every cell, tuned or not
        per_cell = {pattern: {k: v for k, v in extra.items() if k not in given}
                    for pattern, extra in preset.cell_overrides.items()}
        trials, dups = designs.trials(args.design, base, densities, seeds, preset.synflow_rounds, cells, per_cell)
        options.check_trials(t.flat for t in trials)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if args.max_concurrent is not None and args.max_concurrent < 1:
        parser.error("--max-concurrent must be >= 1")
    if args.pack is not None and args.pack < 1:
        parser.error(f"--pack {args.pack}: give at least 1 (1 = one trial per Tune trial, no packing)")
    return preset, trials, dups


def print_table(trials, dups, packed=None) -> None:
    """The trial table; with packs of more than one trial, a column numbering the pack of each."""
    pack_of = {id(t): i for i, p in enumerate(packed or [], 1) for t in p} if packed and max(map(len, packed)) > 1 \
        else {}
    width = max([4] + [len(t.cell) for t in trials])
    print(f"{'#':>4}  {'cell':<{width}}  {'density':>8}  {'seed':>4}  run_key" + ("       pack" if pack_of else ""))
    for i, t in enumerate(trials, 1):
        pack = f"  {pack_of[id(t)]:>9}" if pack_of else ""
        print(f"{i:>4}  {t.cell:<{width}}  {t.density:>8g}  {t.seed:>4}  {t.run_key}{pack}")
    for t, same in dups:
        print(f"      (dropped {t.cell} d={t.density:g} s={t.seed}: same config as {same})")


def main(argv=None) -> int:
    started = time.time()
    parser, args = parse_args(argv)
    preset, trials, dups = plan(parser, args)
    options.check_args(args, preset)
    sweep = args.name or f"{args.preset}-{args.design}"
    for pattern, extra in preset.cell_overrides.items():
        shown = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()
                         if k not in parse_overrides(args.set))
        print(f"preset {preset.name!r}, cells {pattern}: {shown or '(all replaced by --set)'}")
    if args.dry_run:
        packed = packing.packs(trials, args.pack)
        print_table(trials, dups, packed)
        print(f"{packing.describe(packed, len(trials))} in sweep {sweep!r} (dry run: nothing started; packs are split "
              f"further while there are fewer than trial slots)")
        return 0
    uri, exp_id, storage = options.targets(parser, args)
    print(f"sweep {sweep!r}: {len(trials)} trials | MLflow {uri} experiment {args.experiment!r} | "
          f"Tune storage {storage}", flush=True)
    parent = _open_parent(args, sweep, trials, uri, exp_id)

    trial_set = tune_store.trial_set(trials)  # --resume restores a Tune run of this very set
    path = _resume_path(args, sweep, storage, trial_set, len(trials)) if args.resume else None
    if path:  # Tune restores the trials; each skips itself if its run_key is FINISHED meanwhile
        todo, skipped = trials, 0
    else:
        finished = tracking.finished_by_run_key(uri, args.experiment)
        running = claims.live_claims(tracking.client(uri), exp_id)  # e.g. another sweep on this store
        todo = [t for t in trials if t.run_key not in finished and t.run_key not in running]
        skipped = len(trials) - len(todo)
        n_finished = sum(t.run_key in finished for t in trials)
        if n_finished:
            print(f"skipping {n_finished} of {len(trials)} trials: already FINISHED in experiment {args.experiment!r}")
        if skipped > n_finished:
            print(f"skipping {skipped - n_finished} of {len(trials)} trials: running now in another sweep")

    from sweeps import launch  # Ray is imported from here on

    tally = {"launched": 0, "tune_trials": 0, "seconds": 0.0, "failed": 0, "unfinished": 0, "idle_keys": {}}
    if todo:
        tally = _run(args, preset, sweep, todo, uri, exp_id, storage, launch, path, (trial_set, len(trials)), parent)
    else:
        print("nothing to run: every trial is FINISHED")
    n = _counts(uri, args.experiment, todo, tally, skipped)
    wall = time.time() - started
    launched, trial_seconds = tally["launched"], tally["seconds"]
    ratio = f"{wall / trial_seconds:.2f}" if trial_seconds else "-"
    left = f", {n['unfinished']} unfinished: continue with --resume" if n["unfinished"] else ""
    packs = f" | {launched} runs in {tally['tune_trials']} packed trials" if tally["tune_trials"] < launched else ""
    print(f"sweep {sweep!r}: {len(trials)} trials ({launched} launched, {n['trained']} trained, {n['skipped']} skipped, "
          f"{n['failed']} failed{left}){packs} | wall {wall:.1f}s | sum of trial times {trial_seconds:.1f}s | "
          f"wall/sum {ratio}", flush=True)
    text, folder = _summarise(args, sweep, trials, uri, exp_id, report=not tally.get("stopped"))  # not onto a full disk
    failed = bool(n["failed"] or n["unfinished"])
    try:
        sweep_run.close_parent(uri, parent, {"trials": len(trials), "launched": launched, **n, "wall_s": wall},
                               text, folder, failed)
    except Exception as e:  # noqa: BLE001 - the sweep's results are in the store; its parent's summary is extra
        print(f"note: could not write the summary to the sweep's run {parent}: {str(e)[:200]}", flush=True)
    return 1 if failed else 0


def _open_parent(args, sweep: str, trials, uri: str, exp_id: str) -> str:
    """The sweep's parent run (``sweep_run.open_parent``), with this invocation's settings."""
    settings = {"preset": args.preset, "design": args.design, "cells": args.cells or "(all)",
                "densities": ",".join(sorted({f"{t.density:g}" for t in trials}, key=float)),
                "seeds": ",".join(sorted({str(t.seed) for t in trials}, key=int)), "trials": len(trials),
                "set": " ".join(args.set) or "(none)", "pack": args.pack if args.pack is not None else "(default)"}
    groups = sorted({(t.cell, t.flat["prune.density"]) for t in trials})
    try:
        return sweep_run.open_parent(uri, exp_id, sweep, settings, groups, [t.run_key for t in trials])
    except ValueError as e:  # the parent's list of members is not one (runstore.read_members): say so, start nothing
        options.fail(f"{e}; delete that artifact (the runs are unaffected) or choose another --name")


def _counts(uri: str, experiment: str, todo, tally: dict, skipped: int) -> dict:
    """Trained, skipped, failed and unfinished runs of the launched trials, as the store holds them now
    (Tune's view counts every copy of a pack that errored as failed, those that finished included):
    a run_key FINISHED by this sweep is trained, one that a trial found FINISHED or claimed elsewhere is
    skipped, one whose newest run is FAILED failed, the rest unfinished. Tune's counts where the store
    cannot be read."""
    idle = tally.get("idle_keys", {})
    keys = [t.run_key for t in todo if t.run_key not in idle]
    try:
        runs = tracking.search(uri, experiment, "")
    except Exception:  # noqa: BLE001 - e.g. the disk that stopped the sweep is still full
        return {"trained": tally["launched"] - tally["failed"] - tally["unfinished"] - len(idle),
                "skipped": skipped + len(idle), "failed": tally["failed"], "unfinished": tally["unfinished"]}
    status: dict[str, tuple] = {}  # run_key -> (FINISHED?, start time, status) of its deciding run
    for run in runs:
        key, mine = run.data.tags.get("run_key"), (run.info.status == "FINISHED", run.info.start_time or 0,
                                                   run.info.status)
        if key and (key not in status or mine[:2] > status[key][:2]):
            status[key] = mine
    trained = sum(status.get(k, ("", 0, ""))[2] == "FINISHED" for k in keys)
    failed = sum(status.get(k, ("", 0, ""))[2] == "FAILED" for k in keys)
    return {"trained": trained, "skipped": skipped + len(idle), "failed": failed,
            "unfinished": len(keys) - trained - failed}


def _summarise(args, sweep, trials, uri, exp_id, report: bool = True) -> tuple[list[str], str | None]:
    """The end-of-sweep summary (sweeps/summary.py) and, unless --no-report, the report beside the store;
    returns the summary's lines and the report's folder (None: no report)."""
    from sweeps import summary

    preset = presets.get(args.preset)
    chosen = list(dict.fromkeys(t.cell for t in trials))
    every = [label for label, _ in designs.cells(args.design)]
    how = "--cells" if args.cells else f"the {preset.name} preset's; the rest run in --preset digits-study"
    baselines = [c for c in designs.baselines(args.design) if c in chosen]
    outcome = summary.rows(trials, uri, args.experiment, baselines,
                           summary.scope_text(args.design, chosen, every, how))
    subset = chosen if args.cells else None  # a --cells run reports its own cells, not the sweep's earlier ones
    folder = error = None
    if report and not args.no_report and len(outcome.frame):
        print(f"writing the report to {summary.report_dir(uri, sweep)} ...", flush=True)
        files, _, error = summary.write_report(uri, args.experiment, sweep, summary.report_dir(uri, sweep), subset)
        folder = summary.report_dir(uri, sweep) if files else None
    text = summary.lines(outcome, uri=uri, exp_id=exp_id, experiment=args.experiment, sweep=sweep, report=folder,
                         report_error=error, cells=subset)
    print("\n".join(text), flush=True)
    return text, folder


def _tally(results, runs: int = 0) -> dict:
    """Counts of a finished Tune run, in runs (a Tune trial stands for its copies): launched, failed,
    unfinished (and their Tune trial ids), skipped inside the trials, and Tune trials and their seconds.
    ``runs``: the runs of every trial as Progress saw them (a trial that never started has no config in
    its result); those not accounted for are unfinished."""
    out = {"launched": 0, "tune_trials": len(results), "failed": 0, "unfinished": 0, "cut_ids": [], "idle": [],
           "idle_keys": {}, "seconds": sum(r.metrics.get("time_total_s", 0.0) for r in results if r.metrics)}
    for r in results:
        metrics, copies = r.metrics or {}, max(1, len(packing.specs(r.config or {})))
        out["launched"] += copies
        if r.error is not None:
            out["failed"] += copies
        elif not metrics.get("final"):
            out["unfinished"] += copies
            if metrics.get("trial_id"):
                out["cut_ids"].append(metrics["trial_id"])
        else:  # per copy finished, skipped or failed alone
            rows = json.loads(metrics["runs"])
            out["failed"] += sum(row["status"] == "failed" for row in rows)
            out["idle"] += [row["skipped"] for row in rows if row["status"] == "skipped"]
            out["idle_keys"].update((row["run_key"], row["skipped"]) for row in rows if row["status"] == "skipped")
    if runs > out["launched"]:
        out["unfinished"] += runs - out["launched"]
        out["launched"] = runs
    return out


def _resume_path(args, sweep: str, storage: str, trial_set: str, n: int) -> str | None:
    """The Tune run --resume restores; None, with a note, when Tune's state of it is incomplete (the
    sweep then runs as a plain re-run does, which is just as safe: FINISHED runs are skipped and
    interrupted ones continue from their newest checkpoint)."""
    from sweeps import launch

    path = (tune_store.latest_run(storage, sweep, trial_set) if args.resume == "latest"
            else storage.rstrip("/") + "/" + args.resume)
    if path is None or not launch.run_exists(path):
        what = f"of sweep {sweep!r} with these {n} trials" if path is None else repr(args.resume)
        raise SystemExit(f"error: no Tune run {what} to resume under {storage} (run without --resume to start one)")
    problem = launch.restore_problem(path)
    if problem:
        print(f"note: not restoring {path}: {problem} (the driver was killed while Tune saved it); re-running "
              f"the sweep instead: FINISHED runs are skipped, interrupted ones continue from their newest "
              f"checkpoint", flush=True)
        return None
    return path


def _run(args, preset, sweep, todo, uri, exp_id, storage, launch, path: str | None, trial_set: tuple,
         parent: str | None = None) -> dict:
    """Run the trials through Tune (restoring the Tune run at ``path`` if given; a new run records
    ``trial_set``, (hash, count), beside it) under the sweep's ``parent`` run; returns ``_tally``'s counts."""
    from ray import tune

    started_ray = launch.connect()
    try:
        gpus = args.gpus_per_trial
        have_gpus = launch.cluster_gpus()
        if gpus is None:
            gpus = preset.gpus_per_trial if have_gpus else 0.0
        elif gpus > 0 and not have_gpus:
            raise SystemExit(f"error: --gpus-per-trial {gpus} but the Ray cluster has no GPU")
        cpus = launch.require_cpus(args.cpus_per_trial or preset.cpus_per_trial)
        meta = {"sweep": sweep, "tracking_uri": uri, "experiment_id": exp_id, "cpus": cpus,
                "git_commit": tracking.git_commit(launch.ROOT), "report_every_s": REPORT_EVERY_S,
                "export": args.export, "parent_run_id": parent}
        progress = launch.Progress(len(todo), uri, exp_id)
        if path:
            print(f"resuming {path}", flush=True)
            refilled = tune_store.refill_checkpoints(path)
            if refilled:
                print(f"  {refilled} checkpoint(s) Tune's saved state names had been deleted after it was saved: "
                      "each refilled with its trial's newest", flush=True)
            tuner = launch.restore(path, cpus=cpus, gpus=gpus)
        else:
            # the pid keeps two drivers started in the same second (on one storage) out of each other's run
            name = f"{sweep}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            slots = int(launch.cluster_cpus() // cpus) if cpus else 1  # trials Ray can run at once
            if gpus > 0:
                slots = min(slots, int(have_gpus // gpus))
            packed = packing.packs(todo, args.pack, min_packs=min(slots, args.max_concurrent or slots))
            space = packing.param_space(packed, meta)
            tune_cfg = tune.TuneConfig(max_concurrent_trials=args.max_concurrent, reuse_actors=True,
                                       trial_dirname_creator=launch.trial_dirname)
            tuner = launch.tuner(space, cpus=cpus, gpus=gpus, tune_config=tune_cfg,
                                 run_cfg=launch.run_config(name, storage, args.max_failures, [progress]))
            tune_store.remember(storage, name, *trial_set)
        if not path:
            print(f"launching {packing.describe(packed, len(todo))} ({cpus:g} CPU, {gpus:g} GPU each)", flush=True)
        elif args.pack is not None:
            print("note: --pack is ignored with --resume (the restored run keeps its packs)", flush=True)
        results = launch.fit(tuner, relay.Scope.of(uri, exp_id, sweep, todo, storage, parent))
        tally = _tally(results, progress.runs)
        tune_store.drop_finished_checkpoints(results)  # resume never trains a finished trial again
        idle = tally["idle"]
        if idle:  # see TrialRun.open: a FINISHED run_key is never trained again, nor one claimed elsewhere
            print(f"{len(idle)} of {tally['launched']} trials trained nothing: {idle.count('finished')} already "
                  f"FINISHED, {idle.count('claimed')} running in another sweep", flush=True)
        # Interrupted (Ctrl-C, job stopped): close their runs; --resume reopens them.
        tracking.close_unfinished(uri, exp_id, tally["cut_ids"], "KILLED", "sweep interrupted before this trial finished")
        return {**tally, "stopped": progress.stop_reason}
    finally:
        if started_ray:
            launch.shutdown()


if __name__ == "__main__":
    exit_now(main())
