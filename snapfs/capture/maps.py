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

import os
import re
from dataclasses import dataclass, field

from snapfs.capture.kernel import PAGE_SIZE
from snapfs.errors import TargetError

_LINE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+)\s*(.*)$"
)
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
    def deleted(self) -> bool:
        return self.path.endswith(" (deleted)")

    @property
    def is_file(self) -> bool:
        return self.inode != 0 and self.path.startswith("/")


def parse_maps(text: str) -> list[Vma]:
    """Parse the text of ``/proc/PID/maps``."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        out.append(
            Vma(
                start=int(m.group(1), 16),
                end=int(m.group(2), 16),
                perms=m.group(3),
                offset=int(m.group(4), 16),
                dev=(int(m.group(5), 16), int(m.group(6), 16)),
                inode=int(m.group(7)),
                path=m.group(8),
            )
        )
    return out


def read_maps(pid: int) -> list[Vma]:
    """Parse ``/proc/PID/maps``; :class:`TargetError` if the process is gone."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return parse_maps(f.read())
    except (FileNotFoundError, ProcessLookupError):
        raise TargetError(f"process {pid} exited") from None
    except PermissionError:
        from snapfs.capture.ptrace import permission_error

        raise permission_error(pid) from None


def huge_page_sizes(pid: int) -> dict[int, int]:
    """``{vma start: KernelPageSize}`` for VMAs whose page size is not the base page (hugetlb).

    Reads ``smaps``, which walks page tables: call it before the freeze, not during.
    """
    sizes: dict[int, int] = {}
    current = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    current = int(line.split("-", 1)[0], 16)
                elif line.startswith("KernelPageSize:"):
                    kib = int(line.split()[1])
                    if kib * 1024 != PAGE_SIZE and current is not None:
                        sizes[current] = kib * 1024
    except (FileNotFoundError, ProcessLookupError):
        raise TargetError(f"process {pid} exited") from None
    except PermissionError:
        from snapfs.capture.ptrace import permission_error

        raise permission_error(pid) from None
    return sizes


def _basename(path: str) -> str:
    path = path.removesuffix(" (deleted)")
    base = os.path.basename(path) or path
    base = base.replace("/", "_").replace("\0", "_")
    return base or "file"


def file_region_name(v: Vma) -> str:
    """The (unique) base name of a file-backed VMA's region: ``libc.so.6-7f1c2a400000``."""
    return f"{_basename(v.path)}-{v.start:x}"


def classify(vmas: list[Vma], *, include_readonly: bool, huge_sizes: dict[int, int]) -> list[Vma]:
    """Set ``mode``, ``kind``, ``name`` and ``page_size`` on each VMA; return the captured ones
    (``mode != "skip"``) in address order, with unique names."""
    taken: set[str] = set()
    out: list[Vma] = []
    for v in vmas:
        v.page_size = huge_sizes.get(v.start, PAGE_SIZE)
        path = v.path
        if path in _SPECIAL_SKIP or not v.readable:
            v.mode = "skip"
            continue
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
                    continue
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
                continue
        else:
            # Private anonymous memory, including [anon:name] and thread stacks.
            v.mode, v.kind, base = "wp", "anon", f"anon-{v.start:x}"
        name = base
        n = 2
        while name in taken:
            name = f"{base}.{n}"
            n += 1
        taken.add(name)
        v.name = name
        out.append(v)
    return out
