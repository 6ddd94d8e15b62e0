"""A run's MLflow metrics and tags, derived from the typed records of ``sparse_core.results`` in one
place: per plan step (``step_metrics``: ``epoch/``, ``trainer/``, ``prune/``) and at the end
(``final_fields`` of a ``RunResult``, then ``final_record``: ``final/<key>`` tags and the
``FINAL_AS_METRICS`` metrics). ``sweeps/tracking.py`` writes them; ``final_metrics`` (``rows``) reads
them back by plain key.
"""

from __future__ import annotations

import math
from typing import Any

from sparse_core.results import RunResult, StepEvent

from .names import CURVES, EPOCH_PREFIX, FINAL_AS_METRICS, FINAL_PREFIX, PRUNE_PREFIX, TRAINER_PREFIX

# StepEvent fields that are bookkeeping, not measurements.
NOT_METRICS = ("epoch", "epochs", "round", "stage_epoch", "stage", "stage_end", "last_prune")
# Per-epoch values not logged: nobody reads them, and a checkpoint's history (``RunLog.restore``) has neither.
NOT_LOGGED = {"seconds": "the run's time so far (its total is final/seconds)", "mask_mean": "= mask_soft_density"}
# Result keys logged once at the end as ``final/<key>`` (step = number of training epochs).
FINAL_METRICS = ("test_acc", "test_loss", "at_chance", "chance_acc", "val_acc", "val_loss", "best_val_acc", "best_val_epoch",
                 "test_acc_at_best_val", "pre_val_acc", "pre_test_acc", "prune_val_acc", "prune_test_acc",
                 "density", "density_target", "density_all", "kept_weights", "prunable_weights", "flops_dense",
                 "flops_sparse", "rigl_regrown", "seconds", "epochs",
                 # sparse_core.train.MASK_MARKS: a learned mask at the end of pre-training (NaN = none)
                 "mask_target", "mask_soft_density", "mask_hard_density", "mask_binary_gap", "mask_jaccard",
                 # sparse_core.connectivity: weights on an input-to-output path (NaN: not a chain of layers)
                 "effective_density", "effective_weights",
                 # sparse_core.export.figures: file sizes and CPU inference latency (NaN = not measured)
                 "model_bytes_dense", "model_bytes_sparse", "latency_threads", "latency_dense_ms_b1",
                 "latency_sparse_ms_b1", "latency_ratio_b1", "latency_dense_ms_b256", "latency_sparse_ms_b256",
                 "latency_ratio_b256")
# What ``finish`` writes of a result, and what the relay takes: FINAL_METRICS, n_collapsed_layers and these.
FINAL_FIELDS = (*FINAL_METRICS, "n_collapsed_layers", "collapsed_layers", "device", "sparse_path", "prefix_shared_by",
                "layer_density", "effective_units")


def finite(value: Any) -> bool:
    """A real number (not a bool), neither NaN nor infinite: what MLflow gets as a metric."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def step_metrics(event: StepEvent) -> tuple[str, int, dict] | None:
    """One plan step's metrics: ``("prune", round, {prune/<key>: ...})`` for a pruning round (step =
    1-based round), ``("epoch", epoch, {epoch/<key> or trainer/<key>: ...})`` for a training epoch (step
    = the run's epoch; ``runstore.CURVES`` are ``epoch/``, the rest ``trainer/``), None for a step with
    neither (RigL's sparse start). ``NOT_LOGGED`` keys are left out."""
    if event.stage == "prune":
        return "prune", event.round + 1, {PRUNE_PREFIX + "val_acc": event.val_acc_after_prune,
                                          PRUNE_PREFIX + "test_acc": event.test_acc_after_prune,
                                          PRUNE_PREFIX + "density": event.density,
                                          PRUNE_PREFIX + "n_collapsed_layers": event.n_collapsed_layers}
    if event.epoch is None:
        return None
    return "epoch", event.epoch, {(EPOCH_PREFIX if k in CURVES else TRAINER_PREFIX) + k: v
                                  for k, v in event.to_dict().items() if k not in NOT_METRICS and k not in NOT_LOGGED}


def final_fields(result: RunResult | dict) -> dict:
    """What a finished run's MLflow run gets of its result (``FINAL_FIELDS``; what a trial sends the relay).
    ``result``: a ``RunResult``, or the dict of one (``sparse_core.train.run``'s)."""
    if not isinstance(result, RunResult):
        result = RunResult.from_dict(result)
    out = {k: v for k, v in result.to_dict().items() if k in FINAL_FIELDS}
    out["n_collapsed_layers"] = result.n_collapsed_layers
    if "at_chance" in out:  # a metric: 1.0 / 0.0 (sparse_core.metrics.at_chance)
        out["at_chance"] = float(bool(out["at_chance"]))
    return out


def final_record(fields: dict) -> tuple[dict, dict]:
    """The final metrics and tags of a run from its ``final_fields``: every number as a tag ``final/<key>``
    (full precision, not charted: what ``runstore.final_metrics`` reads), and ``FINAL_AS_METRICS`` also as
    metrics ``final/<key>``, rounded to 4 decimals for the runs table (which shows, sorts and averages
    them); the collapsed layers, device, effective units, at_chance, sparse path and shared pre-training."""
    final = {k: fields[k] for k in (*FINAL_METRICS, "n_collapsed_layers") if k in fields}
    # shown rounded (4 decimals: 0.9611, not 0.961111...); the tags keep every value at full precision
    metrics = {FINAL_PREFIX + k: round(v, 4) for k, v in final.items() if k in FINAL_AS_METRICS and finite(v)}
    tags = {FINAL_PREFIX + k: repr(float(v)) for k, v in final.items() if finite(v)}
    tags.update({"collapsed_layers": ",".join(fields["collapsed_layers"]), "device": fields.get("device", ""),
                 "effective_units": ",".join(f"{k.removesuffix('.weight')}:{v}"
                                             for k, v in fields.get("effective_units", {}).items())})
    if "at_chance" in fields:
        tags["at_chance"] = "true" if fields["at_chance"] else "false"
    if "sparse_path" in fields:
        tags["sparse_path"] = fields["sparse_path"]
    if fields.get("prefix_shared_by", 1) > 1:  # its pre-training was trained once for this many runs
        tags["pretraining_shared_by"] = str(fields["prefix_shared_by"])
    return metrics, tags
