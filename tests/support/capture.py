"""Helpers for the capture tests (no tests here): targets, the oracle check, /proc probes."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np

from tools.targets import build

WORDS = 512


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 (the same function as tools/targets/oracle.c)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def oracle_pages(values: np.ndarray, mixed: bool = False) -> np.ndarray:
    """The content oracle.c writes for write numbers ``values``: (n, 512) uint64."""
    v = values.astype(np.uint64)
    with np.errstate(over="ignore"):
        out = splitmix64(v[:, None] * np.uint64(WORDS) + np.arange(WORDS, dtype=np.uint64))
    if mixed:
        odd = (v & np.uint64(1)).astype(bool)
        out[odd, 1:] = v[odd, None]
    out[:, 0] = v
    return out


def check_oracle(image: np.ndarray, mixed: bool = False, skip: np.ndarray | None = None) -> int:
    """Assert ``image`` ((npages, 512) uint64) shows exactly one instant of oracle.c's memory;
    return that instant (M). Pages where ``skip`` is True are not checked."""
    npages = image.shape[0]
    check = np.ones(npages, bool) if skip is None else ~skip
    v = image[:, 0]
    m = int(v[check].max())
    p = np.arange(npages, dtype=np.uint64)
    expected_v = np.uint64(m) - ((np.uint64(m) - p) % np.uint64(npages))
    expected = oracle_pages(expected_v, mixed)
    bad = np.flatnonzero(((image != expected).any(axis=1)) & check)
    # The page written at the instant may hold a prefix of the next write. Writes to
    # skipped pages (reported lost) right after M are invisible: the instant may be later.
    last = m
    while not check[(last + 1) % npages] and last - m < npages:
        last += 1
    inflight = (last + 1) % npages
    if len(bad) and bad[0] == inflight and check[inflight]:
        new = oracle_pages(np.array([last + 1]), mixed)[0]
        row = image[inflight]
        is_new = row[1:] == new[1:]
        is_old = row[1:] == expected[inflight][1:]
        k = int(np.argmin(is_new)) if not is_new.all() else WORDS - 1
        assert row[0] == expected[inflight][0], "in-flight page has a wrong word 0"
        assert is_new[:k].all() and is_old[k:].all(), "in-flight page is not a prefix write"
        bad = bad[1:]
    assert len(bad) == 0, (
        f"image is not one instant (M={m}): {len(bad)} bad pages, first {bad[:8].tolist()}, "
        f"word0 {v[bad[:8]].tolist()} expected {expected_v[bad[:8]].tolist()}"
    )
    return m


class Target:
    """A running target program (killed on close)."""

    def __init__(self, name: str, *args: str, user: str | None = None) -> None:
        exe = build(name)
        cmd = [str(exe), *args]
        if user:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *cmd]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.ready = self.proc.stdout.readline().strip()
        assert self.ready.startswith("ready"), f"target {name} failed to start: {self.ready!r}"
        self.fields = dict(re.findall(r"(\w+)=(\S+)", self.ready))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def addr(self) -> int:
        return int(self.fields["addr"], 16)

    def send(self, cmd: str) -> str:
        """Write a command line; return the target's reply line."""
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def proc_status(pid: int) -> dict[str, str]:
    """Fields of /proc/PID/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        out[key] = val.strip()
    return out


def assert_released(pid: int) -> None:
    """The target is not traced, holds no userfaultfd, and no thread is stopped."""
    st = proc_status(pid)
    assert st["TracerPid"] == "0", f"still traced by {st['TracerPid']}"
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        assert "userfaultfd" not in link, f"target still holds a userfaultfd (fd {fd})"
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):  # the thread exited meanwhile
            continue
        state = stat.rsplit(")", 1)[1].split()[0]
        assert state not in ("t", "T"), f"thread {tid} is stopped ({state})"


def region_image(reader, addr: int, npages: int) -> np.ndarray:
    """(npages, 512) uint64 view of the snapshot's bytes at ``addr``."""
    reg = next(r for r in reader.regions if r.start <= addr < r.start + r.length)
    data = reader.read(reg.index, addr - reg.start, npages * 4096)
    return np.frombuffer(data, dtype=np.uint64).reshape(npages, WORDS)


def rss_kib(pid: int, addr: int) -> int:
    """Rss (KiB) of the VMA containing ``addr`` (from smaps)."""
    cur = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            cur = int(m.group(1), 16) <= addr < int(m.group(2), 16)
        elif cur and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError(f"no VMA at {addr:#x}")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.002) -> bool:
    """Poll ``predicate`` until true (tests only: observing another process)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False


def wait_scanning(snapfs_pid: int, target_pid: int, timeout: float = 30.0) -> bool:
    """Wait until a ``snapfs snapshot`` is past its stops: it holds the target's userfaultfd
    and the target is untraced (the stops last milliseconds: polling TracerPid misses them)."""

    def scanning() -> bool:
        try:
            fds = [os.readlink(f"/proc/{snapfs_pid}/fd/{n}") for n in os.listdir(f"/proc/{snapfs_pid}/fd")]
        except OSError:
            return False
        return "anon_inode:[userfaultfd]" in fds and proc_status(target_pid)["TracerPid"] == "0"

    return wait_for(scanning, timeout)
