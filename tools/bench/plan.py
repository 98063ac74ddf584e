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
    # The stall rows (tools/bench/stalls.py): snapfs and the fork peer at every rate > 0 for
    # each writer-thread count and THP mode; the JVM-like target; many mappings; throughput.
    thread_counts: list[int] = field(default_factory=lambda: [1, 4, 16])
    thp_modes: list[bool] = field(default_factory=lambda: [False, True])
    matrix_rates: list[float] | None = None  # None: every rate of ``rates`` above 0
    jvm_size: int = 3 * GiB
    jvm_writers: int = 16
    jvm_idle_threads: int = 200
    jvm_gc_rate: float = 20
    jvm_write_rate: float = 50000
    mappings: int = 65000
    mappings_size: int = 1 * GiB
    throughput_sizes: list[int] = field(default_factory=lambda: [1 * GiB, 4 * GiB])
    throughput_rounds: int = 2
    # Stop cost by thread count (tools/bench/stopcost.py): idle threads beside the main one
    stopcost_threads: tuple[int, ...] = (0, 255)
    stopcost_size: int = 256 * MiB
    stopcost_rounds: int = 5
    every_children: int = 3          # --every children per incremental target
    every_period_s: float = 4.0      # --every period of the memwriter series (the Python one: half)
    python_target_size: int = 300 * MiB
    # Process trees (tools/bench/tree.py): processes, shared and private MiB, writes/s each
    tree_procs: int = 4
    tree_shared_mib: int = 256
    tree_private_mib: int = 128
    tree_rate: float = 10000

    def to_json(self) -> dict:
        """Plain dict for results.json."""
        return asdict(self)


def quick() -> Plan:
    """Small target, few rates: the whole bench in well under 3 minutes."""
    return Plan(mode="quick", size=64 * MiB, rates=[0, 20000, -1], snapfs_rate_limits=["64M"],
                limit_write_rate=20000, settle_s=0.3, precopy_max_rounds=5,
                qemu_mem=96 * MiB, readpath_size=32 * MiB, variants={"THP": {"thp": True}},
                thread_counts=[1, 4], matrix_rates=[20000], jvm_size=128 * MiB, jvm_writers=4,
                jvm_idle_threads=40, jvm_write_rate=20000, mappings=4000, mappings_size=64 * MiB,
                throughput_sizes=[64 * MiB], throughput_rounds=1, every_children=2,
                every_period_s=1.5, python_target_size=32 * MiB, stopcost_size=64 * MiB,
                stopcost_rounds=2,
                tree_procs=2, tree_shared_mib=8, tree_private_mib=8)


def full() -> Plan:
    """1 GiB target, write rates from 0 to as fast as possible (~10-15 minutes)."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return Plan(mode="full", size=1 * GiB, rates=[0, 1000, 10000, 100000, 1000000, -1],
                snapfs_rate_limits=["100M", "300M"], limit_write_rate=10000,
                qemu_mem=1 * GiB, readpath_size=1 * GiB,
                variants=full_variants(),
                throughput_sizes=[1 * GiB, 4 * GiB] if available >= 12 * GiB else [1 * GiB])


def full_variants() -> dict[str, dict]:
    """snapfs-only variants of the full run: a hot set (thread counts, THP and 4 GiB have rows
    of their own in stalls.py)."""
    return {"hot set 10%/90%": {"access": "hot:0.1:0.9"}}


def rate_label(rate: float) -> str:
    """0, 1k, 10k, 1M, max."""
    if rate < 0:
        return "max"
    for div, suffix in ((1_000_000, "M"), (1000, "k")):
        if rate >= div and rate % div == 0:
            return f"{int(rate // div)}{suffix}"
    return str(int(rate))
