"""The architecture module for this machine (see :mod:`snapfs.capture.arch_x86_64`)."""

from __future__ import annotations

import platform

from snapfs.errors import TargetError

_MACHINE = platform.machine()
if _MACHINE in ("x86_64", "amd64"):
    from snapfs.capture.arch_x86_64 import *  # noqa: F401,F403
    from snapfs.capture.arch_x86_64 import NAME, REG_NAMES, SYS  # noqa: F401
else:  # pragma: no cover - only x86_64 exists today
    raise TargetError(f"live capture is not implemented for {_MACHINE} yet (x86_64 only)")
