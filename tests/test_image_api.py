"""Library behaviour that is not a comparison with qemu-img: cache bounds, I/O, no writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit.sample import make_fragmented_image
from qemu import sha256_file

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_l2_cache_stays_within_its_byte_budget(tmp_path):
    # 512 B clusters: 64 entries per L2 table, so a 16 MiB image has 512 L2 tables.
    info = make_fragmented_image(tmp_path / "s.qcow2", virtual_size=16 << 20, cluster_bits=9,
                                 fill=0.5, seed=3)
    budget = 8 * 512
    with qcow2kit.Image.open(info.path, l2_cache_bytes=budget) as img:
        peak = 0
        for pos in range(0, img.size, 1 << 18):
            assert img.read(pos, 4096) == info.expected_guest_bytes(pos, 4096)
            peak = max(peak, img._l2_cache_used)
            assert len(img._l2_cache) * img.cluster_size == img._l2_cache_used
        assert peak <= budget
        assert len(img._l2_cache) == 8


def test_cached_l2_tables_are_not_read_again(tmp_path):
    info = make_fragmented_image(tmp_path / "s.qcow2", virtual_size=8 << 20, cluster_bits=16,
                                 fill=1.0, zero_fraction=0.0, seed=5)
    with qcow2kit.open(info.path) as img:
        img.read(0, 4096)
        before = img.src.reads
        img.read(65536, 4096)          # same L2 table, one data cluster: exactly one pread
        assert img.src.reads - before == 1
        before = img.src.reads
        img.read(0, 0)                 # nothing to read, nothing read
        assert img.src.reads == before


def test_host_contiguous_clusters_are_read_with_one_pread():
    # plain4k.qcow2 (see fixtures/make_fixtures.py) has clusters written in shuffled order;
    # reading the whole image costs at most one pread per host-contiguous run + metadata.
    with qcow2kit.open(FIXTURES / "plain4k.qcow2") as img:
        segs = [s for s in img.segments(0, img.size) if s.kind == 2]
        before = img.src.reads
        img.read(0, img.size)
        assert img.src.reads - before <= len(segs)


def test_reading_never_writes(tmp_path):
    info = make_fragmented_image(tmp_path / "s.qcow2", virtual_size=4 << 20, compressed_fraction=0.2)
    digest = sha256_file(info.path)
    mtime = os.stat(info.path).st_mtime_ns
    with qcow2kit.open(info.path) as img:
        img.read(0, img.size)
        list(img.segments(0, img.size))
    assert sha256_file(info.path) == digest and os.stat(info.path).st_mtime_ns == mtime


@pytest.mark.qemu
def test_commands_never_modify_their_inputs(factory_images, tmp_path):
    from qcow2kit.cli.main import main
    for name in ("dirty_patched", "dirty_crashed", "bitmap_in_use", "chain3", "luks",
                 "lazy_refcounts", "datafile"):
        case = factory_images[name]
        files = [case.path, *case.backing_chain] + ([case.data_file] if case.data_file else [])
        before = {str(f): sha256_file(f) for f in files}
        main(["info", "--output=json", "--backing-chain", str(case.path)])
        main(["info", str(case.path)])
        main(["convert", "-O", "raw", str(case.path), str(tmp_path / "out.raw")])
        assert {str(f): sha256_file(f) for f in files} == before, name


def test_readinto_rejects_ranges_outside_the_disk():
    with qcow2kit.open(FIXTURES / "plain4k.qcow2") as img:
        with pytest.raises(ValueError):
            img.read(img.size - 1, 2)
        with pytest.raises(ValueError):
            img.read(-1, 1)
        buf = bytearray(100)
        img.readinto(img.size - 100, buf)
        assert bytes(buf) == img.read(img.size - 100, 100)


def test_mmap_and_pread_sources_agree():
    for f in sorted(FIXTURES.glob("*.qcow2")):
        with qcow2kit.Image.open(f) as a, qcow2kit.Image.open(f, source="mmap") as b:
            assert a.read(0, a.size) == b.read(0, b.size)


def test_unknown_source_kind_is_refused():
    with pytest.raises(ValueError, match="source kind"):
        qcow2kit.Image.open(FIXTURES / "plain4k.qcow2", source="carrier-pigeon")
