"""The bitmap directory: decoding and encoding of its entries, from the declaration
``BitmapDirEntryHeader`` in :mod:`qcow2kit.layout.header`.

An entry is the 24-byte fixed part, ``extra_data_size`` bytes of extra data,
the name, and zero padding to a multiple of 8.  Decoding is lossless, so
``encode(decode(raw)) == raw`` for every directory QEMU writes.  Bitmap tables
are plain 64-bit tables (``qcow2kit.tables.decode_u64_table`` and
``encode_u64_table``).  Limits are checked by the reader
(``qcow2kit.image.Image.bitmaps``), not here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptImageError
from . import parse
from .header import BitmapDirEntryHeader

BITMAP_DIR_ENTRY_FIXED = BitmapDirEntryHeader.sizeof()     # 24


@dataclass
class BitmapDirEntry:
    """One bitmap directory entry, as stored."""

    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    extra_data: bytes
    name: bytes


def _align8(n: int) -> int:
    return (n + 7) & ~7


def decode_bitmap_dir_entry_header(raw: bytes, pos: int = 0, *, offset: int = 0,
                                   index: int = 0) -> Any:
    """The fixed part of the entry at ``raw[pos:]`` (a construct Container of
    :data:`BitmapDirEntryHeader`'s fields); ``offset`` is where ``raw`` starts in the file."""
    what = f"bitmap directory entry {index}"
    if pos + BITMAP_DIR_ENTRY_FIXED > len(raw):
        raise CorruptImageError(f"{what} is cut short", field=what, offset=offset + pos)
    return parse(BitmapDirEntryHeader, raw[pos:pos + BITMAP_DIR_ENTRY_FIXED], what=what,
                 offset=offset + pos, error=CorruptImageError)


def bitmap_dir_entry_length(h: Any) -> int:
    """Bytes of the entry whose fixed part is ``h``, before the padding to 8."""
    return BITMAP_DIR_ENTRY_FIXED + h.extra_data_size + h.name_size


def decode_bitmap_dir_entry(raw: bytes, pos: int = 0, *, offset: int = 0,
                            index: int = 0) -> tuple[BitmapDirEntry, int]:
    """The entry at ``raw[pos:]`` and the position of the next one (8-byte aligned)."""
    what = f"bitmap directory entry {index}"
    h = decode_bitmap_dir_entry_header(raw, pos, offset=offset, index=index)
    p = pos + BITMAP_DIR_ENTRY_FIXED
    end = pos + bitmap_dir_entry_length(h)
    if end > len(raw):
        raise CorruptImageError(f"{what} runs past the end of the directory", field=what,
                                offset=offset + pos)
    extra = bytes(raw[p:p + h.extra_data_size])
    name = bytes(raw[p + h.extra_data_size:end])
    return BitmapDirEntry(h.bitmap_table_offset, h.bitmap_table_size, h.flags, h.type,
                          h.granularity_bits, extra, name), _align8(end)


def decode_bitmap_directory(raw: bytes, nb_bitmaps: int, *, offset: int = 0
                            ) -> tuple[list[BitmapDirEntry], int]:
    """``nb_bitmaps`` entries from the start of ``raw``; also the bytes they take."""
    out = []
    pos = 0
    for i in range(nb_bitmaps):
        e, pos = decode_bitmap_dir_entry(raw, pos, offset=offset, index=i)
        out.append(e)
    return out, pos


def encode_bitmap_dir_entry(e: BitmapDirEntry) -> bytes:
    fixed = BitmapDirEntryHeader.build({
        "bitmap_table_offset": e.bitmap_table_offset,
        "bitmap_table_size": e.bitmap_table_size, "flags": e.flags, "type": e.type,
        "granularity_bits": e.granularity_bits, "name_size": len(e.name),
        "extra_data_size": len(e.extra_data)})
    raw = fixed + e.extra_data + e.name
    return raw + bytes(_align8(len(raw)) - len(raw))


def encode_bitmap_directory(entries: Iterable[BitmapDirEntry]) -> bytes:
    """The bitmap directory (the inverse of :func:`decode_bitmap_directory`)."""
    return b"".join(encode_bitmap_dir_entry(e) for e in entries)


__all__ = [
    "BITMAP_DIR_ENTRY_FIXED",
    "BitmapDirEntry",
    "bitmap_dir_entry_length",
    "decode_bitmap_dir_entry",
    "decode_bitmap_dir_entry_header",
    "decode_bitmap_directory",
    "encode_bitmap_dir_entry",
    "encode_bitmap_directory",
]
