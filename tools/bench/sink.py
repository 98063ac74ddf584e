"""Image sink for the bench's own peers: zero pages skipped, the rest zstd-compressed in frames.

Stop-copy and pre-copy write their image through this, so their image bytes compare with
snapfs's stored bytes: same zstd level, same frame size, zero pages kept as index only (as the
snapfs store and QEMU's ZERO records do). Pre-copy puts every copy it sends, duplicates included.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import zstandard

PAGE = 4096
ZSTD_LEVEL = 1
FRAME_BYTES = 128 * 1024
INDEX_BYTES_PER_PAGE = 8  # what a page address costs in a stream (QEMU: 8-byte offset+flags)


def nonzero_pages(data: np.ndarray) -> np.ndarray:
    """Boolean mask of the pages of ``data`` (uint8, n*4096) that hold a non-zero byte."""
    words = data.view(np.uint64).reshape(-1, PAGE // 8)
    return words.any(axis=1)


class ImageSink:
    """Compress pages with ``threads`` workers into one file; count what it costs."""

    def __init__(self, path: str, threads: int, level: int = ZSTD_LEVEL, frame_bytes: int = FRAME_BYTES):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zstd")
        self.level = level
        self.frame_bytes = frame_bytes
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pending: list[Future] = []
        self.pages_in = 0
        self.zero_pages = 0
        self.data_bytes = 0     # compressed bytes written
        self.index_bytes = 0

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level)
        return c

    def _compress_write(self, chunk: bytes) -> None:
        frame = self._compressor().compress(chunk)
        if len(frame) >= len(chunk):
            frame = chunk  # stored raw, as the store does for incompressible frames
        with self._lock:
            os.write(self.fd, frame)
            self.data_bytes += len(frame)

    def put(self, data: np.ndarray) -> None:
        """Queue the pages in ``data`` (uint8 array, a copy the caller will not reuse)."""
        mask = nonzero_pages(data)
        n = len(mask)
        nz = int(mask.sum())
        self.pages_in += n
        self.zero_pages += n - nz
        self.index_bytes += n * INDEX_BYTES_PER_PAGE
        if nz == 0:
            return
        pages = data.reshape(n, PAGE)[mask] if nz < n else data.reshape(n, PAGE)
        flat = pages.reshape(-1)
        for off in range(0, len(flat), self.frame_bytes):
            self._pending.append(self.pool.submit(self._compress_write, flat[off : off + self.frame_bytes].tobytes()))
        if len(self._pending) > 256:
            self._drain(keep=64)

    def _drain(self, keep: int = 0) -> None:
        while len(self._pending) > keep:
            self._pending.pop(0).result()

    def flush(self) -> None:
        """Wait until everything queued is compressed and written."""
        self._drain()

    @property
    def image_bytes(self) -> int:
        """Compressed data plus the per-page index a stream or store keeps."""
        return self.data_bytes + self.index_bytes

    def close(self, remove: bool = True) -> None:
        """Finish, close and (by default) delete the file: only its size matters to the bench."""
        self.flush()
        self.pool.shutdown()
        os.close(self.fd)
        if remove:
            os.unlink(self.path)
