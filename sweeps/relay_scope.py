"""What a relay request may do, checked before anything runs: the sweep the driver serves (``Scope``:
store, experiment, sweep, trial set, Tune storage and parent run, none of which a request can name),
and each field of a request (its type, size and the values allowed)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Callable

from runstore import ROLE_TAG

from .relay_protocol import MAX_METRICS
from .tracking import FINAL_FIELDS, FINAL_METRICS, TrackingError

PROVENANCE_TAGS = ("sparse_core_version", "git_commit", "pack_size")  # the tags a trial may set
CLAIM = re.compile(r"[A-Za-z0-9_.\-]{1,253}/\d{1,10}/[0-9A-Za-z]{1,24}")
TRIAL_ID = re.compile(r"[A-Za-z0-9_\-]{1,128}")
METRIC_PREFIXES = ("epoch/", "trainer/", "prune/", "final/")
OPEN_FIELDS = {"op", "run_key", "flat", "claim", "trial_id", "tags", "resumed_at_epoch"}


class Refused(TrackingError):
    """A request the relay does not serve (outside its scope, malformed): the reply's error."""


@dataclasses.dataclass(frozen=True)
class Scope:
    """What the relay serves while a sweep runs: its store, experiment and sweep, its trial set
    (``trials(run_key, requested flat)`` -> (cell, flat) of that trial, None when it is not one of the
    sweep's), the Tune storage its trials' checkpoints live in (None: anywhere), the sweep's parent
    run (``sweep_run.py``), whose child every run it opens is (None: no parent), and each trial's role
    tag by run_key (``designs.Trial.role``; a trial may send only its own, and gets it where it sends none)."""

    uri: str
    experiment_id: str
    sweep: str
    trials: Callable[[str, dict], "tuple[str, dict] | None"]
    storage: str | None = None
    parent_run_id: str | None = None
    roles: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, uri: str, experiment_id: str, sweep: str, trials, storage: str | None = None,
           parent_run_id: str | None = None) -> "Scope":
        """A fixed trial set: objects with ``run_key``, ``cell`` and ``flat`` (``designs.Trial``)."""
        table = {t.run_key: (t.cell, dict(t.flat)) for t in trials}
        roles = {t.run_key: t.role for t in trials if getattr(t, "role", None)}
        return cls(uri, experiment_id, sweep, lambda key, _flat: table.get(key), storage, parent_run_id, roles)


def inside(location: str, storage: str | None) -> bool:
    """Whether ``location`` lies in the Tune storage ``storage`` (a folder or a URI; None: anywhere)."""
    if storage is None:
        return True
    if "://" in storage:
        root = storage.rstrip("/") + "/"
        return location.startswith(root) and "/../" not in location + "/"
    return os.path.commonpath([os.path.realpath(location), os.path.realpath(storage)]) == os.path.realpath(storage)


def check(value, kind, what: str):
    """``value`` if it is a ``kind`` (a bool is no number), else ``Refused`` naming ``what``."""
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise Refused(f"{what} must be {getattr(kind, '__name__', kind)}, not {type(value).__name__}")
    return value


def check_open(request: dict, scope: Scope | None) -> tuple[str, str, str | None, int | None, dict, tuple]:
    """An ``open`` request, checked against ``scope``: (run_key, claim, trial_id, resumed_at_epoch, tags,
    the trial's (cell, flat))."""
    unknown = sorted(set(request) - OPEN_FIELDS)
    if unknown:
        raise Refused(f"open: unknown field(s) {unknown} (the driver fixes store, experiment and sweep); "
                      f"valid: {sorted(OPEN_FIELDS)}")
    if scope is None:
        raise Refused("open: the relay serves no sweep now")
    key, claim = check(request.get("run_key"), str, "run_key"), check(request.get("claim"), str, "claim")
    if not CLAIM.fullmatch(claim):
        raise Refused(f"open: claim {claim[:80]!r} is not host/pid/start")
    trial_id, resumed = request.get("trial_id"), request.get("resumed_at_epoch")
    if trial_id is not None and not (isinstance(trial_id, str) and TRIAL_ID.fullmatch(trial_id)):
        raise Refused(f"open: trial_id {str(trial_id)[:80]!r} is not a Tune trial id")
    if resumed is not None and not (isinstance(resumed, int) and not isinstance(resumed, bool) and resumed >= 0):
        raise Refused(f"open: resumed_at_epoch must be an int >= 0 or null, not {resumed!r}")
    tags = dict(check(request.get("tags", {}), dict, "tags"))
    role, sent = scope.roles.get(key), tags.pop(ROLE_TAG, None)
    bad = sorted(set(tags) - set(PROVENANCE_TAGS))
    if bad:
        raise Refused(f"open: a trial may not set tag(s) {bad}; valid: {list(PROVENANCE_TAGS)}")
    trial = scope.trials(key, check(request.get("flat", {}), dict, "flat"))
    if trial is None:
        raise Refused(f"open: run_key {key[:80]!r} is not one of the trials of sweep {scope.sweep!r}")
    if sent is not None and sent != role:
        raise Refused(f"open: run_key {key[:80]!r} has role {role!r} in sweep {scope.sweep!r}, not {str(sent)[:40]!r}")
    return key, claim, trial_id, resumed, {**tags, ROLE_TAG: role} if role else tags, trial


def pending(request: dict) -> list[tuple]:
    """The metrics of a request, checked: [key, value, timestamp ms, step] each."""
    items = check(request.get("pending", []), list, "pending")
    if len(items) > MAX_METRICS:
        raise Refused(f"at most {MAX_METRICS} metrics per request, not {len(items)}")
    out = []
    for m in items:
        if not (isinstance(m, list) and len(m) == 4 and isinstance(m[0], str) and len(m[0]) <= 250
                and m[0].startswith(METRIC_PREFIXES) and all(isinstance(v, (int, float)) for v in m[1:])
                and all(isinstance(v, int) for v in m[2:])):
            raise Refused(f"a metric is [key starting with one of {METRIC_PREFIXES}, value, timestamp, step], "
                          f"not {str(m)[:100]}")
        out.append((m[0], float(m[1]), m[2], m[3]))
    return out


def result(value) -> dict:
    """``finish``'s result, checked: numbers, a list of layer names, a dict of layer densities."""
    check(value, dict, "result")
    allowed = set(FINAL_FIELDS)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise Refused(f"unknown result field(s) {unknown}; valid: {sorted(allowed)}")
    for key in (*FINAL_METRICS, "n_collapsed_layers", "prefix_shared_by"):
        if key in value:
            check(value[key], (int, float), f"result[{key!r}]")
    if not isinstance(value.get("epochs"), int) or value["epochs"] < 0:
        raise Refused("result['epochs'] must be an int >= 0")
    layers = check(value.get("collapsed_layers"), list, "result['collapsed_layers']")
    density = check(value.get("layer_density"), dict, "result['layer_density']")
    if not all(isinstance(n, str) for n in layers) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and (math.isnan(v) or 0 <= v <= 1)
            for v in density.values()):
        raise Refused("result's collapsed_layers must be names and layer_density values in [0, 1]")
    for key in ("device", "sparse_path"):
        if key in value:
            check(value[key], str, f"result[{key!r}]")
    units = check(value.get("effective_units", {}), dict, "result['effective_units']")
    if not all(isinstance(n, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
               for n, v in units.items()):
        raise Refused("result's effective_units must map layer names to unit counts >= 0")
    return value
