"""Stop-the-world copy: stop every thread, copy the data region, compress it, resume.

The floor for duration and the ceiling for pause: the pause is the whole copy + compression.
The stop is snapfs's ptrace stop of every thread when available, else SIGSTOP (see
``tools.bench.copying.stopped``).
"""

from __future__ import annotations

import time
from pathlib import Path

from tools.bench.copying import copy_ranges, stopped
from tools.bench.methods import Method, Outcome
from tools.bench.sink import ImageSink
from tools.bench.targets import Target


class StopCopy(Method):
    """Freeze, process_vm_readv everything, zstd (same threads/level/frames), resume."""

    name = "stop-copy"
    how = ("stop all threads (ptrace), process_vm_readv the data region in 4 MiB reads, zstd level 1 "
           "in 128 KiB frames on the bench's threads (zero pages skipped), resume; pause = all of it")

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def run(self, target: Target, workdir: Path) -> Outcome:
        sink = ImageSink(str(workdir / "stopcopy.img"), self.threads)
        try:
            t0 = time.perf_counter()
            with stopped(target.pid) as how:
                copy_ranges(target.pid, [(target.base, target.size)], sink)
                sink.flush()
            t1 = time.perf_counter()
            return Outcome(t1 - t0, sink.image_bytes, tool_pause_ms=(t1 - t0) * 1e3,
                           extra={"stop": how})
        finally:
            sink.close()
