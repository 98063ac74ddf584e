"""cffi build script of ``snapfs.store._native``: the store's C helpers (page hashing, CRC32,
fallocate/sync_file_range), compiled in API mode at install time (setup.py's
``cffi_modules``).

The declarations are the header ``storelib.h`` itself (its ``#`` lines dropped), so what
Python sees is exactly what the C code is compiled against. Paths are relative to the
project root, where setuptools runs this script.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).parent
SOURCES = ["pagehash.c", "checksum.c", "fileio.c", "syslib.c"]


def declarations(header: Path) -> str:
    """A header as cffi declarations: without its preprocessor lines."""
    return "\n".join(line for line in header.read_text().splitlines() if not line.lstrip().startswith("#"))


ffibuilder = FFI()
ffibuilder.cdef(declarations(HERE / "storelib.h"))
ffibuilder.set_source(
    "snapfs.store._native",
    '#include "storelib.h"',
    sources=[str(HERE / s) for s in SOURCES],
    include_dirs=[str(HERE)],
    depends=[str(HERE / h) for h in ("storelib.h", "syslib.h")],
    extra_compile_args=["-pthread"],
    extra_link_args=["-pthread"],
    libraries=["dl"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
