"""Compact export of a finished run: the kept weights only, in safetensors, and the measured figures.

``save(path, model, masks, cfg, in_shape, num_classes)`` writes one ``.safetensors`` file: per
prunable layer the kept values (float32, row-major order) plus their positions in whichever of
four encodings is smallest *for that layer*, measured by serialising each candidate:

- ``dense``: the whole weight, no index (wins near density 1);
- ``bitmap``: one bit per weight, packed into uint8 (wins above roughly 1/8 to 1/32 density);
- ``flat``: the flat position of each kept weight in the smallest unsigned dtype that holds
  ``numel - 1`` (uint8/16/32, else int64) (wins for small layers at low density);
- ``csr``: row pointers in the smallest dtype that holds the kept count, column indices in the
  smallest that holds ``columns - 1`` (rows = output units/channels; columns = the rest); wins for
  wide layers at low density, where a uint16/uint8 column index beats a uint32 flat index.

Biases and BatchNorm tensors are stored dense. The safetensors metadata (string -> string) holds
one JSON entry, ``sparse_core``: format version, the flat config of the run's identity (what
``run_key`` hashes: not where it ran or how it was tested, so one run_key always writes the same
bytes), input shape, classes and,
per prunable layer, its shape, kept count and encoding. ``load(path)`` rebuilds the plain
``nn.Module`` (``models.build(..., plain=True)``, what ``train.plain_model`` gives) with the exact
weights, so it reproduces the run's test accuracy on the device the run used. Nothing is ever
unpickled: safetensors holds raw tensors and JSON only.

``figures(trainer, path)`` is what every run adds to its result: both file sizes and the CPU
inference latencies of ``latency.measure``.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .config import NOT_IDENTITY, Config, from_flat, run_key
from .masks import get_masks, prunable_layers
from .models import build

FORMAT = "sparse_core.export"
VERSION = 1
META_KEY = "sparse_core"
ENCODINGS = ("dense", "bitmap", "flat", "csr")
_UNSIGNED = ((2**8 - 1, torch.uint8), (2**16 - 1, torch.uint16), (2**32 - 1, torch.uint32))


def index_dtype(largest: int) -> torch.dtype:
    """The smallest integer dtype that holds 0..largest."""
    return next((dtype for limit, dtype in _UNSIGNED if largest <= limit), torch.int64)


def _as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def encode(name: str, weight: torch.Tensor, mask: torch.Tensor, encoding: str) -> dict[str, torch.Tensor]:
    """The tensors that hold ``weight * mask`` in ``encoding`` (keys prefixed by ``name``)."""
    w = weight.detach().cpu().contiguous().reshape(-1).float()
    keep = mask.detach().cpu().reshape(-1).bool()
    if encoding == "dense":
        return {name: (w * keep).reshape(weight.shape).contiguous()}
    out = {f"{name}.values": w[keep].contiguous()}
    if encoding == "bitmap":
        bits = torch.cat([keep, keep.new_zeros((-keep.numel()) % 8)]).view(-1, 8).to(torch.uint8)
        out[f"{name}.bitmap"] = (bits << torch.arange(7, -1, -1, dtype=torch.uint8)).sum(1, dtype=torch.uint8)
    elif encoding == "flat":
        out[f"{name}.index"] = keep.nonzero().flatten().to(index_dtype(keep.numel() - 1))
    elif encoding == "csr":
        rows, cols = _as_matrix(tuple(weight.shape))
        per_row = keep.view(rows, cols).sum(1)
        crow = torch.cat([per_row.new_zeros(1), per_row.cumsum(0)])
        out[f"{name}.crow"] = crow.to(index_dtype(int(crow[-1])))
        out[f"{name}.col"] = keep.view(rows, cols).nonzero()[:, 1].to(index_dtype(cols - 1))
    else:
        raise ValueError(f"encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
    return out


def decode(name: str, shape: tuple[int, ...], encoding: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of ``encode``: the dense float32 weight (zeros where nothing was kept)."""
    if encoding == "dense":
        return tensors[name].reshape(shape)
    n = math.prod(shape)
    values = tensors[f"{name}.values"]
    if encoding == "bitmap":
        bits = tensors[f"{name}.bitmap"].unsqueeze(1) >> torch.arange(7, -1, -1, dtype=torch.uint8)
        where = (bits & 1).flatten()[:n].bool()
        flat = torch.zeros(n, dtype=values.dtype)
        flat[where] = values
        return flat.reshape(shape)
    if encoding == "flat":
        flat = torch.zeros(n, dtype=values.dtype)
        flat[tensors[f"{name}.index"].to(torch.int64)] = values
        return flat.reshape(shape)
    if encoding == "csr":
        crow, col = (tensors[f"{name}.{k}"].to(torch.int64) for k in ("crow", "col"))
        matrix = torch.sparse_csr_tensor(crow, col, values, size=_as_matrix(shape), check_invariants=True)
        return matrix.to_dense().reshape(shape)
    raise ValueError(f"layer {name}: unknown encoding {encoding!r} (this file needs a newer sparse_core?)")


def choose(name: str, weight: torch.Tensor, mask: torch.Tensor) -> tuple[str, dict[str, torch.Tensor], dict[str, int]]:
    """(smallest encoding, its tensors, bytes of every candidate serialised alone)."""
    sizes, tensors = {}, {}
    for encoding in ENCODINGS:
        tensors[encoding] = encode(name, weight, mask, encoding)
        sizes[encoding] = len(st_save(tensors[encoding]))
    best = min(ENCODINGS, key=lambda e: sizes[e])  # ties go to the earlier (simpler) encoding
    return best, tensors[best], sizes


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if not k.endswith("mask_score")}


def dense_bytes(model: nn.Module) -> bytes:
    """The model's whole state dict as plain safetensors (no metadata): the dense baseline."""
    return st_save(_cpu_state(model))


def to_bytes(model: nn.Module, masks: dict[str, torch.Tensor] | None, cfg: Config, in_shape,
             num_classes: int) -> bytes:
    """The export file's bytes (see the module docstring); ``masks`` None = dense."""
    masks = masks if masks is not None else get_masks(model)
    weights = set(prunable_layers(model))
    missing = sorted(weights - set(masks))
    if missing:
        raise ValueError(f"no mask for prunable layer(s) {', '.join(missing)}")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, value in _cpu_state(model).items():
        if name in weights:
            encoding, encoded, _ = choose(name, value, masks[name])
            tensors.update(encoded)
            layers[name] = {"shape": list(value.shape), "kept": int(masks[name].sum()), "encoding": encoding}
        else:
            tensors[name] = value
    header = {"format": FORMAT, "version": VERSION, "run_key": run_key(cfg),
              "config": {k: v for k, v in cfg.to_flat().items() if k not in NOT_IDENTITY},
              "in_shape": list(in_shape), "num_classes": int(num_classes), "layers": layers}
    return st_save(tensors, metadata={META_KEY: json.dumps(header, separators=(",", ":"))})


def save(path: str, model: nn.Module, masks: dict[str, torch.Tensor] | None, cfg: Config, in_shape,
         num_classes: int) -> int:
    """Write the export file (atomically); returns its size in bytes."""
    return write_bytes(path, to_bytes(model, masks, cfg, in_shape, num_classes))


def write_bytes(path: str, blob: bytes) -> int:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    return len(blob)


def read_header(path: str) -> dict:
    """The JSON header of an export file; ValueError naming the file if it is not one."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    if META_KEY not in meta:
        raise ValueError(f"{path} is a safetensors file but not a sparse_core export (no {META_KEY!r} metadata); "
                         f"write one with: python -m sparse_core ... --export {path}")
    header = json.loads(meta[META_KEY])
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"{path}: export format {header.get('format')!r} version {header.get('version')!r}; "
                         f"this sparse_core reads {FORMAT!r} version {VERSION}")
    return header


def load(path: str) -> nn.Module:
    """The plain model (nn.Linear/nn.Conv2d, eval mode, on the CPU) with the exported weights."""
    header = read_header(path)
    cfg = from_flat(header["config"])
    model = build(cfg.model, tuple(header["in_shape"]), header["num_classes"], plain=True)
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = {}
    for name in model.state_dict():
        layer = header["layers"].get(name)
        if layer is not None:
            try:
                state[name] = decode(name, tuple(layer["shape"]), layer["encoding"], tensors)
            except (KeyError, IndexError, RuntimeError) as e:
                raise ValueError(f"{path}: layer {name} ({layer['encoding']}) does not decode: "
                                 f"{type(e).__name__}: {e}") from None
        elif name in tensors:
            state[name] = tensors[name]
        else:
            raise ValueError(f"{path}: tensor {name} is missing (the file does not match model {cfg.model})")
    model.load_state_dict(state)
    return model.eval()


def figures(trainer, path: str | None = None) -> dict:
    """Sizes (and the file at ``path`` if given) and CPU inference latencies of a finished Trainer."""
    from .latency import measure

    cfg, data = trainer.cfg, trainer.data
    blob = to_bytes(trainer.model, trainer.masks, cfg, data.in_shape, data.num_classes)
    if path:
        write_bytes(path, blob)
    out = {"model_bytes_dense": len(dense_bytes(trainer.model)), "model_bytes_sparse": len(blob)}
    plain = build(cfg.model, data.in_shape, data.num_classes, plain=True)
    plain.load_state_dict(_cpu_state(trainer.model))
    out.update(measure(plain.eval(), data.x_test.cpu(), cfg.train.latency_rounds))
    return out
