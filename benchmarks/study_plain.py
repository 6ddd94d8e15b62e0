"""A sweep's trials run as a plain process pool (no Ray, no MLflow), then analysis's table and plot.

The same trial list as ``python sweeps/ablation_grid.py --preset P --design D`` (``sweeps.designs``, so the
same configs and run_keys), each trial one ``sparse_core.train.run`` with 1 torch thread, ``--workers``
processes at once. Results are appended to ``<out>/results.jsonl`` as they finish, and a re-run skips
run_keys already there, so an interrupted study continues. Then ``analysis.table`` (mean, 95 % CI, paired
tests against the best baseline by validation accuracy) and ``analysis.plots`` build
``<out>/table.md``/``table.csv`` and ``<out>/accuracy_vs_density.png``/``.pdf`` from the same numbers a
sweep would log. Used for the README's results when the sweep machinery itself is not what is studied.

With ``--pack K`` (default 1) the trials of a cell that differ only in seed and density train as packs
of up to K copies (``sparse_core.runner.run_packed``, grouped as ``ablation_grid.py --pack`` groups them);
every copy's result equals its single run, so the table does not depend on K, only the time does.

    python benchmarks/study_plain.py --preset digits-study --densities 0.1,0.03,0.01,0.003 --workers 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

MASK_KEYS = ("mask_soft_density", "mask_hard_density", "mask_target")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _pack(items):
    """A list of (cell, flat) trained as one pack; the CPU seconds are shared out equally."""
    import torch

    torch.set_num_threads(1)
    from sparse_core.config import from_flat
    from sparse_core.runner import run_packed

    started = time.process_time()
    results = run_packed([from_flat(flat) for _, flat in items])
    cpu = (time.process_time() - started) / len(items)
    out = []
    for (cell, _), result in zip(items, results):
        if isinstance(result, BaseException):
            raise result
        history = result.pop("history")
        mask = [{"epoch": i + 1, **{k: m[k] for k in MASK_KEYS if k in m}} for i, m in enumerate(history)
                if m["stage"] == "pre" and "mask_target" in m]  # a steered learned mask's pre-training
        out.append({"cell": cell, "cpu_s": cpu, **result, **({"mask_history": mask} if mask else {})})
    return out


def frame(rows: list[dict]):
    import pandas as pd

    from sparse_core.results import RunResult

    out = []
    for r in rows:
        # numbers, and flags as 0/1 as MLflow stores them (analysis reads at_chance so: the plots' chance marks)
        row = {**r["config"], **{k: float(v) if isinstance(v, bool) else v for k, v in r.items()
                                 if isinstance(v, (int, float))}}
        result = RunResult.from_dict({k: v for k, v in r.items() if k not in ("cell", "cpu_s", "mask_history")})
        row.update(cell=r["cell"], collapsed_layers=",".join(result.collapsed_layers),
                   n_collapsed_layers=result.n_collapsed_layers, run_key=result.run_key)
        out.append(row)
    return pd.DataFrame(out)


def _mask_figure(rows: list[dict], out: str) -> list[str]:
    """The learned masks' density against their target over pre-training (analysis.mask_plot)."""
    import pandas as pd

    from analysis.mask_plot import group_label, mask_density_plot

    long = [(r["run_key"], r["cell"], group_label(r["config"]), r["density_target"], h["epoch"], k, h[k])
            for r in rows for h in r.get("mask_history", ()) for k in MASK_KEYS if k in h]
    if not long:
        return []
    hist = pd.DataFrame(long, columns=["run_id", "cell", "group", "density", "epoch", "key", "value"])
    return mask_density_plot(hist, os.path.join(out, "mask_density"))


def main(argv=None) -> int:
    from sweeps import designs, presets

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="digits-study")
    ap.add_argument("--design", default="leave-one-out")
    ap.add_argument("--densities", help="comma separated (default: the preset's)")
    ap.add_argument("--seeds", help="comma separated (default: the preset's)")
    ap.add_argument("--cells", help="comma separated cells (default: all of the design)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override on top of the preset, as the sweep's --set (e.g. mask.kind=hardconcrete)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pack", type=int, default=1, help="copies per pack (1 = every trial alone)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "digits_study"))
    args = ap.parse_args(argv)
    preset = presets.get(args.preset)
    densities = tuple(float(d) for d in args.densities.split(",")) if args.densities else preset.densities
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else preset.seeds
    cells = args.cells.split(",") if args.cells else None
    from sparse_core.config import parse_overrides

    base = {**preset.base, **parse_overrides(args.set)}
    trials, _ = designs.trials(args.design, base, densities, seeds, preset.synflow_rounds, cells,
                               preset.cell_overrides)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.jsonl")
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                done[r["run_key"]] = r
    from sweeps.packing import packs

    todo = packs([t for t in trials if t.run_key not in done], args.pack, min_packs=args.workers)
    n_todo = sum(len(p) for p in todo)
    print(f"{len(trials)} trials, {len(done)} already in {path}, {n_todo} to run in {len(todo)} packs on "
          f"{args.workers} workers", flush=True)
    started, i, cpu_total = time.time(), 0, 0.0
    with mp.get_context("spawn").Pool(args.workers) as pool, open(path, "a") as f:
        for rows in pool.imap_unordered(_pack, [[(t.cell, t.flat) for t in p] for p in todo]):
            for r in rows:
                i += 1
                cpu_total += r["cpu_s"]
                f.write(json.dumps(r, default=str) + "\n")
                f.flush()
                done[r["run_key"]] = r
                eta = (time.time() - started) / i * (n_todo - i)
                print(f"[{i}/{n_todo}] {r['cell']} d={r['density_target']:g} s={r['config']['seed']}: "
                      f"val {100 * r['val_acc']:.2f} test {100 * r['test_acc']:.2f} ({r['cpu_s']:.1f} CPU s, "
                      f"eta {eta:.0f}s)", flush=True)
    if n_todo:
        print(f"trained {n_todo} trials in {time.time() - started:.1f} s wall, {cpu_total:.1f} CPU s in the "
              f"trainers (--pack {args.pack}, --workers {args.workers})", flush=True)
    from analysis import plots
    from analysis.table import ablation_table, to_csv, to_markdown

    keys = {t.run_key for t in trials}
    df = frame([r for k, r in done.items() if k in keys])
    table = ablation_table(df)
    for name, render in (("table.md", to_markdown), ("table.csv", to_csv)):
        with open(os.path.join(args.out, name), "w") as f:
            f.write(render(table))
    files = plots.accuracy_vs_density(df, os.path.join(args.out, "accuracy_vs_density"))
    if "effective_density" in df.columns:
        files += plots.accuracy_vs_density(df, os.path.join(args.out, "accuracy_vs_effective_density"),
                                           x="effective_density")
    files += _mask_figure([r for k, r in done.items() if k in keys], args.out)
    print(to_markdown(table))
    print("wrote", ", ".join([os.path.join(args.out, n) for n in ("table.md", "table.csv")] + files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
