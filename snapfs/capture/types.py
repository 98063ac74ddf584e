"""The capture engine's public types: what to capture (:class:`CaptureOptions`), what the
progress callback gets (:class:`Progress`), what a capture returns (:class:`CaptureResult`),
and how a VMA is declared to the store (:func:`region_spec`).

Their own module so that the engine, continuous snapshots and tree captures share them
without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from snapfs.capture.maps import Vma


@dataclass
class CaptureOptions:
    """How to capture (see ``snapfs snapshot --help``)."""

    rate: float | None = None  # bytes/s for the background scan; None = unlimited
    include_readonly: bool = False
    parent: str | None = None
    workers: int = 0  # compression threads; 0 = number of CPUs
    # Stay attached and track writes after the capture (``snapfs snapshot --every``): the
    # result's ``tracking`` then takes incremental children (snapfs.capture.continuous).
    continuous: bool = False


@dataclass
class Progress:
    """Passed to the ``progress`` callback about 5 times a second."""

    done_bytes: int
    total_bytes: int
    faults: int
    elapsed_s: float

    @property
    def rate(self) -> float:
        return self.done_bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        r = self.rate
        return (self.total_bytes - self.done_bytes) / r if r > 0 else None


@dataclass
class CaptureResult:
    """What ``capture_process`` returns (the figures ``snapfs snapshot`` prints)."""

    name: str
    pid: int
    comm: str
    pause_ms: float  # the freeze (the snapshot instant)
    duration_s: float
    resident_bytes: int
    zero_bytes: int
    stored_bytes: int
    faults: int
    region_count: int  # regions in the snapshot
    warnings: list[str] = field(default_factory=list)
    info: Any = None  # the committed SnapshotInfo
    tracking: Any = None  # with CaptureOptions.continuous: a continuous.Tracking (close it)
    attach_pause_ms: float = 0.0  # the earlier short stop that took the uffd
    huge_restored_bytes: int = 0  # THP ranges split by the capture and mapped huge again
    switch_pause_ms: float = 0.0  # continuous mode: the later stop that started async tracking
    # When each phase ran, in time.monotonic() seconds (CLOCK_MONOTONIC, the clock a target
    # can time its own stalls with): "attach" and "freeze" are [stop, resume], "preprotect"
    # lies between them, the background copy from the freeze's resume to "end".
    phases: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The ``--json`` object."""
        return {
            "name": self.name,
            "pid": self.pid,
            "comm": self.comm,
            "pause_ms": round(self.pause_ms, 3),
            "attach_pause_ms": round(self.attach_pause_ms, 3),
            "duration_s": round(self.duration_s, 3),
            "resident_bytes": self.resident_bytes,
            "zero_bytes": self.zero_bytes,
            "stored_bytes": self.stored_bytes,
            "faults": self.faults,
            "regions": self.region_count,
            "warnings": list(self.warnings),
            "huge_restored_bytes": self.huge_restored_bytes,
            "switch_pause_ms": round(self.switch_pause_ms, 3),
            "phases": {k: [round(x, 6) for x in v] if isinstance(v, list) else round(v, 6)
                       for k, v in self.phases.items()},
        }


def region_spec(v: Vma):
    """The store's RegionSpec for a captured VMA."""
    from snapfs.store import RegionSpec

    meta = dict(v.meta, mode=v.mode)
    if v.inode:
        meta.update(dev=f"{v.dev[0]:x}:{v.dev[1]:x}", inode=v.inode)
    return RegionSpec(
        name=v.name,
        start=v.start,
        length=v.length,
        perms=v.perms,
        offset=v.offset,
        path=v.path or None,
        kind=v.kind,
        page_size=v.page_size,
        meta=meta,
    )
