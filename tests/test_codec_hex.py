"""The new encoders against bytes written out by hand, one field a line (fontTools style).

Every expected byte string below is typed from the spec (docs/interop/qcow2.rst), never
produced by the code under test; each test encodes the commented values and expects those
bytes, and decodes the bytes and expects those values.
"""
from __future__ import annotations

import numpy as np
import pytest

from qemu import hexbytes
from qcow2kit import spec
from qcow2kit import tables as T
from qcow2kit.errors import CorruptImageError, InvalidHeaderError, located
from qcow2kit.layout import parse
from qcow2kit.layout import bitmaps as B
from qcow2kit.layout import header as H
from qcow2kit.layout import rmap as R
from qcow2kit.layout import snapshots as S


# ------------------------------------------------------------------------------- field offsets

# name, offset, size: the table of docs/interop/qcow2.rst, typed by hand
SPEC_FIELDS = [
    ("magic", 0, 4), ("version", 4, 4), ("backing_file_offset", 8, 8),
    ("backing_file_size", 16, 4), ("cluster_bits", 20, 4), ("size", 24, 8),
    ("crypt_method", 32, 4), ("l1_size", 36, 4), ("l1_table_offset", 40, 8),
    ("refcount_table_offset", 48, 8), ("refcount_table_clusters", 56, 4),
    ("nb_snapshots", 60, 4), ("snapshots_offset", 64, 8), ("incompatible_features", 72, 8),
    ("compatible_features", 80, 8), ("autoclear_features", 88, 8), ("refcount_order", 96, 4),
    ("header_length", 100, 4), ("compression_type", 104, 1), ("padding", 105, 7),
]


def test_header_field_offsets_are_the_spec_table():
    assert [(f.name, f.offset, f.size) for f in H.HEADER_FIELDS.values()] == SPEC_FIELDS
    assert H.V2_HEADER_LENGTH == 72 and H.V3_FIXED_LENGTH == 104


def test_encode_single_fields():
    assert H.field_patch("autoclear_features", spec.AUTOCLEAR_BITMAPS) == (
        88, hexbytes("0000000000000001"))          # 88 autoclear: bitmaps
    assert H.field_patch("backing_file_offset", 0x1F8) == (
        8, hexbytes("00000000000001f8"))           # 8  backing file name at 0x1f8
    assert H.field_patch("refcount_order", 6) == (96, hexbytes("00000006"))   # 64-bit refcounts
    assert H.field_patch("compression_type", 1) == (104, hexbytes("01"))      # zstd
    assert H.encode_field("size", 1 << 40) == hexbytes("0000010000000000")    # 1 TiB
    assert H.encode_field("magic", None) == b"QFI\xfb"


# ------------------------------------------------------------------------------- a v3 header

V3_ZSTD_HEADER = hexbytes(
    "514649fb",           # 0   magic
    "00000003",           # 4   version 3
    "0000000000000000",   # 8   backing_file_offset: none
    "00000000",           # 16  backing_file_size
    "0000000e",           # 20  cluster_bits 14: 16 KiB clusters
    "0000000040000000",   # 24  size 1 GiB
    "00000000",           # 32  crypt_method: none
    "00000040",           # 36  l1_size 64 (an extended L2 table maps 1024 x 16 KiB = 16 MiB)
    "0000000000008000",   # 40  l1_table_offset: cluster 2
    "0000000000004000",   # 48  refcount_table_offset: cluster 1
    "00000001",           # 56  refcount_table_clusters
    "00000000",           # 60  nb_snapshots
    "0000000000000000",   # 64  snapshots_offset
    "0000000000000018",   # 72  incompatible: compression type (bit 3) + extended L2 (bit 4)
    "0000000000000001",   # 80  compatible: lazy refcounts
    "0000000000000002",   # 88  autoclear: raw external data
    "00000006",           # 96  refcount_order 6: 64-bit refcounts
    "00000070",           # 100 header_length 112
    "01",                 # 104 compression_type 1: zstd
    "00000000000000",     # 105 padding to 112
)
V3_ZSTD_FIELDS = {
    "version": 3, "backing_file_offset": 0, "backing_file_size": 0, "cluster_bits": 14, "size": 1 << 30,
    "crypt_method": 0, "l1_size": 64, "l1_table_offset": 0x8000, "refcount_table_offset": 0x4000,
    "refcount_table_clusters": 1, "nb_snapshots": 0, "snapshots_offset": 0,
    "incompatible_features": spec.INCOMPAT_COMPRESSION | spec.INCOMPAT_EXTL2,
    "compatible_features": spec.COMPAT_LAZY_REFCOUNTS,
    "autoclear_features": spec.AUTOCLEAR_DATA_FILE_RAW, "refcount_order": 6, "header_length": 112,
    "compression_type": 1, "padding": bytes(7)}


def test_v3_header_with_optional_fields():
    assert H.encode_header(V3_ZSTD_FIELDS) == V3_ZSTD_HEADER
    assert H.decode_header(V3_ZSTD_HEADER) == V3_ZSTD_FIELDS


def test_v3_header_with_an_unknown_field_keeps_it():
    raw = V3_ZSTD_HEADER[:100] + hexbytes(
        "00000078",           # 100 header_length 120: one 8-byte field qcow2kit does not know
    ) + V3_ZSTD_HEADER[104:] + hexbytes(
        "0123456789abcdef",   # 112 the unknown field, kept byte for byte
    )
    fields = H.decode_header(raw)
    assert fields["unknown_fields"] == hexbytes("0123456789abcdef")
    assert H.encode_header(fields) == raw


def test_v2_header_has_72_bytes():
    raw = hexbytes(
        "514649fb",           # 0   magic
        "00000002",           # 4   version 2
        "0000000000000048",   # 8   backing_file_offset 72
        "00000004",           # 16  backing_file_size 4
        "00000010",           # 20  cluster_bits 16
        "0000000000100000",   # 24  size 1 MiB
        "00000000",           # 32  crypt_method
        "00000001",           # 36  l1_size 1
        "0000000000030000",   # 40  l1_table_offset: cluster 3
        "0000000000010000",   # 48  refcount_table_offset: cluster 1
        "00000001",           # 56  refcount_table_clusters
        "00000000",           # 60  nb_snapshots
        "0000000000000000",   # 64  snapshots_offset
    )
    fields = H.decode_header(raw + b"base")
    assert fields["version"] == 2 and "header_length" not in fields
    assert H.encode_header(fields) == raw


# ------------------------------------------------------------------------------- extensions

EXT_DATA_FILE = hexbytes(
    "44415441",           # type: external data file name ("DATA")
    "00000005",           # length 5
    "642e726177",         # "d.raw"
    "000000",             # padding to 8
)
EXT_BITMAPS = hexbytes(
    "23852875",           # type: bitmaps
    "00000018",           # length 24
    "00000002",           # nb_bitmaps 2
    "00000000",           # reserved32
    "0000000000000040",   # bitmap_directory_size 64
    "0000000000050000",   # bitmap_directory_offset: cluster 5 of 64 KiB
)
EXT_CRYPTO = hexbytes(
    "0537be77",           # type: full disk encryption header pointer
    "00000010",           # length 16
    "0000000000030000",   # offset of the LUKS header
    "0000000000200000",   # its length, 2 MiB
)
EXT_UNKNOWN = hexbytes(
    "12345678",           # type nobody knows
    "00000003",           # length 3
    "616263",             # "abc"
    "0000000000",         # padding to 8
)
EXT_END = hexbytes(
    "00000000",           # type 0: end
    "00000000",           # length 0
)


def test_extensions_encode_and_decode():
    exts = [(spec.EXT_DATA_FILE, b"d.raw"),
            (spec.EXT_BITMAPS, H.encode_bitmaps_extension(2, 64, 0x50000)),
            (spec.EXT_CRYPTO_HEADER, H.encode_crypto_extension(0x30000, 0x200000)),
            (0x12345678, b"abc")]
    raw = EXT_DATA_FILE + EXT_BITMAPS + EXT_CRYPTO + EXT_UNKNOWN + EXT_END
    assert H.encode_extensions(exts) == raw
    assert H.decode_extensions(raw, 0) == (exts, len(raw))
    assert H.decode_bitmaps_extension(EXT_BITMAPS[8:]) == {
        "nb_bitmaps": 2, "reserved32": 0, "bitmap_directory_size": 64,
        "bitmap_directory_offset": 0x50000}
    assert H.decode_crypto_extension(EXT_CRYPTO[8:]) == {"offset": 0x30000, "length": 0x200000}
    assert H.decode_name_extension(EXT_DATA_FILE[8:13]) == "d.raw"


FEATURE_TABLE_HEAD = hexbytes(
    "00", "00",                                          # incompatible, bit 0
    "6469727479206269740000000000000000000000000000"     # "dirty bit" NUL padded to 46
    "0000000000000000000000000000000000000000000000",
    "02", "01",                                          # autoclear, bit 1
    "7261772065787465726e616c2064617461000000000000"     # "raw external data" NUL padded
    "0000000000000000000000000000000000000000000000",
)


def test_feature_table_entries():
    entries = [((0, 0), "dirty bit"), ((2, 1), "raw external data")]
    assert H.encode_feature_table(entries) == FEATURE_TABLE_HEAD
    assert H.decode_feature_table(FEATURE_TABLE_HEAD) == entries


def test_cluster0_places_the_backing_file_name_after_the_end_entry():
    fields = dict(V3_ZSTD_FIELDS)
    area = H.HeaderArea(fields, [(spec.EXT_BACKING_FORMAT, b"raw")], b"base.img")
    raw = H.encode_header_area(area, place_backing_file=True)
    assert raw[8:20] == hexbytes(
        "0000000000000088",   # 8  backing_file_offset 136 = 112 + 16 (format ext) + 8 (end)
        "00000008",           # 16 backing_file_size 8
    )
    assert raw[112:] == hexbytes(
        "e2792aca",           # 112 type: backing file format
        "00000003",           # 116 length 3
        "726177", "0000000000",   # 120 "raw", padding
        "0000000000000000",   # 128 end entry
        "626173652e696d67",   # 136 "base.img"
    )


# ------------------------------------------------------------------------------- L1 / L2 entries

GEO64K = T.L2Geometry(16, False, False)


def test_standard_l2_entries():
    raw = hexbytes(
        "8000000000050000",   # data at 0x50000, COPIED
        "0000000000000001",   # reads as zero, no host cluster
        "8000000000060001",   # reads as zero, keeps its host cluster 0x60000
        "0000000000000000",   # unallocated
        "4040000000123400",   # compressed: bit 62, one extra sector (bit 54), at byte 0x123400
    )
    e, b = T.decode_l2(raw, GEO64K)
    assert b is None and T.encode_l2(e, b) == raw
    units = T.classify(e, None, GEO64K)
    assert units.kind.tolist() == [T.DATA, T.ZERO, T.ZERO, T.UNALLOCATED, T.COMPRESSED]
    assert T.encode_l2(*T.encode_units(units, GEO64K)) == raw
    # a 700-byte stream at 0x123400 touches sectors 0x91a and 0x91b: one more sector
    assert T.compressed_descriptor(np.array([0x123400]), np.array([700]), GEO64K).tolist() \
        == [0x4040000000123400]
    assert T.encode_u64_table(T.l1_entries(np.array([0x40000, 0]))) == hexbytes(
        "8000000000040000",   # L2 table at 0x40000, COPIED
        "0000000000000000",   # no L2 table
    )


def test_extended_l2_entries():
    geo = T.L2Geometry(16, True, False)
    raw = hexbytes(
        "8000000000050000",   # cluster 0: host cluster 0x50000, COPIED
        "8000000000000003",   # bitmap: subclusters 0, 1 allocated; 31 reads as zero
        "0000000000000000",   # cluster 1: no host cluster
        "ffffffff00000000",   # bitmap: every subcluster reads as zero
    )
    e, b = T.decode_l2(raw, geo)
    assert b is not None and T.encode_l2(e, b) == raw
    alloc = np.zeros((2, 32), bool)
    alloc[0, :2] = True
    zero = np.zeros((2, 32), bool)
    zero[0, 31] = True
    zero[1, :] = True
    assert T.subcluster_bitmap(alloc, zero).tolist() == [0x8000000000000003, 0xFFFFFFFF00000000]
    assert T.encode_l2(*T.encode_units(T.classify(e, b, geo), geo)) == raw


# ------------------------------------------------------------------------------- refcount blocks


def test_refcount_blocks_of_every_width():
    cases = [
        # order, counts, bytes
        (0, [1, 0, 1, 1, 0, 0, 0, 1], "8d"),              # 1 bit, LSB first: 10001101
        (1, [3, 0, 1, 2], "93"),                          # 2 bits: 10 01 00 11
        (2, [0xA, 0x5], "5a"),                            # 4 bits: low nibble first
        (3, [1, 2], "0102"),                              # 8 bits
        (4, [1, 0x1234], "00011234"),                     # 16 bits, big-endian
        (5, [7], "00000007"),                             # 32 bits
        (6, [0x0102030405060708], "0102030405060708"),    # 64 bits
    ]
    for order, counts, expected in cases:
        raw = bytes.fromhex(expected)
        assert T.encode_refcount_block(np.array(counts, dtype=np.uint64), order) == raw, order
        assert T.decode_refcount_block(raw, order).tolist() == counts, order


# ------------------------------------------------------------------------------- snapshot, bitmap


SNAPSHOT_ENTRY = hexbytes(
    "0000000000070000",   # 0  l1_table_offset
    "00000002",           # 8  l1_size 2
    "0001",               # 12 id_str_size 1
    "0004",               # 14 name_size 4
    "65000000",           # 16 date_sec
    "00000010",           # 20 date_nsec
    "0000000000000400",   # 24 vm_clock_nsec
    "00000000",           # 32 vm_state_size (32-bit field)
    "00000010",           # 36 extra_data_size 16
    "0000000000000000",   # 40 extra: vm_state_size_large 0
    "0000000040000000",   # 48 extra: disk_size 1 GiB
    "31",                 # 56 id "1"
    "736e6170",           # 57 name "snap"
    "000000",             # 61 padding to 64
)


def test_snapshot_entry():
    e = S.SnapshotEntry(l1_table_offset=0x70000, l1_size=2, date_sec=0x65000000, date_nsec=16,
                        vm_clock_nsec=1024, vm_state_size=0,
                        extra_data=S.snapshot_extra(0, 1 << 30), id_str=b"1", name=b"snap")
    assert S.encode_snapshot_entry(e) == SNAPSHOT_ENTRY
    assert S.decode_snapshot_entry(SNAPSHOT_ENTRY) == (e, 64)
    assert (e.vm_state_size_large, e.disk_size, e.icount) == (0, 1 << 30, None)


BITMAP_ENTRY = hexbytes(
    "0000000000090000",   # 0  bitmap_table_offset
    "00000001",           # 8  bitmap_table_size 1
    "00000002",           # 12 flags: auto
    "01",                 # 16 type 1: dirty tracking
    "10",                 # 17 granularity_bits 16
    "0003",               # 18 name_size 3
    "00000000",           # 20 extra_data_size 0
    "626d30",             # 24 name "bm0"
    "0000000000",         # 27 padding to 32
)


def test_bitmap_directory_entry():
    e = B.BitmapDirEntry(bitmap_table_offset=0x90000, bitmap_table_size=1,
                         flags=spec.BME_FLAG_AUTO, type=1, granularity_bits=16, extra_data=b"",
                         name=b"bm0")
    assert B.encode_bitmap_directory([e, e]) == BITMAP_ENTRY + BITMAP_ENTRY
    assert B.decode_bitmap_directory(BITMAP_ENTRY * 2, 2) == ([e, e], 64)


# ------------------------------------------------------------------------------- reverse map
# docs/rmap-extension.md: the extension is big-endian, the map data little-endian

RMAP_EXTENSION = hexbytes(
    "00000001",           # 0  rmap_version 1
    "00000001",           # 4  rmap_flags: bit 0, the map describes the external data file
    "0000000000300000",   # 8  rmap_offset 3 MiB
    "0000000000000068",   # 16 rmap_length 104
    "0000000000000003",   # 24 rmap_nb_records 3
    "0000000000030000",   # 32 rmap_l1_table_offset
    "deadbeef",           # 40 rmap_l1_crc32
    "01020304",           # 44 rmap_data_crc32
)


def test_rmap_extension():
    e = R.RmapExtensionData(version=1, flags=R.FLAG_DATA_FILE, offset=3 << 20, length=104,
                            nb_records=3, l1_table_offset=0x30000, l1_crc32=0xDEADBEEF,
                            data_crc32=0x01020304)
    assert R.encode_rmap_extension(e) == RMAP_EXTENSION
    assert R.decode_rmap_extension(RMAP_EXTENSION) == e
    # framed as a header extension: type "RMAP", length 48, no padding needed
    assert H.encode_extension(R.EXT_RMAP, RMAP_EXTENSION)[:8] == hexbytes(
        "524d4150",       # type "RMAP"
        "00000030",       # length 48
    )


RMAP_DATA_HEADER = hexbytes(
    "514b524d41500001",   # 0  magic "QKRMAP\0\1"
    "10",                 # 8  cluster_bits 16
    "0b",                 # 9  unit_bits 11: 2 KiB units (subclusters of extended L2)
    "01",                 # 10 hw: host gap in 1 byte
    "02",                 # 11 gw: guest unit in 2 bytes
    "03",                 # 12 cw: count in 3 bytes
    "000000",             # 13 reserved
    "0500000000000000",   # 16 nb_data_records 5 (little-endian)
    "0200000000000000",   # 24 nb_compressed_records 2
    "0000100000000000",   # 32 file_size_before 0x100000 (1 MiB)
)


def test_rmap_data_header():
    h = R.RmapDataHeaderFields(cluster_bits=16, unit_bits=11, host_width=1, guest_width=2,
                               count_width=3, nb_data_records=5, nb_compressed_records=2,
                               file_size_before=1 << 20)
    assert R.encode_rmap_data_header(h) == RMAP_DATA_HEADER
    assert R.decode_rmap_data_header(RMAP_DATA_HEADER) == h
    assert h.widths == (1, 2, 3)
    # anything else at the map's offset is not a map
    assert R.decode_rmap_data_header(bytes(40)) is None


# ------------------------------------------------------------------------------- the error funnel


def test_parse_refuses_short_input_naming_field_and_offset():
    with pytest.raises(InvalidHeaderError) as ei:
        parse(H.SnapshotHeader, SNAPSHOT_ENTRY[:39], what="snapshot table entry 0", offset=0x5000)
    assert (ei.value.field, ei.value.offset, ei.value.path) == ("snapshot table entry 0", 0x5000,
                                                                 None)
    assert "cut short (39 of 40 bytes)" in str(ei.value)
    with pytest.raises(CorruptImageError) as ei2:
        B.decode_bitmap_directory(BITMAP_ENTRY[:20], 1, offset=0x9000)
    assert (ei2.value.field, ei2.value.offset) == ("bitmap directory entry 0", 0x9000)
    with pytest.raises(InvalidHeaderError) as ei3:   # a construct failure: the magic
        parse(H.HeaderV2, b"QFI\xfa" + V3_ZSTD_HEADER[4:], what="header", offset=0)
    assert (ei3.value.field, ei3.value.offset) == ("header", 0)


def test_the_path_is_added_once():
    exc = InvalidHeaderError("bad l1_size", field="l1_size", offset=36)
    with pytest.raises(InvalidHeaderError) as ei:
        with located("/img/a.qcow2"):
            with located("/img/b.qcow2"):   # the innermost file is the one the error is about
                raise exc
    assert ei.value is exc and exc.path == "/img/b.qcow2"
    assert str(exc) == "/img/b.qcow2: bad l1_size (l1_size at offset 0x24)"
    assert exc.args == ("/img/b.qcow2: bad l1_size",)
