"""The internal snapshot table (QEMU's qcow2_read_snapshots, block/qcow2-snapshot.c)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import spec
from ..layout import offset_of
from ..layout import snapshots as S
from ..layout.header import SnapshotHeader
from ..source import ByteSource
from .header import Header, _align_up, _bad


@dataclass
class Snapshot:
    """One internal snapshot (table entry plus decoded extra data)."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int
    icount: int | None
    extra_data: bytes
    entry_offset: int


def read_snapshots(src: ByteSource, hdr: Header) -> list[Snapshot]:
    """The internal snapshots, in table order (entries decoded by :mod:`qcow2kit.layout.snapshots`;
    errors carry no path, the image front adds it)."""
    out: list[Snapshot] = []
    off = hdr.snapshots_offset
    for i in range(hdr.nb_snapshots):
        off = _align_up(off, 8)
        if off - hdr.snapshots_offset > spec.MAX_SNAPSHOTS_SIZE:
            raise _bad(f"snapshot table exceeds QEMU's limit of {spec.MAX_SNAPSHOTS_SIZE} "
                       f"bytes", "snapshots_offset")
        entry_off = off
        fixed = src.read_at(off, S.SNAPSHOT_HEADER_SIZE, field=f"snapshot {i}")
        sh = S.decode_snapshot_header(fixed, offset=entry_off, index=i)
        off += S.SNAPSHOT_HEADER_SIZE
        if sh.extra_data_size > spec.MAX_SNAPSHOT_EXTRA_DATA:
            raise _bad(f"snapshot table entry {i} has {sh.extra_data_size} bytes of extra "
                       f"data (QEMU's limit is {spec.MAX_SNAPSHOT_EXTRA_DATA})",
                       "extra_data_size", entry_off + offset_of(SnapshotHeader, "extra_data_size"))
        parts = [fixed]
        for size, what in ((sh.extra_data_size, "extra data"), (sh.id_str_size, "id"),
                           (sh.name_size, "name")):
            parts.append(src.read_at(off, size, field=f"snapshot {i} {what}"))
            off += size
        e, _ = S.decode_snapshot_entry(b"".join(parts), offset=entry_off, index=i)
        if e.l1_size * 8 > spec.MAX_L1_SIZE:
            raise _bad(f"snapshot {i} L1 table of {e.l1_size} entries is too large",
                       "l1_size", entry_off + offset_of(SnapshotHeader, "l1_size"))
        vm_state = e.vm_state_size_large
        disk_size = e.disk_size
        out.append(Snapshot(
            id=e.id_str.decode("utf-8", "replace"), name=e.name.decode("utf-8", "replace"),
            l1_table_offset=e.l1_table_offset, l1_size=e.l1_size, date_sec=e.date_sec,
            date_nsec=e.date_nsec, vm_clock_nsec=e.vm_clock_nsec,
            vm_state_size=e.vm_state_size if vm_state is None else vm_state,
            disk_size=hdr.size if disk_size is None else disk_size, icount=e.icount,
            extra_data=e.extra_data, entry_offset=entry_off))
    if off - hdr.snapshots_offset > spec.MAX_SNAPSHOTS_SIZE:
        raise _bad(f"snapshot table exceeds QEMU's limit of {spec.MAX_SNAPSHOTS_SIZE} bytes",
                   "snapshots_offset")
    return out
