"""The ``PT_NOTE`` contents of a Linux core file, built from a :class:`CoreState`.

Order as the kernel writes it (``fs/binfmt_elf.c``: ``write_note_info``): for the first thread
NT_PRSTATUS, then the process notes NT_PRPSINFO, NT_SIGINFO, NT_AUXV, NT_FILE, then that
thread's register sets (x86_64: NT_PRFPREG, NT_X86_XSTATE); every other thread: NT_PRSTATUS and
its register sets; last the arch's process-wide notes (``elf_coredump_extra_notes_write``;
x86_64: NT_X86_XSAVE_LAYOUT). The first thread is the main one (gdb shows it first). A thread
stopped while a signal was being delivered also gets that signal in NT_PRSTATUS (``pr_cursig``)
and its own NT_SIGINFO after its NT_PRSTATUS, as gdb's ``gcore`` writes it; the others carry
none (a snapshot is not a crash: gdb then prints no "terminated with signal").
"""

from __future__ import annotations

import struct
from types import ModuleType

from snapfs.elfcore.elf import NT_AUXV, NT_FILE, NT_PRPSINFO, NT_PRSTATUS, NT_SIGINFO, note
from snapfs.elfcore.state import CoreState, Mapping, ProcessStatus, ThreadState

SIGINFO_SIZE = 128
PRARGSZ = 80  # ELF_PRARGSZ
FILE_NOTE_PAGE = 4096  # NT_FILE counts file offsets in these units (the kernel's PAGE_SIZE)

# struct elf_prstatus_common (64-bit): pr_info{signo, code, errno}, pr_cursig, pr_sigpend,
# pr_sighold, pr_pid, pr_ppid, pr_pgrp, pr_sid, four struct timevals.
_PRSTATUS_HEAD = struct.Struct("<iiih2xQQiiii64x")
# struct elf_prpsinfo (64-bit): state, sname, zomb, nice, flag, uid, gid, pid, ppid, pgrp,
# sid, fname[16], psargs[80].
_PRPSINFO = struct.Struct("<BcBb4xQIIiiii16s80s")
_STATES = "RSDTZW"  # pr_state is the letter's index, as the kernel numbers task states


def prstatus(arch: ModuleType, thread: ThreadState, status: ProcessStatus) -> bytes:
    """NT_PRSTATUS of one thread: its signal (if any), ids and general registers."""
    signo = errno_ = code = 0
    if thread.siginfo:
        signo, errno_, code = struct.unpack_from("<iii", thread.siginfo)
    regs = [thread.regs.get(name, 0) & 0xFFFFFFFFFFFFFFFF for name in arch.REG_NAMES]
    return (_PRSTATUS_HEAD.pack(signo, code, errno_, signo, 0, 0, thread.tid, status.ppid,
                                status.pgrp, status.sid)
            + struct.pack(f"<{len(regs)}Q", *regs)
            + struct.pack("<i4x", 1 if thread.fpregs else 0))


def prpsinfo(state: CoreState) -> bytes:
    """NT_PRPSINFO: process state, ids, command name and arguments."""
    st = state.status
    letter = (st.state or "R")[:1]
    args = " ".join(state.args).encode(errors="replace")[: PRARGSZ - 1]
    return _PRPSINFO.pack(max(_STATES.find(letter), 0), letter.encode(), letter == "Z",
                          max(-128, min(127, st.nice)), st.flags, st.uid, st.gid, state.pid,
                          st.ppid, st.pgrp, st.sid, state.comm.encode(errors="replace")[:15], args)


def file_note(mappings: list[Mapping]) -> bytes:
    """NT_FILE: every file-backed mapping (start, end, offset in pages) and its path, so a
    debugger finds the executable and shared libraries whose pages the core leaves out."""
    files = [m for m in mappings if m.is_file]
    head = struct.pack("<QQ", len(files), FILE_NOTE_PAGE)
    table = b"".join(struct.pack("<QQQ", m.start, m.end, m.offset // FILE_NOTE_PAGE) for m in files)
    names = b"".join(m.path.encode(errors="surrogateescape") + b"\0" for m in files)
    return head + table + names


def build(state: CoreState, arch: ModuleType, mappings: list[Mapping]) -> bytes:
    """The whole note segment (``mappings``: the file's PT_LOADs, for NT_FILE)."""
    process = [note("CORE", NT_PRPSINFO, prpsinfo(state))]
    first = state.threads[0] if state.threads else None
    process.append(note("CORE", NT_SIGINFO, ((first and first.siginfo) or b"").ljust(SIGINFO_SIZE, b"\0")))
    if state.auxv:
        process.append(note("CORE", NT_AUXV, state.auxv))
    if any(m.is_file for m in mappings):
        process.append(note("CORE", NT_FILE, file_note(mappings)))
    out = [] if state.threads else process
    for i, t in enumerate(state.threads):
        out.append(note("CORE", NT_PRSTATUS, prstatus(arch, t, state.status)))
        if i == 0:
            out += process
        elif t.siginfo:
            out.append(note("CORE", NT_SIGINFO, t.siginfo.ljust(SIGINFO_SIZE, b"\0")))
        fpregs = t.fpregs or arch.fpregs_from_regsets(t.regsets)
        for name, ntype, desc in arch.thread_notes(fpregs, t.regsets, state.arch_state):
            out.append(note(name, ntype, desc))
    for name, ntype, desc in arch.process_notes(state.arch_state, [t.regsets for t in state.threads]):
        out.append(note(name, ntype, desc))
    return b"".join(out)
