"""The persistent bitmap directory (QEMU's bitmap_list_load, block/qcow2-bitmap.c)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import spec
from ..errors import CorruptImageError
from ..layout import bitmaps as B
from ..layout import offset_of
from ..layout.header import BitmapDirEntryHeader
from ..source import ByteSource
from .header import Header, _align_up


@dataclass
class Bitmap:
    """One persistent dirty bitmap (a bitmap directory entry)."""

    name: str
    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    extra_data: bytes
    entry_offset: int

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & spec.BME_FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & spec.BME_FLAG_AUTO)


def read_bitmaps(src: ByteSource, hdr: Header) -> list[Bitmap]:
    """The persistent bitmaps of the bitmap directory (empty when the autoclear bit is off);
    entries decoded by :mod:`qcow2kit.layout.bitmaps`, errors without a path (the image
    front adds it)."""
    ext = hdr.bitmaps_ext
    if ext is None:
        return []
    base = ext["bitmap_directory_offset"]
    size = ext["bitmap_directory_size"]
    raw = src.read_at(base, size, field="bitmap directory")
    out: list[Bitmap] = []
    pos = 0
    for i in range(ext["nb_bitmaps"]):
        pos = _align_up(pos, 8)
        if pos + B.BITMAP_DIR_ENTRY_FIXED > size:
            raise CorruptImageError(f"bitmap directory entry {i} runs past the directory size "
                                    f"{size}", field="bitmap_directory_size", offset=base + pos)
        h = B.decode_bitmap_dir_entry_header(raw, pos, offset=base, index=i)
        if h.name_size > spec.MAX_BITMAP_NAME_SIZE:
            raise CorruptImageError(f"bitmap {i} name of {h.name_size} bytes is too long",
                                    field="name_size",
                                    offset=base + pos + offset_of(BitmapDirEntryHeader,
                                                                  "name_size"))
        if pos + B.bitmap_dir_entry_length(h) > size:
            raise CorruptImageError(f"bitmap directory entry {i} runs past the directory size "
                                    f"{size}", field="bitmap_directory_size", offset=base + pos)
        if not (spec.MIN_BITMAP_GRANULARITY_BITS <= h.granularity_bits
                <= spec.MAX_BITMAP_GRANULARITY_BITS):
            raise CorruptImageError(f"bitmap {i} granularity_bits {h.granularity_bits} out of "
                                    f"range 9..31", field="granularity_bits",
                                    offset=base + pos + offset_of(BitmapDirEntryHeader,
                                                                  "granularity_bits"))
        e, end = B.decode_bitmap_dir_entry(raw, pos, offset=base, index=i)
        out.append(Bitmap(name=e.name.decode("utf-8", "replace"),
                          bitmap_table_offset=e.bitmap_table_offset,
                          bitmap_table_size=e.bitmap_table_size, flags=e.flags, type=e.type,
                          granularity_bits=e.granularity_bits, extra_data=e.extra_data,
                          entry_offset=base + pos))
        pos = end
    return out
