"""QEMU's migration stream (version 3): its grammar, constants and small encoders.

Only what snapfs reads or writes is defined here; the parser is ``reader.py``, the writer
``writer.py``. All integers are big-endian; ``counted`` is one length byte, then that many
bytes (no NUL)::

    STREAM        ::= MAGIC VERSION CONFIGURATION {SECTION} EOF [VMDESCRIPTION]
    MAGIC         ::= be32 0x5145564d                        "QEVM"
    VERSION       ::= be32 3                                 (2 is refused as obsolete)
    CONFIGURATION ::= 0x07 be32:n machine[n] {SUBSECTION}    the resolved machine class name,
                                                             e.g. "pc-i440fx-7.2"; required
    SUBSECTION    ::= 0x05 counted:name be32:version FIELDS   configuration/capabilities:
                                                             be32:n n*counted; target-page-bits: be32
    SECTION       ::= START | PART | END | FULL | COMMAND
    START, FULL   ::= (0x01 | 0x04) be32:id counted:idstr be32:instance be32:version PAYLOAD FOOTER
    PART, END     ::= (0x02 | 0x03) be32:id PAYLOAD FOOTER   id: that of the START it continues
    FOOTER        ::= 0x7e be32:id                           the id of its own section
    COMMAND       ::= 0x08 be16:cmd be16:n bytes[n]
    EOF           ::= 0x00
    VMDESCRIPTION ::= 0x06 be32:n json[n]                    informational; its length must
                                                             hold no '{' byte (see vmdescription)

    RAM PAYLOAD   ::= {RECORD} EOS                           the section idstr "ram", instance 0,
                                                             version 4
    RECORD        ::= MEM_SIZE | PAGE | ZERO
    MEM_SIZE      ::= be64:(total | 0x04) {counted:block be64:used_length [be64:page_size] [be64:addr]}
                      the blocks' used lengths sum to total exactly; page_size only with
                      postcopy-ram, addr only with x-ignore-shared
    PAGE          ::= be64:(offset | 0x08 [| 0x20]) [counted:block] bytes[TARGET_PAGE_SIZE]
    ZERO          ::= be64:(offset | 0x02 [| 0x20]) [counted:block] u8:0
    EOS           ::= be64:0x10

``offset`` is a byte offset in the block, page-aligned, below its used length; the flags are
its low bits (below TARGET_PAGE_SIZE). The block name is present unless CONTINUE (0x20) is
set, and "the current block" carries over from one section to the next. Section id 0 is
never used (a PART with id 0 binds to whichever handler has not loaded yet).

A background snapshot (``background-snapshot`` capability) is laid out as
``MAGIC VERSION CONFIGURATION START(ram) {PART(ram)} {FULL(device)} EOF VMDESCRIPTION``:
RAM first, the devices' state (taken at the snapshot instant) last, and no END for ``ram``.
"""

from __future__ import annotations

import json
import struct

MAGIC = 0x5145564D  # "QEVM"
VERSION = 3

# Top-level section types.
SEC_EOF = 0x00
SEC_START = 0x01
SEC_PART = 0x02
SEC_END = 0x03
SEC_FULL = 0x04
SEC_SUBSECTION = 0x05
SEC_VMDESC = 0x06
SEC_CONFIGURATION = 0x07
SEC_COMMAND = 0x08
SEC_FOOTER = 0x7E

# Flags in the low bits of a `ram` record's be64 (offset | flags).
RAM_FULL = 0x01  # obsolete since 2009
RAM_ZERO = 0x02
RAM_MEM_SIZE = 0x04
RAM_PAGE = 0x08
RAM_EOS = 0x10
RAM_CONTINUE = 0x20
RAM_XBZRLE = 0x40
RAM_HOOK = 0x80
RAM_COMPRESS = 0x100
RAM_MULTIFD_FLUSH = 0x200

TARGET_PAGE_SIZE = 4096
FLAG_MASK = TARGET_PAGE_SIZE - 1

RAM_IDSTR = b"ram"
RAM_INSTANCE = 0
RAM_VERSION = 4
# QEMU 7.2 numbers `ram` 2 on pc and none machines; any non-zero unused id loads.
DEFAULT_RAM_SECTION_ID = 2

HEADER = struct.pack(">II", MAGIC, VERSION)
EOS_RECORD = struct.pack(">Q", RAM_EOS)


def counted(name: bytes) -> bytes:
    """A counted string: one length byte, then the bytes (at most 255)."""
    if len(name) > 255:
        raise ValueError(f"counted string too long ({len(name)} bytes)")
    return bytes([len(name)]) + name


def configuration(machine: str) -> bytes:
    """A configuration section naming ``machine`` and carrying no subsections."""
    raw = machine.encode()
    return bytes([SEC_CONFIGURATION]) + struct.pack(">I", len(raw)) + raw


def footer(section_id: int) -> bytes:
    """The section footer QEMU checks after every section."""
    return struct.pack(">BI", SEC_FOOTER, section_id)


def section_start(section_id: int, idstr: bytes, instance: int, version: int) -> bytes:
    """A SECTION_START header (payload and footer follow)."""
    return struct.pack(">BI", SEC_START, section_id) + counted(idstr) + struct.pack(">II", instance, version)


def section_part(section_id: int) -> bytes:
    """A SECTION_PART header (payload and footer follow)."""
    return struct.pack(">BI", SEC_PART, section_id)


def mem_size_list(blocks: list[tuple[bytes, int, bytes]]) -> bytes:
    """The MEM_SIZE record: total | MEM_SIZE, then (idstr, used_length, extra fields) per block."""
    total = sum(length for _, length, _ in blocks)
    out = [struct.pack(">Q", total | RAM_MEM_SIZE)]
    for name, length, extra in blocks:
        out.append(counted(name) + struct.pack(">Q", length) + extra)
    return b"".join(out)


def vmdescription(doc: dict) -> bytes:
    """EOF-trailing VMDESCRIPTION: 0x06, be32 length, JSON.

    The JSON is padded with spaces until no byte of the length is 0x7b ('{'), which would
    fool analyze-migration.py's backwards search for the description.
    """
    text = json.dumps(doc, separators=(", ", ": "), sort_keys=False).encode()
    while b"{" in struct.pack(">I", len(text)):
        text += b" "
    return bytes([SEC_VMDESC]) + struct.pack(">I", len(text)) + text
