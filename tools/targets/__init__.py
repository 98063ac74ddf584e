"""C target programs for tests and benchmarks, compiled on demand with the system gcc.

``build("memwriter")`` compiles ``tools/targets/memwriter.c`` into ``build/targets/memwriter``
(rebuilding when the source is newer) and returns the binary's path.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
BUILD_DIR = SOURCE_DIR.parent.parent / "build" / "targets"
CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-pthread", "-D_GNU_SOURCE"]


def build(name: str, extra_flags: list[str] | None = None) -> Path:
    """Compile ``tools/targets/<name>.c`` if needed; return the executable's path."""
    src = SOURCE_DIR / f"{name}.c"
    if not src.exists():
        raise FileNotFoundError(src)
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    out = BUILD_DIR / name
    # A lock so parallel test workers do not race on the same output file.
    with open(BUILD_DIR / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
            tmp = out.with_suffix(f".tmp{os.getpid()}")
            subprocess.run(
                ["gcc", *CFLAGS, *(extra_flags or []), "-o", str(tmp), str(src), "-lm"],
                check=True,
            )
            os.replace(tmp, out)
    return out
