"""Sparse vs dense inference latency of the MNIST-shaped MLP (784-100x5-10): where sparsity pays off.

Candidate: the sparse execution path every run measures (``sparse_core.latency.CSRMLP``: each
Linear weight as a ``torch.sparse_csr`` matrix, ``addmm`` per layer, activations kept as
(features, batch)). Baseline: the same plain model (``models.build(..., plain=True)``) run dense.
Kaiming weights, each layer pruned to the density by magnitude (layerwise scope), inputs of shape
1x28x28, batch 1 and 256, ``torch.inference_mode``. Dense and sparse run in alternating blocks
(A B, B A, ...) after a warm-up; the ratio is the median over rounds of sparse / dense, with its
interquartile range. The size column is the compact export (``sparse_core.export``) over the
dense state dict, both as safetensors.

One torch thread unless ``--threads N`` (on a shared machine more threads than free cores make
every parallel op wait). CUDA rows (cuSPARSE CSR x dense) are added when a GPU is present.

    python benchmarks/sparse_latency.py          # about 30 s on one CPU core
    python benchmarks/sparse_latency.py --tiny   # seconds: the smoke test (figures mean nothing)
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

try:  # the shared timing helpers (benchmarks/timing.py; step_overhead.py re-exports them)
    from timing import (add_common_args, devices, interleaved, median_ms, paired_ratio, print_header,
                        print_table, synchronizer)
except ImportError:
    from step_overhead import (add_common_args, devices, interleaved, median_ms, paired_ratio, print_header,
                               print_table, synchronizer)

from sparse_core.config import Config
from sparse_core.export import dense_bytes, to_bytes
from sparse_core.init import initialise
from sparse_core.latency import CSRMLP, batch_of
from sparse_core.masks import prunable_weights
from sparse_core.models import build
from sparse_core.pruning import masks_from_scores

IN_SHAPE, NUM_CLASSES = (1, 28, 28), 10
DENSITIES = (0.1, 0.01, 0.001)
BATCHES = (1, 256)
BLOCK_S = {"cpu": 2e-3, "cuda": 5e-3}  # a timed block lasts at least this long


def pruned_mlp(cfg: Config, density: float, seed: int = 0):
    """(plain MLP with Kaiming weights zeroed outside the mask, masks); layerwise magnitude pruning."""
    model = build(cfg.model, IN_SHAPE, NUM_CLASSES, plain=True)
    initialise("kaiming", model, torch.Generator().manual_seed(seed))
    weights = prunable_weights(model)
    masks = masks_from_scores({n: w.detach().abs() for n, w in weights.items()}, density, "layerwise")
    with torch.no_grad():
        for name, w in weights.items():
            w.mul_(masks[name])
    return model.eval(), masks


def calls_per_block(fn, sync, seconds: float) -> int:
    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return max(1, math.ceil(seconds / max(time.perf_counter() - start, 1e-7)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--rounds", type=int, default=21, help="timed blocks per variant (default 21)")
    ap.add_argument("--densities", default=",".join(map(str, DENSITIES)), help="comma separated (default %(default)s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads if args.threads > 0 else 1)  # 1 thread unless asked
    try:
        densities = [float(d) for d in args.densities.split(",") if d.strip()]
    except ValueError:
        ap.error(f"--densities {args.densities!r}: give comma separated fractions, e.g. 0.1,0.01")
    if not densities or not all(0 < d <= 1 for d in densities):
        ap.error(f"--densities {args.densities!r}: each must be in (0, 1]")
    width, depth, rounds = (16, 2, 3) if args.tiny else (100, 5, args.rounds)
    cfg = Config().replace(**{"model.width": width, "model.depth": depth})
    devs = devices(args.device)

    print_header(f"sparse (CSR) vs dense inference latency, MLP 784-{width}x{depth}-10", devs)
    if not any(d.type == "cuda" for d in devs):
        print("# no CUDA device in this run: CPU rows only")
    print(f"# {torch.get_num_threads()} torch thread(s); median over {rounds} interleaved blocks; "
          f"ratio = sparse / dense (< 1: sparse faster){'  (--tiny: figures not meaningful)' if args.tiny else ''}")
    x = torch.randn(max(BATCHES), *IN_SHAPE, generator=torch.Generator().manual_seed(1))
    rows = []
    for dev in devs:
        sync = synchronizer(dev)
        for density in densities:
            model, masks = pruned_mlp(cfg, density)
            size = len(to_bytes(model, masks, cfg, IN_SHAPE, NUM_CLASSES)) / len(dense_bytes(model))
            model = model.to(dev)
            sparse = CSRMLP(model)
            for b in BATCHES:
                xb = batch_of(x, b).to(dev)
                with torch.inference_mode():
                    if not torch.allclose(sparse(xb), model(xb), rtol=1e-4, atol=1e-5):
                        raise SystemExit(f"sparse output differs from dense at density {density:g}, batch {b}")
                    variants = {"dense": lambda: model(xb), "sparse": lambda: sparse(xb)}
                    block = max(calls_per_block(v, sync, BLOCK_S[dev.type]) for v in variants.values())
                    times = interleaved(variants, rounds, block, warmup=2, sync=sync)
                ratio = paired_ratio(times, "sparse", "dense")
                if not all(math.isfinite(v) for v in (ratio.median, ratio.q1, ratio.q3)):
                    raise SystemExit(f"non-finite ratio at density {density:g}, batch {b}")
                rows.append([dev.type, f"{density:g}", str(b), f"{median_ms(times['dense']):.4f}",
                             f"{median_ms(times['sparse']):.4f}", str(ratio), f"{size:.4f}"])
    print()
    print_table(["device", "density", "batch", "dense ms", "sparse ms", "sparse/dense [IQR]", "size ratio"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
