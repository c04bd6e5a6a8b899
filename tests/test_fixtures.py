"""The committed fixtures (fixtures/*.qcow2, made by QEMU with fixtures/make_fixtures.py).

These tests need no QEMU: they run wherever qcow2kit is installed.  The files are checked
against fixtures/SHA256SUMS first, so a failure below is qcow2kit's and not a damaged fixture.
The content proves itself: guest unit u (a 4 KiB cluster, or a 512-byte subcluster in
extl2.qcow2) holds byte u & 0xff or zeros, and the exact set of units holding data is written
below, as make_fixtures.py's docstring describes it.  Only the last test needs QEMU: it rebuilds
the fixtures and expects the same bytes.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qcow2kit import Image
from qcow2kit import tables as T

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
KiB = 1024
MiB = 1024 * KiB


def _sums() -> dict[str, str]:
    out = {}
    for line in (FIXTURES / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        out[name] = digest
    return out


SUMS = _sums()


def _fill(data: bytearray, units, unit: int) -> None:
    for u in units:
        data[u * unit:(u + 1) * unit] = bytes([u & 0xFF]) * unit


def expected(name: str) -> bytes:
    """The guest view of each fixture, from the plan in make_fixtures.py."""
    data = bytearray(MiB)
    if name in ("plain4k.qcow2", "v2_overlay.qcow2"):
        _fill(data, [i for i in range(256) if i % 5 == 1 and i not in (6, 16)], 4 * KiB)
        if name == "v2_overlay.qcow2":
            _fill(data, [i for i in range(256) if i % 5 == 3], 4 * KiB)
            data[11 * 4 * KiB:12 * 4 * KiB] = bytes(4 * KiB)
    elif name == "zstd.qcow2":
        _fill(data, range(256), 4 * KiB)
    elif name == "extl2.qcow2":
        _fill(data, [c * 32 + k for c in range(0, 64, 8) for k in range(32)
                     if (k + c) % 3 == 0 and not (c == 24 and 4 <= k < 8)], 512)
        _fill(data, range(60 * 32, 61 * 32), 512)
    else:
        raise KeyError(name)
    return bytes(data)


UNIT = {"plain4k.qcow2": 4 * KiB, "zstd.qcow2": 4 * KiB, "v2_overlay.qcow2": 4 * KiB,
        "extl2.qcow2": 512}


def test_checksums_match():
    assert sorted(SUMS) == sorted(p.name for p in FIXTURES.glob("*.qcow2"))
    for name, digest in SUMS.items():
        data = (FIXTURES / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, f"{name} differs from SHA256SUMS"
        assert len(data) < 300 * KiB


@pytest.mark.parametrize("name", sorted(SUMS))
def test_content_proves_itself(name):
    """Every unit reads as byte (unit index & 0xff) or zeros; exactly the planned ones hold data."""
    with Image.open(FIXTURES / name) as img:
        assert img.size == MiB
        got = img.read(0, img.size)
    unit = UNIT[name]
    rows = np.frombuffer(got, dtype=np.uint8).reshape(-1, unit)
    first = rows[:, 0]
    assert (rows == first[:, None]).all(), "a unit holds more than one byte value"
    index = (np.arange(rows.shape[0]) & 0xFF).astype(np.uint8)
    bad = np.flatnonzero((first != 0) & (first != index))
    assert bad.size == 0, f"units {bad[:10].tolist()} hold another unit's byte"
    assert got == expected(name)


@pytest.mark.parametrize("source", ["pread", "mmap"])
@pytest.mark.parametrize("name", sorted(SUMS))
def test_reads_in_pieces_agree(name, source):
    """Odd-sized reads across cluster and L2 boundaries give the same bytes as one big read."""
    want = expected(name)
    with Image.open(FIXTURES / name, source=source, l2_cache_bytes=1) as img:
        pos, step = 0, 3 * KiB + 17
        while pos < img.size:
            n = min(step, img.size - pos)
            assert img.read(pos, n) == want[pos:pos + n], pos
            pos += n


def _kinds(img: Image) -> dict[int, int]:
    out: dict[int, int] = {}
    for seg in img.segments(0, img.size):
        out[seg.kind] = out.get(seg.kind, 0) + seg.length
    return out


def test_plain4k_layout():
    with Image.open(FIXTURES / "plain4k.qcow2") as img:
        h = img.header
        assert (h.version, img.cluster_size, h.compression_name) == (3, 4 * KiB, "zlib")
        assert not h.extended_l2 and h.backing_file is None
        segs = [s for s in img.segments(0, img.size) if s.kind == T.DATA]
        # 51 clusters i % 5 == 1 minus the zeroed 6 and the discarded 16; none host-contiguous
        # with its guest neighbour, since they were written in shuffled order
        assert [s.guest // 4096 for s in segs] == [i for i in range(256)
                                                    if i % 5 == 1 and i not in (6, 16)]
        hosts = [s.host for s in segs]
        assert hosts != sorted(hosts) and len(set(hosts)) == len(hosts)
        assert all(h % 4096 == 0 for h in hosts)
        zero = [s for s in img.segments(6 * 4096, 4096)]
        assert [s.kind for s in zero] == [T.ZERO]
        assert _kinds(img)[T.DATA] == 49 * 4096


def test_zstd_layout():
    with Image.open(FIXTURES / "zstd.qcow2") as img:
        assert img.header.compression_name == "zstd"
        assert _kinds(img) == {T.COMPRESSED: MiB}
        segs = list(img.segments(0, img.size))
        assert len(segs) == 256 and all(s.length == 4096 for s in segs)


def test_extl2_layout():
    with Image.open(FIXTURES / "extl2.qcow2") as img:
        assert img.header.extended_l2 and img.cluster_size == 16 * KiB
        assert img.geometry.l2_entries == 1024 and img.geometry.units_per_cluster == 32
        kinds = _kinds(img)
        assert kinds[T.COMPRESSED] == 16 * KiB            # cluster 60
        assert kinds[T.ZERO] >= 4 * 512                    # cluster 24, subclusters 4..7
        compressed = [s for s in img.segments(0, img.size) if s.kind == T.COMPRESSED]
        assert [(s.guest, s.length) for s in compressed] == [(60 * 16 * KiB, 16 * KiB)]
        # subcluster 0 of cluster 0 is written, 1 and 2 are not
        assert [s.kind for s in img.segments(0, 1536)] == [T.DATA, T.UNALLOCATED]


def test_v2_overlay_layout():
    with Image.open(FIXTURES / "v2_overlay.qcow2") as img:
        h = img.header
        assert (h.version, h.header_length, h.refcount_order) == (2, 72, 4)
        assert (h.backing_file, h.backing_format) == ("plain4k.qcow2", "qcow2")
        assert img.full_backing_filename == str(FIXTURES / "plain4k.qcow2")
        assert [layer.filename for layer in img.chain()] == [
            str(FIXTURES / "v2_overlay.qcow2"), str(FIXTURES / "plain4k.qcow2")]
        kinds = _kinds(img)
        assert kinds[T.COMPRESSED] == 51 * 4096            # i % 5 == 3, deflate
        assert kinds[T.DATA] == 4096                       # cluster 11: zeros written as data
        assert img.read(11 * 4096, 4096) == bytes(4096)
        assert img.backing.read(11 * 4096, 4096) == bytes([11]) * 4096


@pytest.mark.qemu
@pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-io")),
                    reason="needs qemu-img and qemu-io")
def test_fixtures_rebuild_identically():
    r = subprocess.run([sys.executable, str(FIXTURES / "make_fixtures.py"), "--check"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
