"""Inode numbers: computed, so they are stable for the life of the mount without a table.

``inode = slot << 40 | local``. A *slot* is given to each snapshot the first time the mount sees
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

A process-tree snapshot (kind ``tree``) uses 0 and 1 the same way, 2 for ``processes/``, 3 for
``shared/``, ``16 + 3*i + part`` for its shared object in region *i* (``shared/<object>/``,
``data``, ``info.json``), and gives its member *m* (``processes/<pid>-<comm>/``) the locals
``(m + 1) << 22 | l``, where ``l`` is the local the same node has in a process snapshot.

The root directory is inode 1 (slot 0, local 1).
"""

from __future__ import annotations

ROOT = 1
SLOT_SHIFT = 40
LOCAL_MASK = (1 << SLOT_SHIFT) - 1
MEMBER_SHIFT = 22  # a member's own locals: regions up to (2**22 - 16) / 3 per process
MEMBER_MASK = (1 << MEMBER_SHIFT) - 1
MAX_MEMBERS = (1 << (SLOT_SHIFT - MEMBER_SHIFT)) - 1

SNAP_DIR = 0
SNAP_INFO = 1
RAMBLOCKS = 2
MEM = 3
PROVIDER_BASE = 4
REGION_BASE = 16
REGION_DIR, REGION_DATA, REGION_INFO = 0, 1, 2
PROCESSES, SHARED = 2, 3  # in a tree snapshot, in place of ramblocks/ and mem


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


def member_base(member: int) -> int:
    """What member ``member`` of a tree snapshot adds to its nodes' locals."""
    return (member + 1) << MEMBER_SHIFT


def split_member(local: int) -> tuple[int | None, int]:
    """``(member, local within it)``, or ``(None, local)`` for a node of the snapshot itself."""
    if local <= MEMBER_MASK:
        return None, local
    return (local >> MEMBER_SHIFT) - 1, local & MEMBER_MASK
