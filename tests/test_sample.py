"""qcow2kit.sample: synthetic fragmented images, checked against the real QEMU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from qcow2kit import spec
from qemu import qemu_img_check, run_process
from qemu import qemu_img_map as qemu_map
from qcow2kit.sample import (
    KIND_COMPRESSED,
    KIND_NORMAL,
    KIND_UNALLOCATED,
    KIND_ZERO,
    cluster_pattern,
    make_fragmented_image,
)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="needs qemu-img and qemu-io (qemu-utils)")

MiB = 1 << 20

# name -> keyword arguments of make_fragmented_image
CASES = {
    # 512-byte clusters: 512 L2 tables, ~80 refcount blocks, a 2-cluster refcount table, packed
    # compressed clusters (several per host cluster, some crossing a cluster boundary)
    "cb9-many-tables-compressed": dict(cluster_bits=9, virtual_size=16 * MiB, fill=0.6,
                                       compressed_fraction=0.2, seed=3),
    # 4 KiB clusters, size not a multiple of the cluster size, sparse
    "cb12-odd-size-sparse": dict(cluster_bits=12, virtual_size=10 * MiB + 1536, fill=0.3, seed=4),
    # 64 KiB clusters, every cluster allocated (no room for zero clusters), odd size
    "cb16-full": dict(cluster_bits=16, virtual_size=24 * MiB + 512, fill=1.0, seed=5),
    # 2 MiB clusters, odd size, some compressed
    "cb21-compressed": dict(cluster_bits=21, virtual_size=40 * MiB + 4096, fill=0.5,
                            compressed_fraction=0.2, seed=6),
    # nothing allocated, only zero clusters
    "cb16-empty": dict(cluster_bits=16, virtual_size=8 * MiB, fill=0.0, zero_fraction=0.25),
    # nothing at all
    "cb16-no-zero": dict(cluster_bits=16, virtual_size=4 * MiB, fill=0.0, zero_fraction=0.0),
}


def run(*args: str, ok=(0,)) -> subprocess.CompletedProcess:
    return run_process(args, ok=ok)


def qemu_check(path) -> dict:
    """qemu-img check's report, which must be clean (exit status 0, no errors, no leaks)."""
    _, report = qemu_img_check(path, ok=(0,))
    assert report.get("check-errors", 0) == 0
    assert report.get("corruptions", 0) == 0
    assert report.get("leaks", 0) == 0
    return report


def assert_converted_equal(info, tmp_path, image=None, written=()) -> None:
    """``qemu-img convert -O raw`` of ``image`` (default: the sample) equals the expected bytes,
    except the ``written`` ranges (offset, length, byte) that hold a fill byte."""
    raw = tmp_path / "converted.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image or info.path), str(raw))
    assert os.path.getsize(raw) == info.virtual_size
    step = 4 * MiB + 512        # not a multiple of the cluster size: exercises partial clusters
    with open(raw, "rb") as f:
        pos = 0
        while pos < info.virtual_size:
            n = min(step, info.virtual_size - pos)
            got = f.read(n)
            exp = bytearray(info.expected_guest_bytes(pos, n))
            for off, length, byte in written:
                lo, hi = max(off, pos), min(off + length, pos + n)
                if lo < hi:
                    exp[lo - pos:hi - pos] = bytes([byte]) * (hi - lo)
            if got != exp:
                bad = next(i for i in range(n) if got[i] != exp[i]) + pos
                g = bad // info.cluster_size
                pytest.fail(f"guest byte {bad:#x} (cluster {g}, kind {info.kinds[g]}, "
                            f"host {info.host_offsets[g]:#x}) differs")
            pos += n
    raw.unlink()


def assert_map_matches(info, extents) -> None:
    cs = info.cluster_size
    starts = np.array([e["start"] for e in extents], dtype=np.int64)
    assert starts[0] == 0
    assert sum(e["length"] for e in extents) == info.virtual_size
    guest = np.arange(info.guest_clusters, dtype=np.int64) * cs
    idx = np.searchsorted(starts, guest, side="right") - 1
    for g in range(info.guest_clusters):
        e = extents[idx[g]]
        kind = info.kinds[g]
        if kind == KIND_NORMAL:
            assert e["data"] and "offset" in e, (g, e)
            assert e["offset"] + (g * cs - e["start"]) == info.host_offsets[g], (g, e)
            assert info.host_offset_of(g) == info.host_offsets[g]
        elif kind == KIND_COMPRESSED:
            assert e["data"] and "offset" not in e, (g, e)
            assert info.host_offset_of(g) == -1
        else:
            assert not e["data"] and e["zero"], (g, e)
            assert info.host_offset_of(g) == -1


@pytest.fixture(scope="module", params=list(CASES))
def sample(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    info = make_fragmented_image(tmp / "img.qcow2", **CASES[request.param])
    return request.param, info, tmp


def test_qemu_img_check_clean(sample):
    name, info, _ = sample
    report = qemu_check(info.path)
    assert report["image-end-offset"] == info.file_size == os.path.getsize(info.path)
    assert report.get("allocated-clusters", 0) == info.allocated_clusters
    assert report.get("compressed-clusters", 0) == info.compressed_clusters
    assert report.get("total-clusters", info.guest_clusters) == info.guest_clusters


def test_counts_and_arrays(sample):
    name, info, _ = sample
    kw = CASES[name]
    n = info.guest_clusters
    assert n == -(-kw["virtual_size"] // info.cluster_size)
    assert info.allocated_clusters == round(kw["fill"] * n)
    assert np.count_nonzero(info.kinds >= KIND_NORMAL) == info.allocated_clusters
    assert np.count_nonzero(info.kinds == KIND_COMPRESSED) == info.compressed_clusters
    assert np.count_nonzero(info.kinds == KIND_ZERO) == info.zero_clusters
    assert info.zero_clusters == min(n - info.allocated_clusters,
                                     round(kw.get("zero_fraction", 0.05) * n))
    if kw.get("compressed_fraction"):
        assert info.compressed_clusters > 0
    normal = info.kinds == KIND_NORMAL
    assert (info.host_offsets[normal] > 0).all() and (info.host_offsets[~normal] == -1).all()
    assert (info.host_offsets[normal] % info.cluster_size == 0).all()
    assert np.unique(info.host_offsets[normal]).shape[0] == info.normal_clusters
    assert (info.host_offsets < info.file_size).all()
    comp = info.kinds == KIND_COMPRESSED
    assert (info.compressed_offsets[comp] > 0).all() and (info.compressed_offsets[~comp] == -1).all()
    assert (info.compressed_lengths[comp] < info.cluster_size).all()
    if name == "cb9-many-tables-compressed":
        # packed like QEMU packs them: shared host clusters, and some data crossing a boundary
        first = info.compressed_offsets[comp] >> info.cluster_bits
        last = (info.compressed_offsets[comp] + info.compressed_lengths[comp] - 1) >> info.cluster_bits
        assert np.unique(first).shape[0] < first.shape[0] // 2
        assert np.count_nonzero(last != first) > 0
        assert np.count_nonzero(info.compressed_offsets[comp] % 512) > 0


def test_qemu_img_convert_equals_expected(sample, tmp_path):
    _, info, _ = sample
    assert_converted_equal(info, tmp_path)


def test_qemu_img_map_matches_host_mapping(sample):
    _, info, _ = sample
    assert_map_matches(info, qemu_map(info.path))


def test_qemu_io_writes_keep_image_clean(sample, tmp_path):
    """QEMU can use the image: partial writes into clusters of every kind (copy-on-write of a
    compressed cluster frees its share of a packed host cluster), then check and read back."""
    _, info, _ = sample
    img = tmp_path / "copy.qcow2"
    shutil.copyfile(info.path, img)
    cs = info.cluster_size
    targets = []
    for kind in (KIND_NORMAL, KIND_COMPRESSED, KIND_ZERO, KIND_UNALLOCATED):
        hits = np.flatnonzero(info.kinds == kind)
        if hits.shape[0]:
            targets.append(int(hits[hits.shape[0] // 2]))
    targets.append(info.guest_clusters - 1)     # the last, possibly partial, cluster
    written = []
    for i, g in enumerate(dict.fromkeys(targets)):
        avail = min(cs, info.virtual_size - g * cs)
        written.append((g * cs + avail // 4, max(1, avail // 2), 0x40 + i))
    run("qemu-io", "-f", "qcow2", *[a for off, n, byte in written
                                    for a in ("-c", f"write -P {byte} {off} {n}")], str(img))
    qemu_check(img)
    assert_converted_equal(info, tmp_path, image=img, written=written)


def qemu_img_create_header(tmp_path, size: int, cluster_size: int) -> tuple[bytes, list[int]]:
    """Cluster 0 and the refcount table entries of the file ``qemu-img create`` makes."""
    ref = tmp_path / "qemu-created.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", str(ref),
        str(size))
    with open(ref, "rb") as f:
        head = f.read(cluster_size)
        table_offset = int.from_bytes(head[48:56], "big")
        table_clusters = int.from_bytes(head[56:60], "big")
        f.seek(table_offset)
        table = np.frombuffer(f.read(table_clusters * cluster_size), dtype=">u8")
    ref.unlink()
    return head, [int(x) for x in table[table != 0]]


def test_layout_fragmented(tmp_path):
    info = make_fragmented_image(tmp_path / "i.qcow2", cluster_bits=9, virtual_size=4 * MiB,
                                 fill=0.5, seed=11)
    qemu_check(info.path)
    data = np.sort(info.host_offsets[info.host_offsets >= 0])
    l2 = np.sort(info.l2_table_offsets[info.l2_table_offsets >= 0])
    assert l2.shape[0] == info.l1_size > 1
    # the front is the file qemu-img create writes (the builder starts from it)
    head, blocks_ref = qemu_img_create_header(tmp_path, info.virtual_size, info.cluster_size)
    assert info.l1_table_offset == int.from_bytes(head[40:48], "big")
    assert info.refcount_table_offset == int.from_bytes(head[48:56], "big")
    # the file outgrows many refcount blocks; the first one covers the front
    blocks = info.refcount_block_offsets
    assert blocks.shape[0] > 2 and blocks[0] == blocks_ref[0] < data[0]
    assert len(set(blocks.tolist()) | set(l2.tolist()) | set(data.tolist())) == (
        blocks.shape[0] + l2.shape[0] + data.shape[0])
    # guest clusters are not in host order
    host_order = info.guest_clusters_in_host_order()
    assert host_order.shape[0] == info.normal_clusters
    assert not (np.diff(host_order) > 0).all()
    assert np.count_nonzero(np.diff(host_order) < 0) > host_order.shape[0] // 3
    assert (np.diff(info.host_offsets[host_order]) > 0).all()


def test_front_larger_than_one_refcount_block(tmp_path):
    # 512 MiB with 512-byte clusters: a 256-cluster L1 table, so the metadata in front of the data
    # needs two refcount blocks
    info = make_fragmented_image(tmp_path / "f.qcow2", cluster_bits=9, virtual_size=512 * MiB,
                                 fill=0.0005, zero_fraction=0.001, seed=2)
    per_block = info.cluster_size * 8 // 16
    assert info.l1_table_offset // info.cluster_size + info.l1_size * 8 // info.cluster_size > per_block
    # the second refcount block is where QEMU puts it when it creates the image
    head, blocks_ref = qemu_img_create_header(tmp_path, info.virtual_size, info.cluster_size)
    assert info.l1_table_offset == int.from_bytes(head[40:48], "big")
    assert info.refcount_block_offsets[:2].tolist() == blocks_ref[:2]
    report = qemu_check(info.path)
    assert report["allocated-clusters"] == info.allocated_clusters
    extents = qemu_map(info.path)
    for e in extents:
        if e["data"]:
            for pos in range(e["start"], e["start"] + e["length"], info.cluster_size):
                g = pos // info.cluster_size
                assert info.host_offset_of(g) == e["offset"] + pos - e["start"]
    assert sum(e["length"] for e in extents if e["data"]) == info.allocated_clusters * info.cluster_size


def test_defaults(tmp_path):
    info = make_fragmented_image(tmp_path / "d.qcow2")
    assert info.virtual_size == 256 * MiB and info.cluster_size == 64 * 1024
    assert info.allocated_clusters == 3072 and info.compressed_clusters == 0
    assert info.zero_clusters == round(0.05 * 4096)
    # not bigger than needed: header, refcount table and block, L1, one L2 table, the data
    assert info.file_size == (4 + 1 + info.allocated_clusters) * info.cluster_size
    report = qemu_check(info.path)
    assert report["image-end-offset"] == info.file_size
    extents = qemu_map(info.path)
    rng = np.random.default_rng(0)
    by_start = {e["start"]: e for e in extents}
    for g in rng.choice(np.flatnonzero(info.kinds == KIND_NORMAL), 50, replace=False).tolist():
        e = by_start[g * info.cluster_size]
        assert e["offset"] == info.host_offset_of(g)


def test_header_fields(tmp_path):
    info = make_fragmented_image(tmp_path / "h.qcow2", cluster_bits=12, virtual_size=MiB)
    with open(info.path, "rb") as f:
        head = f.read(4096)
    assert head[:4] == spec.QCOW_MAGIC
    assert int.from_bytes(head[4:8], "big") == 3
    assert int.from_bytes(head[96:100], "big") == 4        # refcount_order
    assert int.from_bytes(head[100:104], "big") == 112     # header_length
    assert head[104] == 0                                  # compression_type: deflate
    assert int.from_bytes(head[72:96], "big") == 0         # no feature bits
    # QEMU leaves the feature-name table out with 4 KiB clusters: cluster 0 is qemu-img create's
    assert head == qemu_img_create_header(tmp_path, MiB, 4096)[0]
    assert int.from_bytes(head[112:116], "big") == spec.EXT_END
    info_json = json.loads(run("qemu-img", "info", "--output=json", info.path).stdout)
    data = info_json["format-specific"]["data"]
    assert info_json["virtual-size"] == MiB and info_json["cluster-size"] == 4096
    assert data["compat"] == "1.1" and data["refcount-bits"] == 16
    assert data["compression-type"] == "zlib" and not data["corrupt"]


def test_deterministic_and_seeded(tmp_path):
    kw = dict(cluster_bits=12, virtual_size=2 * MiB, compressed_fraction=0.3)
    a = make_fragmented_image(tmp_path / "a.qcow2", seed=7, **kw)
    b = make_fragmented_image(tmp_path / "b.qcow2", seed=7, **kw)
    c = make_fragmented_image(tmp_path / "c.qcow2", seed=8, **kw)
    assert open(a.path, "rb").read() == open(b.path, "rb").read()
    assert not np.array_equal(a.host_offsets, c.host_offsets)


def test_expected_guest_bytes_pattern(tmp_path):
    info = make_fragmented_image(tmp_path / "p.qcow2", cluster_bits=9, virtual_size=64 * 1024,
                                 fill=0.5, tag=0xA5)
    cs = info.cluster_size
    g = int(np.flatnonzero(info.kinds == KIND_NORMAL)[3])
    whole = info.expected_guest_bytes(g * cs, cs)
    assert whole == cluster_pattern(g, 9, tag=0xA5)
    words = np.frombuffer(whole, dtype=">u8")
    assert (words == (np.arange(g * cs, g * cs + cs, 8, dtype=np.uint64) | np.uint64(0xA5 << 56))).all()
    # unaligned sub-ranges are slices of the same bytes, across cluster boundaries too
    span = info.expected_guest_bytes(0, info.virtual_size)
    for off, n in ((g * cs + 3, 11), (g * cs - 5, 17), (1, cs * 3), (info.virtual_size - 7, 7)):
        assert info.expected_guest_bytes(off, n) == span[off:off + n]
    empty = int(np.flatnonzero(info.kinds < KIND_NORMAL)[0])
    assert info.expected_guest_bytes(empty * cs, cs) == bytes(cs)
    # and the file holds that pattern at the host offset
    with open(info.path, "rb") as f:
        f.seek(info.host_offset_of(g))
        assert f.read(cs) == whole
    with pytest.raises(ValueError):
        info.expected_guest_bytes(info.virtual_size - 1, 2)


@pytest.mark.parametrize("kw", [dict(cluster_bits=8), dict(cluster_bits=22), dict(fill=1.5),
                                dict(virtual_size=1000), dict(compressed_fraction=-0.1),
                                dict(tag=256)])
def test_bad_arguments(tmp_path, kw):
    with pytest.raises(ValueError):
        make_fragmented_image(tmp_path / "x.qcow2", **kw)
