"""cffi build script of ``snapfs.store._native``: the store's C code (page hashing,
pagehash.c), compiled in API mode at install time (setup.py's ``cffi_modules``).

Paths are relative to the project root, where setuptools runs this script.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).parent

ffibuilder = FFI()
ffibuilder.cdef(
    "void snapfs_hash_pages(void *xxh3, const uint8_t *base, const int64_t *pages, size_t n, uint64_t *out);"
)
ffibuilder.set_source(
    "snapfs.store._native",
    '#include "pagehash.h"',
    sources=[str(HERE / "pagehash.c")],
    include_dirs=[str(HERE)],
    depends=[str(HERE / "pagehash.h")],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
