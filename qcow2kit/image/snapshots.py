"""The internal snapshot table (QEMU's qcow2_read_snapshots, block/qcow2-snapshot.c), and
finding one snapshot by id and/or name (find_snapshot_by_id_and_name, and
bdrv_snapshot_load_tmp_by_id_or_name's id-then-name lookup) with its L1 table
validated as qcow2_snapshot_load_tmp validates it."""

from __future__ import annotations

from dataclasses import dataclass

from .. import spec
from ..errors import InvalidHeaderError, SnapshotNotFoundError
from ..layout import offset_of
from ..layout import snapshots as S
from ..layout.header import SnapshotHeader
from ..source import ByteSource
from .header import Header, _align_up, _bad, _check_table


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


@dataclass(frozen=True)
class SnapshotRef:
    """Which internal snapshot, as QEMU's ``snapshot.id=ID,snapshot.name=NAME``.

    With both, one snapshot must have both; with one, the first snapshot (in
    table order) that has it.  A plain string (``-l NAME_OR_ID``) is not a
    ref: :func:`select_snapshot` looks it up as an id first, then as a name.
    """

    id: str | None = None
    name: str | None = None

    def __str__(self) -> str:
        parts = [f"{k}={v!r}" for k, v in (("id", self.id), ("name", self.name)) if v is not None]
        return " and ".join(parts) or "(no id or name)"


def find_snapshot(snapshots: list[Snapshot], ref: SnapshotRef) -> Snapshot | None:
    """The first snapshot matching ``ref`` (QEMU's find_snapshot_by_id_and_name), or None."""
    if ref.id is None and ref.name is None:
        return None
    for sn in snapshots:
        if (ref.id is None or sn.id == ref.id) and (ref.name is None or sn.name == ref.name):
            return sn
    return None


def check_snapshot_l1(sn: Snapshot, file_size: int, cluster_size: int) -> None:
    """Refuse a snapshot whose L1 table is not a cluster-aligned table inside the file.

    QEMU's qcow2_snapshot_load_tmp (qcow2_validate_table) checks the alignment
    and the range; this also refuses a table past the end of the file (QEMU
    would read it as zeros).  The error names the entry's ``l1_table_offset``.
    """
    if sn.l1_size:
        _check_table(file_size, cluster_size, sn.l1_table_offset, sn.l1_size * 8,
                     "l1_table_offset", f"snapshot {sn.id} ({sn.name!r}) L1 table",
                     sn.entry_offset + offset_of(SnapshotHeader, "l1_table_offset"))


def select_snapshot(snapshots: list[Snapshot], which: "str | SnapshotRef",
                    file_size: int, cluster_size: int) -> Snapshot:
    """The snapshot ``which`` names, its L1 table checked (:func:`check_snapshot_l1`).

    A :class:`SnapshotRef` is matched as :func:`find_snapshot` does.  A string
    is tried as an id, then as a name, as ``qemu-img convert -l NAME_OR_ID``
    does (bdrv_snapshot_load_tmp_by_id_or_name: a snapshot found by id whose
    L1 table is invalid also falls back to the name; if no name matches,
    that invalid table's error is raised).  None found:
    :class:`SnapshotNotFoundError`.
    """
    if isinstance(which, SnapshotRef):
        sn = find_snapshot(snapshots, which)
        if sn is None:
            raise SnapshotNotFoundError(f"can't find snapshot: no internal snapshot with {which}")
        check_snapshot_l1(sn, file_size, cluster_size)
        return sn
    invalid: InvalidHeaderError | None = None
    sn = find_snapshot(snapshots, SnapshotRef(id=which))
    if sn is not None:
        try:
            check_snapshot_l1(sn, file_size, cluster_size)
            return sn
        except InvalidHeaderError as exc:
            invalid = exc
    sn = find_snapshot(snapshots, SnapshotRef(name=which))
    if sn is None:
        if invalid is not None:
            raise invalid
        raise SnapshotNotFoundError(f"can't find snapshot: no internal snapshot with id or "
                                    f"name {which!r}")
    check_snapshot_l1(sn, file_size, cluster_size)
    return sn
