"""The snapshot table: decoding and encoding of its entries, from the declarations in
:mod:`qcow2kit.layout.header` (``SnapshotHeader``, ``SnapshotExtra``).

An entry is the 40-byte fixed part, ``extra_data_size`` bytes of extra data,
the id string, the name, and zero padding to a multiple of 8.  Decoding is
lossless (:class:`SnapshotEntry` keeps the 32-bit ``vm_state_size`` field, the
raw extra data and the raw id and name), so ``encode(decode(raw)) == raw`` for
every table QEMU writes.  Limits are checked by the reader
(``qcow2kit.image.Image.snapshots``), not here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidHeaderError
from . import field_offsets, parse
from .header import SnapshotExtra, SnapshotHeader

SNAPSHOT_HEADER_SIZE = SnapshotHeader.sizeof()     # 40
_EXTRA_FIELDS = field_offsets(SnapshotExtra)


@dataclass
class SnapshotEntry:
    """One snapshot table entry, as stored."""

    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int           # the 32-bit field of the fixed part
    extra_data: bytes
    id_str: bytes
    name: bytes

    def _extra(self, name: str) -> int | None:
        """Field ``name`` of :data:`SnapshotExtra`, or None when the extra data is shorter."""
        f = _EXTRA_FIELDS[name]
        if len(self.extra_data) < f.offset + f.size:
            return None
        return int(parse(f.subcon, self.extra_data[f.offset:f.offset + f.size],
                         what=f"snapshot extra data {name}", offset=f.offset))

    @property
    def vm_state_size_large(self) -> int | None:
        """The 64-bit VM state size of the extra data (None when the extra data is shorter)."""
        return self._extra("vm_state_size_large")

    @property
    def disk_size(self) -> int | None:
        return self._extra("disk_size")

    @property
    def icount(self) -> int | None:
        return self._extra("icount")


def snapshot_extra(vm_state_size_large: int, disk_size: int, icount: int | None = None) -> bytes:
    """Extra data as QEMU writes it: 16 bytes, or 24 with the instruction count."""
    raw = SnapshotExtra.build({"vm_state_size_large": vm_state_size_large,
                               "disk_size": disk_size, "icount": icount or 0})
    return raw if icount is not None else raw[:16]


def _align8(n: int) -> int:
    return (n + 7) & ~7


def decode_snapshot_header(raw: bytes, pos: int = 0, *, offset: int = 0,
                           index: int = 0) -> Any:
    """The fixed part of the entry at ``raw[pos:]`` (a construct Container of
    :data:`SnapshotHeader`'s fields); ``offset`` is where ``raw`` starts in the file."""
    what = f"snapshot table entry {index}"
    if pos + SNAPSHOT_HEADER_SIZE > len(raw):
        raise InvalidHeaderError(f"{what} is cut short", field=what, offset=offset + pos)
    return parse(SnapshotHeader, raw[pos:pos + SNAPSHOT_HEADER_SIZE], what=what,
                 offset=offset + pos)


def snapshot_entry_length(h: Any) -> int:
    """Bytes of the entry whose fixed part is ``h``, before the padding to 8."""
    return SNAPSHOT_HEADER_SIZE + h.extra_data_size + h.id_str_size + h.name_size


def decode_snapshot_entry(raw: bytes, pos: int = 0, *, offset: int = 0,
                          index: int = 0) -> tuple[SnapshotEntry, int]:
    """The entry at ``raw[pos:]`` (``offset`` is where ``raw`` starts in the file) and the
    position of the next entry (8-byte aligned)."""
    what = f"snapshot table entry {index}"
    h = decode_snapshot_header(raw, pos, offset=offset, index=index)
    p = pos + SNAPSHOT_HEADER_SIZE
    end = pos + snapshot_entry_length(h)
    if end > len(raw):
        raise InvalidHeaderError(f"{what} runs past the end of the table", field=what,
                                 offset=offset + pos)
    extra = bytes(raw[p:p + h.extra_data_size])
    p += h.extra_data_size
    ident = bytes(raw[p:p + h.id_str_size])
    p += h.id_str_size
    name = bytes(raw[p:p + h.name_size])
    return SnapshotEntry(h.l1_table_offset, h.l1_size, h.date_sec, h.date_nsec,
                         h.vm_clock_nsec, h.vm_state_size, extra, ident, name), _align8(end)


def decode_snapshot_table(raw: bytes, nb_snapshots: int, *, offset: int = 0
                          ) -> tuple[list[SnapshotEntry], int]:
    """``nb_snapshots`` entries from the start of ``raw``; also the table's length in bytes."""
    out = []
    pos = 0
    for i in range(nb_snapshots):
        e, pos = decode_snapshot_entry(raw, pos, offset=offset, index=i)
        out.append(e)
    return out, pos


def encode_snapshot_entry(e: SnapshotEntry) -> bytes:
    """One entry, padded with zeros to a multiple of 8 bytes."""
    fixed = SnapshotHeader.build({
        "l1_table_offset": e.l1_table_offset, "l1_size": e.l1_size,
        "id_str_size": len(e.id_str), "name_size": len(e.name), "date_sec": e.date_sec,
        "date_nsec": e.date_nsec, "vm_clock_nsec": e.vm_clock_nsec,
        "vm_state_size": e.vm_state_size, "extra_data_size": len(e.extra_data)})
    raw = fixed + e.extra_data + e.id_str + e.name
    return raw + bytes(_align8(len(raw)) - len(raw))


def encode_snapshot_table(entries: Iterable[SnapshotEntry]) -> bytes:
    """The snapshot table (the inverse of :func:`decode_snapshot_table`)."""
    return b"".join(encode_snapshot_entry(e) for e in entries)


__all__ = [
    "SNAPSHOT_HEADER_SIZE",
    "SnapshotEntry",
    "decode_snapshot_entry",
    "decode_snapshot_header",
    "decode_snapshot_table",
    "encode_snapshot_entry",
    "encode_snapshot_table",
    "snapshot_entry_length",
    "snapshot_extra",
]
