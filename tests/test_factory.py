"""The factory proves itself: every case exists, passes (or deliberately fails) qemu-img check,
and qemu-img reports the feature the case is about, the content the builder modelled, the
snapshots and bitmaps it made. Only QEMU and a few header bytes are consulted, never qcow2kit."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

import factory
from qemu import (QEMU_NBD, SECRET, qemu_bitmap_dirty, qemu_img_check, qemu_img_info, qemu_img_map,
                  sha256_file)

pytestmark = pytest.mark.qemu

EXPECTED = {
    "cs512", "cs4k", "cs64k", "cs2M",
    "refbits1", "refbits2", "refbits4", "refbits8", "refbits16", "refbits32", "refbits64",
    "v2", "v2_snapshots", "compat11",
    "lazy_refcounts", "dirty_patched", "dirty_crashed",
    "prealloc_off", "prealloc_metadata", "prealloc_falloc", "prealloc_full",
    "snapshots", "vmstate",
    "bitmaps", "bitmaps_cs4k", "bitmap_in_use",
    "compressed_zlib", "compressed_zstd",
    "convert_zlib_4k", "convert_zlib_64k", "convert_zstd_4k", "convert_zstd_64k",
    "extl2_base", "extl2_backing", "extl2_16k", "extl2_2M",
    "chain3_base", "chain3_mid", "chain3",
    "backing_larger", "backing_smaller", "backing_relative", "backing_raw", "backing_nofmt",
    "backing_v2",
    "datafile_raw", "datafile",
    "luks", "aes",
    "size0", "size_unaligned",
    "discard_zero", "empty",
}
NAMES = sorted(EXPECTED)

_MISSING = object()


def dig(info, dotted: str):
    """`a.b.c` into nested JSON; a final `.len` gives the length; missing -> _MISSING."""
    cur = info
    for part in dotted.split("."):
        if part == "len" and isinstance(cur, list):
            return len(cur)
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def header(case: factory.ImageCase) -> dict:
    with open(case.path, "rb") as f:
        h = f.read(112)
    version, = struct.unpack(">I", h[4:8])
    out = dict(
        version=version,
        cluster_bits=struct.unpack(">I", h[20:24])[0],
        size=struct.unpack(">Q", h[24:32])[0],
        crypt_method=struct.unpack(">I", h[32:36])[0],
        l1_size=struct.unpack(">I", h[36:40])[0],
        l1_table_offset=struct.unpack(">Q", h[40:48])[0],
        nb_snapshots=struct.unpack(">I", h[60:64])[0],
    )
    if version >= 3:
        out.update(incompatible=struct.unpack(">Q", h[72:80])[0],
                   compatible=struct.unpack(">Q", h[80:88])[0],
                   autoclear=struct.unpack(">Q", h[88:96])[0],
                   refcount_order=struct.unpack(">I", h[96:100])[0],
                   header_length=struct.unpack(">I", h[100:104])[0])
    return out


def extension_types(case: factory.ImageCase) -> list[int]:
    h = header(case)
    with open(case.path, "rb") as f:
        cl0 = f.read(1 << h["cluster_bits"])
    pos, types = h.get("header_length", 72), []
    while True:
        t, n = struct.unpack(">II", cl0[pos:pos + 8])
        if t == 0:
            return types
        types.append(t)
        pos += 8 + ((n + 7) & ~7)


def compressed_descriptors(case: factory.ImageCase) -> list[tuple[int, int]]:
    """(host offset, end of last sector) of every compressed cluster in the active L1."""
    h = header(case)
    cb = h["cluster_bits"]
    cs = 1 << cb
    x = 62 - (cb - 8)
    out = []
    with open(case.path, "rb") as f:
        f.seek(h["l1_table_offset"])
        l1 = struct.unpack(f">{h['l1_size']}Q", f.read(8 * h["l1_size"]))
        for e in l1:
            l2_off = e & 0x00FFFFFFFFFFFE00
            if not l2_off:
                continue
            f.seek(l2_off)
            for m in struct.unpack(f">{cs // 8}Q", f.read(cs)):
                if m & (1 << 62):
                    off = m & ((1 << x) - 1)
                    extra = (m >> x) & ((1 << (cb - 8)) - 1)
                    out.append((off, (off & ~511) + (extra + 1) * 512))
    return out


@pytest.fixture(params=NAMES)
def case(request, factory_images) -> factory.ImageCase:
    return factory_images[request.param]


def test_every_case_built(factory_images):
    assert set(factory_images) == EXPECTED
    for c in factory_images.values():
        assert c.path.is_file(), c.name
        assert c.notes, c.name
        assert c.sha256, c.name


def test_check(case):
    rc, report = qemu_img_check(case)
    assert rc == case.check_rc, report
    if case.check_rc == 0:
        assert report["check-errors"] == 0
        assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0


def test_info_claims(case):
    info = qemu_img_info(case)
    assert case.expect, case.name
    for key, want in case.expect.items():
        got = dig(info, key)
        if want is None:
            assert got is _MISSING, f"{case.name}: {key} should be absent, is {got!r}"
        else:
            assert got == want, f"{case.name}: {key} = {got!r}, expected {want!r}"


def test_backing_chain(case):
    chain = qemu_img_info(case, backing_chain=True)
    assert len(chain) == case.backing_depth + 1
    assert case.has_backing == (case.backing_depth > 0)
    for info, path in zip(chain[1:], case.backing_chain):
        assert Path(info["filename"]).resolve() == path.resolve()


def test_snapshots(case):
    info = qemu_img_info(case)
    assert [s["name"] for s in info.get("snapshots", [])] == case.snapshots
    assert set(case.snapshot_sha256) == set(case.snapshots)


def test_bitmaps(case):
    info = qemu_img_info(case)
    listed = dig(info, "format-specific.data.bitmaps")
    got = {b["name"]: (b["granularity"], set(b["flags"]))
           for b in ([] if listed is _MISSING else listed)}
    want = {b.name: (b.granularity, ({"auto"} if b.enabled else set()) |
                     ({"in-use"} if b.in_use else set())) for b in case.bitmaps}
    assert got == want


def test_content_matches_model(case, qemu_raw):
    """The guest view qemu-img reads is byte for byte what the builder modelled."""
    raw = qemu_raw(case)
    assert raw.stat().st_size == case.virtual_size
    assert sha256_file(raw) == case.sha256


def test_snapshot_content_matches_model(factory_images, qemu_raw):
    n = 0
    for c in factory_images.values():
        for name, digest in c.snapshot_sha256.items():
            assert sha256_file(qemu_raw(c, name)) == digest, (c.name, name)
            n += 1
    assert n >= 10


def test_bitmap_dirty_ranges(factory_images):
    if QEMU_NBD is None:
        pytest.skip("qemu-nbd not found")
    seen_dirty = seen_clean = 0
    for c in factory_images.values():
        for b in c.bitmaps:
            if b.in_use:
                continue  # qemu-nbd refuses an inconsistent bitmap
            assert qemu_bitmap_dirty(c, b.name) == b.dirty, (c.name, b.name)
            seen_dirty += bool(b.dirty)
            seen_clean += not b.dirty
    assert seen_dirty >= 5 and seen_clean >= 2


# ---- feature-specific evidence ------------------------------------------------------------

def test_cluster_sizes(factory_images):
    for name, bits in (("cs512", 9), ("cs4k", 12), ("cs64k", 16), ("cs2M", 21)):
        assert header(factory_images[name])["cluster_bits"] == bits


def test_refcount_orders(factory_images):
    for bits in (1, 2, 4, 8, 16, 32, 64):
        c = factory_images[f"refbits{bits}"]
        assert 1 << header(c)["refcount_order"] == bits
        assert bool(c.snapshots) == (bits >= 2)  # refcount 2 present where it fits


def test_versions(factory_images):
    for name in ("v2", "v2_snapshots", "backing_v2"):
        assert header(factory_images[name])["version"] == 2
    assert header(factory_images["compat11"])["version"] == 3
    assert len(factory_images["v2_snapshots"].snapshots) == 2


def test_dirty_bits(factory_images):
    for name in ("dirty_patched", "dirty_crashed"):
        h = header(factory_images[name])
        assert h["incompatible"] & 1 and h["compatible"] & 1
    assert not header(factory_images["lazy_refcounts"])["incompatible"] & 1


def test_preallocation(factory_images):
    for mode in ("metadata", "falloc", "full"):
        c = factory_images[f"prealloc_{mode}"]
        # every guest cluster has a host offset
        assert all("offset" in e for e in qemu_img_map(c)), mode
        assert c.path.stat().st_size >= c.virtual_size
    off = factory_images["prealloc_off"]
    assert any("offset" not in e for e in qemu_img_map(off))
    assert off.path.stat().st_size < off.virtual_size
    full = factory_images["prealloc_full"]
    assert full.path.stat().st_blocks * 512 >= full.virtual_size


def test_compressed_clusters(factory_images):
    for c in factory_images.values():
        if "compressed" in c.tags:
            rc, report = qemu_img_check(c)
            assert report.get("compressed-clusters", 0) > 0, c.name


@pytest.mark.parametrize("name", ["convert_zlib_4k", "convert_zlib_64k",
                                  "convert_zstd_4k", "convert_zstd_64k",
                                  "compressed_zlib", "compressed_zstd"])
def test_compressed_streams_cross_host_clusters(factory_images, name):
    c = factory_images[name]
    descs = compressed_descriptors(c)
    assert descs
    cs = c.cluster_size
    crossing = [d for d in descs if d[0] // cs != (d[1] - 1) // cs]
    assert crossing, f"{name}: no compressed stream crosses a host cluster boundary"
    if name.startswith("convert"):
        rc, report = qemu_img_check(c)
        # some clusters were incompressible and stored plain, some all-zero were left out
        assert report["allocated-clusters"] > report["compressed-clusters"]
        assert report["allocated-clusters"] < report["total-clusters"]
    assert bool(header(c)["incompatible"] & 8) == ("zstd" in name)


def test_extended_l2_subclusters(factory_images):
    for name, sub in (("extl2_backing", 2048), ("extl2_16k", 512), ("extl2_2M", 64 * 1024)):
        c = factory_images[name]
        assert header(c)["incompatible"] & 16
        extents = qemu_img_map(c)
        # extents at subcluster granularity (smaller than a cluster) exist
        assert any(e["length"] % c.cluster_size for e in extents), name
        assert any(e["start"] % c.cluster_size and e["start"] % sub == 0 for e in extents), name
    top = qemu_img_map(factory_images["extl2_backing"])
    assert any(e["depth"] == 1 for e in top)  # unallocated subclusters read from the backing
    assert any(e["depth"] == 0 and e["zero"] for e in top)


def test_chain3(factory_images):
    top = factory_images["chain3"]
    chain = qemu_img_info(top, backing_chain=True)
    assert [i["filename"].rsplit("/", 1)[1] for i in chain] == [
        "chain3.qcow2", "chain3_mid.qcow2", "chain3_base.qcow2"]
    depths = {e["depth"] for e in qemu_img_map(top)}
    assert {0, 1, 2} <= depths


def test_backing_sizes(factory_images):
    lg = factory_images["backing_larger"]
    sm = factory_images["backing_smaller"]
    base_lg = qemu_img_info(lg.backing_chain[0])["virtual-size"]
    base_sm = qemu_img_info(sm.backing_chain[0])["virtual-size"]
    assert lg.virtual_size > base_lg and base_lg % lg.cluster_size
    assert sm.virtual_size < base_sm
    assert qemu_img_info(lg)["backing-filename"].startswith("/")


def test_backing_relative(factory_images):
    c = factory_images["backing_relative"]
    info = qemu_img_info(c)
    assert info["backing-filename"] == "../B/base.qcow2"
    assert c.path.parent.name == "A"
    assert (c.path.parent / info["backing-filename"]).resolve() == c.backing_chain[0].resolve()


def test_backing_raw_and_nofmt(factory_images):
    chain = qemu_img_info(factory_images["backing_raw"], backing_chain=True)
    assert chain[1]["format"] == "raw"
    nofmt = factory_images["backing_nofmt"]
    assert factory.EXT_BACKING_FORMAT not in extension_types(nofmt)
    assert factory.EXT_BACKING_FORMAT in extension_types(factory_images["chain3"])
    chain = qemu_img_info(nofmt, backing_chain=True)
    assert chain[1]["format"] == "qcow2"  # probed


def test_data_files(factory_images):
    for name, raw in (("datafile_raw", True), ("datafile", False)):
        c = factory_images[name]
        h = header(c)
        assert h["incompatible"] & 4
        assert bool(h["autoclear"] & 2) == raw
        assert c.data_file is not None and c.data_file.stat().st_size > 0
        assert 0x44415441 in extension_types(c)


def test_encryption(factory_images):
    assert header(factory_images["luks"])["crypt_method"] == 2
    assert header(factory_images["aes"])["crypt_method"] == 1
    for name in ("luks", "aes"):
        c = factory_images[name]
        assert c.encrypted and c.secret == SECRET
        assert any(e["data"] for e in qemu_img_map(c))


def test_sizes(factory_images):
    z = factory_images["size0"]
    assert header(z)["size"] == 0 and header(z)["l1_size"] == 0
    u = factory_images["size_unaligned"]
    assert header(u)["size"] == 1000448 and u.virtual_size % u.cluster_size


def test_discard_and_zero(factory_images):
    extents = qemu_img_map(factory_images["discard_zero"])
    zero_alloc = [e for e in extents if e["zero"] and "offset" in e]
    zero_unalloc = [e for e in extents if e["zero"] and "offset" not in e and e["present"]]
    assert zero_alloc and zero_unalloc


def test_vmstate_l1_beyond_disk(factory_images):
    c = factory_images["vmstate"]
    h = header(c)
    l2_span = c.cluster_size * (c.cluster_size // 8)
    assert h["l1_size"] > -(-c.virtual_size // l2_span)


def test_clone(factory_images, clone_image):
    c = clone_image(factory_images["chain3"])
    assert c.path != factory_images["chain3"].path and c.path.is_file()
    assert qemu_img_info(c, backing_chain=True)[2]["filename"] == str(c.backing_chain[1])
