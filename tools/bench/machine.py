"""A description of the machine a bench run happened on (for the report)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path


def _first(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"


def loadavg() -> list[float]:
    """The 1/5/15-minute load averages: other work running beside the bench shows here."""
    return [float(x) for x in _read("/proc/loadavg").split()[:3]]


def steal_s() -> float:
    """CPU-seconds the hypervisor has run something else on this VM's CPUs since boot
    (``/proc/stat`` steal): a stall the target measured while it grew was the host's, not
    the method's."""
    line = next((x for x in _read("/proc/stat").splitlines() if x.startswith("cpu ")), "")
    try:
        return int(line.split()[8]) / os.sysconf("SC_CLK_TCK")  # cpu user nice system ... steal
    except (IndexError, ValueError):
        return 0.0


def describe() -> dict:
    """CPU, cores, memory, kernel, hypervisor, THP mode, Python and zstd versions."""
    import numpy
    import zstandard

    hyper = "no"
    flags = _first("/proc/cpuinfo", "flags")
    if "hypervisor" in flags.split():
        vendor = _read("/sys/class/dmi/id/sys_vendor")
        hyper = f"yes ({vendor})" if vendor != "?" else "yes (hypervisor CPU flag)"
    mem_kib = int(_first("/proc/meminfo", "MemTotal").split()[0] or 0)
    return {
        "cpu": _first("/proc/cpuinfo", "model name"),
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "virtualized": hyper,
        "thp": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "clocksource": _read("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
        "python": sys.version.split()[0],
        "zstandard": zstandard.__version__,
        "numpy": numpy.__version__,
        "loadavg_start": loadavg(),
        "steal_s_start": steal_s(),
    }
