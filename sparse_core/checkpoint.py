"""Load and save the trainer's full state (``Trainer.state_dict()``) safely.

``torch.load`` with weights_only switched off unpickles arbitrary objects, so a crafted ``state.pt``
runs code. The state holds only tensors (weights, masks, optimizer moments, ``torch.Generator``
states as uint8 tensors), dicts, lists, tuples, strings and numbers, all of which
``weights_only=True`` accepts without an allow-list; ``SAFE_GLOBALS`` is where a type would be
added if the state ever needed one. One loader serves the CLI (``--checkpoint``) and the Ray
trainable, and turns every way a file can fail to be a checkpoint into one ``CheckpointError``
line that names the path and what to do.

A state that unpickles safely can still be wrong: ``load_state(path, cfg)`` also checks its content
against ``cfg`` (``check_state``: the known fields' types, the model's tensor names, shapes and dtypes
against the model ``cfg`` builds, masks as bool tensors of their weights' shapes, ``step_idx`` within
the plan, the run_key), before anything is restored from it. Fields it does not know are left to the
trainer (a newer state may carry more). ``save_state`` writes a temporary file created exclusively
beside the target and renames it over the target, so no link planted at either name is followed.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
import zipfile

import torch

from .config import Config, from_flat, run_key
from .plan import build as build_plan, total_epochs
from .run_state import FORMAT as STATE_FORMAT
from .run_state import GENERATORS

# Input shape and classes of each data set, to build a model's shapes without loading its data.
_DATA_SHAPES = {"digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10)}

# Types beyond weights_only's built-in allow-list that a trainer state may contain (none today).
SAFE_GLOBALS: list = []


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of this tool (corrupt, foreign or unsafe)."""


def _bad(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a checkpoint of sparse_core ({why}); delete it or pass another path")


def load_state(path: str | os.PathLike, cfg: Config | None = None) -> dict:
    """The state saved at ``path`` (tensors on the CPU), or ``CheckpointError``; never runs code. With
    ``cfg``, its content is checked against that config too (``check_state``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _bad(path, "no such file" if not os.path.exists(path) else "not a file")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; random bytes, text, truncation fail here
        raise _bad(path, "not a PyTorch zip archive: corrupt, truncated or another kind of file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:  # weights_only refused a global: a foreign or crafted pickle
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise _bad(path, f"it asks to import {found.group(1) if found else 'a Python object'}, which a "
                         f"trainer state never does") from None
    except Exception as e:  # noqa: BLE001 - torch reports damaged archives in many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise _bad(path, f"unreadable: {type(e).__name__}: {first[:160]}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "step_idx" not in state:
        fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise _bad(path, f"no trainer state of format {STATE_FORMAT}, found {fmt!r}")
    if cfg is not None:
        check_state(state, cfg, path)
    return state


def save_state(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically (a crash mid-write leaves the previous file intact): into a
    new file created exclusively in the same folder (``mkstemp``: never an existing name or link), then
    renamed over ``path`` (which replaces a link there rather than writing through it)."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_FIELDS = {"config": dict, "step_idx": int, "model": dict, "has_mask_scores": bool, "masks": (dict, type(None)),
           "optimizer": (dict, type(None)), "segment": (tuple, list, type(None)), "seg_step": int,
           "generators": dict, "rewind_state": (dict, type(None)), "history": list, "best": dict, "marks": dict,
           "rigl_regrown": (int, float), "elapsed": (int, float), "mask_beta": (int, float, type(None))}


def check_state(state: dict, cfg: Config, path: str = "the checkpoint") -> None:
    """``CheckpointError`` unless ``state`` is a trainer state of ``cfg``'s run: the fields the trainer
    restores, with their types; model tensors named and shaped as ``cfg``'s model; masks bool, shaped as
    their weights; ``step_idx`` within the plan; the same run_key. Unknown fields are left alone."""
    for key, kind in _FIELDS.items():
        value, kinds = state.get(key), kind if isinstance(kind, tuple) else (kind,)
        if key not in state or not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise _bad(path, f"field {key!r} must be {names}, found {type(value).__name__ if key in state else 'none'}")
    try:
        saved = run_key(from_flat(state["config"]))
    except (ValueError, TypeError, KeyError) as e:
        raise _bad(path, f"its config does not parse: {str(e)[:160]}") from None
    if saved != run_key(cfg):
        raise _bad(path, f"it belongs to run_key {saved}, not this run's {run_key(cfg)}")
    steps = len(build_plan(cfg))
    if not 0 <= state["step_idx"] <= steps:
        raise _bad(path, f"step_idx {state['step_idx']} is outside this run's plan of {steps} steps")
    if len(state["history"]) > total_epochs(cfg) or not all(isinstance(h, dict) for h in state["history"]):
        raise _bad(path, f"its history is not at most {total_epochs(cfg)} epochs")
    if state["seg_step"] < 0 or state["elapsed"] < 0:
        raise _bad(path, "seg_step and elapsed must be >= 0")
    gens = state["generators"]
    missing = [n for n in GENERATORS if not (torch.is_tensor(gens.get(n)) and gens[n].dtype == torch.uint8)]
    if missing:
        raise _bad(path, f"generator state(s) {missing} missing or not uint8 tensors")
    _check_tensors(state, cfg, path)


def _check_tensors(state: dict, cfg: Config, path: str) -> None:
    """The model's tensors (and the masks and rewind point) against the model that ``cfg`` builds."""
    full = expected_model(cfg)
    model = _tensors(state["model"], "model", path)
    if full is not None:
        scores = {k for k in full if k.endswith("mask_score")}
        want = full if state["has_mask_scores"] else {k: v for k, v in full.items() if k not in scores}
        if set(model) != set(want):
            extra, missing = sorted(set(model) - set(want)), sorted(set(want) - set(model))
            raise _bad(path, f"its model tensors do not match the config's model (unexpected {extra[:3]}, "
                             f"missing {missing[:3]})")
    else:
        full = want = {k: (tuple(v.shape), v.dtype) for k, v in model.items()}
    for name, tensor in model.items():
        if (tuple(tensor.shape), tensor.dtype) != want[name]:
            raise _bad(path, f"model tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, the config's model "
                             f"has {want[name][0]} {want[name][1]}")
    for field in ("masks", "rewind_state"):
        for name, tensor in _tensors(state[field] or {}, field, path).items():
            shape = full.get(name, (None, None))[0]
            bad_type = field == "masks" and tensor.dtype != torch.bool
            if tuple(tensor.shape) != shape or bad_type:
                raise _bad(path, f"{field} entry {name!r} ({tuple(tensor.shape)} {tensor.dtype}) is not a "
                                 f"{'bool mask of' if field == 'masks' else 'tensor of'} a model weight's shape")


def _tensors(entries: dict, field: str, path: str) -> dict:
    for name, value in entries.items():
        if not (isinstance(name, str) and torch.is_tensor(value)):
            raise _bad(path, f"{field} entry {str(name)[:80]!r} is not a named tensor")
    return entries


def expected_model(cfg: Config) -> dict | None:
    """Name -> (shape, dtype) of every tensor of ``cfg``'s model with its learned-mask scores (built on
    the meta device: no memory, no data); None for a data set whose input shape is not known here."""
    from . import learned_mask, models

    if cfg.data.name == "synthetic":
        shape = (tuple(int(p) for p in cfg.data.synthetic_shape.split("x")), cfg.data.synthetic_classes)
    else:
        shape = _DATA_SHAPES.get(cfg.data.name)
    if shape is None:
        return None
    with torch.device("meta"):
        model = models.build(cfg.model, shape[0], shape[1], unit_grad_at_zero=cfg.init.name == "zero")
        if cfg.mask.kind != "none":
            learned_mask.attach(model, cfg.mask)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
