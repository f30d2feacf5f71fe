"""Who holds DEST's lock: one process of one running kernel, named by more than host and pid.

A holder records ``host`` (for people to read), ``pid``, ``boot_id``
(``/proc/sys/kernel/random/boot_id``: one per running kernel, shared by every container on it),
``pid_ns`` (device and inode of ``/proc/self/ns/pid``) and ``proc_start`` (the process's start time
in clock ticks since boot, field 22 of ``/proc/PID/stat``). A pid alone is ambiguous across pid
namespaces that share a hostname (containers with host networking, Kubernetes ``hostNetwork``) and
after pid reuse; the four together name one process. Outside Linux they are None and nothing is
judged from them. Must not import ray or click.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


# Read once: the kernel's boot id does not change while this process lives.
BOOT_ID = _read_text("/proc/sys/kernel/random/boot_id")


def _pid_ns() -> str | None:
    try:
        st = os.stat("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


def _start_ticks(pid: int) -> str | None:
    """Field 22 (starttime) of ``/proc/PID/stat``, or None when no such process is visible."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[-1].split()   # the command name may hold spaces or ')'
    return fields[19] if len(fields) > 19 else None


def identity() -> dict:
    """This process, as a lock holder records it."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "boot_id": BOOT_ID, "pid_ns": _pid_ns(),
            "proc_start": _start_ticks(pid)}


def same_kernel(holder: dict) -> bool:
    """True when ``holder`` ran on the kernel this process runs on (any pid namespace)."""
    return BOOT_ID is not None and holder.get("boot_id") == BOOT_ID


def process_alive(holder: dict) -> bool | None:
    """Whether the holder's process still runs: None when this process cannot tell.

    It can tell only for a holder on this kernel and in this pid namespace: then the pid names
    the holder's process if, and only if, a process with that pid started at the same tick.
    """
    pid, start = holder.get("pid"), holder.get("proc_start")
    if (not same_kernel(holder) or holder.get("pid_ns") is None
            or holder.get("pid_ns") != _pid_ns() or not isinstance(pid, int) or pid <= 0
            or start is None):
        return None
    return _start_ticks(pid) == start
