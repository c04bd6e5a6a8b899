"""The block-copy engine (qcow2kit.blockcopy) and `convert -O raw` on it, against real tools.

1. the copy bitmap and the zero detection (-S) against slow, obvious references;
2. every factory image converted to raw: `qemu-img compare` equal to the source, holes where
   `qemu-img convert -O raw` leaves them (SEEK_DATA maps compared), also with -S 0 and -S 64k;
3. I/O counts and the in-flight bound (deterministic: no clocks);
4. faults from real tools: nbdkit's error filter (transient EIO) and ddrescue filter (a bad
   range) through nbdfuse; a target on a small tmpfs (ENOSPC);
5. discard() from another thread while the job runs (slowed by its rate limit).
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from pathlib import Path
from shutil import which

import numpy as np
import pytest

from qemu import (QEMU_IMG, cli_process, data_ranges, nbdfuse_served, qemu_img_map, run,
                  same_file)
from qcow2kit.blockcopy import CopyBitmap, CopyJob, RateLimit, RawFileTarget, read_source
from qcow2kit.blockcopy.sparse import data_runs, split_segments
from qcow2kit.convert import convert_to_raw
from qcow2kit.errors import CopyIncompleteError
from qcow2kit.hostorder import HostOrderPlan, read_specs
from qcow2kit.image import Image
from qcow2kit.target import open_raw_target, source_files

KiB, MiB = 1024, 1024 * 1024


# ============================================================================ 1. the pieces

@pytest.mark.parametrize("span", [None, 70])
def test_bitmap_against_a_list_of_bools(span):
    """Random set/clear/take against a list of bools; span=70 keeps most ranges at 64 clusters
    or less, the plain-integer path of runs()."""
    rng = random.Random(9)
    for size, g in ((1 << 20, 4096), (1000 * 512 + 512, 512), (3 * 65536 + 4096, 65536)):
        bm = CopyBitmap(size, g)
        ref = [True] * (-(-size // g))
        for _ in range(300):
            a = rng.randrange(0, size)
            n = rng.randrange(0, (size - a if span is None else min(size - a, span * g)) + 1)
            op = rng.choice(["set", "clear", "take"])
            lo, hi = a // g, min(-(-(a + n) // g), len(ref))
            if op == "take":
                got = bm.take(a, n)
                want, i = [], lo
                while i < hi:
                    if ref[i]:
                        j = i
                        while j < hi and ref[j]:
                            j += 1
                        s, e = max(i * g, a), min(j * g, a + n, size)
                        if e > s:
                            want.append((s, e - s))
                        i = j
                    else:
                        i += 1
                assert got == want
                for i in range(lo, hi):
                    if ref[i] and any(s <= i * g < s + m or i * g <= s < (i + 1) * g
                                      for s, m in got):
                        ref[i] = False
            else:
                getattr(bm, op)(a, n)
                for i in range(lo, hi):
                    ref[i] = op == "set"
            last = len(ref) * g - size
            assert bm.count() == sum(ref) * g - (last if ref and ref[-1] else 0)
        assert list(bm.iter_runs(window=7 * g)) == bm.runs(0, size)


def test_bitmap_take_of_nothing_takes_nothing():
    """A zero-length take inside a cluster (rounded outwards, that cluster) clears no bit."""
    bm = CopyBitmap(1 << 20, 65536)
    assert bm.take(100, 0) == [] and bm.take(65536, 0) == [] and bm.count() == 1 << 20
    assert bm.take(100, 10) == [(100, 10)] and bm.take(0, 65536) == []


def _ref_data_runs(buf: bytes, offset: int, min_sparse: int) -> list[tuple[int, int]]:
    """Blocks of max(4k, the power of two <= min_sparse) at guest-aligned edges, each written
    whole when not all zero; min_sparse 0: all data."""
    if min_sparse == 0:
        return [(0, len(buf))] if buf else []
    b = 4096
    while b * 2 <= min_sparse:
        b *= 2
    edges = [0] + [e for e in range(len(buf)) if (offset + e) % b == 0 and e] + [len(buf)]
    runs: list[list[int]] = []
    for s, e in zip(edges, edges[1:]):
        if e > s and any(buf[s:e]):
            if runs and runs[-1][1] == s:
                runs[-1][1] = e
            else:
                runs.append([s, e])
    return [(s, e) for s, e in runs]


def test_zero_detection_against_reference():
    rng = random.Random(4)
    for _ in range(60):
        n = rng.choice([4096, 8192, 64 * KiB, rng.randrange(1, 40000)])
        offset = rng.choice([0, 4096, rng.randrange(0, 1 << 20)])
        buf = bytearray(n)
        for _ in range(rng.randrange(0, 6)):
            p = rng.randrange(0, n)
            buf[p:p + rng.randrange(1, 3000)] = b"\x01" * len(buf[p:p + 3000])
            buf = buf[:n]
        for ms in (0, 512, 4096, 8192, 12288, 64 * KiB):
            assert data_runs(memoryview(bytes(buf)), offset, ms) == \
                _ref_data_runs(bytes(buf), offset, ms), (n, offset, ms)


def test_split_segments_against_reference():
    """One read's bytes cut in segments (whole blocks, or not): the writes and zeros are the
    reference's runs of each segment; blocks that start with a zero word are looked at whole."""
    rng = random.Random(5)
    for _ in range(80):
        aligned = rng.random() < 0.6
        unit = 4096 if aligned else 512
        nseg = rng.randrange(1, 9)
        lens = [unit * rng.randrange(1, 20) for _ in range(nseg)]
        buf = bytearray(os.urandom(sum(lens) + rng.choice([0, unit])))
        for _ in range(rng.randrange(0, 8)):          # zero blocks, and zero first words
            p = rng.randrange(0, len(buf)) // unit * unit
            buf[p:p + rng.choice([8, 4096, 8192, 700])] = bytes(8192)[:len(buf[p:p + 8192])]
            buf = buf[:sum(lens) + unit] if len(buf) > sum(lens) + unit else buf
        guests = rng.sample(range(0, 1 << 30, 65536), nseg)
        segments, at = [], 0
        for g, n in zip(guests, lens):
            segments.append((g + (0 if aligned else rng.randrange(0, 64) * 512), n, at))
            at += n
        rng.shuffle(segments)
        for ms in (0, 4096, 8192, 64 * KiB):
            want_w, want_z = [], []
            for g, n, a in segments:
                pos = 0
                for s_, e in _ref_data_runs(bytes(buf[a:a + n]), g, ms):
                    if s_ > pos:
                        want_z.append((g + pos, s_ - pos))
                    want_w.append((g + s_, a + s_, e - s_))
                    pos = e
                if pos < n:
                    want_z.append((g + pos, n - pos))
            assert split_segments(memoryview(bytes(buf)), segments, ms) == (want_w, want_z)


def test_rate_limit_schedule():
    """Reservations are spaced by bytes / rate (the schedule, not the clock, is checked)."""
    rl = RateLimit(1 * MiB)
    first = rl.reserve(256 * KiB)
    assert first == 0.0
    t0 = rl._next
    for _ in range(4):
        rl.reserve(256 * KiB)
    assert rl._next - t0 == pytest.approx(1.0)
    with pytest.raises(ValueError):
        RateLimit(0)


# ============================================================================ helpers

def _seek_map(path: Path) -> list[tuple[int, int]]:
    """SEEK_DATA/SEEK_HOLE extents, without the file's first 4 KiB.

    QEMU's file driver allocates the first block of every file it creates (zeros or not:
    allocate_first_block, for its alignment probing), which is no hole decision of convert's;
    so the first block is left out of the comparison (test_differential checks that ours
    stores no block of zeros)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out = []
        for s, e in data_ranges(fd, os.fstat(fd).st_size):
            s = max(s, 4096)
            if e > s:
                out.append((s, e))
        return out
    finally:
        os.close(fd)


def _qemu_compare(raw: Path, case) -> int:
    p = subprocess.run([QEMU_IMG, "compare", "-q", "-f", "raw", "-F", "qcow2", str(raw),
                        str(case.path)], cwd=case.path.parent, capture_output=True, text=True)
    return p.returncode


def _write_image(tmp_path: Path, name: str, size: str, *cmds: str, opts: str = "") -> Path:
    img = tmp_path / name
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), img, size])
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    run([*argv, img])
    return img


def _nonzero_block_bytes(path: Path, block: int = 4096) -> int:
    data = np.fromfile(path, dtype=np.uint8)
    pad = (-len(data)) % block
    blocks = np.concatenate([data, np.zeros(pad, np.uint8)]).reshape(-1, block)
    nz = blocks.any(axis=1)
    sizes = np.full(len(nz), block)
    if pad:
        sizes[-1] = block - pad
    return int(sizes[nz].sum())


# ============================================================================ 2. every image

@pytest.mark.qemu
@pytest.mark.parametrize("order", ["host", "guest"])
def test_every_factory_image_to_raw_like_qemu(factory_images, qemu_raw, tmp_path, order):
    failures = {}
    for i, (name, case) in enumerate(sorted(factory_images.items())):
        if case.encrypted:
            continue
        dst = tmp_path / f"{name}.raw"
        with Image.open(case.path) as img:
            res = convert_to_raw(img, dst, order=order, workers=1 + i % 8)
        ref = qemu_raw(case)
        if not res.complete or res.reads and res.done != res.total:
            failures[name] = ("result", res)
        elif _qemu_compare(dst, case) != 0 or not same_file(dst, ref):
            failures[name] = "bytes differ"
        elif _seek_map(dst) != _seek_map(ref):
            failures[name] = ("holes", _seek_map(dst), _seek_map(ref))
        dst.unlink()
    assert not failures


@pytest.fixture(scope="module")
def zero_gaps(tmp_path_factory) -> Path:
    """Data with zero gaps of 4k, 8k, 60k and 1M inside and between clusters, and holes."""
    return _write_image(tmp_path_factory.mktemp("gaps"), "gaps.qcow2", "8M",
                        "write -P 1 0 4k", "write -P 0 4k 4k", "write -P 2 8k 56k",
                        "write -P 3 64k 4k", "write -P 0 68k 8k", "write -P 4 76k 4k",
                        "write -P 5 128k 4k", "write -P 0 132k 60k", "write -P 6 192k 4k",
                        "write -P 7 1M 64k", "write -P 0 1088k 1M", "write -P 8 2112k 64k",
                        "write -z 4M 64k", "write -P 9 6M 128k")


@pytest.mark.qemu
@pytest.mark.parametrize("sparse", ["0", "4k", "8k", "64k", "1M"])
def test_sparse_size_like_qemu(zero_gaps, tmp_path, sparse):
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    run([QEMU_IMG, "convert", "-S", sparse, "-O", "raw", zero_gaps, theirs])
    r = cli_process("convert", "-S", sparse, "-m", "3", "-r", "1G", "-O", "raw", str(zero_gaps),
                    str(ours))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert same_file(ours, theirs)
    assert _seek_map(ours) == _seek_map(theirs)
    if sparse == "0":
        assert _seek_map(ours) == [(4096, 8 * MiB)]      # fully allocated


@pytest.mark.parametrize("argv,word", [
    (["-S", "1000"], "sparse size (-S)"), (["-S", "32M"], "sparse size (-S)"),
    (["-r", "fast"], "rate limit (-r)"), (["-m", "65"], "(-m)"), (["-m", "0"], "(-m)")])
def test_bad_engine_options_are_one_line(tmp_path, argv, word):
    r = cli_process("convert", *argv, str(tmp_path / "none.qcow2"), str(tmp_path / "x.raw"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("qcow2kit: convert: invalid ")
    assert word in r.stderr
    assert not (tmp_path / "x.raw").exists()


# ============================================================================ 3. counts

@pytest.mark.qemu
@pytest.mark.parametrize("order", ["host", "guest"])
def test_each_range_read_once_and_inflight_bounded(factory_images, qemu_raw, tmp_path, order):
    case = factory_images["chain3"] if "chain3" in factory_images else next(
        c for c in factory_images.values() if c.has_backing and not c.encrypted)
    ref = qemu_raw(case)
    for workers, inflight in ((1, 64 * KiB), (8, 128 * KiB), (8, 128 * MiB)):
        dst = tmp_path / f"{workers}-{inflight}.raw"
        with Image.open(case.path) as img:
            res = convert_to_raw(img, dst, order=order, workers=workers, max_chunk=64 * KiB,
                                 max_inflight=inflight)
            if order == "host":
                specs = list(read_specs(HostOrderPlan(img, max_request=64 * KiB)))
                assert res.reads == len(specs)
        assert same_file(dst, ref)
        assert res.retries == 0 and res.done == res.total == res.copied
        assert res.written == _nonzero_block_bytes(ref)
        if inflight < MiB:
            assert 0 < res.peak_inflight <= inflight


# ============================================================================ 4. faults

needs_fuse = pytest.mark.skipif(
    not (which("nbdkit") and which("nbdfuse") and which("fusermount3")
         and os.path.exists("/dev/fuse")),
    reason="needs nbdkit, nbdfuse (libnbd-bin) and fuse3")


@pytest.fixture(scope="module")
def patterned(tmp_path_factory) -> tuple[Path, Path]:
    """A fragmented 8 MiB image (no backing file) and qemu-img's raw conversion of it."""
    d = tmp_path_factory.mktemp("patterned")
    cmds = [f"write -P {i + 1} {off}k 64k" for i, off in
            enumerate(random.Random(3).sample(range(0, 8192, 64), 80))]
    img = _write_image(d, "src.qcow2", "8M", *cmds)
    ref = d / "ref.raw"
    run([QEMU_IMG, "convert", "-O", "raw", img, ref])
    return img, ref


def _copy(img_path: Path, dst: Path, *, before=None, **kw):
    """Library copy through the blockcopy API: (result, job)."""
    with Image.open(img_path) as img:
        source = read_source(img, kw.pop("order", "host"), max_chunk=kw.pop("max_chunk", 64 * KiB))
        source.start()
        if before is not None:
            before()
        with open_raw_target(dst, img.size, source_files(img)) as t:
            job = CopyJob(source, RawFileTarget(t.fd, t.path, img.size), **kw)
            return job.run(), job


def _data_extents(img: Path) -> list[tuple[int, int]]:
    return [(e["start"], e["length"]) for e in qemu_img_map(img) if e["data"] and not e["zero"]]


def _errors_on(trigger: Path, served: Path):
    """Start the error filter, and drop the kernel's cached pages of the served file (planning
    read the tables, and readahead may have brought data with them: those reads would not
    reach nbdkit)."""
    def start() -> None:
        trigger.touch()
        fd = os.open(served, os.O_RDONLY)
        try:
            # twice: a readahead still in flight at the first drop lands after it
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            time.sleep(0.2)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return start


@pytest.mark.qemu
@needs_fuse
def test_transient_read_errors_are_retried(patterned, tmp_path):
    img, ref = patterned
    trigger = tmp_path / "trigger"
    total = sum(n for _, n in _data_extents(img))
    # Now and then (about one run in five here) no read fails at all: the data reached the
    # kernel's cache of the FUSE file before the errors began, in a way the cache drops of
    # _errors_on do not always undo.  Such a run proves nothing, so it is repeated on a
    # fresh mount; every run must copy exactly, and one must have retried.

    def until_retried(name: str, *filters: str, **kw) -> None:
        retried = []
        for attempt in range(6):
            d = tmp_path / f"{name}{attempt}"
            d.mkdir()
            with nbdfuse_served(d, img, *filters, f"error-pread-file={trigger}") as src:
                res, _ = _copy(src, d / "out.raw", before=_errors_on(trigger, src),
                               backoff=0.001, **kw)
                trigger.unlink(missing_ok=True)
            assert res.complete and res.done == res.total
            assert same_file(d / "out.raw", ref)
            retried.append(res.retries)
            if res.retries >= 1:
                return
        raise AssertionError(f"no read failed in {len(retried)} runs")

    # every read fails until a failed task reports progress (the total grows by what is to
    # be done again): then none does
    until_retried("a", "--filter=error", "error-pread-rate=1",
                  progress=lambda done, now: now > total and trigger.unlink(missing_ok=True))
    # then errors at random, one read in ten
    until_retried("b", "--filter=error", "error-pread-rate=0.1", retries=30)


@pytest.mark.qemu
@needs_fuse
def test_persistent_bad_range_is_reported_exactly(patterned, tmp_path):
    img, ref = patterned
    extents = [e for e in qemu_img_map(img) if e["data"]]
    victim = extents[len(extents) // 2]
    host = victim["offset"] + 64 * KiB * (victim["length"] // (128 * KiB))
    guest = victim["start"] + host - victim["offset"]
    mapfile = tmp_path / "bad.map"
    mapfile.write_text("# Rescue Logfile\n0x00000000 + 1\n"
                       f"0x00000000 {host:#010x} +\n{host:#010x} 0x00010000 -\n"
                       f"{host + 64 * KiB:#010x} 0x10000000 +\n")
    with nbdfuse_served(tmp_path, img, "--filter=ddrescue", f"ddrescue-mapfile={mapfile}") as src:
        res, _ = _copy(src, tmp_path / "lib.raw", backoff=0.001, max_chunk=1 * MiB)
        # guest order: a read groups several preads; it is split per cluster all the same
        res_g, _ = _copy(src, tmp_path / "guest.raw", order="guest", backoff=0.001,
                         max_chunk=1 * MiB)
        dst = tmp_path / "cli.raw"
        r = cli_process("convert", "-O", "raw", str(src), str(dst))
        with Image.open(src) as opened, pytest.raises(CopyIncompleteError) as caught:
            convert_to_raw(opened, tmp_path / "conv.raw", backoff=0.001)
    assert [(f.offset, f.length) for f in caught.value.failed] == [(guest, 64 * KiB)]
    assert [(f.offset, f.length) for f in res.failed] == [(guest, 64 * KiB)]
    assert [(f.offset, f.length) for f in res_g.failed] == [(guest, 64 * KiB)]
    assert "Input/output error" in res.failed[0].error and res.stopped is None
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1
    assert f"guest {guest:#x}+0x10000 (" in r.stderr and "Input/output error" in r.stderr
    want = bytearray(ref.read_bytes())
    want[guest:guest + 64 * KiB] = bytes(64 * KiB)
    for out in (tmp_path / "lib.raw", tmp_path / "guest.raw", dst, tmp_path / "conv.raw"):
        assert out.read_bytes() == want


@pytest.mark.qemu
def test_target_runs_out_of_space(tmp_path, small_tmpfs):
    img = _write_image(tmp_path, "big.qcow2", "32M", "write -P 0x5a 0 20M")
    dst = small_tmpfs / "out.raw"
    r = cli_process("convert", "-O", "raw", str(img), str(dst))
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1
    assert str(dst) in r.stderr and "No space left on device" in r.stderr
    assert not dst.exists()                           # ours, so removed
    res, _ = _copy(img, dst, backoff=0.001, max_chunk=1 * MiB)
    assert res.stopped is not None and "No space left" in str(res.stopped)
    assert res.failed and res.copied < 20 * MiB
    # No corruption: every block the target holds is the source's.
    data = np.fromfile(dst, dtype=np.uint8).reshape(-1, 4096)
    nz = data.any(axis=1)
    assert nz.any() and (data[nz] == 0x5A).all()


# ============================================================================ 5. discard

@pytest.mark.qemu
@pytest.mark.parametrize("order", ["host", "guest"])
def test_discard_while_the_job_runs(patterned, tmp_path, order):
    img, ref = patterned
    started = threading.Event()
    holder: dict[str, CopyJob] = {}
    discards = [(0, 1 * MiB), (5 * MiB + 1000, 70000), (6 * MiB, 2 * MiB - 4096)]
    seen: list[int] = []

    def discarder() -> None:
        started.wait(30)
        for off, n in discards:
            holder["job"].discard(off, n)
            seen.append(holder["job"].result.done)

    th = threading.Thread(target=discarder)
    th.start()
    with Image.open(img) as imgobj:
        source = read_source(imgobj, order, max_chunk=64 * KiB)
        total = source.start()
        dst = tmp_path / "d.raw"
        with open_raw_target(dst, imgobj.size, source_files(imgobj)) as t:
            job = CopyJob(source, RawFileTarget(t.fd, t.path, imgobj.size), workers=4,
                          rate_limit=8 * MiB, progress=lambda d, tot: started.set())
            holder["job"] = job
            res = job.run()
    th.join()
    assert res.complete
    assert seen[-1] < total, "the job ended before the discards: nothing was tested"
    want = bytearray(ref.read_bytes())
    for off, n in discards:
        want[off:off + n] = bytes(n)
    assert dst.read_bytes() == want
    assert res.copied < total


class _GatedTarget(RawFileTarget):
    """A raw file whose first write waits at a gate (so a test knows a write is under way)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.first: tuple[int, int] | None = None

    def write(self, offset: int, data: memoryview) -> None:
        if self.first is None:
            self.first = (offset, len(data))
            self.entered.set()
            assert self.gate.wait(30)
        super().write(offset, data)


@pytest.mark.qemu
def test_discard_waits_for_a_write_under_way(patterned, tmp_path):
    """A discard overlapping a write in progress returns only after that write, and the range
    reads as zeros; a range no task has taken yet is never written."""
    img, ref = patterned
    dst = tmp_path / "g.raw"
    with Image.open(img) as opened:
        source = read_source(opened, "host", max_chunk=64 * KiB)
        source.start()
        with open_raw_target(dst, opened.size, source_files(opened)) as t:
            target = _GatedTarget(t.fd, t.path, opened.size)
            job = CopyJob(source, target, workers=1)
            runner = threading.Thread(target=lambda: setattr(job, "outcome", job.run()))
            runner.start()
            assert target.entered.wait(30)
            off, n = target.first
            later = [(s, k) for s, k in _data_extents(img) if s + k <= off or s >= off + n][-1]
            discarder = threading.Thread(target=lambda: (job.discard(off, n),
                                                         job.discard(*later)))
            discarder.start()
            discarder.join(0.3)
            blocked = discarder.is_alive()
            target.gate.set()
            discarder.join(30)
            runner.join(30)
    assert blocked, "discard returned while a write to its range was under way"
    res = job.outcome
    assert res.complete and res.discarded == n + later[1]
    want = bytearray(ref.read_bytes())
    for s, k in ((off, n), later):
        want[s:s + k] = bytes(k)
    assert dst.read_bytes() == want
