"""What is recorded about the target before the freeze: identity, and shared memory that
other processes map too (their writes cannot be write-protected)."""

from __future__ import annotations

import os

from snapfs.capture.maps import Vma


def _read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def process_meta(pid: int, comm: str) -> dict:
    """pid, comm, exe, cmdline of the target for the snapshot's metadata."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = None
    cmd = _read_text(f"/proc/{pid}/cmdline")
    cmdline = [a for a in cmd.split("\0")[:-1]] if cmd else None
    return {"pid": pid, "comm": comm, "exe": exe, "cmdline": cmdline, "kind": "process"}


def shared_with_others(pid: int, vmas: list[Vma]) -> set[tuple[tuple[int, int], int]]:
    """(dev, inode) of the target's shared writable mappings that another process maps too."""
    keys = {(v.dev, v.inode) for v in vmas if v.shared and v.writable and v.inode}
    if not keys:
        return set()
    found: set = set()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (pid, me):
            continue
        text = _read_text(f"/proc/{entry}/maps")
        if not text:
            continue
        for line in text.splitlines():
            parts = line.split(None, 5)
            if len(parts) < 5 or parts[1][3] != "s":
                continue
            major, minor = parts[3].split(":")
            key = ((int(major, 16), int(minor, 16)), int(parts[4]))
            if key in keys:
                found.add(key)
    return found
