"""What a compiler would buy the packed training step: the trainer's step against the same arithmetic written
by hand, eager and under ``torch.compile``, on one torch thread.

The case is the laptop preset's post-pruning step: K copies of the digits MLP (64-100x5-10, batch 64) pruned
to ``--density`` by their own magnitude step, plain ReLU, cross-entropy, SGD with momentum 0.9 and weight
decay 5e-4. Variants, each on the same stacked weights, masks and batches:

- ``trainer``: ``Trainer.step`` of a pack of K (``sparse_core.trainer``), what the main job runs;
- ``hand-written eager``: the same step as one would write it for stacked copies (``baddbmm`` per layer with
  ``w * mask``, ReLU, per-copy mean cross-entropy, ``_foreach`` SGD), no hooks, no bookkeeping;
- ``hand-written compiled``: that function under ``torch.compile`` (inductor, CPU C++ kernels); its first
  call's wall seconds are the compile cost (in a fresh inductor cache, as on a first run: inductor compiles in
  worker processes, so this process's CPU seconds would miss most of it), paid per pack shape.

Timing: blocks of ``--steps`` steps, the variants in turn (the order rotates each round) so a drift of a shared
machine's speed hits all alike; per round, each variant's time over the trainer's; the median over rounds
with its interquartile range. The figure is the ratio: below 1, the variant needs less CPU than the trainer.

    python benchmarks/compiled_step.py              # K = 1, 6, 16: about 2-4 min on one idle core (compiles 3x)
    python benchmarks/compiled_step.py --tiny       # K = 2, a few rounds: the smoke test (still one compile)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from timing import paired_ratio, print_header, print_table  # also puts the repo root on sys.path

import torch
import torch.nn.functional as F

from roofline import laptop_trials
from sparse_core.config import from_flat
from sparse_core.plan import PruneStep
from sparse_core.run_state import RunState
from sparse_core.trainer import Trainer


def trainer_pack(k: int, density: float) -> Trainer:
    """K laptop ``base`` runs (seeds 0..K-1) pruned to ``density``, as one pack at the start of post-training."""
    copies = []
    for t in laptop_trials("base", density, range(k)):
        run = RunState(from_flat({**t.flat, "train.latency_rounds": 0, "train.device": "cpu"}))
        run.prune(PruneStep(0, density, last=True))
        copies.append(run)
    pack = Trainer(copies)
    pack.begin_segment("post", 0, 10**6)
    pack.enforce()
    return pack


class HandWritten:
    """The post-pruning step of K stacked MLP copies, as one would write it: one function of tensors."""

    def __init__(self, pack: Trainer):
        names = [n[:-len(".weight")] for n in pack.masks]  # the prunable layers in forward order
        self.weights = [pack.stacks[f"{n}.weight"].detach().clone().requires_grad_() for n in names]
        self.biases = [pack.stacks[f"{n}.bias"].detach().clone().requires_grad_() for n in names]
        self.masks = [pack.masks[f"{n}.weight"].clone() for n in names]
        self.params = self.weights + self.biases
        self.bufs = [torch.zeros_like(p) for p in self.params]
        t = pack.lead.cfg.train  # the trainer's settings (every copy has the same in this case)
        self.lr, self.momentum, self.weight_decay = t.lr, t.momentum, t.weight_decay

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k, b = y.shape
        h = x.flatten(2)
        for i, (w, bias, m) in enumerate(zip(self.weights, self.biases, self.masks)):
            h = torch.baddbmm(bias.unsqueeze(1), h, (w * m).transpose(1, 2))
            if i < len(self.weights) - 1:
                h = F.relu(h)
        losses = F.cross_entropy(h.reshape(k * b, -1), y.reshape(-1), reduction="none").view(k, b).sum(1) / b
        losses.sum().backward()
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            torch._foreach_add_(grads, self.params, alpha=self.weight_decay)
            torch._foreach_mul_(self.bufs, self.momentum)
            torch._foreach_add_(self.bufs, grads)
            torch._foreach_add_(self.params, self.bufs, alpha=-self.lr)
            for p in self.params:
                p.grad = None
        return losses.detach()


def batches(pack: Trainer, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for x, y in pack.batches():
        if x.shape[1] == pack.lead.cfg.train.batch_size:
            out.append((x, y))
        if len(out) == count:
            break
    return out


def same_step(k: int, density: float) -> float:
    """The largest difference between the trainer's and the hand-written step's weights after two steps from the
    same pack (the hand-written step must be the same arithmetic, or the comparison means nothing)."""
    pack = trainer_pack(k, density)
    hand = HandWritten(pack)
    for x, y in batches(pack, 2):
        pack.step(x, y, "post")
        hand.step(x, y)
    names = [n[:-len(".weight")] for n in pack.masks]
    return max(float((pack.stacks[f"{n}.{p}"] - mine).detach().abs().max())
               for n, w, b in zip(names, hand.weights, hand.biases) for p, mine in (("weight", w), ("bias", b)))


def measure(k: int, density: float, rounds: int, steps: int) -> list[str]:
    """One table row: the variants' ms per step and their ratios to the trainer, and the compile cost."""
    pack = trainer_pack(k, density)
    data = batches(pack, 8)
    eager = HandWritten(pack)
    compiled_hw = HandWritten(pack)
    torch._dynamo.reset()  # a fresh compile for this K: no graph of another K, no dynamic-shape reuse
    compiled = torch.compile(compiled_hw.step, dynamic=False)
    wall = time.perf_counter()
    compiled(*data[0])
    compile_wall = time.perf_counter() - wall
    variants = {"trainer": lambda x, y: pack.step(x, y, "post"), "eager": eager.step, "compiled": compiled}
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for fn in variants.values():  # warm-up
        for x, y in data:
            fn(x, y)
    for r in range(rounds):
        for name in order[r % 3:] + order[:r % 3]:
            start = time.process_time()
            for i in range(steps):
                variants[name](*data[i % len(data)])
            times[name].append((time.process_time() - start) / steps)
    ms = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    return [str(k), f"{ms['trainer']:.3f}", f"{ms['eager']:.3f}", f"{ms['compiled']:.3f}",
            str(paired_ratio(times, "eager", "trainer")), str(paired_ratio(times, "compiled", "trainer")),
            f"{compile_wall:.1f}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="1,6,16", help="pack sizes (default 1,6,16)")
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--rounds", type=int, default=15, help="blocks per variant (default 15)")
    ap.add_argument("--steps", type=int, default=50, help="steps per block (default 50)")
    ap.add_argument("--tiny", action="store_true", help="K = 2, 3 rounds of 5 steps: the smoke test")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")  # compile as on a first run
    ks = (2,) if args.tiny else tuple(int(k) for k in args.ks.split(","))
    rounds, steps = (3, 5) if args.tiny else (args.rounds, args.steps)
    print_header("the packed post-pruning step: the trainer vs the same step by hand, eager and compiled, 1 thread",
                 [torch.device("cpu")])
    print(f"# laptop MLP, batch 64, density {args.density:g}; median over {rounds} rotating rounds of {steps} "
          "steps; ratio = variant / trainer per round [interquartile range]")
    diff = max(same_step(k, args.density) for k in ks)
    print(f"# same step: {'yes' if diff < 1e-5 else 'NO'} (largest weight difference after two steps {diff:.2g})")
    if diff >= 1e-5:
        return 1
    rows = [measure(k, args.density, rounds, steps) for k in ks]
    print_table(["K", "trainer ms", "eager ms", "compiled ms", "eager / trainer", "compiled / trainer",
                 "compile wall s"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
