"""analysis: ablation tables, accuracy-vs-density plots and an HTML report from the sweeps' MLflow runs.

Reads MLflow (SQLite file or server) through ``load.load_runs``; imports sparse_core for the config
keys and types, never the other way round.
"""
