"""The processes that claim a run: a claim (``host/pid/start``) names one process, pids being reused."""

from __future__ import annotations

import os
import socket


def proc_start(pid: int) -> str | None:
    """Start time of process ``pid`` (Linux: clock ticks after boot; elsewhere "0"), None if it is
    gone or a zombie. Pid and start time together name one process: pids are reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else fields[19]
    except FileNotFoundError:
        return None
    except (OSError, IndexError):  # no procfs
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "0"


def this_claim() -> str:
    """``host/pid/start``: the process that runs a trial, written to its run as tag ``claimed_by``."""
    return f"{socket.gethostname()}/{os.getpid()}/{proc_start(os.getpid())}"


def claim_alive_here(claim: str) -> bool | None:
    """Whether the process a claim (``this_claim``) names still runs: True or False on this host, None for
    a claim made on another host (or not a claim)."""
    if claim.count("/") < 2:
        return None
    host, pid, start = claim.rsplit("/", 2)
    if host != socket.gethostname():
        return None
    return pid.isdigit() and proc_start(int(pid)) == start
