"""On-disk records of a segment file: the segment header and the frame header.

A segment is ``SEGMENT_HEADER`` followed by frames, appended, never rewritten after commit.
A frame is ``FRAME_HEADER`` + payload; the payload is the concatenation of ``npages`` 4 KiB
pages, zstd-compressed (CODEC_ZSTD) or raw (CODEC_RAW) when compression did not pay. The CRC32
covers the header (with its crc field zeroed) and the payload, so any flipped byte is caught.
Every frame is independently decodable: a reader needs only (segment, offset).
"""

from __future__ import annotations

import struct
import threading
import zlib
from typing import Any

import numpy as np
import zstandard

from snapfs import native
from snapfs.store.model import STORE_PAGE

FRAME_PAGES = 32                      # 128 KiB of page data per frame (one FUSE read)
SEGMENT_MAX_BYTES = 1 << 30           # rotate segments at 1 GiB (maps to objects later)

SEGMENT_MAGIC = b"SNPFSSEG"
SEGMENT_VERSION = 1
# magic, version, segment id, reserved
SEGMENT_HEADER = struct.Struct("<8sIQ12x")
assert SEGMENT_HEADER.size == 32

FRAME_MAGIC = b"SNFR"
CODEC_RAW = 0
CODEC_ZSTD = 1
# magic, codec, reserved, npages, raw_len, payload_len, segment id, crc32
FRAME_HEADER = struct.Struct("<4sBBHIIQI4x")
assert FRAME_HEADER.size == 32


class FrameError(Exception):
    """A frame failed a structural or checksum test; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_tls = threading.local()

# libdeflate's CRC32 (same polynomial and chaining as zlib.crc32) uses carry-less multiply:
# ~11 GB/s here against zlib's ~4 GB/s. The store's C helpers find it; the call releases the GIL.
_ext = native.load("snapfs.store._native")
_ffi, _lib = _ext.ffi, _ext.lib
_deflate_crc32 = bool(_lib.snapfs_crc32_available())


def crc32(data: bytes | memoryview, value: int = 0) -> int:
    """zlib-compatible CRC32 of ``data`` continuing from ``value`` (libdeflate when present)."""
    if not _deflate_crc32 or len(data) < 4096:
        return zlib.crc32(data, value)
    return int(_lib.snapfs_crc32(value, _ffi.from_buffer(data), len(data)))


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; one per thread and level (compress releases the GIL).
    cache = getattr(_tls, "cctx", None)
    if cache is None:
        cache = _tls.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_tls, "dctx", None)
    if dctx is None:
        dctx = _tls.dctx = zstandard.ZstdDecompressor()
    return dctx


def segment_header(segment_id: int) -> bytes:
    """The 32-byte header that starts segment ``segment_id``."""
    return SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, segment_id)


def check_segment_header(data: bytes, segment_id: int) -> None:
    """Raise :class:`FrameError` unless ``data`` is the header of segment ``segment_id``."""
    if len(data) < SEGMENT_HEADER.size:
        raise FrameError("segment header truncated")
    magic, version, sid = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC or version != SEGMENT_VERSION or sid != segment_id:
        raise FrameError("bad segment header")


def compress_payload(pages: memoryview | bytes, level: int) -> tuple[int, bytes | memoryview, int]:
    """(codec, payload, crc32 of payload) for a frame's pages; raw when zstd does not save 1/32."""
    raw = memoryview(pages)
    comp = _compressor(level).compress(raw)
    if len(comp) < len(raw) - len(raw) // 32:
        return CODEC_ZSTD, comp, crc32(comp)
    return CODEC_RAW, raw, crc32(raw)


# One call compresses a batch of frames with the GIL released (C backend; experimental in
# python-zstandard, hence the fallback to frame by frame).
_multi = _deflate_crc32 and hasattr(zstandard.ZstdCompressor, "multi_compress_to_buffer")


def compress_frames(raw: memoryview, frame_bytes: int, level: int) -> list[tuple[int, Any, int]]:
    """:func:`compress_payload` of each ``frame_bytes`` frame of ``raw`` (a whole number of
    them), the same frames, in two calls that release the GIL (zstd for all the frames, then
    every CRC): frame by frame, each frame gave the GIL up and took it back twice, and during
    a capture five threads want it."""
    raw = memoryview(raw).cast("B")
    nframes = len(raw) // frame_bytes
    if len(raw) != nframes * frame_bytes:
        raise ValueError(f"compress_frames: {len(raw)} bytes is not a whole number of {frame_bytes}-byte frames")
    if not _multi or nframes < 2:
        return [compress_payload(raw[f * frame_bytes:(f + 1) * frame_bytes], level) for f in range(nframes)]
    segments = np.empty((nframes, 2), np.uint64)
    segments[:, 0] = np.arange(nframes, dtype=np.uint64) * np.uint64(frame_bytes)
    segments[:, 1] = frame_bytes
    packed = _compressor(level).multi_compress_to_buffer(zstandard.BufferWithSegments(raw, segments.tobytes()))
    keep = frame_bytes - frame_bytes // 32  # as compress_payload: raw unless zstd saves 1/32
    codecs, payloads = [], []
    for f in range(nframes):
        comp = packed[f]
        if len(comp) < keep:
            codecs.append(CODEC_ZSTD)
            payloads.append(comp)
        else:
            codecs.append(CODEC_RAW)
            payloads.append(raw[f * frame_bytes:(f + 1) * frame_bytes])
    views = [_ffi.from_buffer(p) for p in payloads]  # alive until the call returns
    lens = np.array([len(v) for v in views], np.int64)
    crcs = np.empty(nframes, np.uint32)
    _lib.snapfs_crc32_many(_ffi.new("uint8_t *[]", views), _ffi.from_buffer("int64_t[]", lens), nframes,
                           _ffi.from_buffer("uint32_t[]", crcs))
    return list(zip(codecs, payloads, crcs.tolist()))


def frame_header(codec: int, payload_len: int, payload_crc: int, npages: int, segment_id: int) -> bytes:
    """The 32-byte header of a frame; its CRC chains the payload CRC through the header."""
    zeroed = FRAME_HEADER.pack(FRAME_MAGIC, codec, 0, npages, npages * STORE_PAGE, payload_len, segment_id, 0)
    crc = zlib.crc32(zeroed, payload_crc)
    return FRAME_HEADER.pack(FRAME_MAGIC, codec, 0, npages, npages * STORE_PAGE, payload_len, segment_id, crc)


def decode_frame(data: bytes | memoryview, segment_id: int) -> tuple[bytes, int]:
    """Verify a whole frame (header + payload) and return (page bytes, npages).

    Raises :class:`FrameError` on a bad magic, length, CRC, or decode failure.
    """
    data = memoryview(data)
    if len(data) < FRAME_HEADER.size:
        raise FrameError("frame truncated")
    magic, codec, _, npages, raw_len, payload_len, sid, crc = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise FrameError("bad frame magic")
    if len(data) != FRAME_HEADER.size + payload_len:
        raise FrameError("frame length mismatch (truncated segment?)")
    payload = data[FRAME_HEADER.size:]
    zeroed = FRAME_HEADER.pack(magic, codec, 0, npages, raw_len, payload_len, sid, 0)
    if zlib.crc32(zeroed, crc32(payload)) != crc:
        raise FrameError("frame checksum mismatch")
    if sid != segment_id or raw_len != npages * STORE_PAGE:
        raise FrameError("frame header inconsistent")
    if codec == CODEC_RAW:
        out = bytes(payload)
    elif codec == CODEC_ZSTD:
        try:
            out = _decompressor().decompress(payload, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise FrameError(f"zstd decode failed: {exc}") from None
    else:
        raise FrameError(f"unknown codec {codec}")
    if len(out) != raw_len:
        raise FrameError("decoded length mismatch")
    return out, npages


def compress_blob(data: bytes) -> bytes:
    """zstd-compress a catalog blob (maps, hashes, device state)."""
    return _compressor(3).compress(data)


def decompress_blob(data: bytes) -> bytes:
    """Inverse of :func:`compress_blob`; raises FrameError on damage."""
    try:
        return _decompressor().decompress(data)
    except zstandard.ZstdError as exc:
        raise FrameError(f"catalog blob does not decode: {exc}") from None
