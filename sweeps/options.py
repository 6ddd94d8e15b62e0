"""Command-line options and pre-flight checks shared by the sweep scripts.

Everything here runs before Ray is imported: a typo, a bad value, a missing dataset or an
unreachable tracking server ends the command in seconds with a message naming the problem.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from runstore import unwritable
from sparse_core import data as sparse_data
from sparse_core import limits
from sparse_core.cli import OneLineParser  # noqa: F401 - the sweep scripts' parser: every error one line
from sparse_core.checks import validate_names
from sparse_core.config import REGISTRY_KEYS, from_flat, parse_overrides

from . import claims, tracking

DEFAULT_EXPERIMENT = "sparsity-sweep"
DEFAULT_STORAGE = "ray_results"  # Tune's trial dirs and checkpoints; use shared storage on multi-node clusters


# A sweep or Tune run name: one path component (Tune makes a folder of it under --storage-path).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]{0,99}")
MAX_EXPERIMENT_CHARS = 256  # MLflow's column for experiment names
MAX_CPUS_PER_TRIAL = 1024  # on a cluster (RAY_ADDRESS), whose size is not known before Ray starts
MAX_GPUS_PER_TRIAL = 64


def fail(message: str):
    """End the command before Ray: one line naming the problem, exit 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def local_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def check_args(args, preset) -> None:
    """Names and resources that cannot run (a path for a name, more cores or GPUs per trial than this
    machine has, ...): one line and exit 2 (``fail``), before any store or Ray is touched."""
    if args.name is not None and not NAME.fullmatch(args.name):
        fail(f"--name {args.name[:60]!r}: use 1 to 100 letters, digits and _.=+- (not starting with . or -): "
             f"it names a folder under --storage-path")
    resume = getattr(args, "resume", None)
    if resume not in (None, "latest") and not NAME.fullmatch(resume):
        fail(f"--resume {resume[:60]!r}: give the name of a Tune run folder under --storage-path (no path)")
    exp = args.experiment
    if not 1 <= len(exp) <= MAX_EXPERIMENT_CHARS or not exp.isprintable() or exp.strip() != exp:
        fail(f"--experiment {exp[:40]!r}{'...' if len(exp) > 40 else ''} ({len(exp)} characters): give 1 to "
             f"{MAX_EXPERIMENT_CHARS} printable characters, without leading or trailing spaces")
    for flag, value, low in (("--max-concurrent", args.max_concurrent, 1), ("--max-failures", args.max_failures, 0)):
        if value is not None and not low <= value <= 10_000:
            fail(f"{flag} {value}: must be in [{low}, 10000]")
    local = not os.environ.get("RAY_ADDRESS")
    cpus = args.cpus_per_trial or preset.cpus_per_trial
    most = local_cores() if local else MAX_CPUS_PER_TRIAL
    if cpus > most:
        where = f"this machine has {most} cores" if local else f"at most {most}"
        fail(f"--cpus-per-trial {cpus:g}: a trial cannot get more CPUs than exist ({where})")
    gpus = args.gpus_per_trial
    if gpus is not None and gpus > 0:
        most = local_gpus() if local else MAX_GPUS_PER_TRIAL
        if gpus > most:
            fail(f"--gpus-per-trial {gpus:g}: this machine has {most} GPUs" if local else
                 f"--gpus-per-trial {gpus:g}: at most {most}")


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def add_common(parser: argparse.ArgumentParser, sweep_default: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the base config, e.g. --set train.lr=0.1 (repeatable)")
    parser.add_argument("--name", help=f"sweep name: MLflow tag 'sweep' and Tune run name prefix "
                                        f"(default {sweep_default})")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (default %(default)s)")
    parser.add_argument("--mlflow-uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--data-dir", help="where mnist / cifar10 live (sets data.dir; absolute paths survive "
                                           "'ray job submit')")
    parser.add_argument("--max-concurrent", type=int, help="at most this many trials at once (default: as "
                                                           "resources allow)")
    parser.add_argument("--cpus-per-trial", type=positive, help="CPU cores per trial (default: the preset's)")
    parser.add_argument("--gpus-per-trial", type=non_negative,
                        help="GPU share per trial, fractions allowed (default: the preset's if the cluster has "
                             "GPUs, else 0)")
    parser.add_argument("--max-failures", type=int, default=2,
                        help="retries per trial, each from its last checkpoint (default %(default)s)")
    parser.add_argument("--storage-path", default=DEFAULT_STORAGE,
                        help="Tune storage (trial dirs, checkpoints; needed by --resume); shared (NFS, s3://) on "
                             "multi-node clusters (default ./%(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and their count, run nothing")


def base_overrides(preset_base: dict, sets: list[str], data_dir: str | None) -> dict:
    """Preset base, then --set, then --data-dir; data.dir made absolute (workers run elsewhere)."""
    flat = {**preset_base, **parse_overrides(sets)}
    if data_dir:
        flat["data.dir"] = data_dir
    cfg = from_flat(flat)  # unknown keys and bad values fail here, naming the key
    validate_names(cfg)  # unknown pruner, dataset, ... likewise
    flat["data.dir"] = os.path.abspath(os.path.expanduser(cfg.data.dir))
    return flat


def check_trials(flats) -> None:
    """Registry names and dataset files of every distinct config; raises ValueError."""
    seen = set()
    for flat in flats:
        cfg = from_flat(flat)
        limits.check(cfg)  # every trial (a density that keeps no weight); the model's size is computed once
        typed = cfg.to_flat()
        sig = tuple(typed[k] for k in (*REGISTRY_KEYS, "data.dir", "data.download"))  # registry names, data files
        if sig in seen:
            continue
        seen.add(sig)
        validate_names(cfg)
        try:
            sparse_data.check(cfg.data)
        except FileNotFoundError as e:
            raise ValueError(f"{e} (or pass --data-dir)") from None


def tracking_target(cli_uri: str | None, experiment: str) -> tuple[str, str]:
    """(tracking URI, experiment id), failing fast if the store cannot be reached."""
    uri = tracking.resolve_tracking_uri(cli_uri)
    tracking.check_reachable(uri, writable=True)  # a sweep writes its runs and the store's lock file
    with claims.store_lock(uri):  # two drivers on a new SQLite file: one creates MLflow's schema, then the other
        try:
            return uri, tracking.experiment_id(uri, experiment)
        except tracking.TrackingError:
            raise
        except Exception as e:  # noqa: BLE001 - MLflow and SQLAlchemy report a store they cannot use in many types
            first = (str(e).strip().splitlines() or [""])[0]
            raise tracking.TrackingError(f"the MLflow store {uri} cannot be used: {type(e).__name__}: "
                                         f"{first[:200]}") from None


def targets(parser: argparse.ArgumentParser, args) -> tuple[str, str, str]:
    """(tracking URI, experiment id, Tune storage path) for a sweep script, exiting through
    ``parser.error`` when the tracking store cannot be reached; warns when a relative SQLite store
    would land in a ``ray job submit`` job's temporary working dir. An unwritable local
    ``--storage-path`` ends the command (one line, exit 2) before the store is touched."""
    storage = storage_path(args.storage_path)
    why = None if "://" in storage else unwritable(storage)
    if why:
        print(f"error: --storage-path {args.storage_path}: {why}; pass a writable directory", file=sys.stderr)
        raise SystemExit(2)
    try:
        uri, exp_id = tracking_target(args.mlflow_uri, args.experiment)
    except tracking.TrackingError as e:
        fail(str(e))
    if tracking.sqlite_path(uri) and os.environ.get("RAY_ADDRESS") and not args.mlflow_uri:
        print("warning: a SQLite store inside 'ray job submit' lives in the job's temporary working dir; "
              "pass an absolute --mlflow-uri sqlite:////path/mlflow.db or a tracking server", file=sys.stderr)
    return uri, exp_id, storage


def storage_path(value: str) -> str:
    return value if "://" in value else os.path.abspath(os.path.expanduser(value))
