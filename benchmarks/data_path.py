"""Epoch time of the trainer's tensor-resident batching against torch.utils.data.DataLoader.

Candidate: ``sparse_core.data.train_batches`` on a ``TensorData`` (one shuffled ``index_select``
per batch; for the CIFAR-shaped case ``crop_flip`` pads, crops and flips the whole batch at once).
Baseline: ``DataLoader(dataset, batch_size, shuffle=True)`` over the same tensors, the way one
would otherwise write it: a ``TensorDataset`` for MNIST; for CIFAR a Dataset whose
``__getitem__`` applies torchvision.transforms.v2 ``RandomCrop(32, padding=4)`` and
``RandomHorizontalFlip()`` to each sample. ``num_workers`` 0 and 2 (persistent workers, so the
worker start-up is paid once, not per epoch). On CUDA the candidate's tensors live on the GPU and
the DataLoader's batches are pinned and copied over, as a training loop would.

The honest baseline sits beside them: a **plain batched loop** with no DataLoader, the loop one
writes by hand over tensors already in memory (a shuffled permutation, ``x[idx]`` per batch; for
CIFAR each sample of the batch through the same v2 ``RandomCrop`` + ``RandomHorizontalFlip``,
then stacked). Against it the gain is only what batching the augmentation buys (about 1x for
MNIST, where both do the same indexing); against the DataLoader rows it also includes the
per-sample ``__getitem__`` and collate overhead.

Each batch is consumed minimally (one element added to an on-device accumulator), so only the
data path is measured. Variants alternate epoch by epoch; the speedup is the median over rounds
of baseline epoch / train_batches epoch of the same round. Target (DataLoader rows): >= 5x.

    python benchmarks/data_path.py           # 60000x1x28x28 and 50000x3x32x32, about a minute on CPU
    python benchmarks/data_path.py --tiny    # seconds: the smoke test
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from timing import (  # also puts the repo root on sys.path
    add_common_args, apply_threads, devices, interleaved, median_ms, paired_ratio, print_header, print_table,
    synchronizer)

from sparse_core.data import TensorData, train_batches

TARGET = 5.0  # DataLoader epoch time / train_batches epoch time must be at least this


class AugmentedTensors(Dataset):
    """The conventional per-sample pipeline: index one sample, transform it, let collate stack."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.x[i]), self.y[i]


def crop_flip_transform():
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])  # zero fill, as crop_flip


def synthetic(n: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def candidate_epoch(data: TensorData, batch: int, device: torch.device) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)

    def epoch() -> None:
        acc = torch.zeros((), device=device)
        for x, y in train_batches(data, batch, g):
            acc += x[-1, 0, 0, 0]
        float(acc)

    return epoch


def plain_epoch(x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device,
                transform: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[], None]:
    """The hand-written loop: shuffled index batches over the tensors (on ``device``), and the
    per-sample augmentation applied to each sample of the batch when ``transform`` is given."""
    g = torch.Generator().manual_seed(0)
    x, y = x.to(device), y.to(device)

    def epoch() -> None:
        acc = torch.zeros((), device=device)
        order = torch.randperm(x.shape[0], generator=g).to(device)
        for start in range(0, x.shape[0], batch):
            idx = order[start:start + batch]
            xb, _ = x[idx], y[idx]
            if transform is not None:
                xb = torch.stack([transform(sample) for sample in xb])
            acc += xb[-1, 0, 0, 0]
        float(acc)

    return epoch


def loader_epoch(loader: DataLoader, device: torch.device) -> Callable[[], None]:
    def epoch() -> None:
        acc = torch.zeros((), device=device)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            acc += x[-1, 0, 0, 0]
        float(acc)

    return epoch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    ap.add_argument("--rounds", type=int, default=5, help="epochs timed per variant")
    ap.add_argument("--workers", default="0,2", help="DataLoader num_workers values, comma-separated")
    ap.add_argument("--samples", type=int, default=0, help="samples per data set (default: 60000 MNIST, 50000 CIFAR)")
    args = ap.parse_args(argv)
    apply_threads(args)

    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    n_mnist, n_cifar = (2000, 2000) if args.tiny else (args.samples or 60000, args.samples or 50000)
    rounds = 2 if args.tiny else args.rounds
    cases = [("mnist", n_mnist, (1, 28, 28), False), ("cifar10", n_cifar, (3, 32, 32), True)]
    devs = devices(args.device)
    print_header("data path: train_batches (tensor-resident) vs torch.utils.data.DataLoader, one epoch", devs)
    print(f"# batch {args.batch_size}; speedup = baseline / train_batches epoch time, median over {rounds} "
          f"interleaved epochs [interquartile range]; target >= {TARGET:g}x{'  (--tiny: figures not meaningful)' if args.tiny else ''}")

    rows, misses, total = [], 0, 0
    for device in devs:
        sync = synchronizer(device)
        for name, n, shape, augment in cases:
            x, y = synthetic(n, shape)
            data = TensorData(x, y, x[:1], y[:1], num_classes=10, augment=augment).to(device)
            variants = {"train_batches": candidate_epoch(data, args.batch_size, device),
                        "plain loop": plain_epoch(x, y, args.batch_size, device,
                                                  crop_flip_transform() if augment else None)}
            dataset = AugmentedTensors(x, y, crop_flip_transform()) if augment else TensorDataset(x, y)
            loaders = []
            for w in workers:
                loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=w,
                                    persistent_workers=w > 0, pin_memory=device.type == "cuda",
                                    generator=torch.Generator().manual_seed(0))
                loaders.append(loader)
                variants[f"DataLoader w{w}"] = loader_epoch(loader, device)
            times = interleaved(variants, rounds, 1, warmup=1, sync=sync)
            what = "index_select + crop_flip per batch" if augment else "index_select per batch"
            rows.append([name, f"{n}x" + "x".join(map(str, shape)), device.type, "train_batches", what,
                         f"{median_ms(times['train_batches']):.1f}", "1.00", ""])
            speedup = paired_ratio(times, "plain loop", "train_batches")
            what = "x[idx] + per-sample v2 RandomCrop+Flip, stacked" if augment else "x[idx] per batch"
            rows.append([name, f"{n}x" + "x".join(map(str, shape)), device.type, "plain loop", what,
                         f"{median_ms(times['plain loop']):.1f}", str(speedup), ""])
            for w in workers:
                key = f"DataLoader w{w}"
                speedup = paired_ratio(times, key, "train_batches")
                met = speedup.median >= TARGET
                misses, total = misses + (not met), total + 1
                what = ("per-sample v2 RandomCrop+Flip" if augment else "TensorDataset") + f", num_workers={w}"
                rows.append([name, f"{n}x" + "x".join(map(str, shape)), device.type, "DataLoader", what,
                             f"{median_ms(times[key]):.1f}", str(speedup), "yes" if met else "NO"])
            del loaders  # shuts persistent workers down before the next case
    print()
    print_table(["data", "train set", "device", "path", "how", "epoch ms", "speedup [IQR]", "DataLoader >= 5x"], rows)
    print(f"\n# target met in {total - misses} of {total} DataLoader rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
