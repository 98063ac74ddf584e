"""C target programs for tests and benchmarks, compiled on demand with the system gcc.

``build("memwriter")`` compiles ``tools/targets/memwriter.c`` into ``build/targets/memwriter``
(rebuilding when the source is newer) and returns the binary's path.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tools.buildcache import cached_build

SOURCE_DIR = Path(__file__).resolve().parent
BUILD_DIR = SOURCE_DIR.parent.parent / "build" / "targets"
CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-pthread", "-D_GNU_SOURCE"]


def build(name: str, extra_flags: list[str] | None = None) -> Path:
    """Compile ``tools/targets/<name>.c`` if needed; return the executable's path."""
    src = SOURCE_DIR / f"{name}.c"
    if not src.exists():
        raise FileNotFoundError(src)

    def compile_to(tmp: Path) -> None:
        subprocess.run(["gcc", *CFLAGS, *(extra_flags or []), "-o", str(tmp), str(src), "-lm"], check=True)

    return cached_build(BUILD_DIR / name, [src], compile_to)
