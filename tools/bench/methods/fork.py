"""The fork peer: the target forks a child that writes its memory out, the way in-memory
databases save (Redis BGSAVE); the parent's pause is fork() itself, then copy-on-write."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tools.bench.methods import Method, Outcome
from tools.bench.targets import Target


class ForkSave(Method):
    """SIGHUP to memwriter: its main thread times fork(); the child writes the region to a file
    and exits. The writers' stalls meanwhile (fork's own, then copy-on-write faults) are
    measured by the target like any other stall."""

    name = "fork"
    how = ("the target forks (its main thread times fork()) and the child writes the whole region "
           "to a file and exits, as Redis's BGSAVE does; tool's pause = fork() as the target timed it, "
           "duration = until the child is reaped; the writers' stalls meanwhile are the pause")

    def run(self, target: Target, workdir: Path) -> Outcome:
        dump = target.spec.fork_dump
        if not dump:
            raise RuntimeError("the target was started without --fork-dump")
        t0 = time.perf_counter()
        line = target.fork_save()
        t1 = time.perf_counter()
        if line.get("error") or line.get("status"):
            raise RuntimeError(f"fork peer failed: {line.get('error') or 'child exit status ' + str(line['status'])}")
        size = os.path.getsize(dump) if os.path.exists(dump) else 0
        try:
            os.unlink(dump)
        except OSError:
            pass
        return Outcome(float(line.get("child_s") or (t1 - t0)), size, tool_pause_ms=line["fork_us"] / 1e3,
                       extra={"fork_us": line["fork_us"]})
