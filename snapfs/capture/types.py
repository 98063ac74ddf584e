"""The capture engine's public types: what to capture (:class:`CaptureOptions`), what the
progress callback gets (:class:`Progress`), what a capture returns (:class:`CaptureResult`),
and how a VMA is declared to the store (:func:`region_spec`).

Their own module so that the engine, continuous snapshots and tree captures share them
without importing one another.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from snapfs.capture.maps import Vma


@dataclass
class CaptureOptions:
    """How to capture (see ``snapfs snapshot --help``)."""

    rate: float | None = None  # bytes/s for the background scan; None = unlimited
    # After this many seconds of throttled scan, the rest is copied at full speed: a low
    # rate must not keep the target write-protected (every write a fault) for hours.
    rate_deadline: float = 600.0
    include_readonly: bool = False
    parent: str | None = None
    workers: int = 0  # compression threads; 0 = number of CPUs
    # Stay attached and track writes after the capture (``snapfs snapshot --every``): the
    # result's ``tracking`` then takes incremental children (snapfs.capture.continuous).
    continuous: bool = False
    # The name is snapfs's default (<comm>-<pid>-<time>, one-second resolution): when it is
    # taken, the store numbers it (<name>-2, -3, ...) instead of refusing.
    number_if_taken: bool = False


@dataclass
class Progress:
    """Passed to the ``progress`` callback about 5 times a second."""

    done_bytes: int  # pages saved so far (the pause's copies, the scan's, the faults')
    total_bytes: int
    faults: int  # write faults served so far, the native loop's included
    elapsed_s: float
    rate: float | None = None  # bytes/s over the last few seconds; None for the first second

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the recent rate (None while it is not known yet)."""
        if not self.rate:
            return None
        return max(0, self.total_bytes - self.done_bytes) / self.rate


class RecentRate:
    """Bytes per second over the last ``window`` seconds, None until ``warmup`` seconds of
    samples exist. An average since the start would count the pages copied in the pause
    and the first burst of faults (a rate 3x the --rate limit at first) and keep the ETA
    short while the copy slows down."""

    def __init__(self, window: float = 3.0, warmup: float = 1.0) -> None:
        self.window, self.warmup = window, warmup
        self.samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, t: float, done: int) -> float | None:
        """Record ``done`` bytes at time ``t``; return the recent rate."""
        self.samples.append((t, done))
        while len(self.samples) > 2 and t - self.samples[1][0] >= self.window:
            self.samples.popleft()
        t0, d0 = self.samples[0]
        return (done - d0) / (t - t0) if t - t0 >= self.warmup else None


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
    # A tracked child (``--every``): the pages it read (written since its parent) and the
    # parent it inherits the rest from; None for a capture that reads everything.
    copied_bytes: int | None = None
    parent: str | None = None

    @property
    def inherited_bytes(self) -> int:
        """Resident pages taken from the parent without reading them (0 unless a child)."""
        return 0 if self.copied_bytes is None else max(0, self.resident_bytes - self.copied_bytes)

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
            "copied_bytes": self.resident_bytes if self.copied_bytes is None else self.copied_bytes,
            "inherited_bytes": self.inherited_bytes,
            "parent": self.parent,
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
