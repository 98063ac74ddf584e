"""Bring a process's mappings back to a snapshot's layout (``snapfs incoming --pid``).

:func:`plan` compares the mappings recorded at the snapshot instant with the target's now,
address range by address range (splits and merges of equal neighbours do not count), and
returns the syscalls that re-create the snapshot's layout — ``munmap`` what appeared since,
``brk`` to move the heap's end, ``mprotect`` where only permissions changed, ``mmap``
(anonymous, or the same file at the same offset) what disappeared — or the reasons it
cannot. :func:`apply` runs them in the stopped target through the syscall injector.

What cannot be re-created is refused, never approximated: shared memory that is gone
(memfd, SysV, shared anonymous), a file that changed or vanished, the vdso/vvar moving, a
stack smaller than at the snapshot. A stack larger than at the snapshot is left as it is
(the extra part lies below every restored stack pointer: dead stack).
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field

from snapfs.capture.maps import Vma

PROT = {"r": 1, "w": 2, "x": 4}
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
O_RDONLY, O_RDWR, O_CLOEXEC = os.O_RDONLY, os.O_RDWR, os.O_CLOEXEC
_SPECIAL = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")
# Memory that lives only while something maps or holds it: once gone, it cannot be mapped again.
_SHARED_OBJECTS = ("/memfd:", "/SYSV", "/dev/zero", "[anon_shmem", "/anon_hugepage")


@dataclass(frozen=True)
class Mapping:
    """One mapping: ``[start, end)`` with perms and backing (dev "maj:min" hex, inode, path)."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str

    @classmethod
    def from_vma(cls, v: Vma) -> "Mapping":
        return cls(v.start, v.end, v.perms, v.offset, f"{v.dev[0]:x}:{v.dev[1]:x}", v.inode, v.path)

    @classmethod
    def from_record(cls, m: list) -> "Mapping":
        return cls(int(m[0]), int(m[1]), str(m[2]), int(m[3]), str(m[4]), int(m[5]), str(m[6]))

    @property
    def anonymous(self) -> bool:
        """Private memory of the process itself (heap, stacks, anonymous mmaps)."""
        return self.inode == 0 and self.perms[3] == "p" and (
            not self.path or self.path in ("[heap]", "[stack]") or self.path.startswith("[anon:"))

    def backing(self, at: int) -> tuple:
        """What the page at ``at`` is (equal tuples: interchangeable mappings)."""
        if self.path in _SPECIAL:
            return ("special", self.path, at - self.start)
        if self.anonymous:
            return ("anon", self.perms)
        return ("file", self.perms, self.dev, self.inode, self.offset + (at - self.start))


@dataclass
class Op:
    """One syscall of a layout restore."""

    name: str  # munmap, brk, mprotect, mmap
    start: int
    length: int = 0
    perms: str = ""
    path: str | None = None  # mmap of a file
    offset: int = 0
    shared: bool = False

    def describe(self) -> str:
        what = f"{self.name} {self.start:#x}-{self.start + self.length:#x}"
        if self.name == "brk":
            return f"brk to {self.start:#x}"
        if self.name in ("mmap", "mprotect"):
            what += f" {self.perms}"
        if self.path:
            what += f" {self.path}@{self.offset:#x}"
        return what


@dataclass
class Plan:
    """The layout restore: ``ops`` to run, or ``problems`` (each one sentence)."""

    ops: list[Op] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _intervals(a: list[Mapping], b: list[Mapping]):
    """Elementary [lo, hi) ranges with the mapping of each side covering them (or None)."""
    bounds = sorted({x for m in a + b for x in (m.start, m.end)})
    a_starts = [m.start for m in a]
    b_starts = [m.start for m in b]

    def cover(ms: list[Mapping], starts: list[int], at: int) -> Mapping | None:
        i = bisect.bisect_right(starts, at) - 1
        return ms[i] if i >= 0 and ms[i].end > at else None

    for lo, hi in zip(bounds, bounds[1:]):
        yield lo, hi, cover(a, a_starts, lo), cover(b, b_starts, lo)


def _same_file(m: Mapping) -> str | None:
    """Why the file of ``m`` cannot be mapped again (None: it can, same dev and inode)."""
    path = m.path.removesuffix(" (deleted)")
    if m.path.endswith(" (deleted)") or not path.startswith("/"):
        return f"{m.path} is gone"
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path} cannot be opened ({exc.strerror})"
    if f"{os.major(st.st_dev):x}:{os.minor(st.st_dev):x}" != m.dev or st.st_ino != m.inode:
        return f"{path} is another file now (replaced since the snapshot)"
    return None


def plan(snapshot: list[Mapping], current: list[Mapping]) -> Plan:
    """The ops that turn ``current`` into ``snapshot``'s layout, or why they cannot."""
    out = Plan()
    s_heap = next((m for m in snapshot if m.path == "[heap]"), None)
    c_heap = next((m for m in current if m.path == "[heap]"), None)
    heap_lo = heap_hi = None
    if s_heap and c_heap and s_heap.start == c_heap.start and s_heap.end != c_heap.end:
        out.ops.append(Op("brk", s_heap.end))  # the kernel maps or unmaps the difference
        heap_lo, heap_hi = min(s_heap.end, c_heap.end), max(s_heap.end, c_heap.end)
    elif (s_heap is None) != (c_heap is None) or (s_heap and c_heap and s_heap.start != c_heap.start):
        out.problems.append("the heap moved or appeared/disappeared since the snapshot")
    pending: list[Op] = []
    for lo, hi, s, c in _intervals(snapshot, current):
        if heap_lo is not None and heap_lo <= lo and hi <= heap_hi:
            continue
        if s is None and c is None:
            continue
        if s is not None and c is not None and s.backing(lo) == c.backing(lo):
            continue
        if s is None:
            if c.path == "[stack]":
                continue  # the stack grew down since: dead stack below every restored sp
            if c.path in _SPECIAL:
                out.problems.append(f"{c.path} is at {lo:#x} now but was not at the snapshot")
                continue
            pending.append(Op("munmap", lo, hi - lo))
            continue
        if s.path in _SPECIAL or (c is not None and c.path in _SPECIAL):
            out.problems.append(f"{s.path or c.path} moved since the snapshot ({lo:#x})")
            continue
        if s.path == "[stack]" and c is None:
            out.problems.append(f"the stack is smaller than at the snapshot ({lo:#x}-{hi:#x} unmapped)")
            continue
        if c is not None and _only_perms_differ(s, c, lo):
            pending.append(Op("mprotect", lo, hi - lo, s.perms))
            continue
        if s.anonymous:
            pending.append(Op("mmap", lo, hi - lo, s.perms))
            continue
        if s.path.startswith(_SHARED_OBJECTS) or (s.perms[3] == "s" and s.inode == 0):
            out.problems.append(f"shared memory {s.path or 'anonymous'} at {lo:#x} is gone and "
                                "cannot be re-created")
            continue
        why = _same_file(s)
        if why:
            out.problems.append(f"the mapping of {s.path} at {lo:#x} cannot be re-created: {why}")
            continue
        pending.append(Op("mmap", lo, hi - lo, s.perms, s.path.removesuffix(" (deleted)"),
                          s.offset + (lo - s.start), shared=s.perms[3] == "s"))
    out.ops += _coalesce(pending)
    order = {"munmap": 0, "brk": 1, "mprotect": 2, "mmap": 3}
    out.ops.sort(key=lambda op: order[op.name])
    return out


def _only_perms_differ(s: Mapping, c: Mapping, at: int) -> bool:
    a, b = s.backing(at), c.backing(at)
    return a[0] == b[0] and a[2:] == b[2:] and a[1] != b[1]


def _coalesce(ops: list[Op]) -> list[Op]:
    """Merge ops that continue each other (same syscall, attributes and file offsets)."""
    out: list[Op] = []
    for op in ops:
        prev = out[-1] if out else None
        if (prev is not None and prev.name == op.name and prev.start + prev.length == op.start
                and (prev.perms, prev.path, prev.shared) == (op.perms, op.path, op.shared)
                and (op.path is None or prev.offset + prev.length == op.offset)):
            prev.length += op.length
        else:
            out.append(Op(op.name, op.start, op.length, op.perms, op.path, op.offset, op.shared))
    return out


def _prot(perms: str) -> int:
    return sum(PROT[c] for c in perms[:3] if c in PROT)


class LayoutError(Exception):
    """An injected layout syscall failed (the process stays parked)."""


def apply(ops: list[Op], inject, write_memory, pid: int) -> None:
    """Run ``ops`` in the stopped target: ``inject(name, *args) -> int`` (an Injector),
    ``write_memory(pid, addr, bytes)`` for the file names (written to ``inject``'s
    scratch area). Raises LayoutError naming the op that failed."""
    for op in ops:
        if op.name == "munmap":
            r = inject("munmap", op.start, op.length)
        elif op.name == "brk":
            r = inject("brk", op.start)
            r = 0 if r == op.start else -12  # brk returns the new end, the old one on failure
        elif op.name == "mprotect":
            r = inject("mprotect", op.start, op.length, _prot(op.perms))
        elif op.path is None:
            r = inject("mmap", op.start, op.length, _prot(op.perms),
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, (1 << 64) - 1, 0)
            r = 0 if r == op.start else r
        else:
            r = _map_file(op, inject, write_memory, pid)
        if r < 0:
            raise LayoutError(f"{op.describe()} failed in process {pid}: {os.strerror(-r)}")


def _map_file(op: Op, inject, write_memory, pid: int) -> int:
    raw = op.path.encode() + b"\0"
    scratch = inject.scratch_address(len(raw) + 16)
    write_memory(pid, scratch, raw)
    fd = inject("open", scratch, (O_RDWR if op.shared and "w" in op.perms else O_RDONLY) | O_CLOEXEC)
    if fd < 0:
        return fd
    try:
        r = inject("mmap", op.start, op.length, _prot(op.perms),
                   (MAP_SHARED if op.shared else MAP_PRIVATE) | MAP_FIXED, fd, op.offset)
        return 0 if r == op.start else r
    finally:
        inject("close", fd)
