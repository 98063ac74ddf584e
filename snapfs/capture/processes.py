"""Which processes a tree snapshot holds: a process and its descendants (``--tree PID``), or
every process of a cgroup and its sub-cgroups (``--cgroup PATH``).

Listed from ``/proc`` (parent links from ``/proc/PID/stat``) and from ``cgroup.procs``; snapfs
itself, kernel threads and zombies are never members. Processes that share one mm
(``vfork``/``CLONE_VM`` children, which run on their parent's memory until they exec) are
grouped with the first of them: :func:`memory_owners` says which, using ``kcmp(KCMP_VM)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from snapfs.capture import kernel as k
from snapfs.capture.handle import PF_KTHREAD
from snapfs.errors import TargetError, UsageError

KCMP_VM = 1


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/PID/stat`` a tree needs."""

    pid: int
    ppid: int
    comm: str
    state: str
    flags: int

    @property
    def capturable(self) -> bool:
        """A live user process (not a kernel thread, not a zombie)."""
        return not self.flags & PF_KTHREAD and self.state not in ("Z", "X")


def proc_stat(pid: int) -> ProcStat | None:
    """``/proc/PID/stat`` parsed, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    head, tail = raw[: raw.rindex(")")], raw[raw.rindex(")") + 2 :].split()
    return ProcStat(pid, int(tail[1]), head[head.index("(") + 1 :], tail[0], int(tail[6]))


def _all_stats() -> dict[int, ProcStat]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st is not None:
                out[st.pid] = st
    return out


def tree_pids(root: int) -> list[int]:
    """``root`` and every live descendant of it, parents before children (snapfs excluded)."""
    stats = _all_stats()
    if root not in stats or not stats[root].capturable:
        raise TargetError(f"no process with PID {root}: check the PID (ps -p {root})")
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    me = os.getpid()
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        if pid == me:
            continue
        if stats[pid].capturable:
            out.append(pid)
        todo += sorted(children.get(pid, []))
    return out


CGROUP_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd")


def cgroup_dir(path: str) -> Path:
    """The cgroup directory named by ``path``: absolute, or relative to the cgroup root as
    ``systemctl status`` prints it (on a hybrid hierarchy, under ``unified/`` or ``systemd/``)."""
    p = Path(path)
    candidates = [p] if str(p).startswith("/sys/fs/cgroup") else [Path(r) / str(path).lstrip("/") for r in CGROUP_ROOTS]
    for c in candidates:
        if (c / "cgroup.procs").is_file():
            return c
    raise UsageError(f"{path} is not a cgroup (no cgroup.procs in {candidates[0]}): give a directory "
                     "under /sys/fs/cgroup, e.g. system.slice/postgresql.service")


def cgroup_pids(path: str) -> list[int]:
    """Every live user process in the cgroup and its sub-cgroups (snapfs excluded)."""
    root = cgroup_dir(path)
    me = os.getpid()
    out: list[int] = []
    for d, _, _ in os.walk(root):
        try:
            text = Path(d, "cgroup.procs").read_text()
        except OSError:
            continue  # removed while walking
        for line in text.split():
            pid = int(line)
            st = proc_stat(pid)
            if pid != me and st is not None and st.capturable and pid not in out:
                out.append(pid)
    if not out:
        raise TargetError(f"cgroup {root} has no process to snapshot")
    return sorted(out)


def same_memory(a: int, b: int) -> bool:
    """Whether processes ``a`` and ``b`` run on one mm (kcmp KCMP_VM)."""
    try:
        return k.syscall("kcmp", a, b, KCMP_VM, 0, 0) == 0
    except OSError:
        return False


def memory_owners(pids: list[int]) -> dict[int, int]:
    """``{pid: owner}`` for pids that share their mm with an earlier pid of the list (its
    owner); processes with an mm of their own are absent. Only parent/child pairs are
    compared: a CLONE_VM process is its creator's child."""
    stats = {pid: proc_stat(pid) for pid in pids}
    owners: dict[int, int] = {}
    for pid in pids:
        st = stats[pid]
        if st is not None and st.ppid in stats and same_memory(pid, st.ppid):
            owners[pid] = owners.get(st.ppid, st.ppid)
    return owners
