"""sweeps: Ray Tune sweeps over sparse_core with one MLflow run per trial.

``ablation_grid.py`` (design cells x densities x seeds) and ``optuna_search.py`` (continuous
knobs of one method) are the command lines; ``trainable.py`` (a trial's runs) and ``trial_sync.py``
(its Tune reports and checkpoints) are where sparse_core meets Ray; ``tracking.py`` writes one MLflow run per trial (the store itself is
``runstore``, shared with ``analysis``); ``summary.py`` ends a sweep with a summary and the report.
"""
