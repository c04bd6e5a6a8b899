"""The internal snapshot table (QEMU's qcow2_read_snapshots, block/qcow2-snapshot.c)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import spec
from ..layout import header as H
from ..layout import parse
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


def read_snapshots(src: ByteSource, hdr: Header, path: str) -> list[Snapshot]:
    """The internal snapshots, in table order."""
    out: list[Snapshot] = []
    off = hdr.snapshots_offset
    for i in range(hdr.nb_snapshots):
        off = _align_up(off, 8)
        if off - hdr.snapshots_offset > spec.MAX_SNAPSHOTS_SIZE:
            raise _bad(f"snapshot table exceeds QEMU's limit of {spec.MAX_SNAPSHOTS_SIZE} "
                       f"bytes", "snapshots_offset", 64, path)
        sh = parse(H.SnapshotHeader,
                   src.read_at(off, spec.SNAPSHOT_HEADER_SIZE, field=f"snapshot {i}"),
                   what=f"snapshot table entry {i}", offset=off)
        entry_off = off
        off += spec.SNAPSHOT_HEADER_SIZE
        if sh.extra_data_size > spec.MAX_SNAPSHOT_EXTRA_DATA:
            raise _bad(f"snapshot table entry {i} has {sh.extra_data_size} bytes of extra "
                       f"data (QEMU's limit is {spec.MAX_SNAPSHOT_EXTRA_DATA})",
                       "extra_data_size", entry_off + 36, path)
        extra = src.read_at(off, sh.extra_data_size, field=f"snapshot {i} extra data")
        off += sh.extra_data_size
        ident = src.read_at(off, sh.id_str_size, field=f"snapshot {i} id")
        off += sh.id_str_size
        name = src.read_at(off, sh.name_size, field=f"snapshot {i} name")
        off += sh.name_size
        ex = parse(H.SnapshotExtra, extra[:24].ljust(24, b"\0"),
                   what=f"snapshot {i} extra data", offset=entry_off + 40)
        vm_state = ex.vm_state_size_large if len(extra) >= 8 else sh.vm_state_size
        disk_size = ex.disk_size if len(extra) >= 16 else hdr.size
        icount = ex.icount if len(extra) >= 24 else None
        if sh.l1_size * 8 > spec.MAX_L1_SIZE:
            raise _bad(f"snapshot {i} L1 table of {sh.l1_size} entries is too large",
                       "l1_size", entry_off + 8, path)
        out.append(Snapshot(
            id=ident.decode("utf-8", "replace"), name=name.decode("utf-8", "replace"),
            l1_table_offset=sh.l1_table_offset, l1_size=sh.l1_size, date_sec=sh.date_sec,
            date_nsec=sh.date_nsec, vm_clock_nsec=sh.vm_clock_nsec, vm_state_size=vm_state,
            disk_size=disk_size, icount=icount, extra_data=extra, entry_offset=entry_off))
    if off - hdr.snapshots_offset > spec.MAX_SNAPSHOTS_SIZE:
        raise _bad(f"snapshot table exceeds QEMU's limit of {spec.MAX_SNAPSHOTS_SIZE} bytes",
                   "snapshots_offset", 64, path)
    return out
