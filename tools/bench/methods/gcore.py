"""gcore (gdb): an ELF core dump of the live target; the target is stopped for the whole run."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tools.bench.methods import Method, Outcome
from tools.bench.targets import Target


class Gcore(Method):
    """``gcore -o PREFIX PID``; image = the core file as written (uncompressed)."""

    name = "gcore"
    how = "gcore -o FILE PID (gdb attaches, dumps every mapping, detaches); image = core file size"

    def available(self) -> str | None:
        if not shutil.which("gcore"):
            return "gcore not found (Debian package gdb)"
        return None

    def run(self, target: Target, workdir: Path) -> Outcome:
        prefix = workdir / "gcore"
        t0 = time.perf_counter()
        proc = subprocess.run(["gcore", "-o", str(prefix), str(target.pid)],
                              capture_output=True, text=True, timeout=600)
        t1 = time.perf_counter()
        core = Path(f"{prefix}.{target.pid}")
        try:
            if proc.returncode != 0 or not core.exists():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"gcore failed (exit {proc.returncode}): {tail[0]}")
            st = core.stat()
            return Outcome(t1 - t0, st.st_size, tool_pause_ms=(t1 - t0) * 1e3,
                           extra={"allocated_bytes": st.st_blocks * 512})
        finally:
            core.unlink(missing_ok=True)
