"""The page store: durable, checksummed, compressed snapshots with incremental chains.

Public surface (the contract in docs/architecture.md): :class:`Store`, :class:`SnapshotWriter`,
:class:`SnapshotReader`, :class:`SnapshotInfo`, :class:`RegionSpec`, :class:`RegionInfo`, and
the run kinds HOLE/ZERO/DATA. Modules: ``store`` (open, catalog access, list/info/remove),
``writer``, ``reader``, ``maintenance`` (gc, check), ``segments`` (the one owner of segment
files, and the frame key; the seam for other backends), ``_format`` (frame and segment records),
``_runs`` (page maps), ``_integrity`` (catalog row checksums, the format 1 upgrade),
``_pagehash``, ``_fsutil`` (durability helpers), ``schema.sql`` (the catalog, commented). A synthetic writer for tests is ``tests/support/synthetic.py``.

On-disk layout (format version 2; version 1, without catalog checksums, is read and upgraded)::

    STORE/                      0700; every file 0600, created so (umask 077 + explicit modes)
      README                    what this directory is
      config.json               {"format": "snapfs-store", "version": 2, "compression_level",
                                 "frame_size", "segment_max_bytes"}; written last on creation
      catalog.sqlite(-wal,-shm) SQLite, WAL, synchronous=FULL: snapshots, segments, frames,
                                 regions (+ page maps), hashes, seg_refs, blobs (schema.sql)
      segments/NNNNNNNNNN.seg   32-byte header, then frames; append-only, one writer each,
                                 rotated at 1 GiB; never rewritten (gc deletes or punches holes)
      locks/<uuid>.lock         flock held by a live writer

Design decisions and why:

* **Frames** hold up to 32 pages (128 KiB = one FUSE read), zstd level 1 by default (the
  capture must not wait for compression: on this machine level 1 ran ~550 MB/s per core on
  synthetic page data, level 3 ~190 MB/s for about the same ratio), or raw when zstd saves
  less than 1/32. A 32-byte header (magic, codec, npages, raw and payload length,
  segment id, CRC32 chained over payload then header) makes each frame independently
  verifiable and decodable: a damaged frame costs exactly its pages, and a reader reports
  StoreCorrupt naming segment, offset, snapshot and region — never wrong bytes.
* **Catalog rows are checksummed** too (``_integrity``): snapshot and region rows, page maps,
  page hashes and blobs each carry a CRC over their columns and decoded bytes, verified on
  load, because SQLite checks nothing inside a row and a damaged zstd blob may still decode.
* **Zero pages and holes cost no data**: per region a page map of runs (numpy structured
  array, 31 bytes a run, zstd-compressed in the catalog): DATA runs point at (segment,
  offset, slot) directly, so a read needs no frame-table lookup; ZERO runs; uncovered pages
  are HOLES. A 64 GiB region of contiguous data is ~512 K runs (~16 MB raw, a few MB
  compressed), loaded lazily on a region's first read, never all at open.
* **Writer concurrency**: put_pages runs zero detection (numpy), hashing and compression in
  the calling thread; a lock only reserves the segment offset (pwrite happens outside it).
  Small out-of-order puts (fault path: single pages, THPs) are pooled into one bounded
  buffer (< 32 pages) and written as full frames.
  Large puts compress up to 32 frames, reserve their space once and write them with one
  append; segments are preallocated 32 MiB ahead and appended with O_DIRECT
  (``_appender``: frames are staged into reused 1 MiB buffers that a thread per open segment
  writes, so no page-cache page is allocated and commit's fsync has only the device flush
  left; buffered writes with background writeback where O_DIRECT is refused); commit
  writes each staged tail and trims the preallocation before the fsync.
* **Atomic publication**: begin_snapshot reserves the name with a 'pending' row tied to a
  lock file; commit fsyncs every segment and the segments directory, then ONE SQLite
  transaction inserts frames/regions/hashes/references and flips the row to 'committed' and
  bumps the generation counter. A crash at any instant leaves a pending row whose lock is no
  longer held plus segment files: invisible, reclaimed by gc. list/info/open see only
  committed rows. SQLite (rather than a hand-written log) gives us atomic multi-table commits,
  concurrent readers during a commit (WAL), an integrity check, and indexes for free.
* **Incrementals** share frames, never copy them: a child's maps point at its ancestors'
  frames. Content comparison uses a per-page 64-bit hash table stored per region (XXH3 via
  libxxhash, blake2b fallback; algorithm recorded) so the parent is never decompressed;
  inherit() copies the parent's runs and hashes for a page range. Removing a parent keeps
  children readable: frames live while any map references them (seg_refs per snapshot, and
  live pending writers pin their parent's segments; removing the parent of a running capture
  is refused).
* **gc** (one catalog transaction, files touched after it commits): removes dead writers'
  pending rows, deletes segments nobody references, punches holes (fallocate PUNCH_HOLE) for
  dead frames in live segments so offsets stay valid for running readers. Frames are the unit
  of reclamation: a frame with one live page stays whole.
* **Disk full** (ENOSPC/EDQUOT) fails the writer with a StoreError naming the store and
  asking to free space; its segments are truncated at once and the snapshot aborted.
"""

from snapfs.store.model import DATA, HOLE, ZERO, RegionInfo, RegionSpec, SnapshotInfo
from snapfs.store.reader import SnapshotReader
from snapfs.store.store import Store
from snapfs.store.writer import SnapshotWriter

__all__ = ["Store", "SnapshotWriter", "SnapshotReader", "SnapshotInfo", "RegionSpec", "RegionInfo",
           "HOLE", "ZERO", "DATA"]
