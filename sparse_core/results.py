"""What a run hands out: ``StepEvent`` (one plan step's log record) and ``RunResult`` (the run's final
result), typed, each with ``to_dict()`` (the JSON-able dict the log, the CLI and the sweeps read) and
``from_dict()`` (its inverse: ``from_dict(d).to_dict() == d``); and the errors that end a run.

The trainer writes both; a reader that wants a key reads the field instead of parsing the dict by hand.
Keys a method adds (a learned mask's ``mask_*``, a schedule trick's value, RigL's count) and keys added
around the trainer (the export figures, ``pack_size``, ``prefix_shared_by``, ``at_chance``) travel in
``extra``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite (scores and masks would be meaningless)."""


class InjectedFailure(RuntimeError):
    """Raised by ``train.fail_at_epoch`` (tests of retry-from-checkpoint)."""


def _split(cls, d: dict) -> dict:
    names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
    return {**{n: d[n] for n in names if n in d}, "extra": {k: v for k, v in d.items() if k not in names}}


def _join(obj) -> dict:
    out = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
           if f.name != "extra" and getattr(obj, f.name) is not None}
    return {**out, **obj.extra}


@dataclass
class StepEvent:
    """One plan step's log record: a training epoch (``stage`` pre/gradual/round/post/rigl), a pruning
    round (``prune``) or RigL's sparse start (``rigl_init``). A field that a step does not have is None
    (and absent from ``to_dict``)."""

    stage: str
    round: int | None = None
    stage_epoch: int | None = None  # 1-based epoch within the stage (training epochs)
    stage_end: bool | None = None
    last_prune: bool | None = None  # pruning rounds: the final one
    train_loss: float | None = None
    val_acc: float | None = None
    val_loss: float | None = None
    test_acc: float | None = None
    test_loss: float | None = None
    lr: float | None = None
    density: float | None = None
    val_acc_after_prune: float | None = None
    test_acc_after_prune: float | None = None
    n_collapsed_layers: int | None = None
    epoch: int | None = None  # 1-based training epoch of the run
    epochs: int | None = None  # training epochs in the run's plan
    seconds: float | None = None  # the run's time so far
    extra: dict[str, Any] = field(default_factory=dict)  # a method's own metrics (mask_*, soft_t, rigl_regrown, ...)

    @property
    def is_epoch(self) -> bool:
        return self.stage not in ("prune", "rigl_init")

    @classmethod
    def from_dict(cls, d: dict) -> "StepEvent":
        return cls(**_split(cls, d))

    def to_dict(self) -> dict:
        return _join(self)


@dataclass
class RunResult:
    """A run's final result (``train.run``): final and best-by-validation accuracy, the marks of its
    stages, the mask's figures, its history of ``StepEvent`` records (as dicts)."""

    run_key: str
    val_acc: float
    val_loss: float
    test_acc: float
    test_loss: float
    best_val_acc: float
    best_val_epoch: int
    test_acc_at_best_val: float
    chance_acc: float  # the best constant guess's test accuracy
    at_chance: bool  # test accuracy below metrics.CHANCE_FACTOR x chance_acc: the run learned nothing
    density: float
    density_target: float
    density_all: float
    kept_weights: int
    prunable_weights: int
    layer_density: dict
    effective_density: float
    effective_weights: int
    effective_units: dict
    collapsed_layers: list
    flops_dense: float
    flops_sparse: float
    rigl_regrown: int
    seconds: float
    epochs: int
    data_sizes: dict
    device: str
    config: dict
    history: list | None = None  # popped by readers that do not keep it
    extra: dict[str, Any] = field(default_factory=dict)  # marks, export figures, pack_size, prefix_shared_by, ...

    @property
    def n_collapsed_layers(self) -> int:
        return len(self.collapsed_layers)

    def events(self) -> list[StepEvent]:
        return [StepEvent.from_dict(m) for m in self.history or ()]

    @classmethod
    def from_dict(cls, d: dict) -> "RunResult":
        return cls(**_split(cls, d))

    def to_dict(self) -> dict:
        return _join(self)
