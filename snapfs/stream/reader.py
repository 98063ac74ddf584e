"""Sequential, validating parser of QEMU migration streams (version 3).

:func:`read_stream` turns a binary file object into a stream of events. It accepts the shapes
QEMU writes (background snapshot: RAM first, no RAM END, device state last; precopy: pages sent
several times, COMMAND records, a RAM END) and snapfs's own RAM-only streams. Every malformed
input raises :class:`~snapfs.errors.StreamError` naming what is wrong and the byte offset.

Memory is bounded whatever the stream claims: sizes are checked against :class:`Limits` before
anything is allocated, and page data is yielded one 4 KiB page at a time.

Device state (the non-``ram`` FULL sections, EOF and VMDESCRIPTION that follow the RAM) can only
be decoded with QEMU's device descriptions, so it is returned verbatim as one blob.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from snapfs.errors import StreamError
from snapfs.stream import format as F

# Event kinds yielded by read_stream (first element of each tuple).
EV_HEADER = "header"  # (EV_HEADER, StreamHeader)
EV_BLOCKS = "blocks"  # (EV_BLOCKS, ram_section_id, list[RamBlock])
EV_PAGE = "page"  # (EV_PAGE, block_index, page_number, 4096 bytes)
EV_ZERO = "zero"  # (EV_ZERO, block_index, page_number, None)
EV_DEVICES = "devices"  # (EV_DEVICES, bytes): device FULL sections + EOF + VMDESC, verbatim
EV_END = "end"  # (EV_END, vmdesc JSON bytes or None): RAM-only stream ended cleanly

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_SEC_ID = struct.Struct(">I")
_INST_VER = struct.Struct(">II")
_CMD = struct.Struct(">HH")

_KNOWN_CAPABILITIES = {"x-ignore-shared"}


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what a stream may claim (checked before any allocation)."""

    max_ram_bytes: int = 1 << 40  # 1 TiB of RAM in total
    max_blocks: int = 4096
    max_vmdesc_bytes: int = 16 << 20
    max_device_state_bytes: int = 256 << 20
    max_machine_name: int = 256
    max_capabilities: int = 64


@dataclass(frozen=True)
class RamBlock:
    """One RAMBlock of the MEM_SIZE list."""

    name: str
    length: int
    extra: bytes = b""  # per-block fields driven by capabilities (x-ignore-shared: be64 addr)


@dataclass(frozen=True)
class StreamHeader:
    """What precedes the first section: the configuration."""

    machine: str | None
    capabilities: tuple[str, ...] = ()
    raw: bytes = b""  # configuration section verbatim (type byte, name, subsections)
    extras: dict = field(default_factory=dict)


class _Input:
    """Buffered reads from a file object with the absolute byte offset tracked."""

    def __init__(self, src: BinaryIO, chunk: int = 1 << 20) -> None:
        self._src = src
        self._chunk = chunk
        # A read-only view of the current buffer: page data is handed out as slices of it
        # (no copy); each refill allocates a new buffer, so handed-out slices stay valid.
        self._buf: memoryview = memoryview(b"")
        self._pos = 0
        self._base = 0  # stream offset of _buf[0]
        self._eof = False
        self._next_size = min(64 << 10, chunk)
        self.recording: list[bytes] | None = None

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def _fill(self, need: int) -> None:
        """Make at least ``need`` bytes available after _pos, unless the input ends first.

        Reads until the new buffer (at least ``need`` bytes, growing to ``chunk``) is full or
        the input ends:
        pipes deliver 64 KiB at a time, and a fresh buffer per small read would waste more.
        """
        tail = self._buf[self._pos :]
        new = bytearray(max(self._next_size, need))
        self._next_size = min(self._next_size * 2, self._chunk)  # small streams stay cheap
        have = len(tail)
        new[:have] = tail
        view = memoryview(new)
        while have < len(new) and not self._eof:
            n = self._src.readinto(view[have:])
            if not n:
                self._eof = True
                break
            have += n
        self._base += self._pos
        self._buf = view[:have].toreadonly()
        self._pos = 0

    def take(self, n: int, what: str) -> bytes:
        """Exactly ``n`` bytes, or StreamError naming ``what`` and the offset if truncated."""
        if n > self._chunk:
            return self._take_large(n, what)
        end = self._pos + n
        if end > len(self._buf):
            self._fill(n)
            end = n
            if n > len(self._buf):
                if self._base + len(self._buf) == 0:
                    raise StreamError("empty stream: no bytes arrived where a QEMU migration stream "
                                      "was expected (e.g. `snapfs cat NAME vmstate | ...`)")
                raise StreamError(
                    f"stream truncated at byte {self._base + len(self._buf)} while reading {what} "
                    f"(started at byte {self.offset})"
                )
        data = bytes(self._buf[self._pos : end])
        self._pos = end
        if self.recording is not None:
            self.recording.append(data)
        return data

    def _take_large(self, n: int, what: str) -> bytes:
        """Like take(), but memory grows with the bytes actually present, not with ``n``."""
        start = self.offset
        parts = []
        remaining = n
        while remaining:
            if self._pos >= len(self._buf):
                self._fill(1)
                if not len(self._buf):
                    raise StreamError(
                        f"stream truncated at byte {self.offset} while reading {what} (started at byte {start})"
                    )
            k = min(remaining, len(self._buf) - self._pos)
            parts.append(bytes(self._buf[self._pos : self._pos + k]))
            self._pos += k
            remaining -= k
        data = b"".join(parts)
        if self.recording is not None:
            self.recording.append(data)
        return data

    def peek(self) -> int | None:
        """The next byte without consuming it, or None at the end of the input."""
        if self._pos >= len(self._buf):
            self._fill(1)
            if not self._buf:
                return None
        return self._buf[self._pos]

    def at_end(self) -> bool:
        return self.peek() is None

    def take_rest(self, limit: int, what: str) -> bytes:
        """Everything up to the end of input; StreamError if more than ``limit`` bytes."""
        start = self.offset
        parts = []
        have = 0
        while True:
            chunk = bytes(self._buf[self._pos :])
            have += len(chunk)
            if have > limit:
                raise StreamError(f"{what} starting at byte {start} exceeds {limit} bytes")
            parts.append(chunk)
            self._pos = len(self._buf)
            if self._eof:
                break
            self._fill(1)
            if self._pos >= len(self._buf):
                break
        return b"".join(parts)


def _counted(inp: _Input, what: str) -> bytes:
    (n,) = inp.take(1, f"{what} length")
    return inp.take(n, what)


def _name(raw: bytes, what: str, offset: int) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise StreamError(f"{what} at byte {offset} is not ASCII: {raw[:32]!r}") from None


def read_stream(src: BinaryIO, limits: Limits = Limits()) -> Iterator[tuple]:
    """Parse a migration stream from ``src``, yielding events (see the EV_* constants).

    The last event is EV_DEVICES or EV_END, and only once the whole input has been consumed
    and validated; anything malformed raises StreamError (a subclass of SnapfsError).
    """
    return read_stream_at(src, limits)[0]


def read_stream_at(src: BinaryIO, limits: Limits = Limits()) -> tuple[Iterator[tuple], Callable[[], int]]:
    """:func:`read_stream`, plus a function giving the stream offset the parser has consumed
    up to: right after an EV_PAGE event, its 4096 bytes end there."""
    inp = _Input(src)
    return _Parser(inp, limits).events(), lambda: inp.offset


class _Parser:
    def __init__(self, inp: _Input, limits: Limits) -> None:
        self.inp = inp
        self.limits = limits
        self.capabilities: tuple[str, ...] = ()
        self.blocks: list[RamBlock] = []
        self.block_index: dict[bytes, int] = {}
        self.ram_section_id: int | None = None
        self.current_block: int | None = None  # CONTINUE carries the block across sections
        self.have_mem_size = False

    # -- top level -------------------------------------------------------------------------
    def events(self) -> Iterator[tuple]:
        inp = self.inp
        magic, version = _INST_VER.unpack(inp.take(8, "stream header"))
        if magic != F.MAGIC:
            raise StreamError(f"not a QEMU migration stream: bad magic 0x{magic:08x} at byte 0")
        if version != F.VERSION:
            why = "obsolete" if version == 2 else "unsupported"
            raise StreamError(f"{why} migration stream version {version} at byte 4 (expected 3)")
        yield (EV_HEADER, self._configuration())

        while True:
            at = inp.offset
            (kind,) = inp.take(1, "section type")
            if kind == F.SEC_EOF:
                yield (EV_END, self._vmdesc_and_end())
                return
            if kind in (F.SEC_START, F.SEC_FULL):
                (sid,) = _SEC_ID.unpack(inp.take(4, "section id"))
                idstr = _counted(inp, "section idstr")
                instance, version = _INST_VER.unpack(inp.take(8, "section instance/version"))
                if idstr != F.RAM_IDSTR:
                    if kind == F.SEC_START:
                        raise StreamError(
                            f"unsupported iterative device {idstr!r} (SECTION_START at byte {at}): "
                            "only 'ram' may be live-migrated"
                        )
                    head = struct.pack(">BI", kind, sid) + F.counted(idstr) + _INST_VER.pack(instance, version)
                    yield (EV_DEVICES, self._device_state(head, at))
                    return
                self._ram_start(sid, instance, version, at)
                yield from self._ram_payload(sid)
            elif kind in (F.SEC_PART, F.SEC_END):
                (sid,) = _SEC_ID.unpack(inp.take(4, "section id"))
                if self.ram_section_id is None or sid != self.ram_section_id:
                    raise StreamError(f"section id {sid} at byte {at} was never started")
                yield from self._ram_payload(sid)
            elif kind == F.SEC_COMMAND:
                cmd, length = _CMD.unpack(inp.take(4, "command header"))
                if cmd == 2:  # MIG_CMD_PACKAGED: a nested postcopy stream
                    raise StreamError(f"unsupported postcopy PACKAGED command at byte {at}")
                inp.take(length, f"command {cmd} payload")
            else:
                raise StreamError(f"unknown section type 0x{kind:02x} at byte {at}")

    def _configuration(self) -> StreamHeader:
        inp = self.inp
        if inp.peek() != F.SEC_CONFIGURATION:
            return StreamHeader(machine=None)
        inp.recording = []
        inp.take(1, "configuration")
        at = inp.offset
        (n,) = _BE32.unpack(inp.take(4, "machine name length"))
        if n > self.limits.max_machine_name:
            raise StreamError(f"machine name length {n} at byte {at} is implausible")
        machine = _name(inp.take(n, "machine name"), "machine name", at + 4)
        caps: list[str] = []
        extras: dict = {}
        while inp.peek() == F.SEC_SUBSECTION:
            sub_at = inp.offset
            inp.take(1, "subsection")
            name = _counted(inp, "subsection name")
            (_version,) = _BE32.unpack(inp.take(4, "subsection version"))
            if name == b"configuration/target-page-bits":
                (bits,) = _BE32.unpack(inp.take(4, "target page bits"))
                if bits != 12:
                    raise StreamError(f"target page bits {bits} at byte {sub_at} unsupported (need 12)")
            elif name == b"configuration/capabilities":
                (count,) = _BE32.unpack(inp.take(4, "capability count"))
                if count > self.limits.max_capabilities:
                    raise StreamError(f"capability count {count} at byte {sub_at} is implausible")
                for _ in range(count):
                    cap_at = inp.offset
                    cap = _name(_counted(inp, "capability name"), "capability", cap_at)
                    if cap not in _KNOWN_CAPABILITIES:
                        raise StreamError(f"unsupported stream capability {cap!r} at byte {cap_at}")
                    caps.append(cap)
            elif name == b"configuration/uuid":
                extras["uuid"] = inp.take(16, "uuid").hex()
            else:
                raise StreamError(f"unknown configuration subsection {name!r} at byte {sub_at}")
        raw = b"".join(inp.recording)
        inp.recording = None
        self.capabilities = tuple(caps)
        return StreamHeader(machine=machine, capabilities=self.capabilities, raw=raw, extras=extras)

    def _footer(self, sid: int) -> None:
        at = self.inp.offset
        mark, fid = struct.unpack(">BI", self.inp.take(5, "section footer"))
        if mark != F.SEC_FOOTER:
            raise StreamError(f"missing section footer for section {sid} at byte {at} (found 0x{mark:02x})")
        if fid != sid:
            raise StreamError(f"section footer at byte {at} names section {fid}, expected {sid}")

    def _vmdesc_and_end(self) -> bytes | None:
        inp = self.inp
        vmdesc = None
        at = inp.offset
        nxt = inp.peek()
        if nxt == F.SEC_VMDESC:
            inp.take(1, "VMDESCRIPTION")
            (n,) = _BE32.unpack(inp.take(4, "VMDESCRIPTION length"))
            if n > self.limits.max_vmdesc_bytes:
                raise StreamError(f"VMDESCRIPTION at byte {at} claims {n} bytes (limit {self.limits.max_vmdesc_bytes})")
            vmdesc = inp.take(n, "VMDESCRIPTION JSON")
            try:
                json.loads(vmdesc)
            except (ValueError, UnicodeDecodeError):
                raise StreamError(f"VMDESCRIPTION at byte {at} is not valid JSON") from None
        elif nxt is not None:
            raise StreamError(f"trailing garbage at byte {at} after the end of the stream (0x{nxt:02x})")
        if not inp.at_end():
            raise StreamError(f"trailing garbage at byte {inp.offset} after the end of the stream")
        return vmdesc

    def _device_state(self, head: bytes, at: int) -> bytes:
        """The opaque device-state tail; it must end with EOF [+ VMDESCRIPTION]."""
        blob = head + self.inp.take_rest(self.limits.max_device_state_bytes, "device state")
        if _vmdesc_split(blob) is None:
            raise StreamError(
                f"device state starting at byte {at} does not end with EOF and a VMDESCRIPTION "
                "(stream truncated?)"
            )
        return blob

    # -- the ram section -------------------------------------------------------------------
    def _ram_start(self, sid: int, instance: int, version: int, at: int) -> None:
        if self.ram_section_id is not None:
            raise StreamError(f"second 'ram' SECTION_START at byte {at}")
        if sid == 0:
            raise StreamError(f"'ram' section id 0 at byte {at} (QEMU would dispatch it to another device)")
        if instance != F.RAM_INSTANCE or version != F.RAM_VERSION:
            raise StreamError(f"'ram' instance {instance} version {version} at byte {at} (need 0 and 4)")
        self.ram_section_id = sid

    def _mem_size(self, total: int, at: int) -> Iterator[tuple]:
        inp = self.inp
        if self.have_mem_size:
            raise StreamError(f"second RAMBlock list (MEM_SIZE) at byte {at}")
        if total > self.limits.max_ram_bytes:
            raise StreamError(
                f"stream claims {total} bytes of RAM at byte {at} (limit {self.limits.max_ram_bytes})"
            )
        ignore_shared = "x-ignore-shared" in self.capabilities
        remaining = total
        while remaining:
            entry_at = inp.offset
            raw = _counted(inp, "RAMBlock name")
            name = _name(raw, "RAMBlock name", entry_at)
            (length,) = _BE64.unpack(inp.take(8, "RAMBlock length"))
            extra = inp.take(8, "RAMBlock address") if ignore_shared else b""
            if not raw:
                raise StreamError(
                    f"RAMBlock list total 0x{total:x} (byte {at}) disagrees with the block lengths "
                    f"(empty RAMBlock name at byte {entry_at})"
                )
            if length == 0 or length % F.TARGET_PAGE_SIZE:
                raise StreamError(f"RAMBlock {name!r} at byte {entry_at} has bad length 0x{length:x}")
            if length > remaining:
                raise StreamError(
                    f"RAMBlock list total 0x{total:x} (byte {at}) disagrees with the block lengths "
                    f"(block {name!r} at byte {entry_at})"
                )
            if raw in self.block_index:
                raise StreamError(f"RAMBlock {name!r} listed twice (byte {entry_at})")
            if len(self.blocks) >= self.limits.max_blocks:
                raise StreamError(f"more than {self.limits.max_blocks} RAMBlocks at byte {entry_at}")
            self.block_index[raw] = len(self.blocks)
            self.blocks.append(RamBlock(name, length, extra))
            remaining -= length
        self.have_mem_size = True
        yield (EV_BLOCKS, self.ram_section_id, list(self.blocks))

    def _ram_payload(self, sid: int) -> Iterator[tuple]:
        """Records up to EOS, then the footer. The per-page hot loop of the parser."""
        inp = self.inp
        take = inp.take
        unpack = _BE64.unpack
        blocks = self.blocks
        page_size = F.TARGET_PAGE_SIZE
        cur = self.current_block
        unpack_from = _BE64.unpack_from
        page_cont = F.RAM_PAGE | F.RAM_CONTINUE
        zero_cont = F.RAM_ZERO | F.RAM_CONTINUE
        record = 8 + page_size
        try:
            while True:
                # Fast path: a CONTINUE page or zero record entirely in the buffer.
                buf, pos = inp._buf, inp._pos
                if cur is not None and pos + record <= len(buf):
                    (word,) = unpack_from(buf, pos)
                    flags = word & F.FLAG_MASK
                    if flags == page_cont or flags == zero_cont:
                        addr = word - flags
                        if addr >= blocks[cur].length:
                            raise StreamError(
                                f"page offset 0x{addr:x} out of range for RAMBlock {blocks[cur].name!r} "
                                f"(length 0x{blocks[cur].length:x}) at byte {inp._base + pos}"
                            )
                        if flags == page_cont:
                            inp._pos = pos + record
                            yield (EV_PAGE, cur, addr // page_size, buf[pos + 8 : pos + record])
                        else:
                            if buf[pos + 8]:
                                raise StreamError(
                                    f"ZERO record at byte {inp._base + pos} has non-zero fill 0x{buf[pos + 8]:02x}"
                                )
                            inp._pos = pos + 9
                            yield (EV_ZERO, cur, addr // page_size, None)
                        continue
                at = inp.offset
                (word,) = unpack(take(8, "ram record"))
                flags = word & F.FLAG_MASK
                addr = word - flags
                base = flags & ~F.RAM_CONTINUE
                if base == F.RAM_PAGE or base == F.RAM_ZERO:
                    if flags & F.RAM_CONTINUE:
                        if cur is None:
                            raise StreamError(f"ram record at byte {at} continues a block but none was named")
                    else:
                        raw = _counted(inp, "RAMBlock name")
                        cur = self.block_index.get(raw)
                        if cur is None:
                            raise StreamError(f"unknown RAMBlock {raw[:64]!r} in ram record at byte {at}")
                    block = blocks[cur]
                    if addr >= block.length:
                        raise StreamError(
                            f"page offset 0x{addr:x} out of range for RAMBlock {block.name!r} "
                            f"(length 0x{block.length:x}) at byte {at}"
                        )
                    if base == F.RAM_PAGE:
                        yield (EV_PAGE, cur, addr // page_size, take(page_size, "page data"))
                    else:
                        fill = take(1, "zero-page fill byte")
                        if fill != b"\0":
                            raise StreamError(f"ZERO record at byte {at} has non-zero fill 0x{fill[0]:02x}")
                        yield (EV_ZERO, cur, addr // page_size, None)
                elif base == F.RAM_EOS:
                    break
                elif base == F.RAM_MEM_SIZE:
                    yield from self._mem_size(addr, at)
                elif base == F.RAM_MULTIFD_FLUSH:
                    continue
                else:
                    raise StreamError(
                        f"unsupported ram record flags 0x{flags:03x} at byte {at} "
                        "(offset not page-aligned, or XBZRLE/compress/RDMA record)"
                    )
        finally:
            self.current_block = cur
        self._footer(sid)


def _vmdesc_split(blob: bytes) -> int | None:
    """Where the EOF byte of a device-state blob is, if it ends ``00 [06 len JSON]``."""
    # The JSON contains no NUL byte, so its EOF marker is one of the last few "00 06" pairs.
    end = len(blob)
    pos = end
    for _ in range(64):
        pos = blob.rfind(b"\x00\x06", 0, pos)
        if pos < 0:
            break
        if pos + 6 <= end and _BE32.unpack_from(blob, pos + 2)[0] == end - pos - 6:
            try:
                json.loads(blob[pos + 6 :])
            except (ValueError, UnicodeDecodeError):
                return None
            return pos
    if end and blob[-1] == 0:
        return end - 1
    return None
