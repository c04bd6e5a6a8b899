"""Resumable copies: the pending bitmap, the raw journal, the pre-mapped qcow2 target, and a
SIGKILL in the middle of a copy followed by a resumed copy that qemu-img finds equal."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qemu import (have_qemu, hexbytes, qemu_bitmap_dirty, qemu_convert_raw, qemu_create, qemu_img,
                  qemu_img_check, qemu_img_info, qemu_io)

from qcow2kit.blockcopy import CopyJob, RawFileTarget, read_source
from qcow2kit.blockcopy.pending import (JournalStore, PendingMap, pending_granularity,
                                        run_checkpointed)
from qcow2kit.blockcopy.resumable import PENDING_BITMAP, BitmapStore, MappedQcow2Target
from qcow2kit.errors import Qcow2Error
from qcow2kit.image import Image
from qcow2kit.layout.journal import Journal, decode_journal, encode_journal

needs_qemu = pytest.mark.skipif(not have_qemu(), reason="qemu-img/qemu-io not installed")
MiB = 1 << 20
TESTS = Path(__file__).parent


# ---------------------------------------------------------------------------- the pending map

@settings(max_examples=300, deadline=None)
@given(st.data())
def test_granule_done_exactly_when_every_byte_was_written(data):
    g = data.draw(st.sampled_from([512, 1024, 4096]))
    size = data.draw(st.integers(1, 20000))
    cuts = sorted(set([0, size] + data.draw(st.lists(st.integers(0, size), max_size=12))))
    pieces = [(a, b - a) for a, b in zip(cuts, cuts[1:])]
    kept = [p for p in pieces if data.draw(st.booleans())]
    order = data.draw(st.permutations(kept))
    pm = PendingMap.from_runs(size, g, [(0, size)])
    for p in order:
        pm.note([p])
    covered = np.zeros(size, dtype=bool)
    for a, n in kept:
        covered[a:a + n] = True
    expect = [i for i in range(-(-size // g)) if covered[i * g:(i + 1) * g].all()]
    assert pm.take_done().tolist() == expect
    assert pm.take_done().tolist() == []          # taken once


def test_pending_runs_and_granularity():
    pm = PendingMap.from_runs(10 * 4096 + 100, 4096, [(5000, 10), (40960, 50)])
    assert pm.runs() == [(4096, 4096), (40960, 100)]
    pm.note([(4096, 4096)])
    idx = pm.take_done()
    pm.cleared(idx)
    assert pm.runs() == [(40960, 100)]
    assert pending_granularity(1 << 30, 65536) == 65536
    assert pending_granularity(1 << 50, 65536) == (1 << 50) >> 24


# ---------------------------------------------------------------------------- the journal

def test_journal_bytes():
    j = Journal(size=3 * 65536 - 5, granularity_bits=16, tag=b"ab", bitmap=bytes([0b101]))
    raw = encode_journal(j)
    assert raw == hexbytes(
        "51 4b 50 45 4e 44 00 01",      # magic "QKPEND\0\1"
        "01 00 00 00",                  # version 1
        "10 00 00 00",                  # granularity_bits 16, 3 reserved bytes
        "fb ff 02 00 00 00 00 00",      # size 0x2fffb
        "02 00 00 00",                  # tag_length 2
    ) + raw[28:32] + b"ab\x05"
    import zlib
    assert int.from_bytes(raw[28:32], "little") == zlib.crc32(b"ab\x05")
    assert decode_journal(raw) == j


@pytest.mark.parametrize("damage, field", [
    (lambda r: b"X" + r[1:], "magic"),
    (lambda r: r[:8] + b"\x02" + r[9:], "version"),
    (lambda r: r[:-1] + b"\x07", "crc32"),
    (lambda r: r + b"\0", "tag_length"),
])
def test_damaged_journal_named(damage, field):
    raw = encode_journal(Journal(65536 * 9, 16, b"t", bytes([0xff, 0x01])))
    with pytest.raises(Qcow2Error) as e:
        decode_journal(damage(raw), path="/x/j")
    assert e.value.field == field
    assert "/x/j" in str(e.value)


# ---------------------------------------------------------------------------- kill and resume

def _source(tmp_path: Path) -> Path:
    """A 48 MiB image written back to front in 1 MiB pieces (fragmented), with holes and
    zero runs."""
    src = tmp_path / "src.qcow2"
    qemu_create(src, 48 * MiB)
    cmds = []
    for i in reversed(range(48)):
        if i % 7 == 3:
            continue
        cmds.append(f"write -P {i + 1} {i * MiB} {MiB}" if i % 11 else f"write -z {i * MiB} {MiB}")
    qemu_io(src, *cmds)
    return src


def copy(src: str, dst: str, kind: str, rate: int = 0, interval: float = 0.0) -> None:
    """Start or resume a copy of ``src`` into ``dst`` (``kind`` raw, with its journal at
    ``dst + '.pending'``, or qcow2, with its pending bitmap); prints progress lines."""
    from qcow2kit.resume import finish_pending, map_qcow2_target, pending_of, start_pending
    from qcow2kit.writer import ImageWriter
    with Image.open(src) as img:
        source = read_source(img, "host")

        def progress(done: int, total: int) -> None:
            print("done", done, total, flush=True)

        def resumed(target, store):
            """The copy of what is pending, its progress checkpointed into ``store``."""
            def run(on_copied):
                job = CopyJob(source, target, workers=2, rate_limit=rate or None,
                              max_inflight=2 * MiB, progress=progress, on_copied=on_copied)
                job.bitmap.clear(0, img.size)
                for a, n in pending.runs():
                    job.bitmap.set(a, n)
                return job.run()
            return run_checkpointed(run, target, pending, store, interval=interval)

        if not os.path.exists(dst):
            if kind == "qcow2":
                cs = map_qcow2_target(img, dst, None, memory=32 * MiB)
            else:
                cs = img.cluster_size
                with open(dst, "wb") as f:
                    f.truncate(img.size)
            start_pending(img, dst, kind, None, cs, b"test")
        pending = pending_of(dst, kind, img.size, b"test")
        if kind == "qcow2":
            with ImageWriter(dst) as w, Image.open(dst, locking=False) as timg:
                res, cp = resumed(MappedQcow2Target(timg, w), BitmapStore(timg, w))
        else:
            fd = os.open(dst, os.O_RDWR)
            try:
                store = JournalStore(dst + ".pending", img.size, pending.granularity, b"test")
                res, cp = resumed(RawFileTarget(fd, dst, img.size, zero_initialized=False),
                                  store)
            finally:
                os.close(fd)
        if res.complete:
            finish_pending(dst, kind)
        print("copied", res.copied, "checkpoints", cp.checkpoints, flush=True)


def _kill_midway(src: Path, dst: Path, kind: str) -> int:
    """Run a slow copy in a child and SIGKILL it once about a third is done; the bytes done."""
    p = subprocess.Popen([sys.executable, "-c",
                          f"import test_resume as t; t.copy({str(src)!r}, {str(dst)!r}, "
                          f"{kind!r}, rate={12 * MiB}, interval=0)"],
                         cwd=TESTS, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                             [str(TESTS)] + sys.path)))
    done = 0
    assert p.stdout is not None
    deadline = time.monotonic() + 60
    for line in p.stdout:
        words = line.split()
        if words[0] == "done":
            done = int(words[1])
            if done >= int(words[2]) // 3:
                break
        assert time.monotonic() < deadline
    p.send_signal(signal.SIGKILL)
    p.wait()
    return done


@needs_qemu
@pytest.mark.parametrize("kind", ["raw", "qcow2"])
def test_killed_copy_resumes_to_an_equal_target(tmp_path, kind):
    src = _source(tmp_path)
    dst = tmp_path / f"dst.{kind}"
    done = _kill_midway(src, dst, kind)
    assert done > 0
    if kind == "raw":
        j = JournalStore.load(str(dst) + ".pending")
        assert j is not None
        pending = PendingMap.from_journal(j).pending_bytes
    else:
        # killed in the middle: the image is valid, every cluster mapped, and QEMU sees the
        # pending bitmap we read
        qemu_img_check(dst)
        info = qemu_img_info(dst)
        names = [b["name"] for b in info["format-specific"]["data"]["bitmaps"]]
        assert names == [PENDING_BITMAP]
        ranges = qemu_bitmap_dirty(dst, PENDING_BITMAP)
        with Image.open(dst) as timg:
            assert list(timg.dirty_ranges(PENDING_BITMAP)) == ranges
        pending = sum(n for _, n in ranges)
    # only what was not done at the kill, plus the tasks in flight (2 workers, 2 MiB bound)
    assert pending <= 48 * MiB - done + 4 * MiB
    assert pending < 48 * MiB
    copy(str(src), str(dst), kind)
    assert not os.path.exists(str(dst) + ".pending")
    fmt = "raw" if kind == "raw" else "qcow2"
    qemu_img("compare", "-f", "qcow2", "-F", fmt, src, dst)
    if kind == "qcow2":
        qemu_img_check(dst)
        assert "bitmaps" not in qemu_img_info(dst)["format-specific"]["data"]
    else:
        ref = qemu_convert_raw(src, tmp_path / "ref.raw")
        assert ref.read_bytes() == dst.read_bytes()


@needs_qemu
def test_mapped_target_refuses_unmapped_writes(tmp_path):
    src = _source(tmp_path)
    dst = tmp_path / "other.qcow2"
    qemu_create(dst, 48 * MiB)                 # not mapped for this copy
    from qcow2kit.writer import ImageWriter
    with ImageWriter(dst) as w, Image.open(dst, locking=False) as timg:
        t = MappedQcow2Target(timg, w)
        with pytest.raises(Qcow2Error, match="not a data cluster mapped for this copy"):
            t.write(MiB, memoryview(b"x" * 512))
        t.write_zeroes(0, MiB)                # unallocated without backing reads zeros: fine
    qemu_img_check(dst)
    assert src.exists()
