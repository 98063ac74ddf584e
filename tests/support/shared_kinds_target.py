"""A parent and a child sharing one object of each kind (MAP_SHARED anonymous memory inherited
across fork, a memfd, a /dev/shm file, a SysV segment), each filled with a known pattern; both
then wait for stdin to close. Prints "ready <child pid>" (tests/test_capture_tree.py)."""

import ctypes
import mmap
import os
import sys
import tempfile

PAGES = 64
SIZE = PAGES * 4096


HOLE = (10, 21)  # pages of the memfd left as a hole: its object has two extents


def pattern(kind: int) -> bytes:
    data = bytearray(bytes((kind * 37 + i) % 251 + 1 for i in range(256)) * (SIZE // 256))
    if kind == 1:
        data[HOLE[0] * 4096:HOLE[1] * 4096] = bytes((HOLE[1] - HOLE[0]) * 4096)
    return bytes(data)


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    regions = [mmap.mmap(-1, SIZE, mmap.MAP_SHARED)]
    fd = os.memfd_create("snapfs-kinds")
    os.ftruncate(fd, SIZE)
    regions.append(mmap.mmap(fd, SIZE, mmap.MAP_SHARED))
    shm_path = tempfile.mktemp(prefix="snapfs-kinds-", dir="/dev/shm")
    fd2 = os.open(shm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(shm_path)  # still mapped: the object lives on
    os.ftruncate(fd2, SIZE)
    regions.append(mmap.mmap(fd2, SIZE, mmap.MAP_SHARED))
    shmid = libc.shmget(0, SIZE, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
    sysv = libc.shmat(shmid, None, 0)
    libc.shmctl(shmid, 0, None)  # IPC_RMID: gone once detached
    for kind, m in enumerate(regions):
        m[:] = pattern(kind)
    # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: those pages leave the memfd's page cache.
    if libc.fallocate(fd, 3, ctypes.c_long(HOLE[0] * 4096), ctypes.c_long((HOLE[1] - HOLE[0]) * 4096)):
        raise OSError(ctypes.get_errno(), "fallocate")
    ctypes.memmove(sysv, pattern(len(regions)), SIZE)
    fork_and_wait(lambda: None)


def fork_and_wait(in_child) -> None:
    """Fork; the child runs ``in_child()``, then both wait for stdin to close (the child
    exits first). Prints "ready <child pid>"."""
    child = os.fork()
    if child == 0:
        in_child()
        sys.stdin.read()
        os._exit(0)
    print("ready", child, flush=True)
    sys.stdin.read()
    os.waitpid(child, 0)


if __name__ == "__main__":
    main()
