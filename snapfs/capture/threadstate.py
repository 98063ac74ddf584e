"""A stopped thread's state beyond its general registers: the whole XSAVE area (x87, SSE,
AVX... — what ``PTRACE_GETFPREGS`` misses) and its signal mask, read and written with
ptrace (the freeze records the XSAVE area among its register sets, this module the masks). The thread must be stopped by us, and every call made from the tracer thread.

``PTRACE_SETSIGMASK`` also clears a pending "restore the saved mask" (a thread interrupted
inside ``ppoll``/``pselect``/``sigsuspend`` holds a temporary mask): the mask written is the
one the thread keeps.
"""

from __future__ import annotations

import errno
import os

from snapfs.capture import arch
from snapfs.capture import kernel as k

_ALL_SIGNALS = (1 << 64) - 1  # the kernel keeps SIGKILL and SIGSTOP unblockable


def in_tracer(proc, fn, *args):
    """Run ``fn(*args)`` where the ptrace requests for ``proc`` (a StoppedProcess) must come
    from: its tracer thread when it has one (``proc._call``, re-entrant), else right here
    (the thread that stopped it)."""
    call = getattr(proc, "_call", None)
    return call(fn, *args) if call is not None else fn(*args)


def get_xstate(tid: int) -> bytes:
    """The thread's XSAVE area (its size is the kernel's: the CPU's enabled features)."""
    buf = k.ffi.new("char[]", arch.XSTATE_MAX)
    iov = k.ffi.new("struct iovec *")
    iov.iov_base = buf
    iov.iov_len = arch.XSTATE_MAX
    k.ptrace(k.PTRACE_GETREGSET, tid, k.NT_X86_XSTATE, iov)
    return bytes(k.ffi.buffer(buf, iov.iov_len))


def set_xstate(tid: int, data: bytes) -> None:
    """Load an XSAVE area recorded by :func:`get_xstate` (OSError EINVAL if the CPU cannot)."""
    buf = k.ffi.from_buffer(data)
    iov = k.ffi.new("struct iovec *")
    iov.iov_base = buf
    iov.iov_len = len(data)
    k.ptrace(k.PTRACE_SETREGSET, tid, k.NT_X86_XSTATE, iov)


def get_sigmask(tid: int) -> int:
    """The thread's blocked-signal mask (bit n-1 = signal n)."""
    out = k.ffi.new("uint64_t *")
    k.ptrace(k.PTRACE_GETSIGMASK, tid, 8, out)
    return int(out[0])


def set_sigmask(tid: int, mask: int) -> None:
    """Set the thread's blocked-signal mask (and drop any saved temporary mask)."""
    val = k.ffi.new("uint64_t *", mask & _ALL_SIGNALS)
    k.ptrace(k.PTRACE_SETSIGMASK, tid, 8, val)


def block_all(tid: int) -> None:
    """Block every signal the kernel lets a thread block."""
    set_sigmask(tid, _ALL_SIGNALS)


def record_masks(tids: list[int]) -> dict[str, int]:
    """``{tid: signal mask}`` of stopped threads (gone ones skipped), read in one C call.
    Runs inside the snapshot's pause; the XSAVE areas come from the freeze's own register-set
    records."""
    n = len(tids)
    masks = k.ffi.new("uint64_t[]", max(n, 1))
    res = k.ffi.new("int[]", max(n, 1))
    k.lib.snapfs_ptrace_record(k.ffi.new("int[]", tids), n, 0, k.ffi.NULL, 0, k.ffi.NULL,
                               k.ffi.NULL, 0, k.ffi.NULL, 0, k.ffi.NULL, masks, res)
    out: dict[str, int] = {}
    for i, tid in enumerate(tids):
        if res[i] < 0:
            if res[i] == -errno.ESRCH:
                continue  # killed while stopped: nothing to record
            raise OSError(-res[i], f"ptrace: {os.strerror(-res[i])}")
        out[str(tid)] = int(masks[i])
    return out
