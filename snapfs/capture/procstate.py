"""Kernel state of a process that a restore cannot rewind, as ``/proc`` shows it: the fd
table (number, type, target, flags of each fd; an epoll's registrations from fdinfo), the
signal dispositions, the working directory and the process's identity.

A snapshot records it for its instant and ``snapfs incoming --pid`` compares it with the
target's before writing anything (:func:`differences`).

**Why before and after, not inside the pause**: reading ``/proc/PID/fd`` and each fdinfo
costs 15-45 µs per fd here (readlink, open, read, close through Python; measured with 100,
1 000 and 10 000 fds: 3 ms, 45-120 ms, 450-900 ms on the shared 2-core VM), far more than a
whole pause for a server with thousands of connections. So the table is read just before the
freeze and again just after the release (:func:`bracket`): an fd whose entry is the same in
both reads held it at the instant (socket, pipe and anon inode numbers are never reused
while open, and a file reopened at the same number is the same file); an fd that changed in
between is recorded as *uncertain*, and a restore treats it as a difference.

Records are plain JSON-ready dicts (they travel in the snapshot's metadata blob and in the
migration stream's VMDESCRIPTION).
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from typing import Any

from snapfs.errors import TargetError

VERSION = 1
STATE_BLOB = "process.state"  # the store blob holding a snapshot's record (encode_record)
_TFD = re.compile(rb"tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+).*?ino:([0-9a-f]+)\s+sdev:([0-9a-f]+)")
_SIGNAMES = {n: name for name, n in ((s.name, s.value) for s in __import__("signal").Signals)
             if not name.startswith("SIG_")}


def fd_type(target: str) -> str:
    """``socket``, ``pipe``, ``file``, ``anon:<kind>`` (eventpoll, eventfd...) or ``other``."""
    if target.startswith("socket:"):
        return "socket"
    if target.startswith("pipe:"):
        return "pipe"
    if target.startswith("anon_inode:"):
        return "anon:" + target[len("anon_inode:"):].strip("[]")
    if target.startswith("/"):
        return "file"
    return "other"


def _read_fd(pid: int, fd: str) -> dict[str, Any] | None:
    """One fd's entry, or None if it was closed while reading."""
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            info = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None  # closed meanwhile, or the process is exiting
    entry: dict[str, Any] = {"target": target, "type": fd_type(target)}
    epoll = []
    for line in info.splitlines():
        key, _, value = line.partition(b":")
        if key == b"flags":
            entry["flags"] = int(value.strip(), 8)
        elif key == b"ino":
            entry["ino"] = int(value.strip())
        elif key == b"pos":
            entry["pos"] = int(value.strip())
        elif key == b"tfd":
            m = _TFD.match(line)
            if m:
                epoll.append([int(m[1]), int(m[2], 16), m[3].decode(), int(m[4], 16), int(m[5], 16)])
    if entry["type"] == "anon:eventpoll":
        entry["epoll"] = sorted(epoll)
    return entry


def read_fds(pid: int) -> dict[str, dict]:
    """The fd table of ``pid``: ``{"fd": entry}``."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        raise TargetError(f"process {pid} exited") from None
    except PermissionError:
        from snapfs.capture.ptrace import permission_error

        raise permission_error(pid) from None
    out = {}
    for name in names:
        entry = _read_fd(pid, name)
        if entry is not None:
            out[name] = entry
    return out


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def start_time(pid: int) -> int:
    """The process's start time (clock ticks since boot): with the boot id, its identity."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def read_state(pid: int) -> dict[str, Any]:
    """Everything this module records, read once (the target may be running)."""
    try:
        t0 = time.monotonic()
        status = _status(pid)
        state: dict[str, Any] = {
            "version": VERSION,
            "boot_id": boot_id(),
            "start_time": start_time(pid),
            "exe": _readlink(f"/proc/{pid}/exe"),
            "cwd": _readlink(f"/proc/{pid}/cwd"),
            "signals": {"ignored": int(status["SigIgn"], 16), "caught": int(status["SigCgt"], 16)},
            "fds": read_fds(pid),
        }
        state["read_ms"] = round((time.monotonic() - t0) * 1e3, 3)
        return state
    except (FileNotFoundError, ProcessLookupError, KeyError):
        raise TargetError(f"process {pid} exited") from None
    except PermissionError:
        if not os.path.exists(f"/proc/{pid}/exe") or _exiting(pid):
            raise TargetError(f"process {pid} exited") from None
        from snapfs.capture.ptrace import permission_error

        raise permission_error(pid) from None


def _exiting(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except OSError:
        return True


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def same_fd(a: dict | None, b: dict | None) -> bool:
    """Same open file with the same flags and registrations (the position may move)."""
    if a is None or b is None:
        return a is b
    return all(a.get(key) == b.get(key) for key in ("target", "type", "flags", "ino", "epoll"))


def bracket(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The state at an instant between two reads: what both agree on; fds that changed in
    between go to ``fds_uncertain`` ({"fd": {"before": entry|None, "after": entry|None}})."""
    out = dict(after)
    fds, uncertain = {}, {}
    for fd in sorted(set(before["fds"]) | set(after["fds"]), key=int):
        a, b = before["fds"].get(fd), after["fds"].get(fd)
        if same_fd(a, b):
            if b is not None:
                fds[fd] = b
        else:
            uncertain[fd] = {"before": a, "after": b}
    out["fds"] = fds
    out["fds_uncertain"] = uncertain
    if before.get("signals") != after.get("signals"):
        out["signals_uncertain"] = {"before": before.get("signals"), "after": after.get("signals")}
    if before.get("cwd") != after.get("cwd"):
        out["cwd_uncertain"] = {"before": before.get("cwd"), "after": after.get("cwd")}
    out["read_ms"] = {"before": before.get("read_ms"), "after": after.get("read_ms")}
    return out


def describe_fd(entry: dict | None) -> str:
    """Short text for an fd entry (its target), ``closed`` for None."""
    return "closed" if entry is None else entry["target"]


def _signal_names(mask: int) -> str:
    names = [_SIGNAMES.get(i + 1, f"signal {i + 1}") for i in range(64) if mask >> i & 1]
    return ",".join(names)


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the snapshot's record and the target's state now, one short
    sentence each (empty: nothing the restore cannot rewind has changed)."""
    out: list[str] = []
    if recorded.get("boot_id") != current.get("boot_id") or recorded.get("start_time") != current.get("start_time"):
        out.append("not the process the snapshot was taken of (a different start time or boot: "
                   "restarted, or the PID was reused)")
    if recorded.get("exe") != current.get("exe"):
        out.append(f"executable is {current.get('exe')} now, was {recorded.get('exe')}")
    if "cwd_uncertain" in recorded:
        out.append("working directory changed while the snapshot was taken")
    elif recorded.get("cwd") != current.get("cwd"):
        out.append(f"working directory is {current.get('cwd')} now, was {recorded.get('cwd')}")
    sig_now, sig_then = current.get("signals") or {}, recorded.get("signals") or {}
    if "signals_uncertain" in recorded:
        out.append("signal dispositions changed while the snapshot was taken")
    else:
        for key, what in (("caught", "handled"), ("ignored", "ignored")):
            changed = int(sig_now.get(key, 0)) ^ int(sig_then.get(key, 0))
            if changed:
                out.append(f"signals {what} differ: {_signal_names(changed)}")
    out += _fd_differences(recorded, current["fds"])
    return out


def _fd_differences(recorded: dict[str, Any], now: dict[str, dict]) -> list[str]:
    out = []
    then = recorded.get("fds", {})
    uncertain = recorded.get("fds_uncertain", {})
    for fd in sorted(set(then) | set(now) | set(uncertain), key=int):
        cur = now.get(fd)
        if fd in uncertain:
            u = uncertain[fd]
            out.append(f"fd {fd} changed while the snapshot was taken ({describe_fd(u['before'])} -> "
                       f"{describe_fd(u['after'])}): its state at the instant is unknown (now "
                       f"{describe_fd(cur)})")
            continue
        old = then.get(fd)
        if old is None:
            out.append(f"fd {fd} ({describe_fd(cur)}) was opened since the snapshot")
        elif cur is None:
            out.append(f"fd {fd} ({describe_fd(old)}) was open at the snapshot and is closed now")
        elif (old["target"], old.get("ino")) != (cur["target"], cur.get("ino")):
            out.append(f"fd {fd} is {describe_fd(cur)} now, was {describe_fd(old)}")
        elif old.get("flags") != cur.get("flags"):
            out.append(f"fd {fd} ({describe_fd(cur)}) has flags 0{cur.get('flags', 0):o} now, "
                       f"was 0{old.get('flags', 0):o}")
        elif old.get("epoll") != cur.get("epoll"):
            out.append(f"epoll fd {fd}: {_epoll_difference(old.get('epoll') or [], cur.get('epoll') or [])}")
    return out


def _epoll_difference(then: list, now: list) -> str:
    a = {e[0]: e for e in then}
    b = {e[0]: e for e in now}
    parts = []
    for tfd in sorted(set(a) | set(b)):
        x, y = a.get(tfd), b.get(tfd)
        if x == y:
            continue
        if y is None:
            parts.append(f"fd {tfd} registered at the snapshot (events 0x{x[1]:x}), not now")
        elif x is None:
            parts.append(f"fd {tfd} registered since (events 0x{y[1]:x})")
        else:
            parts.append(f"fd {tfd} registration changed (events 0x{x[1]:x} -> 0x{y[1]:x}, data {x[2]} -> {y[2]})")
    return "; ".join(parts[:4]) + (f"; and {len(parts) - 4} more" if len(parts) > 4 else "")


def encode_record(kernel: dict[str, Any], threads: dict[str, dict], masks: dict[str, int],
                  maps: list) -> bytes:
    """The snapshot's record as stored (blob :data:`STATE_BLOB`): the kernel state of the
    instant (:func:`bracket`), each thread's XSAVE area (from the freeze's register sets,
    ``threads``: :meth:`StoppedProcess.record_threads`) and signal mask
    (:func:`snapfs.capture.threadstate.record_masks`), and every mapping of the instant
    (guard areas and unreadable ones too: the restore re-creates the layout from them)."""
    from snapfs.capture.kernel import NT_X86_XSTATE

    def xstate(t: dict) -> str | None:
        raw = (t.get("regsets") or {}).get(NT_X86_XSTATE)
        return base64.b64encode(raw).decode() if raw else None

    doc = {
        "version": VERSION,
        "kernel": kernel,
        "threads": {tid: {"xstate": xstate(t), "sigmask": masks.get(tid)} for tid, t in threads.items()},
        "maps": [[v.start, v.end, v.perms, v.offset, f"{v.dev[0]:x}:{v.dev[1]:x}", v.inode, v.path]
                 for v in maps],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_record` (XSAVE areas stay base64 text)."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ValueError(f"unknown process record version {doc.get('version') if isinstance(doc, dict) else doc!r}")
    return doc
