"""File names in the mount: percent-encoding of block and snapshot names.

Names come from the target (QEMU RAMBlock ids such as ``/rom@etc/acpi/tables``, file basenames)
and may hold characters a directory entry cannot: ``/`` and NUL. Those, and ``%`` itself so the
encoding stays reversible, are written as ``%XX``. ``.``, ``..`` and the empty name are encoded
whole so they never collide with the directory's own entries.
"""

from __future__ import annotations

import re

MAX_NAME_BYTES = 255  # NAME_MAX of every Linux filesystem
_ESCAPE = re.compile(r"[%/\x00]")
_UNESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def encode_name(name: str) -> str:
    """``name`` as a valid directory entry: ``/``, ``%`` and NUL become ``%2F``, ``%25``, ``%00``."""
    if name in ("", ".", ".."):
        return "".join(f"%{ord(c):02X}" for c in name) or "%00"
    return _ESCAPE.sub(lambda m: f"%{ord(m.group()):02X}", name)


def decode_name(entry: str) -> str:
    """The inverse of :func:`encode_name`."""
    if entry == "%00":
        return ""
    return _UNESCAPE.sub(lambda m: chr(int(m.group(1), 16)), entry)


def unique_entries(names: list[str]) -> list[str]:
    """Encode ``names`` into distinct entries of at most 255 bytes, keeping their order.

    Names are unique by contract; a duplicate or an over-long name still gets a usable entry
    (``<name>~<position>``) rather than hiding a region.
    """
    out: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        entry = encode_name(name)
        if len(entry.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES or entry in seen:
            suffix = f"~{i}"
            raw = entry.encode("utf-8", "surrogateescape")[: MAX_NAME_BYTES - len(suffix)]
            entry = raw.decode("utf-8", "ignore") + suffix
        seen.add(entry)
        out.append(entry)
    return out
