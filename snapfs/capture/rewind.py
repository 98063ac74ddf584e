"""Thread-level steps of a restore, on a process whose threads are all stopped by us.

**Parking** is what makes a restore safe to kill: before the first destructive step (a
layout change, a memory write) every thread's signal mask is set to block everything and
its registers point at a ``syscall`` instruction with ``pause()``. If snapfs dies from then
on, the kernel detaches the threads and each one waits in ``pause()`` for ever: no
instruction of a half-restored image runs, and signals other than SIGKILL stay pending
(``kill -CONT`` cannot wake it either). Running the same ``snapfs incoming`` again finishes
the restore; until then the process only sleeps. Injected syscalls run in a parked thread,
so their "original" registers are the parked ones too.

On success each thread gets its recorded XSAVE area, registers (with the syscall it was
blocked in issued again, :func:`snapfs.capture.arch.resume_as_recorded`) and signal mask,
then is detached. Before the first destructive step a failure un-parks: every thread gets
back exactly its own state.
"""

from __future__ import annotations

from dataclasses import dataclass

from snapfs.capture import arch, threadstate
from snapfs.capture import kernel as k
from snapfs.capture.ptrace import StoppedProcess


@dataclass
class SavedThread:
    """A thread's own state, taken when it was parked."""

    regs: object  # cffi struct user_regs *
    sigmask: int
    xstate: bytes


def _copy_regs(regs):
    out = k.ffi.new("struct user_regs *")
    k.ffi.memmove(out, regs, k.ffi.sizeof("struct user_regs"))
    return out


class Parked:
    """Every thread of ``proc`` parked (see the module docstring); :meth:`unpark` undoes it,
    :meth:`resume_as` gives a thread its final state."""

    def __init__(self, proc: StoppedProcess, syscall_insn: int) -> None:
        self.proc = proc
        self.saved: dict[int, SavedThread] = {}
        for tid in list(proc.tids):
            regs = proc.get_regs(tid)
            self.saved[tid] = SavedThread(_copy_regs(regs), threadstate.get_sigmask(tid),
                                          threadstate.get_xstate(tid))
            threadstate.block_all(tid)
            arch.park(regs, syscall_insn)
            proc.set_regs(tid, regs)

    def unpark(self, tid: int | None = None) -> None:
        """Give thread ``tid`` (default: every thread) back its own registers, XSAVE area
        and mask."""
        for t in [tid] if tid is not None else list(self.saved):
            s = self.saved[t]
            threadstate.set_xstate(t, s.xstate)
            self.proc.set_regs(t, s.regs)
            threadstate.set_sigmask(t, s.sigmask)

    def resume_as(self, tid: int, regs: dict[str, int], xstate: bytes | None, sigmask: int | None) -> None:
        """Load a recorded thread state into ``tid`` (registers as recorded at a snapshot's
        stop: the syscall it was blocked in is issued again)."""
        if xstate is not None:
            threadstate.set_xstate(tid, xstate)
        out = k.ffi.new("struct user_regs *")
        for name in arch.REG_NAMES:
            setattr(out, name, regs[name])
        arch.resume_as_recorded(out)
        self.proc.set_regs(tid, out)
        threadstate.set_sigmask(tid, self.saved[tid].sigmask if sigmask is None else sigmask)
