"""cffi build script of ``snapfs.capture._native``: the capture engine's C code (the fault
loop, fastfault.c), compiled in API mode at install time (setup.py's ``cffi_modules``).

Paths are relative to the project root, where setuptools runs this script.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).parent

ffibuilder = FFI()
ffibuilder.cdef(
    """
typedef ... pthread_mutex_t;
int snapfs_fault_loop(int uffd, int stop_fd, int forward_fd, int notify_fd, int pid,
                      unsigned long wp_request, const uint64_t *ext_start,
                      const uint64_t *ext_end, const int64_t *ext_base, const uint8_t *ext_huge,
                      int64_t n_ext, uint8_t *state, pthread_mutex_t *lock, uint8_t *pages,
                      uint64_t *records, uint64_t capacity, uint64_t *counters);
"""
)
ffibuilder.set_source(
    "snapfs.capture._native",
    '#include "fastfault.h"',
    sources=[str(HERE / "fastfault.c")],
    include_dirs=[str(HERE)],
    depends=[str(HERE / "fastfault.h")],
    extra_compile_args=["-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
