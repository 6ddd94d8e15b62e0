"""Timing helpers shared by the benchmarks: interleaved blocks, paired ratios, tables, threads.

Speed is always a ratio against a baseline measured in the same run: variants run in blocks
that alternate (A B, B A, ...) after a warm-up, each round gives one candidate/baseline ratio,
and the median over rounds is reported with its interquartile range. Importing this module puts
the repository root on ``sys.path``, so a benchmark run as a script can import the packages.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the repo root, for benchmarks run as scripts

import torch  # noqa: E402

from sparse_core.latency import interleaved  # noqa: E402,F401 - the benchmarks' interleaved blocks (one implementation)


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


@dataclass
class Ratio:
    median: float
    q1: float
    q3: float

    def __str__(self) -> str:
        return f"{self.median:.3f} [{self.q1:.2f}-{self.q3:.2f}]"


def ratio_of(ratios: list[float]) -> Ratio:
    """Median and quartiles of per-round ratios (one value: all three equal it)."""
    if len(ratios) < 2:
        return Ratio(ratios[0], ratios[0], ratios[0])
    q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return Ratio(med, q1, q3)


def paired_ratio(times: dict[str, list[float]], candidate: str, baseline: str) -> Ratio:
    """Median (and quartiles) over rounds of candidate time / baseline time in the same round."""
    return ratio_of([c / b for c, b in zip(times[candidate], times[baseline])])


def median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points (x values must differ)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run (the smoke test); its figures mean nothing")
    ap.add_argument("--device", choices=("all", "cpu", "cuda"), default="all", help="all = CPU, and CUDA when present")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for torch (default: torch's choice). Use 1 on a shared machine: with more "
                         "threads than free cores every parallel op can wait a scheduler slice for a descheduled thread")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads > 0:
        torch.set_num_threads(args.threads)


def devices(choice: str) -> list[torch.device]:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    if choice == "all":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [torch.device(choice)]


def cpu_name() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return cpu


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def print_header(title: str, devs: list[torch.device]) -> None:
    print(f"# {title}")
    print(f"# torch {torch.__version__}, python {platform.python_version()}")
    for d in devs:
        print(f"# device {d}: {device_name(d)}")


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
