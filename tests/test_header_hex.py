"""qcow2 headers written out by hand as commented hex (in the style of fontTools' table tests).

Each structure below is the byte string the spec describes, one field a line.  The tests decode
it with qcow2kit's construct declarations (``qcow2kit.layout.header``) and expect the field values
written in the comments, then encode those values again and expect the same bytes.  Finally the
same hex, completed with a refcount table, a refcount block, an L1 and an L2 table and one data
cluster, is written to a file that qcow2kit opens (``read_header``, ``Image.open``) and that QEMU
accepts as well (``qemu-img info``, ``check`` and ``convert`` agree), which proves the hand-written
bytes are a real qcow2 image and not only our own idea of one.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qemu import QEMU_IMG, QEMU_IO, hexbytes, qemu_img_check, qemu_img_info
from qcow2kit import Image
from qcow2kit.image import read_header
from qcow2kit.info import image_info
from qcow2kit.layout import build, parse
from qcow2kit.layout.header import (FeatureNameEntry, FeatureNameTable, HeaderExtension,
                                    HeaderV2, HeaderV3Tail)
from qcow2kit.source import open_source

CLUSTER = 4096


# ------------------------------------------------------------------------------------------
# Version 3: 112-byte header, three extensions, then the backing file name


V3_HEADER = hexbytes(
    "514649fb",           # 0   magic "QFI\xfb"
    "00000003",           # 4   version 3
    "00000000000000c0",   # 8   backing_file_offset 192 (after the extensions)
    "0000000a",           # 16  backing_file_size 10 ("base.qcow2")
    "0000000c",           # 20  cluster_bits 12: 4 KiB clusters
    "0000000000100000",   # 24  size 1 MiB
    "00000000",           # 32  crypt_method 0: none
    "00000001",           # 36  l1_size 1 (one L2 table maps 512 * 4 KiB = 2 MiB)
    "0000000000003000",   # 40  l1_table_offset: cluster 3
    "0000000000001000",   # 48  refcount_table_offset: cluster 1
    "00000001",           # 56  refcount_table_clusters 1
    "00000000",           # 60  nb_snapshots 0
    "0000000000000000",   # 64  snapshots_offset 0
    "0000000000000000",   # 72  incompatible_features: none
    "0000000000000000",   # 80  compatible_features: none
    "0000000000000000",   # 88  autoclear_features: none
    "00000004",           # 96  refcount_order 4: 16-bit refcounts
    "00000070",           # 100 header_length 112
    "00",                 # 104 compression_type 0: deflate
    "00000000000000",     # 105 padding to 112
)

V3_EXT_BACKING_FORMAT = hexbytes(
    "e2792aca",           # 112 type: backing file format name
    "00000005",           # 116 length 5
    "71636f7732",         # 120 "qcow2"
    "000000",             # 125 padding to a multiple of 8
)

V3_EXT_FEATURE_TABLE = hexbytes(
    "6803f857",           # 128 type: feature name table
    "00000030",           # 132 length 48: one entry
    "00",                 # 136 entry type 0: incompatible
    "00",                 # 137 bit 0
    "6469727479206269740000000000000000000000000000"    # 138 "dirty bit", NUL padded
    "0000000000000000000000000000000000000000000000",   #     ... to 46 bytes
)

V3_EXT_END = hexbytes(
    "00000000",           # 184 type 0: end of the extensions
    "00000000",           # 188 length 0
)

BACKING_NAME = hexbytes(
    "626173652e71636f7732",   # 192 "base.qcow2" (10 bytes, not NUL-terminated)
)

V3_CLUSTER0 = V3_HEADER + V3_EXT_BACKING_FORMAT + V3_EXT_FEATURE_TABLE + V3_EXT_END + BACKING_NAME


# ------------------------------------------------------------------------------------------
# Version 2: 72-byte header, the backing file name right after it (no extensions)


V2_HEADER = hexbytes(
    "514649fb",           # 0   magic "QFI\xfb"
    "00000002",           # 4   version 2
    "0000000000000048",   # 8   backing_file_offset 72: right after the header
    "0000000a",           # 16  backing_file_size 10 ("base.qcow2")
    "0000000c",           # 20  cluster_bits 12: 4 KiB clusters
    "0000000000100000",   # 24  size 1 MiB
    "00000000",           # 32  crypt_method 0: none
    "00000001",           # 36  l1_size 1
    "0000000000003000",   # 40  l1_table_offset: cluster 3
    "0000000000001000",   # 48  refcount_table_offset: cluster 1
    "00000001",           # 56  refcount_table_clusters 1
    "00000000",           # 60  nb_snapshots 0
    "0000000000000000",   # 64  snapshots_offset 0
)

V2_CLUSTER0 = V2_HEADER + BACKING_NAME


# ------------------------------------------------------------------------------------------
# The rest of a 6-cluster image (the same for both versions; refcounts are 16 bits wide in v2)


REFCOUNT_TABLE = hexbytes(
    "0000000000002000",   # 0x1000 entry 0: refcount block at cluster 2
)

REFCOUNT_BLOCK = hexbytes(
    "0001",               # 0x2000 cluster 0 (header): refcount 1
    "0001",               #        cluster 1 (refcount table)
    "0001",               #        cluster 2 (refcount block)
    "0001",               #        cluster 3 (L1 table)
    "0001",               #        cluster 4 (L2 table)
    "0001",               #        cluster 5 (data)
)

L1_TABLE = hexbytes(
    "8000000000004000",   # 0x3000 entry 0: L2 table at cluster 4, COPIED (refcount 1)
)

L2_TABLE_V3 = hexbytes(
    "8000000000005000",   # 0x4000 guest cluster 0: data at cluster 5, COPIED
    "0000000000000001",   #        guest cluster 1: reads as zeros (v3 zero flag), over backing data
)                         #        guest clusters 2..: unallocated, read from base.qcow2

L2_TABLE_V2 = hexbytes(
    "8000000000005000",   # 0x4000 guest cluster 0: data at cluster 5, COPIED
)                         #        (v2 has no zero flag) guest clusters 1..: from base.qcow2

DATA = b"Q" * CLUSTER     # 0x5000 guest cluster 0: 4096 x "Q" (0x51)


def image_bytes(cluster0: bytes, l2: bytes) -> bytes:
    clusters = [cluster0, REFCOUNT_TABLE, REFCOUNT_BLOCK, L1_TABLE, l2, DATA]
    assert all(len(c) <= CLUSTER for c in clusters)
    return b"".join(c.ljust(CLUSTER, b"\0") for c in clusters)


# ------------------------------------------------------------------------------------------
# Decoding and re-encoding with the construct declarations

COMMON = dict(backing_file_offset=0xC0, backing_file_size=10, cluster_bits=12, size=1 << 20,
              crypt_method=0, l1_size=1, l1_table_offset=0x3000, refcount_table_offset=0x1000,
              refcount_table_clusters=1, nb_snapshots=0, snapshots_offset=0)
V3_FIELDS = dict(COMMON, version=3)
V3_TAIL_FIELDS = dict(incompatible_features=0, compatible_features=0, autoclear_features=0,
                      refcount_order=4, header_length=112)
V2_FIELDS = dict(COMMON, version=2, backing_file_offset=72)


def fields(container) -> dict:
    return {k: v for k, v in container.items() if not k.startswith("_")}


def test_hex_lengths():
    assert len(V3_HEADER) == 112 and len(V2_HEADER) == 72
    assert len(V3_EXT_BACKING_FORMAT) == 16 and len(V3_EXT_FEATURE_TABLE) == 56
    assert len(V3_HEADER + V3_EXT_BACKING_FORMAT + V3_EXT_FEATURE_TABLE + V3_EXT_END) == 0xC0
    assert len(BACKING_NAME) == 10


@pytest.mark.parametrize("raw, expected", [(V3_HEADER[:72], V3_FIELDS),
                                           (V2_HEADER, V2_FIELDS)], ids=["v3", "v2"])
def test_header_decodes_and_reencodes(raw, expected):
    h = parse(HeaderV2, raw, what="header", offset=0)
    assert fields(h) == dict(expected, magic=b"QFI\xfb")
    assert build(HeaderV2, h) == raw
    assert build(HeaderV2, expected) == raw      # from the values alone (magic is a Const)
    assert HeaderV2.sizeof() == 72


def test_v3_tail_decodes_and_reencodes():
    raw = V3_HEADER[72:104]
    t = parse(HeaderV3Tail, raw, what="header", offset=72)
    assert fields(t) == V3_TAIL_FIELDS
    assert build(HeaderV3Tail, t) == raw == build(HeaderV3Tail, V3_TAIL_FIELDS)
    assert V3_HEADER[104] == 0 and V3_HEADER[105:112] == bytes(7)   # compression type, padding


def test_v3_extensions_decode_and_reencode():
    raw = V3_EXT_BACKING_FORMAT + V3_EXT_FEATURE_TABLE + V3_EXT_END
    exts, pos = [], 0
    while True:
        e = parse(HeaderExtension, raw[pos:], what="header extension", offset=112 + pos)
        size = 8 + len(e.data) + len(e.padding)
        assert build(HeaderExtension, e) == raw[pos:pos + size]
        exts.append(e)
        pos += size
        if e.type == 0:
            break
    assert pos == len(raw)
    assert [(e.type, e.length) for e in exts] == [(0xE2792ACA, 5), (0x6803F857, 48), (0, 0)]
    assert exts[0].data == b"qcow2" and exts[0].padding == bytes(3)
    assert exts[1].padding == b"" and exts[2].data == b""

    entry = parse(FeatureNameEntry, exts[1].data, what="feature name table", offset=136)
    assert fields(entry) == {"type": 0, "bit": 0, "name": "dirty bit"}
    assert build(FeatureNameEntry, {"type": 0, "bit": 0, "name": "dirty bit"}) == exts[1].data
    assert [fields(x) for x in FeatureNameTable.parse(exts[1].data)] == [fields(entry)]

    built = b"".join(build(HeaderExtension, {"type": t, "length": len(d), "data": d,
                                             "padding": bytes(-len(d) % 8)})
                     for t, d in [(0xE2792ACA, b"qcow2"), (0x6803F857, exts[1].data), (0, b"")])
    assert built == raw


# ------------------------------------------------------------------------------------------
# The same bytes as files


BASE_REFCOUNT_BLOCK = REFCOUNT_BLOCK + hexbytes(
    "0001",               # 0x2000 cluster 6 (second data cluster): refcount 1
)

BASE_L2_TABLE = hexbytes(
    "0000000000000000",   # 0x4000 guest cluster 0: unallocated
    "8000000000005000",   #        guest cluster 1: data at cluster 5 ("B")
    "8000000000006000",   #        guest cluster 2: data at cluster 6 ("C")
)


def base_bytes() -> bytes:
    """base.qcow2: the v2 header without a backing file; guest clusters 1 and 2 hold B and C."""
    header = bytearray(V2_HEADER)
    header[8:20] = bytes(12)                     # backing_file_offset 0, backing_file_size 0
    clusters = [bytes(header), REFCOUNT_TABLE, BASE_REFCOUNT_BLOCK, L1_TABLE, BASE_L2_TABLE,
                b"B" * CLUSTER, b"C" * CLUSTER]
    return b"".join(c.ljust(CLUSTER, b"\0") for c in clusters)


@pytest.fixture
def hex_images(tmp_path) -> dict[str, Path]:
    """v3.qcow2 and v2.qcow2 from the hex above, beside their base.qcow2 (no QEMU needed)."""
    out = {}
    for name, cluster0, l2 in [("v3", V3_CLUSTER0, L2_TABLE_V3), ("v2", V2_CLUSTER0, L2_TABLE_V2)]:
        p = tmp_path / f"{name}.qcow2"
        p.write_bytes(image_bytes(cluster0, l2))
        out[name] = p
    (tmp_path / "base.qcow2").write_bytes(base_bytes())
    return out


def test_read_header_decodes_the_v3_file(hex_images):
    with open_source(hex_images["v3"]) as src:
        h = read_header(src)
    assert {k: getattr(h, k) for k in V3_FIELDS} == V3_FIELDS
    assert {k: getattr(h, k) for k in V3_TAIL_FIELDS} == V3_TAIL_FIELDS
    assert h.compression_type == 0 and h.compression_name == "zlib"
    assert h.backing_file == "base.qcow2" and h.backing_format == "qcow2"
    assert h.feature_names == {(0, 0): "dirty bit"}
    assert [(e.type, e.offset, e.data) for e in h.extensions] == [
        (0xE2792ACA, 112, b"qcow2"), (0x6803F857, 128, V3_EXT_FEATURE_TABLE[8:])]
    assert h.cluster_size == CLUSTER and h.refcount_bits == 16
    assert not (h.dirty or h.corrupt or h.extended_l2 or h.has_data_file or h.lazy_refcounts)


def test_read_header_decodes_the_v2_file(hex_images):
    with open_source(hex_images["v2"]) as src:
        h = read_header(src)
    assert {k: getattr(h, k) for k in V2_FIELDS} == V2_FIELDS
    assert h.header_length == 72 and h.refcount_order == 4 and h.compression_type == 0
    assert h.incompatible_features == h.compatible_features == h.autoclear_features == 0
    assert h.backing_file == "base.qcow2" and h.backing_format is None
    assert h.extensions == [] and h.feature_names == {}


def expected_guest(version: int) -> bytes:
    """Guest cluster 0: our "Q"; cluster 1: zeros in v3 (zero flag over the base's "B"), "B" in
    v2; cluster 2: the base's "C"; the rest reads as zeros."""
    data = bytearray(1 << 20)
    data[:CLUSTER] = DATA
    if version == 2:
        data[CLUSTER:2 * CLUSTER] = b"B" * CLUSTER
    data[2 * CLUSTER:3 * CLUSTER] = b"C" * CLUSTER
    return bytes(data)


@pytest.mark.parametrize("name", ["v3", "v2"])
def test_image_open_reads_the_hex_file(hex_images, name):
    with Image.open(hex_images[name]) as img:
        assert (img.size, img.cluster_size, img.header.version) == (1 << 20, CLUSTER,
                                                                     int(name[1]))
        assert img.l1_table.tolist() == [0x8000000000004000]
        assert img.read(0, 1 << 20) == expected_guest(int(name[1]))
        assert img.backing is not None and img.backing.read(CLUSTER, CLUSTER) == b"B" * CLUSTER
        assert img.backing.header.backing_file is None
        info = image_info(img)
    assert info["backing-filename"] == "base.qcow2"
    assert info["format-specific"]["data"]["compat"] == ("1.1" if name == "v3" else "0.10")


# ------------------------------------------------------------------------------------------
# QEMU agrees that the hand-written bytes are a valid image


@pytest.mark.qemu
@pytest.mark.skipif(not (QEMU_IMG and QEMU_IO), reason="needs qemu-img and qemu-io")
@pytest.mark.parametrize("name", ["v3", "v2"])
def test_qemu_accepts_the_hex_file(hex_images, name):
    path = hex_images[name]
    theirs = qemu_img_info(path, extra_args=["-f", "qcow2"])
    with Image.open(path) as img:
        ours = image_info(img)
    for key in ["virtual-size", "cluster-size", "format", "backing-filename", "dirty-flag",
                "full-backing-filename", "format-specific"]:
        assert ours.get(key) == theirs.get(key), key
    assert theirs["backing-filename"] == "base.qcow2"
    assert theirs.get("backing-filename-format") == ("qcow2" if name == "v3" else None)
    assert theirs["format-specific"]["data"]["refcount-bits"] == 16
    if name == "v3":
        assert theirs["format-specific"]["data"]["compression-type"] == "zlib"
        assert theirs["format-specific"]["data"]["corrupt"] is False

    _, check = qemu_img_check(path, ok=(0,))
    assert check["check-errors"] == 0 and check.get("corruptions", 0) == 0
    assert check.get("leaks", 0) == 0 and check["image-end-offset"] == 6 * CLUSTER
    assert check["allocated-clusters"] == 1

    raw = path.with_suffix(".raw")
    subprocess.run([QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", path.name, raw.name],
                   cwd=path.parent, check=True, capture_output=True)
    assert raw.read_bytes() == expected_guest(int(name[1]))
