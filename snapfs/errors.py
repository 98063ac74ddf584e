"""Error classes for expected failures.

Every expected condition (no such PID, not permitted, FUSE missing, store corrupt, disk
full, ...) is raised as a :class:`SnapfsError` subclass. The CLI prints ``snapfs: <message>``
on one line and exits with the class's ``exit_code``; tracebacks are only shown with
``SNAPFS_DEBUG=1``.
"""

from __future__ import annotations


class SnapfsError(Exception):
    """Base class: an expected failure with a one-line, actionable message."""

    exit_code = 1


class UsageError(SnapfsError):
    """Bad command-line input (bad name, bad size suffix, conflicting options)."""

    exit_code = 2


class TargetError(SnapfsError):
    """The target process cannot be snapshotted (gone, kernel thread, exited mid-capture)."""

    exit_code = 3


class RestoreRefused(TargetError):
    """``incoming --pid``: the process differs from the snapshot in what a restore cannot
    rewind, or its layout cannot be re-created; nothing was written."""


class PermissionDenied(SnapfsError):
    """ptrace or userfaultfd access refused; the message says what to grant."""

    exit_code = 4


class StoreError(SnapfsError):
    """The store is missing, locked, of an incompatible version, or out of space."""

    exit_code = 5


class StoreCorrupt(StoreError):
    """A checksum or structural check failed; the message names the location."""

    exit_code = 6


class SnapshotNotFound(StoreError):
    """No committed snapshot of that name."""

    exit_code = 7


class NameInUse(StoreError):
    """A snapshot of that name exists or is being captured."""

    exit_code = 8


class StreamError(SnapfsError):
    """A migration stream is malformed; the message names the byte offset."""

    exit_code = 9


class MountError(SnapfsError):
    """The FUSE mount cannot be set up (mountpoint, /dev/fuse, fusermount3)."""

    exit_code = 10


class QemuError(SnapfsError):
    """QEMU refused or failed a QMP request, or is in a state we must not touch."""

    exit_code = 11


def reported_error(group: BaseExceptionGroup) -> BaseException:
    """The one exception to report for a nursery's exception group.

    Ctrl-C first (whatever else failed then is a consequence of stopping), then the first
    expected failure (:class:`SnapfsError`: target exited, store full...); anything else
    is a bug, so the whole group is returned and its traceback shown.
    """
    for kind in (KeyboardInterrupt, SnapfsError):
        match, _ = group.split(kind)
        if match is not None:
            leaf: BaseException = match
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf
    return group
