"""Packed trials (``sparse_core.packed``): K runs trained as one stacked model vs the same K runs one at a
time, and a single trial's start-up.

``loop`` (default): for K = 1, 4, 16, 64, the laptop preset's trial config (digits MLP 64-100x5-10,
magnitude pruning to 10 %) with K seeds, trained by ``run_packed`` (one pack) and by ``train.run`` one
config after another, in the same process, alternating (packed, one-by-one; then reversed) over
``--repeats`` rounds. CPU seconds (process time, 1 torch thread) and wall seconds per trial; the ratio is
one-by-one / packed in the same round (median over rounds). Every copy's test accuracy must equal its
single run's (checked; a mismatch exits 1). The one-by-one baseline runs min(K, ``--baseline-max``)
configs per round and is scaled per trial (its cost per trial does not depend on K).

``startup``: one default ``python -m sparse_core`` run (the laptop trial, 30 epochs) as a whole
process, CPU seconds of the child (user + sys) and wall, for this checkout and for ``--before REV``
(a git worktree of that revision), alternating; and the import alone (``import sparse_core.train``).

    python benchmarks/packed_trials.py --threads 1                      # loop, K = 1, 4, 16, 64
    python benchmarks/packed_trials.py startup --before 326b57d         # single-trial start-up, before/after
    python benchmarks/packed_trials.py --tiny                           # seconds: the smoke test
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from timing import ROOT, apply_threads, print_header, print_table, ratio_of  # also puts the repo root on sys.path

import torch  # noqa: E402

from sparse_core.config import Config  # noqa: E402
from sparse_core.runner import run_packed  # noqa: E402
from sparse_core.train import run  # noqa: E402

LAPTOP = {"data.name": "digits", "train.latency_rounds": 0, "train.device": "cpu"}  # preset laptop's base = defaults


def _timed(fn) -> tuple[float, float, object]:
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c, time.perf_counter() - w, out


def loop(args) -> int:
    base = {**LAPTOP, "train.pre_epochs": args.pre, "train.post_epochs": args.post}
    print_header(f"packed vs one-by-one training, digits MLP, {args.pre}+{args.post} epochs, magnitude 10 %",
                 [torch.device("cpu")])
    rows, bad = [], 0
    for k in args.ks:
        cfgs = [Config().replace(**base, seed=s) for s in range(k)]
        n_base = min(k, args.baseline_max)
        run_packed(cfgs[:1]), run(cfgs[0])  # warm-up of both paths (first-call costs)
        cpu_ratio, wall_ratio, per = [], [], {"packed": [], "one": [], "packed_w": [], "one_w": []}
        for r in range(args.repeats):
            order = ("packed", "one") if r % 2 == 0 else ("one", "packed")
            got = {}
            for name in order:
                if name == "packed":
                    c, w, got["packed"] = _timed(lambda: run_packed(cfgs))
                    per["packed"].append(c / k)
                    per["packed_w"].append(w / k)
                else:
                    c, w, got["one"] = _timed(lambda: [run(cfg) for cfg in cfgs[:n_base]])
                    per["one"].append(c / n_base)
                    per["one_w"].append(w / n_base)
            cpu_ratio.append(per["one"][-1] / per["packed"][-1])
            wall_ratio.append(per["one_w"][-1] / per["packed_w"][-1])
            for a, b in zip(got["one"], got["packed"]):
                if not isinstance(b, dict) or a["test_acc"] != b["test_acc"] or a["val_acc"] != b["val_acc"]:
                    bad += 1
        rows.append([str(k), f"{statistics.median(per['one']):.3f}", f"{statistics.median(per['packed']):.3f}",
                     str(ratio_of(cpu_ratio)), f"{statistics.median(per['one_w']):.3f}",
                     f"{statistics.median(per['packed_w']):.3f}", str(ratio_of(wall_ratio)), str(n_base)])
        print(f"K={k} done", file=sys.stderr, flush=True)
    print_table(["K", "one CPU s/trial", "packed CPU s/trial", "CPU ratio [IQR]", "one wall s/trial",
                 "packed wall s/trial", "wall ratio [IQR]", "baseline runs"], rows)
    print(f"ratio = one-by-one / packed per trial in the same round (median over {args.repeats} rounds); "
          f"results identical: {'yes' if not bad else f'NO ({bad} mismatches)'}")
    return 1 if bad else 0


def _child(cmd: list[str], cwd: str) -> tuple[float, float]:
    """(CPU seconds user+sys of the child, wall seconds) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": cwd, "OMP_NUM_THREADS": "1"}  # older CLIs have no --threads
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} in {cwd} failed:\n{proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall


def startup(args) -> int:
    epochs = ["train.pre_epochs=1", "train.post_epochs=1"] if args.tiny else []
    trial = [sys.executable, "-m", "sparse_core", "--quiet", "train.device=cpu", *epochs]  # 1 thread: OMP_NUM_THREADS
    imports = [sys.executable, "-c", "import sparse_core.train"]
    trees = {"now": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            before = os.path.join(tmp, "before")
            subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", before, args.before], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            trees["before"] = before
        try:
            print_header("single-trial start-up: python -m sparse_core (laptop trial) as a whole process",
                         [torch.device("cpu")])
            times = {(t, what): [] for t in trees for what in ("trial", "import")}
            for r in range(args.repeats):
                for t in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                    times[(t, "trial")].append(_child(trial, trees[t]))
                    times[(t, "import")].append(_child(imports, trees[t]))
            rows = []
            for t in trees:
                trial_cpu = [c for c, _ in times[(t, "trial")]]
                imp_cpu = [c for c, _ in times[(t, "import")]]
                rows.append([t, f"{statistics.median(trial_cpu):.2f}", f"{statistics.median(w for _, w in times[(t, 'trial')]):.2f}",
                             f"{statistics.median(imp_cpu):.2f}"])
            if "before" in trees:
                ratios = [a[0] / b[0] for a, b in zip(times[("now", "trial")], times[("before", "trial")])]
                rows.append(["now/before", str(ratio_of(ratios)), "", ""])
            print_table(["tree", "trial CPU s", "trial wall s", "import CPU s"], rows)
            print(f"median of {args.repeats} alternating rounds; before = {args.before or '-'}")
        finally:
            if args.before:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", trees["before"]],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", nargs="?", choices=("loop", "startup"), default="loop")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run (the smoke test); its figures mean nothing")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--ks", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16, 64])
    ap.add_argument("--pre", type=int, default=2, help="pre-training epochs of the loop's trials (default 2)")
    ap.add_argument("--post", type=int, default=4, help="post-training epochs of the loop's trials (default 4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-max", type=int, default=8, help="one-by-one runs per round at most (default 8)")
    ap.add_argument("--before", metavar="REV", help="startup: also time this git revision (a temporary worktree)")
    args = ap.parse_args(argv)
    apply_threads(args)
    if args.tiny:
        args.ks, args.pre, args.post, args.repeats, args.baseline_max = [1, 3], 1, 1, 1, 3
    return loop(args) if args.mode == "loop" else startup(args)


if __name__ == "__main__":
    sys.exit(main())
