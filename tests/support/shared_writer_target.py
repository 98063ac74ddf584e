"""A parent fills MAP_SHARED anonymous memory and forks a child that never maps any of it
(fork copies no shared page table entries); on SIGUSR1 the child writes every page once,
and prints "wrote". Prints "ready <child pid>" (tests/test_capture_tree.py)."""

import mmap
import signal

from tests.support.shared_kinds_target import fork_and_wait

PAGES = 16384  # 64 MiB: the object's rate-limited scan is still running when the child writes


def main() -> None:
    region = mmap.mmap(-1, PAGES * 4096, mmap.MAP_SHARED)
    region[:] = bytes(range(256)) * (PAGES * 16)

    def write_all_on_sigusr1() -> None:
        signal.sigwait([signal.SIGUSR1])
        # Written from the last page back: the object's scan goes forward.
        for p in range(PAGES - 1, -1, -1):
            region[p * 4096] = 0xEE
        print("wrote", flush=True)

    fork_and_wait(write_all_on_sigusr1)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])  # inherited: sigwait takes it
    main()
