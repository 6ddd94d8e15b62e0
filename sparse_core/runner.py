"""Running configs: K runs that can share a computation graph train as packs (``sparse_core/packed.py``),
and runs that share their pre-training train it once (``sparse_core/prefix.py``). The top of
``sparse_core``: it imports the trainer, the pack and the prefix sharing, and none of them imports it.
``train.run`` is the single run; ``run_packed`` any number of them.
"""

from __future__ import annotations

from typing import Any

from . import prefix
from .config import Config
from .data import load
from .export import figures
from .packed import Pack, pack_key
from .plan import total_epochs
from .train import Trainer, resolve_device


def run_packed(cfgs: list[Config], logs: list | None = None, states: list[dict | None] | None = None,
               export_paths: list[str | None] | None = None, share_prefix: bool = True
               ) -> list[dict[str, Any] | BaseException]:
    """Run ``cfgs`` as packed copies, one pack per ``pack_key`` and plan position; per copy,
    ``train.run``'s result (the same masks and accuracy as its single run) or the exception that ended
    that copy alone. ``share_prefix``: runs that differ only in what acts from pruning on train their
    pre-training once (sparse_core/prefix.py); their results are unchanged."""
    n = len(cfgs)
    logs, states, export_paths = logs or [None] * n, list(states or [None] * n), export_paths or [None] * n
    datas: dict[str, Any] = {}

    def data_of(cfg: Config):
        key = repr((cfg.data, cfg.train.device))
        if key not in datas:
            datas[key] = load(cfg.data).to(resolve_device(cfg.train.device))
        return datas[key]

    shared = prefix.share(cfgs, states, data_of) if share_prefix else {}
    trainers = [Trainer(c, log, data=data_of(c)) for c, log in zip(cfgs, logs)]
    for i, (t, s) in enumerate(zip(trainers, states)):
        if s is not None:
            t.load_state_dict(s)
        for metrics in shared.get(i, ((), 0))[0]:  # the shared pre-training epochs, as this run's own (no state)
            t.log({**metrics, "epochs": total_epochs(t.cfg)}, None)
    results: list = [None] * n
    for group in sorted({(t.step_idx, pack_key(t.cfg)) for t in trainers}):
        members = [i for i, t in enumerate(trainers) if (t.step_idx, pack_key(t.cfg)) == group]
        for i, out in zip(members, Pack([trainers[i] for i in members]).run()):
            results[i] = out
            if isinstance(out, dict):
                out.update(figures(trainers[i], export_paths[i]), pack_size=len(members),
                           prefix_shared_by=shared.get(i, ((), 1))[1])
    return results
