"""qcow2kit against qemu-img on every factory image: info, convert, random guest reads.

The oracle is QEMU itself: each test runs qemu-img (through tests/factory.py)
and qcow2kit on the same file and compares the results.
"""

from __future__ import annotations

import json
import os
import random
import time
import zlib

import pytest

import factory
from qemu import QEMU_IMG, cli_in_process, data_ranges, qemu_img_info, qemu_img_map, run, same_file
import qcow2kit
from qcow2kit import tables as T
from qcow2kit.image import block_status

pytestmark = pytest.mark.qemu

CASES = factory.CASE_NAMES if hasattr(factory, "CASE_NAMES") else None


def _cases(factory_images, *, readable=None):
    out = []
    for name, case in sorted(factory_images.items()):
        if readable is True and case.encrypted:
            continue
        out.append(case)
    return out


@pytest.fixture(scope="module")
def utc():
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


def test_info_json_equals_qemu(factory_images, capsys):
    failures = []
    for case in _cases(factory_images):
        path = str(case.path.absolute())
        rc, out, err = cli_in_process(capsys, "info", "--output=json", path)
        want = qemu_img_info(path)
        if rc != 0 or json.loads(out) != want:
            failures.append((case.name, rc, err, out, want))
    assert not failures, failures[:3]


def test_info_json_text_equals_qemu(factory_images, capsys):
    """Not only the same object: the same bytes, key order included."""
    failures = []
    for case in _cases(factory_images):
        path = str(case.path.absolute())
        _, out, _ = cli_in_process(capsys, "info", "--output=json", path)
        want = run([QEMU_IMG, "info", "--output=json", path], cwd=case.path.parent)
        if out != want:
            failures.append(case.name)
    assert not failures


def test_info_backing_chain_json_equals_qemu(factory_images, capsys):
    failures = []
    for case in _cases(factory_images):
        path = str(case.path.absolute())
        rc, out, err = cli_in_process(capsys, "info", "--output=json", "--backing-chain", path)
        want = qemu_img_info(path, backing_chain=True)
        if rc != 0 or json.loads(out) != want:
            failures.append((case.name, rc, err))
    assert not failures


def test_info_human_equals_qemu(factory_images, capsys, utc):
    failures = []
    for case in _cases(factory_images):
        path = str(case.path.absolute())
        for extra in ([], ["--backing-chain"]):
            _, out, _ = cli_in_process(capsys, "info", *extra, path)
            want = run([QEMU_IMG, "info", *extra, path], cwd=case.path.parent)
            if out != want:
                failures.append((case.name, extra, out, want))
    assert not failures, failures[:2]


def _allocated_zero_blocks(path, block=4096) -> int:
    """4 KiB blocks the file system stores although they hold only zeros."""
    fd = os.open(path, os.O_RDONLY)
    try:
        count = 0
        for start, end in data_ranges(fd, os.fstat(fd).st_size):
            for b in range(start - start % block, end, block):
                data = os.pread(fd, block, b)
                if data and not any(data):
                    count += 1
        return count
    finally:
        os.close(fd)


def test_convert_byte_identical_and_sparse(factory_images, qemu_raw, tmp_path, capsys):
    bsize = os.statvfs(tmp_path).f_bsize
    failures = []
    for case in _cases(factory_images, readable=True):
        dst = tmp_path / f"{case.name}.raw"
        rc, _, err = cli_in_process(capsys, "convert", "-O", "raw", str(case.path), str(dst))
        ref = qemu_raw(case)
        if rc != 0 or not same_file(dst, ref):
            failures.append((case.name, rc, err))
            continue
        if bsize == 4096 and _allocated_zero_blocks(dst):
            failures.append((case.name, "stores blocks of zeros"))
        dst.unlink()
    assert not failures


def test_convert_encrypted_refused(factory_images, tmp_path, capsys):
    for case in _cases(factory_images):
        if not case.encrypted:
            continue
        rc, out, err = cli_in_process(capsys, "convert", "-O", "raw", str(case.path), str(tmp_path / "x"))
        assert rc == 1
        assert err.startswith("qcow2kit: ") and err.count("\n") == 1
        assert "encrypted" in err


def test_random_reads_equal_qemu_conversion(factory_images, qemu_raw):
    failures = []
    for case in _cases(factory_images, readable=True):
        ref_path = qemu_raw(case)
        rng = random.Random(zlib.crc32(case.name.encode()))
        with qcow2kit.open(case.path) as img, open(ref_path, "rb") as ref:
            size = img.size
            if size == 0:
                assert img.read(0, 0) == b""
                continue
            cs = img.cluster_size
            for _ in range(120):
                off = rng.randrange(size)
                if rng.random() < 0.3:   # aligned starts and cluster-crossing lengths
                    off -= off % cs
                n = rng.randrange(min(size - off, 3 * cs + 1) + 1)
                want = os.pread(ref.fileno(), n, off)
                if img.read(off, n) != want:
                    failures.append((case.name, off, n))
                    break
    assert not failures


def test_whole_image_read_with_mmap_source(factory_images, qemu_raw):
    for name in ("compressed_zstd", "extl2_backing", "chain3", "datafile"):
        case = factory_images[name]
        with qcow2kit.Image.open(case.path, source="mmap") as img:
            assert img.read(0, img.size) == qemu_raw(case).read_bytes(), name


def test_block_status_kinds_agree_with_qemu_map(factory_images):
    """Which layer provides each byte (depth) and whether it reads as zero, as qemu-img map says."""
    failures = []
    for case in _cases(factory_images, readable=True):
        if case.name in ("prealloc_metadata", "extl2_2M"):
            continue  # qemu-img map consults host-file holes there (see factory notes)
        qmap = qemu_img_map(case)
        with qcow2kit.open(case.path) as img:
            for ext in qmap:
                start, length = ext["start"], ext["length"]
                for st in block_status(img, start, length):
                    want_depth = ext["depth"]
                    if ext["data"] != st.data or (st.data and st.depth != want_depth):
                        failures.append((case.name, ext, st[:6]))
                        break
    assert not failures, failures[:3]


def test_segments_cover_the_range_exactly(factory_images):
    for case in _cases(factory_images, readable=True):
        with qcow2kit.open(case.path) as img:
            pos = 0
            for seg in img.segments(0, img.size):
                assert seg.guest == pos and seg.length > 0
                assert seg.kind in T.KIND_NAMES
                pos += seg.length
            assert pos == img.size, case.name
