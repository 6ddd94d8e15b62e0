"""Datasets held as tensors and batched by index.

Every dataset here fits in (GPU) memory, so the training loop never touches a per-sample
Python object: a batch is one index_select, and CIFAR-10's crop-and-flip is done on the
whole batch at once.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from .config import DataConfig
from .registry import DATASETS


@dataclass
class TensorData:
    x_train: torch.Tensor  # float32, (N, C, H, W), normalised
    y_train: torch.Tensor  # int64, (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: bool = False  # apply random crop (pad 4) + flip per training batch
    x_val: torch.Tensor | None = None  # carved from the training set (``split_validation``)
    y_val: torch.Tensor | None = None

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": 0 if self.y_val is None else len(self.y_val), "test": len(self.y_test)}

    def to(self, device: torch.device) -> "TensorData":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TensorData(move(self.x_train), move(self.y_train), move(self.x_test), move(self.y_test),
                          self.num_classes, self.augment, move(self.x_val), move(self.y_val))


# Validation images each data set sets aside when data.val_size = -1 (the usual splits).
STANDARD_VAL_SIZE = {"digits": 144, "mnist": 5000, "cifar10": 5000}
VAL_SPLIT_SEED = 20240601  # fixed: the split never moves with the config seed or the method


def split_validation(data: TensorData, size: int) -> TensorData:
    """Move ``size`` training images, chosen by a fixed permutation, into the validation split."""
    n = len(data.y_train)
    if not 1 <= size < n:
        raise ValueError(f"data.val_size={size} is not valid for a training set of {n} images; "
                         f"it must be in [1, {n - 1}]")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    val, train = order[:size].sort().values, order[size:].sort().values
    return TensorData(data.x_train[train], data.y_train[train], data.x_test, data.y_test, data.num_classes,
                      data.augment, data.x_train[val], data.y_train[val])


def val_size(cfg: DataConfig, n_train: int) -> int:
    """``data.val_size``, else the data set's standard split; 10 % where there is none or where the
    training set is too small for it (a subset of MNIST or CIFAR-10 in the real file format)."""
    if cfg.val_size != -1:
        return cfg.val_size
    standard = STANDARD_VAL_SIZE.get(cfg.name)
    return standard if standard is not None and 2 * standard <= n_train else max(1, round(0.1 * n_train))


def load(cfg: DataConfig) -> TensorData:
    """Load the dataset named by ``cfg.name`` (on CPU), with its validation split."""
    data = DATASETS.get(cfg.name, "data.name")(cfg)
    return split_validation(data, val_size(cfg, len(data.y_train)))


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero-padding by ``pad`` and random horizontal flip, per sample.

    The random numbers come from a CPU generator so the result is the same on every device.
    """
    b, _, h, w = x.shape
    off = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
    flip = torch.rand(b, generator=generator) < 0.5
    windows = F.pad(x, (pad, pad, pad, pad)).unfold(2, h, 1).unfold(3, w, 1)  # (B, C, 2p+1, 2p+1, H, W) view
    out = windows[torch.arange(b, device=x.device), :, off[0], off[1]]  # whole crops gathered at once
    flipped = flip.nonzero().squeeze(1).to(x.device)  # decided on the CPU: no device sync
    out[flipped] = out[flipped].flip(3)
    return out


def train_batches(data: TensorData, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled training batches (the last partial batch is kept)."""
    n = data.x_train.shape[0]
    order = torch.randperm(n, generator=generator).to(data.x_train.device)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        x = data.x_train.index_select(0, idx)
        if data.augment:
            x = crop_flip(x, generator)
        yield x, data.y_train.index_select(0, idx)


def eval_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, x.shape[0], batch_size):
        yield x[start:start + batch_size], y[start:start + batch_size]


def class_balanced_subset(data: TensorData, per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded scoring batch: ``per_class`` training samples of each class (fewer if a class is short)."""
    y = data.y_train.cpu()
    picks = []
    for c in range(data.num_classes):
        idx = (y == c).nonzero().flatten()
        if len(idx):
            picks.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    idx = torch.cat(picks).to(data.x_train.device)
    return data.x_train.index_select(0, idx), data.y_train.index_select(0, idx)


def _normalise(train: torch.Tensor, test: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (train - mean) / std, (test - mean) / std


# ---- datasets ------------------------------------------------------------------------------

def _digits_table():
    """The (1797, 65) table behind ``sklearn.datasets.load_digits``, read from scikit-learn's package data
    without importing ``sklearn.datasets`` (whose import alone costs ~1.6 CPU seconds)."""
    import gzip
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise FileNotFoundError("data.name='digits' reads scikit-learn's bundled copy: pip install scikit-learn")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
    with gzip.open(path, "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.float32)


@DATASETS.register("digits")
def digits(cfg: DataConfig) -> TensorData:
    """scikit-learn's bundled 8x8 digits (1,797 images): 1,437 train / 360 test, fixed split (``load``
    then sets 144 of the 1,437 aside for validation)."""
    table = _digits_table()
    x = torch.tensor(table[:, :-1], dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(table[:, -1], dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # the split never moves
    n_test = 360
    test, train = order[:n_test], order[n_test:]
    xtr, xte = _normalise(x[train], x[test], [x[train].mean().item()], [x[train].std().item()])
    return TensorData(xtr, y[train], xte, y[test], num_classes=10)


@DATASETS.register("synthetic")
def synthetic(cfg: DataConfig) -> TensorData:
    """Learnable random data for tests: a class prototype plus noise, fixed seed."""
    g = torch.Generator().manual_seed(1234)
    shape = tuple(int(p) for p in cfg.synthetic_shape.split("x"))
    protos = torch.randn(cfg.synthetic_classes, *shape, generator=g)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, cfg.synthetic_classes, (n,), generator=g)
        return protos[y] + 0.8 * torch.randn(n, *shape, generator=g), y

    xtr, ytr = make(cfg.synthetic_train)
    xte, yte = make(cfg.synthetic_test)
    return TensorData(xtr, ytr, xte, yte, num_classes=cfg.synthetic_classes)


# Files whose presence means a torchvision data set is in data.dir, and how to put it there.
REQUIRED_FILES = {
    "mnist": (os.path.join("MNIST", "raw", "train-images-idx3-ubyte"),
              "Put the four uncompressed IDX files (train-images-idx3-ubyte, ...) in <data.dir>/MNIST/raw."),
    "cifar10": (os.path.join("cifar-10-batches-py", "data_batch_1"),
                "Unpack cifar-10-python.tar.gz there (it holds cifar-10-batches-py/)."),
}


def check(cfg: DataConfig) -> None:
    """Raise FileNotFoundError (where it looked, how to get the data) if the data set named by
    ``cfg`` is not on disk; cheap, loads nothing. Bundled and synthetic data always pass."""
    if cfg.name not in REQUIRED_FILES or cfg.download:
        return
    rel, hint = REQUIRED_FILES[cfg.name]
    path = os.path.join(cfg.dir, rel)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{cfg.name} not found: looked for {os.path.abspath(path)} (data.dir={cfg.dir!r}). {hint} "
            f"Or let torchvision fetch it on a machine with internet: "
            f"python -m sparse_core data.name={cfg.name} data.dir={cfg.dir} data.download=true")


@DATASETS.register("mnist")
def mnist(cfg: DataConfig) -> TensorData:
    """MNIST through torchvision's ``MNIST`` class from ``<data.dir>/MNIST/raw``."""
    from torchvision.datasets import MNIST

    check(cfg)
    parts = [MNIST(cfg.dir, train=t, download=cfg.download) for t in (True, False)]
    xs = [p.data.unsqueeze(1).float() / 255.0 for p in parts]
    xtr, xte = _normalise(xs[0], xs[1], [0.1307], [0.3081])
    return TensorData(xtr, parts[0].targets.long(), xte, parts[1].targets.long(), num_classes=10)


def _cifar10_class():
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        """torchvision's CIFAR10 reader; presence is checked instead of the md5 sums, so that
        a subset written in the same pickled format (as the tests do) also loads."""

        def _check_integrity(self) -> bool:
            base = os.path.join(self.root, self.base_folder)
            return all(os.path.isfile(os.path.join(base, f)) for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return LocalCIFAR10


@DATASETS.register("cifar10")
def cifar10(cfg: DataConfig) -> TensorData:
    """CIFAR-10 through torchvision's ``CIFAR10`` class from ``<data.dir>/cifar-10-batches-py``."""
    check(cfg)
    cls = _cifar10_class()
    parts = [cls(cfg.dir, train=t, download=cfg.download) for t in (True, False)]
    xs = [torch.from_numpy(p.data).permute(0, 3, 1, 2).float() / 255.0 for p in parts]
    xtr, xte = _normalise(xs[0], xs[1], [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])
    ys = [torch.tensor(p.targets, dtype=torch.int64) for p in parts]
    return TensorData(xtr, ys[0], xte, ys[1], num_classes=10, augment=cfg.augment)
