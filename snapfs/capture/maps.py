"""``/proc/PID/maps`` parsing and classification into capturable regions.

Each VMA becomes a :class:`Vma`; :func:`classify` decides how it is captured:

- ``wp``: write-protected with userfaultfd and copied in the background (private anonymous,
  heap, stacks, shmem/memfd, hugetlb);
- ``copy``: copied while the target is stopped (private writable file-backed VMAs such as a
  library's ``.data``, which userfaultfd cannot protect, and the tiny ``[vdso]``);
- ``readonly``: read-only file-backed mappings, only with ``include_readonly`` (their bytes
  cannot change without an ``mprotect``);
- ``skip``: not captured (``[vvar]``, ``[vsyscall]``, inaccessible guard areas).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from snapfs.capture.kernel import PAGE_SIZE, PROCMAP_QUERY, check, ffi, lib
from snapfs.errors import TargetError

_SPECIAL_SKIP = ("[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")
_SHMEM_MARKERS = ("/dev/zero", "/SYSV", "/memfd:", "/dev/shm/", "/anon_hugepage", "[anon_shmem")


@dataclass
class Vma:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str
    offset: int
    dev: tuple[int, int]
    inode: int
    path: str
    page_size: int = PAGE_SIZE
    # Filled by classify():
    mode: str = "skip"
    kind: str = "anon"
    name: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def is_file(self) -> bool:
        return self.inode != 0 and self.path.startswith("/")


def parse_line(line: str) -> Vma | None:
    """One line of ``/proc/PID/maps`` (None if it is not one). Split, not a regex: a target
    with 65 000 mappings has 65 000 lines."""
    f = line.split(None, 5)
    if len(f) < 5:
        return None
    lo, _, hi = f[0].partition("-")
    major, _, minor = f[3].partition(":")
    try:
        return Vma(int(lo, 16), int(hi, 16), f[1], int(f[2], 16), (int(major, 16), int(minor, 16)),
                   int(f[4]), f[5].strip() if len(f) > 5 else "")
    except ValueError:
        return None


def parse_maps(text: str) -> list[Vma]:
    """Parse the text of ``/proc/PID/maps``."""
    return [v for v in map(parse_line, text.splitlines()) if v is not None]


@contextlib.contextmanager
def _proc_errors(pid: int) -> Iterator[None]:
    """Reading a /proc/PID file: a process gone becomes :class:`TargetError`, a refusal the
    permission error that says what to do."""
    try:
        yield
    except (FileNotFoundError, ProcessLookupError):
        raise TargetError(f"process {pid} exited") from None
    except PermissionError:
        from snapfs.capture.ptrace import permission_error

        raise permission_error(pid) from None


def read_maps_text(pid: int, same: tuple[str, bytes] | None = None) -> str:
    """The text of ``/proc/PID/maps`` (one read: the kernel's cost is ~0.5 us per VMA);
    :class:`TargetError` if the process is gone. ``same``: a text read before and its
    encoding; when the maps have not changed since, that very text is returned (comparing
    bytes, not decoding them: ~3 ms of a pause for 65 000 mappings), so that ``is``/``==``
    against it is immediate."""
    with _proc_errors(pid), open(f"/proc/{pid}/maps", "rb") as f:
        data = f.read()
    if same is not None and data == same[1]:
        return same[0]
    return data.decode()


def read_maps(pid: int) -> list[Vma]:
    """Parse ``/proc/PID/maps``; :class:`TargetError` if the process is gone."""
    return parse_maps(read_maps_text(pid))


def huge_page_sizes(pid: int, vmas: list[Vma] | None = None) -> dict[int, int]:
    """``{vma start: KernelPageSize}`` for VMAs whose page size is not the base page (hugetlb);
    ``vmas``: the process's maps, if just read.

    Only a VMA that maps a file can be hugetlb (MAP_HUGETLB, SHM_HUGETLB and MFD_HUGETLB map a
    file on an internal hugetlbfs), so only those are asked, one PROCMAP_QUERY each (6.11+).
    Else ``smaps`` is read, which walks every page table (1 GiB in 65 000 mappings: ~0.45 s;
    a multi-GiB heap more): before the freeze, never during it.
    """
    if vmas is None:
        vmas = read_maps(pid)
    try:
        return _queried_page_sizes(pid, [v.start for v in vmas if v.inode != 0])
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise TargetError(f"process {pid} exited") from None
        if exc.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    return _smaps_page_sizes(pid)


def _queried_page_sizes(pid: int, starts: list[int]) -> dict[int, int]:
    if not starts:
        return {}
    addrs = np.array(starts, np.uint64)
    sizes = np.zeros(len(addrs), np.uint64)
    with _proc_errors(pid):
        fd = os.open(f"/proc/{pid}/maps", os.O_RDONLY | os.O_CLOEXEC)
    try:
        check(lib.snapfs_vma_page_sizes(fd, PROCMAP_QUERY, ffi.from_buffer("uint64_t[]", addrs), len(addrs),
                                        ffi.from_buffer("uint64_t[]", sizes)), "PROCMAP_QUERY")
    finally:
        os.close(fd)
    return {a: s for a, s in zip(starts, sizes.tolist()) if s not in (0, PAGE_SIZE)}


def _smaps_page_sizes(pid: int) -> dict[int, int]:
    sizes: dict[int, int] = {}
    current = None
    with _proc_errors(pid), open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                current = int(line.split("-", 1)[0], 16)
            elif line.startswith("KernelPageSize:"):
                kib = int(line.split()[1])
                if kib * 1024 != PAGE_SIZE and current is not None:
                    sizes[current] = kib * 1024
    return sizes


def _basename(path: str) -> str:
    path = path.removesuffix(" (deleted)")
    base = os.path.basename(path) or path
    base = base.replace("/", "_").replace("\0", "_")
    return base or "file"


def file_region_name(v: Vma) -> str:
    """The (unique) base name of a file-backed VMA's region: ``libc.so.6-7f1c2a400000``."""
    return f"{_basename(v.path)}-{v.start:x}"


def _classify_one(v: Vma, include_readonly: bool, huge_sizes: dict[int, int]) -> str | None:
    """Set ``mode``, ``kind`` and ``page_size`` on one VMA; returns its base name, or None
    if it is not captured."""
    v.page_size = huge_sizes.get(v.start, PAGE_SIZE)
    path = v.path
    if path in _SPECIAL_SKIP or not v.readable:
        v.mode = "skip"
        return None
    if path == "[vdso]":
        v.mode, v.kind, base = "copy", "vdso", "vdso"
    elif path == "[heap]":
        v.mode, v.kind, base = "wp", "heap", "heap"
    elif path == "[stack]":
        v.mode, v.kind, base = "wp", "stack", "stack"
    elif v.page_size != PAGE_SIZE or path.startswith("/anon_hugepage"):
        v.mode, v.kind, base = "wp", "hugetlb", f"hugetlb-{v.start:x}"
    elif v.shared and (v.inode != 0 or path):
        # shmem/memfd/SysV/tmpfs files can be write-protected; other shared file
        # mappings cannot (registration fails and the freeze falls back to copying).
        is_shmem = any(path.startswith(m) for m in _SHMEM_MARKERS)
        v.kind = "shmem" if is_shmem else "file"
        if not v.writable and not is_shmem:
            if not include_readonly:
                v.mode = "skip"
                return None
            v.mode = "readonly"
        else:
            v.mode = "wp"
        base = f"{_basename(path) if path else 'shmem'}-{v.start:x}"
    elif v.is_file or (path.startswith("/") and v.inode != 0):
        v.kind = "file"
        base = file_region_name(v)
        if v.writable:
            v.mode = "copy"
        elif include_readonly:
            v.mode = "readonly"
        else:
            v.mode = "skip"
            return None
    else:
        # Private anonymous memory, including [anon:name] and thread stacks.
        v.mode, v.kind, base = "wp", "anon", f"anon-{v.start:x}"
    return base


def _unique(v: Vma, base: str, taken: set[str]) -> None:
    name = base
    n = 2
    while name in taken:
        name = f"{base}.{n}"
        n += 1
    taken.add(name)
    v.name = name


def classify(vmas: list[Vma], *, include_readonly: bool, huge_sizes: dict[int, int]) -> list[Vma]:
    """Set ``mode``, ``kind``, ``name`` and ``page_size`` on each VMA; return the captured ones
    (``mode != "skip"``) in address order, with unique names."""
    taken: set[str] = set()
    out: list[Vma] = []
    for v in vmas:
        base = _classify_one(v, include_readonly, huge_sizes)
        if base is not None:
            _unique(v, base, taken)
            out.append(v)
    return out


class ClassifiedMaps:
    """The captured VMAs of one reading of ``/proc/PID/maps``, keyed by line, so that a later
    reading (the freeze's) costs a string comparison when nothing changed and one dict look-up
    per line otherwise: a target with 65 000 mappings paid ~2 s inside the pause to parse and
    classify them again. :meth:`update` keeps the Vma objects of unchanged lines."""

    def __init__(self, text: str, *, include_readonly: bool, huge_sizes: dict[int, int]) -> None:
        self.include_readonly = include_readonly
        self.huge_sizes = huge_sizes
        self.text = text
        self._by_line: dict[str, Vma | None] = {}
        self.regions = self._build(text)

    def _build(self, text: str) -> list[Vma]:
        old, self._by_line = self._by_line, {}
        out: list[Vma] = []
        layout: list[Vma] = []
        fresh: list[tuple[Vma, str]] = []
        for line in text.splitlines():
            v = old.get(line)
            if v is None:
                v = parse_line(line)
                if v is None:
                    continue
                base = _classify_one(v, self.include_readonly, self.huge_sizes)
                if base is not None:
                    fresh.append((v, base))
            self._by_line[line] = v
            layout.append(v)
            if v.mode != "skip":
                out.append(v)
        if fresh:
            taken = {v.name for v in out if v.name}
            for v, base in fresh:
                _unique(v, base, taken)
        self.layout = layout
        self._runs = None
        # For mapped_bytes (built here, not in the pause, which reuses an unchanged reading).
        lay_starts = np.fromiter((v.start for v in layout), np.uint64, len(layout))
        sizes = np.fromiter((v.end for v in layout), np.uint64, len(layout)) - lay_starts
        self._mapped = (lay_starts, np.r_[np.uint64(0), np.cumsum(sizes, dtype=np.uint64)])
        # Bounds of the captured VMAs as arrays, for vectorised look-ups in the pause.
        self.starts = np.fromiter((v.start for v in out), np.uint64, len(out))
        self.ends = np.fromiter((v.end for v in out), np.uint64, len(out))
        self.page_sizes = np.fromiter((v.page_size for v in out), np.uint64, len(out))
        self.shmem = np.fromiter((v.kind == "shmem" for v in out), bool, len(out))
        return out

    def update(self, text: str) -> list[Vma]:
        """The captured VMAs of a new reading (the same list if the text is unchanged)."""
        if text != self.text:
            self.text = text
            self.regions = self._build(text)
        return self.regions

    def mapped_bytes(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Per pair, bytes of the VMAs (any, captured or not) that start in [lo, hi): what a
        page table walk from ``lo`` to ``hi`` may find (unmapped gaps cost it nothing)."""
        starts, before = self._mapped
        i = np.searchsorted(starts, np.asarray(lo, np.uint64))
        j = np.searchsorted(starts, np.asarray(hi, np.uint64))
        return before[np.maximum(i, j)] - before[i]

    def wp_runs(self) -> list[tuple[int, int, int, int]]:
        """Runs of write-protect-mode VMAs with no other VMA between them, as (start, end,
        first, last + 1) with indices into :attr:`regions`: one ``UFFDIO_REGISTER``,
        ``UFFDIO_WRITEPROTECT`` or ``PAGEMAP_SCAN`` can cover a run (gaps without a VMA are
        allowed; one incompatible VMA in the range makes a register fail)."""
        if self._runs is None:
            runs = []
            index = {id(v): i for i, v in enumerate(self.regions)}
            cur: list[int] = []
            for v in self.layout:
                if v.mode == "wp":
                    cur.append(index[id(v)])
                    continue
                if cur:
                    runs.append(cur)
                    cur = []
            if cur:
                runs.append(cur)
            self._runs = [(self.regions[r[0]].start, self.regions[r[-1]].end, r[0], r[-1] + 1) for r in runs]
        return self._runs
