"""The main job end to end: ``python sweeps/ablation_grid.py`` (the laptop preset on the embedded default:
local Ray, digits, a fresh SQLite store, the report at the end) as a whole process tree, against the same
command at ``--before REV`` (a temporary git worktree; default: the code before the packed-trials issue)
or with other sweep options (``--before-args``), in the same run.

CPU seconds of every process in the tree (driver, Ray's gcs/raylet/agents, trial workers), polled from
/proc every 0.2 s (``procstat.TreeSampler``: a lower bound, a process loses at most one poll interval),
and wall seconds; the two commands alternate over ``--repeats`` rounds and the ratio is before / now in
the same round. Afterwards the per-run results of both stores are compared by cell, density and seed
(final test and validation accuracy): identical runs are counted, and differences are listed. Results
are only comparable at one revision (``--before HEAD``): between a8843f0~1 and now the trainer's defaults
changed on purpose (e.g. prune.rescale, the learned mask's momentum and float64 sigmoid), so the default
comparison measures cost, and ``--before HEAD --before-args="--pack 1"`` measures whether packing moves a
result (72 of 72 identical on the laptop preset).

    python benchmarks/laptop_e2e.py                                  # now vs a8843f0~1, 2 rounds
    python benchmarks/laptop_e2e.py --before HEAD --before-args="--pack 1"   # packing on vs off, same code
    python benchmarks/laptop_e2e.py --tiny                           # the smoke test: seconds, figures mean nothing
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from procstat import TreeSampler
from timing import ROOT, ratio_of

BEFORE = "a8843f0~1"  # the commit before issue 15 (packed trials) started


def _sweep(tree: str, tmp: str, preset: str, extra: list[str]) -> tuple[float, float, dict[str, float], str]:
    """(CPU s of the tree, wall s, CPU s by category, store URI) of one sweep in a fresh store."""
    os.makedirs(tmp)
    uri = f"sqlite:///{tmp}/mlflow.db"
    cmd = [sys.executable, "sweeps/ablation_grid.py", "--preset", preset, "--mlflow-uri", uri,
           "--storage-path", os.path.join(tmp, "ray"), *extra]
    env = {**os.environ, "PYTHONPATH": tree}  # the worktree's packages before the installed checkout's
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid, interval=0.2)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - started
    sampler.finish()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} in {tree} failed:\n{out[-3000:]}")
    return sampler.total_cpu(), wall, sampler.by_category(), uri


def _finals(uri: str) -> dict[tuple, tuple[float, float]]:
    """(cell, density, seed) -> (final test accuracy, final validation accuracy) of the FINISHED trial runs
    (not by run_key: a revision with other config fields has other run_keys for the same trials)."""
    import runstore

    out = {}
    for run in runstore.search(uri, "sparsity-sweep", "attributes.status = 'FINISHED' and tags.cell != 'analysis'"):
        if "cell" not in run.data.tags or run.data.tags.get(runstore.ROLE_TAG) == runstore.SWEEP_ROLE:
            continue  # the sweep's parent run
        m, p = runstore.final_metrics(run.data.metrics, run.data.tags), run.data.params  # full precision, any era
        key = (run.data.tags["cell"], float(p["prune.density"]), int(p["seed"]))
        out[key] = (m.get("test_acc"), m.get("val_acc"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="laptop")
    ap.add_argument("--args", default="", help="extra sweep options for this checkout")
    ap.add_argument("--before", default=BEFORE, metavar="REV", help=f"the baseline revision (default {BEFORE})")
    ap.add_argument("--before-args", default="", help="extra sweep options for the baseline")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="smoke preset, two cells, one round, baseline = this checkout")
    args = ap.parse_args(argv)
    now_args, before_args = shlex.split(args.args), shlex.split(args.before_args)
    if args.tiny:
        args.preset, args.repeats, args.before = "smoke", 1, "HEAD"
        now_args, before_args = now_args + ["--cells", "base,pruner=snip"], before_args + ["--cells", "base,pruner=snip", "--pack", "1"]
    with tempfile.TemporaryDirectory() as tmp:
        before = ROOT if args.tiny else os.path.join(tmp, "before")
        if not args.tiny:
            subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", before, args.before], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        trees = {"now": (ROOT, now_args), "before": (before, before_args)}
        runs: dict[str, list] = {t: [] for t in trees}
        try:
            for r in range(args.repeats):
                for t in (["now", "before"] if r % 2 == 0 else ["before", "now"]):
                    tree, extra = trees[t]
                    runs[t].append(_sweep(tree, os.path.join(tmp, f"{t}{r}"), args.preset, extra))
                    cpu, wall, _, _ = runs[t][-1]
                    print(f"round {r + 1} {t:<6}: {cpu:7.1f} CPU s, {wall:6.1f} s wall", flush=True)
        finally:
            if not args.tiny:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", before],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"\n{args.preset} preset end to end (whole process tree, CPU s polled from /proc); now {args.args or '(defaults)'}, "
              f"before = {args.before} {' '.join(before_args)}")
        for t in trees:
            cpus, walls = [c for c, *_ in runs[t]], [w for _, w, *_ in runs[t]]
            cats: dict[str, list[float]] = {}
            for _, _, by, _ in runs[t]:
                for k, v in by.items():
                    cats.setdefault(k, []).append(v)
            where = ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in sorted(cats.items(), key=lambda kv: -max(kv[1])))
            print(f"  {t:<6}: CPU s {' / '.join(f'{c:.1f}' for c in cpus)}, wall s {' / '.join(f'{w:.1f}' for w in walls)} ({where})")
        cpu_ratio = ratio_of([b[0] / n[0] for n, b in zip(runs["now"], runs["before"])])
        wall_ratio = ratio_of([b[1] / n[1] for n, b in zip(runs["now"], runs["before"])])
        print(f"  before / now: CPU {cpu_ratio}, wall {wall_ratio} (medians of the rounds' ratios)")
        now_finals, before_finals = _finals(runs["now"][0][3]), _finals(runs["before"][0][3])
        common = sorted(now_finals.keys() & before_finals.keys())
        differ = [k for k in common if now_finals[k] != before_finals[k]]
        print(f"  per-run results (first round): {len(common)} trials (cell, density, seed) in both stores ({len(now_finals)} now, "
              f"{len(before_finals)} before), {len(common) - len(differ)} identical in final test and val accuracy"
              + (f"; differing: {', '.join(f'{k} {now_finals[k]} vs {before_finals[k]}' for k in differ[:8])}" if differ else ""))
        if differ and args.before != "HEAD":
            print("  (a baseline revision whose trainer or defaults differ gives other results: see `git log`; whether "
                  "packing changes a result is measured at one revision: --before HEAD --before-args=\"--pack 1\")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
