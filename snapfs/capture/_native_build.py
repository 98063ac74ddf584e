"""cffi build script of ``snapfs.capture._native``: the capture engine's kernel ABI and its C
code (the fault loop, the ledger's claims), compiled in API mode at install time (setup.py's
``cffi_modules``).

The declarations are the C headers themselves (``kabi.h``, ``ledger.h``, ``fastfault.h``,
their ``#`` lines dropped), plus ``struct user_regs`` from the arch module, so what Python
sees is exactly what the C code is compiled against. Paths are relative to the project root,
where setuptools runs this script.
"""

import importlib
import platform
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).parent
HEADERS = ["kabi.h", "ledger.h", "fastfault.h"]
SOURCES = ["kabi.c", "ledger.c", "fastfault.c"]
# The arch module (and snapfs.elfcore, where its register layout lives) imports nothing but
# the standard library, so it loads from the source tree in a bare build environment.
sys.path.insert(0, str(HERE.resolve().parent.parent))
REGS_STRUCT = importlib.import_module(f"snapfs.capture.arch_{platform.machine()}").REGS_STRUCT


def declarations(header: Path) -> str:
    """A header as cffi declarations: without its preprocessor lines."""
    return "\n".join(line for line in header.read_text().splitlines() if not line.lstrip().startswith("#"))


ffibuilder = FFI()
ffibuilder.cdef(
    "struct iovec { void *iov_base; size_t iov_len; };\n"
    + REGS_STRUCT
    + "\n".join(declarations(HERE / h) for h in HEADERS)
)
ffibuilder.set_source(
    "snapfs.capture._native",
    REGS_STRUCT + "\n" + "".join(f'#include "{h}"\n' for h in HEADERS),
    sources=[str(HERE / s) for s in SOURCES],
    include_dirs=[str(HERE)],
    depends=[str(HERE / h) for h in HEADERS],
    extra_compile_args=["-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
