"""``qcow2kit checksum``: ovirt-imageio's block checksum, against ovirt-imageio itself (its
``client.checksum``, which reads the image through qemu-nbd) and against the algorithm run
with hashlib over ``qemu-img convert -O raw``'s output, on every factory image."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tracemalloc

import pytest

from qcow2kit.blockcopy import CopyJob, RawFileTarget, read_source
from qcow2kit.checksum import BlockHasher, HashingTarget, checksum, combine
from qcow2kit.image import Image
from qcow2kit.target import open_raw_target, source_files

from qemu import cli_process, qemu_convert_raw, qemu_create, qemu_io, same_file

MiB = 1 << 20

pytestmark = pytest.mark.qemu


def _reference(raw: str, block_size: int) -> str:
    """The documented algorithm over a raw file (the same bytes as the guest's)."""
    outer = hashlib.blake2b(digest_size=32)
    with open(raw, "rb") as f:
        while True:
            block = f.read(block_size)
            if not block:
                break
            outer.update(hashlib.blake2b(block, digest_size=32).digest())
    return outer.hexdigest()


def _cases(factory_images):
    return [c for _, c in sorted(factory_images.items()) if not c.encrypted
            and c.virtual_size <= 1 << 30]


def test_every_factory_image_against_the_algorithm(factory_images, qemu_raw):
    checked = 0
    for i, case in enumerate(_cases(factory_images)):
        raw = str(qemu_raw(case))
        bs = (4 << 20, 1 << 20, 64 << 10)[i % 3]
        with Image.open(case.path) as img:
            got = checksum(img, block_size=bs, window=(8 << 20) if i % 2 else 256 << 20,
                           order=("host", "guest")[i % 2], workers=1 + i % 8)
        assert got == {"algorithm": "blake2b", "block_size": bs,
                       "checksum": _reference(raw, bs)}, case.name
        checked += 1
    assert checked >= 10


def test_against_ovirt_imageio(factory_images, monkeypatch):
    client = pytest.importorskip("ovirt_imageio.client")
    checked = 0
    for case in _cases(factory_images)[::3]:
        if not case.virtual_size:     # ovirt-imageio 2.5.1 fails on an empty disk
            continue
        monkeypatch.chdir(case.path.parent)
        theirs = client.checksum(str(case.path))
        r = cli_process("checksum", str(case.path), cwd=case.path.parent)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == theirs, case.name
        checked += 1
    assert checked >= 3


def test_encrypted_images_are_refused(factory_images):
    for case in factory_images.values():
        if case.encrypted:
            r = cli_process("checksum", str(case.path), cwd=case.path.parent)
            assert r.returncode == 1 and "encrypted" in r.stderr and r.stdout == ""


def test_bad_block_size_and_missing_file(tmp_path):
    r = cli_process("checksum", "--block-size", "1000", str(tmp_path / "x"))
    assert r.returncode == 1 and "multiple of 4096" in r.stderr and r.stderr.count("\n") == 1
    r = cli_process("checksum", str(tmp_path / "missing.qcow2"))
    assert r.returncode == 1 and "missing.qcow2" in r.stderr
    assert not os.path.exists(tmp_path / "missing.qcow2")


@pytest.fixture(scope="module")
def scattered(tmp_path_factory):
    """A 32 MiB image whose 64 KiB clusters qemu-io wrote in random guest order (so they
    lie in random host order), a few left unallocated and a few zero, and qemu-img's raw
    conversion of it."""
    d = tmp_path_factory.mktemp("scattered")
    img = d / "scattered.qcow2"
    qemu_create(img, "32M")
    rng = random.Random(10)
    clusters = rng.sample(range(512), 500)
    cmds = [f"write -P {c % 251 + 1} {c * 64}k 64k" for c in clusters[:490]]
    cmds += [f"write -z {c * 64}k 64k" for c in clusters[490:]]
    qemu_io(img, *cmds, refuse=["error", "failed"])
    return img, qemu_convert_raw(img, d / "scattered.raw")


def _peak(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_by_the_window(scattered):
    """Blocks are gathered a window at a time: the peak of Python allocations stays near
    the window plus the reads in flight, whatever the image's size and layout (measured
    against the same checksum with one window for the whole disk, which must gather it
    all: the measure sees the blocks)."""
    img_path, raw = scattered
    want = {"algorithm": "blake2b", "block_size": MiB, "checksum": _reference(str(raw), MiB)}
    with Image.open(img_path) as img:
        small, small_peak = _peak(lambda: checksum(img, block_size=MiB, memory=2 * MiB,
                                                   workers=2))
        whole, whole_peak = _peak(lambda: checksum(img, block_size=MiB, window=32 * MiB,
                                                   workers=2))
    assert small == whole == want
    # window (2 MiB) + 2 reads in flight of at most 1 MiB + planning and bookkeeping
    assert small_peak < 8 * MiB, small_peak
    assert whole_peak > 24 * MiB, whole_peak


def test_hasher_fed_in_any_order(scattered):
    """BlockHasher alone: pieces of random sizes in random order, zeros given as None,
    blocks never mentioned read as zeros; the same result as the algorithm."""
    _, raw = scattered
    data = raw.read_bytes()
    bs = 256 * 1024
    rng = random.Random(4)
    cuts = sorted(rng.sample(range(1, len(data) // 512), 300))
    pieces = [(a * 512, b * 512) for a, b in zip([0, *cuts], [*cuts, len(data) // 512])]
    rng.shuffle(pieces)
    h = BlockHasher(len(data), bs)
    for a, b in pieces[:-20]:             # the last 20 pieces are never given
        chunk = data[a:b]
        h.add(a, None if chunk.count(0) == len(chunk) else memoryview(chunk), b - a)
    left = [(a, b) for a, b in pieces[-20:] if data[a:b].count(0) != b - a]
    for a, b in left:
        h.add(a, memoryview(data[a:b]))
    assert combine(h.finish(), bs)["checksum"] == _reference(str(raw), bs)


def test_hashing_target_passes_the_copy_on(scattered, tmp_path):
    """A copy through HashingTarget: the raw target equals qemu-img's conversion, and the
    checksum computed on the way equals the algorithm's."""
    img_path, raw = scattered
    with Image.open(img_path) as img:
        source = read_source(img, "host")
        hasher = BlockHasher(img.size)
        with open_raw_target(tmp_path / "copy.raw", img.size, source_files(img)) as t:
            target = HashingTarget(hasher, RawFileTarget(t.fd, t.path, img.size))
            result = CopyJob(source, target, workers=4).run()
        assert result.complete
    assert same_file(tmp_path / "copy.raw", raw)
    assert combine(hasher.finish())["checksum"] == _reference(str(raw), 4 * MiB)
