"""Inode numbers: computed, so they are stable for the life of the mount without a table.

``inode = slot << 32 | local``. A *slot* is given to each snapshot the first time the mount sees
it and never reused (a snapshot removed and re-created under the same name gets a new slot, so
the kernel never confuses the two). ``local`` names the node inside the snapshot:

====================  =========================
0                     the snapshot directory
1                     ``info.json``
2                     ``ramblocks/``
3                     ``mem``
4 ..  15              provider views (``vmstate``, ``core``) in :data:`views.PROVIDERS` order
16 + 3*i + 0/1/2      region *i*: its directory, ``data``, ``info.json``
====================  =========================

The root directory is inode 1 (slot 0, local 1).
"""

from __future__ import annotations

ROOT = 1
SLOT_SHIFT = 32
LOCAL_MASK = (1 << SLOT_SHIFT) - 1

SNAP_DIR = 0
SNAP_INFO = 1
RAMBLOCKS = 2
MEM = 3
PROVIDER_BASE = 4
REGION_BASE = 16
REGION_DIR, REGION_DATA, REGION_INFO = 0, 1, 2


def pack(slot: int, local: int) -> int:
    """The inode of node ``local`` of the snapshot in ``slot``."""
    return (slot << SLOT_SHIFT) | local


def unpack(inode: int) -> tuple[int, int]:
    """``(slot, local)`` of an inode."""
    return inode >> SLOT_SHIFT, inode & LOCAL_MASK


def region_local(index: int, part: int) -> int:
    """``local`` of part ``part`` (REGION_DIR/DATA/INFO) of region ``index``."""
    return REGION_BASE + 3 * index + part


def split_region_local(local: int) -> tuple[int, int]:
    """``(region index, part)`` of a region node's ``local``."""
    return divmod(local - REGION_BASE, 3)
