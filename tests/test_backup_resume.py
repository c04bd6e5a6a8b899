"""`qcow2kit backup` killed at random moments, then `--resume`: the finished target equals an
uninterrupted one (qemu-img map, byte for byte for raw), qemu-img compare finds the chain equal
to the source, qemu-img check finds it clean; and the --new-bitmap cycle with qemu-io writes."""
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

from qemu import (cli_process, qemu_bitmap_dirty, qemu_create, qemu_img, qemu_img_check,
                  qemu_img_info, qemu_img_map, qemu_io)

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def _source(tmp_path: Path) -> Path:
    """40 MiB written back to front (fragmented), with a hole every 5 MiB and some zeros."""
    src = tmp_path / "disk.qcow2"
    qemu_create(src, 48 * MiB)
    cmds = [f"write -P {i + 1} {i * MiB} {MiB}" if i % 9 else f"write -z {i * MiB} {MiB}"
            for i in reversed(range(40)) if i % 5 != 2]
    qemu_io(src, *cmds)
    return src


def _bitmaps(path: Path) -> list[str]:
    data = qemu_img_info(path)["format-specific"]["data"]
    return [b["name"] for b in data.get("bitmaps", [])]


def _backup(*args: str | Path, env: dict | None = None) -> subprocess.CompletedProcess:
    p = cli_process("backup", *args, env=env)
    assert p.returncode == 0, p.stderr
    return p


def _killed(args: list[str | Path], delay: float) -> None:
    p = subprocess.Popen([sys.executable, "-m", "qcow2kit", "backup", *map(str, args)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()


def _pending_bytes(dst: Path, fmt: str) -> int:
    from qcow2kit.blockcopy.pending import JournalStore, PendingMap
    from qcow2kit.blockcopy.resumable import PENDING_BITMAP
    if fmt == "raw":
        j = JournalStore.load(str(dst) + ".pending")
        assert j is not None
        return PendingMap.from_journal(j).pending_bytes
    return sum(n for _, n in qemu_bitmap_dirty(dst, PENDING_BITMAP))


@pytest.mark.parametrize("kind", ["full-qcow2", "full-raw", "incremental"])
def test_sigkill_at_random_moments_then_resume(tmp_path, kind):
    src = _source(tmp_path)
    fmt = "raw" if kind == "full-raw" else "qcow2"
    args: list[str | Path] = ["-O", fmt, "-r", "24M"]
    if kind == "incremental":
        qemu_img("bitmap", "--add", src, "b0")
        _backup(src, tmp_path / "base.qcow2")
        qemu_io(src, *[f"write -P {200 + i} {(7 * i % 47) * MiB + 4096 * i} {300 * 1024}"
                       for i in range(30)])
        args += ["--bitmap", "b0", "--base", tmp_path / "base.qcow2"]
    ref = tmp_path / f"ref.{fmt}"
    t0 = time.monotonic()
    _backup(*args, src, ref)
    took = time.monotonic() - t0
    rng = random.Random(kind)
    resumed = 0
    for trial in range(5):
        dst = tmp_path / f"t{trial}.{fmt}"
        _killed([*args, src, dst], rng.uniform(0.3, took))
        if dst.exists() and (os.path.exists(str(dst) + ".pending") or
                             "qcow2kit-copy-pending" in (_bitmaps(dst) if fmt == "qcow2" else [])):
            if fmt == "qcow2":
                qemu_img_check(dst)                          # an interrupted target is valid
            pending = _pending_bytes(dst, fmt)
            refused = cli_process("backup", *args, src, dst)
            assert refused.returncode == 1 and "add --resume to finish it" in refused.stderr
            from qcow2kit.backup import backup
            from qcow2kit.image import Image
            with Image.open(src) as img:
                res = backup(img, dst, sync="incremental" if kind == "incremental" else "full",
                             bitmap="b0" if kind == "incremental" else None,
                             base=tmp_path / "base.qcow2" if kind == "incremental" else None,
                             fmt=fmt, resume=True)
            # only what was still pending is read
            assert res.copy.read_bytes <= pending
            resumed += 1
        elif not dst.exists():
            # killed before the target got its name: a new run starts over
            assert not os.path.exists(str(dst) + ".pending")
            _backup(*args, src, dst)
        # no part file left over, whenever the kill came
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f".t{trial}.")]
        # finished: no pending bits, equal to the uninterrupted backup
        assert not os.path.exists(str(dst) + ".pending")
        if fmt == "raw":
            assert dst.read_bytes() == ref.read_bytes()
        else:
            assert _bitmaps(dst) == []
            qemu_img_check(dst)
            assert qemu_img_map(dst) == qemu_img_map(ref)
        qemu_img("compare", "-F", fmt, src, dst)
        cli_process("backup", "--resume", *args, src, dst)      # nothing to resume: no harm
        qemu_img("compare", "-F", fmt, src, dst)
    assert resumed >= 1


def test_resume_refusals(tmp_path):
    src = _source(tmp_path)
    nothing = cli_process("backup", "--resume", src, tmp_path / "none.qcow2")
    assert nothing.returncode == 1 and "nothing to resume" in nothing.stderr
    done = tmp_path / "done.qcow2"
    _backup(src, done)
    again = cli_process("backup", "--resume", src, done)
    assert again.returncode == 1 and "nothing to resume" in again.stderr
    ck = cli_process("backup", "--resume", "--checksum", src, done)
    assert ck.returncode == 1 and "--checksum cannot be computed by a resumed backup" in ck.stderr
    exists = cli_process("backup", src, done)
    assert exists.returncode == 1 and "the file exists" in exists.stderr


def test_new_bitmap_cycle_loses_no_write(tmp_path):
    """full + new bitmap, writes, incremental that starts the next bitmap and retires the old
    one, writes, incremental again: each chain compares equal to the source at its time, each
    overlay holds exactly the clusters its bitmap marked, and only the newest bitmap is left."""
    src = _source(tmp_path)
    rng = random.Random(7)

    def writes(n: int) -> None:
        qemu_io(src, *[f"write -P {rng.randrange(1, 255)} {rng.randrange(0, 47 * MiB) // 512 * 512} "
                       f"{rng.choice([512, 4096, 65536, 300000])}" for _ in range(n)])

    _backup("--new-bitmap", "b1", src, tmp_path / "full.qcow2")
    assert _bitmaps(src) == ["b1"]
    base = tmp_path / "full.qcow2"
    for k, name in enumerate(["b2", "b3"], start=1):
        writes(20)
        dirty = qemu_bitmap_dirty(src, f"b{k}")
        inc = tmp_path / f"inc{k}.qcow2"
        _backup("--bitmap", f"b{k}", "--new-bitmap", name, "--base", base, src, inc)
        assert _bitmaps(src) == [name]
        qemu_img("compare", src, inc)
        qemu_img_check(inc)
        cs = 65536
        want = {c for a, n in dirty for c in range(a // cs, -(-(a + n) // cs))}
        held = {c for m in qemu_img_map(inc) if m["depth"] == 0 and m["present"]
                for c in range(m["start"] // cs, -(-(m["start"] + m["length"]) // cs))}
        assert held == want
        base = inc
    assert json.loads(qemu_img("info", "--output=json", "--backing-chain", base).stdout)
