"""The persistent bitmap directory (QEMU's bitmap_list_load, block/qcow2-bitmap.c) and the
dirty ranges of a bitmap (its bitmap table and data clusters)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .. import spec
from ..boolruns import merge_spans, true_runs
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


def table_size(bm: Bitmap, virtual_size: int, cluster_size: int) -> int:
    """How many entries a bitmap table of ``bm`` has for an image of ``virtual_size`` (each
    entry: one cluster of bits, one bit per ``granularity`` bytes)."""
    granules = -(-virtual_size // bm.granularity)
    return -(-granules // (cluster_size * 8))


def dirty_runs(src: ByteSource, bm: Bitmap, virtual_size: int, cluster_size: int,
               file_size: int, *, batch: int = 64) -> Iterator[tuple[int, int]]:
    """The dirty ranges of ``bm`` as ``(guest offset, length)``, in order and merged, read
    one bitmap cluster at a time (at most ``batch`` table entries decoded at once).

    The table is checked as QEMU's bitmap loader checks it: its size must match the image,
    every entry must be a cluster-aligned offset inside the file with no reserved bit set,
    or 0 / 1 (all zeros, all ones).
    """
    return merge_spans(_dirty_spans(src, bm, virtual_size, cluster_size, file_size,
                                     batch=batch))


def _dirty_spans(src: ByteSource, bm: Bitmap, virtual_size: int, cluster_size: int,
                 file_size: int, *, batch: int = 64) -> Iterator[tuple[int, int]]:
    """The dirty spans ``(start, end)`` of ``bm``, in order (see :func:`dirty_runs`)."""
    want = table_size(bm, virtual_size, cluster_size)
    table_off = bm.bitmap_table_offset
    if bm.bitmap_table_size != want:
        raise CorruptImageError(f"bitmap {bm.name!r}: table of {bm.bitmap_table_size} entries, "
                                f"the image needs {want}", field="bitmap_table_size",
                                offset=bm.entry_offset)
    if table_off % cluster_size:
        raise CorruptImageError(f"bitmap {bm.name!r}: table offset {table_off:#x} is not "
                                f"cluster aligned", field="bitmap_table_offset",
                                offset=bm.entry_offset)
    bits_per_entry = cluster_size * 8
    gran = bm.granularity
    for first in range(0, want, batch):
        n = min(batch, want - first)
        raw = src.read_at(table_off + 8 * first, 8 * n, field="bitmap table")
        entries = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        for k, entry in enumerate(entries.tolist()):
            i = first + k
            at = table_off + 8 * i
            off = entry & spec.BME_TABLE_ENTRY_OFFSET_MASK
            if entry & ~(spec.BME_TABLE_ENTRY_OFFSET_MASK | spec.BME_TABLE_ENTRY_FLAG_ALL_ONES):
                raise CorruptImageError(f"bitmap {bm.name!r}: table entry {i} has reserved bits "
                                        f"set ({entry:#x})", field="bitmap table entry",
                                        offset=at)
            if off and entry & spec.BME_TABLE_ENTRY_FLAG_ALL_ONES:
                raise CorruptImageError(f"bitmap {bm.name!r}: table entry {i} has both an "
                                        f"offset and the all-ones flag", field="bitmap table "
                                        "entry", offset=at)
            if off % cluster_size or off + cluster_size > max(file_size, cluster_size) and off:
                raise CorruptImageError(f"bitmap {bm.name!r}: table entry {i} points at "
                                        f"{off:#x}, misaligned or past the end of the file",
                                        field="bitmap table entry", offset=at)
            base = i * bits_per_entry * gran
            span = min(bits_per_entry * gran, virtual_size - base)
            if off == 0:
                if entry & spec.BME_TABLE_ENTRY_FLAG_ALL_ONES:
                    yield base, base + span
                continue
            data = np.frombuffer(src.read_at(off, cluster_size, field="bitmap data"),
                                 dtype=np.uint8)
            bits = np.unpackbits(data, bitorder="little")[:-(-span // gran)].astype(bool)
            starts, ends = true_runs(bits)
            for s, e in zip(starts.tolist(), ends.tolist()):
                yield base + s * gran, min(base + e * gran, virtual_size)
