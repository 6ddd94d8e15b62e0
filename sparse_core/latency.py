"""CPU inference latency of the dense model against a sparse execution path, as a ratio.

The sparse path exists for the MLP: every ``nn.Linear`` weight becomes a ``torch.sparse_csr``
matrix and a layer is ``addmm(bias, W_csr, h)`` with the activations kept as (features, batch),
so a CSR x dense product needs no transposes between layers. Convolutions and attention (VGG, ViT)
have no sparse path here: their dense time is measured and the sparse figures are NaN (``sparse_path``
says so).

Timing (``interleaved``, which the benchmarks use too): after a warm-up, dense and sparse run in
alternating blocks (A B, B A, ...) of enough calls to last about ``BLOCK_S``; a round's ratio is sparse block / dense block, the ratio reported
is the median over rounds and each latency the median per-call time. Both in one process, on the
threads torch has (``latency_threads``), under ``torch.inference_mode``.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import MLP, Activation

BATCHES = (1, 256)
BLOCK_S = 1e-3  # a timed block lasts at least this long (timer and scheduler noise)
SPARSE_PATH = "torch.sparse_csr addmm per Linear layer"
NO_SPARSE_PATH = "not implemented for this model (the MLP alone has one): dense time only"


class CSRMLP:
    """A plain ``models.MLP`` (ReLU, no soft skips) run with CSR weight matrices."""

    def __init__(self, mlp: MLP):
        linears = [block.layer for block in mlp.blocks] + [mlp.head]
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            self.layers = [(lin.weight.detach().to_sparse_csr(), lin.bias.detach().unsqueeze(1)) for lin in linears]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1).t().contiguous()  # (features, batch)
        last = len(self.layers) - 1
        for i, (w, b) in enumerate(self.layers):
            h = torch.addmm(b, w, h)
            if i < last:
                h = F.relu(h)
        return h.t()


def sparse_runner(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The sparse execution path of ``model``, or None where there is none (convolutions)."""
    if not isinstance(model, MLP):
        return None
    plain = all(isinstance(b.norm, nn.Identity) and not b.skip_alpha and isinstance(b.act, Activation)
                and b.act.t >= 1.0 and isinstance(b.layer, nn.Linear) for b in model.blocks)
    return CSRMLP(model) if plain else None


def batch_of(x: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` inputs from ``x`` (repeated if ``x`` has fewer)."""
    reps = math.ceil(size / x.shape[0])
    return (x.repeat(reps, *([1] * (x.dim() - 1))) if reps > 1 else x)[:size].contiguous()


def _per_call(fn: Callable[[], object], calls: int, sync: Callable[[], None] = lambda: None) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, block: int | dict[str, int],
                warmup: int = 0, sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each variant, one value per block of ``block`` calls (or ``block[name]``), ``rounds``
    blocks each, after ``warmup`` calls of each; the order of the variants reverses every round (A B, B A, ...).
    ``sync`` waits for the device (``torch.cuda.synchronize`` on CUDA) around every block."""
    names = list(variants)
    blocks = block if isinstance(block, dict) else dict.fromkeys(names, block)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync()
            times[name].append(_per_call(variants[name], blocks[name], sync))
    return times


def timed_pair(dense: Callable[[], object], sparse: Callable[[], object] | None, rounds: int) -> dict:
    """Median seconds per call of each and the median over rounds of sparse/dense."""
    fns = {"dense": dense} if sparse is None else {"dense": dense, "sparse": sparse}
    calls = {}
    for name, fn in fns.items():
        fn()  # warm-up (allocations, CSR kernels' first call)
        calls[name] = max(1, math.ceil(BLOCK_S / max(_per_call(fn, 1), 1e-7)))
    times = interleaved(fns, rounds, calls)
    out = {name: statistics.median(t) for name, t in times.items()}
    if sparse is not None:
        out["ratio"] = statistics.median(s / d for s, d in zip(times["sparse"], times["dense"]))
    return out


def measure(model: nn.Module, x: torch.Tensor, rounds: int, batches=BATCHES) -> dict:
    """``latency_{dense,sparse}_ms_b{B}``, ``latency_ratio_b{B}`` (sparse / dense) for each batch
    size, ``latency_threads`` and ``sparse_path`` (a note); NaN where not measured."""
    model = model.cpu().eval()
    runner = sparse_runner(model)
    out: dict = {"latency_threads": torch.get_num_threads(),
                 "sparse_path": SPARSE_PATH if runner is not None else NO_SPARSE_PATH}
    if rounds <= 0:
        out["sparse_path"] = "latency not measured (train.latency_rounds=0)"
    for b in batches:
        figures = {"dense": math.nan, "sparse": math.nan, "ratio": math.nan}
        if rounds > 0:
            xb = batch_of(x.cpu(), b)
            with torch.inference_mode():
                figures.update(timed_pair(lambda: model(xb), (lambda: runner(xb)) if runner else None, rounds))
        out[f"latency_dense_ms_b{b}"] = 1e3 * figures["dense"]
        out[f"latency_sparse_ms_b{b}"] = 1e3 * figures["sparse"]
        out[f"latency_ratio_b{b}"] = figures["ratio"]
    return out
