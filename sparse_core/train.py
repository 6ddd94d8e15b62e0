"""``run(cfg, log, state) -> result``: one run, the pack of one through ``runner.run_packed``.

The loop is ``trainer.Trainer``'s, a run's state ``run_state.RunState``'s, and what a method adds to
the loop a hook's (``hooks.py``). This module is the single run's entry and the names its callers
import (the plan's schedules, the errors, the checkpoint format).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .checks import validate_names
from .config import Config
from .data import TensorData
from .models import build
from .plan import derive_seed, lr_factor, total_epochs
from .results import InjectedFailure, RunResult, StepEvent, TrainingDiverged
from .run_state import FORMAT as STATE_FORMAT
from .run_state import GENERATORS, MASK_MARKS, Log, RunState, resolve_device
from .runner import run_packed
from .trainer import Trainer

__all__ = ["run", "fit", "plain_model", "total_epochs", "lr_factor", "derive_seed", "TrainingDiverged",
           "InjectedFailure", "resolve_device", "STATE_FORMAT", "GENERATORS", "MASK_MARKS", "RunState", "Trainer",
           "RunResult", "StepEvent"]


def run(cfg: Config, log: Log | None = None, state: dict | None = None, export_path: str | None = None,
        data: TensorData | None = None) -> dict[str, Any]:
    """Run the whole pipeline for ``cfg``; ``state`` (from a checkpoint) continues a run. The result
    carries the model's measured size and latency (``export.figures``); ``export_path`` also writes the
    compact model there. ``data``: the loaded data set (else ``cfg.data``'s)."""
    validate_names(cfg)
    out = run_packed([cfg], [log], [state], [export_path], share_prefix=False, data=data, packing=False)[0]
    if isinstance(out, BaseException):
        raise out
    return out


def fit(state: RunState) -> dict[str, Any]:
    """Train ``state`` to the end of its plan as a pack of one; its result (without the export figures)."""
    out = Trainer([state]).run()[0]
    if isinstance(out, BaseException):
        raise out
    return out


def plain_model(cfg: Config, state_dict: dict, in_shape, num_classes: int) -> nn.Module:
    """The plain architecture (nn.Linear/nn.Conv2d, ReLU, no skips) loaded with a trained state."""
    model = build(cfg.model, in_shape, num_classes, plain=True)
    model.load_state_dict(state_dict)
    return model
