"""A Ray Tune sweep against the honest baseline: the same trials in one plain Python process.

For each size (by default 8 and 72 trials of the laptop preset's leave-one-out design) it runs,
in alternating order:

- **sweep**: the real command, ``python sweeps/ablation_grid.py`` (a subprocess: Python start-up,
  imports, a fresh SQLite MLflow store, a fresh local Ray runtime and its shutdown all count),
  1 CPU per trial, every core a slot.
- **plain**: one ``python`` process with 1 torch thread calling ``sparse_core.train.run`` on the
  same trial configs in order (the sweep's own planning, ``ablation_grid.plan``), nothing else:
  no Ray, no MLflow, no checkpoints.

It checks that both give the same test accuracy per run_key (the sweep's from MLflow), then
reports wall and CPU-second ratios sweep / plain, and from a linear fit over the sizes the fixed
cost and the cost per trial of each. Target (issue 17; 2 idle cores): sweep wall <= 0.6 x plain
at the largest size, sweep fixed cost <= 8 s. Secondary: the old "ideal" (sum of the trials'
``seconds`` metric / slots), where the sweep's time goes (start-up phases, shutdown, in-trial
overhead) and its CPU seconds per process (driver, Ray's gcs/raylet/agents, workers).

    python benchmarks/sweep_efficiency.py                # 8 + 72 trials, ~5 min on 2 idle CPU cores
    python benchmarks/sweep_efficiency.py --only small   # only the 8-trial size, ~1 min
    python benchmarks/sweep_efficiency.py --repeats 3    # 3 alternating pairs per size: medians
    python benchmarks/sweep_efficiency.py --tiny         # 8 one-epoch trials of a tiny MLP (smoke test)

The sweep gets no ``RAY_ADDRESS``, so it always starts (and stops) its own local Ray runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from procstat import TreeSampler, machine_busy
from timing import ROOT, linear_fit  # also puts the repo root on sys.path

import runstore  # noqa: E402

WALL_RATIO_TARGET, FIXED_TARGET_S = 0.6, 8.0
SMALL_CELLS, SMALL_DENSITIES = "full,base,pruner=synflow,rigl", "0.1,0.01"  # 4 cells x 2 densities = 8 trials
# --tiny: 8 trials with almost nothing to do (16-unit 2-layer MLP, no pre-training, one epoch).
TINY = ["--preset", "smoke", "--cells", "base,base+label_smoothing,base+soft_activation,pruner=random",
        "--densities", "0.1,0.01", "--seeds", "0", "--set", "train.pre_epochs=0", "--set", "train.post_epochs=1"]
DRIVER = "driver (ablation_grid.py, Tune loop)"
WORKERS = "trial workers (ray::)"


@dataclass
class Run:
    """One measured command: a sweep or a plain loop."""
    wall: float = 0.0
    cpu: float = 0.0  # CPU seconds of the whole process tree
    peak_rss: int = 0  # bytes, the tree's summed resident memory at its peak
    accs: dict = field(default_factory=dict)  # run_key -> test_acc
    trainer_s: float = 0.0  # sum of the trials' own `seconds`
    cpu_by: dict = field(default_factory=dict)  # sweep: CPU seconds per process category
    machine_busy: float = 0.0
    phases: dict = field(default_factory=dict)  # sweep: start-up phase -> seconds after command start
    startup: float = 0.0  # sweep: command start -> first MLflow run opens
    startup_cpu: float = 0.0  # sweep: CPU seconds of its process tree in that time
    shutdown: float = 0.0  # sweep: last MLflow run closes -> exit
    run_s: float = 0.0  # sweep: sum of MLflow run durations
    worker_nice: dict = field(default_factory=dict)  # sweep: nice value -> CPU seconds of trial workers
    returncode: int = 0


# ---- the plain loop (runs in its own process: --plain-loop OUT SWEEP-ARGS...) -----------------------

def plain_loop(out: str, sweep_args: list[str]) -> int:
    import torch

    torch.set_num_threads(1)
    from sparse_core.config import from_flat
    from sparse_core.train import run
    from sweeps import ablation_grid

    parser, args = ablation_grid.parse_args(sweep_args)
    _, trials, _ = ablation_grid.plan(parser, args)
    results = {}
    for t in trials:
        r = run(from_flat(t.flat))
        results[r["run_key"]] = {"test_acc": r["test_acc"], "seconds": r["seconds"]}
    with open(out, "w") as f:
        json.dump(results, f)
    return 0


def run_plain(sweep_args: list[str], workdir: str) -> Run:
    out = os.path.join(workdir, f"plain-{time.time_ns()}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--plain-loop", out, *sweep_args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, started = machine_busy(), time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid, "plain loop")
    sampler.start()
    output, _ = proc.communicate()
    res = Run(wall=time.time() - started, returncode=proc.returncode, machine_busy=machine_busy() - busy0)
    sampler.finish()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # exact for a waited-for child
    res.cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    res.peak_rss = sampler.peak_rss
    if proc.returncode != 0:
        print(output[-3000:] + f"\nerror: the plain loop exited with {proc.returncode}", file=sys.stderr)
        return res
    with open(out) as f:
        results = json.load(f)
    res.accs = {k: v["test_acc"] for k, v in results.items()}
    res.trainer_s = sum(v["seconds"] for v in results.values())
    return res


# ---- the sweep ---------------------------------------------------------------------------------------

def tune_times(storage: str) -> list[float]:
    """time_total_s of each trial's last result (Tune's result.json files under storage)."""
    out = []
    for dirpath, _, files in os.walk(storage):
        if "result.json" in files:
            with open(os.path.join(dirpath, "result.json")) as f:
                lines = [line for line in f if line.strip()]
            if lines:
                out.append(float(json.loads(lines[-1]).get("time_total_s", 0.0)))
    return out


def run_sweep(name: str, sweep_args: list[str], workdir: str, verbose: bool) -> Run:
    from sweeps import tracking

    run_dir = tempfile.mkdtemp(prefix=f"{name}-", dir=workdir)  # a fresh MLflow store every time: its set-up counts
    uri = f"sqlite:///{run_dir}/mlflow.db"
    cmd = [sys.executable, os.path.join(ROOT, "sweeps", "ablation_grid.py"), *sweep_args, "--experiment", name,
           "--mlflow-uri", uri, "--storage-path", os.path.join(run_dir, "ray_results")]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    print(f"running sweep {name!r}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    busy0, started = machine_busy(), time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid, DRIVER)
    sampler.start()
    lines, phases = [], {}
    for line in proc.stdout:
        lines.append(line)
        # ablation_grid.py flushes these lines: they time-stamp its start-up phases
        if line.startswith("sweep ") and "MLflow" in line and "imports + MLflow store" not in phases:
            phases["imports + MLflow store"] = time.time() - started
        elif line.startswith("launching ") and "Ray start + Tuner" not in phases:
            phases["Ray start + Tuner"] = time.time() - started
        if verbose:
            sys.stderr.write(line)
    proc.wait()
    ended = time.time()
    sampler.finish()
    res = Run(wall=ended - started, returncode=proc.returncode, machine_busy=machine_busy() - busy0,
              cpu=sampler.total_cpu(), cpu_by=sampler.by_category(), peak_rss=sampler.peak_rss, phases=phases,
              worker_nice=sampler.cpu_by_nice(WORKERS))
    if proc.returncode != 0:
        print("".join(lines[-40:]) + f"\nerror: sweep {name!r} exited with {proc.returncode}", file=sys.stderr)
        return res
    by_key = tracking.finished_by_run_key(uri, name)  # the trials' runs (a sweep may log others)
    runs = list(by_key.values())

    def final(run, key: str):  # the results at full precision (tags; older runs: metrics), as analysis reads them
        return runstore.final_metrics(run.data.metrics, run.data.tags).get(key)

    res.accs = {k: final(r, "test_acc") for k, r in by_key.items()}
    res.trainer_s = sum(final(r, "seconds") or 0.0 for r in runs)
    res.run_s = sum((r.info.end_time - r.info.start_time) / 1000 for r in runs)
    res.phases["tune time_total_s summed"] = sum(tune_times(os.path.join(run_dir, "ray_results")))
    if runs:
        res.startup = min(r.info.start_time for r in runs) / 1000 - started
        res.startup_cpu = sampler.cpu_at(started + res.startup)
        res.shutdown = ended - max(r.info.end_time for r in runs) / 1000
    return res


# ---- report --------------------------------------------------------------------------------------------

def med(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def same_results(sweep: Run, plain: Run) -> tuple[int, int]:
    """(run_keys with an equal test accuracy, run_keys in either)."""
    keys = sweep.accs.keys() | plain.accs.keys()
    return sum(sweep.accs.get(k) == plain.accs.get(k) for k in keys), len(keys)


def report(sizes: dict[str, int], pairs: dict[str, list[tuple[Run, Run]]], slots: int) -> bool:
    ok = True
    print("\n## sweep vs plain loop (same configs; plain = 1 process, 1 torch thread, train.run in order); "
          "medians over repeats")
    head = (f"{'size':<6} {'trials':>6} {'sweep wall s':>12} {'plain wall s':>12} {'wall ratio':>10} "
            f"{'sweep CPU s':>11} {'plain CPU s':>11} {'CPU ratio':>9} {'sweep MB':>8} {'plain MB':>8}  same results")
    print(head)
    for name, n in sizes.items():
        ps = pairs[name]
        equal = [same_results(s, p) for s, p in ps]
        ok &= all(e == t == n for e, t in equal)
        print(f"{name:<6} {n:>6} {med(s.wall for s, _ in ps):12.1f} {med(p.wall for _, p in ps):12.1f} "
              f"{med(s.wall / p.wall for s, p in ps):10.2f} {med(s.cpu for s, _ in ps):11.1f} "
              f"{med(p.cpu for _, p in ps):11.1f} {med(s.cpu / p.cpu for s, p in ps):9.2f} "
              f"{med(s.peak_rss for s, _ in ps) / 2**20:8.0f} {med(p.peak_rss for _, p in ps) / 2**20:8.0f}  "
              + ", ".join(f"{e}/{t}" for e, t in equal))
    print("same results: run_keys whose final test accuracy is equal in the sweep (MLflow) and the plain loop")
    fit = {}
    if len(sizes) >= 2:
        xs = [n for n in sizes.values()]
        print("\n## linear fit over the sizes: wall = fixed + per trial x trials (median wall per size)")
        print(f"{'':<6} {'fixed s':>8} {'per trial s':>11}")
        for i, label in enumerate(("sweep", "plain")):
            ys = [med(pair[i].wall for pair in pairs[name]) for name in sizes]
            fit[label] = linear_fit(xs, ys)
            print(f"{label:<6} {fit[label][0]:8.1f} {fit[label][1]:11.2f}")
    largest = max(sizes, key=sizes.get)
    ratio = med(s.wall / p.wall for s, p in pairs[largest])
    fixed = fit["sweep"][0] if fit else None
    verdict = "meets" if ratio <= WALL_RATIO_TARGET and (fixed is None or fixed <= FIXED_TARGET_S) else "MISSES"
    print(f"\n{largest} ({sizes[largest]} trials): wall ratio sweep/plain {ratio:.2f}, sweep fixed cost "
          + (f"{fixed:.1f}s" if fit else "n/a (needs two sizes)")
          + f" -> {verdict} the target wall ratio <= {WALL_RATIO_TARGET:g}, fixed <= {FIXED_TARGET_S:g} s")

    print(f"\n## secondary: the old 'ideal' (sum of the trials' `seconds` / {slots} slots), first repeat")
    print(f"{'size':<6} {'wall s':>7} {'ideal s':>7} {'wall/ideal':>10} {'tune ideal s':>12} {'start-up':>8} "
          f"{'shutdown':>8} {'in-trial ovh/trial':>18} {'trainer s/trial sweep':>21} {'plain':>6}")
    for name, n in sizes.items():
        s, p = pairs[name][0]
        ideal, tune_ideal = s.trainer_s / slots, s.phases.get("tune time_total_s summed", 0.0) / slots
        print(f"{name:<6} {s.wall:7.1f} {ideal:7.1f} {s.wall / ideal if ideal else float('nan'):10.2f} "
              f"{tune_ideal:12.1f} {s.startup:8.1f} {s.shutdown:8.1f} {(s.run_s - s.trainer_s) / n:18.2f} "
              f"{s.trainer_s / n:21.2f} {p.trainer_s / n:6.2f}")
    print("start-up: command start -> first MLflow run opens; shutdown: last run closes -> exit; in-trial overhead:\n"
          "MLflow run open -> finish minus the trainer's `seconds`; trainer s/trial: the trainer's own time per\n"
          "trial inside the sweep and in the plain loop (higher in the sweep = slower trials there).")
    for name in sizes:
        s = pairs[name][0][0]
        marks = "; ".join(f"{k} {v:.1f}" for k, v in s.phases.items() if not k.startswith("tune"))
        print(f"start-up phases, {name} (seconds after command start): {marks}; first MLflow run {s.startup:.1f}")
        if s.startup_cpu:  # CPU-bound: no ordering of that work (overlap, threads) fits in less wall on these cores
            print(f"start-up CPU, {name}: the sweep's processes used {s.startup_cpu:.1f} CPU s before the first MLflow "
                  f"run opened: at least {s.startup_cpu / slots:.1f} s of wall on {slots} cores in any order")
    cats = sorted({c for name in sizes for c in pairs[name][0][0].cpu_by})
    if cats:
        width = max(len(c) for c in cats + ["(machine busy CPU-s during the run)"])
        print("\n## CPU seconds by process of the sweep (first repeat; from /proc, lower bounds)")
        print(f"{'process':<{width}}  " + "  ".join(f"{name:>8}" for name in sizes))
        rows = [(c, lambda r, c=c: r[0].cpu_by.get(c, 0.0)) for c in cats] + [
            ("(plain loop, whole process)", lambda r: r[1].cpu),
            ("(machine busy CPU-s during the sweep)", lambda r: r[0].machine_busy),
            ("(machine CPU-s available)", lambda r: r[0].wall * slots)]
        for label, get in rows:
            print(f"{label:<{width}}  " + "  ".join(f"{get(pairs[name][0]):8.1f}" for name in sizes))
        for name in sizes:
            nice = pairs[name][0][0].worker_nice
            print(f"trial workers' CPU seconds by nice value, {name}: "
                  + (", ".join(f"nice {k}: {v:.1f}" for k, v in sorted(nice.items())) or "-")
                  + f" (the plain loop runs at nice {os.nice(0)}, this shell's)")
    return ok


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--plain-loop"]:
        return plain_loop(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="only 8 one-epoch trials of a tiny MLP (the smoke test)")
    p.add_argument("--preset", default="laptop", help="preset of both sizes (default %(default)s)")
    p.add_argument("--cells", help="design cells of the large size (default: all of leave-one-out)")
    p.add_argument("--densities", help="densities of the large size (default: the preset's)")
    p.add_argument("--seeds", help="seeds of both sizes (default: the preset's)")
    p.add_argument("--small-cells", default=SMALL_CELLS, help="cells of the small size (default %(default)s)")
    p.add_argument("--small-densities", default=SMALL_DENSITIES, help="densities of the small size (default %(default)s)")
    p.add_argument("--only", choices=("small", "large"), help="run one size only (no fit)")
    p.add_argument("--repeats", type=int, default=1, help="sweep/plain pairs per size, order alternating (default 1)")
    p.add_argument("--keep", metavar="DIR", help="keep the MLflow stores and Tune storage in DIR (default: a "
                                                 "temporary folder, removed)")
    p.add_argument("--verbose", action="store_true", help="echo the sweeps' output to stderr")
    p.add_argument("--pack", type=int, help="the sweep's --pack (default: ablation_grid's default, packing MLP "
                                            "trials); the plain loop always runs one trial after another")
    p.add_argument("--threads", type=int, help="ignored (accepted for symmetry with the other benchmarks: "
                                               "every trial, in the sweep and in the plain loop, uses 1 torch thread)")
    args = p.parse_args(argv)

    import torch
    from importlib.metadata import version

    slots = os.cpu_count() or 1  # ablation_grid's local runtime gets every CPU; 1 CPU per trial
    print(f"# torch {torch.__version__} | ray {version('ray')} | mlflow {version('mlflow')} | "
          f"python {platform.python_version()} | {slots} CPU(s)")
    print("# device cpu (1 CPU and 1 torch thread per trial, in the sweep and in the plain loop)")

    from sweeps import ablation_grid

    common = ["--cpus-per-trial", "1", "--max-failures", "0"] + (["--pack", str(args.pack)] if args.pack else [])
    if "--no-report" in ablation_grid.parse_args([])[0].format_help():
        common.append("--no-report")  # the end-of-sweep report (tables, plots) has no counterpart in the plain loop
    seeds = ["--seeds", args.seeds] if args.seeds else []
    small = ["--preset", args.preset, "--cells", args.small_cells, "--densities", args.small_densities, *seeds]
    large = ["--preset", args.preset, *seeds]
    for flag in ("cells", "densities"):
        if getattr(args, flag):
            large += [f"--{flag}", getattr(args, flag)]
    wanted = {"tiny": TINY} if args.tiny else {"small": small, "large": large}
    if args.only and not args.tiny:
        wanted = {args.only: wanted[args.only]}

    sizes = {}
    for name, a in wanted.items():
        parser, parsed = ablation_grid.parse_args(a + common)
        sizes[name] = len(ablation_grid.plan(parser, parsed)[1])
    workdir = args.keep or tempfile.mkdtemp(prefix="sweep_efficiency_")
    os.makedirs(workdir, exist_ok=True)
    pairs: dict[str, list[tuple[Run, Run]]] = {name: [] for name in wanted}
    try:
        for r in range(args.repeats):
            for i, (name, a) in enumerate(wanted.items()):
                sweep_first = (r + i) % 2 == 0
                plain = None if sweep_first else run_plain(a + common, workdir)
                sweep = run_sweep(name, a + common, workdir, args.verbose)
                plain = plain or run_plain(a + common, workdir)
                if sweep.returncode or plain.returncode:
                    return 1
                pairs[name].append((sweep, plain))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if not report(sizes, pairs, slots):
        print("\nerror: the sweep and the plain loop disagree on some run's test accuracy (or ran different trials)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
