"""``python -m sparse_core key=value ...``: one pipeline run.

Progress goes to stderr, one line per epoch; the LAST line of stdout is one JSON object with the
result. ``--checkpoint PATH`` saves the full state after every epoch and, if PATH exists,
continues from it (loaded with ``weights_only=True``; a file that is not such a checkpoint ends the
command with exit 2 and is left untouched).
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import sys

from .checks import validate_names
from .config import describe, from_flat, parse_overrides


def _help_epilog() -> str:
    rows = describe()
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (key=value, default in brackets):"]
    for key, default, meaning in rows:
        lines.append(f"  {key:<{width}}  [{default}]  {meaning}")
    return "\n".join(lines)


def progress_line(m: dict) -> str:
    if m["stage"] == "prune":
        return (f"prune round {m['round'] + 1}: density {m['density']:.4f}, val acc right after pruning "
                f"{m['val_acc_after_prune']:.4f} (test {m['test_acc_after_prune']:.4f}), collapsed layers "
                f"{m['n_collapsed_layers']}" + (f", mask/pruned overlap (Jaccard) {m['mask_jaccard']:.3f}"
                                                 if "mask_jaccard" in m else ""))
    if m["stage"] == "rigl_init":
        return f"rigl: random sparse start at density {m['density']:.4f}"
    extra = ""
    if "mask_mean" in m:
        target = f" (target {m['mask_target']:.4f}, lambda {m['mask_lambda']:.3g})" if "mask_target" in m else ""
        extra = (f" mask soft/hard density {m['mask_soft_density']:.4f}/{m['mask_hard_density']:.4f}{target}"
                 f" gap {m['mask_binary_gap']:.3f}")
    eta = m["seconds"] / m["epoch"] * (m["epochs"] - m["epoch"])
    return (f"[{m['epoch']:>3}/{m['epochs']}] {m['stage']:<5} epoch {m['stage_epoch']:>3}  loss {m['train_loss']:.4f}  "
            f"val acc {m['val_acc']:.4f}  test acc {m['test_acc']:.4f}  density {m['density']:.4f}{extra}  ({m['seconds']:.1f}s, eta {eta:.0f}s)")


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose every error is one line on stderr, ``error: <what>``, and exit 2."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _check_threads(parser, threads: int) -> None:
    cores = os.cpu_count() or 1
    if not 1 <= threads <= cores:
        parser.error(f"--threads {threads}: must be in [1, {cores}] (this machine has {cores} cores)")


def _check_limits(parser, cfg) -> None:
    """A model this host cannot hold, a density that keeps no weight: one line, exit 2."""
    from . import limits

    try:
        limits.check(cfg)
    except ValueError as e:
        parser.error(str(e))


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m sparse_core", description="Run one pruning pipeline (or RigL) and print the result as JSON.",
        epilog=_help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. prune.density=0.01")
    parser.add_argument("--checkpoint", metavar="PATH", help="save state here after every epoch; resume if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch intra-op threads (default 1: small models gain nothing from more, and several "
                             "runs side by side slow each other down many times over)")
    parser.add_argument("--export", metavar="PATH", help="write the final model here in compact sparse form "
                        "(safetensors; sparse_core.export.load rebuilds it)")
    return parser


def _unwritable_export(path: str) -> str | None:
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        return (f"--export {path}: cannot write a file there ({parent} must be a writable directory); "
                f"pass another path")
    return None


def _resume_state(path: str | None, cfg):
    """The checkpoint's state to resume from (None: start afresh), checked before any training: a bad file is
    reported (``CheckpointError``), never overwritten."""
    from .checkpoint import CheckpointError, load_state

    if not path:
        return None
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(path):
        state = load_state(path, cfg)  # content checked against cfg too
        print(f"resuming from {path} (step {state['step_idx']})", file=sys.stderr)
        return state
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"--checkpoint {path}: cannot write in {parent} (not a writable directory); "
                              f"pass another path")
    return None


def _report(result: dict, data, args) -> None:
    """The closing lines on stderr (the chance warning even with --quiet) and the JSON result on stdout
    (the result without its history)."""
    from .results import RunResult

    result.pop("history")
    r = RunResult.from_dict(result)  # read through the typed result; printed as it came (keys in their order)
    if result["at_chance"]:  # shown even with --quiet: the run trained nothing worth reading
        print(f"warning: test accuracy {100 * r.test_acc:.2f} % is at chance (one constant guess scores "
              f"{100 * result['chance_acc']:.2f} %): the network learned nothing; look for a diverging loss above and "
              f"check the settings (result: \"at_chance\": true)", file=sys.stderr)
    if not args.quiet:
        print(f"done: test acc {r.test_acc:.4f}, val acc {r.val_acc:.4f} (best val {r.best_val_acc:.4f} at epoch "
              f"{r.best_val_epoch}) at density {r.density:.4f} in {r.seconds:.1f}s; run_key {r.run_key}", file=sys.stderr)
    if args.export and not args.quiet:
        print(f"exported {args.export}: {r.extra['model_bytes_sparse']:,} bytes (dense state dict "
              f"{r.extra['model_bytes_dense']:,})", file=sys.stderr)
    print(json.dumps(_json_safe(result)))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cfg = from_flat(parse_overrides(args.overrides))
        validate_names(cfg)
    except ValueError as e:
        parser.error(str(e))
    _check_threads(parser, args.threads)
    if args.export and _unwritable_export(args.export):
        print(f"error: {_unwritable_export(args.export)}", file=sys.stderr)
        return 2

    from .train import run  # torch is imported after the argument checks, so a typo fails fast

    from .checkpoint import CheckpointError, save_state

    _check_limits(parser, cfg)
    try:
        state = _resume_state(args.checkpoint, cfg)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def log(metrics: dict, checkpoint) -> None:
        if not args.quiet:
            print(progress_line(metrics), file=sys.stderr, flush=True)
        if args.checkpoint:
            save_state(checkpoint(), args.checkpoint)

    import torch

    torch.set_num_threads(args.threads)
    try:
        data = _load_data(cfg, args.quiet)
        result = run(cfg, log, state, args.export, data=data)  # with sizes, CPU latencies; the file if --export
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _report(result, data, args)
    return 0


def _load_data(cfg, quiet: bool):
    """The run's data set on its device, announced on stderr."""
    from .data import load
    from .run_state import resolve_device

    device = resolve_device(cfg.train.device)
    data = load(cfg.data).to(device)
    sizes = data.sizes
    if not quiet:
        print(f"data {cfg.data.name}: {sizes['train']} train / {sizes['val']} validation / {sizes['test']} test "
              f"images ({sum(sizes.values())} in all); selection reads validation only", file=sys.stderr)
    return data


def exit_now(code: int) -> None:
    """End a command that returned ``code`` (``python -m sparse_core``, the sweep scripts) without the
    interpreter's teardown.

    Tearing down a process that has loaded torch (and, in a sweep's driver, Ray, Tune and MLflow) frees
    their modules and objects one by one after the command's work is done: about 2 CPU s of a laptop
    trial's 6 (``packed_trials.py startup``), 3 s of wall time and 2.5 CPU s for a sweep's driver on
    2 cores (README, speed). The atexit handlers (Ray's, logging's) still run and both standard streams
    are flushed; every file the command wrote was closed when written. Only for a command's normal end:
    an exception or ``SystemExit`` leaves the usual way.
    """
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more can be written to it
                pass
        os._exit(code)
