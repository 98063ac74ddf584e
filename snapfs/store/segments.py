"""Segment files: the one owner of the store's bulk bytes, and the key that names a frame.

A segment is ``SEGMENT_HEADER`` followed by frames (see ``_format.py``). Its life:

- **create**: a writer registers the segment in the catalog (that is the writer's business:
  the id comes from there), then :meth:`NewSegments.create` makes the file, mode 0600,
  ``O_EXCL``, and appends its header;
- **append**: one lane of the writer at a time, at increasing offsets, through an
  :class:`~snapfs.store._appender.Appender` (O_DIRECT from a thread of its own);
- **seal**: :meth:`NewSegments.seal` finishes the appends, gives back the blocks preallocated
  past the end and makes every byte durable; a sealed segment is never written again;
- **pread**: readers, ``check`` and ``gc`` read sealed segments through :meth:`SegmentFiles.pread`
  (a bounded cache of open fds);
- **punch**: gc frees a dead frame in place (:meth:`SegmentFiles.punch`); the offsets of live
  frames never move, so running readers are unaffected;
- **unlink**: gc deletes a segment nothing references, an aborted writer its own.

Nothing else in the store opens a segment file. A frame is named by its segment and offset;
where many frames are compared at once (commit's accounting, check) they are one integer,
:func:`frame_keys`: ``segment << 40 | offset`` (offsets stay below 2^40, segment ids below 2^23).

The seam for other backends (the object-store one on the roadmap): everything above this module
names bytes by (segment, offset, length) and calls only :class:`SegmentFiles` and
:class:`NewSegments`. Sealed segments are immutable, so on S3-compatible storage a segment maps
to one object: ``NewSegments`` writes it locally and ``seal`` uploads it (PUT, then the local copy
may go), ``pread`` is a ranged GET, ``listing`` a LIST of the store's prefix, ``unlink`` a
DELETE; ``punch`` may do nothing (space comes back when gc deletes the whole object, or by
copying its live frames into a new segment, which the catalog then points at).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from snapfs.errors import StoreCorrupt
from snapfs.store._appender import Appender
from snapfs.store._format import FRAME_HEADER, FRAME_MAGIC, segment_header
from snapfs.store._fsutil import Writeback, fsync_dir, preallocate, punch_hole

KEY_SHIFT = 40                        # frame key: segment << 40 | offset
OFFSET_MASK = (1 << KEY_SHIFT) - 1
OPEN_SEGMENTS = 64                    # segment fds kept open for readers (LRU)

_K = TypeVar("_K", int, np.ndarray)


def frame_keys(seg: Any, off: Any) -> np.ndarray:
    """Frame keys (int64) of frames at ``off`` in segments ``seg`` (arrays or scalars)."""
    return (np.asarray(seg, np.int64) << KEY_SHIFT) | np.asarray(off, np.int64)


def key_parts(key: _K) -> tuple[_K, _K]:
    """(segment, offset) of frame key(s) ``key``: an int or an int64 array."""
    return key >> KEY_SHIFT, key & OFFSET_MASK


class SegmentFiles:
    """The segment files of one store (``segments/`` in its directory). Thread-safe."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._fds: collections.OrderedDict[int, list[int]] = collections.OrderedDict()  # seg -> [fd, users]

    def path(self, seg: int) -> Path:
        """Path of segment ``seg`` (for messages and for tests that damage it on purpose)."""
        return self.directory / f"{seg:010d}.seg"

    def listing(self) -> dict[int, os.stat_result]:
        """Every segment file present: id -> its stat."""
        out = {}
        for entry in os.scandir(self.directory):
            stem, _, ext = entry.name.partition(".")
            if ext == "seg" and stem.isdigit():
                out[int(stem)] = entry.stat()
        return out

    def writing(self) -> "NewSegments":
        """The segments of one writer, from creation to sealing (or discarding)."""
        return NewSegments(self)

    def pread(self, seg: int, offset: int, length: int) -> bytes:
        """pread from segment ``seg`` through a bounded cache of open fds.

        StoreCorrupt if the segment file is missing. An fd is only closed (LRU eviction, or
        gc deleting the segment) when no read is using it, so fd numbers are never reused
        under a running pread.
        """
        with self._lock:
            entry = self._fds.get(seg)
            if entry is None:
                try:
                    fd = os.open(self.path(seg), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise StoreCorrupt(f"segment {self.path(seg)} is missing: "
                                       "run `snapfs check` to see which snapshots are affected") from None
                entry = self._fds[seg] = [fd, 0]
                self._evict()
            self._fds.move_to_end(seg)
            entry[1] += 1
        try:
            return os.pread(entry[0], length, offset)
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0 and self._fds.get(seg) is not entry:
                    os.close(entry[0])          # evicted or forgotten while we read

    def _evict(self) -> None:
        """Close least recently used idle fds beyond OPEN_SEGMENTS (call with _lock held)."""
        for seg in list(self._fds):
            if len(self._fds) <= OPEN_SEGMENTS:
                break
            entry = self._fds[seg]
            if entry[1] == 0:
                del self._fds[seg]
                os.close(entry[0])

    def _forget(self, seg: int) -> None:
        """Close our fd of a deleted segment (once no read uses it)."""
        with self._lock:
            entry = self._fds.pop(seg, None)
            if entry is not None and entry[1] == 0:
                os.close(entry[0])

    def punch(self, seg: int, frames: Iterable[tuple[int, int]]) -> int:
        """Free the blocks of frames (offset, length) of sealed segment ``seg``; returns the
        bytes freed. A range that does not hold exactly one frame of ``seg`` (a damaged frame
        index row) is left alone, as is a missing segment (check reports it)."""
        try:
            fd = os.open(self.path(seg), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        freed = 0
        try:
            for off, flen in frames:
                header = os.pread(fd, FRAME_HEADER.size, off)
                if len(header) < FRAME_HEADER.size:
                    continue
                magic, _, _, _, _, payload_len, sid, _ = FRAME_HEADER.unpack(header)
                if magic == FRAME_MAGIC and sid == seg and FRAME_HEADER.size + payload_len == flen \
                        and punch_hole(fd, off, flen):
                    freed += flen
        finally:
            os.close(fd)
        return freed

    def unlink(self, seg: int) -> int:
        """Delete segment ``seg`` (if present); returns the bytes it occupied on disk."""
        path = self.path(seg)
        freed = 0
        try:
            freed = os.stat(path).st_blocks * 512
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._forget(seg)
        return freed

    def close(self) -> None:
        """Close every cached fd (reads after this reopen them)."""
        with self._lock:
            fds, self._fds = self._fds, collections.OrderedDict()
        for fd, _ in fds.values():
            os.close(fd)


class NewSegment:
    """A segment being appended by one writer: its lanes reserve space and append frames."""

    def __init__(self, seg_id: int, fd: int, writeback: Writeback) -> None:
        self.id = seg_id
        self.fd = fd
        self.size = 0               # bytes reserved so far (appends may still be in flight)
        self.prealloc = 0           # blocks reserved (KEEP_SIZE) up to here; seal trims the rest
        self.app = Appender(fd, writeback)

    def append(self, offset: int, buffers: list) -> None:
        """Write ``buffers`` back to back at ``offset`` (reserved, and the current end)."""
        self.app.append(offset, buffers)

    def preallocate(self, offset: int, length: int) -> None:
        """Reserve blocks for [offset, offset+length) ahead of the appends (best effort)."""
        preallocate(self.fd, offset, length)

    def finish(self) -> None:
        """No more appends: write what is staged and raise a background write's error."""
        self.app.finish()


class NewSegments:
    """The segments one writer creates: create, seal all at commit, or discard all at abort."""

    def __init__(self, files: SegmentFiles) -> None:
        self._files = files
        self._writeback = Writeback()
        self.created: list[NewSegment] = []

    def create(self, seg_id: int) -> NewSegment:
        """Make segment file ``seg_id`` (already registered in the catalog) and append its header."""
        fd = os.open(self._files.path(seg_id), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        seg = NewSegment(seg_id, fd, self._writeback)
        self.created.append(seg)
        header = segment_header(seg_id)
        seg.size = len(header)
        seg.append(0, [header])
        return seg

    def seal(self) -> None:
        """Make every byte of every segment durable and trim it to its size (OSError if not)."""
        for seg in self.created:
            seg.finish()
        error = self._writeback.close()
        if error is not None:
            raise error
        for seg in self.created:
            os.ftruncate(seg.fd, seg.size)      # gives back preallocated blocks past the end
            os.fsync(seg.fd)
        if self.created:
            fsync_dir(self._files.directory)

    def give_back_space(self) -> None:
        """On a full disk: empty every segment now. Truncated, not closed: other threads may
        still hold their fds."""
        for seg in list(self.created):
            try:
                os.ftruncate(seg.fd, 0)
            except OSError:
                pass

    def discard(self) -> None:
        """Delete every segment file (an aborted writer; what is left, gc deletes)."""
        self._writeback.close()
        for seg in self.created:
            try:
                os.unlink(self._files.path(seg.id))
            except OSError:
                pass

    def close(self) -> None:
        """Stop the I/O threads and close the fds (after seal or discard)."""
        self._writeback.close()                 # its thread must not outlive the fds
        for seg in self.created:
            seg.app.close()                     # nor may the segments' I/O threads
            try:
                os.close(seg.fd)
            except OSError:
                pass
        self.created = []
