"""The codec both ways: decode(encode(x)) == x for generated values (hypothesis), and
encode(decode(raw)) == raw for every structure of every image the QEMU factory makes
(cluster 0, L1 and L2 tables, the refcount table and blocks, snapshot tables, bitmap
directories)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qcow2kit import spec
from qcow2kit import tables as T
from qcow2kit.image import Image
from qcow2kit.layout import bitmaps as B
from qcow2kit.layout import header as H
from qcow2kit.layout import rmap as R
from qcow2kit.layout import snapshots as S

u8 = st.integers(0, (1 << 8) - 1)
u16 = st.integers(0, (1 << 16) - 1)
u32 = st.integers(0, (1 << 32) - 1)
u64 = st.integers(0, (1 << 64) - 1)
SETTINGS = settings(max_examples=150, deadline=None)

# ------------------------------------------------------------------------------- header


@st.composite
def header_fields(draw) -> dict:
    version = draw(st.sampled_from([2, 3]))
    f = {"version": version, "backing_file_offset": draw(u64), "backing_file_size": draw(u32),
             "cluster_bits": draw(u32), "size": draw(u64), "crypt_method": draw(u32),
             "l1_size": draw(u32), "l1_table_offset": draw(u64), "refcount_table_offset": draw(u64),
             "refcount_table_clusters": draw(u32), "nb_snapshots": draw(u32),
             "snapshots_offset": draw(u64)}
    if version == 3:
        extra = draw(st.sampled_from([0, 1, 8, 16, 40]))   # bytes past the fixed 104
        f.update(incompatible_features=draw(u64), compatible_features=draw(u64),
                 autoclear_features=draw(u64), refcount_order=draw(u32),
                 header_length=104 + extra)
        if extra:
            f["compression_type"] = draw(u8)
            f["padding"] = draw(st.binary(min_size=min(7, extra - 1), max_size=min(7, extra - 1)))
        if extra > 8:
            f["unknown_fields"] = draw(st.binary(min_size=extra - 8, max_size=extra - 8))
    return f


@SETTINGS
@given(header_fields())
def test_header_decode_encode(fields):
    raw = H.encode_header(fields)
    assert len(raw) == (72 if fields["version"] == 2 else fields["header_length"])
    assert H.decode_header(raw) == fields
    assert H.header_length_of(raw) == len(raw)


@SETTINGS
@given(header_fields(), st.data())
def test_one_field_patch_is_the_field_of_the_whole_header(fields, data):
    raw = bytearray(H.encode_header(fields))
    names = [n for n, f in H.HEADER_FIELDS.items() if f.offset + f.size <= len(raw)
             and n not in ("magic", "padding", "version", "header_length")]
    name = data.draw(st.sampled_from(names))
    value = data.draw(st.integers(0, (1 << (8 * H.HEADER_FIELDS[name].size)) - 1))
    off, patch = H.field_patch(name, value)
    raw[off:off + len(patch)] = patch
    assert H.decode_field(name, bytes(raw)) == value
    assert H.decode_header(bytes(raw))[name] == value


extensions = st.lists(st.tuples(u32.filter(lambda t: t != 0), st.binary(max_size=64)),
                      max_size=6)


@SETTINGS
@given(extensions)
def test_extensions_decode_encode(exts):
    raw = H.encode_extensions(exts)
    assert len(raw) % 8 == 0
    assert H.decode_extensions(raw, 0) == (exts, len(raw))


feature_entries = st.lists(st.tuples(st.tuples(st.integers(0, 2), st.integers(0, 63)),
                                     st.text("abcdefghijklmnopqrstuvwxyz ", max_size=46)),
                           max_size=10)


@SETTINGS
@given(feature_entries)
def test_feature_table_decode_encode(entries):
    assert H.decode_feature_table(H.encode_feature_table(entries)) == entries


@SETTINGS
@given(u32, u64, u64, u32, u64, u64)
def test_bitmaps_and_crypto_extensions_decode_encode(nb, size, off, reserved, coff, clen):
    b = H.decode_bitmaps_extension(H.encode_bitmaps_extension(nb, size, off, reserved))
    assert b == {"nb_bitmaps": nb, "reserved32": reserved, "bitmap_directory_size": size,
                 "bitmap_directory_offset": off}
    assert H.decode_crypto_extension(H.encode_crypto_extension(coff, clen)) == \
        {"offset": coff, "length": clen}


@SETTINGS
@given(st.text(min_size=1, max_size=60).filter(lambda s: "\0" not in s))
def test_name_extension_decode_encode(name):
    assert H.decode_name_extension(H.encode_name_extension(name)) == name


@SETTINGS
@given(header_fields(), extensions, st.none() | st.binary(min_size=1, max_size=80))
def test_header_area_decode_encode(fields, exts, backing):
    area = H.HeaderArea(fields, exts, backing)
    raw = H.encode_header_area(area, place_backing_file=True)
    back = H.decode_header_area(raw + bytes(64))
    assert back.extensions == exts and back.backing_file == backing
    if backing is not None:
        assert back.fields["backing_file_offset"] + len(backing) == len(raw)
    assert H.encode_header_area(back) == raw


# ------------------------------------------------------------------------------- tables


@SETTINGS
@given(st.lists(u64, max_size=64))
def test_u64_table_decode_encode(values):
    arr = np.array(values, dtype=np.uint64)
    raw = T.encode_u64_table(arr)
    assert raw == b"".join(v.to_bytes(8, "big") for v in values)
    assert T.decode_u64_table(raw).tolist() == values


@SETTINGS
@given(st.lists(st.integers(0, (1 << 47) - 1), max_size=32), st.booleans())
def test_l1_entries(clusters, copied):
    offs = np.array(clusters, dtype=np.uint64) << np.uint64(9)
    l1 = T.l1_entries(offs, copied)
    assert (T.l1_offsets(l1) == offs).all()
    assert (((l1 >> np.uint64(63)) == 1) == ((offs != 0) & copied)).all()


geometries = st.builds(T.L2Geometry, st.integers(9, 21), st.booleans(), st.booleans()).filter(
    lambda g: not g.extended or g.cluster_bits >= 14)


@st.composite
def l2_words(draw):
    """Entry words (and bitmaps) of a valid L2 table slice: no INVALID units."""
    geo = draw(geometries)
    n = draw(st.integers(1, 16))
    entries, bitmaps = [], []
    for _ in range(n):
        kind = draw(st.sampled_from(["unalloc", "zero", "zero_alloc", "data", "compressed"]))
        cluster = draw(st.integers(1 if not geo.has_data_file else 0, (1 << 20)))
        off = cluster << geo.cluster_bits
        copied = draw(st.booleans()) << 63
        if kind == "compressed" and not geo.has_data_file:
            coff = draw(st.integers(0, (1 << geo.csize_shift) - 1))
            nsect = draw(st.integers(0, (1 << (geo.cluster_bits - 8)) - 1))
            entries.append(spec.OFLAG_COMPRESSED | (nsect << geo.csize_shift) | coff)
            bitmaps.append(draw(u64))                    # ignored for compressed clusters
            continue
        if geo.extended:
            alloc = draw(u32) if kind in ("data", "zero_alloc") else 0
            zero = draw(u32) & ~alloc if kind != "unalloc" else 0
            if kind in ("data", "zero_alloc"):
                entries.append(off | (spec.OFLAG_COPIED if geo.has_data_file else copied))
            else:
                entries.append(0)
            bitmaps.append(alloc | (zero << 32))
        else:
            word = {"unalloc": 0, "zero": 1, "zero_alloc": off | 1 | copied,
                    "data": off | copied}.get(kind, 0)
            if geo.has_data_file and kind in ("data", "zero_alloc"):
                word |= spec.OFLAG_COPIED
            entries.append(word)
    e = np.array(entries, dtype=np.uint64)
    b = np.array(bitmaps, dtype=np.uint64) if geo.extended else None
    return geo, e, b


@SETTINGS
@given(l2_words())
def test_l2_raw_decode_encode(case):
    geo, e, b = case
    raw = T.encode_l2(e, b)
    assert len(raw) == e.shape[0] * geo.entry_size
    e2, b2 = T.decode_l2(raw, geo)
    assert (e2 == e).all()
    assert (b is None and b2 is None) or (b2 == b).all()


@SETTINGS
@given(l2_words())
def test_l2_units_decode_encode(case):
    """classify(encode_units(units)) == units for every unit classify produces."""
    geo, e, b = case
    units = T.classify(e, b, geo)
    assume(not (units.kind == T.INVALID).any())
    e2, b2 = T.encode_units(units, geo)
    again = T.classify(e2, b2, geo)
    for name in ("kind", "host", "csize", "offset_valid"):
        assert (getattr(again, name) == getattr(units, name)).all(), name


@SETTINGS
@given(st.integers(9, 21), st.integers(0, (1 << 40)), st.integers(1, 1 << 21))
def test_compressed_descriptor(cb, coffset, nbytes):
    geo = T.L2Geometry(cb, False, False)
    assume(coffset < 1 << geo.csize_shift and nbytes <= 1 << cb)
    e = T.compressed_descriptor(np.array([coffset]), np.array([nbytes]), geo)
    units = T.classify(e, None, geo)
    assert units.kind.tolist() == [T.COMPRESSED] and int(units.host[0]) == coffset
    # the decoded length runs to the end of the last 512-byte sector the stream touches
    end = -(-(coffset + nbytes) // 512) * 512
    assert int(units.csize[0]) == end - coffset


@SETTINGS
@given(st.integers(0, 6), st.data())
def test_refcount_block_decode_encode(order, data):
    bits = 1 << order
    n = data.draw(st.integers(1, 16)) * max(1, 8 // bits)
    counts = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n, max_size=n))
    raw = T.encode_refcount_block(np.array(counts, dtype=np.uint64), order)
    assert len(raw) * 8 == n * bits
    assert T.decode_refcount_block(raw, order).tolist() == counts
    assert T.encode_refcount_block(T.decode_refcount_block(raw, order), order) == raw


@SETTINGS
@given(st.integers(0, 6), st.binary(min_size=8, max_size=64))
def test_refcount_block_raw_encode_decode(order, raw):
    raw = raw[:len(raw) - len(raw) % 8]
    assert T.encode_refcount_block(T.decode_refcount_block(raw, order), order) == raw


def test_refcount_too_wide_is_refused():
    with pytest.raises(ValueError):
        T.encode_refcount_block(np.array([2] * 8, dtype=np.uint64), 0)


# ------------------------------------------------------------------------------- snapshots, bitmaps


snapshot_entries = st.builds(
    S.SnapshotEntry, u64, u32, u32, u32, u64, u32, st.binary(max_size=40),
    st.binary(max_size=12), st.binary(max_size=30))


@SETTINGS
@given(st.lists(snapshot_entries, max_size=5))
def test_snapshot_table_decode_encode(entries):
    raw = S.encode_snapshot_table(entries)
    assert len(raw) % 8 == 0
    assert S.decode_snapshot_table(raw, len(entries)) == (entries, len(raw))


@SETTINGS
@given(u64, u64, st.none() | u64)
def test_snapshot_extra(vm_state, disk, icount):
    e = S.SnapshotEntry(0, 0, 0, 0, 0, 0, S.snapshot_extra(vm_state, disk, icount), b"1", b"")
    assert (e.vm_state_size_large, e.disk_size, e.icount) == (vm_state, disk, icount)


bitmap_entries = st.builds(B.BitmapDirEntry, u64, u32, u32, u8, u8, st.binary(max_size=24),
                           st.binary(max_size=40))


@SETTINGS
@given(st.lists(bitmap_entries, max_size=5))
def test_bitmap_directory_decode_encode(entries):
    raw = B.encode_bitmap_directory(entries)
    assert B.decode_bitmap_directory(raw, len(entries)) == (entries, len(raw))


# ------------------------------------------------------------------------------- QEMU's images


def _images(factory_images):
    """Every factory image file with a qcow2 header (tops and qcow2 backing files)."""
    seen = {}
    for case in factory_images.values():
        for p in [case.path, *case.backing_chain]:
            with open(p, "rb") as f:
                if f.read(4) == spec.QCOW_MAGIC:
                    seen[str(p)] = p
    return list(seen.values())


def _read(path, offset, length) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    return data + bytes(length - len(data))


@pytest.mark.qemu
def test_every_factory_structure_reencodes_to_its_bytes(factory_images):
    checked = {"cluster0": 0, "l1": 0, "l2": 0, "refcount": 0, "snapshots": 0, "bitmaps": 0}
    for path in _images(factory_images):
        with Image.open(path, follow_backing=False) as img:
            h = img.header
            cs = img.cluster_size
            # cluster 0: header, extensions, backing file name; zeros after them
            raw = _read(path, 0, cs)
            area = H.decode_header_area(raw)
            enc = H.encode_header_area(area)
            assert enc == raw[:len(enc)], path
            assert raw[len(enc):] == bytes(cs - len(enc)), path
            assert area.fields["version"] == h.version and area.extensions == \
                [(e.type, e.data) for e in h.extensions]
            assert H.encode_header(H.decode_header(raw)) == raw[:H.header_length_of(raw)]
            checked["cluster0"] += 1
            # L1 tables (active and snapshots) and every L2 table they point at
            l1s = [(h.l1_table_offset, h.l1_size)]
            l1s += [(s.l1_table_offset, s.l1_size) for s in img.snapshots]
            for l1_off, l1_size in l1s:
                raw_l1 = _read(path, l1_off, 8 * l1_size)
                l1 = T.decode_u64_table(raw_l1)
                assert T.encode_u64_table(l1) == raw_l1
                checked["l1"] += 1
                for l2_off in np.unique(T.l1_offsets(l1)).tolist():
                    if not l2_off:
                        continue
                    raw_l2 = _read(path, l2_off, cs)
                    e, b = T.decode_l2(raw_l2, img.geometry)
                    assert T.encode_l2(e, b) == raw_l2
                    units = T.classify(e, b, img.geometry)
                    if not (units.kind == T.INVALID).any():
                        e2, b2 = T.encode_units(units, img.geometry)
                        again = T.classify(e2, b2, img.geometry)
                        assert (again.kind == units.kind).all()
                        assert (again.host[units.offset_valid | (units.kind == T.COMPRESSED)]
                                == units.host[units.offset_valid
                                              | (units.kind == T.COMPRESSED)]).all()
                        assert (again.csize == units.csize).all()
                        if not img.snapshots:   # refcount 1 everywhere: COPIED as QEMU sets it
                            assert (e2 == e).all()
                            assert b is None or (b2[units.kind.reshape(len(e), -1)[:, 0]
                                                    != T.COMPRESSED] ==
                                                 b[units.kind.reshape(len(e), -1)[:, 0]
                                                   != T.COMPRESSED]).all()
                    checked["l2"] += 1
            # refcount table and blocks
            rt_raw = _read(path, h.refcount_table_offset, h.refcount_table_clusters * cs)
            rt = T.decode_u64_table(rt_raw)
            assert T.encode_u64_table(rt) == rt_raw
            for off in (rt & np.uint64(spec.REFT_OFFSET_MASK)).tolist():
                if off:
                    blk = _read(path, off, cs)
                    counts = T.decode_refcount_block(blk, h.refcount_order)
                    assert T.encode_refcount_block(counts, h.refcount_order) == blk
                    checked["refcount"] += 1
            # snapshot table
            if h.nb_snapshots:
                region = _read(path, h.snapshots_offset, spec.MAX_SNAPSHOTS_SIZE
                               if h.nb_snapshots > 64 else 1 << 16)
                entries, length = S.decode_snapshot_table(region, h.nb_snapshots,
                                                          offset=h.snapshots_offset)
                assert S.encode_snapshot_table(entries) == region[:length]
                assert [e.name.decode() for e in entries] == [s.name for s in img.snapshots]
                assert [(e.l1_table_offset, e.extra_data) for e in entries] == \
                    [(s.l1_table_offset, s.extra_data) for s in img.snapshots]
                checked["snapshots"] += 1
            # bitmap directory
            if h.bitmaps_ext:
                ext = h.bitmaps_ext
                region = _read(path, ext["bitmap_directory_offset"],
                               ext["bitmap_directory_size"])
                entries_b, length = B.decode_bitmap_directory(region, ext["nb_bitmaps"])
                assert length == len(region)
                assert B.encode_bitmap_directory(entries_b) == region
                assert [e.name.decode() for e in entries_b] == [b.name for b in img.bitmaps]
                assert [(e.bitmap_table_offset, e.flags, e.granularity_bits) for e in entries_b] \
                    == [(b.bitmap_table_offset, b.flags, b.granularity_bits) for b in img.bitmaps]
                checked["bitmaps"] += 1
    # the factory has all of these; a silent skip would prove nothing
    assert all(checked.values()), checked


# ------------------------------------------------------------------------------- reverse map

rmap_extensions = st.builds(R.RmapExtensionData, u32, u32, u64, u64, u64, u64, u32, u32)
rmap_data_headers = st.builds(R.RmapDataHeaderFields, u8, u8, u8, u8, u8, u64, u64, u64,
                              st.binary(min_size=3, max_size=3))


@SETTINGS
@given(rmap_extensions)
def test_rmap_extension_decode_encode(e):
    raw = R.encode_rmap_extension(e)
    assert len(raw) == R.EXT_LENGTH
    assert R.decode_rmap_extension(raw) == e
    assert R.encode_rmap_extension(R.decode_rmap_extension(raw)) == raw


@SETTINGS
@given(rmap_data_headers)
def test_rmap_data_header_decode_encode(h):
    raw = R.encode_rmap_data_header(h)
    assert len(raw) == R.DATA_HEADER and raw.startswith(R.DATA_MAGIC)
    assert R.decode_rmap_data_header(raw) == h
