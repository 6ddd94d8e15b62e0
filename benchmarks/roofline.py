"""How close the trainers run to the machine's matrix-multiply roofline, on one torch thread.

The reference is the machine's own single-precision matrix multiply, measured in the same run:
a 1024^3 ``torch.mm`` (the best rate one core reaches) and the packed ``bmm`` at the laptop MLP's
shape (K copies x batch 64 x 100 x 100, the kernel a packed training step is made of). Each
measurement of the trainers sits between two measurements of the reference, and its ratio is taken
against their mean, so a busy machine slows both alike.

Measured (CPU seconds of this process, ``time.process_time``):
- ``pack K``: K copies of one laptop cell (default ``base`` at density 0.01, seeds 0..K-1) trained
  as one pack (``sparse_core.runner.run_packed``, no shared pre-training), K = 1, 8, 32;
- ``laptop preset``: every trial of the main job (the laptop preset's cells and seeds, ``sweeps.presets``),
  grouped into packs as ``ablation_grid.py`` groups them by default (``sweeps.packing.DEFAULT_PACK``), with
  shared pre-training, as the main job trains them (no Ray, no MLflow: the trainers only).

Work counted: the dense-equivalent FLOPs of the prunable layers, which is what the masked layers
compute: 6 x weights per training image (forward, input and weight gradients) and 2 x weights per
evaluated image (validation and test after every epoch); a shared pre-training counts once for the
runs that share it. Biases, activations, masks and the optimizer are overhead by this count.
Latency measurement is switched off (``train.latency_rounds=0``): it is not training.

    python benchmarks/roofline.py            # about 2-3 min on one idle core
    python benchmarks/roofline.py --quick    # K = 1, 8 and no laptop preset: seconds
    python benchmarks/roofline.py --tiny     # K = 1, 2 at 1 + 2 epochs: the smoke test
    python benchmarks/roofline.py --vs /path/to/other/checkout --rounds 3
        # A/B: the laptop preset's trainers of this checkout and of another one (e.g. a worktree of main), one
        # process each, the packs handed to both in turn; the paired ratio of their CPU seconds (same configs, FLOPs)
    python benchmarks/roofline.py --vs /path/to/other/checkout --other-pack 8
        # the same, the other checkout's trials grouped into packs of at most 8 (e.g. its own default)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from timing import print_header  # also puts the repo root on sys.path

import torch

from sparse_core.config import from_flat
from sparse_core.runner import run_packed


def _rate(fn, flop: float, reps: int) -> float:
    """FLOP per CPU second of ``fn`` (median over ``reps`` calls after one warm-up)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return flop / statistics.median(times)


def reference() -> dict[str, float]:
    """The machine's sgemm rate (1024^3 mm) and the laptop MLP's packed bmm rate (K=8, 64x100x100)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    x, w = torch.randn(8, 64, 100, generator=g), torch.randn(8, 100, 100, generator=g)

    def bmm_block():
        for _ in range(200):
            torch.bmm(x, w)

    return {"sgemm": _rate(lambda: torch.mm(a, b), 2 * 1024**3, 7),
            "bmm": _rate(bmm_block, 200 * 2 * 8 * 64 * 100 * 100, 7)}


def executed_flop(result: dict) -> float:
    """Dense-equivalent FLOPs one run executed (its share of a shared pre-training counted once)."""
    n = result["data_sizes"]
    per_epoch = result["prunable_weights"] * (6 * n["train"] + 2 * (n["val"] + n["test"]))
    pre = sum(1 for h in result["history"] if h.get("stage") == "pre")
    rest = len(result["history"]) - pre
    return per_epoch * (pre / result.get("prefix_shared_by", 1) + rest)


def train(flats: list[list[dict]], share_prefix: bool, extra: dict) -> tuple[float, float]:
    """(FLOPs, CPU s) of training each list of flat configs (with ``extra`` on top) as one ``run_packed`` call."""
    flop, cpu = 0.0, 0.0
    for group in flats:
        cfgs = [from_flat({**f, "train.latency_rounds": 0, "train.device": "cpu", **extra}) for f in group]
        start = time.process_time()
        results = run_packed(cfgs, share_prefix=share_prefix)
        cpu += time.process_time() - start
        for r in results:
            if isinstance(r, BaseException):
                raise r
            flop += executed_flop(r)
    return flop, cpu


def laptop_trials(cell: str | None = None, density: float | None = None, seeds=None) -> list:
    from sweeps import designs, presets

    p = presets.get("laptop")
    cells = [cell] if cell else list(p.cells.get("leave-one-out", ())) or None  # the main job's cells
    trials, _ = designs.trials("leave-one-out", p.base, (density,) if density else p.densities,
                               tuple(seeds) if seeds is not None else p.seeds, p.synflow_rounds, cells,
                               p.cell_overrides)
    return trials


def measure(label: str, flats: list[list[dict]], share_prefix: bool, rows: list, extra: dict) -> None:
    before = reference()
    flop, cpu = train(flats, share_prefix, extra)
    after = reference()
    ref = {k: (before[k] + after[k]) / 2 for k in before}
    rate = flop / cpu
    rows.append((label, sum(len(g) for g in flats), cpu, rate, rate / ref["sgemm"], rate / ref["bmm"], ref["sgemm"]))
    print(f"  {label}: {flop:.3g} FLOP in {cpu:.1f} CPU s = {rate / 1e9:.1f} GFLOP/s; "
          f"{rate / ref['sgemm']:.3f} of sgemm ({ref['sgemm'] / 1e9:.1f}), "
          f"{rate / ref['bmm']:.3f} of the packed bmm ({ref['bmm'] / 1e9:.1f})", flush=True)


AB_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])  # the checkout whose sparse_core trains
import torch
from sparse_core.config import from_flat
from sparse_core.runner import run_packed
torch.set_num_threads(1)
for line in sys.stdin:  # one pack per line; its CPU seconds back, one line each
    start = time.process_time()
    for r in run_packed([from_flat(f) for f in json.loads(line)], share_prefix=True):
        if isinstance(r, BaseException):
            raise r
    print(json.dumps({"cpu": time.process_time() - start}), flush=True)
"""


def _child(root: str):
    import subprocess

    return subprocess.Popen([sys.executable, "-c", AB_CHILD, root], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=root)


def _train_in(child, line: str) -> float:
    import json

    child.stdin.write(line + "\n")
    child.stdin.flush()
    out = child.stdout.readline()
    if not out:
        raise RuntimeError(f"the trainer process of {child.args[-1]} ended (exit {child.wait()})")
    return json.loads(out)["cpu"]


def ab(other: str, rounds: int, extra: dict, other_pack: int | None = None) -> None:
    """This checkout's trainers against ``other``'s on the laptop preset: one long-lived process per checkout, the
    packs handed to both in turn (which goes first alternates pack by pack), so a drift of the machine's speed
    over minutes falls on both alike. ``other_pack``: the other checkout's trials grouped into packs of at most
    that many (default: as here, ``sweeps.packing.DEFAULT_PACK``); its i-th pack then alternates with this one's."""
    import json
    import os
    from itertools import zip_longest

    from sweeps.packing import DEFAULT_PACK, packs

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def lines(k: int) -> list[str]:
        return [json.dumps([{**t.flat, "train.latency_rounds": 0, "train.device": "cpu", **extra} for t in p])
                for p in packs(laptop_trials(), k, min_packs=2)]

    work = {"other": lines(other_pack or DEFAULT_PACK), "this": lines(DEFAULT_PACK)}
    children = {"other": _child(other), "this": _child(here)}
    ratios = []
    try:
        for i in range(rounds):
            cpu = {"other": 0.0, "this": 0.0}
            for j, pair in enumerate(zip_longest(work["other"], work["this"])):
                for name in (("other", "this") if (i + j) % 2 == 0 else ("this", "other")):
                    line = pair[0] if name == "other" else pair[1]
                    if line is not None:
                        cpu[name] += _train_in(children[name], line)
            ratios.append(cpu["other"] / cpu["this"])
            print(f"  round {i + 1}: other {cpu['other']:.1f} CPU s, this checkout {cpu['this']:.1f} CPU s, "
                  f"other / this = {ratios[-1]:.3f}", flush=True)
    finally:
        for child in children.values():
            child.stdin.close()
            child.wait()
    print(f"\nlaptop preset's trainers (packs: other {len(work['other'])}, this checkout {len(work['this'])}): "
          f"other / this checkout, median of {rounds} paired rounds = {statistics.median(ratios):.3f} "
          "(> 1: this checkout needs fewer CPU seconds)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", default="base", help="the laptop design's cell packed K times (default base)")
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--ks", default="1,8,32", help="pack sizes (default 1,8,32)")
    ap.add_argument("--quick", action="store_true", help="K = 1, 8 and no laptop preset")
    ap.add_argument("--tiny", action="store_true", help="K = 1, 2 at 1 + 2 epochs, no laptop preset (smoke test)")
    ap.add_argument("--vs", metavar="CHECKOUT", help="A/B against another checkout's trainers (laptop preset only)")
    ap.add_argument("--rounds", type=int, default=3, help="paired rounds of --vs (default 3)")
    ap.add_argument("--other-pack", type=int, metavar="K",
                    help="--vs: the other checkout's trials in packs of at most K (default: this checkout's default)")
    args = ap.parse_args(argv)
    extra = {"train.pre_epochs": 1, "train.post_epochs": 2} if args.tiny else {}
    ks = (1, 2) if args.tiny else (1, 8) if args.quick else tuple(int(k) for k in args.ks.split(","))
    torch.set_num_threads(1)
    print_header("roofline: achieved FLOP rate of the trainers against this machine's matmul, 1 thread",
                 [torch.device("cpu")])
    if args.vs:
        ab(args.vs, args.rounds, extra, args.other_pack)
        return 0
    rows: list = []
    for k in ks:
        trials = laptop_trials(args.cell, args.density, range(k))
        measure(f"pack K={k} ({args.cell}, d={args.density:g})", [[t.flat for t in trials]], False, rows, extra)
    if not (args.quick or args.tiny):
        from sweeps.packing import DEFAULT_PACK, packs

        trials = laptop_trials()
        groups = [[t.flat for t in p] for p in packs(trials, DEFAULT_PACK, min_packs=2)]
        measure(f"laptop preset ({len(trials)} runs, packs of <= {DEFAULT_PACK}, shared pre-training)", groups, True,
                rows, extra)
    print("\n| trainers | runs | CPU s | GFLOP/s | / sgemm | / packed bmm |\n|---|---|---|---|---|---|")
    for label, runs, cpu, rate, of_sgemm, of_bmm, _ in rows:
        print(f"| {label} | {runs} | {cpu:.1f} | {rate / 1e9:.1f} | {of_sgemm:.3f} | {of_bmm:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
