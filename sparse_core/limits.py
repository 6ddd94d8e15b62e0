"""What a valid config may still ask of this machine beyond what it has: checked before training.

``config`` bounds each value on its own (``model.width`` <= ``MAX_WIDTH``, ...). Here the values are
judged together, against the model they build (on the meta device: no memory, no data): a model whose
training state cannot fit in this host's memory, and a density that keeps no weight at all.
"""

from __future__ import annotations

import os

from .config import Config

BYTES_PER_PARAMETER = 24  # weight, gradient, momentum, mask, rewind point and a checkpoint copy (float32)


def memory_bytes() -> int | None:
    """This host's physical memory, or None where it cannot be read."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


_SIZES: dict = {}


def model_size(cfg: Config) -> tuple[int, int] | None:
    """(parameters, prunable weights) of ``cfg``'s model; None for a data set whose input shape is not
    known without loading it."""
    from .checkpoint import expected_model

    key = (cfg.data, cfg.model, cfg.mask, cfg.init.name)  # what the model's shapes depend on
    if key not in _SIZES:
        shapes = expected_model(cfg)
        sizes = {k: _numel(shape) for k, (shape, _) in (shapes or {}).items()}
        prunable = sum(n for k, n in sizes.items() if k.endswith(".weight") and len(shapes[k][0]) >= 2)
        _SIZES[key] = None if shapes is None else (sum(sizes.values()), prunable)
    return _SIZES[key]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check(cfg: Config) -> None:
    """``ValueError`` naming the value when ``cfg`` cannot run here: its model's training state is larger
    than this host's memory, or ``prune.density`` keeps no weight of the model."""
    size = model_size(cfg)
    if size is None:
        return
    params, prunable = size
    memory = memory_bytes()
    if memory and params * BYTES_PER_PARAMETER > memory:
        raise ValueError(f"model.width={cfg.model.width}, model.depth={cfg.model.depth} (model {cfg.model.name!r}) "
                         f"builds {params:,} parameters, whose training state (~{params * BYTES_PER_PARAMETER / 2**30:.1f} "
                         f"GiB) does not fit in this machine's {memory / 2**30:.1f} GiB; choose a smaller model")
    if prunable and cfg.prune.density * prunable < 1:
        raise ValueError(f"prune.density={cfg.prune.density:g} keeps no weight of the {prunable:,} prunable weights "
                         f"of this model; choose prune.density >= {1 / prunable:.3g}")
