"""Editing persistent bitmaps (``qcow2kit bitmap --add/--remove/--clear/--enable/--disable/
--merge``, :mod:`qcow2kit.bitmapedit`) against ``qemu-img bitmap`` 7.2 doing the same on a
twin image: the same bitmaps in ``qemu-img info``, the same dirty ranges through qemu-nbd -B,
the same messages and exit statuses; qemu-img check clean after each edit, and after a
SIGKILL at every ordered step of the writer the old or the new state (leaks at most).
Also the in-place editor (:mod:`qcow2kit.inplace`) alone: new refcount blocks, frees, the
refusals."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qcow2kit.cli.main import main as cli_main
from qcow2kit.bitmapedit import add_bitmap, merge_bitmap, remove_bitmap
from qcow2kit.errors import Qcow2Error
from qcow2kit.image import Image
from qcow2kit.inplace import InplaceEditor
from qcow2kit.locks import HELD_BY_WRITER, REFUSED_BY_WRITER, first_conflict

from qemu import (QEMU_IO, qemu_bitmap_dirty, qemu_img, qemu_img_check,
                  qemu_img_info, qemu_io, sha256_file)

pytestmark = pytest.mark.qemu

KiB, MiB = 1 << 10, 1 << 20


def _create(path: Path, size: str = "16M", opts: str = "") -> Path:
    qemu_img("create", "-f", "qcow2", *(["-o", opts] if opts else []), str(path), size)
    return path


def _bitmaps(path: Path) -> list[tuple[str, int, list[str]]]:
    """What qemu-img info says of the bitmaps: (name, granularity, flags)."""
    data = qemu_img_info(path)["format-specific"]["data"]
    return [(b["name"], b["granularity"], sorted(b["flags"])) for b in data.get("bitmaps", [])]


def _check_clean(path: Path) -> None:
    rc, out = qemu_img_check(path)
    assert rc == 0, out


def _ours(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``qcow2kit bitmap ARGS`` run in ``cwd``, in this process (the crash tests use a child)."""
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli_main(["bitmap", *args])
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["qcow2kit", "bitmap", *args], rc, out.getvalue(),
                                       err.getvalue())


def _theirs(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return qemu_img("bitmap", *args, cwd=cwd, ok=None)


def _dirty(path: Path, name: str) -> list[tuple[int, int]]:
    """qemu-nbd -B's view of a bitmap, once the server has let the image go."""
    ranges = qemu_bitmap_dirty(path, name)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        fd = os.open(path, os.O_RDONLY)
        try:
            if first_conflict(fd, HELD_BY_WRITER, REFUSED_BY_WRITER) is None:
                return ranges
        finally:
            os.close(fd)
        time.sleep(0.02)
    raise AssertionError("qemu-nbd did not let the image go")


def _write(path: Path, *cmds: str) -> None:
    qemu_io(path, *cmds, refuse=("error", "failed"))


# --------------------------------------------------------------------------- same as qemu-img

SEQUENCE = [
    ("io", "write -P 1 0 128k"),                      # before any bitmap: recorded nowhere
    (["--add"], "b1"),
    (["--add", "-g", "4k", "--disable"], "b2"),
    ("io", "write -P 2 1M 64k", "write -P 3 5M 4k"),
    (["--add", "-g", "512k"], "b3"),
    ("io", "write -P 4 7M 100k"),
    (["--merge", "b1"], "b2"),                        # 64k bits into 4k bits
    (["--merge", "b2"], "b3"),                        # 4k bits into 512k bits
    (["--enable"], "b2"),
    ("io", "write -P 5 9M 4k"),
    (["--disable"], "b1"),
    ("io", "write -P 6 10M 4k"),                      # b1 is disabled: not recorded there
    (["--clear"], "b3"),
    (["--remove"], "b1"),
    (["--add", "--merge", "b2", "--disable"], "b4"),  # several operations, in their order
    (["--remove"], "b2"),
    (["--remove"], "b3"),
    (["--remove"], "b4"),                             # no bitmap left: the extension goes
    (["--add", "-g", "1M"], "b5"),
    ("io", "write -P 7 15M 8k"),
]


@pytest.mark.parametrize("opts", ["", "cluster_size=4k,refcount_bits=1"])
def test_same_bitmaps_as_qemu_img(tmp_path, opts):
    ours = _create(tmp_path / "ours.qcow2", opts=opts)
    theirs = _create(tmp_path / "theirs.qcow2", opts=opts)
    for step in SEQUENCE:
        if step[0] == "io":
            for img in (ours, theirs):
                _write(img, *step[1:])
            continue
        args, name = step
        r = _ours(tmp_path, *args, ours.name, name)
        assert r.returncode == 0, (step, r.stderr)
        _theirs(tmp_path, *args, theirs.name, name).check_returncode()
        assert _bitmaps(ours) == _bitmaps(theirs), step
        _check_clean(ours)
        if "--merge" in args or "--clear" in args:
            for bname, _, _ in _bitmaps(theirs):
                assert _dirty(ours, bname) == _dirty(theirs, bname), \
                    (step, bname)
    assert _bitmaps(ours) == [("b5", 1 * MiB, ["auto"])]
    assert _dirty(ours, "b5") == _dirty(theirs, "b5") == [(15 * MiB, MiB)]


def test_writes_are_recorded_after_add_and_enable_not_after_disable(tmp_path):
    img = _create(tmp_path / "a.qcow2")
    _write(img, "write 0 64k")
    assert _ours(tmp_path, "--add", "-g", "64k", img.name, "b").returncode == 0
    _write(img, "write 1M 64k")
    assert _dirty(img, "b") == [(MiB, 64 * KiB)]
    assert _ours(tmp_path, "--disable", img.name, "b").returncode == 0
    _write(img, "write 2M 64k")
    assert _dirty(img, "b") == [(MiB, 64 * KiB)]
    assert _ours(tmp_path, "--enable", img.name, "b").returncode == 0
    _write(img, "write 3M 4k")
    assert _dirty(img, "b") == [(MiB, 64 * KiB), (3 * MiB, 64 * KiB)]
    assert _bitmaps(img) == [("b", 64 * KiB, ["auto"])]
    _check_clean(img)


def test_merge_from_another_file(tmp_path):
    src = _create(tmp_path / "src.qcow2")
    qemu_img("bitmap", "--add", "-g", "8k", str(src), "s")
    _write(src, "write 2M 12k", "write 9M 1M")
    other = _create(tmp_path / "other.qcow2", "32M")
    qemu_img("bitmap", "--add", str(other), "o")
    ours, theirs = (_create(tmp_path / f"{w}.qcow2") for w in ("ours", "theirs"))
    for img in (ours, theirs):
        qemu_img("bitmap", "--add", str(img), "d")
        _write(img, "write 100k 1k")
    for args in (["--merge", "s", "-b", "src.qcow2"],
                 ["--merge", "s", "-b", "src.qcow2", "-F", "qcow2"]):
        r = _ours(tmp_path, *args, "ours.qcow2", "d")
        assert r.returncode == 0, r.stderr
        _theirs(tmp_path, *args, "theirs.qcow2", "d").check_returncode()
        assert _dirty(ours, "d") == _dirty(theirs, "d")
        _check_clean(ours)
    assert merge_bitmap(ours, "d", "s", source_file=src) is None     # the library call
    assert _dirty(ours, "d") == _dirty(theirs, "d")
    # different sizes, a raw file, a missing bitmap: qemu-img's words
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(MiB))
    for args in (["--merge", "o", "-b", "other.qcow2"], ["--merge", "x", "-b", "r.raw", "-F",
                                                         "raw"],
                 ["--merge", "x", "-b", "src.qcow2"]):
        before = sha256_file(ours)
        r, q = _ours(tmp_path, *args, "ours.qcow2", "d"), _theirs(tmp_path, *args,
                                                                  "theirs.qcow2", "d")
        assert (r.returncode, _words(r.stderr)) == (q.returncode, _words(q.stderr)) != (0, ""), \
            args
        assert sha256_file(ours) == before


# --------------------------------------------------------------------------- errors

def _words(stderr: str) -> str:
    """A message without the program name, with QEMU's node names (ours: the file name) as
    NODE and the twin images' names as IMG."""
    s = stderr.replace("qemu-img: ", "").replace("qcow2kit: ", "")
    s = re.sub(r"WARNING: Image format was not specified.*\n(?: {9}.*\n)*", "", s)  # probing raw
    s = re.sub(r"persistent in '[^']*'", "persistent in NODE", s)
    s = re.sub(r"persistent bitmaps to \S+:", "persistent bitmaps to NODE:", s)
    return s.replace("ours.qcow2", "IMG").replace("theirs.qcow2", "IMG")


ERROR_CASES = [
    ["--add", "IMG", "b1"],                          # exists
    ["--add", "-g", "256", "IMG", "n"],
    ["--add", "-g", "3000", "IMG", "n"],
    ["--add", "-g", "4G", "IMG", "n"],
    ["--add", "-g", "abc", "IMG", "n"],
    ["--add", "-g", "-5", "IMG", "n"],
    ["--add", "IMG", ""],
    ["--add", "-g", "1k", "IMG", "n" * 1024],
    ["--remove", "IMG", "nope"],
    ["--clear", "IMG", "nope"],
    ["--enable", "IMG", "nope"],
    ["--disable", "IMG", "nope"],
    ["--merge", "nope", "IMG", "b1"],
    ["--merge", "b1", "IMG", "nope"],
    ["IMG", "b1"],
    ["--add", "IMG"],
    ["--add", "IMG", "b1", "extra"],
    ["-g", "4096", "--remove", "IMG", "b1"],
    ["--disable", "-b", "x", "IMG", "b1"],
    ["--disable", "-F", "qcow2", "IMG", "b1"],
    ["--merge", "b1", "-b", "IMG", "IMG", "b1"],     # its own file: the locks say no
    ["--add", "--add", "IMG", "n2"],                 # the first stays done
    ["--disable", "--add", "IMG", "n3"],             # disable first: not found
    ["--add", "nofile.qcow2", "b1"],
    ["--merge", "b1", "-b", "nofile.qcow2", "IMG", "b1"],
    ["--merge", "b1", "-b", "r.raw", "IMG", "b1"],
    ["--merge", "b1", "-b", "r.raw", "-F", "qcow2", "IMG", "b1"],
    ["--add", "-f", "raw", "IMG", "n"],
    ["--clear", "-f", "raw", "IMG", "b1"],
    ["--add", "r.raw", "n"],
    # the bitmap left in use by a killed QEMU
    ["--clear", "IMG", "used"],
    ["--enable", "IMG", "used"],
    ["--disable", "IMG", "used"],
    ["--merge", "used", "IMG", "b1"],
    ["--merge", "b1", "IMG", "used"],
]


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    base = _create(tmp_path / "base.qcow2")
    qemu_img("bitmap", "--add", str(base), "used")
    qemu_io(base, "write 0 64k", "sigraise 9", ok=None)          # leaves "used" in use
    qemu_img("bitmap", "--add", str(base), "b1")
    assert ("used", 65536, ["auto", "in-use"]) in _bitmaps(base)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    (tmp_path / "r.raw").write_bytes(bytes(MiB))
    shutil.copyfile(base, ours)
    shutil.copyfile(base, theirs)
    return ours, theirs


def test_errors_and_exit_statuses_are_qemu_imgs(tmp_path):
    ours, theirs = _pair(tmp_path)
    for case in ERROR_CASES:
        before = sha256_file(ours)
        r = _ours(tmp_path, *[ours.name if a == "IMG" else a for a in case])
        q = _theirs(tmp_path, *[theirs.name if a == "IMG" else a for a in case])
        assert r.returncode == q.returncode == 1, (case, r.stderr, q.stderr)
        assert _words(r.stderr) == _words(q.stderr), case
        assert _bitmaps(ours) == _bitmaps(theirs), case
        if case[:2] != ["--add", "--add"]:
            assert sha256_file(ours) == before, case      # a failed operation writes nothing
    _check_clean(ours)


def test_in_use_bitmap_can_be_removed_and_others_added(tmp_path):
    ours, theirs = _pair(tmp_path)
    for args in (["--add", "-g", "16k"], ["--remove"]):
        name = "new" if "--add" in args else "used"
        assert _ours(tmp_path, *args, ours.name, name).returncode == 0
        _theirs(tmp_path, *args, theirs.name, name).check_returncode()
        assert _bitmaps(ours) == _bitmaps(theirs)
        _check_clean(ours)


def test_v2_image_and_image_in_use(tmp_path):
    for name in ("ours", "theirs"):
        _create(tmp_path / f"{name}.qcow2", opts="compat=0.10")
    for args in (["--add"], ["--remove"], ["--enable"]):
        r = _ours(tmp_path, *args, "ours.qcow2", "b")
        q = _theirs(tmp_path, *args, "theirs.qcow2", "b")
        assert (r.returncode, _words(r.stderr)) == (q.returncode, _words(q.stderr)), args
        assert r.returncode == 1
    for name in ("ours", "theirs"):
        (tmp_path / f"{name}.qcow2").unlink()
        _create(tmp_path / f"{name}.qcow2")
    held = [subprocess.Popen([QEMU_IO, "-f", "qcow2", str(tmp_path / f"{n}.qcow2")],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for n in ("ours", "theirs")]
    try:
        for p in held:        # qemu-io has the image open once it prints its prompt; wait
            _wait_locked(tmp_path / ("ours.qcow2" if p is held[0] else "theirs.qcow2"))
        before = sha256_file(tmp_path / "ours.qcow2")
        r = _ours(tmp_path, "--add", "ours.qcow2", "b")
        q = _theirs(tmp_path, "--add", "theirs.qcow2", "b")
        assert (r.returncode, _words(r.stderr)) == (q.returncode, _words(q.stderr))
        assert r.returncode == 1 and "lock" in r.stderr
        assert sha256_file(tmp_path / "ours.qcow2") == before
    finally:
        for p in held:
            p.communicate(b"quit\n", timeout=30)


def _wait_locked(path: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if qemu_img("info", "--output=json", str(path), ok=None).returncode:
            return
        time.sleep(0.05)
    raise AssertionError("qemu-io did not lock the image")


# --------------------------------------------------------------------------- crashes

def _run_until_stopped(stop_at: int, cwd: Path, *args: str) -> bool:
    """The command line with QCOW2KIT_WRITER_STOP_AT; SIGKILLed if it stops itself."""
    env = dict(os.environ, QCOW2KIT_WRITER_STOP_AT=str(stop_at))
    proc = subprocess.Popen([sys.executable, "-m", "qcow2kit", "bitmap", *args], cwd=cwd,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watchdog = threading.Timer(60, lambda: os.kill(proc.pid, signal.SIGKILL))
    watchdog.start()
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        if os.WIFSTOPPED(status):
            os.kill(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
            proc.returncode = -9
            return True
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        return False
    finally:
        watchdog.cancel()
        if proc.stderr:
            proc.stderr.close()


CRASH_OPS = [
    ("first add", [], ["--add"], "a"),
    ("first add, backing file", [], ["--add"], "a"),  # the backing file name moves first
    ("add", [("a", [])], ["--add", "-g", "4k"], "b"),
    ("merge", [("a", []), ("b", ["-g", "4k", "--disable"])], ["--merge", "a"], "b"),
    ("remove one", [("a", []), ("b", [])], ["--remove"], "a"),
    ("remove the last", [("a", [])], ["--remove"], "a"),
]


@pytest.mark.parametrize("what,setup,args,name", CRASH_OPS, ids=[c[0] for c in CRASH_OPS])
def test_sigkill_after_every_step(tmp_path, what, setup, args, name):
    opts = "cluster_size=4k"
    if "backing" in what:
        _create(tmp_path / "base.qcow2")
        opts += ",backing_file=base.qcow2,backing_fmt=qcow2"
    pristine = _create(tmp_path / "pristine.qcow2", opts=opts)
    for bname, extra in setup:
        qemu_img("bitmap", "--add", *extra, str(pristine), bname)
    _write(pristine, "write 0 64k", "write 3M 20k")
    done = tmp_path / "done.qcow2"
    shutil.copyfile(pristine, done)
    assert _ours(tmp_path, *args, done.name, name).returncode == 0
    before, after = _state(pristine), _state(done)
    assert before != after
    states = {"before": 0, "after": 0}
    img = tmp_path / "img.qcow2"
    for n in range(1, 30):
        shutil.copyfile(pristine, img)
        stopped = _run_until_stopped(n, tmp_path, *args, img.name, name)
        rc, out = qemu_img_check(img)
        assert rc in (0, 3), (what, n, out)
        got = _state(img)
        assert got in (before, after), (what, n, got)
        states["before" if got == before else "after"] += 1
        if not stopped:
            assert rc == 0 and got == after
            break
        # and QEMU can go on using it: a guest write, then check again
        _write(img, "write -P 9 8M 4k")
        rc, out = qemu_img_check(img)
        assert rc in (0, 3) and not out.get("corruptions"), (what, n, out)
        assert qemu_img_info(img)["format-specific"]["data"]["corrupt"] is False
    else:
        raise AssertionError("never finished")
    assert n >= 3 and states["after"] >= 1
    assert _state(img) == after and qemu_img_info(img).get("backing-filename") == \
        qemu_img_info(pristine).get("backing-filename")
    assert states["before"] >= (0 if what == "remove the last" else 1)   # its first step switches


def _state(img: Path) -> tuple[list, dict]:
    """The bitmaps QEMU sees and their dirty ranges."""
    bms = _bitmaps(img)
    return bms, {b: _dirty(img, b) for b, _, _ in bms}


# --------------------------------------------------------------------------- the editor alone

def test_editor_new_refcount_blocks_frees_and_refusals(tmp_path):
    # 512-byte clusters, 64-bit refcounts: a refcount block covers 64 clusters and the
    # one-cluster refcount table 64 blocks (4096 clusters)
    img = _create(tmp_path / "e.qcow2", opts="cluster_size=512,refcount_bits=64")
    with InplaceEditor(img) as ed:
        off = ed.allocate(100)               # past the first block's 64 clusters
        assert off % 512 == 0
        assert all(ed.refcount(off // 512 + k) == 1 for k in range(100))
    rc, out = qemu_img_check(img)
    assert rc == 3 and out["leaks"] == 100, out      # nothing refers to them yet
    with InplaceEditor(img) as ed:
        ed.free([(off, 60), (off + 60 * 512, 40)])
        assert ed.refcount(off // 512) == 0
        again = ed.allocate(10)
        assert again == off                  # the first free run
        ed.free([(again, 10)])
    _check_clean(img)
    # past what the one-cluster refcount table covers: a bigger table first
    with InplaceEditor(img) as ed:
        big = ed.allocate(64 * 64)
        assert ed.header.refcount_table_clusters > 1
    rc, out = qemu_img_check(img)
    assert rc == 3 and out["leaks"] == 64 * 64 and not out.get("corruptions"), out
    with InplaceEditor(img) as ed:
        ed.free([(big, 64 * 64)])
    _check_clean(img)
    # beyond QEMU's limit of the refcount table: refused, nothing written
    before = sha256_file(img)
    with InplaceEditor(img) as ed, pytest.raises(Qcow2Error, match="refcount table"):
        ed.allocate(1 << 30)
    assert sha256_file(img) == before
    # the same image is still an image bitmaps can be added to
    add_bitmap(img, "x", granularity=512)
    _write(img, "write 0 40k")
    assert _dirty(img, "x") == [(0, 40 * KiB)]
    remove_bitmap(img, "x")
    assert _bitmaps(img) == []
    _check_clean(img)


def test_editor_refuses_dirty_and_corrupt_images(tmp_path):
    img = _create(tmp_path / "lazy.qcow2", opts="lazy_refcounts=on")
    qemu_io(img, "write 0 64k", "sigraise 9", ok=None)       # leaves the dirty bit
    with Image.open(img) as i:
        assert i.header.dirty
    before = sha256_file(img)
    r = _ours(tmp_path, "--add", img.name, "b")
    assert r.returncode == 1 and "dirty" in r.stderr
    assert sha256_file(img) == before
    img2 = _create(tmp_path / "c.qcow2")
    with open(img2, "r+b") as f:                                 # the corrupt bit
        f.seek(72)
        f.write((2).to_bytes(8, "big"))
    r = _ours(tmp_path, "--add", img2.name, "b")
    q = _theirs(tmp_path, "--add", img2.name, "b")
    assert (r.returncode, _words(r.stderr)) == (q.returncode, _words(q.stderr))


def test_removing_a_bitmap_with_a_damaged_table_leaks_rather_than_corrupts(tmp_path):
    img = _create(tmp_path / "d.qcow2", opts="cluster_size=4k")
    add_bitmap(img, "b", granularity=512)
    _write(img, "write 0 64k")                    # QEMU stores a data cluster for it
    with Image.open(img) as i:
        table = i.bitmap("b").bitmap_table_offset
        size = i.src.size
    with open(img, "r+b") as f:                   # entry 0 now points past the end
        f.seek(table)
        f.write((size + 64 * KiB).to_bytes(8, "big"))
    remove_bitmap(img, "b")
    assert _bitmaps(img) == []
    rc, out = qemu_img_check(img)
    assert rc == 3 and out["leaks"] == 1 and not out.get("corruptions"), out


def test_refcount_table_growth_killed_after_every_step(tmp_path):
    pristine = _create(tmp_path / "p.qcow2", opts="cluster_size=512,refcount_bits=64")
    img = tmp_path / "g.qcow2"
    code = ("import sys; from qcow2kit.inplace import InplaceEditor\n"
            "with InplaceEditor(sys.argv[1]) as ed:\n"
            "    ed.free([(ed.allocate(64 * 64), 64 * 64)])\n")
    for n in range(1, 20):
        shutil.copyfile(pristine, img)
        env = dict(os.environ, QCOW2KIT_WRITER_STOP_AT=str(n))
        proc = subprocess.Popen([sys.executable, "-c", code, str(img)], env=env)
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        stopped = os.WIFSTOPPED(status)
        if stopped:
            os.kill(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
            proc.returncode = -9
        else:
            assert os.waitstatus_to_exitcode(status) == 0
        rc, out = qemu_img_check(img)
        assert rc in (0, 3) and not out.get("corruptions"), (n, out)
        _write(img, "write -P 3 1M 64k")          # QEMU goes on with the table it finds
        rc, out = qemu_img_check(img)
        assert rc in (0, 3) and not out.get("corruptions"), (n, out)
        if not stopped:
            break
    assert n >= 4
    with Image.open(img) as i:
        assert i.header.refcount_table_clusters > 1
