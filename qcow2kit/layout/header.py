"""The qcow2 header (cluster 0) and its extensions: declarations, decoders and encoders.

Offsets follow docs/interop/qcow2.rst: a 72-byte version 2 header, version 3
adds the feature bitmaps, refcount_order and header_length (104 bytes), and
optional fields after that, present only when header_length says so.

Every structure is declared once (construct) and both decoded and encoded
from that declaration, as fontTools pairs ``decompile`` and ``compile``.  The
byte offset of every header field comes from the declarations too
(:data:`HEADER_FIELDS`, :func:`field_offset`, :func:`encode_field`), so no
other module needs to write a header offset as a literal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from construct import (
    Bytes,
    Const,
    GreedyRange,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    PaddedString,
    Struct,
    this,
)

from .. import spec
from . import Field, field_offsets, parse

#: The fields common to versions 2 and 3 (bytes 0..71).
HeaderV2 = Struct(
    "magic" / Const(spec.QCOW_MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
)

#: The version 3 additions (bytes 72..103).
HeaderV3Tail = Struct(
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
)

#: The optional version 3 fields QEMU writes (bytes 104..111, when header_length says so).
HeaderV3Optional = Struct(
    "compression_type" / Int8ub,
    "padding" / Bytes(7),
)

#: The whole 112-byte header QEMU writes for version 3 (the three parts above, in order).
HeaderV3 = Struct(*HeaderV2.subcons, *HeaderV3Tail.subcons, *HeaderV3Optional.subcons)

#: One header extension: type, length, data padded to a multiple of 8.
HeaderExtension = Struct(
    "type" / Int32ub,
    "length" / Int32ub,
    "data" / Bytes(this.length),
    "padding" / Bytes((-this.length) % 8),
)

#: One entry of the feature-name table extension (48 bytes).
FeatureNameEntry = Struct(
    "type" / Int8ub,
    "bit" / Int8ub,
    "name" / PaddedString(46, "ascii"),
)
FeatureNameTable = GreedyRange(FeatureNameEntry)

#: Bitmaps extension data (24 bytes).
BitmapsExtension = Struct(
    "nb_bitmaps" / Int32ub,
    "reserved32" / Int32ub,
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)

#: Full disk encryption header pointer extension data (16 bytes).
CryptoHeaderExtension = Struct(
    "offset" / Int64ub,
    "length" / Int64ub,
)

#: Snapshot table entry, fixed part (40 bytes); extra data, id and name follow.
SnapshotHeader = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
)

#: Known snapshot extra data (v3: at least the first two fields).
SnapshotExtra = Struct(
    "vm_state_size_large" / Int64ub,
    "disk_size" / Int64ub,
    "icount" / Int64ub,
)

#: Bitmap directory entry, fixed part (24 bytes); extra data and name follow.
BitmapDirEntryHeader = Struct(
    "bitmap_table_offset" / Int64ub,
    "bitmap_table_size" / Int32ub,
    "flags" / Int32ub,
    "type" / Int8ub,
    "granularity_bits" / Int8ub,
    "name_size" / Int16ub,
    "extra_data_size" / Int32ub,
)

#: Header extension framing (type and length), without the data.
ExtensionFrame = Struct(
    "type" / Int32ub,
    "length" / Int32ub,
)


# --------------------------------------------------------------------------- field offsets


#: Where a header field lives: byte offset, size and its construct declaration.
HeaderField = Field


#: Every header field by spec name, with its offset computed from :data:`HeaderV3`.
HEADER_FIELDS: Mapping[str, HeaderField] = field_offsets(HeaderV3)

#: Bytes of the version 2 header and of the fixed version 3 header.
V2_HEADER_LENGTH = HeaderV2.sizeof()          # 72
V3_FIXED_LENGTH = V2_HEADER_LENGTH + HeaderV3Tail.sizeof()   # 104


def field_offset(name: str) -> int:
    """Byte offset of header field ``name`` (e.g. ``field_offset("autoclear_features") == 88``)."""
    return HEADER_FIELDS[name].offset


def encode_field(name: str, value: Any) -> bytes:
    """One header field's bytes, to be written at :func:`field_offset` ``(name)``."""
    return HEADER_FIELDS[name].subcon.build(value)


def field_patch(name: str, value: Any) -> tuple[int, bytes]:
    """``(offset, bytes)`` that set header field ``name`` to ``value`` in place."""
    return field_offset(name), encode_field(name, value)


def decode_field(name: str, raw: bytes) -> Any:
    """Header field ``name`` read from the header bytes ``raw`` (starting at offset 0)."""
    f = HEADER_FIELDS[name]
    return parse(f.subcon, raw[f.offset:f.offset + f.size], what=name, offset=f.offset)


# --------------------------------------------------------------------------- header


def header_length_of(raw: bytes) -> int:
    """Length of the header proper: 72 for version 2, header_length for version 3."""
    if decode_field("version", raw) < 3:
        return V2_HEADER_LENGTH
    return int(decode_field("header_length", raw))


def decode_header(raw: bytes) -> dict[str, Any]:
    """The header fields of ``raw`` (at least the header's bytes), by spec name.

    Version 2 gives the 13 common fields; version 3 adds the feature words,
    refcount_order and header_length, ``compression_type`` and ``padding``
    when header_length covers them, and ``unknown_fields``: the bytes of
    header fields past byte 112, kept as they are (QEMU keeps them too).
    No validation happens here (see ``qcow2kit.image.read_header``).
    """
    h = parse(HeaderV2, raw, what="header", offset=0)
    out: dict[str, Any] = {k: v for k, v in h.items() if not k.startswith("_") and k != "magic"}
    if out["version"] < 3:
        return out
    t = parse(HeaderV3Tail, raw[V2_HEADER_LENGTH:V3_FIXED_LENGTH], what="header",
              offset=V2_HEADER_LENGTH)
    out.update((k, v) for k, v in t.items() if not k.startswith("_"))
    hl = out["header_length"]
    opt_len = HeaderV3Optional.sizeof()
    if hl > V3_FIXED_LENGTH:
        opt = raw[V3_FIXED_LENGTH:min(hl, V3_FIXED_LENGTH + opt_len)]
        out["compression_type"] = opt[0]
        out["padding"] = bytes(opt[1:])
    if hl > V3_FIXED_LENGTH + opt_len:
        out["unknown_fields"] = bytes(raw[V3_FIXED_LENGTH + opt_len:hl])
    return out


def encode_header(fields: Mapping[str, Any]) -> bytes:
    """The header proper from its fields (the inverse of :func:`decode_header`).

    Version 2 gives 72 bytes; version 3 gives ``header_length`` bytes: the
    fixed 104, then ``compression_type`` (default 0) and ``padding`` (default
    zeros) as far as header_length reaches, then ``unknown_fields``.
    """
    raw = HeaderV2.build(fields)
    if fields["version"] < 3:
        return raw
    raw += HeaderV3Tail.build(fields)
    hl = int(fields["header_length"])
    opt = bytes([fields.get("compression_type", spec.COMPRESSION_ZLIB)])
    opt += bytes(fields.get("padding", bytes(HeaderV3Optional.sizeof() - 1)))
    raw += opt[:max(0, hl - V3_FIXED_LENGTH)]
    raw += bytes(fields.get("unknown_fields", b""))
    if len(raw) != max(hl, V3_FIXED_LENGTH):
        raise ValueError(f"header_length {hl} does not match the {len(raw)} bytes of the "
                         f"header fields")
    return raw


# --------------------------------------------------------------------------- extensions


def encode_extension(ext_type: int, data: bytes) -> bytes:
    """One header extension: type, length, data, zero padding to a multiple of 8."""
    return HeaderExtension.build({"type": ext_type, "length": len(data), "data": data,
                                  "padding": bytes(-len(data) % 8)})


def decode_extensions(raw: bytes, start: int, end: int | None = None
                      ) -> tuple[list[tuple[int, bytes]], int]:
    """The extensions from ``start`` to the end entry (or to ``end``): a list of
    ``(type, data)`` in file order and the offset just past the end entry.

    No checks beyond the framing (``qcow2kit.image`` validates what it reads);
    the walk stops at the end entry or where no whole extension fits.
    """
    end = len(raw) if end is None else min(end, len(raw))
    out: list[tuple[int, bytes]] = []
    pos = start
    while pos + ExtensionFrame.sizeof() <= end:
        frame = parse(ExtensionFrame, raw[pos:pos + ExtensionFrame.sizeof()],
                      what="header extension", offset=pos)
        if frame.type == spec.EXT_END:
            return out, pos + ExtensionFrame.sizeof()
        data_at = pos + ExtensionFrame.sizeof()
        if frame.length > end - data_at:
            raise ValueError(f"header extension {frame.type:#010x} at {pos:#x} runs past "
                             f"{end:#x}")
        out.append((frame.type, bytes(raw[data_at:data_at + frame.length])))
        pos = data_at + frame.length + (-frame.length % 8)
    return out, pos


def encode_extensions(extensions: Iterable[tuple[int, bytes]]) -> bytes:
    """Extensions in the given order followed by the end entry (unknown types as they are)."""
    return b"".join(encode_extension(t, d) for t, d in extensions) + \
        encode_extension(spec.EXT_END, b"")


def decode_feature_table(data: bytes) -> list[tuple[tuple[int, int], str]]:
    """Feature-name table entries ``((type, bit), name)`` in table order (a trailing partial
    entry is ignored, as QEMU does)."""
    usable = len(data) - len(data) % FeatureNameEntry.sizeof()
    table = parse(FeatureNameTable, data[:usable], what="feature name table", offset=0)
    return [((e.type, e.bit), e.name) for e in table]


def encode_feature_table(entries: Iterable[tuple[tuple[int, int], str]]) -> bytes:
    """A feature-name table from ``((type, bit), name)`` pairs, in the given order."""
    return b"".join(FeatureNameEntry.build({"type": t, "bit": b, "name": name})
                    for (t, b), name in entries)


def decode_bitmaps_extension(data: bytes) -> dict[str, int]:
    """The bitmaps extension: nb_bitmaps, reserved32, bitmap_directory_size/offset."""
    b = parse(BitmapsExtension, data, what="bitmaps extension", offset=0)
    return {k: v for k, v in b.items() if not k.startswith("_")}


def encode_bitmaps_extension(nb_bitmaps: int, bitmap_directory_size: int,
                             bitmap_directory_offset: int, reserved32: int = 0) -> bytes:
    return BitmapsExtension.build({"nb_bitmaps": nb_bitmaps, "reserved32": reserved32,
                                   "bitmap_directory_size": bitmap_directory_size,
                                   "bitmap_directory_offset": bitmap_directory_offset})


def decode_crypto_extension(data: bytes) -> dict[str, int]:
    """The full disk encryption header pointer: offset and length."""
    c = parse(CryptoHeaderExtension, data, what="crypto header extension", offset=0)
    return {"offset": c.offset, "length": c.length}


def encode_crypto_extension(offset: int, length: int) -> bytes:
    return CryptoHeaderExtension.build({"offset": offset, "length": length})


def decode_name_extension(data: bytes) -> str:
    """Backing format or external data file name (up to the first NUL, as QEMU reads it)."""
    return data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def encode_name_extension(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- cluster 0


@dataclass
class HeaderArea:
    """Everything of cluster 0 that means something: header fields, the extensions in file
    order (``(type, data)``, unknown ones included), the backing file name (raw bytes).

    ``encode_header_area(decode_header_area(raw))`` gives back ``raw`` up to
    the end of the backing file name for every image QEMU writes.
    """

    fields: dict[str, Any]
    extensions: list[tuple[int, bytes]] = field(default_factory=list)
    backing_file: bytes | None = None

    def extension(self, ext_type: int) -> bytes | None:
        for t, d in self.extensions:
            if t == ext_type:
                return d
        return None


def decode_header_area(raw: bytes) -> HeaderArea:
    """Decode cluster 0 (or as much of it as holds the header, extensions and backing name)."""
    fields = decode_header(raw)
    hl = V2_HEADER_LENGTH if fields["version"] < 3 else fields["header_length"]
    bfo = fields["backing_file_offset"]
    exts, _ = decode_extensions(raw, hl, bfo if bfo else None)
    name = bytes(raw[bfo:bfo + fields["backing_file_size"]]) if bfo else None
    return HeaderArea(fields, exts, name)


def encode_header_area(area: HeaderArea, *, place_backing_file: bool = False) -> bytes:
    """Cluster 0 up to the end of the backing file name (or of the extensions).

    With ``place_backing_file`` the name goes right after the end entry and
    backing_file_offset/size are set, as QEMU's qcow2_update_header does;
    otherwise the name is written where the fields say (zeros in between).
    """
    fields = dict(area.fields)
    exts = encode_extensions(area.extensions)
    if area.backing_file is None:
        if place_backing_file:
            fields["backing_file_offset"] = fields["backing_file_size"] = 0
        return encode_header(fields) + exts
    if place_backing_file:
        fields["backing_file_offset"] = len(encode_header(fields)) + len(exts)
        fields["backing_file_size"] = len(area.backing_file)
        return encode_header(fields) + exts + area.backing_file
    head = encode_header(fields) + exts
    bfo = int(fields["backing_file_offset"])
    if bfo < len(head):
        raise ValueError(f"backing file name at {bfo:#x} overlaps the header extensions "
                         f"(which end at {len(head):#x})")
    return head + bytes(bfo - len(head)) + area.backing_file


__all__ = [
    "HEADER_FIELDS",
    "V2_HEADER_LENGTH",
    "V3_FIXED_LENGTH",
    "BitmapDirEntryHeader",
    "BitmapsExtension",
    "CryptoHeaderExtension",
    "ExtensionFrame",
    "FeatureNameEntry",
    "FeatureNameTable",
    "HeaderArea",
    "HeaderExtension",
    "HeaderField",
    "HeaderV2",
    "HeaderV3",
    "HeaderV3Optional",
    "HeaderV3Tail",
    "SnapshotExtra",
    "SnapshotHeader",
    "decode_bitmaps_extension",
    "decode_crypto_extension",
    "decode_extensions",
    "decode_feature_table",
    "decode_field",
    "decode_header",
    "decode_header_area",
    "decode_name_extension",
    "encode_bitmaps_extension",
    "encode_crypto_extension",
    "encode_extension",
    "encode_extensions",
    "encode_feature_table",
    "encode_field",
    "encode_header",
    "encode_header_area",
    "encode_name_extension",
    "field_offset",
    "field_patch",
    "header_length_of",
]
