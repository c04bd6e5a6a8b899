"""Building, dropping and verifying the persistent reverse map.

:func:`build` computes the map from the L2 tables (through the host-order
planner, so in bounded memory), appends it past the last refcounted cluster
and publishes it with the ordered, locked writes of :mod:`qcow2kit.writer`;
:func:`verify` compares a map with the L2 tables; :func:`drop` removes it.
The format itself is :mod:`qcow2kit.rmap.format`.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .. import tables as T
from ..errors import UnsupportedFeatureError
from ..hostorder import HostOrderPlan
from ..image import Image
from ..inplace import extension_area, publish_extension, set_header_field
from ..layout import header as H
from ..layout.rmap import (AUTOCLEAR_RMAP, EXT_RMAP, FLAG_DATA_FILE, RMAP_VERSION,
                           RmapDataHeaderFields, RmapExtensionData, encode_rmap_data_header,
                           encode_rmap_extension)
from ..writer import ImageWriter
from . import format as fmt
from .format import (COMP_DTYPE, RmapInfo, compressed_records, data_intact, encode_records,
                     hosts_from_gaps, l1_crc, read_extension, records, recorded_size, status,
                     width)


@dataclass
class _Computed:
    unit_bits: int
    spill: Any                 # temp file: rows of (host_unit, guest_unit, count) u8 x3
    nb_data: int
    comp: np.ndarray           # compressed records (small)
    max_gap: int
    max_guest: int
    max_count: int
    units: int


def _compute(img: Image, memory: int) -> _Computed:
    """Sorted data-run records and compressed records of the top layer, spilled to a temp file."""
    geo = img.geometry
    unit_bits = geo.unit_bits
    unit = 1 << unit_bits
    plan = HostOrderPlan(img, memory=memory, max_request=1 << 62, use_rmap=False,
                         include_holes=True)
    spill = tempfile.TemporaryFile(prefix="qcow2kit-rmap-")
    comp_parts: list[np.ndarray] = []
    # The last record is held back: the next batch may continue it.
    pend: np.ndarray | None = None         # [host_unit, guest_unit, count]
    prev_end = 0                           # host end (units) of the last written record
    nb = 0
    max_gap = max_guest = max_count = 0
    units = 0

    for _, runs in plan:
        runs = runs[runs["file"] == 0]
        comp = runs[runs["compressed"] != 0]
        if comp.shape[0]:
            cr = np.empty(comp.shape[0], COMP_DTYPE)
            cr["host"] = comp["host"]
            cr["guest"] = comp["guest"] >> np.uint64(img.cluster_bits)
            cr["clen"] = comp["rlen"]
            comp_parts.append(cr)
        data = runs[runs["compressed"] == 0]
        if data.shape[0] == 0:
            continue
        h = (data["host"] >> np.uint64(unit_bits)).astype(np.int64)
        g = (data["guest"] >> np.uint64(unit_bits)).astype(np.int64)
        cnt = ((data["length"].astype(np.int64) + unit - 1) >> unit_bits)
        if pend is not None:
            h = np.concatenate(([pend[0]], h))
            g = np.concatenate(([pend[1]], g))
            cnt = np.concatenate(([pend[2]], cnt))
        # Join runs that continue each other on the host and in the guest.
        brk = np.ones(h.shape[0], dtype=bool)
        brk[1:] = (h[1:] != h[:-1] + cnt[:-1]) | (g[1:] != g[:-1] + cnt[:-1])
        heads = np.flatnonzero(brk)
        rh, rg, rc = h[heads], g[heads], np.add.reduceat(cnt, heads)
        pend = np.array([rh[-1], rg[-1], rc[-1]], dtype=np.int64)
        rh, rg, rc = rh[:-1], rg[:-1], rc[:-1]
        if rh.shape[0]:
            ends = rh + rc
            gap = rh - np.concatenate(([prev_end], ends[:-1]))
            np.stack((gap, rg, rc), axis=1).astype("<u8").tofile(spill)
            prev_end = int(ends[-1])
            max_gap = max(max_gap, int(gap.max()))
            max_guest = max(max_guest, int(rg.max()))
            max_count = max(max_count, int(rc.max()))
            units += int(rc.sum())
            nb += rh.shape[0]
    if pend is not None:
        gap = int(pend[0]) - prev_end
        np.array([[gap, pend[1], pend[2]]], dtype="<u8").tofile(spill)
        max_gap = max(max_gap, gap)
        max_guest = max(max_guest, int(pend[1]))
        max_count = max(max_count, int(pend[2]))
        units += int(pend[2])
        nb += 1
    comp_all = np.concatenate(comp_parts) if comp_parts else np.empty(0, COMP_DTYPE)
    return _Computed(unit_bits, spill, nb, comp_all, max_gap, max_guest, max_count, units)


def _spilled_rows(c: _Computed) -> Iterator[np.ndarray]:
    c.spill.seek(0)
    left = c.nb_data
    while left:
        take = min(fmt.CHUNK_RECORDS, left)
        a = np.fromfile(c.spill, dtype="<u8", count=take * 3).reshape(take, 3)
        left -= take
        yield a


def _last_refcounted_end(img: Image) -> int:
    """Byte offset just past the last cluster with a non-zero refcount."""
    last = -1
    for first, raw, _ in img.refcount_blocks():
        nz = np.flatnonzero(T.decode_refcount_block(raw, img.header.refcount_order))
        if nz.shape[0]:
            last = max(last, first + int(nz[-1]))
    return (last + 1) * img.cluster_size


def _check_buildable(img: Image) -> None:
    if img.header.version < 3:
        raise UnsupportedFeatureError("a version 2 image has no autoclear bits, so it cannot "
                                      "carry a reverse map", field="version",
                                      offset=H.field_offset("version")).locate(img.filename)
    if img.encrypted:
        raise UnsupportedFeatureError("encrypted images are not supported "
                                      "by the reverse map", field="crypt_method",
                                      offset=H.field_offset("crypt_method")).locate(img.filename)


def build(path: str | os.PathLike[str], *, memory: int = 32 << 20) -> RmapInfo:
    """Compute and persist the reverse map of ``path`` (replacing an existing one)."""
    path = os.fspath(path)
    # a look before writing: the writer's locks below decide whether the image may be
    # written (and say "in use"), so this look takes none
    with Image.open(path, follow_backing=False, locking=False) as img:
        _check_buildable(img)
    if _has_ext(path):
        drop(path)  # first, so old map data can never be mistaken for the new map
    # our own writer holds the image's locks: the reader takes none (they would conflict)
    with ImageWriter(path) as w, Image.open(path, follow_backing=True, locking=False) as img:
        c = _compute(img, memory)
        widths = (width(c.max_gap), width(c.max_guest), width(c.max_count))
        cs = img.cluster_size
        where = max(-(-img.src.size // cs) * cs, _last_refcounted_end(img))
        hdr = encode_rmap_data_header(RmapDataHeaderFields(
            img.cluster_bits, c.unit_bits, *widths, nb_data_records=c.nb_data,
            nb_compressed_records=c.comp.shape[0], file_size_before=img.src.size))
        crc = zlib.crc32(hdr)
        pos = where
        w.pwrite(hdr, pos)
        pos += len(hdr)
        for rows in _spilled_rows(c):
            enc = encode_records((rows[:, 0], rows[:, 1], rows[:, 2]), widths)
            w.pwrite(enc, pos)
            crc = zlib.crc32(enc, crc)
            pos += len(enc)
        comp = c.comp.tobytes()
        w.pwrite(comp, pos)
        crc = zlib.crc32(comp, crc)
        pos += len(comp)
        c.spill.close()
        length = pos - where
        w.sync()
        w.step()                                               # 1: data on disk
        flags = FLAG_DATA_FILE if img.header.has_data_file else 0
        ext = encode_rmap_extension(RmapExtensionData(
            RMAP_VERSION, flags, where, length, c.nb_data + int(c.comp.shape[0]),
            img.header.l1_table_offset, l1_crc(img), crc))
        publish_extension(w, img, EXT_RMAP, ext)               # 2, 3: extension visible
        auto = img.header.autoclear_features | AUTOCLEAR_RMAP
        set_header_field(w, "autoclear_features", auto)
        w.sync()
        w.step()                                               # 4: valid bit set
    with Image.open(path, follow_backing=False) as img:
        info = status(img)
        info.extra.update(clusters=_clusters(c.units, c.unit_bits, img.cluster_bits),
                          units=c.units)
        return info


def _clusters(units: int, unit_bits: int, cluster_bits: int) -> int:
    return units >> (cluster_bits - unit_bits)


def _has_ext(path: str) -> bool:
    with Image.open(path, follow_backing=False, locking=False) as img:   # see build()
        return read_extension(img)[1] is not None


def drop(path: str | os.PathLike[str]) -> bool:
    """Remove the reverse map: clear the bit, remove the extension, truncate. False if none."""
    path = os.fspath(path)
    with ImageWriter(path) as w:
        with Image.open(path, follow_backing=False, locking=False) as img:   # w holds the locks
            ext_off, data = read_extension(img)
            auto = img.header.autoclear_features
            v3 = img.header.version >= 3   # a v2 header has no autoclear field
            if data is None:
                if v3 and auto & AUTOCLEAR_RMAP:
                    set_header_field(w, "autoclear_features", auto & ~AUTOCLEAR_RMAP)
                    w.sync()
                return False
            info = status(img)
            before = recorded_size(img, info)
            if v3:
                set_header_field(w, "autoclear_features", auto & ~AUTOCLEAR_RMAP)
                w.sync()
            w.step()
            # Rewrite the extension list without ours, in one write of the area.
            start = img.header.header_length
            _, area_end = extension_area(img.header)
            kept = H.encode_extensions([(ext.type, ext.data) for ext in img.header.extensions
                                        if ext.type != EXT_RMAP])
            w.pwrite(kept + bytes(max(0, area_end - start - len(kept))), start)
            w.sync()
            w.step()
            # Truncate only a map that is still the intact last thing in the file, with no
            # refcounted cluster inside it (after a QEMU write it may hold QEMU's data).
            if info.offset and info.offset + info.length == w.size and \
                    info.offset >= _last_refcounted_end(img) and data_intact(img, info):
                # Back to the size before the build, which may end inside a cluster.
                w.truncate(before if before is not None and before <= info.offset
                           else info.offset)
                w.sync()
            return True


def verify(img: Image, *, memory: int = 32 << 20, limit: int = 20) -> tuple[bool, list[str]]:
    """Compare the stored map with one computed from the L2 tables: (match, differences)."""
    info = status(img)
    if not info.valid:
        return False, [info.reason]
    c = _compute(img, memory)
    diffs: list[str] = []
    stored = _flat_records(records(img, info))
    fresh = _flat_records(_fresh_records(c))
    i = 0
    for a, b in _zip_longest(stored, fresh):
        if a != b:
            if len(diffs) < limit:
                diffs.append(f"record {i}: map has {_fmt(a, c.unit_bits)}, L2 tables say "
                             f"{_fmt(b, c.unit_bits)}")
            else:
                diffs.append("...")
                break
        i += 1
    stored_c = compressed_records(img, info)
    if not np.array_equal(stored_c, c.comp):
        diffs.append(f"compressed records differ ({stored_c.shape[0]} in the map, "
                     f"{c.comp.shape[0]} in the L2 tables)")
    c.spill.close()
    return not diffs, diffs


def _fresh_records(c: _Computed) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    prev = 0
    for rows in _spilled_rows(c):
        gap, guest, count = (rows[:, 0].astype(np.uint64), rows[:, 1].astype(np.uint64),
                             rows[:, 2].astype(np.uint64))
        host, prev = hosts_from_gaps(gap, count, prev)
        yield host, guest, count


def _flat_records(chunks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]
                  ) -> Iterator[tuple[int, int, int]]:
    for h, g, n in chunks:
        yield from zip(h.tolist(), g.tolist(), n.tolist())


def _zip_longest(a: Iterator[Any], b: Iterator[Any]) -> Iterator[tuple[Any, Any]]:
    sentinel = object()
    while True:
        x = next(a, sentinel)
        y = next(b, sentinel)
        if x is sentinel and y is sentinel:
            return
        yield (None if x is sentinel else x), (None if y is sentinel else y)


def _fmt(rec: tuple[int, int, int] | None, unit_bits: int) -> str:
    if rec is None:
        return "nothing"
    h, g, n = rec
    u = 1 << unit_bits
    return f"host {h * u:#x} -> guest {g * u:#x} (+{n * u:#x})"
