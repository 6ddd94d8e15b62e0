"""Which runs can train together as one stacked model (``trainer.Trainer``, a pack): ``PACKABLE``,
``pack_key``, and the config hash behind ``pack_key`` and ``prefix.prefix_key``.

Copies of a pack may differ only in ``PACKABLE`` values (numbers, not the computation graph or the
plan's shape); ``pack_key`` is equal for configs that can share a pack.
"""

from __future__ import annotations

import hashlib
import json

from .config import PACKABLE, Config  # PACKABLE: declared per field (sparse_core/config.py)


def config_hash(cfg: Config, leave_out: set | tuple = (), **extra) -> str:
    """12 hex chars of the flat config without ``leave_out``, plus ``extra`` (pack_key, prefix.prefix_key)."""
    flat = {**{k: v for k, v in cfg.to_flat().items() if k not in leave_out}, **extra}
    blob = json.dumps(flat, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pack_key(cfg: Config) -> str:
    """Configs with equal keys can train in one pack (12 hex chars)."""
    return config_hash(cfg, PACKABLE, dense=cfg.prune.density >= 1.0)  # a dense run has no pruning steps in its plan
