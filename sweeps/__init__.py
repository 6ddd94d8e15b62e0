"""sweeps: Ray Tune sweeps over sparse_core with one MLflow run per trial.

``ablation_grid.py`` (design cells x densities x seeds) and ``optuna_search.py`` (continuous
knobs of one method) are the command lines; ``trainable.py`` is the only module where
sparse_core meets Ray; ``tracking.py`` is the MLflow side (read helpers for ``analysis`` too).
"""
