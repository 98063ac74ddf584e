"""What a bench run measures: the quick plan (smoke test, < 3 min) and the full plan."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

MiB = 1 << 20
GiB = 1 << 30


@dataclass
class Plan:
    """Target size, write rates (pages/s, -1 = as fast as possible) and peer settings."""

    mode: str
    size: int
    rates: list[float]
    snapfs_rate_limits: list[str]        # extra snapfs runs with --rate, at limit_write_rate
    limit_write_rate: float
    writer_threads: int = 1              # leaves the other vCPU to the snapshotter
    compress_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    settle_s: float = 1.0                # undisturbed window before each run ("before")
    precopy_max_rounds: int = 10
    precopy_max_downtime_s: float = 0.05
    qemu_mem: int = 256 * MiB
    qemu_guest_rate: float = 20000       # guest page writes/s (approximate, measured)
    readpath_size: int = 64 * MiB
    # Extra snapfs-only targets at limit_write_rate: label -> TargetSpec overrides
    variants: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        """Plain dict for results.json."""
        return asdict(self)


def quick() -> Plan:
    """Small target, few rates: the whole bench in well under 3 minutes."""
    return Plan(mode="quick", size=64 * MiB, rates=[0, 20000, -1], snapfs_rate_limits=["64M"],
                limit_write_rate=20000, settle_s=0.3, precopy_max_rounds=5,
                qemu_mem=96 * MiB, readpath_size=32 * MiB, variants={"THP": {"thp": True}})


def full() -> Plan:
    """1 GiB target, write rates from 0 to as fast as possible (~10-15 minutes)."""
    return Plan(mode="full", size=1 * GiB, rates=[0, 1000, 10000, 100000, 1000000, -1],
                snapfs_rate_limits=["100M", "300M"], limit_write_rate=10000,
                qemu_mem=1 * GiB, readpath_size=1 * GiB,
                variants=full_variants())


def full_variants() -> dict[str, dict]:
    """snapfs-only variants of the full run: THP, 4 writers, a hot set, and 4 GiB where memory
    allows (the target plus room for the store's page cache and the other peers)."""
    variants: dict[str, dict] = {"THP": {"thp": True}, "4 writer threads": {"threads": 4},
                                 "hot set 10%/90%": {"access": "hot:0.1:0.9"}}
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if available >= 12 * GiB:
        variants["4 GiB"] = {"size": 4 * GiB}
    return variants


def rate_label(rate: float) -> str:
    """0, 1k, 10k, 1M, max."""
    if rate < 0:
        return "max"
    for div, suffix in ((1_000_000, "M"), (1000, "k")):
        if rate >= div and rate % div == 0:
            return f"{int(rate // div)}{suffix}"
    return str(int(rate))
