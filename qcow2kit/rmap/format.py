"""The reverse map's on-disk format: its header extension, data header and records.

See docs/rmap-extension.md.  This module only reads and decodes (and encodes
records for the builder): :func:`status` decodes and validates a map,
:func:`records` and :func:`compressed_records` stream its records.  Building,
dropping and verifying a map are in :mod:`qcow2kit.rmap.build`, which writes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from ..image import Image
from ..layout.header import ExtensionFrame
from ..layout.rmap import (AUTOCLEAR_RMAP, DATA_HEADER, DATA_MAGIC, EXT_LENGTH, EXT_RMAP,
                           FLAG_DATA_FILE, RMAP_VERSION, RmapDataHeaderFields,
                           decode_rmap_data_header, decode_rmap_extension)

COMP_DTYPE = np.dtype([("host", "<u8"), ("guest", "<u8"), ("clen", "<u4")])
CHUNK_RECORDS = 1 << 16


@dataclass
class RmapInfo:
    """What an image says about its reverse map."""

    present: bool = False
    valid: bool = False
    reason: str = "no reverse map"
    ext_offset: int | None = None
    version: int = 0
    flags: int = 0
    offset: int = 0
    length: int = 0
    nb_records: int = 0
    l1_table_offset: int = 0
    l1_crc32: int = 0
    data_crc32: int = 0
    cluster_bits: int = 0
    unit_bits: int = 0
    widths: tuple[int, int, int] = (0, 0, 0)
    nb_data_records: int = 0
    nb_compressed_records: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"present": self.present, "valid": self.valid, "reason": self.reason,
                "version": self.version, "offset": self.offset, "size": self.length,
                "data-records": self.nb_data_records,
                "compressed-records": self.nb_compressed_records,
                "clusters": self.extra.get("clusters"), "units": self.extra.get("units"),
                "unit-size": (1 << self.unit_bits) if self.unit_bits else None}


def width(v: int) -> int:
    return max(1, (max(v, 0).bit_length() + 7) // 8)


def encode_records(cols: tuple[np.ndarray, ...], widths: tuple[int, ...]) -> bytes:
    """Fixed-width little-endian fields, row after row."""
    n = cols[0].shape[0]
    total = sum(widths)
    out = np.empty((n, total), dtype=np.uint8)
    pos = 0
    for col, w in zip(cols, widths):
        le = col.astype("<u8").view(np.uint8).reshape(n, 8)
        out[:, pos:pos + w] = le[:, :w]
        pos += w
    return out.tobytes()


def decode_records(raw: bytes, widths: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    total = sum(widths)
    n = len(raw) // total
    a = np.frombuffer(raw, dtype=np.uint8, count=n * total).reshape(n, total)
    cols = []
    pos = 0
    for w in widths:
        wide = np.zeros((n, 8), dtype=np.uint8)
        wide[:, :w] = a[:, pos:pos + w]
        cols.append(wide.view("<u8").reshape(n).astype(np.uint64))
        pos += w
    return tuple(cols)


def read_extension(img: Image) -> tuple[int | None, bytes | None]:
    ext = img.header.extension(EXT_RMAP)
    return (ext.offset, ext.data) if ext is not None else (None, None)


def status(img: Image) -> RmapInfo:
    """Decode the reverse map's extension and data header, and say whether it may be used."""
    info = RmapInfo()
    h = img.header
    ext_off, data = read_extension(img)
    bit = bool(h.autoclear_features & AUTOCLEAR_RMAP)
    if data is None:
        info.reason = "no reverse map" + (" (the valid bit is set without one)" if bit else "")
        return info
    info.present = True
    info.ext_offset = ext_off
    if len(data) != EXT_LENGTH:
        info.reason = f"reverse-map extension has length {len(data)}, expected {EXT_LENGTH}"
        return info
    assert ext_off is not None
    e = decode_rmap_extension(data, offset=ext_off + ExtensionFrame.sizeof())
    (info.version, info.flags, info.offset, info.length, info.nb_records, info.l1_table_offset,
     info.l1_crc32, info.data_crc32) = (e.version, e.flags, e.offset, e.length, e.nb_records,
                                        e.l1_table_offset, e.l1_crc32, e.data_crc32)
    if info.version != RMAP_VERSION:
        info.reason = f"unknown reverse-map version {info.version}"
        return info
    if not bit:
        info.reason = ("stale: the valid bit is clear (the image was opened read-write by a "
                       "program that does not know the map, e.g. QEMU)")
        return info
    if info.length < DATA_HEADER or info.offset + info.length > img.src.size or \
            info.offset % img.cluster_size:
        info.reason = "reverse-map data lies outside the file"
        return info
    dh = _data_header(img, info.offset)
    if dh is None:
        info.reason = "reverse-map data header does not match the image"
        return info
    cb, ub, (hw, gw, cw) = dh.cluster_bits, dh.unit_bits, dh.widths
    info.cluster_bits, info.unit_bits, info.widths = cb, ub, (hw, gw, cw)
    info.nb_data_records, info.nb_compressed_records = dh.nb_data_records, \
        dh.nb_compressed_records
    info.extra["file_size_before"] = dh.file_size_before
    if cb != img.cluster_bits or ub != img.geometry.unit_bits \
            or not all(1 <= w <= 8 for w in (hw, gw, cw)):
        info.reason = "reverse-map data header does not match the image"
        return info
    expect = DATA_HEADER + info.nb_data_records * (hw + gw + cw) + \
        info.nb_compressed_records * COMP_DTYPE.itemsize
    if expect != info.length:
        info.reason = "reverse-map data length does not match its record counts"
        return info
    if h.l1_table_offset != info.l1_table_offset or l1_crc(img) != info.l1_crc32:
        info.reason = "stale: the active L1 table changed since the map was built"
        return info
    if not data_intact(img, info):
        info.reason = "reverse-map data checksum mismatch"
        return info
    info.valid = True
    info.reason = "valid"
    return info


def l1_crc(img: Image) -> int:
    n = img.header.l1_size * 8
    return zlib.crc32(img.src.read_at(img.header.l1_table_offset, n, field="L1 table")) if n else 0


def records(img: Image, info: RmapInfo) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Data-run records as (host_unit, guest_unit, count) uint64 arrays, chunk by chunk."""
    hw, gw, cw = info.widths
    rec = hw + gw + cw
    pos = info.offset + DATA_HEADER
    left = info.nb_data_records
    prev_end = 0
    while left:
        take = min(CHUNK_RECORDS, left)
        raw = img.src.read_at(pos, take * rec, field="rmap data")
        gap, guest, count = decode_records(raw, (hw, gw, cw))
        host, prev_end = hosts_from_gaps(gap, count, prev_end)
        yield host, guest, count
        pos += take * rec
        left -= take


def hosts_from_gaps(gap: np.ndarray, count: np.ndarray, prev_end: int
                     ) -> tuple[np.ndarray, int]:
    """Host units of records stored as gaps after the previous record's end; and the new end."""
    ends = np.cumsum(gap + count) + np.uint64(prev_end)
    return ends - count, int(ends[-1])


def compressed_records(img: Image, info: RmapInfo) -> np.ndarray:
    hw, gw, cw = info.widths
    pos = info.offset + DATA_HEADER + info.nb_data_records * (hw + gw + cw)
    raw = img.src.read_at(pos, info.nb_compressed_records * COMP_DTYPE.itemsize,
                          field="rmap data")
    return np.frombuffer(raw, dtype=COMP_DTYPE).copy()


def data_intact(img: Image, info: RmapInfo) -> bool:
    crc = 0
    pos, end = info.offset, info.offset + info.length
    while pos < end:
        n = min(8 << 20, end - pos)
        crc = zlib.crc32(img.src.read_at(pos, n, field="rmap data"), crc)
        pos += n
    return crc == info.data_crc32


def recorded_size(img: Image, info: RmapInfo) -> int | None:
    """The file size recorded when the map was built, if its data header is still intact."""
    if not info.offset or info.offset + DATA_HEADER > img.src.size:
        return None
    dh = _data_header(img, info.offset)
    return dh.file_size_before if dh is not None else None


def _data_header(img: Image, offset: int) -> RmapDataHeaderFields | None:
    """The map data's header at ``offset`` (inside the file), or None without the map's magic."""
    return decode_rmap_data_header(img.src.read_at(offset, DATA_HEADER, field="rmap data"),
                                   offset=offset)


__all__ = [
    "AUTOCLEAR_RMAP", "CHUNK_RECORDS", "COMP_DTYPE", "DATA_HEADER", "DATA_MAGIC", "EXT_LENGTH",
    "EXT_RMAP", "FLAG_DATA_FILE", "RMAP_VERSION", "RmapInfo", "compressed_records",
    "data_intact", "decode_records", "encode_records", "hosts_from_gaps", "l1_crc",
    "read_extension", "records", "recorded_size", "status", "width",
]
