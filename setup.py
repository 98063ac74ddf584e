"""Build shim: everything is declared in pyproject.toml except ``cffi_modules``, which
setuptools only takes here.

The C helpers (the fault loop, page hashing) are cffi API-mode extension modules compiled at
install time into the installed package, so a snapfs run never compiles or loads code from
anywhere else (a cache a user could write to would let that user run code as root). A C
compiler is needed to install; without one the install stops with the message below.
"""

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

NO_COMPILER = (
    "snapfs: building its C helpers failed ({exc}). snapfs needs a C compiler and the libc "
    "headers to install (Debian/Ubuntu: apt-get install gcc libc6-dev), then install again."
)


class BuildExtOrExplain(build_ext):
    """build_ext whose failure says what is missing, in one line."""

    def run(self) -> None:
        try:
            super().run()
        except (CCompilerError, CompileError, ExecError, LinkError, PlatformError) as exc:
            raise SystemExit(NO_COMPILER.format(exc=exc)) from None


setup(
    cmdclass={"build_ext": BuildExtOrExplain},
    cffi_modules=[
        "snapfs/capture/_native_build.py:ffibuilder",
        "snapfs/store/_native_build.py:ffibuilder",
    ],
)
