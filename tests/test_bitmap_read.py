"""Persistent dirty bitmaps read back: ``Image.dirty_ranges`` and ``qcow2kit bitmap --list |
--show`` against what QEMU exports for the same bitmap (qemu-nbd -B, read through
x-dirty-bitmap), on every factory image that has bitmaps, and on tables made bad on purpose."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from qcow2kit.errors import BitmapNotFoundError, CorruptImageError
from qcow2kit.image import Image

from qemu import QEMU_IMG, cli_process, qemu_bitmap_dirty, qemu_img_info, run

pytestmark = pytest.mark.qemu


def _bitmap_cases(factory_images):
    return [c for _, c in sorted(factory_images.items()) if c.bitmaps and not c.encrypted]


def test_dirty_ranges_are_qemus_on_every_factory_image(factory_images):
    cases = _bitmap_cases(factory_images)
    assert cases
    checked = 0
    for case in cases:
        with Image.open(case.path) as img:
            for bm in img.bitmaps:
                ours = list(img.dirty_ranges(bm.name))
                if bm.in_use:         # QEMU refuses to export those; nothing to compare
                    continue
                assert ours == qemu_bitmap_dirty(case, bm.name), (case.name, bm.name)
                checked += 1
    assert checked >= 3


def test_list_and_show_commands(factory_images):
    case = max(_bitmap_cases(factory_images), key=lambda c: len(c.bitmaps))
    r = cli_process("bitmap", "--list", "--output=json", str(case.path), cwd=case.path.parent)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    info = qemu_img_info(case.path)
    theirs = info["format-specific"]["data"].get("bitmaps", [])
    assert [row["name"] for row in rows] == [b["name"] for b in theirs]
    assert [row["granularity"] for row in rows] == [b["granularity"] for b in theirs]
    for row, b in zip(rows, theirs):
        assert ("in-use" in row["flags"]) == ("in-use" in b["flags"])
        assert ("auto" in row["flags"]) == ("auto" in b["flags"])
    human = cli_process("bitmap", "--list", str(case.path), cwd=case.path.parent)
    assert human.returncode == 0 and human.stdout.splitlines()[0].startswith("NAME")
    name = next(row["name"] for row in rows if "in-use" not in row["flags"])
    r = cli_process("bitmap", "--show", name, "--output=json", str(case.path),
                    cwd=case.path.parent)
    got = [(e["start"], e["length"]) for e in json.loads(r.stdout)]
    assert got == qemu_bitmap_dirty(case, name)
    assert next(row["dirty"] for row in rows if row["name"] == name) == sum(n for _, n in got)
    r = cli_process("bitmap", "--show", "no-such-bitmap", str(case.path), cwd=case.path.parent)
    assert r.returncode == 1 and "Dirty bitmap 'no-such-bitmap' not found" in r.stderr
    with Image.open(case.path) as img, pytest.raises(BitmapNotFoundError):
        img.bitmap("no-such-bitmap")


def _with_bitmap(tmp_path: Path) -> Path:
    img = tmp_path / "b.qcow2"
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", img, "64M"])
    run([QEMU_IMG, "bitmap", "--add", "-g", "64k", img, "b0"])
    run(["qemu-io", "-f", "qcow2", "-c", "write 1M 64k", "-c", "write 40M 2M", img])
    return img


def test_all_ones_entry_and_bad_entries(tmp_path):
    img = _with_bitmap(tmp_path)
    with Image.open(img) as opened:
        bm = opened.bitmap("b0")
        assert list(opened.dirty_ranges("b0")) == [(1 << 20, 64 << 10), (40 << 20, 2 << 20)]
    assert qemu_bitmap_dirty(img, "b0") == [(1 << 20, 64 << 10), (40 << 20, 2 << 20)]
    entry_at = bm.bitmap_table_offset
    raw = img.read_bytes()
    (entry,) = struct.unpack_from(">Q", raw, entry_at)
    assert entry                        # the one table entry holds the dirty bits
    # all ones: every granule dirty
    ones = bytearray(raw)
    struct.pack_into(">Q", ones, entry_at, 1)
    img.write_bytes(bytes(ones))
    with Image.open(img) as opened:
        assert list(opened.dirty_ranges("b0")) == [(0, 64 << 20)]
    assert qemu_bitmap_dirty(img, "b0") == [(0, 64 << 20)]
    for bad, word in ((entry | 0x2, "reserved bits"), (entry | 1, "all-ones flag"),
                      ((entry & ~0xFFFF) | 0x200, "misaligned")):
        b = bytearray(raw)
        struct.pack_into(">Q", b, entry_at, bad)
        img.write_bytes(bytes(b))
        with Image.open(img) as opened, pytest.raises(CorruptImageError) as caught:
            list(opened.dirty_ranges("b0"))
        assert word in str(caught.value) and caught.value.offset == entry_at
        assert str(img) in str(caught.value)
        r = cli_process("bitmap", "--show", "b0", str(img))
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
