"""``qcow2kit checksum``: ovirt-imageio's block checksum, against ovirt-imageio itself (its
``client.checksum``, which reads the image through qemu-nbd) and against the algorithm run
with hashlib over ``qemu-img convert -O raw``'s output, on every factory image."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from qcow2kit.checksum import checksum
from qcow2kit.image import Image

from qemu import cli_process

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
