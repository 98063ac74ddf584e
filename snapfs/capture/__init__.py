"""Live capture of a running process: kernel ABIs, the freeze, the trio engine.

Public API (see docs/architecture.md):

- ``await capture_process(pid, store, name, CaptureOptions(...), progress=cb)`` ->
  :class:`CaptureResult` — a live point-in-time snapshot into the store.
- ``frozen(pid)`` (async context manager, :mod:`snapfs.capture.freeze`): every thread
  stopped, a userfaultfd for the target's memory taken; leaving always resumes and detaches.
- ``stopped(pid)`` (sync context manager): every thread stopped, nothing injected; leaving
  resumes and detaches (blocking: use from one thread).
- ``read_memory(pid, addr, size) -> bytes`` / ``write_memory(pid, addr, data)``:
  ``process_vm_readv``/``writev``.
- Continuous snapshots: ``capture_process(..., CaptureOptions(continuous=True))`` returns a
  result whose ``tracking`` takes incremental children with
  ``await snapshot_next(tracking, store, name)`` (close it when done).

Modules: ``kernel`` (cffi ABIs, constants), ``arch``/``arch_x86_64`` (registers, syscall
numbers, restart rule), ``maps`` (VMA parsing, classification, names), ``ptrace``
(stop/inject/release), ``freeze``, ``protect`` (work done during the pause), ``ledger``
(populated pages and who saved them), ``faults`` (fault path), ``scan`` (background copy),
``engine`` (orchestration), ``continuous`` (tracked incremental series), ``types`` (options,
results, progress, region specs: the public types), ``memory``,
``uffd``, ``pagemap``, ``priority``, ``context``, ``target_info``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "capture_process",
    "snapshot_next",
    "CaptureOptions",
    "CaptureResult",
    "Progress",
    "frozen",
    "stopped",
    "read_memory",
    "write_memory",
]

_WHERE = {
    "capture_process": "snapfs.capture.engine",
    "snapshot_next": "snapfs.capture.engine",
    "CaptureOptions": "snapfs.capture.types",
    "CaptureResult": "snapfs.capture.types",
    "Progress": "snapfs.capture.types",
    "frozen": "snapfs.capture.freeze",
    "stopped": "snapfs.capture.freeze",
    "read_memory": "snapfs.capture.memory",
    "write_memory": "snapfs.capture.memory",
}

if TYPE_CHECKING:
    from snapfs.capture.engine import capture_process, snapshot_next
    from snapfs.capture.types import CaptureOptions, CaptureResult, Progress
    from snapfs.capture.freeze import frozen, stopped
    from snapfs.capture.memory import read_memory, write_memory


def __getattr__(name: str) -> Any:
    # Lazy: importing snapfs.capture must not load cffi/numpy for unrelated commands.
    import importlib

    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(name)
