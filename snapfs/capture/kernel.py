"""The capture engine's kernel ABI: the compiled cffi module, constants, and the one error
convention.

Every ABI call goes through ``snapfs.capture._native``, compiled in cffi's API mode at
install time from ``kabi.h`` (structs the installed headers lack, since they are older than
the kernel, and the wrappers in ``kabi.c``), ``ledger.h`` and ``fastfault.h``. Each C
function returns a value >= 0 or -errno; :func:`check` turns a negative one into
``OSError``. Nothing reads errno. cffi releases the GIL during every call, so a worker thread
copying memory with ``process_vm_readv`` runs beside the trio event loop; where one call per
item would cost a GIL round trip per item, the loop is in C (the fault loop, the ledger's
claims, the fault thread's wait-and-read).

Concerns and their modules: userfaultfd (:mod:`~snapfs.capture.uffd`), PAGEMAP_SCAN
(:mod:`~snapfs.capture.pagemap`), process_vm_readv/writev (:mod:`~snapfs.capture.memory`),
ptrace (:mod:`~snapfs.capture.ptrace`), the fault loop (:mod:`~snapfs.capture.fastfault`),
the ledger (:mod:`~snapfs.capture.ledger`); their constants are here.
"""

from __future__ import annotations

import os

from snapfs import native
from snapfs.capture import arch

_ext = native.load("snapfs.capture._native")
ffi, lib = _ext.ffi, _ext.lib

# cffi parses a type string with pycparser on its first use (~1 ms): done here, not during a
# target's pause (get_fpregs' "char[]" was first parsed inside the freeze).
for _type in ("char[]", "long", "unsigned long", "uintptr_t", "void *", "struct iovec *",
              "struct iovec[1]", "struct page_region[]", "struct pm_scan_arg *",
              "struct uffdio_api *", "struct uffdio_range *", "struct uffdio_register *",
              "struct uffdio_writeprotect *", "struct user_regs *", "uint8_t[]", "uint64_t[]",
              "int64_t[]", "int *", "uint64_t *"):
    ffi.typeof(_type)

assert ffi.sizeof("struct uffd_msg") == 32
assert ffi.sizeof("struct pm_scan_arg") == 96
assert ffi.sizeof("struct user_regs") == arch.REGS_SIZE

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
IOV_MAX = 1024


# --- ioctl numbers (asm-generic/ioctl.h) ---
def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (typ << 8) | nr


def _iowr(typ: int, nr: int, struct: str) -> int:
    return _ioc(3, typ, nr, ffi.sizeof(struct))


def _ior(typ: int, nr: int, struct: str) -> int:
    return _ioc(2, typ, nr, ffi.sizeof(struct))


# --- userfaultfd (linux/userfaultfd.h) ---
UFFD_API = 0xAA
UFFDIO_API = _iowr(0xAA, 0x3F, "struct uffdio_api")
UFFDIO_REGISTER = _iowr(0xAA, 0x00, "struct uffdio_register")
UFFDIO_UNREGISTER = _ior(0xAA, 0x01, "struct uffdio_range")
UFFDIO_WAKE = _ior(0xAA, 0x02, "struct uffdio_range")
UFFDIO_WRITEPROTECT = _iowr(0xAA, 0x06, "struct uffdio_writeprotect")
USERFAULTFD_IOC_NEW = _ioc(0, 0xAA, 0x00, 0)

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1

UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_MSG_SIZE = 32

# --- PAGEMAP_SCAN (linux/fs.h, 6.7+) ---
PAGEMAP_SCAN = _iowr(ord("f"), 16, "struct pm_scan_arg")
# --- PROCMAP_QUERY (linux/fs.h, 6.11+) ---
PROCMAP_QUERY = _iowr(ord("f"), 17, "struct procmap_query")
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6

# --- PROCMAP_QUERY (linux/fs.h, 6.11+): one VMA by address, on an fd of /proc/PID/maps ---
PROCMAP_QUERY_SIZE = 104  # struct procmap_query (built with struct in snapfs.capture.inject)
PROCMAP_QUERY = _ioc(3, ord("f"), 17, PROCMAP_QUERY_SIZE)
PROCMAP_QUERY_VMA_READABLE = 0x01
PROCMAP_QUERY_VMA_EXECUTABLE = 0x04
PROCMAP_QUERY_COVERING_OR_NEXT_VMA = 0x10

# --- ptrace (linux/ptrace.h, linux/elf.h) ---
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_GETFPREGS = 14
PTRACE_GETSIGINFO = 0x4202
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
SIGINFO_SIZE = 128  # siginfo_t
PTRACE_SYSCALL = 24
PTRACE_DETACH = 17
PTRACE_CONT = 7
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_O_TRACESYSGOOD = 1
PTRACE_O_TRACEEXEC = 0x10
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_STOP = 128
NT_X86_XSTATE = 0x202  # PTRACE_GETREGSET note: the whole XSAVE area
# wait options: every child kind; only children/tracees of the calling thread (the tracer
# thread never forks, so wait4(-1) there sees its tracees and nothing else).
WALL = 0x40000000
WNOTHREAD = 0x20000000
KCMP_FILE = 0

# --- per-thread timers (the tracer thread's deadline) ---
SIGEV_THREAD_ID = 4
CLOCK_MONOTONIC = 1
TIMER_ABSTIME = 1


def check(ret: int, what: str) -> int:
    """``ret`` of a call of the compiled module; raise ``OSError`` if it is -errno."""
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def syscall(name: str, *args: int) -> int:
    """Raw syscall by name (numbers from the arch module), up to six integer arguments;
    ``OSError`` on failure."""
    a = [x - (1 << 64) if x >= 1 << 63 else x for x in (*args, 0, 0, 0, 0, 0, 0)[:6]]  # as C longs
    return check(lib.snapfs_syscall(arch.SYS[name], *a), name)


def ioctl(fd: int, request: int, arg) -> int:
    """``ioctl(fd, request, arg)``; ``arg`` is a cffi pointer or an int."""
    if isinstance(arg, int):
        arg = ffi.cast("void *", arg)
    return check(lib.snapfs_ioctl(fd, request, arg), f"ioctl {request:#x}")


_SYS_PTRACE = arch.SYS["ptrace"]


def ptrace(request: int, tid: int, addr: int = 0, data=0) -> int:
    """Raw ``ptrace`` syscall; ``data`` is an int or a cffi pointer. (One direct call: a
    stop of 257 threads makes ~1 300 of them.)"""
    if not isinstance(data, int):
        data = int(ffi.cast("uintptr_t", data))
    r = lib.snapfs_syscall(_SYS_PTRACE, request, tid, addr, data, 0, 0)
    if r < 0:
        raise OSError(-r, f"ptrace: {os.strerror(-r)}")
    return r


def pidfd_open(pid: int) -> int:
    """A pidfd for ``pid`` (the whole process)."""
    return os.pidfd_open(pid)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """Duplicate file descriptor ``target_fd`` of the process behind ``pidfd`` into ours."""
    return syscall("pidfd_getfd", pidfd, target_fd, 0)
