"""The driver's MLflow cost per metric row: this tree's write policy against a baseline revision's.

A sweep's trials hand their runs' rows to the driver, which writes them (``sweeps/tracking.py``,
``TrialRun``). This benchmark replays a recorded main job through both versions of that code:

1. **record**: the README's main job (``python sweeps/ablation_grid.py``, 132 runs of the laptop
   preset) from the baseline's tree and from this tree, alternating (``--job-rounds``), each into a
   temporary store: wall, the driver's and the whole tree's CPU seconds, and a check that every run's
   final accuracies are the same; or ``--store URI``, a store holding a finished sweep ``--sweep``.
   The baseline's (first) store is replayed. From it, each run's log as the trainer handed it over: its plan
   (``sparse_core.plan.build`` of its params: which step ends a stage), per step the metrics of that
   step (``epoch/``, ``trainer/``, ``prune/`` rows) and the time it was logged, and its result.
2. **replay**, one fresh Python process per variant and round, variants alternating (A B, B A, ...),
   1 thread: a fresh SQLite store, then per run what the trainable does (``TrialRun.open``,
   ``log_step`` for every step, ``flush`` where the trainable checkpoints: a stage end or
   ``CHECKPOINT_EVERY_S`` since the last, on the recorded clock, and ``finish``). The baseline runs
   the same script against ``git archive <--baseline>`` of the repository.

It reports per variant the CPU seconds of the writes (``log_step`` / ``flush`` / ``finish``) and of
``open``, the store calls and the metric rows written, and CPU per row; the figure is the ratio of
the baseline's write CPU per row (of the baseline's rows, i.e. per row of the same information)
to this tree's, median over rounds. It checks that every row the new policy writes is the
baseline's (same key, step, value) and names the keys it leaves out.

    python benchmarks/mlflow_writes.py                       # the main job from each tree, 3 replays (~8 min)
    python benchmarks/mlflow_writes.py --store sqlite:////tmp/x.db --rounds 5
    python benchmarks/mlflow_writes.py --tiny                # a 4-run smoke sweep, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

from timing import ROOT, print_table  # also puts the repo root on sys.path

TINY = ["--preset", "smoke", "--cells", "base,rigl", "--densities", "0.1,0.01", "--seeds", "0"]


def job(tree: str, work: str, tag: str, tiny: bool) -> dict:
    """The main job (or the tiny sweep) from ``tree`` into a fresh store: its wall, its driver's and its
    whole process tree's CPU seconds (procstat: lower bounds), its store and each run's final accuracies."""
    from procstat import TreeSampler

    uri = f"sqlite:///{os.path.join(work, tag + '.db')}"
    argv = [sys.executable, "sweeps/ablation_grid.py", "--mlflow-uri", uri, "--storage-path",
            os.path.join(work, tag + "-ray"), "--no-report", "--name", "recorded", *(TINY if tiny else [])]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    load = open("/proc/loadavg").read().split()[0]
    w0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    sampler = TreeSampler(proc.pid, "driver")
    sampler.start()
    out = proc.communicate(timeout=3600)[0]
    wall = time.perf_counter() - w0
    sampler.finish()
    if proc.returncode != 0:
        raise SystemExit(f"error: the sweep in {tree} failed:\n{out[-3000:]}")
    finals: dict = {}
    with sqlite3.connect(uri.removeprefix("sqlite:///")) as con:
        for key, name, value in con.execute(
                "SELECT k.value, t.key, t.value FROM tags k JOIN tags t ON t.run_uuid = k.run_uuid "
                "WHERE k.key = 'run_key' AND t.key IN ('final/val_acc', 'final/test_acc')"):
            finals.setdefault(key, {})[name] = value
    return {"uri": uri, "wall": wall, "driver": sampler.by_category().get("driver", 0.0),
            "cpu": sampler.total_cpu(), "load": load, "finals": finals}


def _steps(cfg, rows: dict) -> list[dict]:
    """A run's log as the trainer handed it over, from its plan and its stored rows
    (``rows``: (prefix, step) -> {key: (value, ts)})."""
    from sparse_core.plan import PruneStep, TrainEpoch, build

    out, epoch = [], 0
    for step in build(cfg):
        if isinstance(step, TrainEpoch):
            epoch += 1
            got = {**rows.get(("epoch/", epoch), {}), **rows.get(("trainer/", epoch), {})}
            if not got:
                raise SystemExit(f"error: the recorded run has no epoch {epoch}")
            metrics = {k: v for k, (v, _) in got.items()}
            metrics.update(stage=step.stage, round=step.round, stage_end=step.stage_end, epoch=epoch)
        elif isinstance(step, PruneStep):
            got = rows.get(("prune/", step.round + 1), {})
            metrics = {"stage": "prune", "round": step.round, "last_prune": step.last, "stage_end": True,
                       "val_acc_after_prune": got["val_acc"][0], "test_acc_after_prune": got["test_acc"][0],
                       "density": got["density"][0], "n_collapsed_layers": got["n_collapsed_layers"][0]}
        else:
            continue  # rigl_init: nothing is logged
        out.append({"ts": min(ts for _, ts in got.values()) / 1000.0, "metrics": metrics})
    return out


def load_streams(uri: str, sweep: str) -> list[dict]:
    """Every FINISHED run of ``sweep``: its flat config, steps and result."""
    import runstore
    from sparse_core.config import from_flat

    c = runstore.client(uri)
    out = []
    for run in runstore.search(uri, "sparsity-sweep", f"tags.sweep = '{sweep}' and attributes.status = 'FINISHED'"):
        if "run_key" not in run.data.tags:
            continue  # the sweep's own (parent) run
        rows: dict = {}
        for key in run.data.metrics:
            prefix, _, name = key.partition("/")
            if prefix in ("epoch", "trainer", "prune"):
                for m in c.get_metric_history(run.info.run_id, key):
                    rows.setdefault((prefix + "/", m.step), {})[name] = (m.value, m.timestamp)
        tags, (flat, _) = run.data.tags, runstore.typed_config(run.data.params)
        result = {k.removeprefix("final/"): float(v) for k, v in tags.items() if k.startswith("final/")}
        result.update(epochs=int(result["epochs"]), device=tags.get("device", ""),
                      collapsed_layers=[x for x in tags["collapsed_layers"].split(",") if x],
                      layer_density=_layer_density(run.info.artifact_uri),
                      # fields a typed RunResult needs that the store does not keep (not written by finish)
                      run_key=tags["run_key"], data_sizes={}, config=flat,
                      effective_units=dict(item.split(":") for item in tags.get("effective_units", "").split(",")
                                           if ":" in item))
        out.append({"run_key": tags["run_key"], "cell": tags["cell"], "flat": flat,
                    "steps": _steps(from_flat(flat), rows), "result": result})
    return out


def _layer_density(artifact_uri: str) -> dict:
    with open(os.path.join(artifact_uri.removeprefix("file://"), "layer_density.json")) as f:
        return json.load(f)


REPLAY = r"""
import json, os, sqlite3, sys, time
sys.path.insert(0, os.getcwd())
streams_path, db, out_path = sys.argv[1:4]
from mlflow.tracking import MlflowClient
from sweeps import tracking
try:
    from sweeps.trial_sync import CHECKPOINT_EVERY_S
except ImportError:  # a baseline from before sweeps/trial_sync.py
    from sweeps.trial_state import CHECKPOINT_EVERY_S

calls, rows, spent = {}, [0], {}
def counted(name, fn):
    def wrap(self, *a, **k):
        calls[name] = calls.get(name, 0) + 1
        if name == "log_batch":
            rows[0] += len(k.get("metrics") or ())
        t0 = time.process_time()
        try:
            return fn(self, *a, **k)
        finally:
            spent[name] = spent.get(name, 0.0) + time.process_time() - t0
    return wrap
for name in ("log_batch", "set_tag", "set_terminated", "log_dict", "create_run", "search_runs", "update_run",
             "get_metric_history", "get_run", "delete_tag", "log_param", "log_artifact"):
    setattr(MlflowClient, name, counted(name, getattr(MlflowClient, name)))
streams = json.load(open(streams_path))
uri = "sqlite:///" + db
exp = tracking.experiment_id(uri, "sparsity-sweep")
now = [0.0]
open_cpu = write_cpu = 0.0
for s in streams:
    c0 = time.process_time()
    run = tracking.TrialRun(uri, exp, sweep="replay", cell=s["cell"], flat=s["flat"], run_key=s["run_key"],
                            trial_id="t-" + s["run_key"]).open()
    c1 = time.process_time()
    run.clock = lambda: now[0]
    last_sync = s["steps"][0]["ts"]
    for step in s["steps"]:
        now[0], m = step["ts"], step["metrics"]
        run.log_step(dict(m))
        if m["stage"] == "prune" and not m["last_prune"]:
            continue  # the trainable's cheap steps: no checkpoint
        if m["stage_end"] or now[0] - last_sync >= CHECKPOINT_EVERY_S:
            run.flush()  # the trainable's flush before its checkpoint
            run.set_checkpoint_dir("/replay/" + s["run_key"])
            last_sync = now[0]
    run.finish(s["result"])
    c2 = time.process_time()
    open_cpu, write_cpu = open_cpu + c1 - c0, write_cpu + c2 - c1
db_rows = sqlite3.connect(db).execute(
    "select t.value, m.key, m.step, m.value from metrics m join tags t on t.run_uuid = m.run_uuid "
    "and t.key = 'run_key' where m.key not like 'final/%'").fetchall()
json.dump({"open_cpu": open_cpu, "write_cpu": write_cpu, "calls": calls, "spent": spent, "rows": rows[0],
           "stored": db_rows}, open(out_path, "w"))
"""


def replay(tree: str, streams: str, work: str, tag: str) -> dict:
    db, out = os.path.join(work, f"{tag}.db"), os.path.join(work, f"{tag}.json")
    env = {**os.environ, "MLFLOW_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": "1", "PYTHONPATH": tree}
    proc = subprocess.run([sys.executable, "-c", REPLAY, streams, db, out], cwd=tree, capture_output=True,
                          text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: the replay in {tree} failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def compare(base: dict, new: dict) -> tuple[list[str], int]:
    """(keys the new policy leaves out, rows stored twice by the new one); raises if it stores a row
    the baseline does not (a different value or step)."""
    old = {(k, key, step): v for k, key, step, v in base["stored"]}
    seen: dict = {}
    for k, key, step, v in new["stored"]:
        if old.get((k, key, step)) != v:
            raise SystemExit(f"error: the new policy stores {key} step {step} = {v} for run {k}, the baseline "
                             f"{old.get((k, key, step))}")
        seen[(k, key, step)] = seen.get((k, key, step), 0) + 1
    dropped = sorted({key for (_, key, _) in set(old) - set(seen)})
    return dropped, sum(n - 1 for n in seen.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="a store with a finished sweep to replay (default: record the main job)")
    ap.add_argument("--sweep", default="recorded", help="the sweep (tag) of --store to replay")
    ap.add_argument("--baseline", default="main", help="git revision of the baseline (default main)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating replay rounds (default 3)")
    ap.add_argument("--job-rounds", type=int, default=1, help="alternating rounds of the main job (default 1)")
    ap.add_argument("--tiny", action="store_true", help="record a 4-run smoke sweep, 1 round (the smoke test)")
    ap.add_argument("--threads", type=int, help="ignored (the replay is single-threaded)")
    args = ap.parse_args(argv)
    from importlib.metadata import version

    import torch

    print(f"# driver's MLflow writes: mlflow {version('mlflow')}, SQLAlchemy {version('sqlalchemy')} | "
          f"torch {torch.__version__} | load {open('/proc/loadavg').read().split()[:3]}")
    print("# device cpu (no torch work; CPU seconds of the replaying process, 1 thread)")
    work = tempfile.mkdtemp(prefix="mlflow_writes_")
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, work: str) -> int:
    base_tree = os.path.join(work, "baseline")
    os.makedirs(base_tree)
    archive = subprocess.run(["git", "-C", ROOT, "archive", args.baseline], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", base_tree], input=archive, check=True)
    trees = {"baseline": base_tree, "this tree": ROOT}
    uri, sweep = args.store, args.sweep
    if uri is None:  # the main job, from both trees, alternating; the baseline's first store is replayed
        jobs: dict[str, list[dict]] = {n: [] for n in trees}
        for r in range(1 if args.tiny else args.job_rounds):
            for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                jobs[name].append(job(trees[name], work, f"job{r}-{name.split()[0]}", args.tiny))
        report_jobs(jobs)
        uri, sweep = jobs["baseline"][0]["uri"], "recorded"
    streams = os.path.join(work, "streams.json")
    data = load_streams(uri, sweep)
    if not data:
        raise SystemExit(f"error: no FINISHED run of sweep {sweep!r} in {uri}")
    with open(streams, "w") as f:
        json.dump(data, f)
    seen: dict[str, list[dict]] = {n: [] for n in trees}
    for r in range(1 if args.tiny else args.rounds):
        for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            seen[name].append(replay(trees[name], streams, work, f"r{r}-{name.split()[0]}"))
    return report(seen, len(data), args.baseline)


def report_jobs(jobs: dict) -> None:
    print_table(["main job", "round", "wall s", "driver CPU s", "tree CPU s", "load (1 min)"],
                [[name, str(i), f"{j['wall']:.1f}", f"{j['driver']:.1f}", f"{j['cpu']:.1f}", j["load"]]
                 for name, js in jobs.items() for i, j in enumerate(js)])
    finals = [j["finals"] for js in jobs.values() for j in js]
    same = all(f == finals[0] for f in finals)
    print(f"per-run final/val_acc and final/test_acc by run_key, {len(finals[0])} runs: "
          f"{'identical in every job' if same else 'DIFFER'}\n")
    if not same:
        raise SystemExit("error: the jobs' results differ")


def report(seen: dict, n_runs: int, baseline: str) -> int:
    base, new = seen["baseline"], seen["this tree"]
    dropped, twice = compare(base[0], new[0])
    base_rows = base[0]["rows"]
    rows = []
    for name, outs in seen.items():
        o = outs[0]
        write = statistics.median(x["write_cpu"] for x in outs)
        rows.append([name, f"{write:.2f}", f"{statistics.median(x['open_cpu'] for x in outs):.2f}",
                     str(sum(o["calls"].values())), str(o["calls"].get("log_batch", 0)), str(o["rows"]),
                     f"{1e6 * write / max(o['rows'], 1):.0f}", f"{1e6 * write / base_rows:.0f}"])
    print(f"# {n_runs} runs replayed, {len(base)} alternating rounds (medians); baseline = git {baseline}")
    print_table(["variant", "write CPU s", "open CPU s", "store calls", "log_batch", "metric rows",
                 "us/row written", "us/baseline row"], rows)
    ratios = [b["write_cpu"] / n["write_cpu"] for b, n in zip(base, new)]
    print(f"\nwrite CPU per baseline row, baseline / this tree: {statistics.median(ratios):.2f}x "
          f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    for name, outs in seen.items():
        spent = outs[0]["spent"]
        print(f"{name}: CPU s by store call (calls): " + ", ".join(
            f"{k} {v:.2f} ({outs[0]['calls'][k]})" for k, v in sorted(spent.items(), key=lambda x: -x[1])))
    print(f"keys left out by this tree: {', '.join(dropped) or 'none'}; rows stored twice: {twice}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
