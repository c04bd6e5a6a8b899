"""``compare`` against ``qemu-img compare``: the same stdout, stderr and exit code.

Every factory image is compared with its raw conversion (normal and strict mode), with
itself, with other images of the same size (strict mode: block status mismatches), and
with copies of the raw conversion that have one byte changed at a random place (data,
hole, first or last sector); the first mismatch offset must be qemu-img's.  The library
is also run with small windows, so that a mismatch found in a later window, or ranges
that cross windows, give the same answers.  Then size mismatches both ways, chains, raw
files of odd sizes, and the errors (missing file, wrong or unknown format, locked image).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from qcow2kit.cli.render.compare import verdict_lines
from qcow2kit.compare import compare, open_raw
from qcow2kit.image import Image

from qemu import QEMU_IMG, QEMU_IO, cli_in_process, data_ranges

pytestmark = pytest.mark.qemu

KiB, MiB = 1024, 1024 * 1024


def _qemu(*args: str | os.PathLike, cwd: Path | None = None) -> tuple[int, str, str]:
    p = subprocess.run([QEMU_IMG, "compare", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd)
    return p.returncode, p.stdout, p.stderr


def _ours(capsys, *args: str | os.PathLike, cwd: Path | None = None) -> tuple[int, str, str]:
    before = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        rc, out, err = cli_in_process(capsys, "compare", *map(str, args))
    finally:
        os.chdir(before)
    return rc, out, err.replace("qcow2kit: ", "qemu-img: ")


def _same(capsys, *args: str | os.PathLike, cwd: Path | None = None) -> tuple[tuple, tuple]:
    """Both tools on the same arguments, from ``cwd`` (QEMU 7.2 opens an image's external
    data file relative to the working directory: a factory image is compared from its own)."""
    return _ours(capsys, *args, cwd=cwd), _qemu(*args, cwd=cwd)


def _library(a: Path, b: Path, fmts: tuple[str, str], strict: bool, window: int) -> str:
    imgs = [Image.open(p) if f == "qcow2" else open_raw(str(p)) for p, f in zip((a, b), fmts)]
    try:
        return verdict_lines(compare(imgs[0], imgs[1], strict=strict, window=window))
    finally:
        for img in imgs:
            img.close()


@contextlib.contextmanager
def _cwd(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _sparse_copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def _cases(factory_images):
    return [c for _, c in sorted(factory_images.items()) if not c.encrypted]


# ============================================================================ every image

def test_every_factory_image_against_its_raw_conversion(factory_images, qemu_raw, capsys):
    failures = {}
    for case in _cases(factory_images):
        raw = qemu_raw(case)
        for args in ([case.path, raw], ["-s", case.path, raw], ["-s", case.path, case.path]):
            ours, ref = _same(capsys, *args, cwd=case.path.parent)
            if ours != ref:
                failures[(case.name, *map(str, args[:1]))] = (ours, ref)
    assert not failures


def test_strict_mode_between_images_of_one_size(factory_images, capsys):
    """Pairs of different images with the same virtual size: the block status (allocation,
    zero, data, offsets, end of file, backing files) differs in many ways."""
    by_size: dict[int, list] = {}
    for case in _cases(factory_images):
        by_size.setdefault(Image.open(case.path).size, []).append(case)
    failures = {}
    pairs = 0
    for group in by_size.values():
        for x, y in zip(group, group[1:] + group[:1]):
            if x is y:
                continue
            pairs += 1
            if x.data_file is not None or y.data_file is not None:
                continue          # two working directories would be needed
            for args in (["-s", x.path, y.path], [x.path, y.path]):
                ours, ref = _same(capsys, *args)
                if ours != ref:
                    failures[(x.name, y.name, args[0])] = (ours, ref)
    assert pairs >= 10
    assert not failures


def test_one_byte_changed_at_random_places(factory_images, qemu_raw, tmp_path, capsys):
    """A copy of the raw conversion with one byte changed: qemu-img's first mismatch offset,
    from the CLI and from the library with windows small enough to need several."""
    rng = random.Random(20261130)
    failures = {}
    for case in _cases(factory_images):
        raw = qemu_raw(case)
        size = raw.stat().st_size
        if size == 0:
            continue
        copy = _sparse_copy(raw, tmp_path / f"{case.name}.raw")
        fd = os.open(copy, os.O_RDWR)
        try:
            data = data_ranges(fd, size)
            spots = [rng.randrange(size), size - 1 - rng.randrange(min(size, 512))]
            if data:
                a, e = rng.choice(data)
                spots.append(rng.randrange(a, e))
            for k, spot in enumerate(spots):
                old = os.pread(fd, 1, spot)
                os.pwrite(fd, bytes([old[0] ^ (1 << rng.randrange(8))]), spot)
                args = [case.path, copy] if k % 2 == 0 else [copy, case.path]
                if k == 2:
                    args = ["-s", *args]
                ours, ref = _same(capsys, *args, cwd=case.path.parent)
                if ours != ref:
                    failures[(case.name, spot, "cli")] = (ours, ref)
                window = rng.choice([1 * MiB, 2 * MiB, 3 * MiB])
                fmts = ("qcow2", "raw") if args[-2] == case.path else ("raw", "qcow2")
                with _cwd(case.path.parent):
                    lib = _library(Path(args[-2]), Path(args[-1]), fmts, args[0] == "-s",
                                   window)
                if lib != ref[1]:
                    failures[(case.name, spot, window)] = (lib, ref[1])
                os.pwrite(fd, old, spot)
        finally:
            os.close(fd)
            copy.unlink()
    assert not failures


# ============================================================================ sizes

def _qcow2(path: Path, size: int, *writes: str, backing: Path | None = None) -> Path:
    opts = ["-b", str(backing), "-F", "qcow2"] if backing else []
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", *opts, str(path), str(size)],
                   check=True)
    if writes:
        cmds = [x for w in writes for x in ("-c", w)]
        subprocess.run([QEMU_IO, *cmds, str(path)], check=True, capture_output=True)
    return path


def test_size_mismatch_both_ways(tmp_path, capsys):
    small = _qcow2(tmp_path / "small.qcow2", 4 * MiB, "write -P 1 0 64k", "write -P 2 3M 512")
    zeros = _qcow2(tmp_path / "zeros.qcow2", 8 * MiB, "write -P 1 0 64k", "write -P 2 3M 512",
                   "write -z 5M 64k", "write -P 0 6M 64k")
    tail = _qcow2(tmp_path / "tail.qcow2", 8 * MiB, "write -P 1 0 64k", "write -P 2 3M 512",
                  "write -P 3 7340544 1")
    # data just before the end of the shorter raw file (6M+1000), in the same cluster
    edge = _qcow2(tmp_path / "edge.qcow2", 8 * MiB, "write -P 1 0 64k", "write -P 2 3M 512",
                  "write -P 4 6292400 8")
    early = _qcow2(tmp_path / "early.qcow2", 8 * MiB, "write -P 1 0 64k", "write -P 9 3M 512")
    raw = tmp_path / "small-plus.raw"
    subprocess.run([QEMU_IMG, "convert", "-O", "raw", str(small), str(raw)], check=True)
    os.truncate(raw, 6 * MiB + 1000)
    failures = {}
    for x, y in [(small, zeros), (small, tail), (small, early), (small, raw), (tail, raw),
                 (edge, raw)]:
        for args in ([x, y], [y, x], ["-s", x, y], ["-q", y, x], ["-p", "-q", x, y]):
            ours, ref = _same(capsys, *args)
            if ours != ref:
                failures[(x.name, y.name, str(args[0]))] = (ours, ref)
    assert not failures


def test_raw_files_of_odd_sizes(tmp_path, capsys):
    """qemu-img rounds a raw file's size up to whole sectors; its end starts a new chunk,
    so a difference just past it is named at the end, not at the sector's start."""
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(b"\x01" * 1000)
    b.write_bytes(b"\x01" * 1000 + bytes(24))
    failures = {}
    for spot in (None, 999, 1010, 1023):
        data = bytearray(b.read_bytes())
        if spot is not None:
            data[spot] ^= 0x40
        b.write_bytes(data)
        for args in ([a, b], [b, a], ["-s", a, b]):
            ours, ref = _same(capsys, *args)
            if ours != ref:
                failures[(spot, str(args[0]))] = (ours, ref)
    assert not failures


# ============================================================================ chains

def test_backing_chains(tmp_path, capsys):
    base = _qcow2(tmp_path / "base.qcow2", 8 * MiB, "write -P 1 0 1M", "write -P 2 5M 64k")
    mid = _qcow2(tmp_path / "mid.qcow2", 8 * MiB, "write -P 3 512k 64k", backing=base)
    top = _qcow2(tmp_path / "top.qcow2", 8 * MiB, "write -z 5M 4k", backing=mid)
    flat = tmp_path / "flat.qcow2"
    subprocess.run([QEMU_IMG, "convert", "-O", "qcow2", str(top), str(flat)], check=True)
    flat_raw = tmp_path / "flat.raw"
    subprocess.run([QEMU_IMG, "convert", "-O", "raw", str(top), str(flat_raw)], check=True)
    longer = _qcow2(tmp_path / "longer.qcow2", 12 * MiB, "write -P 4 9M 4k", backing=base)
    failures = {}
    for x, y in [(top, flat), (top, mid), (top, base), (mid, base), (top, flat_raw),
                 (longer, base), (longer, top)]:
        for args in ([x, y], [y, x], ["-s", x, y], ["-s", y, x]):
            ours, ref = _same(capsys, *args)
            if ours != ref:
                failures[(x.name, y.name, str(args[0]))] = (ours, ref)
    assert not failures


def test_formats_given_and_probed(tmp_path, capsys):
    img = _qcow2(tmp_path / "img.qcow2", 1 * MiB, "write -P 5 0 4k")
    raw = tmp_path / "img.raw"
    subprocess.run([QEMU_IMG, "convert", "-O", "raw", str(img), str(raw)], check=True)
    failures = {}
    for args in (["-f", "qcow2", "-F", "raw", img, raw], ["-f", "raw", img, raw],
                 ["-F", "raw", raw, img], ["-f", "raw", "-F", "raw", img, img],
                 ["-F", "qcow2", raw, img]):
        ours, ref = _same(capsys, *args)
        if ours != ref:
            failures[tuple(map(str, args))] = (ours, ref)
    assert not failures


# ============================================================================ errors

def test_errors_are_qemu_imgs(tmp_path, capsys):
    img = _qcow2(tmp_path / "img.qcow2", 1 * MiB, "write -P 5 0 4k")
    raw = tmp_path / "img.raw"
    raw.write_bytes(bytes(MiB))
    orphan = _qcow2(tmp_path / "orphan.qcow2", 1 * MiB, backing=img)
    moved = tmp_path / "moved.qcow2"
    shutil.copy(img, moved)
    os.rename(img, tmp_path / "gone.qcow2")   # orphan's backing file is missing now
    (tmp_path / "dir").mkdir()
    cases = [[moved, tmp_path / "missing.qcow2"], [tmp_path / "missing.qcow2", moved],
             ["-f", "qcow2", raw, moved], ["-F", "qcow2", moved, raw],
             ["-f", "foo", moved, raw], ["-F", "bar", moved, raw],
             ["-f", "foo", tmp_path / "missing", raw], [orphan, moved],
             [tmp_path / "dir", moved]]
    failures = {}
    for args in cases:
        ours, ref = _same(capsys, *args)
        if ours != ref:
            failures[tuple(map(str, args))] = (ours, ref)
    assert not failures
    # one name only: a usage error, exit 1, as qemu-img's
    rc, _, err = _ours(capsys, moved)
    assert rc == _qemu(moved)[0] == 1 and "Expecting two image file names" in err


def test_locked_image(tmp_path, capsys):
    img = _qcow2(tmp_path / "img.qcow2", 1 * MiB, "write -P 5 0 4k")
    other = tmp_path / "other.qcow2"
    shutil.copy(img, other)
    holder = subprocess.Popen([QEMU_IO, "-c", "sleep 60000", str(img)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        # wait for its locks without opening the image (an open would race with qemu-io's)
        inode = f":{os.stat(img).st_ino} "
        deadline = time.monotonic() + 20
        while inode not in Path("/proc/locks").read_text() and time.monotonic() < deadline:
            assert holder.poll() is None, holder.communicate()[0]
            time.sleep(0.05)
        failures = {}
        for args in ([img, other], [other, img], ["-U", img, other]):
            ours, ref = _same(capsys, *args)
            # with -U qcow2kit adds one warning line (README): exit code and stdout only
            if ours[:2] != ref[:2] or (args[0] != "-U" and ours[2] != ref[2]):
                failures[tuple(map(str, args))] = (ours, ref)
        assert not failures
        assert _qemu(img, other)[0] == 2
    finally:
        holder.kill()
        holder.wait()
