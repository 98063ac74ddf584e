"""Running tools/targets/treecounter.c for tests."""

from __future__ import annotations

import re
import subprocess

from tools.targets import build


class TreeTarget:
    """treecounter NWORKERS SHARED_PAGES PRIVATE_PAGES [FORK_EVERY], started and parsed; the
    whole tree is stopped on close."""

    def __init__(self, nworkers: int, shared_pages: int, private_pages: int, fork_every: int = 0) -> None:
        self.proc = subprocess.Popen(
            [str(build("treecounter")), str(nworkers), str(shared_pages), str(private_pages), str(fork_every)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.pid = self.proc.pid
        self.shared_pages, self.private_pages = shared_pages, private_pages
        self.private_addr: dict[int, int] = {}
        pids: dict[int, int] = {}
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.close()
                raise RuntimeError("treecounter exited before it was ready")
            m = re.match(r"worker (\d+) pid=(\d+) private=(0x[0-9a-f]+)", line)
            if m:
                pids[int(m[1])] = int(m[2])
                self.private_addr[int(m[1])] = int(m[3], 16)
            elif line.startswith("ready"):
                self.shared_addr = int(re.search(r"shared=(0x[0-9a-f]+)", line)[1], 16)
                break
        self.worker_pids = [pids[w] for w in range(nworkers)]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("q\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "TreeTarget":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
