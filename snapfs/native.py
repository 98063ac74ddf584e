"""The compiled C helpers: where they come from, and the one switch that turns them off.

The helpers are cffi API-mode extension modules compiled when snapfs is installed
(``setup.py``; build scripts ``snapfs/*/_native_build.py``): ``snapfs.capture._native`` (the
fault loop) and ``snapfs.store._native`` (page hashing). They live inside the installed
package, so nothing is compiled, or loaded from a cache or any other place a user could
write to, at run time. Installing needs a C compiler; without one the install stops with a
message saying so (there is no silent slower fallback).

``SNAPFS_NO_NATIVE=1`` makes the capture serve every write fault in its Python fault thread
instead of the native loop (slower, same result): for tests and measurements. snapfs says so
once on stderr when it does.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from snapfs.errors import SnapfsError

_warned = False


def load(name: str) -> ModuleType:
    """The compiled helper module ``name`` (``ffi`` and ``lib``); a one-line error if snapfs
    was not installed with it (run from a source tree that was never built, say)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise SnapfsError(
            f"snapfs's compiled helper {name} is missing ({exc}): install snapfs with pip "
            "(it compiles the helpers; needs a C compiler), e.g. pip install -e ."
        ) from None


def disabled() -> bool:
    """True if ``SNAPFS_NO_NATIVE=1``: the caller takes its Python path (said once)."""
    global _warned
    if os.environ.get("SNAPFS_NO_NATIVE") != "1":
        return False
    if not _warned:
        _warned = True
        print("snapfs: warning: SNAPFS_NO_NATIVE=1: write faults are served by the slower "
              "Python fault thread, not the native loop", file=sys.stderr)
    return True
