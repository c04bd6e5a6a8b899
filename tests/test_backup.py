"""``qcow2kit backup``: full and incremental backups, judged by QEMU.

The proof cycle: a persistent bitmap added with qemu-img, a full backup, qemu-io writes at
random places, an incremental backup, the bitmap cleared, more writes, another incremental.
After each step the chain `qemu-img compare`s identical to the source, `qemu-img check` is
clean, and each overlay holds (qemu-img map, depth 0) exactly the clusters QEMU's own view
of the bitmap (qemu-nbd -B) marks dirty; the bytes read from the source are exactly the
data in those clusters (qemu-img map of the source).  Bitmaps left in use by a qemu-io
killed with SIGKILL, or inconsistent, are refused and --sync auto falls back to full.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qcow2kit.backup import backup, plan_backup, run_backup
from qcow2kit.errors import BitmapUnusableError, TargetError
from qcow2kit.image import Image

from qemu import (QEMU_IO, cli_process, merge_ranges, qemu_bitmap_dirty, qemu_create,
                  qemu_img, qemu_img_check, qemu_img_map, qemu_io, same_file)

pytestmark = pytest.mark.qemu

MiB = 1 << 20
CLUSTER = 64 << 10
SIZE = 96 * MiB


def _compare(a: Path, b: Path, *, fmt_a: str = "qcow2") -> None:
    r = qemu_img("compare", "-f", fmt_a, "-F", "qcow2", str(a), str(b), ok=None)
    assert r.returncode == 0, r.stdout + r.stderr


def _clean(path: Path) -> None:
    rc, out = qemu_img_check(path)
    assert rc == 0 and not out.get("leaks") and not out.get("corruptions"), out


def _own_clusters(overlay: Path) -> list[tuple[int, int]]:
    """What qemu-img map says the overlay itself holds (depth 0), merged."""
    return merge_ranges((e["start"], e["length"]) for e in qemu_img_map(overlay)
                        if e["depth"] == 0 and e["present"])


def _round_out(ranges: list[tuple[int, int]], unit: int, size: int) -> list[tuple[int, int]]:
    return merge_ranges((a // unit * unit, min(-(-(a + n) // unit) * unit, size) - a // unit * unit)
                        for a, n in ranges)


def _intersection(xs: list[tuple[int, int]], ys: list[tuple[int, int]]) -> int:
    total = 0
    for a, n in xs:
        for b, m in ys:
            lo, hi = max(a, b), min(a + n, b + m)
            total += max(0, hi - lo)
    return total


def _source_data(src: Path) -> list[tuple[int, int]]:
    return merge_ranges((e["start"], e["length"]) for e in qemu_img_map(src)
                        if e["data"] and not e["zero"])


def _random_writes(path: Path, rng: random.Random, count: int) -> None:
    """qemu-io writes at random places: patterns of any 512-byte-aligned size, zeroes
    (write -z), some across cluster boundaries."""
    cmds = []
    for i in range(count):
        off = rng.randrange(0, SIZE // 512) * 512
        n = min(rng.choice([512, 4096, 20000 // 512 * 512, CLUSTER, 3 * CLUSTER + 1024]),
                SIZE - off)
        if i % 5 == 4:
            cmds.append(f"write -z {off} {n}")
        else:
            cmds.append(f"write -P {rng.randrange(1, 256)} {off} {n}")
    qemu_io(path, *cmds, refuse=("failed", "error"))


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    src = tmp_path / "disk.qcow2"
    qemu_create(src, SIZE)
    qemu_io(src, "write -P 0x11 0 3M", "write -P 0x22 20M 5M", "write -P 0x33 60M 64k",
            "write -z 61M 1M", "write -P 0x44 90M 6M", refuse=("failed",))
    qemu_img("bitmap", "--add", str(src), "b0")
    return src


def _incremental_step(src: Path, base: Path, target: Path) -> None:
    dirty = qemu_bitmap_dirty(src, "b0")
    want = _round_out(dirty, CLUSTER, SIZE)
    data = _source_data(src)
    with Image.open(src) as img:
        result = backup(img, target, bitmap="b0", base=base, sync="incremental",
                        workers=4)
    assert result.plan.mode == "incremental"
    _compare(target, src)
    _clean(target)
    assert _own_clusters(target) == want
    # only the dirty clusters' data was read: the I/O count, from QEMU's own maps
    assert result.copy.read_bytes == _intersection(want, data)
    info = json.loads(qemu_img("info", "--output=json", str(target)).stdout)
    assert info["backing-filename"] == base.name
    assert info["backing-filename-format"] == "qcow2"
    assert info["cluster-size"] == CLUSTER


def test_cycle_full_then_incrementals(source: Path, tmp_path: Path) -> None:
    rng = random.Random(10)
    full = tmp_path / "full.qcow2"
    r = cli_process("backup", source, full)
    assert r.returncode == 0, r.stderr
    _compare(full, source)
    _clean(full)
    assert "0.00% fragmented" in qemu_img("check", str(full)).stdout

    _random_writes(source, rng, 40)
    inc1 = tmp_path / "inc1.qcow2"
    _incremental_step(source, full, inc1)

    qemu_img("bitmap", "--clear", str(source), "b0")
    _random_writes(source, rng, 25)
    inc2 = tmp_path / "inc2.qcow2"
    _incremental_step(source, inc1, inc2)
    # and the whole chain still reads as the source
    _compare(inc2, source)


def test_dirty_clusters_that_read_as_zeros_hide_the_base(source: Path, tmp_path: Path) -> None:
    full = tmp_path / "full.qcow2"
    with Image.open(source) as img:
        backup(img, full)
    # zeroes over data the base holds: written zeros, an unallocated-zero range, a discard
    qemu_io(source, "write -z 20M 128k", "write -P 0 21M 64k", "discard 22M 64k",
            refuse=("failed",))
    inc = tmp_path / "inc.qcow2"
    r = cli_process("backup", "--bitmap", "b0", "--base", full, source, inc)
    assert r.returncode == 0, r.stderr
    _compare(inc, source)
    assert _own_clusters(inc) == _round_out(qemu_bitmap_dirty(source, "b0"), CLUSTER, SIZE)
    _clean(inc)


def _kill_after_write(path: Path) -> None:
    """A qemu-io that writes, then dies by SIGKILL: its bitmaps stay marked in use."""
    p = subprocess.Popen([QEMU_IO, "-f", "qcow2", str(path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("write -P 0x55 1M 64k\n")
    p.stdin.flush()
    assert "wrote" in p.stdout.readline()
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_in_use_bitmap_refused_and_auto_falls_back(source: Path, tmp_path: Path) -> None:
    full = tmp_path / "full.qcow2"
    with Image.open(source) as img:
        backup(img, full)
    _kill_after_write(source)
    flags = json.loads(qemu_img("info", "--output=json", "-U", str(source)).stdout)
    assert "in-use" in flags["format-specific"]["data"]["bitmaps"][0]["flags"]
    inc = tmp_path / "inc.qcow2"
    r = cli_process("backup", "--bitmap", "b0", "--base", full, source, inc)
    assert r.returncode == 1
    assert "bitmap 'b0'" in r.stderr and "in use" in r.stderr, r.stderr
    assert not inc.exists()
    r = cli_process("backup", "--sync", "auto", "--bitmap", "b0", "--base", full, source, inc)
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and "full backup" in r.stderr and "in use" in r.stderr
    info = json.loads(qemu_img("info", "--output=json", str(inc)).stdout)
    assert "backing-filename" not in info          # a full backup: no backing file
    _compare(inc, source)
    _clean(inc)


def test_missing_and_inconsistent_bitmaps(source: Path, tmp_path: Path) -> None:
    full = tmp_path / "full.qcow2"
    with Image.open(source) as img:
        backup(img, full)
        with pytest.raises(BitmapUnusableError, match="bitmap 'nope' not found"):
            plan_backup(img, tmp_path / "x.qcow2", sync="incremental", bitmap="nope",
                        base=full)
        plan = plan_backup(img, tmp_path / "x.qcow2", sync="auto", bitmap="nope", base=full)
        assert plan.mode == "full" and "not found" in (plan.fallback or "")
        plan = plan_backup(img, tmp_path / "x.qcow2", sync="auto", bitmap="b0")
        assert plan.mode == "full" and "--base" in (plan.fallback or "")
        table = img.bitmap("b0").bitmap_table_offset
    # a bitmap table entry with reserved bits set: QEMU would refuse to load it too
    with open(source, "r+b") as f:
        f.seek(table)
        f.write((0x8000_0000_0000_0002).to_bytes(8, "big"))
    r = cli_process("backup", "--bitmap", "b0", "--base", full, source, tmp_path / "y.qcow2")
    assert r.returncode == 1 and "bitmap 'b0' is inconsistent" in r.stderr, r.stderr
    assert not (tmp_path / "y.qcow2").exists()


def test_raw_full_backup_and_checksums(source: Path, tmp_path: Path) -> None:
    raw = tmp_path / "full.raw"
    r = cli_process("backup", "-O", "raw", "--checksum", source, raw)
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-O", "raw", str(source), str(ref))
    assert same_file(raw, ref)
    ours = json.loads(cli_process("checksum", source).stdout)
    assert json.loads((tmp_path / "full.raw.checksum").read_text()) == ours
    client = pytest.importorskip("ovirt_imageio.client")
    assert client.checksum(str(source)) == ours
    # a qcow2 full backup hashed in several windows (each read in host order)
    target = tmp_path / "full.qcow2"
    with Image.open(source) as img:
        plan = plan_backup(img, target, checksum=True)
        result = run_backup(img, plan, checksum_window=16 * MiB, workers=3)
    assert result.checksum == ours
    assert json.loads(Path(str(target) + ".checksum").read_text()) == ours
    _compare(target, source)
    _clean(target)


def test_refusals_touch_nothing(source: Path, tmp_path: Path) -> None:
    full = tmp_path / "full.qcow2"
    with Image.open(source) as img:
        backup(img, full)
    before = full.read_bytes()
    # an existing target is never overwritten
    r = cli_process("backup", source, full)
    assert r.returncode == 1 and "exists" in r.stderr
    assert full.read_bytes() == before
    # an incremental backup needs both names, qcow2, a base of the source's size
    for args, words in [(["--bitmap", "b0"], "--base"), (["--base", str(full)], "--bitmap"),
                        (["--bitmap", "b0", "--base", str(full), "-O", "raw"], "qcow2"),
                        (["--bitmap", "b0", "--base", str(full), "--checksum"], "checksum"),
                        (["--bitmap", "b0", "--base", str(source)], "source image"),
                        (["--sync", "full", "--bitmap", "b0"], "full backup")]:
        r = cli_process("backup", *args, source, tmp_path / "new.qcow2")
        assert r.returncode == 1 and words in r.stderr, (args, r.stderr)
    small = tmp_path / "small.qcow2"
    qemu_create(small, SIZE // 2)
    r = cli_process("backup", "--bitmap", "b0", "--base", small, source, tmp_path / "new.qcow2")
    assert r.returncode == 1 and "size" in r.stderr
    # an existing TARGET.checksum stops the backup before TARGET is created
    (tmp_path / "new.qcow2.checksum").write_text("keep me")
    r = cli_process("backup", "--checksum", source, tmp_path / "new.qcow2")
    assert r.returncode == 1 and "exists" in r.stderr
    assert (tmp_path / "new.qcow2.checksum").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["disk.qcow2", "full.qcow2", "new.qcow2.checksum",
                                            "small.qcow2"]
    with Image.open(source) as img, pytest.raises(TargetError):
        plan_backup(img, source, sync="full")


def test_help_explains_with_examples() -> None:
    r = cli_process("backup", "--help")
    assert r.returncode == 0
    for words in ("--sync", "--bitmap", "--base", "in use", "TARGET.checksum", "examples"):
        assert words in r.stdout, words


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_backup_removes_what_it_created(source: Path, tmp_path: Path, sig: int,
                                                    code: int) -> None:
    """Stopped right after the raw target was created (the QCOW2KIT_TARGET_STOP hook: it is
    made under a part name, and gets its name once its journal is on disk), then
    interrupted: what was created is removed, no target, journal or checksum file is left."""
    dst = tmp_path / "full.raw"
    env = dict(os.environ, QCOW2KIT_TARGET_STOP="1")
    proc = subprocess.Popen([sys.executable, "-m", "qcow2kit", "backup", "-O", "raw",
                             "--checksum", str(source), str(dst)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _stopped(proc.pid):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert (tmp_path / ".full.raw.qcow2kit-part").exists() and not dst.exists()
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert sorted(os.listdir(tmp_path)) == ["disk.qcow2"]


# ---------------------------------------------------------------- the reads cut to the pending ranges

@pytest.mark.parametrize("seed", range(30))
def test_clip_runs_against_a_byte_by_byte_reference(seed: int) -> None:
    """hostorder.clip_runs (vectorized) keeps exactly the bytes of the runs that lie in the
    copy bitmap's set bits, each at its own host offset (compressed runs keep their
    stream): checked against a reference that walks every granule."""
    import numpy as np

    from qcow2kit.blockcopy import CopyBitmap
    from qcow2kit.hostorder import RUN_DTYPE, clip_runs

    rng = random.Random(seed)
    g = 512
    size = rng.randrange(1, 200) * g
    pending = CopyBitmap(size, g * rng.choice([1, 2, 8]), fill=False)
    for _ in range(rng.randrange(0, 12)):
        a = rng.randrange(0, size)
        pending.set(a, rng.randrange(1, size - a + 1))
    rows, pos = [], 0
    while pos < size:
        n = rng.randrange(1, 20) * g
        if rng.random() < 0.6:
            comp = rng.random() < 0.2
            rows.append((0, 10 ** 6 + pos * 3, min(n, size - pos), pos, min(n, size - pos),
                         comp))
        pos += n
    runs = np.array(rows, dtype=RUN_DTYPE)
    got = clip_runs(runs, pending)
    want_bytes = {}
    for _, host, n, guest, _, comp in rows:
        for b in range(guest, guest + n, g):
            if pending.runs(b // pending.granularity * pending.granularity,
                            pending.granularity):
                want_bytes[b] = host if comp else host + (b - guest)
    got_bytes = {}
    for r in got:
        for b in range(int(r["guest"]), int(r["guest"] + r["length"]), g):
            assert b not in got_bytes
            got_bytes[b] = int(r["host"]) + (0 if r["compressed"] else b - int(r["guest"]))
        if not r["compressed"]:
            assert r["rlen"] == r["length"]
    assert got_bytes == want_bytes
