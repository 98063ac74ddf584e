"""The ELF core file format: what the capture records for it and how the ``core`` view lays
it out.

Both sides of the store use this package without breaking "data flows one way": the capture
imports the architecture descriptions (register layouts, the register sets to record at the
freeze) and the recorded-state schema; the view (:mod:`snapfs.fs.core`) imports everything.
Nothing here talks to the kernel or to the store.

- ``x86_64.py``: everything architecture-specific about a core (ELF machine, the general
  register layout of ``NT_PRSTATUS``, which register sets are recorded and which notes they
  become). An aarch64 port adds ``aarch64.py`` with the same names.
- :mod:`snapfs.elfcore.state`: :class:`~snapfs.elfcore.state.CoreState`, what a snapshot holds
  for its core (auxv, process status, every mapping, per-thread register sets), kept as one
  store blob.
- :mod:`snapfs.elfcore.elf`: ELF64 headers and notes (byte layouts, constants).
- :mod:`snapfs.elfcore.notes`: the ``PT_NOTE`` contents of a Linux core, in the kernel's order.
"""

from __future__ import annotations

import importlib
from types import ModuleType

ARCHES = ("x86_64",)


def arch(name: str) -> ModuleType:
    """The architecture module for ``name`` (as recorded in a snapshot); ValueError if unknown."""
    if name not in ARCHES:
        raise ValueError(f"no ELF core support for architecture {name!r} (have: {', '.join(ARCHES)})")
    return importlib.import_module(f"snapfs.elfcore.{name}")
