"""The persistent bitmap directory (QEMU's bitmap_list_load, block/qcow2-bitmap.c)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import spec
from ..errors import CorruptImageError
from ..layout import header as H
from ..layout import parse
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


def read_bitmaps(src: ByteSource, hdr: Header, path: str) -> list[Bitmap]:
    """The persistent bitmaps of the bitmap directory (empty when the autoclear bit is off)."""
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
        if pos + spec.BITMAP_DIR_ENTRY_FIXED > size:
            raise CorruptImageError(f"{path}: bitmap directory entry {i} runs past the "
                                    f"directory size {size}", field="bitmap_directory_size",
                                    offset=base + pos, path=path)
        e = parse(H.BitmapDirEntryHeader, raw[pos:pos + spec.BITMAP_DIR_ENTRY_FIXED],
                  what=f"bitmap directory entry {i}", offset=base + pos)
        end = pos + spec.BITMAP_DIR_ENTRY_FIXED + e.extra_data_size + e.name_size
        if e.name_size > spec.MAX_BITMAP_NAME_SIZE:
            raise CorruptImageError(f"{path}: bitmap {i} name of {e.name_size} bytes is too "
                                    f"long", field="name_size", offset=base + pos + 18,
                                    path=path)
        if end > size:
            raise CorruptImageError(f"{path}: bitmap directory entry {i} runs past the "
                                    f"directory size {size}", field="bitmap_directory_size",
                                    offset=base + pos, path=path)
        if not (spec.MIN_BITMAP_GRANULARITY_BITS <= e.granularity_bits
                <= spec.MAX_BITMAP_GRANULARITY_BITS):
            raise CorruptImageError(f"{path}: bitmap {i} granularity_bits "
                                    f"{e.granularity_bits} out of range 9..31",
                                    field="granularity_bits", offset=base + pos + 17,
                                    path=path)
        x0 = pos + spec.BITMAP_DIR_ENTRY_FIXED
        extra = raw[x0:x0 + e.extra_data_size]
        name = raw[x0 + e.extra_data_size:end]
        out.append(Bitmap(name=name.decode("utf-8", "replace"),
                          bitmap_table_offset=e.bitmap_table_offset,
                          bitmap_table_size=e.bitmap_table_size, flags=e.flags, type=e.type,
                          granularity_bits=e.granularity_bits, extra_data=extra,
                          entry_offset=base + pos))
        pos = end
    return out
