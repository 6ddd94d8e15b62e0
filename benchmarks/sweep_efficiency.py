"""How close a Ray Tune sweep comes to the ideal: wall time vs (sum of trial times) / slots.

Runs the real sweep command, ``python sweeps/ablation_grid.py`` (a subprocess, so the wall time
includes Python start-up, imports, the MLflow store, a fresh local Ray runtime and its shutdown),
into a fresh SQLite MLflow store and Tune storage under a temporary folder. Then it reads the
MLflow runs back and reports:

- **wall**: command start -> command exit.
- **ideal**: sum of the trials' ``seconds`` metric (the trainer's own time: data, training,
  pruning, evaluation) / slots, slots = CPUs of the machine / CPUs per trial. ``tune ideal`` is the
  same from Tune's ``time_total_s`` (the whole trainable: trainer + MLflow logging + checkpoints).
- **ratio** wall / ideal, and the target: wall <= 1.2 x ideal + 15 s.
- where the rest goes: **start-up** (command start -> the first trial's MLflow run opens),
  **shutdown** (the last run closes -> command exit), per trial the **in-trial overhead** (MLflow
  run open -> finish, minus ``seconds``: per-epoch MLflow writes, checkpoints, Tune reports) and the
  **gap** (slot time between runs: scheduling, actor reuse, run set-up, the idle tail), and the CPU
  time of each process of the sweep's tree (driver, Ray's gcs/raylet/agents, trial workers), read
  from /proc, because on 2 cores every CPU-second outside the workers is taken from them.

Two sweeps by default: a **near-zero-work** one (8 trials of a 16-unit MLP, 1 epoch: its wall time
is almost all fixed cost) and the **laptop** preset's leave-one-out design (72 trials, 10+20
epochs on the digits MLP). ``--tiny`` runs only the first (the smoke test; its ratio means little).

    python benchmarks/sweep_efficiency.py            # about 2-3 min on 2 CPU cores
    python benchmarks/sweep_efficiency.py --tiny     # about 20-30 s
    python benchmarks/sweep_efficiency.py --preset smoke --cells base,rigl --seeds 0,1,2

The subprocess gets no ``RAY_ADDRESS``, so it always starts (and stops) its own local Ray runtime.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root, run as a script

RATIO_TARGET, FIXED_TARGET_S = 1.2, 15.0  # wall <= 1.2 x ideal + 15 s
# 8 trials with almost nothing to do: 16-unit 2-layer MLP, no pre-training, one post-training epoch.
ZERO_WORK = ["--preset", "smoke", "--cells", "base,base+label_smoothing,base+soft_activation,pruner=random",
             "--densities", "0.1,0.01", "--seeds", "0", "--set", "train.pre_epochs=0", "--set", "train.post_epochs=1"]


# ---- CPU time per process of the sweep's tree (Linux /proc; empty elsewhere) ----------------------

def _proc_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (ppid, cpu seconds user+sys, short name) for every readable process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()  # fields after "(comm)": state, ppid, ...
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        out[int(entry)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / tick, cmd or comm)
    return out


def category(cmd: str, is_root: bool) -> str:
    if is_root:
        return "driver (ablation_grid.py, Tune loop)"
    if "gcs_server" in cmd:
        return "ray gcs_server"
    if "raylet" in cmd:
        return "ray raylet"
    if cmd.startswith("ray::") or "default_worker.py" in cmd:
        return "trial workers (ray::)"
    return "other ray processes (agents, monitors)"


class CpuSampler(threading.Thread):
    """Polls the process tree under ``root`` and keeps each process's last CPU time.

    A process that exits between two polls loses at most one poll interval of CPU time.
    """

    def __init__(self, root: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.last: dict[int, tuple[float, str]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                table = _proc_table()
            except OSError:
                return
            tree, todo = {self.root}, [self.root]
            children: dict[int, list[int]] = {}
            for pid, (ppid, _, _) in table.items():
                children.setdefault(ppid, []).append(pid)
            while todo:
                for child in children.get(todo.pop(), []):
                    if child not in tree:
                        tree.add(child)
                        todo.append(child)
            for pid in tree:
                if pid in table:
                    self.last[pid] = (table[pid][1], category(table[pid][2], pid == self.root))
            self.stop.wait(self.interval)

    def by_category(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for seconds, cat in self.last.values():
            out[cat] = out.get(cat, 0.0) + seconds
        return out


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds, total CPU seconds) of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v) - idle) / tick, sum(v) / tick


# ---- one sweep ------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    name: str
    trials: int = 0
    slots: int = 1
    wall: float = 0.0
    trainer_s: float = 0.0  # sum of the MLflow `seconds` metric
    run_s: float = 0.0  # sum of MLflow run durations (open -> finish)
    tune_s: float = 0.0  # sum of Tune's time_total_s
    startup: float = 0.0
    phases: dict = field(default_factory=dict)  # start-up phase -> seconds after command start
    shutdown: float = 0.0
    span: float = 0.0  # first run opens -> last run closes
    cpu: dict = field(default_factory=dict)
    machine_busy: float = 0.0  # busy CPU seconds of the whole machine during the sweep
    returncode: int = 0

    @property
    def ideal(self) -> float:
        return self.trainer_s / self.slots

    @property
    def tune_ideal(self) -> float:
        return self.tune_s / self.slots

    @property
    def target(self) -> float:
        return RATIO_TARGET * self.ideal + FIXED_TARGET_S

    @property
    def meets(self) -> bool:
        return self.returncode == 0 and self.wall <= self.target


def tune_times(storage: str) -> list[float]:
    """time_total_s of each trial's last result (Tune's result.json files under storage)."""
    import json

    out = []
    for dirpath, _, files in os.walk(storage):
        if "result.json" in files:
            last = None
            with open(os.path.join(dirpath, "result.json")) as f:
                for line in f:
                    if line.strip():
                        last = line
            if last:
                out.append(float(json.loads(last).get("time_total_s", 0.0)))
    return out


def run_sweep(name: str, args: list[str], workdir: str, slots: int, verbose: bool) -> SweepResult:
    from sweeps import tracking

    uri = f"sqlite:///{workdir}/mlflow.db"
    storage = os.path.join(workdir, f"ray_results_{name}")
    cmd = [sys.executable, os.path.join(ROOT, "sweeps", "ablation_grid.py"), *args, "--experiment", name,
           "--mlflow-uri", uri, "--storage-path", storage, "--cpus-per-trial", "1", "--max-failures", "0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    print(f"running sweep {name!r}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    busy0, _ = machine_busy()
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = CpuSampler(proc.pid)
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
    sampler.stop.set()
    sampler.join()
    busy1, _ = machine_busy()
    res = SweepResult(name, slots=slots, wall=ended - started, returncode=proc.returncode,
                      cpu=sampler.by_category(), machine_busy=busy1 - busy0, phases=phases)
    if proc.returncode != 0:
        sys.stderr.write("".join(lines[-40:]))
        print(f"error: sweep {name!r} exited with {proc.returncode}", file=sys.stderr)
        return res
    runs = tracking.search(uri, name, "attributes.status = 'FINISHED'")
    res.trials = len(runs)
    starts = [r.info.start_time / 1000 for r in runs]
    ends = [r.info.end_time / 1000 for r in runs]
    res.trainer_s = sum(r.data.metrics.get("seconds", 0.0) for r in runs)
    res.run_s = sum(e - s for s, e in zip(starts, ends))
    res.tune_s = sum(tune_times(storage))
    if runs:
        res.startup = min(starts) - started
        phases["first trial's MLflow run opens"] = res.startup
        res.shutdown = ended - max(ends)
        res.span = max(ends) - min(starts)
    return res


# ---- report ---------------------------------------------------------------------------------------

def print_report(results: list[SweepResult]) -> None:
    print("\n## wall time vs ideal (ideal = sum of trial `seconds` / slots; target wall <= "
          f"{RATIO_TARGET:g} x ideal + {FIXED_TARGET_S:g} s)")
    head = (f"{'sweep':<10} {'trials':>6} {'slots':>5} {'wall s':>7} {'ideal s':>7} {'wall/ideal':>10} "
            f"{'tune ideal s':>12} {'wall/tune':>9} {'target s':>8}  meets")
    print(head)
    for r in results:
        tr = f"{r.wall / r.tune_ideal:9.2f}" if r.tune_ideal else f"{'-':>9}"
        ratio = f"{r.wall / r.ideal:10.2f}" if r.ideal else f"{'-':>10}"
        print(f"{r.name:<10} {r.trials:>6} {r.slots:>5} {r.wall:7.1f} {r.ideal:7.1f} {ratio} "
              f"{r.tune_ideal:12.1f} {tr} {r.target:8.1f}  {'yes' if r.meets else 'NO'}")

    print("\n## where the wall time goes (seconds; per-trial figures are means)")
    print(f"{'sweep':<10} {'start-up':>8} {'shutdown':>8} {'span':>7} {'trainer/trial':>13} "
          f"{'in-trial ovh/trial':>18} {'gap/trial/slot':>14} {'busy slots %':>12}")
    for r in results:
        if not r.trials:
            continue
        n = r.trials
        slot_time = r.slots * r.span
        print(f"{r.name:<10} {r.startup:8.1f} {r.shutdown:8.1f} {r.span:7.1f} {r.trainer_s / n:13.2f} "
              f"{(r.run_s - r.trainer_s) / n:18.2f} {(slot_time - r.run_s) / n:14.2f} "
              f"{100 * r.trainer_s / slot_time if slot_time else 0:12.0f}")
    print("start-up: command start -> first trial's MLflow run opens; shutdown: last run closes -> exit;\n"
          "in-trial overhead: MLflow run open -> finish minus the trainer's `seconds` (per-epoch MLflow writes,\n"
          "checkpoints, Tune reports, CPU stolen by other processes); gap: slot time outside any run\n"
          "(scheduling, actor reuse, trial set-up, the idle tail) per trial; busy slots: trainer time / (slots x span).")

    print("\n## start-up phases (seconds after command start; each line the end of a phase)")
    for r in results:
        marks = "; ".join(f"{k} {v:.1f}" for k, v in r.phases.items())
        print(f"{r.name:<10} {marks}")
        print(f"{'':<10} (worker start + trainable imports: the gap between the last two)")

    cats = sorted({c for r in results for c in r.cpu})
    if cats:
        print("\n## CPU seconds by process (the sweep's process tree, from /proc)")
        width = max(len(c) for c in cats)
        print(f"{'process':<{width}}  " + "  ".join(f"{r.name:>10}" for r in results))
        for c in cats:
            print(f"{c:<{width}}  " + "  ".join(f"{r.cpu.get(c, 0.0):10.1f}" for r in results))
        print(f"{'(trainer seconds, summed)':<{width}}  " + "  ".join(f"{r.trainer_s:10.1f}" for r in results))
        print(f"{'(machine busy CPU-s)':<{width}}  " + "  ".join(f"{r.machine_busy:10.1f}" for r in results))
        print(f"{'(machine CPU-s available)':<{width}}  "
              + "  ".join(f"{r.wall * (os.cpu_count() or 1):10.1f}" for r in results))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="only the 8-trial near-zero-work sweep (smoke test)")
    p.add_argument("--preset", default="laptop", help="preset of the main sweep (default %(default)s)")
    p.add_argument("--cells", help="design cells of the main sweep (default: all of leave-one-out)")
    p.add_argument("--densities", help="densities of the main sweep (default: the preset's)")
    p.add_argument("--seeds", help="seeds of the main sweep (default: the preset's)")
    p.add_argument("--no-zero-work", action="store_true", help="skip the near-zero-work sweep")
    p.add_argument("--keep", metavar="DIR", help="keep the MLflow store and Tune storage in DIR (default: a "
                                                 "temporary folder, removed)")
    p.add_argument("--verbose", action="store_true", help="echo the sweeps' output to stderr")
    p.add_argument("--threads", type=int, help="ignored (accepted for symmetry with the other benchmarks: "
                                               "each trial uses 1 torch thread)")
    args = p.parse_args(argv)

    import torch

    slots = os.cpu_count() or 1  # ablation_grid's local runtime gets every CPU; 1 CPU per trial
    from importlib.metadata import version

    print(f"# torch {torch.__version__} | ray {version('ray')} | mlflow {version('mlflow')} | "
          f"python {platform.python_version()} | {slots} CPU(s)")
    print("# device cpu (trials run on CPU workers; 1 CPU and 1 torch thread per trial)")

    sweeps = []
    if not args.no_zero_work or args.tiny:
        sweeps.append(("zero-work", ZERO_WORK))
    if not args.tiny:
        main_args = ["--preset", args.preset]
        for flag in ("cells", "densities", "seeds"):
            if getattr(args, flag):
                main_args += [f"--{flag}", getattr(args, flag)]
        sweeps.append((args.preset, main_args))

    workdir = args.keep or tempfile.mkdtemp(prefix="sweep_efficiency_")
    os.makedirs(workdir, exist_ok=True)
    try:
        results = [run_sweep(name, a, workdir, slots, args.verbose) for name, a in sweeps]
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(results)
    main_res = results[-1]
    verdict = "meets" if main_res.meets else "MISSES"
    print(f"\n{main_res.name}: wall {main_res.wall:.1f}s vs ideal {main_res.ideal:.1f}s "
          f"(ratio {main_res.wall / main_res.ideal if main_res.ideal else float('nan'):.2f}) -> {verdict} the target "
          f"wall <= {RATIO_TARGET:g} x ideal + {FIXED_TARGET_S:g} s = {main_res.target:.1f}s; fixed start-up "
          f"{main_res.startup:.1f}s")
    return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
