"""QEMU's image locks on the reading side, tested against real QEMU processes both ways.

One way: while qemu-io or qemu-nbd has an image (or a backing file, or a data file) open,
every reading command of qcow2kit fails exactly as the same qemu-img command does (same exit
status, same message apart from the program name), and reads anyway with -U (warning once).
The other way: while this process holds an image open with the library, QEMU cannot open it
for writing, qemu-img info still works, and closing the image lets QEMU write again.

Which lock bytes a process holds is read from /proc/locks (OFD locks show pid -1 there), so
the lock bytes qcow2kit takes are compared with those of qemu-nbd --read-only (a QEMU reader
that stays open), file by file.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from qemu import (QEMU_IO, QEMU_NBD, cli_in_process, have_qemu, qemu_create, qemu_img,
                  qemu_io, same_file)

import qcow2kit
from qcow2kit.locks import ForceShareWarning, LockConflictError

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not have_qemu() or QEMU_NBD is None,
                                 reason="needs qemu-img, qemu-io and qemu-nbd")]

PERM, SHARED = 100, 200          # byte 100 + i: holds permission i; 200 + i: refuses it
READ, WRITE, RESIZE = 0, 1, 3


# ------------------------------------------------------------------------------ lock bytes

def lock_bytes(path: str | os.PathLike) -> set[int]:
    """The bytes of ``path`` on which some open file holds a lock, from /proc/locks."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out: set[int] = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields:   # a blocked waiter, not a held lock
                continue
            if fields[5] == key:
                start, end = int(fields[6]), fields[7]
                out.update(range(start, (int(end) if end != "EOF" else start) + 1))
    return out


def wait_for(pred, what: str, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextmanager
def holding(kind: str, path: Path, *extra: str) -> Iterator[subprocess.Popen]:
    """A real QEMU process that keeps ``path`` open, started in its directory (QEMU 7.2 finds
    a relative data file name from there): ``qemu-io`` (interactive, read-write), ``qemu-io-ro``
    (-r), ``qemu-nbd`` (read-write) or ``qemu-nbd-ro`` (--read-only); killed on exit."""
    sockdir = tempfile.mkdtemp(prefix="nbd", dir="/tmp")   # a unix socket path is short
    read_only = kind.endswith("-ro")
    if kind.startswith("qemu-io"):
        argv = [QEMU_IO, *(["-r"] if read_only else []), *extra, "-f", "qcow2", path.name]
    else:
        argv = [QEMU_NBD, *(["--read-only"] if read_only else []), f"--socket={sockdir}/s",
                "-f", "qcow2", *extra, path.name]
    wanted = PERM + (READ if read_only else WRITE)
    proc = subprocess.Popen(argv, cwd=path.parent, stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: wanted in lock_bytes(path), f"{kind} to lock {path}", proc)
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)
        shutil.rmtree(sockdir, ignore_errors=True)
    wait_for(lambda: not lock_bytes(path), f"the locks of {kind} on {path} to go")


def as_qcow2kit(qemu_stderr: str) -> str:
    """qemu-img's stderr with qcow2kit's program name."""
    return "".join("qcow2kit: " + line[len("qemu-img: "):] if line.startswith("qemu-img: ")
                   else line for line in qemu_stderr.splitlines(keepends=True))


# ------------------------------------------------------------------------------ images

@pytest.fixture
def images(tmp_path: Path) -> Path:
    """In tmp_path: img.qcow2 (data), base.qcow2 <- mid.qcow2 <- top.qcow2, raw.img <- rtop.qcow2,
    data.qcow2 and other.qcow2 sharing the external data file shared.raw."""
    qemu_create(tmp_path / "img.qcow2", "4M")
    qemu_io(tmp_path / "img.qcow2", "write -P 0x11 0 64k", "write -P 0x22 1M 128k")
    qemu_create(tmp_path / "base.qcow2", "4M")
    qemu_io(tmp_path / "base.qcow2", "write -P 0x33 0 1M")
    qemu_create(tmp_path / "mid.qcow2", "4M", backing="base.qcow2")
    qemu_create(tmp_path / "top.qcow2", "4M", backing="mid.qcow2")
    qemu_io(tmp_path / "top.qcow2", "write -P 0x44 64k 64k")
    with open(tmp_path / "raw.img", "wb") as f:
        f.truncate(4 << 20)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "raw.img", "-F", "raw", "rtop.qcow2", "4M",
             cwd=tmp_path)
    qemu_create(tmp_path / "data.qcow2", "4M", "data_file=shared.raw")
    qemu_io(tmp_path / "data.qcow2", "write -P 0x55 0 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=shared.raw", "other.qcow2", "4M",
             cwd=tmp_path)
    return tmp_path


# (qcow2kit arguments, qemu-img arguments that open the image the same way); FILE is the image
# and OUT a conversion target. bench and rmap have no qemu-img twin: they read data, so they
# open as qemu-img map and check do.
COMMANDS = [
    (["info", "FILE"], ["info", "FILE"]),
    (["info", "--output=json", "FILE"], ["info", "--output=json", "FILE"]),
    (["map", "FILE"], ["map", "FILE"]),
    (["map", "--output=json", "FILE"], ["map", "--output=json", "FILE"]),
    (["convert", "-O", "raw", "FILE", "OUT"], ["convert", "-O", "raw", "FILE", "OUT"]),
    (["bench", "order", "--no-measure", "FILE"], ["map", "FILE"]),
    (["rmap", "show", "FILE"], ["check", "FILE"]),
    (["rmap", "verify", "FILE"], ["check", "FILE"]),
]
IDS = ["info", "info-json", "map", "map-json", "convert", "bench", "rmap-show", "rmap-verify"]


def _argv(template: list[str], image: str, out: Path) -> list[str]:
    return [image if a == "FILE" else str(out) if a == "OUT" else a for a in template]


def run_ours(capsys, images: Path, ours: list[str], image: str, force_share: bool = False
             ) -> tuple[int, str]:
    """qcow2kit ``ours`` on ``image``, in ``images``: (exit status, stderr)."""
    (images / "ours.raw").unlink(missing_ok=True)
    ours = _argv(ours, image, images / "ours.raw")
    cut = 2 if ours[0] in ("bench", "rmap") else 1
    u = ["-U"] if force_share else []
    cwd = os.getcwd()
    os.chdir(images)
    try:
        rc, _, err = cli_in_process(capsys, *ours[:cut], *u, *ours[cut:])
    finally:
        os.chdir(cwd)
    return rc, err


def compare(capsys, images: Path, ours: list[str], theirs: list[str], image: str,
            force_share: bool = False):
    """Run both with ``image`` (relative to ``images``, where both run); assert the same exit
    status, and the same stderr on failure. Returns (status, our stderr, their stderr)."""
    out_q, out_k = images / "qemu.raw", images / "ours.raw"
    out_q.unlink(missing_ok=True)
    u = ["-U"] if force_share else []
    theirs = _argv(theirs, image, out_q)
    q = qemu_img(theirs[0], *u, *theirs[1:], cwd=images, ok=None)
    rc, err = run_ours(capsys, images, ours, image, force_share)
    if q.returncode == 0 and ours[:2] == ["rmap", "verify"]:
        # verify exits 1 for an image without a (valid) reverse map: it opened and read it
        assert rc in (0, 1) and "Could not open" not in err, err
        rc = 0
    assert rc == q.returncode, (ours, err, q.stderr)
    if q.returncode != 0:
        assert err == as_qcow2kit(q.stderr)
        assert not out_k.exists() and not out_q.exists()
    elif ours[0] == "convert":
        assert same_file(out_q, out_k)
    return rc, err, q.stderr


def _warned(err: str, path: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qcow2kit: warning: {path}: "), err
    assert "may be inconsistent" in lines[0]


# ------------------------------------------------------------------------- one way: QEMU holds

@pytest.mark.parametrize("holder", ["qemu-io", "qemu-nbd"])
@pytest.mark.parametrize("ours,theirs", COMMANDS, ids=IDS)
def test_writer_holds_the_image(capsys, images, holder, ours, theirs):
    with holding(holder, images / "img.qcow2"):
        rc, err, qerr = compare(capsys, images, ours, theirs, "img.qcow2")
        assert rc == 1 and 'Failed to get shared "write" lock' in err
        rc, err, qerr = compare(capsys, images, ours, theirs, "img.qcow2", force_share=True)
        assert rc == 0 and qerr == ""
        _warned(err, "img.qcow2")


@pytest.mark.parametrize("ours,theirs", COMMANDS, ids=IDS)
def test_read_only_nbd_export_shares(capsys, images, ours, theirs):
    """qemu-nbd --read-only holds "consistent read" and refuses write: readers coexist."""
    with holding("qemu-nbd-ro", images / "img.qcow2"):
        for force_share in (False, True):
            rc, err, _ = compare(capsys, images, ours, theirs, "img.qcow2", force_share)
            assert rc == 0 and err == ""


@pytest.mark.parametrize("ours,theirs", COMMANDS, ids=IDS)
def test_writer_holds_a_backing_file(capsys, images, ours, theirs):
    """info looks at the image alone; everything else opens the chain, and fails naming the
    backing file as qemu-img does (two levels down here)."""
    with holding("qemu-io", images / "base.qcow2"):
        if ours[:2] == ["rmap", "show"]:      # no qemu-img twin: it reads the image alone
            assert run_ours(capsys, images, ours, "top.qcow2") == (0, "")
            return
        rc, err, _ = compare(capsys, images, ours, theirs, "top.qcow2")
        if ours[0] == "info":
            assert rc == 0
        else:
            assert err.startswith("qcow2kit: Could not open 'top.qcow2': Could not open backing "
                                  "file: Could not open backing file: Failed to get shared")
        rc, err, _ = compare(capsys, images, ours, theirs, "top.qcow2", force_share=True)
        assert rc == 0
        if ours[0] == "info":
            assert err == ""                  # the backing file is never opened
        else:
            _warned(err, "base.qcow2")


def test_writer_holds_a_backing_file_info_backing_chain(capsys, images):
    """qemu-img info --backing-chain opens each image on its own: the error names the file."""
    with holding("qemu-nbd", images / "mid.qcow2"):
        rc, err, _ = compare(capsys, images, ["info", "--backing-chain", "FILE"],
                             ["info", "--backing-chain", "FILE"], "top.qcow2")
        assert rc == 1 and err.startswith("qcow2kit: Could not open 'mid.qcow2': ")


@pytest.mark.parametrize("ours,theirs", COMMANDS, ids=IDS)
def test_writer_holds_the_data_file(capsys, images, ours, theirs):
    """Another image on the same data file, open for writing, may resize it: reading
    commands refuse that ("resize"), info does not open the data file at all."""
    with holding("qemu-io", images / "other.qcow2"):
        rc, err, _ = compare(capsys, images, ours, theirs, "data.qcow2")
        if ours[0] == "info":
            assert rc == 0
        else:
            assert rc == 1 and 'Failed to get shared "resize" lock' in err
            assert err.endswith("Is another process using the image [shared.raw]?\n")


HOLD_BYTE = """
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
kind = fcntl.F_WRLCK if sys.argv[3] == "write" else fcntl.F_RDLCK
fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhxxxxqqixxxx", kind, 0, int(sys.argv[2]), 1, 0))
print("locked", flush=True)
time.sleep(600)
"""


@contextmanager
def byte_locked(path: Path, byte: int, kind: str) -> Iterator[None]:
    """A plain process (not QEMU) holding an OFD ``kind`` ("read"/"write") lock on ``byte``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_BYTE, str(path), str(byte), kind],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        yield
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("ours,theirs", COMMANDS, ids=IDS)
def test_someone_refuses_consistent_read(capsys, images, ours, theirs):
    """qemu-img info claims no "consistent read" (it opens without I/O), the data readers do:
    against a process that refuses to share it, info works and the others fail, even with -U."""
    with byte_locked(images / "img.qcow2", SHARED + READ, "read"):  # refuses consistent read
        for force_share in (False, True):
            rc, err, _ = compare(capsys, images, ours, theirs, "img.qcow2", force_share)
            if ours[0] == "info":
                assert rc == 0
            else:
                assert rc == 1 and 'Failed to get "consistent read" lock' in err


@pytest.mark.parametrize("ours,theirs", COMMANDS, ids=IDS)
def test_someone_write_locks_a_lock_byte(capsys, images, ours, theirs):
    """A write lock on byte 100 (no QEMU takes one) makes the lock itself fail: qemu-img says
    'Failed to lock byte 100' (info, which takes no byte 100, does not care)."""
    with byte_locked(images / "img.qcow2", PERM + READ, "write"):
        rc, err, _ = compare(capsys, images, ours, theirs, "img.qcow2")
        assert rc == 0 if ours[0] == "info" else err.endswith("Failed to lock byte 100\n")


# ----------------------------------------------------------------- the other way: we hold it

def _qemu_io_write(path: Path) -> subprocess.CompletedProcess:
    return qemu_io(path, "write -P 0x77 0 64k", ok=None)


def test_open_image_keeps_qemu_writers_out(images):
    path = images / "img.qcow2"
    with qcow2kit.open(path) as img:
        w = _qemu_io_write(path)
        assert w.returncode == 1 and 'Failed to get "write" lock' in w.stderr, w.stderr
        sockdir = tempfile.mkdtemp(prefix="nbd", dir="/tmp")
        try:
            nbd = subprocess.run([QEMU_NBD, f"--socket={sockdir}/s", "-f", "qcow2", str(path)],
                                 capture_output=True, text=True, timeout=60)
        finally:
            shutil.rmtree(sockdir, ignore_errors=True)
        assert nbd.returncode == 1 and 'Failed to get "write" lock' in nbd.stderr
        assert qemu_img("info", path).returncode == 0          # readers share
        assert qemu_img("map", path).returncode == 0
        assert img.read(0, 4) == b"\x11" * 4                  # still readable
    w = _qemu_io_write(path)                                  # closed: the locks are gone
    assert w.returncode == 0 and "wrote" in w.stdout
    assert not lock_bytes(path)


@pytest.mark.parametrize("source", ["pread", "mmap"])
def test_open_chain_locks_every_file_until_close(images, source):
    paths = [images / n for n in ("top.qcow2", "mid.qcow2", "base.qcow2")]
    img = qcow2kit.open(paths[0], source=source)
    img.chain()                    # backing files open when first needed (here: now)
    for p in paths:
        w = _qemu_io_write(p)
        assert w.returncode == 1 and 'Failed to get "write" lock' in w.stderr, (p, w.stderr)
    img.close()
    for p in paths:
        assert not lock_bytes(p)
        assert _qemu_io_write(p).returncode == 0


def test_force_share_lets_qemu_write(images):
    path = images / "img.qcow2"
    with qcow2kit.open(path, force_share=True) as img:
        w = _qemu_io_write(path)
        assert w.returncode == 0 and "wrote" in w.stdout, w.stderr
        assert img.size == 4 << 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qcow2kit.open(path, force_share=True).close()      # no writer: no warning
    with holding("qemu-io", path):
        with pytest.warns(ForceShareWarning, match="open for writing"):
            with qcow2kit.open(path, force_share=True) as img:
                assert img.read(0, 4) == b"\x77" * 4
        with pytest.raises(LockConflictError) as exc:
            qcow2kit.open(path)
        assert isinstance(exc.value, qcow2kit.ImageLockedError)
        assert exc.value.path == str(path)
        assert str(exc.value) == (f"Could not open '{path}': Failed to get shared \"write\" "
                                  f"lock\nIs another process using the image [{path}]?")


@pytest.mark.parametrize("force_share", [False, True])
def test_lock_bytes_are_those_of_a_qemu_reader(images, force_share):
    """File by file (qcow2 image, qcow2 backing file, raw backing file, data file), the bytes
    the library locks are those qemu-io -r [-U] locks (a QEMU reader, as qemu-img map)."""
    u = ["-U"] if force_share else []
    for top, files in (("top.qcow2", ["top.qcow2", "mid.qcow2", "base.qcow2"]),
                       ("rtop.qcow2", ["rtop.qcow2", "raw.img"]),
                       ("data.qcow2", ["data.qcow2", "shared.raw"])):
        with holding("qemu-io-ro", images / top, *u):
            wait_for(lambda: all(PERM + READ in lock_bytes(images / f) for f in files),
                     f"qemu-io to lock the chain of {top}")
            qemu_locks = {f: lock_bytes(images / f) for f in files}
        img = qcow2kit.open(images / top, force_share=force_share)
        try:
            for layer in img.chain():
                if isinstance(layer, qcow2kit.Image) and layer.header.has_data_file:
                    layer.data_source
            ours = {f: lock_bytes(images / f) for f in files}
        finally:
            img.close()
        assert ours == qemu_locks, top
        assert all(not lock_bytes(images / f) for f in files)
    # and the table of qcow2kit.locks, as QEMU has it
    assert qemu_locks == {"data.qcow2": {100} if force_share else {100, 201, 203},
                          "shared.raw": {100} if force_share else {100, 203}}


def test_lazily_opened_backing_file_fails_again(images):
    """A backing file that cannot be opened (held by a writer) fails every time it is needed,
    not just the first (a failed open is not remembered as "no backing file")."""
    with holding("qemu-io", images / "mid.qcow2"):
        with qcow2kit.open(images / "top.qcow2") as img:
            for _ in range(2):
                with pytest.raises(LockConflictError, match="Could not open backing file"):
                    img.read(0, 4096)


def test_help_mentions_force_share(capsys):
    for argv in (["info"], ["map"], ["convert"], ["bench", "order"], ["rmap"]):
        with pytest.raises(SystemExit):
            cli_in_process(capsys, *argv, "--help")
        out = capsys.readouterr().out
        assert "-U, --force-share" in out, argv


def test_rmap_writers_refuse_force_share(capsys, images):
    for action in ("build", "drop"):
        rc, _, err = cli_in_process(capsys, "rmap", action, "-U", str(images / "img.qcow2"))
        assert rc == 1 and "--force-share" in err


def test_json_info_with_force_share_is_qemu_img_s(capsys, images):
    with holding("qemu-nbd", images / "img.qcow2"):
        q = qemu_img("info", "-U", "--output=json", "img.qcow2", cwd=images)
        cwd = os.getcwd()
        os.chdir(images)
        try:
            rc, out, err = cli_in_process(capsys, "info", "-U", "--output=json", "img.qcow2")
        finally:
            os.chdir(cwd)
        assert rc == 0 and json.loads(out) == json.loads(q.stdout)
        _warned(err, "img.qcow2")


def test_create_over_a_backing_file_a_writer_holds(capsys, images):
    """qemu-img create opens the backing file shared and without I/O: it works while a VM
    writes to the backing file, and so does qcow2kit create (the same bytes)."""
    with holding("qemu-io", images / "img.qcow2"):
        qemu_img("create", "-q", "-f", "qcow2", "-b", "img.qcow2", "-F", "qcow2", "theirs.qcow2",
                 cwd=images)
        cwd = os.getcwd()
        os.chdir(images)
        try:
            rc, _, err = cli_in_process(capsys, "create", "-q", "-f", "qcow2", "-b", "img.qcow2",
                                        "-F", "qcow2", "ours.qcow2")
        finally:
            os.chdir(cwd)
        assert (rc, err) == (0, "")
    assert same_file(images / "ours.qcow2", images / "theirs.qcow2")


def test_open_guest_takes_the_locks(images):
    path = images / "img.qcow2"
    with qcow2kit.open_guest(path) as f:
        assert f.read(4) == b"\x11" * 4
        assert 'Failed to get "write" lock' in _qemu_io_write(path).stderr
    with holding("qemu-io", path):
        with pytest.raises(LockConflictError):
            qcow2kit.open_guest(path)
        with pytest.warns(ForceShareWarning):
            qcow2kit.open_guest(path, force_share=True).close()
