"""Parsing and formatting of sizes, rates and durations for the CLI."""

from __future__ import annotations

import re

from snapfs.errors import UsageError

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse ``"200M"``, ``"1.5G"``, ``"4096"``, ``"64KiB"`` into bytes (binary suffixes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?(?:/s)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"bad size {text!r}: use a number with an optional K/M/G/T suffix, e.g. 200M")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value <= 0:
        raise UsageError(f"bad size {text!r}: must be positive")
    return int(value)


def parse_duration(text: str) -> float:
    """Parse ``"30s"``, ``"5m"``, ``"1h"``, ``"250ms"`` or plain seconds into seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise UsageError(f"bad duration {text!r}: use e.g. 30s, 5m, 1h")
    scale = {"ms": 1e-3, "s": 1.0, None: 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]
    value = float(m.group(1)) * scale
    if value <= 0:
        raise UsageError(f"bad duration {text!r}: must be positive")
    return value


def format_bytes(n: float) -> str:
    """Human size with binary units: ``3.1 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_rate(bytes_per_s: float) -> str:
    """Human decimal rate, as ``dd`` prints it: ``1.6 GB/s``."""
    for unit in ("B/s", "kB/s", "MB/s", "GB/s"):
        if bytes_per_s < 1000 or unit == "GB/s":
            return f"{bytes_per_s:.1f} {unit}"
        bytes_per_s /= 1000
    raise AssertionError("unreachable")


def format_count(n: int) -> str:
    """Thousands separated by a thin space, as in ``1 873``."""
    return f"{n:,}".replace(",", " ")


def count_of(n: int, noun: str, plural: str | None = None) -> str:
    """``1 snapshot``, ``2 snapshots``, ``1 873 write faults`` (``plural`` when not noun + s)."""
    return f"{format_count(n)} {noun if n == 1 else plural or noun + 's'}"
