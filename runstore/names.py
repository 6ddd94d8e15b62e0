"""The names a run's data goes by in the store: metric prefixes, the tags that nest and mark runs, params.

One naming rule: per-epoch accuracy and loss are ``epoch/<key>``, results once at the end ``final/<key>``
(tags; four of them also metrics: ``FINAL_AS_METRICS``), per pruning round ``prune/<key>`` and the other
per-epoch values ``trainer/<key>`` (MLflow charts one section per prefix, in name order, so a run's
page shows the curves first and the final values next); readers take ``final/`` as the plain key,
and runs logged before the prefixes read the same.
"""

# Metric names: MLflow (3.17, 3.18) charts a run in one section per ``prefix/``, sections sorted by name, and
# puts unprefixed metrics last, so the per-epoch curves get the prefix that sorts first.
EPOCH_PREFIX = "epoch/"  # per training epoch (step = global epoch): the accuracy and loss curves
FINAL_PREFIX = "final/"  # once, at the end (step = number of epochs): the results
# Every result is a tag ``final/<key>`` (full precision, never charted); these are also metrics, rounded
# to 4 decimals, which the runs table shows, sorts and averages (the run's page charts each as one dot).
FINAL_AS_METRICS = ("val_acc", "test_acc", "n_collapsed_layers", "at_chance")  # at_chance averaged: the share of seeds
PRUNE_PREFIX = "prune/"  # per pruning round (step = round): right after pruning
TRAINER_PREFIX = "trainer/"  # per epoch, the rest: learning rate, density, mask and soft-schedule state
CURVES = ("train_loss", "val_acc", "val_loss", "test_acc", "test_loss")  # the epoch/ keys
# A run's claims on a tracking server (sweeps/claims.py): params ``claim.<n>``, not config keys.
CLAIM_PARAM = "claim."
SEARCH_CELL = "optuna"  # the cell tag of Optuna search trials (their tuned knobs differ run to run)
PARENT_TAG = "mlflow.parentRunId"  # MLflow's nesting: a trial's run is a child of its sweep's run
ROLE_TAG, SWEEP_ROLE = "role", "sweep"  # the sweep's own (parent) run: tags role=sweep, sweep=<name>
# A design trial's run: role=baseline (a cell outside the method's pipeline, among which a table picks its
# reference: sweeps/designs.baselines) or role=method; runs without the tag predate it (analysis.table).
BASELINE_ROLE, METHOD_ROLE = "baseline", "method"
