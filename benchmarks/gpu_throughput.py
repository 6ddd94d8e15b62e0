"""Training throughput of VGG-16 on CIFAR-10-shaped data: the sparse trainer's step vs plain PyTorch.

Rows: per precision/layout setting (fp32; bf16 autocast; bf16 autocast + channels-last, i.e. the
trainer's ``train.amp`` and ``train.channels_last``), the plain model in a hand-written loop and
the trainer's step path (``step_overhead.SparseStep``, i.e. ``Trainer.step``: masked layers, ``Trainer.enforce`` after each
step) at density 1.0 and 0.01, all three interleaved block by block. Images/s = batch / median
step time; an epoch is 50,000 images at that rate (steps only: the data path is in data_path.py).
"ratio" is the sparse step time over the plain step time of the same setting and round; "vs fp32"
is the plain fp32 step time over this row's, i.e. whether bf16 / channels-last help.

On CPU (no GPU present, or --device cpu) it is a tiny run (width 0.125, few steps, fp32 only:
the trainer uses autocast and channels-last on CUDA only) and says so.

``--packed``: trials per GPU-hour of the MNIST-shaped MLP (784-100x5-10, batch 128, 1 % density,
post-pruning steps) trained as packs of K = 1, 16, 64, 256 copies (``sparse_core.packed``; each copy its
own seed, mask and batches). A trial is the paper-mnist preset's 60 epochs of 430 steps; trials/hour =
K x 3600 / (60 x 430 x seconds per packed step), steps only (evaluation and start-up excluded); "vs K=1"
is the ratio to the K = 1 row (target: >= 10x at K = 64 on a GPU).

    python benchmarks/gpu_throughput.py           # full VGG-16, batch 128, on the GPU
    python benchmarks/gpu_throughput.py --packed  # packed MNIST MLPs, trials per GPU-hour
    python benchmarks/gpu_throughput.py --tiny    # seconds: the smoke test
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from step_overhead import TARGET, Case, PlainStep, SparseStep, check_finite, make_batches, plain_twin, sparse_trainer
from timing import (  # also puts the repo root on sys.path
    add_common_args, apply_threads, interleaved, median_ms, paired_ratio, print_header, print_table, synchronizer)

from sparse_core.config import Config, ModelConfig
from sparse_core.plan import PruneStep
from sparse_core.train import RunState, Trainer

EPOCH_IMAGES = 50_000  # CIFAR-10's training set
SETTINGS = {"fp32": (False, False), "bf16": (True, False), "bf16+channels_last": (True, True)}  # (amp, channels_last)
MNIST_TRIAL_STEPS = 60 * 430  # paper-mnist: 20 + 40 epochs of ceil(55,000 / 128) steps
PACKED_TARGET = 10.0  # trials per GPU-hour at K = 64 over K = 1


def packed(device: torch.device, ks: list[int], steps: int, tiny: bool) -> None:
    """Trials per hour of packs of K MNIST-shaped MLPs (synthetic 1x28x28 data, 1 % density)."""
    flat = {"data.name": "synthetic", "data.synthetic_shape": "1x28x28", "data.synthetic_train": 2048,
            "data.synthetic_test": 64, "train.batch_size": 128, "train.device": str(device),
            "prune.density": 0.01, "prune.pruner": "random", "train.latency_rounds": 0}
    sync = synchronizer(device)
    rows, base = [], None
    for k in ks:
        trainers = [RunState(Config().replace(**flat, seed=s)) for s in range(k)]
        for t in trainers:
            t.prune(PruneStep(0, 0.01, True))
        pack = Trainer(trainers)
        pack.begin_segment("post", 0, 10 * steps)
        for t in trainers:
            t.model.train()
        batches = pack.batches()
        data = [next(batches) for _ in range(min(steps, 10))]
        for x, y in data[:3]:
            pack.step(x, y, "post")  # warm-up
        sync()
        start = time.perf_counter()
        for i in range(steps):
            x, y = data[i % len(data)]
            pack.step(x, y, "post")
        sync()
        per_step = (time.perf_counter() - start) / steps
        per_hour = k * 3600 / (MNIST_TRIAL_STEPS * per_step)
        base = base or per_hour
        rows.append([str(k), f"{1e3 * per_step:.2f}", f"{per_hour:,.0f}", f"{per_hour / base:.1f}x"])
        del pack, trainers, batches, data
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(["K", "ms/step", "trials/hour", "vs K=1"], rows)
    print(f"steps only; a trial = {MNIST_TRIAL_STEPS} steps (paper-mnist); target >= {PACKED_TARGET:g}x at K = 64 "
          f"on a GPU{'  (--tiny: figures not meaningful)' if tiny else ''}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--batch-size", type=int, default=128, help="batch size on the GPU (default 128)")
    ap.add_argument("--width-mult", type=float, default=1.0, help="VGG-16 channel multiplier on the GPU (default 1.0)")
    ap.add_argument("--rounds", type=int, default=20, help="blocks per variant")
    ap.add_argument("--block", type=int, default=10, help="steps per block on the GPU")
    ap.add_argument("--packed", action="store_true", help="packed MNIST-shaped MLPs: trials per GPU-hour at K = 1..256")
    args = ap.parse_args(argv)
    apply_threads(args)
    if args.packed:
        cuda = torch.cuda.is_available() and args.device != "cpu"
        device = torch.device("cuda" if cuda else "cpu")
        print_header("packed trials: MNIST-shaped MLP, trials per hour at K copies per pack", [device])
        if not cuda:
            print("# CPU RUN: no GPU used; figures say nothing about GPU throughput")
        ks = [1, 4] if args.tiny else ([1, 16, 64, 256] if cuda else [1, 16, 64])
        packed(device, ks, 3 if args.tiny else (50 if cuda else 10), args.tiny)
        return 0

    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda and not args.tiny:
        width, batch, rounds, block = args.width_mult, args.batch_size, args.rounds, args.block
    elif cuda:
        width, batch, rounds, block = 0.25, 32, 3, 2
    else:
        width, batch, rounds, block = 0.125, 16 if args.tiny else 32, 3 if args.tiny else 10, 1 if args.tiny else 2
    settings = SETTINGS if cuda else {"fp32": SETTINGS["fp32"]}
    if cuda:
        torch.backends.cudnn.benchmark = True  # both loops alike: pick the fastest conv algorithms

    print_header("VGG-16 training throughput: sparse trainer step vs plain PyTorch loop", [device])
    if cuda:
        print(f"# GPU: {torch.cuda.get_device_name(device)}")
    else:
        print("# CPU RUN: no GPU used; tiny size (width 0.125), fp32 only; figures say nothing about GPU throughput")
    print(f"# VGG-16 width {width:g}, CIFAR-10-shaped synthetic batches (3x32x32, 10 classes), batch {batch}; "
          f"median over {rounds} interleaved blocks of {block} steps; epoch = {EPOCH_IMAGES} images"
          f"{'  (--tiny: figures not meaningful)' if args.tiny else ''}")

    case = Case("vgg16", ModelConfig(name="vgg16", width_mult=width), (3, 32, 32), batch)
    sync = synchronizer(device)
    rows, fp32_plain_ms = [], None
    for label, (amp, channels_last) in settings.items():
        batches = make_batches(case, device)
        variants = {}
        for density in (1.0, 0.01):
            step = SparseStep(sparse_trainer(case, density, device, amp, channels_last), batches)
            variants[f"sparse {density:g}"] = step
        variants["plain"] = PlainStep(plain_twin(case, step.model, device, channels_last), batches, device, amp,
                                      channels_last)
        times = interleaved(variants, rounds, block, warmup=max(3, block), sync=sync)
        check_finite(*variants.values())
        plain_ms = median_ms(times["plain"])
        fp32_plain_ms = fp32_plain_ms or plain_ms
        for name in ("plain", "sparse 1", "sparse 0.01"):
            ms = median_ms(times[name])
            ratio = paired_ratio(times, name, "plain")
            met = "" if name == "plain" else ("yes" if ratio.median <= TARGET else "NO")
            rows.append([label, name, f"{ms:.2f}", f"{batch / ms * 1e3:,.0f}",
                         f"{math.ceil(EPOCH_IMAGES / batch) * ms / 1e3:.2f}",
                         "1.000" if name == "plain" else str(ratio), met, f"{fp32_plain_ms / ms:.2f}x"])
        del variants, batches, step
        if cuda:
            torch.cuda.empty_cache()
    print()
    print_table(["setting", "model", "ms/step", "images/s", "epoch s", "ratio [IQR]", "<= 1.10", "vs fp32"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
