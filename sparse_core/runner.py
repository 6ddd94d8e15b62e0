"""Running configs: the one entry every run goes through, a single one included.

K runs that can share a computation graph train as one pack (``trainer.Trainer`` over their
``run_state.RunState``s, one pack per ``packed.pack_key`` and plan position), and runs that share
their pre-training (``prefix.prefix_key``) train it once (``share_prefixes``). ``run_packed`` runs any
number of configs; ``train.run`` is its pack of one. The top of ``sparse_core``'s training: it imports
the trainer, the run state and the prefix keys, and none of them imports it.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Callable

from .config import Config
from .data import TensorData, load
from .export import figures
from .packed import pack_key
from .plan import total_epochs
from .prefix import fork_point, prefix_key
from .run_state import RunState, resolve_device
from .trainer import Trainer


def share_prefixes(cfgs: list[Config], states: list[dict | None], data_of: Callable
                   ) -> dict[int, tuple[list[dict], int]]:
    """Train each pre-training that two or more fresh runs (``states[i] is None``) have in common,
    once, and set those runs' ``states`` to its end. Returns, per such run, the pre-training epochs'
    log entries (to hand to its log) and the number of runs that shared them. Pre-trainings that can
    share a pack (one per density of a steered mask, one per seed) train as one. A pre-training that
    diverges is left to each run to find alone."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, cfg in enumerate(cfgs):
        key = prefix_key(cfg) if states[i] is None else None
        if key is not None:
            groups[key].append(i)
    by_pack: dict[str, list[list[int]]] = defaultdict(list)  # the pre-trainings that can train as one pack
    for members in groups.values():
        if len(members) >= 2:
            by_pack[pack_key(cfgs[members[0]])].append(members)
    out: dict[int, tuple[list[dict], int]] = {}
    for shared in by_pack.values():
        entries: list[list[dict]] = [[] for _ in shared]
        leads = [RunState(cfgs[members[0]], _recorder(entries[j]), data=data_of(cfgs[members[0]]))
                 for j, members in enumerate(shared)]
        trainer = Trainer(leads)
        fork = fork_point(leads[0].cfg)
        trainer.run(until=fork)
        for j, (lead, members) in enumerate(zip(leads, shared)):
            if j in trainer.failed or lead.step_idx < fork:  # diverged: each run finds that alone
                continue
            state = lead.state_dict()
            for i in members:
                states[i] = {**copy.deepcopy(state), "config": cfgs[i].to_flat()}
                out[i] = (entries[j], len(members))
    return out


def _recorder(entries: list[dict]) -> Callable:
    return lambda metrics, _state: entries.append(copy.deepcopy(metrics))


def _data_loader(given: TensorData | None) -> Callable[[Config], TensorData]:
    """One loaded copy of each data set (per device) for every run that reads it; ``given``: the data for all."""
    datas: dict[str, Any] = {}

    def data_of(cfg: Config) -> TensorData:
        if given is not None:
            return given
        key = repr((cfg.data, cfg.train.device))
        if key not in datas:
            datas[key] = load(cfg.data).to(resolve_device(cfg.train.device))
        return datas[key]

    return data_of


def run_packed(cfgs: list[Config], logs: list | None = None, states: list[dict | None] | None = None,
               export_paths: list[str | None] | None = None, share_prefix: bool = True,
               data: TensorData | None = None, packing: bool = True) -> list[dict[str, Any] | BaseException]:
    """Run ``cfgs`` as packed copies, one pack per ``pack_key`` and plan position; per copy, its
    result (the same masks and accuracy as its single run, with the export figures) or the exception
    that ended that copy alone. ``share_prefix``: runs that differ only in what acts from pruning on
    train their pre-training once (sparse_core/prefix.py); their results are unchanged. ``packing``:
    the result's ``pack_size`` and ``prefix_shared_by`` (left out for ``train.run``). ``data``: the
    data set of every run (else each config's, loaded once)."""
    n = len(cfgs)
    logs, states, export_paths = logs or [None] * n, list(states or [None] * n), export_paths or [None] * n
    data_of = _data_loader(data)
    shared = share_prefixes(cfgs, states, data_of) if share_prefix else {}
    runs = [RunState(c, log, data=data_of(c)) for c, log in zip(cfgs, logs)]
    for i, (t, s) in enumerate(zip(runs, states)):
        if s is not None:
            t.load_state_dict(s)
        for metrics in shared.get(i, ((), 0))[0]:  # the shared pre-training epochs, as this run's own (no state)
            t.log({**metrics, "epochs": total_epochs(t.cfg)}, None)
    results: list = [None] * n
    for group in sorted({(t.step_idx, pack_key(t.cfg)) for t in runs}):
        members = [i for i, t in enumerate(runs) if (t.step_idx, pack_key(t.cfg)) == group]
        for i, out in zip(members, Trainer([runs[i] for i in members]).run()):
            results[i] = out
            if isinstance(out, dict):
                out.update(figures(runs[i], export_paths[i]))
                if packing:
                    out.update(pack_size=len(members), prefix_shared_by=shared.get(i, ((), 1))[1])
    return results
