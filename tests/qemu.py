"""Shared test helpers: running QEMU's tools and qcow2kit's command line, and comparing files.

One version of each helper that test files used to define for themselves. Where the copies
differed (an allowed exit status, read-only opening, an environment), the difference is a
parameter here, so every test still runs the command it ran before.

tests/ is on sys.path (pytest's rootdir-relative import of test modules, and conftest.py), so a
test file says ``import qemu`` or ``from qemu import ...``. factory.py builds its images with these
helpers too.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
QEMU_NBD = shutil.which("qemu-nbd")

#: the secret the encrypted test images use (``--object secret,id=SECRET_ID,data=SECRET``)
SECRET = "abc"
SECRET_ID = "sec0"


#: environment for QEMU runs whose output a test compares to the letter: C locale, UTC clock
QEMU_ENV = dict(os.environ, TZ="UTC", LC_ALL="C")


def have_qemu() -> bool:
    """True when qemu-img and qemu-io are on PATH."""
    return QEMU_IMG is not None and QEMU_IO is not None


class QemuError(RuntimeError):
    """A command exited with a status its caller does not allow."""


# --------------------------------------------------------------------------------------------
# Running commands


def run_process(cmd: Sequence[str | os.PathLike], *, cwd: str | os.PathLike | None = None,
                ok: Iterable[int] | None = (0,), env: Mapping[str, str] | None = None,
                timeout: float | None = None, text: bool = True) -> subprocess.CompletedProcess:
    """Run a command, capturing stdout and stderr as text (UTF-8, undecodable bytes kept as
    surrogates), or as bytes with text=False. Raise QemuError (with stderr) when its exit status
    is not in `ok`; ok=None accepts any status."""
    argv = [os.fspath(c) for c in cmd]
    proc = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout,
                          **({"encoding": "utf-8", "errors": "surrogateescape"} if text else {}))
    if ok is not None and proc.returncode not in tuple(ok):
        err = proc.stderr if text else proc.stderr.decode(errors="replace")
        out = proc.stdout if text else proc.stdout.decode(errors="replace")
        raise QemuError(
            f"command failed with exit status {proc.returncode}: {' '.join(argv)}\n"
            f"stderr: {err.strip()}\nstdout: {out.strip()[-2000:]}")
    return proc


def run(cmd: Sequence[str | os.PathLike], *, cwd: str | os.PathLike | None = None,
        ok_codes: Iterable[int] = (0,)) -> str:
    """Run a command, return its stdout; raise QemuError with stderr on a bad exit status."""
    return run_process(cmd, cwd=cwd, ok=ok_codes).stdout


def qemu_img(*args: str | os.PathLike, cwd: str | os.PathLike | None = None,
             ok: Iterable[int] | None = (0,), env: Mapping[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    """``qemu-img ARGS...`` (see run_process for `ok`)."""
    return run_process([QEMU_IMG, *args], cwd=cwd, ok=ok, env=env)


def qemu_io(path: str | os.PathLike, *cmds: str, readonly: bool = False,
            ok: Iterable[int] | None = (0,), refuse: Sequence[str] = (),
            cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
            image_args: Sequence[str] | None = None) -> subprocess.CompletedProcess[str]:
    """``qemu-io -f qcow2 [-r] -c CMD... PATH``, run in PATH's directory unless `cwd` is given.

    qemu-io reports a failed command in its output and may still exit 0: every word of `refuse`
    found (case-insensitively) in stdout or stderr raises QemuError. `image_args` replaces
    ``-f qcow2 PATH`` (e.g. ``--object secret... --image-opts ...``)."""
    argv: list[str | os.PathLike] = [QEMU_IO]
    if readonly:
        argv.append("-r")
    for c in cmds:
        argv += ["-c", c]
    argv += list(image_args) if image_args is not None else ["-f", "qcow2", path]
    if cwd is None:
        cwd = Path(path).parent
    p = run_process(argv, cwd=cwd, ok=ok, env=env)
    text = (p.stdout + p.stderr).lower()
    bad = [w for w in refuse if w in text]
    if bad:
        raise QemuError(f"qemu-io {' '.join(cmds)}: {bad}\n{p.stdout}{p.stderr}")
    return p


_HEX_LINE = re.compile(r"^([0-9a-f]{8}):  ((?:[0-9a-f]{2} ){1,16})", re.M)


def qemu_io_read(path: str | os.PathLike, offset: int, length: int) -> bytes | None:
    """The bytes ``qemu-io -r -f qcow2 -c 'read -v OFFSET LENGTH' PATH`` dumps, or None when the
    read fails (exit status not 0, or "failed" in its output)."""
    p = run_process([QEMU_IO, "-r", "-f", "qcow2", "-c", f"read -v {offset} {length}", path],
                    cwd=Path(path).parent, ok=None)
    if p.returncode != 0 or "failed" in p.stdout + p.stderr:
        return None
    out = bytearray()
    for m in _HEX_LINE.finditer(p.stdout):
        if int(m.group(1), 16) != offset + len(out):
            raise QemuError(f"qemu-io read -v: unexpected line {m.group(0)!r}")
        out += bytes.fromhex(m.group(2))
    if len(out) != length:
        raise QemuError(f"qemu-io read -v dumped {len(out)} bytes, not {length}")
    return bytes(out)


def qemu_create(path: str | os.PathLike, size: str | int, *opts: str, backing: str | None = None,
                cwd: str | os.PathLike | None = None) -> None:
    """``qemu-img create -q -f qcow2 [-o OPTS] [-b BACKING -F qcow2] PATH SIZE``; `opts` are joined
    with commas (empty ones left out). Runs in PATH's directory unless `cwd` is given."""
    argv: list[str | os.PathLike] = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
    opts = tuple(o for o in opts if o)
    if opts:
        argv += ["-o", ",".join(opts)]
    if backing is not None:
        argv += ["-b", backing, "-F", "qcow2"]
    run_process([*argv, path, str(size)], cwd=Path(path).parent if cwd is None else cwd)


def create_encrypted(path: str | os.PathLike, size: str | int, opts: str, *, fmt: str = "qcow2",
                     secret: str = SECRET, attempts: int = 40, cwd: str | os.PathLike | None = None,
                     env: Mapping[str, str] | None = None) -> bool:
    """``qemu-img create -q -f FMT --object secret,id=sec0,data=SECRET -o OPTS PATH SIZE``, tried
    again while QEMU's PBKDF calibration fails ("Unable to get accurate CPU usage", which happens
    at random on coarse CPU clocks). True once created; False when every attempt met that failure
    (the caller skips or fails); any other failure raises QemuError. Runs in PATH's directory
    unless `cwd` is given."""
    argv = [QEMU_IMG, "create", "-q", "-f", fmt, "--object", f"secret,id={SECRET_ID},data={secret}",
            "-o", opts, path, str(size)]
    cwd = Path(path).parent if cwd is None else cwd
    for _ in range(attempts):
        r = run_process(argv, cwd=cwd, ok=None, env=env)
        if r.returncode == 0:
            return True
        if "Unable to get accurate CPU usage" not in r.stderr:
            raise QemuError(f"qemu-img create {opts}: {r.stderr}")
        Path(cwd, path).unlink(missing_ok=True)
    return False


# --------------------------------------------------------------------------------------------
# qemu-img's answers, parsed


def _opts_escape(value: str) -> str:
    # QemuOpts: a comma inside a value is written as two commas
    return value.replace(",", ",,")


def _is_case(src) -> bool:
    # a factory.ImageCase (not imported here: factory imports this module)
    return hasattr(src, "path") and hasattr(src, "encrypted")


def open_args(src, *, secret: str | None = None) -> list[str]:
    """Arguments that make qemu-img / qemu-io open `src` (an image path or a factory case, with its
    secret when encrypted)."""
    if _is_case(src):
        path, secret = src.path, (src.secret if src.encrypted else None)
    else:
        path = Path(src)
    path = Path(path).absolute()
    if secret is None:
        return ["-f", "qcow2", str(path)]
    return ["--object", f"secret,id={SECRET_ID},data={secret}", "--image-opts",
            f"driver=qcow2,file.filename={_opts_escape(str(path))},encrypt.key-secret={SECRET_ID}"]


def _path_of(src) -> Path:
    return Path(src.path if _is_case(src) else src).absolute()


def qemu_img_info(path, backing_chain: bool = False, extra_args: Sequence[str] = ()) -> object:
    """Parsed `qemu-img info --output=json` (a list with backing_chain=True), run in the image's
    directory."""
    p = _path_of(path)
    cmd = [QEMU_IMG, "info", "--output=json", *extra_args]
    if backing_chain:
        cmd.append("--backing-chain")
    cmd += [str(p)]
    return json.loads(run(cmd, cwd=p.parent))


def qemu_img_map(path, extra_args: Sequence[str] = ()) -> list[dict]:
    """Parsed `qemu-img map --output=json` (with the secret for encrypted cases)."""
    p = _path_of(path)
    out = run([QEMU_IMG, "map", "--output=json", *extra_args, *open_args(path)], cwd=p.parent)
    return json.loads(out)


def qemu_img_check(path, extra_args: Sequence[str] = (),
                   ok: Iterable[int] = (0, 2, 3)) -> tuple[int, dict]:
    """(exit status, parsed `qemu-img check --output=json`); statuses 0, 2, 3 (and those in `ok`)
    are not errors. When check prints no JSON (status 1) the dict is {"stderr": ...}."""
    p = _path_of(path)
    argv = [QEMU_IMG, "check", "--output=json", *extra_args, *open_args(path)]
    proc = run_process(argv, cwd=p.parent, ok=ok)
    return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip()
                             else {"stderr": proc.stderr})


def qemu_convert_raw(src, dst: str | os.PathLike, extra_args: Sequence[str] = ()) -> Path:
    """`qemu-img convert -O raw` of the full guest view (backing chain included).

    Pass ``extra_args=["-l", "snapshot.name=NAME"]`` to export an internal snapshot."""
    p = _path_of(src)
    dst = Path(dst).absolute()
    run([QEMU_IMG, "convert", "-O", "raw", *extra_args, *open_args(src), str(dst)], cwd=p.parent)
    return dst


def qemu_bitmap_dirty(path, name: str) -> list[tuple[int, int]]:
    """Dirty ranges of persistent bitmap `name` of an image (path or factory case), as QEMU sees
    them: qemu-nbd exports it read-only on a unix socket with the bitmap (-B), and qemu-img map
    reads the bitmap through x-dirty-bitmap.

    Returns merged (start, length) pairs."""
    if QEMU_NBD is None:
        raise QemuError("qemu-nbd not found")
    p = _path_of(path)
    tmp = tempfile.mkdtemp(prefix="qk-nbd-")
    sock = os.path.join(tmp, "s")
    pidfile = os.path.join(tmp, "pid")
    try:
        run([QEMU_NBD, "--fork", "--pid-file", pidfile, "-k", sock, "-r", "-f", "qcow2",
             "-B", name, "-x", "e", str(p)], cwd=p.parent)
        try:
            out = run([QEMU_IMG, "map", "--output=json", "--image-opts",
                       f"driver=nbd,server.type=unix,server.path={sock},export=e,"
                       f"x-dirty-bitmap=qemu:dirty-bitmap:{name}"])
        finally:
            # without --persistent the server leaves after its one client; make sure of it
            try:
                pid = int(Path(pidfile).read_text().strip())
                os.kill(pid, 15)
            except (OSError, ValueError):
                pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # in x-dirty-bitmap mode a dirty area is reported as "data": false
    ranges = [(e["start"], e["length"]) for e in json.loads(out) if not e["data"]]
    return merge_ranges(ranges)


# --------------------------------------------------------------------------------------------
# qcow2kit's command line


def cli_in_process(capsys, *argv: str) -> tuple[int, str, str]:
    """``qcow2kit ARGV...`` in this process: (exit status, stdout, stderr) via pytest's capsys."""
    from qcow2kit.cli.main import main as cli_main  # only when a test runs the CLI
    rc = cli_main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def cli_process(*argv: str | os.PathLike, cwd: str | os.PathLike | None = None,
                env: Mapping[str, str] | None = None, timeout: float | None = None
                ) -> subprocess.CompletedProcess[str]:
    """``python -m qcow2kit ARGV...`` in its own process, any exit status, output as text."""
    return subprocess.run([sys.executable, "-m", "qcow2kit", *map(os.fspath, argv)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------
# Files, bytes and ranges


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of each data extent of an open file below `size`, as SEEK_DATA / SEEK_HOLE
    report them (the file system's allocation, not the bytes)."""
    out, pos = [], 0
    while pos < size:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        h = os.lseek(fd, d, os.SEEK_HOLE)
        out.append((d, h))
        pos = h
    return out


def same_file(a: str | os.PathLike, b: str | os.PathLike, chunk: int = 1 << 22) -> bool:
    """True when the two files hold the same bytes."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted (start, length) ranges with touching or overlapping ones joined (empty ones
    dropped)."""
    out: list[list[int]] = []
    for s, n in sorted((int(s), int(n)) for s, n in ranges if n > 0):
        if out and s <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], s + n - out[-1][0])
        else:
            out.append([s, n])
    return [(s, n) for s, n in out]


def hexbytes(*lines: str) -> bytes:
    """Join hex strings (spaces allowed) into bytes."""
    return bytes.fromhex("".join(lines))


@contextlib.contextmanager
def nbdfuse_served(tmp_path: Path, image: Path, *filters: str) -> Iterator[Path]:
    """``image`` served by nbdkit (with ``filters``) and mounted as a file with nbdfuse
    under ``tmp_path/mnt`` (unmounted on the way out)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fuse = subprocess.Popen(["nbdfuse", mnt / "img", "--command", "nbdkit", "-s", "file",
                             image, *filters],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (mnt / "img").exists():
            assert time.monotonic() < deadline and fuse.poll() is None
            time.sleep(0.05)
        yield mnt / "img"
    finally:
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        fuse.wait(timeout=30)
