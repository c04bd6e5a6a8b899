"""The pending-copy journal of a resumable copy into a raw file: declaration, encoder and
decoder.

A raw target has no room for metadata, so the copy bitmap of a resumable copy is kept in
a small file beside it (``TARGET.pending``): this 32-byte little-endian header, then
``tag_length`` bytes of tag (what the copy was: the caller's text, compared on resume),
then ``bitmap_length`` bytes of bitmap, one bit per ``1 << granularity_bits`` guest bytes,
least significant bit first, set while the granule is still to copy.  ``crc32`` covers
the tag and the bitmap, so a torn or foreign file is never taken for a journal.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from construct import Bytes, Const, Int8ul, Int32ul, Int64ul, Struct

from ..errors import Qcow2Error
from . import parse

JOURNAL_MAGIC = b"QKPEND\0\1"
JOURNAL_VERSION = 1

#: The journal's header (32 bytes, little-endian).
JournalHeader = Struct(
    "magic" / Const(JOURNAL_MAGIC),
    "version" / Int32ul,
    "granularity_bits" / Int8ul,
    "reserved" / Bytes(3),
    "size" / Int64ul,
    "tag_length" / Int32ul,
    "crc32" / Int32ul,
)
JOURNAL_HEADER = JournalHeader.sizeof()      # 32


@dataclass
class Journal:
    """A decoded journal: the guest size, the granularity, the tag and the bitmap bytes."""

    size: int
    granularity_bits: int
    tag: bytes
    bitmap: bytes


def bitmap_length(size: int, granularity_bits: int) -> int:
    """Bytes of the bitmap of ``size`` guest bytes at ``1 << granularity_bits``."""
    granules = -(-size >> granularity_bits) if size else 0
    return (granules + 7) // 8


def encode_journal(j: Journal) -> bytes:
    if len(j.bitmap) != bitmap_length(j.size, j.granularity_bits):
        raise ValueError(f"a bitmap of {len(j.bitmap)} bytes for {j.size} bytes at "
                         f"granularity {1 << j.granularity_bits}")
    crc = zlib.crc32(j.bitmap, zlib.crc32(j.tag))
    head = JournalHeader.build({"version": JOURNAL_VERSION,
                                "granularity_bits": j.granularity_bits,
                                "reserved": bytes(3), "size": j.size,
                                "tag_length": len(j.tag), "crc32": crc})
    return head + j.tag + j.bitmap


def decode_journal(raw: bytes, *, path: str | None = None) -> Journal:
    """The journal in ``raw``; a :class:`Qcow2Error` naming the field when it is not one."""
    def bad(why: str, field: str, offset: int) -> Qcow2Error:
        err = Qcow2Error(f"not a qcow2kit pending-copy journal: {why}", field=field,
                         offset=offset)
        return err.locate(path) if path else err

    if raw[:len(JOURNAL_MAGIC)] != JOURNAL_MAGIC:
        raise bad("bad magic", "magic", 0)
    h = parse(JournalHeader, raw[:JOURNAL_HEADER], what="journal header", offset=0)
    if h.version != JOURNAL_VERSION:
        raise bad(f"version {h.version}, not {JOURNAL_VERSION}", "version", 8)
    if not 9 <= h.granularity_bits <= 63:
        raise bad(f"granularity_bits {h.granularity_bits}", "granularity_bits", 12)
    blen = bitmap_length(h.size, h.granularity_bits)
    end = JOURNAL_HEADER + h.tag_length + blen
    if len(raw) != end:
        raise bad(f"{len(raw)} bytes, not {end}", "tag_length", 24)
    tag = raw[JOURNAL_HEADER:JOURNAL_HEADER + h.tag_length]
    bitmap = raw[JOURNAL_HEADER + h.tag_length:end]
    if zlib.crc32(bitmap, zlib.crc32(tag)) != h.crc32:
        raise bad("checksum mismatch", "crc32", 28)
    return Journal(h.size, h.granularity_bits, bytes(tag), bytes(bitmap))


__all__ = ["JOURNAL_HEADER", "JOURNAL_MAGIC", "JOURNAL_VERSION", "Journal", "JournalHeader",
           "bitmap_length", "decode_journal", "encode_journal"]
