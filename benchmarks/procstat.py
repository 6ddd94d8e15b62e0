"""CPU seconds, peak memory and niceness of a process tree, polled from Linux /proc.

Used by sweep_efficiency.py to see where a sweep's CPU goes (driver, Ray's gcs/raylet/agents,
trial workers). Elsewhere than Linux every figure is empty or zero.
"""

from __future__ import annotations

import os
import threading
import time

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def proc_table() -> dict[int, tuple[int, float, int, int, str]]:
    """pid -> (ppid, CPU seconds user+sys, nice, resident bytes, command line) of every readable process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()  # fields after "(comm)": state, ppid, ...
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        out[int(entry)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / _TICK, int(rest[16]),
                           int(rest[21]) * _PAGE, cmd or comm)
    return out


def category(cmd: str, is_root: bool, root_label: str) -> str:
    if is_root:
        return root_label
    if "gcs_server" in cmd:
        return "ray gcs_server"
    if "raylet" in cmd:
        return "ray raylet"
    if cmd.startswith("ray::") or "default_worker.py" in cmd:
        return "trial workers (ray::)"
    return "other ray processes (agents, monitors)"


class TreeSampler(threading.Thread):
    """Polls the process tree under ``root``: each process's last CPU time and niceness, and the
    peak of the tree's summed resident memory.

    A process that exits between two polls loses at most one poll interval of CPU time, so the
    totals are lower bounds (``resource.getrusage`` is exact for a single waited-for child).
    ``history``: (wall time, the tree's CPU seconds so far) at every poll, for ``cpu_at``.
    """

    def __init__(self, root: int, root_label: str = "driver", interval: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.root_label, self.interval = root, root_label, interval
        self.last: dict[int, tuple[float, str, int]] = {}  # pid -> (cpu s, category, nice)
        self.peak_rss = 0
        self.history: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                table = proc_table()
            except OSError:
                return
            children: dict[int, list[int]] = {}
            for pid, row in table.items():
                children.setdefault(row[0], []).append(pid)
            tree, todo = {self.root}, [self.root]
            while todo:
                for child in children.get(todo.pop(), []):
                    if child not in tree:
                        tree.add(child)
                        todo.append(child)
            rss = 0
            for pid in tree & table.keys():
                _, cpu, nice, resident, cmd = table[pid]
                self.last[pid] = (cpu, category(cmd, pid == self.root, self.root_label), nice)
                rss += resident
            self.peak_rss = max(self.peak_rss, rss)
            self.history.append((time.time(), self.total_cpu()))
            self.stop.wait(self.interval)

    def finish(self) -> None:
        self.stop.set()
        self.join()

    def by_category(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for seconds, cat, _ in self.last.values():
            out[cat] = out.get(cat, 0.0) + seconds
        return out

    def total_cpu(self) -> float:
        return sum(seconds for seconds, _, _ in self.last.values())

    def cpu_at(self, when: float) -> float:
        """The tree's CPU seconds at wall time ``when`` (the last poll before it; 0 before the first)."""
        return max((cpu for t, cpu in self.history if t <= when), default=0.0)

    def cpu_by_nice(self, cat: str) -> dict[int, float]:
        """CPU seconds of the processes of ``cat`` by their nice value (Ray also pre-starts idle
        workers outside the job's runtime environment, which never run a trial)."""
        out: dict[int, float] = {}
        for cpu, c, nice in self.last.values():
            if c == cat:
                out[nice] = out.get(nice, 0.0) + cpu
        return out


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot, from /proc/stat (0 where unreadable)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v) - idle) / _TICK
