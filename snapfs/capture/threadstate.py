"""A stopped thread's state beyond its general registers: the whole XSAVE area (x87, SSE,
AVX... — what ``PTRACE_GETFPREGS`` misses) and its signal mask, read and written with
ptrace. The thread must be stopped by us, and every call made from the tracer thread.

``PTRACE_SETSIGMASK`` also clears a pending "restore the saved mask" (a thread interrupted
inside ``ppoll``/``pselect``/``sigsuspend`` holds a temporary mask): the mask written is the
one the thread keeps.
"""

from __future__ import annotations

import errno

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


def record(tids: list[int]) -> dict[str, dict]:
    """``{tid: {"xstate": bytes, "sigmask": int}}`` for stopped threads (gone ones skipped).

    Runs inside the snapshot's pause: one buffer for every thread and raw calls (cffi's
    per-call conversions cost more than the two syscalls).
    """
    out: dict[str, dict] = {}
    buf = k.ffi.new("char[]", arch.XSTATE_MAX)
    iov = k.ffi.new("struct iovec *")
    iov.iov_base = buf
    mask = k.ffi.new("uint64_t *")
    call = k.libc.syscall
    nr = k.ffi.cast("long", arch.SYS["ptrace"])
    getregset, getmask = k.ffi.cast("long", k.PTRACE_GETREGSET), k.ffi.cast("long", k.PTRACE_GETSIGMASK)
    note, eight = k.ffi.cast("long", k.NT_X86_XSTATE), k.ffi.cast("long", 8)
    iov_arg, mask_arg = k.ffi.cast("long", iov), k.ffi.cast("long", mask)
    for tid in tids:
        iov.iov_len = arch.XSTATE_MAX
        ctid = k.ffi.cast("long", tid)
        if call(nr, getregset, ctid, note, iov_arg) == -1 or call(nr, getmask, ctid, eight, mask_arg) == -1:
            err = k.ffi.errno
            if err == errno.ESRCH:
                continue  # killed while stopped: nothing to record
            raise OSError(err, f"ptrace thread state of {tid}: {errno.errorcode.get(err, err)}")
        out[str(tid)] = {"xstate": k.ffi.buffer(buf, iov.iov_len)[:], "sigmask": int(mask[0])}
    return out
