"""Small C helpers compiled on demand with the system C compiler and loaded with ctypes.

Each helper is one C file beside its Python module. The first process that needs it compiles
it (in a background thread: nothing waits for the compiler unless it asks to) into a per-user
cache, ``$XDG_CACHE_HOME/snapfs`` (0700), under a name that carries a digest of the source, so
an edited source is rebuilt and stale builds are removed. Without a compiler, or with
``SNAPFS_NO_NATIVE=1``, :meth:`NativeLibrary.get` returns None and callers use their Python path
(slower, same result).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """Where built helpers are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "snapfs"


class NativeLibrary:
    """One C helper: ``source`` built into ``<stem>-<digest>.so``; ``setup`` declares its
    functions' types on the loaded library."""

    def __init__(self, source: Path, setup: Callable[[ctypes.CDLL], None]) -> None:
        self.source = source
        self._setup = setup
        self._lib: ctypes.CDLL | None = None
        self._lock = threading.Lock()
        self._building: threading.Thread | None = None

    def path(self) -> Path:
        """The built library's path for the current source."""
        digest = hashlib.sha256(self.source.read_bytes()).hexdigest()[:16]
        return cache_dir() / f"{self.source.stem}-{digest}.so"

    def get(self) -> ctypes.CDLL | None:
        """The loaded library, or None if it is not built (yet): a first call starts the build
        in a background thread."""
        if self._lib is not None:
            return self._lib
        if os.environ.get("SNAPFS_NO_NATIVE") == "1":
            return None
        with self._lock:
            try:
                path = self.path()
                if path.exists():
                    lib = ctypes.CDLL(str(path))  # CDLL: calls release the GIL
                    self._setup(lib)
                    self._lib = lib
                    return lib
            except OSError:
                return None
            if self._building is None:
                # Not a daemon: a short-lived snapfs process finishes the build before exiting.
                self._building = threading.Thread(target=self._build_quietly, args=(path,),
                                                  name=f"snapfs-build-{self.source.stem}")
                self._building.start()
        return None

    def ensure_built(self, timeout: float | None = None) -> bool:
        """Build (waiting up to ``timeout``) and load; True if available."""
        if self.get() is not None:
            return True
        if self._building is not None:
            self._building.join(timeout)
        return self.get() is not None

    def _build_quietly(self, path: Path) -> None:
        try:
            self._build(path)
        except (OSError, subprocess.SubprocessError):
            pass  # callers keep using their Python path

    def _build(self, out: Path) -> None:
        """Compile into ``out`` atomically (a temporary file renamed over it)."""
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise OSError("no C compiler")
        old = os.umask(0o077)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(out.parent, 0o700)
            tmp = out.with_name(f"{out.name}.tmp{os.getpid()}.{threading.get_ident()}")
            subprocess.run([cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", str(tmp), str(self.source)],
                           check=True, capture_output=True, timeout=120)
            os.replace(tmp, out)
        finally:
            os.umask(old)
        for stale in out.parent.glob(f"{self.source.stem}-*"):  # older versions, killed builds
            try:
                if stale != out and (stale.suffix == ".so" or time.time() - stale.stat().st_mtime > 600):
                    stale.unlink()
            except OSError:
                pass
