"""The reverse map's header extension and data header (docs/rmap-extension.md):
declarations, decoders and encoders.

The extension's integers are big-endian like every qcow2 header extension; the
map data (its 40-byte header and its records) is little-endian.  Records are
encoded by :mod:`qcow2kit.rmap.format` (numpy, fixed widths).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from construct import Bytes, Const, Int8ul, Int32ub, Int64ub, Int64ul, Struct

from ..errors import CorruptImageError
from . import parse

EXT_RMAP = 0x524D4150              # "RMAP"
RMAP_VERSION = 1
AUTOCLEAR_RMAP = 1 << 32           # autoclear bit 32: the map is valid
FLAG_DATA_FILE = 1                 # rmap_flags bit 0: host offsets are data-file offsets
DATA_MAGIC = b"QKRMAP\0\1"

#: The header extension's data (48 bytes, big-endian).
RmapExtension = Struct(
    "version" / Int32ub,
    "flags" / Int32ub,
    "offset" / Int64ub,
    "length" / Int64ub,
    "nb_records" / Int64ub,
    "l1_table_offset" / Int64ub,
    "l1_crc32" / Int32ub,
    "data_crc32" / Int32ub,
)

#: The map data's header (40 bytes, little-endian).
RmapDataHeader = Struct(
    "magic" / Const(DATA_MAGIC),
    "cluster_bits" / Int8ul,
    "unit_bits" / Int8ul,
    "host_width" / Int8ul,
    "guest_width" / Int8ul,
    "count_width" / Int8ul,
    "reserved" / Bytes(3),
    "nb_data_records" / Int64ul,
    "nb_compressed_records" / Int64ul,
    "file_size_before" / Int64ul,
)

EXT_LENGTH = RmapExtension.sizeof()         # 48
DATA_HEADER = RmapDataHeader.sizeof()       # 40


@dataclass
class RmapExtensionData:
    """The reverse-map header extension, field by field."""

    version: int
    flags: int
    offset: int
    length: int
    nb_records: int
    l1_table_offset: int
    l1_crc32: int
    data_crc32: int


@dataclass
class RmapDataHeaderFields:
    """The map data's header, field by field (the magic is implied)."""

    cluster_bits: int
    unit_bits: int
    host_width: int
    guest_width: int
    count_width: int
    nb_data_records: int
    nb_compressed_records: int
    file_size_before: int
    reserved: bytes = bytes(3)

    @property
    def widths(self) -> tuple[int, int, int]:
        return self.host_width, self.guest_width, self.count_width


def decode_rmap_extension(data: bytes, *, offset: int = 0) -> RmapExtensionData:
    """The extension's data (exactly :data:`EXT_LENGTH` bytes; ``offset`` for errors)."""
    c = parse(RmapExtension, data, what="reverse-map extension", offset=offset,
              error=CorruptImageError)
    return RmapExtensionData(**{k: c[k] for k in RmapExtensionData.__dataclass_fields__})


def encode_rmap_extension(e: RmapExtensionData) -> bytes:
    return bytes(RmapExtension.build(asdict(e)))


def decode_rmap_data_header(raw: bytes, *, offset: int = 0) -> RmapDataHeaderFields | None:
    """The data header at the start of ``raw``, or None when the magic is not the map's."""
    if raw[:len(DATA_MAGIC)] != DATA_MAGIC:
        return None
    c = parse(RmapDataHeader, raw[:DATA_HEADER], what="reverse-map data header",
              offset=offset, error=CorruptImageError)
    return RmapDataHeaderFields(**{k: c[k] for k in RmapDataHeaderFields.__dataclass_fields__})


def encode_rmap_data_header(h: RmapDataHeaderFields) -> bytes:
    return bytes(RmapDataHeader.build(asdict(h)))


__all__ = [
    "AUTOCLEAR_RMAP",
    "DATA_HEADER",
    "DATA_MAGIC",
    "EXT_LENGTH",
    "EXT_RMAP",
    "FLAG_DATA_FILE",
    "RMAP_VERSION",
    "RmapDataHeader",
    "RmapDataHeaderFields",
    "RmapExtension",
    "RmapExtensionData",
    "decode_rmap_data_header",
    "decode_rmap_extension",
    "encode_rmap_data_header",
    "encode_rmap_extension",
]
