"""An Optuna search's study, kept in an Optuna RDB storage beside the MLflow store.

The study (``optuna_search.py``) lives in ``optuna.db`` beside a SQLite MLflow store (for a
tracking server: in the current directory), or in ``--optuna-storage``. Its name is the sweep's
plus a digest of what the search is (fixed config, knobs, sampler seed), so the same command
continues the same study: an interrupted search, run again, counts the trials it already has
(complete or stopped by ASHA) against ``--num-samples``, and TPE proposes from all of them. A study
a killed driver left with RUNNING trials gets them marked FAIL. ``plots`` draws Optuna's own views
of the study (optimization history, parameter importances, parallel coordinates) for the report.
"""

from __future__ import annotations

import hashlib
import json
import os

from runstore import sqlite_path

DB_NAME = "optuna.db"
DONE = ("COMPLETE", "PRUNED")  # trials that count against --num-samples


def storage_url(tracking_uri: str, given: str | None = None) -> str:
    """``given`` (an Optuna storage URL, or a path taken as SQLite), else ``optuna.db`` beside a SQLite
    MLflow store, else in the current directory."""
    if given:
        return given if "://" in given else "sqlite:///" + os.path.abspath(given)
    path = sqlite_path(tracking_uri)
    folder = os.path.dirname(path) if path else os.getcwd()
    return "sqlite:///" + os.path.join(folder, DB_NAME)


def study_name(sweep: str, fixed: dict, knobs, sampler_seed: int) -> str:
    """``<sweep>-<digest>``: one study per search definition (a changed --set or knob starts another)."""
    what = json.dumps({"fixed": fixed, "knobs": sorted(knobs), "sampler_seed": sampler_seed}, sort_keys=True,
                      default=str)
    return f"{sweep}-{hashlib.sha256(what.encode()).hexdigest()[:10]}"


def prepare(storage: str, name: str) -> int:
    """Trials of study ``name`` already done (``DONE``; 0 for a new study); RUNNING trials a killed
    driver left are marked FAIL."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return 0
    done = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.RUNNING:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        done += t.state.name in DONE
    return done


def rdb(storage: str):
    """The storage object Ray's ``OptunaSearch`` takes."""
    import optuna

    return optuna.storages.RDBStorage(storage)


def plots(storage: str, name: str, out: str) -> list[str]:
    """Optuna's views of the study as PNGs in ``out`` (those that can be drawn: importances need two
    complete trials); the files written."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as views

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=name, storage=storage)
    os.makedirs(out, exist_ok=True)
    written = []
    for file, draw in (("optuna_history.png", views.plot_optimization_history),
                       ("optuna_importances.png", views.plot_param_importances),
                       ("optuna_parallel.png", views.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():  # "experimental", "importances will be equal" (few trials)
                warnings.simplefilter("ignore")
                ax = draw(study)
        except (ValueError, RuntimeError, ZeroDivisionError):  # too few complete trials for this view
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
        fig.set_size_inches(9, 5)
        fig.tight_layout()
        fig.savefig(os.path.join(out, file), dpi=110)
        plt.close(fig)
        written.append(os.path.join(out, file))
    return written
