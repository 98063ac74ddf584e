"""Read a whole migration stream into a temporary page spool before anything is committed.

QEMU precopy streams send a page several times (the last copy wins) while the store and a
restored process must take each page once, and a stream must be validated to its end before
a snapshot is published or a target touched. :func:`spool_stream` therefore parses the entire
stream, writing the latest copy of every page into a sparse temporary file at
``block base + page offset`` and tracking per page whether it was last sent as data or zero.

When the stream itself is in a file (a :class:`PipeCapture`'s, or stdin redirected from a
file), pages are not copied at all: the spool records where each page's latest copy lies in
that file and reads it from there. Copying a 1 GiB stream into a second file while QEMU was
still sending it made QEMU's background-snapshot ~10% slower.

Memory follows what the stream carries, never what it claims: 16 bytes per distinct page
sent (a record log, compacted as it grows); writes are coalesced into buffers of at most 1 MiB.
A 34 MB stream claiming a 1 TiB block, one data page every 128 MiB, took 2.7 GiB with
per-128-MiB state arrays allocated for each page touched; it now takes what it holds.

A piped stream is first drained by :class:`PipeCapture`: a forked child copies the pipe into
an unlinked file as fast as the writer (QEMU) sends, while this process parses the file as it
grows, so parsing never makes the writer wait.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import select
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from snapfs.errors import StreamError
from snapfs.stream import format as F
from snapfs.stream.reader import (
    EV_BLOCKS,
    EV_DEVICES,
    EV_END,
    EV_HEADER,
    EV_PAGE,
    EV_ZERO,
    Limits,
    RamBlock,
    StreamHeader,
    read_stream_at,
)

if TYPE_CHECKING:
    import numpy as np

NOT_SENT, SENT_ZERO, SENT_DATA = 0, 1, 2
KEY_SHIFT = 32  # a log key is block << KEY_SHIFT | page (a block has < 2^28 pages: 1 TiB)
PAGE_MASK = (1 << KEY_SHIFT) - 1
ZERO_VALUE = -1  # the log value of a zero page (data: its offset, >= 0)
COMPACT_RECORDS = 1 << 20  # log records kept before folding them into the sorted pages
_FLUSH_BYTES = 1 << 20
_CLUSTER_GAP = 64 << 10  # page copies further apart in the stream are read separately
PAGE = F.TARGET_PAGE_SIZE


def _numpy() -> Any:
    """numpy, imported on first use: ``snapfs incoming`` starts its :class:`PipeCapture` from
    this module before paying numpy's import (50-300 ms), during which QEMU could not write."""
    import numpy

    return numpy


class PageSpool:
    """The latest copy of each page of a set of RAMBlocks: in an unlinked sparse temp file,
    or (``source``: a file descriptor holding the stream, ``source_base``: where the stream
    starts in it) as the offset of that copy in the stream.

    What was sent is a log of records, (block, page) -> data offset or zero, compacted now
    and then into one sorted array per distinct page (the latest record wins): memory follows
    the records the stream carries (16 bytes each, ``COMPACT_RECORDS`` at most uncompacted),
    never the sizes it claims — a small stream claiming a 1 TiB block costs what it holds.
    """

    def __init__(self, blocks: list[RamBlock], directory: str | os.PathLike | None = None,
                 source: int | None = None, source_base: int = 0) -> None:
        self.blocks = blocks
        self._source = source
        self._source_base = source_base
        self._file = None if source is not None else tempfile.TemporaryFile(dir=directory, prefix="snapfs-spool-")
        self._fd = source if source is not None else self._file.fileno()
        self._bases = []
        pos = 0
        for b in blocks:
            if b.length // PAGE > PAGE_MASK:
                raise StreamError(f"RAMBlock {b.name!r} is too large (0x{b.length:x} bytes)")
            self._bases.append(pos)
            pos += b.length
        # The log: key (block << KEY_SHIFT | page), value (stream offset of the data; 0 for
        # data in the temp file; ZERO_VALUE for a zero page), in stream order.
        self._log_keys = array.array("Q")
        self._log_values = array.array("q")
        self._keys: np.ndarray | None = None  # compacted: distinct keys, ascending
        self._values: np.ndarray | None = None  # the latest value of each
        self._pending: list[bytes | memoryview] = []
        self._pending_off = 0
        self._pending_end = -1
        self.data_records = 0
        self.zero_records = 0

    def put_page(self, block: int, page: int, data: bytes | memoryview, at: int = -1) -> None:
        """Record that ``page`` of ``block`` was sent with ``data`` (replacing earlier copies),
        found at stream offset ``at`` (needed, and enough, with a ``source``)."""
        self._log_keys.append(block << KEY_SHIFT | page)
        self.data_records += 1
        if self._source is not None:
            self._log_values.append(at)
        else:
            self._log_values.append(0)
            off = self._bases[block] + page * PAGE
            if off != self._pending_end or len(self._pending) * PAGE >= _FLUSH_BYTES:
                self.flush()
                self._pending_off = off
            self._pending.append(data)
            self._pending_end = off + PAGE
        if len(self._log_keys) >= COMPACT_RECORDS:
            self._compact()

    def put_zero(self, block: int, page: int) -> None:
        """Record that ``page`` of ``block`` was sent as a zero page."""
        self._log_keys.append(block << KEY_SHIFT | page)
        self._log_values.append(ZERO_VALUE)
        self.zero_records += 1
        if len(self._log_keys) >= COMPACT_RECORDS:
            self._compact()

    def _compact(self) -> tuple[np.ndarray, np.ndarray]:
        """Fold the log into the sorted distinct pages (the latest record of each wins)."""
        np = _numpy()
        if self._keys is not None and not self._log_keys:
            return self._keys, self._values  # type: ignore[return-value]
        keys = np.frombuffer(self._log_keys, np.uint64)
        values = np.frombuffer(self._log_values, np.int64)
        if self._keys is not None:  # older records first: a stable sort keeps the order
            keys = np.concatenate([self._keys, keys])
            values = np.concatenate([self._values, values])
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        last = np.empty(len(keys), bool)
        last[:-1] = keys[1:] != keys[:-1]
        last[-1:] = True
        self._keys, self._values = keys[last], values[order[last]]
        self._log_keys, self._log_values = array.array("Q"), array.array("q")
        return self._keys, self._values

    @property
    def duplicates(self) -> int:
        """Records superseded by a later record of the same page."""
        keys, _ = self._compact()
        return self.data_records + self.zero_records - len(keys)

    def _block_records(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(pages ascending, their latest values) of ``block``."""
        keys, values = self._compact()
        lo, hi = _numpy().searchsorted(keys, [block << KEY_SHIFT, (block + 1) << KEY_SHIFT])
        return (keys[lo:hi] & PAGE_MASK).astype(_numpy().int64), values[lo:hi]

    def flush(self) -> None:
        """Write out coalesced pending pages."""
        if self._pending:
            total = len(self._pending) * PAGE
            done = os.pwritev(self._fd, self._pending, self._pending_off)
            if done < total:  # short write (rare): finish the rest plainly
                rest = b"".join(bytes(p) for p in self._pending)[done:]
                while rest:
                    n = os.pwrite(self._fd, rest, self._pending_off + done)
                    rest, done = rest[n:], done + n
            self._pending = []
        self._pending_end = -1

    def sent_pages(self, block: int) -> int:
        """How many distinct pages of ``block`` were sent."""
        return len(self._block_records(block)[0])

    def batches(self, block: int, max_pages: int = 256) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(first_page, states, pages) for every window of ``block`` holding sent pages.

        ``pages`` is a writable (n, 4096) uint8 array with zero-sent pages zeroed; ``states``
        says per page NOT_SENT / SENT_ZERO / SENT_DATA. Windows are ascending, at most
        ``max_pages`` long, and start and end with a sent page.
        """
        self.flush()
        np = _numpy()
        sent, values = self._block_records(block)
        if not len(sent):
            return
        cuts = np.flatnonzero(np.diff(sent // max_pages)) + 1
        for lo_i, hi_i in zip([0, *cuts.tolist()], [*cuts.tolist(), len(sent)]):
            first = int(sent[lo_i])
            rows = sent[lo_i:hi_i] - first
            vals = values[lo_i:hi_i]
            n = int(rows[-1]) + 1
            states = np.zeros(n, np.uint8)
            is_data = vals != ZERO_VALUE
            states[rows] = np.where(is_data, SENT_DATA, SENT_ZERO)
            raw = bytearray(n * PAGE)
            pages = np.frombuffer(raw, np.uint8).reshape(n, PAGE)
            if self._source is not None:
                self._read_sent(pages, rows[is_data], vals[is_data])
            elif is_data.any():
                got = os.preadv(self._fd, [raw], self._bases[block] + first * PAGE)
                del got  # a sparse tail beyond the file's end reads as the zeros already there
                pages[states != SENT_DATA] = 0
            yield first, states, pages

    def _read_sent(self, pages: np.ndarray, rows: np.ndarray, offs: np.ndarray) -> None:
        """Fill ``pages[rows]`` (pages sent as data) from the source, at stream offsets
        ``offs``: one pread per cluster of nearby copies (a precopy stream resends pages much
        later)."""
        np = _numpy()
        if not len(rows):
            return
        at = offs + self._source_base
        order = np.argsort(at, kind="stable")
        cuts = np.flatnonzero(np.diff(at[order]) > _CLUSTER_GAP) + 1
        for group in np.split(order, cuts):
            r, a = rows[group], at[group]
            lo = int(a[0])
            span = np.frombuffer(_pread_all(self._fd, int(a[-1]) + PAGE - lo, lo), np.uint8)
            rel = a - lo
            step = np.diff(rel)
            if len(r) > 1 and (step == step[0]).all() and step[0] >= PAGE:
                # The usual case, records one after another: one strided copy.
                pages[r] = np.lib.stride_tricks.as_strided(
                    span, shape=(len(r), PAGE), strides=(int(step[0]), 1))
            else:
                for row, x in zip(r.tolist(), rel.tolist()):
                    pages[row] = span[x : x + PAGE]

    def close(self) -> None:
        """Drop the temporary file (a source stays open: its owner closes it)."""
        self._pending = []
        self._log_keys, self._log_values = array.array("Q"), array.array("q")
        self._keys = self._values = None
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "PageSpool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class SpooledStream:
    """A fully read and validated stream: its header, RAMBlocks, pages and device state."""

    header: StreamHeader
    ram_section_id: int
    blocks: list[RamBlock]
    spool: PageSpool
    devices: bytes | None = None  # device FULL sections + EOF + VMDESC, verbatim
    vmdesc: bytes | None = None  # RAM-only streams: the trailing description
    stream_bytes: int = 0
    source_owner: Any = None  # what holds the file the spool refers to (closed with it)

    def close(self) -> None:
        self.spool.close()
        if self.source_owner is not None:
            self.source_owner.close()


class _CountingReader:
    """Counts the bytes read through it (for progress and the stream size)."""

    def __init__(self, src: BinaryIO, progress: Callable[[int], None] | None) -> None:
        self._src = src
        self.count = 0
        self._progress = progress

    def readinto(self, buf) -> int:
        n = self._src.readinto(buf) or 0
        self.count += n
        if self._progress is not None:
            self._progress(self.count)
        return n


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise StreamError(f"the spooled stream is shorter than expected at byte {offset + len(data)}")
    return data


def spool_stream(
    src: BinaryIO,
    directory: str | os.PathLike | None = None,
    limits: Limits = Limits(),
    progress: Callable[[int], None] | None = None,
    source: int | None = None,
    source_base: int = 0,
) -> SpooledStream:
    """Read and validate all of ``src``; StreamError (nothing kept) on any malformed input.

    ``source``: a file descriptor where the bytes of ``src`` also are, from ``source_base``
    on (and stay until the spool is closed): pages are then referenced there, not copied.
    """
    counter = _CountingReader(src, progress)
    events, consumed = read_stream_at(counter, limits)
    header: StreamHeader | None = None
    spool: PageSpool | None = None
    section_id = F.DEFAULT_RAM_SECTION_ID
    blocks: list[RamBlock] = []
    try:
        for ev in events:
            kind = ev[0]
            if kind == EV_PAGE:
                spool.put_page(ev[1], ev[2], ev[3], consumed() - PAGE)  # type: ignore[union-attr]
            elif kind == EV_ZERO:
                spool.put_zero(ev[1], ev[2])  # type: ignore[union-attr]
            elif kind == EV_HEADER:
                header = ev[1]
            elif kind == EV_BLOCKS:
                section_id, blocks = ev[1], ev[2]
                spool = PageSpool(blocks, directory, source, source_base)
            elif kind in (EV_DEVICES, EV_END):
                if spool is None:
                    spool = PageSpool([], directory, source, source_base)
                spool.flush()
                assert header is not None
                return SpooledStream(
                    header=header,
                    ram_section_id=section_id,
                    blocks=blocks,
                    spool=spool,
                    devices=ev[1] if kind == EV_DEVICES else None,
                    vmdesc=ev[1] if kind == EV_END else None,
                    stream_bytes=counter.count,
                )
        raise StreamError("stream ended without an EOF section")  # pragma: no cover - reader raises first
    except BaseException:
        if spool is not None:
            spool.close()
        raise


def spool_dir(store_path: str | os.PathLike | None) -> str | None:
    """Where a stream's temporary files go: on the store's disk, not in a RAM-backed /tmp —
    the store directory, or its parent while the store does not exist yet; None (the
    default temporary directory) when neither is writable."""
    if store_path is None:
        return None
    path = os.fspath(store_path)
    for d in (path, os.path.dirname(os.path.abspath(path))):
        if os.path.isdir(d) and os.access(d, os.W_OK):
            return d
    return None


PIPE_SIZE = 16 << 20  # QEMU may write this far ahead of the drainer (root may exceed pipe-max-size)
_F_SETPIPE_SZ, _F_GETPIPE_SZ = 1031, 1032
_BATCH_BYTES = 1 << 20  # a drain smaller than this: pause so the next one moves more at once
_BATCH_PAUSE_S = 0.002


def grow_pipe(fd: int, size: int = PIPE_SIZE) -> int:
    """Enlarge pipe ``fd`` towards ``size`` (else pipe-max-size); return its capacity (0: not a pipe)."""
    for want in (size, _pipe_max_size()):
        try:
            return fcntl.fcntl(fd, _F_SETPIPE_SZ, want)
        except OSError:
            continue
    try:
        return fcntl.fcntl(fd, _F_GETPIPE_SZ)
    except OSError:
        return 0


def _pipe_max_size() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


class PipeCapture:
    """A pipe drained into an unlinked temporary file by a forked child; readable as it grows.

    The child does nothing but copy the pipe into the file, at normal priority and
    with its own interpreter lock, so a writer such as QEMU never waits for this process's
    parsing and compression (which may run at idle priority meanwhile). ``readinto`` blocks
    until the child has written more and returns 0 once the child reached the pipe's end.
    ``close()`` lets the child discard the rest of the pipe (the writer is never left blocked)
    and reaps it.
    """

    def __init__(self, fd: int, directory: str | os.PathLike | None = None) -> None:
        self.file = tempfile.TemporaryFile(dir=directory, prefix="snapfs-stream-")
        self._fd = self.file.fileno()
        self.directory = str(directory) if directory is not None else tempfile.gettempdir()
        pause = _BATCH_PAUSE_S if grow_pipe(fd) >= 8 * _BATCH_BYTES else 0.0
        notify_r, notify_w = os.pipe()
        # SIGUSR1 (discard the rest) stays blocked until the child has its handler.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        try:
            pid = os.fork()
            if pid == 0:  # the drainer: never returns
                code = 255
                try:
                    os.close(notify_r)
                    code = _drain_child(fd, self._fd, notify_w, pause, old_mask)
                finally:
                    os._exit(code)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(notify_w)
        self.pid: int | None = pid
        # Readable once the drainer exits, i.e. has the whole stream (opened before any reap:
        # it can only name this child).
        self._exit_fd = os.pidfd_open(pid)
        self._notify = notify_r
        self._pos = 0
        self._size = 0
        self.ended = False  # the reader saw the end: the drainer had the whole stream
        self.failure: str | None = None  # why the file could not take the whole stream
        # Only the child reads the pipe now: should it die, the writer gets EPIPE, not a hang.
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, fd, inheritable=fd <= 2)
        os.close(null)

    @property
    def file_fd(self) -> int:
        """The file holding the stream captured so far (at stream offsets; never shrinks)."""
        return self._fd

    def readinto(self, buf: Any) -> int:
        """Read from the captured stream at the current position, waiting for the drainer."""
        if self.failure:
            raise StreamError(self.failure)
        view = memoryview(buf).cast("B")
        while self._pos >= self._size:
            if self.ended:
                return 0
            self._wait()
        n = os.preadv(self._fd, [view[: self._size - self._pos]], self._pos)
        self._pos += n
        return n

    def _wait(self) -> None:
        # One byte per drained batch (or EOF when the child exits): block until there is news.
        news = os.read(self._notify, 1 << 16)
        self._size = os.fstat(self._fd).st_size
        failure = news.strip(b"\0")
        if failure:
            self.failure = _capture_failure(self.directory, failure[0])
            raise StreamError(self.failure)
        if not news:
            self.ended = True
            self._reap()

    def wait_captured(self) -> int:
        """Block until the drainer reached the end of the pipe; the stream's size."""
        while not self.ended:
            self._wait()
        return self._size

    def watch_captured(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from a watcher thread) as soon as the drainer has the whole
        stream — the writer closed the pipe — however far behind the reader still is.
        Returns the function that ends the watch (a callback in progress is waited for)."""
        if self.pid is None or self._exit_fd < 0:
            callback()
            return lambda: None
        exit_fd = os.dup(self._exit_fd)
        stop_r, stop_w = os.pipe()

        def watch() -> None:
            try:
                ready, _, _ = select.select([exit_fd, stop_r], [], [])
                if exit_fd in ready:
                    callback()
            finally:
                os.close(exit_fd)
                os.close(stop_r)

        thread = threading.Thread(target=watch, name="snapfs-stream-end", daemon=True)
        thread.start()

        stopped: list[bool] = []

        def stop() -> None:
            if not stopped:
                stopped.append(True)
                os.close(stop_w)  # EOF wakes the watcher
                thread.join()

        return stop

    def _reap(self) -> None:
        """Wait for the drainer (it has closed its end: it is exiting); raise if it failed."""
        if self.pid is None:
            return
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            self.failure = self.failure or _capture_failure(self.directory, code)
            raise StreamError(self.failure)

    def close(self) -> None:
        """Discard the rest of the pipe, reap the drainer and drop the file."""
        try:
            if self.pid is not None and not self.ended:
                os.kill(self.pid, signal.SIGUSR1)
            if self.pid is not None:
                os.waitpid(self.pid, 0)  # returns once the writer closed the pipe
                self.pid = None
        finally:
            if self._notify >= 0:
                os.close(self._notify)
                self._notify = -1
            if self._exit_fd >= 0:
                os.close(self._exit_fd)
                self._exit_fd = -1
            self.file.close()

    def __enter__(self) -> "PipeCapture":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _capture_failure(directory: str, code: int) -> str:
    if 0 < code < 255:
        hint = ": free some space or use another --store" if code in (errno.ENOSPC, errno.EDQUOT) else ""
        return f"spooling the incoming stream into {directory} failed: {os.strerror(code)}{hint}"
    return f"the process spooling the incoming stream failed (exit status {code})"


def _drain_child(src: int, dst: int, notify: int, pause: float, mask: set) -> int:
    """The drainer's loop (in the forked child): copy ``src`` into ``dst`` until EOF.

    Runs to the end of the pipe whatever happens to the file (so the writer never blocks);
    returns the exit code: 0 if all of it is in the file, else the errno that stopped it.
    News for the reader on ``notify``: a zero byte per batch written, an errno byte on failure.
    """
    discard: list[int] = []  # set by SIGUSR1: the reader failed, the rest goes to /dev/null
    signal.set_wakeup_fd(-1)  # the parent's event loop (if any) is not ours to wake
    # Ctrl-C reaches the whole process group: the stream is still read to its end (a writer
    # left blocked, or QEMU < 8.1 failing mid-snapshot, would harm the VM); the parent decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, lambda *_: discard.append(os.open(os.devnull, os.O_WRONLY)))
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.set_blocking(notify, False)
    # Hold nothing else of the parent's (store locks, QMP socket): its closes must take effect.
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in (0, 1, 2, src, dst, notify):
            try:
                os.close(int(name))
            except OSError:
                pass
    # Plain reads into one reused buffer, then writes. splice(2) into the file took twice the
    # system time here (a 1 GiB pipe: 1.8 s against 0.9 s), and a fresh buffer per read
    # faults new pages in every time; QEMU's background-snapshot ran ~30% longer with either.
    buf = bytearray(_BATCH_BYTES)
    whole = memoryview(buf)
    failed = 0  # the errno that stopped the file from taking more (the writer is still drained)
    while True:
        out = discard[0] if discard else dst
        try:
            n = os.readv(src, [buf])
            view = whole[:n]
            while view:
                view = view[os.write(out, view):]
        except OSError as e:
            if discard:  # failing even into /dev/null: reading the pipe itself failed
                return failed or e.errno or 255
            # The file takes no more (ENOSPC, EIO...): say so at once, keep draining the writer.
            failed = min(e.errno or 255, 255)
            _notify(notify, bytes([failed]))
            discard.append(os.open(os.devnull, os.O_WRONLY))
            continue
        if not n:
            return failed
        if _notify(notify, b"\0") is False and not discard:
            # The reader is gone: keep the writer going, keep nothing.
            discard.append(os.open(os.devnull, os.O_WRONLY))
        if pause and n < _BATCH_BYTES:
            # Let the pipe fill: one wake-up per ~1 MiB instead of one per page QEMU writes.
            time.sleep(pause)


def _notify(fd: int, news: bytes) -> bool:
    """Tell the reader (non-blocking; it already has unread news if full); False if it is gone."""
    try:
        os.write(fd, news)
    except BlockingIOError:
        pass
    except BrokenPipeError:
        return False
    return True
