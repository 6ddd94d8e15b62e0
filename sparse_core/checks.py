"""The checks of a config that need the registries (and so torch): every registry-backed name and the rules
that read a registry. ``sparse_core.config`` parses and checks values without them, so that a sweep can
validate a grid cheaply; this module sits above it."""

from __future__ import annotations

from . import registry
from .config import REGISTRY_KEYS, Config
from .post_prune import loss_of


def validate_names(cfg: Config) -> None:
    """Check every registry-backed name (dataset, model, init, pruner, scope, mask kind, RigL's start) and
    the rules that need a registry (post-prune tricks that each replace the loss)."""
    flat = cfg.to_flat()
    for key, reg_name in REGISTRY_KEYS.items():
        registry.REGISTRIES[reg_name].check(key, flat[key])
    loss_of(flat)  # at most one switched-on post-prune trick may replace the loss
    starts = ["random"] + [n for n in registry.PRUNERS.names() if n != "mask"]
    if cfg.rigl.start not in starts:
        raise ValueError(f"rigl.start={cfg.rigl.start!r} is not valid; choose one of {', '.join(starts)}")
