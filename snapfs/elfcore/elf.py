"""ELF64 little-endian headers and notes, as a Linux core file uses them (``<elf.h>``)."""

from __future__ import annotations

import struct

EHDR_SIZE = 64
PHDR_SIZE = 56
SHDR_SIZE = 64

ET_CORE = 4
EV_CURRENT = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ELFOSABI_NONE = 0

PT_LOAD = 1
PT_NOTE = 4
PF_X, PF_W, PF_R = 1, 2, 4
PN_XNUM = 0xFFFF  # e_phnum when the count does not fit: the real one is in section 0's sh_info

# Note types (include/uapi/linux/elf.h).
NT_PRSTATUS = 1
NT_PRFPREG = 2
NT_PRPSINFO = 3
NT_AUXV = 6
NT_SIGINFO = 0x53494749
NT_FILE = 0x46494C45

CORE_PAGE = 4096  # ELF_EXEC_PAGESIZE: alignment of the first PT_LOAD's data
NOTE_ALIGN = 4  # the kernel pads note names and descriptors to 4 bytes, also on 64-bit

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_NHDR = struct.Struct("<III")


def ehdr(machine: int, phnum: int, shoff: int = 0) -> bytes:
    """The ELF header of a core with ``phnum`` program headers right after it.

    ``phnum`` >= PN_XNUM is written as PN_XNUM with one section header at ``shoff`` (see
    :func:`extnum_shdr`), as the kernel does for processes with 65535 mappings or more.
    """
    ident = b"\x7fELF" + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_NONE]) + bytes(8)
    xnum = phnum >= PN_XNUM
    return _EHDR.pack(ident, ET_CORE, machine, EV_CURRENT, 0, EHDR_SIZE, shoff if xnum else 0, 0,
                      EHDR_SIZE, PHDR_SIZE, PN_XNUM if xnum else phnum,
                      SHDR_SIZE if xnum else 0, 1 if xnum else 0, 0)


def extnum_shdr(phnum: int) -> bytes:
    """Section header 0 carrying the real program header count (for ``phnum`` >= PN_XNUM)."""
    return _SHDR.pack(0, 0, 0, 0, 0, 1, 0, phnum, 0, 0)


def phdr(ptype: int, flags: int, offset: int, vaddr: int, filesz: int, memsz: int, align: int) -> bytes:
    """One program header."""
    return _PHDR.pack(ptype, flags, offset, vaddr, 0, filesz, memsz, align)


def perms_flags(perms: str) -> int:
    """``p_flags`` for a ``/proc/PID/maps`` permission string (``r-xp``)."""
    return (PF_R if perms[0] == "r" else 0) | (PF_W if perms[1] == "w" else 0) | (PF_X if perms[2] == "x" else 0)


def _pad(n: int) -> int:
    return -n % NOTE_ALIGN


def note(name: str, ntype: int, desc: bytes) -> bytes:
    """One note: header, NUL-terminated name and descriptor, each padded to 4 bytes."""
    raw = name.encode() + b"\0"
    return b"".join((_NHDR.pack(len(raw), len(desc), ntype), raw, bytes(_pad(len(raw))),
                     desc, bytes(_pad(len(desc)))))
