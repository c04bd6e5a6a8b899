"""Every on-disk field of an image as decoded, with its file offset (``qcow2kit dump``).

For people debugging an image: each structure is decoded from the file's bytes by its
declaration in :mod:`qcow2kit.layout` and shown field by field, with the byte offset
in the file where the field lies, its size and its value, under the qcow2
specification's field names (docs/interop/qcow2.rst in QEMU).  A record is a dict:

``{"field": NAME, "offset": N, "size": N, "value": V}``

where ``V`` is an integer, a string (names) or the bytes as hex (other byte fields).
The sections (:data:`SECTIONS`) each yield records or groups of them; tables (L1, L2,
refcounts, bitmap tables) are read one table at a time, so memory stays bounded by a
table, and their all-zero entries are left out unless ``everything`` is asked for.
Nothing is validated beyond what decoding needs: a dump is for looking at images
that other tools refuse.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import construct
import numpy as np

from . import spec
from . import tables as T
from .image import Image
from .layout import field_offsets
from .layout import header as H

SECTIONS = ("header", "extensions", "l1", "l2", "refcounts", "snapshots", "bitmaps")

#: known header extension types by name (the spec's)
EXTENSION_NAMES = {
    spec.EXT_BACKING_FORMAT: "backing file format name",
    spec.EXT_FEATURE_TABLE: "feature name table",
    spec.EXT_BITMAPS: "bitmaps",
    spec.EXT_CRYPTO_HEADER: "full disk encryption header pointer",
    spec.EXT_DATA_FILE: "external data file name",
}

Record = dict[str, Any]


def _value(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    return v


def _rec(name: str, offset: int, size: int, value: Any) -> Record:
    return {"field": name, "offset": offset, "size": size, "value": _value(value)}


def fields(struct: construct.Struct, raw: bytes, base: int) -> list[Record]:
    """Every named field of the fixed-size ``struct`` decoded from ``raw`` (read at file
    offset ``base``)."""
    parsed = struct.parse(raw[:struct.sizeof()])
    return [_rec(name, base + f.offset, f.size, parsed[name])
            for name, f in field_offsets(struct).items()]


# ---------------------------------------------------------------------------- sections

def header(img: Image) -> list[Record]:
    """The header's fields (version 2: the first 72 bytes; 3: up to header_length)."""
    h = img.header
    if h.version < 3:
        struct = H.HeaderV2
    elif h.header_length >= H.HeaderV3.sizeof():
        struct = H.HeaderV3
    else:
        struct = construct.Struct(*H.HeaderV2.subcons, *H.HeaderV3Tail.subcons)
    raw = img.src.read_at(0, struct.sizeof(), field="header")
    out = fields(struct, raw, 0)
    if h.backing_file_offset and h.backing_file_size:
        name = img.src.read_at(h.backing_file_offset, h.backing_file_size, field="backing name")
        out.append(_rec("backing_file_name", h.backing_file_offset, h.backing_file_size,
                        name.decode("utf-8", "replace")))
    return out


def extensions(img: Image) -> list[Record]:
    """Each header extension: its frame, then its data decoded where the spec declares it."""
    out: list[Record] = []
    frame = H.ExtensionFrame.sizeof()
    for ext in img.header.extensions:
        data_off = ext.offset + frame
        group: Record = {"type": ext.type, "name": EXTENSION_NAMES.get(ext.type, "unknown"),
                         "offset": ext.offset, "length": len(ext.data),
                         "fields": fields(H.ExtensionFrame,
                                          img.src.read_at(ext.offset, frame, field="extension"),
                                          ext.offset)}
        f = group["fields"]
        if ext.type in (spec.EXT_BACKING_FORMAT, spec.EXT_DATA_FILE):
            f.append(_rec("name", data_off, len(ext.data),
                          ext.data.split(b"\0", 1)[0].decode("utf-8", "replace")))
        elif ext.type == spec.EXT_FEATURE_TABLE:
            size = H.FeatureNameEntry.sizeof()
            for i in range(len(ext.data) // size):
                for r in fields(H.FeatureNameEntry, ext.data[i * size:(i + 1) * size],
                                data_off + i * size):
                    r["field"] = f"feature[{i}].{r['field']}"
                    f.append(r)
        elif ext.type == spec.EXT_BITMAPS and len(ext.data) == H.BitmapsExtension.sizeof():
            f.extend(fields(H.BitmapsExtension, ext.data, data_off))
        elif (ext.type == spec.EXT_CRYPTO_HEADER
              and len(ext.data) == H.CryptoHeaderExtension.sizeof()):
            f.extend(fields(H.CryptoHeaderExtension, ext.data, data_off))
        else:
            f.append(_rec("data", data_off, len(ext.data), ext.data))
        out.append(group)
    return out


def l1(img: Image, *, everything: bool = False) -> Iterator[Record]:
    """The active L1 table's entries: index, offset, raw value, L2 table offset, COPIED."""
    h = img.header
    table = T.decode_u64_table(img.src.read_at(h.l1_table_offset, 8 * h.l1_size,
                                               field="L1 table"))
    for i in (range(h.l1_size) if everything else np.flatnonzero(table).tolist()):
        v = int(table[i])
        yield {"index": i, "offset": h.l1_table_offset + 8 * i, "size": 8, "value": v,
               "l2_offset": v & spec.L1E_OFFSET_MASK, "copied": bool(v & spec.OFLAG_COPIED),
               "reserved_bits": v & ~(spec.L1E_OFFSET_MASK | spec.OFLAG_COPIED)}


def l2(img: Image, *, l1_index: int | None = None, everything: bool = False
       ) -> Iterator[Record]:
    """Each L2 table the L1 table points at (or only the one under ``l1_index``), one at
    a time: its entries with guest offset, kind and host offset (compressed: the stream's
    offset and length; extended L2: the subcluster bitmap)."""
    geo = img.geometry
    cs = img.cluster_size
    span = cs << geo.l2_bits
    esize = 16 if geo.extended else 8
    for e in l1(img):
        if l1_index is not None and e["index"] != l1_index:
            continue
        toff = e["l2_offset"]
        if not toff:
            continue
        raw = img.src.read_at(toff, cs, field="L2 table")
        entries, bitmaps = T.decode_l2(raw, geo)
        units = T.classify(entries, bitmaps, geo)
        rows = []
        pick = (range(len(entries)) if everything else
                np.flatnonzero((entries != 0) | (bitmaps != 0 if bitmaps is not None
                                                 else False)).tolist())
        for j in pick:
            v = int(entries[j])
            compressed = bool(v & spec.OFLAG_COMPRESSED)
            upc = geo.units_per_cluster
            kinds = sorted({T.KIND_NAMES[T.ClusterKind(k)]
                            for k in units.kind[j * upc:(j + 1) * upc].tolist()})
            row: Record = {"index": j, "offset": toff + esize * j, "size": esize, "value": v,
                           "guest_offset": e["index"] * span + j * cs,
                           "kind": " ".join(kinds), "compressed": compressed}
            if compressed:
                row["host_offset"] = int(units.host[j * upc])
                row["compressed_size"] = int(units.csize[j * upc])
            else:
                row["host_offset"] = v & spec.L2E_OFFSET_MASK
                row["copied"] = bool(v & spec.OFLAG_COPIED)
                row["zero"] = bool(v & spec.OFLAG_ZERO)
            if bitmaps is not None:
                row["subcluster_bitmap"] = int(bitmaps[j])
            rows.append(row)
        yield {"l1_index": e["index"], "offset": toff, "entries": rows}


def refcounts(img: Image, *, everything: bool = False) -> Iterator[Record]:
    """The refcount table's entries, each with its block's counts as runs of clusters
    with one refcount (``first_cluster``, ``count``, ``refcount``)."""
    h = img.header
    cs = img.cluster_size
    per_block = cs * 8 // h.refcount_bits
    n = h.refcount_table_clusters * cs // 8
    table = T.decode_u64_table(img.src.read_at(h.refcount_table_offset, 8 * n,
                                               field="refcount table"))
    for i in (range(n) if everything else np.flatnonzero(table).tolist()):
        v = int(table[i])
        boff = v & spec.REFT_OFFSET_MASK
        rec: Record = {"index": i, "offset": h.refcount_table_offset + 8 * i, "size": 8,
                       "value": v, "block_offset": boff, "runs": []}
        if boff and boff + cs <= img.src.size:
            counts = T.decode_refcount_block(img.src.read_at(boff, cs, field="refcount block"),
                                             h.refcount_order)
            brk = np.flatnonzero(np.diff(counts.astype(np.int64))) + 1
            starts = np.concatenate(([0], brk))
            ends = np.concatenate((brk, [len(counts)]))
            for s, t in zip(starts.tolist(), ends.tolist()):
                c = int(counts[s])
                if c or everything:
                    rec["runs"].append({"first_cluster": i * per_block + s, "count": t - s,
                                        "refcount": c})
        yield rec


def snapshots(img: Image) -> list[Record]:
    """Each snapshot table entry: the fixed fields, the extra data (decoded as far as the
    spec declares it), the id and the name."""
    out: list[Record] = []
    fixed = H.SnapshotHeader.sizeof()
    for i, sn in enumerate(img.snapshots):
        base = sn.entry_offset
        raw = img.src.read_at(base, fixed, field="snapshot entry")
        recs = fields(H.SnapshotHeader, raw, base)
        hdr = H.SnapshotHeader.parse(raw)
        pos = base + fixed
        extra = sn.extra_data
        known = 0
        for name, f in field_offsets(H.SnapshotExtra).items():
            if f.offset + f.size <= len(extra):
                recs.append(_rec(f"extra.{name}", pos + f.offset, f.size,
                                 int.from_bytes(extra[f.offset:f.offset + f.size], "big")))
                known = f.offset + f.size
        if len(extra) > known:
            recs.append(_rec("extra.unknown", pos + known, len(extra) - known, extra[known:]))
        pos += len(extra)
        recs.append(_rec("id", pos, hdr.id_str_size, sn.id))
        recs.append(_rec("name", pos + hdr.id_str_size, hdr.name_size, sn.name))
        out.append({"index": i, "offset": base, "fields": recs})
    return out


def bitmaps(img: Image, *, everything: bool = False) -> list[Record]:
    """Each bitmap directory entry with its table: entries pointing at data clusters, or
    flagged all ones."""
    out: list[Record] = []
    fixed = H.BitmapDirEntryHeader.sizeof()
    for i, bm in enumerate(img.bitmaps):
        base = bm.entry_offset
        raw = img.src.read_at(base, fixed, field="bitmap directory entry")
        recs = fields(H.BitmapDirEntryHeader, raw, base)
        pos = base + fixed
        if bm.extra_data:
            recs.append(_rec("extra_data", pos, len(bm.extra_data), bm.extra_data))
        recs.append(_rec("name", pos + len(bm.extra_data), len(bm.name.encode()), bm.name))
        table = []
        if bm.bitmap_table_offset and bm.bitmap_table_size:
            entries = T.decode_u64_table(img.src.read_at(
                bm.bitmap_table_offset, 8 * bm.bitmap_table_size, field="bitmap table"))
            for j in (range(len(entries)) if everything else np.flatnonzero(entries).tolist()):
                v = int(entries[j])
                table.append({"index": j, "offset": bm.bitmap_table_offset + 8 * j, "size": 8,
                              "value": v,
                              "data_offset": v & spec.BME_TABLE_ENTRY_OFFSET_MASK,
                              "all_ones": bool(v & spec.BME_TABLE_ENTRY_FLAG_ALL_ONES)})
        out.append({"index": i, "offset": base, "fields": recs, "table": table})
    return out


__all__ = ["EXTENSION_NAMES", "SECTIONS", "bitmaps", "extensions", "fields", "header", "l1",
           "l2", "refcounts", "snapshots"]
