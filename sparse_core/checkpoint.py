"""Load and save the trainer's full state (``Trainer.state_dict()``) safely.

``torch.load`` with weights_only switched off unpickles arbitrary objects, so a crafted ``state.pt``
runs code. The state holds only tensors (weights, masks, optimizer moments, ``torch.Generator``
states as uint8 tensors), dicts, lists, tuples, strings and numbers, all of which
``weights_only=True`` accepts without an allow-list; ``SAFE_GLOBALS`` is where a type would be
added if the state ever needed one. One loader serves the CLI (``--checkpoint``) and the Ray
trainable, and turns every way a file can fail to be a checkpoint into one ``CheckpointError``
line that names the path and what to do.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile

import torch

from .train import STATE_FORMAT

# Types beyond weights_only's built-in allow-list that a trainer state may contain (none today).
SAFE_GLOBALS: list = []


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of this tool (corrupt, foreign or unsafe)."""


def _bad(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a checkpoint of sparse_core ({why}); delete it or pass another path")


def load_state(path: str | os.PathLike) -> dict:
    """The state saved at ``path`` (tensors on the CPU), or ``CheckpointError``; never runs code."""
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
    return state


def save_state(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically (a crash mid-write leaves the previous file intact)."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
