"""What the sparse trainer's training step costs over a plain PyTorch loop.

Candidate: the trainer's own per-batch step, ``Trainer.step`` with K = 1, in the post-pruning stage
(masked layers computing ``weight * mask`` in forward, ``Trainer.enforce`` after every step, the
soft-schedule update, the per-step LR schedule). Baseline: the same architecture built from
plain ``nn`` layers (``build(..., plain=True)``) with the same weights, optimizer (SGD, momentum,
weight decay), per-step cosine schedule, data and batch size, in the loop one would write by hand.
Both run on pre-made batches, so only the step is timed. A second table times whole epochs:
the real ``Trainer.train_epoch`` of a pack of one (batching, steps, end-of-epoch evaluation) against a plain loop
over the same tensors doing the same work.

Density 1.0 is what the trainer runs before pruning or for a dense run: masked layers with no
mask installed and no ``Trainer.enforce``. Density 0.01 uses magnitude scores -> global mask.

Timing: each variant runs in blocks of steps; blocks alternate (A B B A ...) so drift on a
shared machine hits both alike; a round's ratio is candidate block / baseline block of that
round, and the reported ratio is the median over rounds (with its interquartile range).

    python benchmarks/step_overhead.py            # CPU (and CUDA when present), about a minute on CPU
    python benchmarks/step_overhead.py --tiny     # seconds: the smoke test
    python benchmarks/step_overhead.py --profile  # also the top operators of each variant
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timing import (  # also puts the repo root on sys.path
    add_common_args, apply_threads, devices, interleaved, median_ms, paired_ratio, print_header, print_table,
    synchronizer)

from sparse_core.config import Config, ModelConfig, TrainConfig
from sparse_core.models import build
from sparse_core.post_prune import SoftSchedule
from sparse_core.plan import PruneStep, TrainEpoch
from sparse_core.train import RunState, Trainer, lr_factor

TARGET = 1.10  # sparse step time / plain step time must stay at or below this
NUM_CLASSES = 10
SCHEDULE_STEPS = 10**6  # cosine schedule length: long enough that the LR never reaches 0 here


# ---- the two steps ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str  # label in the table
    model: ModelConfig
    in_shape: tuple[int, int, int]
    batch: int


def make_batches(case: Case, device: torch.device, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(case.batch, *case.in_shape, generator=g).to(device),
             torch.randint(0, NUM_CLASSES, (case.batch,), generator=g).to(device)) for _ in range(count)]


def sparse_trainer(case: Case, density: float, device: torch.device, amp: bool = False,
                   channels_last: bool = False) -> RunState:
    """A run for ``case`` (masked layers, Kaiming init); below density 1 pruned by its own
    magnitude/global pruning step."""
    cfg = trainer_config(case, density, device, case.batch, case.batch)
    trainer = RunState(cfg.replace(**{"train.amp": amp, "train.channels_last": channels_last}))
    if density < 1.0:
        trainer.prune(PruneStep(0, density, last=True))
    return trainer


def plain_twin(case: Case, like: nn.Module, device: torch.device, channels_last: bool = False) -> nn.Module:
    """The same architecture from plain nn layers, with ``like``'s weights (pruned ones are 0)."""
    model = build(case.model, case.in_shape, NUM_CLASSES, plain=True)
    model.load_state_dict(like.state_dict())
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def optimizer(model: nn.Module, t: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The plain loop's torch.optim.SGD, the trainer's settings (momentum, weight decay, per-step cosine)."""
    opt = torch.optim.SGD([{"params": list(model.parameters()), "weight_decay": t.weight_decay}], lr=t.lr,
                          momentum=t.momentum)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(t.schedule, s, SCHEDULE_STEPS))


class SparseStep:
    """The trainer's own per-batch step, ``Trainer.step`` of a pack of one, in the post-pruning stage (fixed
    mask, default post settings): masked forward, loss, backward, step, schedule, ``Trainer.enforce``."""

    def __init__(self, trainer: RunState, batches):
        self.trainer, self.batches, self.i = trainer, batches, 0
        self.loop = Trainer([trainer])
        self.loop.begin_segment("post", 0, SCHEDULE_STEPS)
        self.soft = SoftSchedule(trainer.model, trainer.cfg.post, SCHEDULE_STEPS)
        self.loss_sum = torch.zeros((), device=trainer.device)
        trainer.model.train()

    @property
    def model(self) -> nn.Module:
        return self.trainer.model

    def __call__(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.loss_sum += self.loop.step(x.unsqueeze(0), y.unsqueeze(0), "post", self.soft)[0]


class PlainStep:
    """The hand-written loop: forward, loss, zero_grad, backward, step, scheduler step."""

    def __init__(self, model: nn.Module, batches, device: torch.device, amp: bool = False,
                 channels_last: bool = False, train: TrainConfig = TrainConfig()):
        self.model, self.batches, self.i = model, batches, 0
        self.opt, self.sched = optimizer(model, train)
        self.amp, self.channels_last = amp and device.type == "cuda", channels_last and device.type == "cuda"
        self.loss_sum = torch.zeros((), device=device)
        model.train()

    def __call__(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.amp:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = self.model(x)
        else:
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.loss_sum += loss.detach()


def step_pair(case: Case, density: float, device: torch.device, amp: bool = False,
              channels_last: bool = False) -> tuple[SparseStep, PlainStep]:
    batches = make_batches(case, device)
    sparse = SparseStep(sparse_trainer(case, density, device, amp, channels_last), batches)
    plain = plain_twin(case, sparse.model, device, channels_last)
    return sparse, PlainStep(plain, batches, device, amp, channels_last)


def check_finite(*steps) -> None:
    for s in steps:
        if not torch.isfinite(s.loss_sum):
            print(f"# warning: {type(s).__name__} loss became non-finite; its timings may not be representative")


# ---- whole epochs ---------------------------------------------------------------------------------

def trainer_config(case: Case, density: float, device: torch.device, n_train: int, n_test: int) -> Config:
    flat = {"model.name": case.model.name, "model.width": case.model.width, "model.depth": case.model.depth,
            "model.width_mult": case.model.width_mult, "prune.density": density, "train.batch_size": case.batch,
            "train.device": str(device), "train.pre_epochs": 0, "train.post_epochs": 1}
    if case.in_shape == (1, 8, 8) and n_train <= 0:
        flat["data.name"] = "digits"  # the embedded default: 1,437 train / 360 test
    else:
        flat.update({"data.name": "synthetic", "data.synthetic_shape": "x".join(map(str, case.in_shape)),
                     "data.synthetic_train": n_train, "data.synthetic_test": n_test})
    return Config().replace(**flat)


def epoch_pair(case: Case, density: float, device: torch.device, n_train: int, n_test: int):
    """(trainer epoch, plain epoch, n_train): ``Trainer.train_epoch`` itself against a plain loop
    over the same tensors: shuffled index batches, the step, then one evaluation pass over the
    validation and one over the test split (as the trainer evaluates both every epoch)."""
    trainer = RunState(trainer_config(case, density, device, n_train, n_test))
    if density < 1.0:
        trainer.prune(PruneStep(0, density, last=True))  # the trainer's own magnitude/global pruning step
    data, loop = trainer.data, Trainer([trainer])
    model = plain_twin(case, trainer.model, device)
    opt, sched = optimizer(model, trainer.cfg.train)
    g = torch.Generator().manual_seed(1)
    bs, ebs = trainer.cfg.train.batch_size, trainer.cfg.train.eval_batch_size

    def trainer_epoch() -> None:
        loop.train_epoch(TrainEpoch("post", 0, 0, SCHEDULE_STEPS // 1000))

    def plain_epoch() -> None:
        model.train()
        n = data.x_train.shape[0]
        order = torch.randperm(n, generator=g).to(device)
        loss_sum = torch.zeros((), device=device)
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
        model.eval()
        with torch.no_grad():
            for x, y in ((data.x_val, data.y_val), (data.x_test, data.y_test)):
                correct, total_loss = 0, 0.0
                for start in range(0, x.shape[0], ebs):
                    xb, yb = x[start:start + ebs], y[start:start + ebs]
                    logits = model(xb)
                    total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
                    correct += int((logits.argmax(1) == yb).sum())
        float(loss_sum)

    return trainer_epoch, plain_epoch, data.x_train.shape[0]


# ---- profile --------------------------------------------------------------------------------------

def profile(label: str, fn: Callable[[], None], steps: int, sync: Callable[[], None], rows: int = 14) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for _ in range(3):
        fn()
    sync()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync()
    print(f"\n## profile: {label}, {steps} steps (self CPU time, sorted)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# ---- main -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--vgg-batch", type=int, default=128, help="VGG-16 batch size (default 128: about 75 ms a step on 2 idle CPU cores)")
    ap.add_argument("--rounds", type=int, default=30, help="MLP: blocks of 50 steps per variant (step table)")
    ap.add_argument("--vgg-rounds", type=int, default=30, help="VGG-16: single steps per variant (step table)")
    ap.add_argument("--epoch-rounds", type=int, default=6, help="epochs per variant (epoch table)")
    ap.add_argument("--vgg-epoch-samples", type=int, default=512, help="training samples of the synthetic VGG epoch")
    ap.add_argument("--models", default="mlp,vgg16", help="comma-separated subset of mlp,vgg16")
    ap.add_argument("--no-epoch", action="store_true", help="skip the whole-epoch table")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables of both steps per config")
    args = ap.parse_args(argv)
    apply_threads(args)

    densities = (1.0, 0.01)
    mlp = Case("mlp", ModelConfig(name="mlp"), (1, 8, 8), 64)
    if args.tiny:
        vgg = Case("vgg16 x0.0625", ModelConfig(name="vgg16", width_mult=0.0625), (3, 32, 32), 8)
        epoch_rounds, vgg_samples = 2, 32
        rounds, blocks = {mlp.name: 4, vgg.name: 3}, {mlp.name: 5, vgg.name: 1}
    else:
        vgg = Case("vgg16 x0.25", ModelConfig(name="vgg16", width_mult=0.25), (3, 32, 32), args.vgg_batch)
        epoch_rounds, vgg_samples = args.epoch_rounds, args.vgg_epoch_samples
        rounds, blocks = {mlp.name: args.rounds, vgg.name: args.vgg_rounds}, {mlp.name: 50, vgg.name: 1}
    cases = [c for c in (mlp, vgg) if c.model.name in args.models.split(",")]
    devs = devices(args.device)
    print_header("sparse trainer step vs plain PyTorch step (SGD momentum 0.9, wd 5e-4, per-step cosine LR)", devs)
    print(f"# ratio = sparse / plain time, median over {'/'.join(str(rounds[c.name]) for c in cases)} interleaved "
          f"rounds of {'/'.join(str(blocks[c.name]) for c in cases)} steps ({', '.join(c.name for c in cases)}) "
          f"[interquartile range]; "
          f"target <= {TARGET:.2f}{'  (--tiny: figures not meaningful)' if args.tiny else ''}")

    rows, misses = [], 0
    for device in devs:
        sync = synchronizer(device)
        for case in cases:
            for density in densities:
                sparse, plain = step_pair(case, density, device)
                times = interleaved({"sparse": sparse, "plain": plain}, rounds[case.name], blocks[case.name],
                                    warmup=max(3, blocks[case.name]), sync=sync)
                check_finite(sparse, plain)
                ratio = paired_ratio(times, "sparse", "plain")
                met = ratio.median <= TARGET
                misses += not met
                rows.append([case.name, "x".join(map(str, case.in_shape)), str(case.batch), f"{density:g}",
                             device.type, f"{median_ms(times['plain']):.3f}", f"{median_ms(times['sparse']):.3f}",
                             str(ratio), "yes" if met else "NO"])
                if args.profile:
                    profile(f"sparse {case.name} density {density:g} {device.type}", sparse, 5 * blocks[case.name], sync)
                    profile(f"plain {case.name} density {density:g} {device.type}", plain, 5 * blocks[case.name], sync)
    print("\n## per training step (pre-made batches, only the step is timed)")
    print_table(["model", "input", "batch", "density", "device", "plain ms", "sparse ms", "ratio [IQR]", "<= 1.10"], rows)

    if not args.no_epoch:
        rows = []
        for device in devs:
            sync = synchronizer(device)
            for case in cases:
                n_train, n_test = (0, 0) if case is mlp else (vgg_samples, max(vgg_samples // 4, 8))
                for density in densities:
                    trainer_epoch, plain_epoch, n = epoch_pair(case, density, device, n_train, n_test)
                    times = interleaved({"trainer": trainer_epoch, "plain": plain_epoch}, epoch_rounds, 1,
                                        warmup=1, sync=sync)
                    ratio = paired_ratio(times, "trainer", "plain")
                    rows.append([case.name, f"{n}x" + "x".join(map(str, case.in_shape)), str(case.batch), f"{density:g}",
                                 device.type, f"{median_ms(times['plain']):.1f}", f"{median_ms(times['trainer']):.1f}",
                                 str(ratio), "yes" if ratio.median <= TARGET else "NO"])
        print("\n## per epoch: Trainer.train_epoch (batching + steps + evaluation) vs a plain loop over the same tensors")
        print(f"# mlp: the bundled digits set (1,293 train, 144 validation, 360 test); vgg16: synthetic data; median over {epoch_rounds} interleaved epochs")
        print_table(["model", "train set", "batch", "density", "device", "plain ms", "trainer ms", "ratio [IQR]",
                     "<= 1.10"], rows)
    total = len(densities) * len(cases) * len(devs)
    print(f"\n# step target met in {total - misses} of {total} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
