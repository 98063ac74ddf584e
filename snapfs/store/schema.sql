-- snapfs page store catalog, format version 2 (SQLite, WAL mode, synchronous=FULL).
--
-- Every row that decides what a read returns carries `crc`, a checksum of its columns (and of
-- its blob's decoded bytes), verified on load: see _integrity.py. Version 1 had none of these
-- columns; they are appended by the upgrade (ALTER TABLE ADD COLUMN), so both look alike.
--
-- A snapshot row is inserted as 'pending' by begin_snapshot (this reserves the name) and flipped
-- to 'committed' in the single transaction that also inserts its frames, regions and references,
-- after every segment it wrote has been fsynced. Readers only ever look at committed rows.

-- Monotonic counters. 'generation' is bumped by every transaction that changes the committed
-- set (commit, remove), so a mount can notice new/removed snapshots with one cheap query.
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters VALUES ('generation', 0);

CREATE TABLE IF NOT EXISTS snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: segments name their writer id
    name        TEXT NOT NULL UNIQUE,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'committed')),
    lock        TEXT,             -- pending: file under locks/ that the live writer holds flock on
    parent_id   INTEGER,          -- may name a removed snapshot: frames are shared, not owned
    parent_name TEXT,
    created     REAL NOT NULL,    -- unix time of begin_snapshot
    info        TEXT NOT NULL DEFAULT '{}', -- JSON: the remaining SnapshotInfo fields
    crc         INTEGER           -- committed rows: over id, name, state, parents, created, info
);

-- Append-only data files segments/<id>.seg, written by one writer, never rewritten after
-- the writer commits ('sealed'); gc only deletes whole segments or punches holes in dead frames.
CREATE TABLE IF NOT EXISTS segments (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    writer_id INTEGER NOT NULL,   -- the snapshot whose writer created it
    state     TEXT NOT NULL CHECK (state IN ('pending', 'sealed')),
    size      INTEGER             -- bytes at seal time
);

-- Every committed frame: (seg, off) is its identity and location; flen = header + payload.
CREATE TABLE IF NOT EXISTS frames (
    seg    INTEGER NOT NULL,
    off    INTEGER NOT NULL,
    flen   INTEGER NOT NULL,
    npages INTEGER NOT NULL,
    owner  INTEGER NOT NULL,      -- snapshot id that wrote it (stored vs shared accounting)
    PRIMARY KEY (seg, off)
) WITHOUT ROWID;

-- Regions of a snapshot with their run map (see _runs.py), loaded lazily by readers.
CREATE TABLE IF NOT EXISTS regions (
    snapshot_id INTEGER NOT NULL,
    idx         INTEGER NOT NULL,
    name        TEXT NOT NULL,
    start       INTEGER NOT NULL,
    length      INTEGER NOT NULL,
    perms       TEXT NOT NULL,
    offset      INTEGER NOT NULL,
    path        TEXT,
    kind        TEXT NOT NULL,
    page_size   INTEGER NOT NULL,
    data_pages  INTEGER NOT NULL,
    zero_pages  INTEGER NOT NULL,
    meta        TEXT NOT NULL,    -- JSON
    nruns       INTEGER NOT NULL,
    map         BLOB NOT NULL,    -- zstd(runs array)
    map_crc     INTEGER,          -- CRC32 of the runs array (checked when the map is loaded)
    crc         INTEGER,          -- over every column but map (map_crc stands for it)
    PRIMARY KEY (snapshot_id, idx)
);

-- Per-page 64-bit content hashes (0 = not a data page), in chunks of 2^20 pages, so a child
-- can compare its pages with its parent's without decompressing the parent (_pagehash.py).
CREATE TABLE IF NOT EXISTS hashes (
    snapshot_id INTEGER NOT NULL,
    region_idx  INTEGER NOT NULL,
    chunk       INTEGER NOT NULL,
    algo        TEXT NOT NULL,    -- 'xxh3-64' or 'blake2b-64': only equal algorithms are compared
    data        BLOB NOT NULL,    -- zstd(uint64 little-endian array)
    crc         INTEGER,          -- over the key, algo and the decoded array
    PRIMARY KEY (snapshot_id, region_idx, chunk)
);

-- Which segments a snapshot (committed, or pending with a parent) references: gc keeps those.
CREATE TABLE IF NOT EXISTS seg_refs (
    snapshot_id INTEGER NOT NULL,
    seg         INTEGER NOT NULL,
    PRIMARY KEY (snapshot_id, seg)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seg_refs_by_seg ON seg_refs (seg);

-- Opaque per-snapshot byte strings (VM device state...), zstd-compressed.
CREATE TABLE IF NOT EXISTS blobs (
    snapshot_id INTEGER NOT NULL,
    name        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    data        BLOB NOT NULL,
    crc         INTEGER,          -- over the key, size and the decoded bytes
    PRIMARY KEY (snapshot_id, name)
);
