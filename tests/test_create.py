"""``qcow2kit create`` against ``qemu-img create -f qcow2`` (QEMU 7.2): the same files, byte for
byte, the same printed line, the same failures.

Each case runs both commands with the same arguments in two sibling directories (names in
the header are stored as given, so both images name the same relative files) and compares
every file they leave, exit status and stdout.  Files are compared on the ranges either of
them stores (SEEK_DATA/SEEK_HOLE), so multi-terabyte sparse files cost nothing.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import subprocess
from pathlib import Path

import pytest

from qcow2kit import create as C
from qcow2kit.cli.main import main as qcow2kit_main
from qemu import QEMU_IMG, data_ranges

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(QEMU_IMG is None, reason="needs qemu-img")]

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


# ------------------------------------------------------------------------------------ helpers


def same_bytes(a: Path, b: Path) -> str | None:
    """None when the files hold the same bytes, else where they differ."""
    sa, sb = a.stat().st_size, b.stat().st_size
    if sa != sb:
        return f"{a.name}: {sa} bytes against {sb}"
    with open(a, "rb") as fa, open(b, "rb") as fb:
        ranges = sorted(data_ranges(fa.fileno(), sa) + data_ranges(fb.fileno(), sb))
        for start, end in ranges:
            pos = start
            while pos < end:
                n = min(end - pos, 8 * MiB)
                x, y = os.pread(fa.fileno(), n, pos), os.pread(fb.fileno(), n, pos)
                if x != y:
                    i = next(i for i in range(n) if x[i] != y[i])
                    return f"{a.name}: first difference at {pos + i:#x}"
                pos += n
    return None


def _setup(d: Path, base: Path) -> None:
    d.mkdir()
    shutil.copy(base / "base.qcow2", d / "base.qcow2")
    shutil.copy(base / "base.raw", d / "base.raw")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Path:
    """base.qcow2 (virtual size 1 GiB + 512 bytes) and base.raw (3 MB + 1 byte)."""
    d = tmp_path_factory.mktemp("create-bases")
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "base.qcow2", str(GiB + 512)],
                   cwd=d, check=True)
    with open(d / "base.raw", "wb") as f:
        f.truncate(3_000_001)
    return d


def run_qemu(d: Path, args: list[str]) -> tuple[int, str, str]:
    r = subprocess.run([QEMU_IMG, "create", *args], cwd=d, capture_output=True, text=True,
                       check=False)
    return r.returncode, r.stdout, r.stderr


def run_ours(d: Path, args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.chdir(d)
    capsys.readouterr()
    rc = qcow2kit_main(["create", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def both(tmp_path, bases, args, capsys, monkeypatch):
    dq, do = tmp_path / "qemu", tmp_path / "ours"
    _setup(dq, bases)
    _setup(do, bases)
    q = run_qemu(dq, args)
    o = run_ours(do, args, capsys, monkeypatch)
    return dq, do, q, o


def files_of(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()} - {"base.qcow2", "base.raw"}


# ------------------------------------------------------------------------------------ the matrix

# (-o options, SIZE, extra arguments): every preallocation mode, sizes 0 .. 16 TiB, every
# refcount width, cluster sizes 512 B .. 2 MiB, v2 and v3, extended L2, zstd, lazy
# refcounts, backing files (opened or -u), external data files.
MATRIX: list[tuple[str, str, tuple[str, ...]]] = [
    # sizes with the defaults
    ("", "0", ()),
    ("", "512", ()),
    ("", "1000", ()),                   # rounded up to 1024
    ("", "1.5k", ()),
    ("", "1M", ()),
    ("", "1G", ()),
    ("", str(GiB + 512), ()),
    ("", "100G", ()),
    ("", "1T", ()),
    ("", "16T", ()),
    ("", "1P", ()),
    ("", "0x100000", ()),
    # cluster sizes
    ("cluster_size=512", "1G", ()),     # the refcount table grows
    ("cluster_size=512", "16G", ()),
    ("cluster_size=1k", "4G", ()),
    ("cluster_size=4k", "8T", ()),
    ("cluster_size=16k", "1T", ()),
    ("cluster_size=2M", "16T", ()),
    ("cluster_size=2M", "0", ()),
    # refcount widths
    ("refcount_bits=1", "1G", ()),
    ("refcount_bits=2", "16T", ()),
    ("refcount_bits=4", "1T", ()),
    ("refcount_bits=8", "1G", ()),
    ("refcount_bits=32", "16T", ()),
    ("refcount_bits=64", "16T", ()),
    ("cluster_size=512,refcount_bits=64", "1G", ()),
    ("cluster_size=512,refcount_bits=1", "2G", ()),
    ("cluster_size=512,refcount_bits=32", "8G", ()),
    # versions and features
    ("compat=0.10", "1G", ()),
    ("compat=v2", "16T", ()),
    ("compat=1.1", "1G", ()),
    ("compat=v3,lazy_refcounts=on", "1G", ()),
    ("lazy_refcounts=on,refcount_bits=1", "10G", ()),
    ("compression_type=zstd", "1G", ()),
    ("compression_type=zlib", "1G", ()),
    ("extended_l2=on", "1G", ()),
    ("extended_l2=on,cluster_size=16k", "16T", ()),
    ("extended_l2=on,cluster_size=2M,compression_type=zstd", "16T", ()),
    ("cluster_size=4k,extended_l2=off,lazy_refcounts=off", "1G", ()),
    # preallocation=metadata
    ("preallocation=metadata", "0", ()),
    ("preallocation=metadata", "1000", ()),
    ("preallocation=metadata", "1G", ()),
    ("preallocation=metadata", "3G", ()),             # crosses a refcount block
    ("preallocation=metadata", str(GiB + 512), ()),
    ("preallocation=metadata,cluster_size=2M", "1T", ()),
    ("preallocation=metadata,cluster_size=512", "8M", ()),     # the refcount table grows
    ("preallocation=metadata,cluster_size=512,refcount_bits=8", "16M", ()),
    ("preallocation=metadata,cluster_size=512,refcount_bits=64", "16M", ()),
    ("preallocation=metadata,cluster_size=4k,refcount_bits=32", "512M", ()),
    ("preallocation=metadata,extended_l2=on", "1000", ()),
    ("preallocation=metadata,extended_l2=on,cluster_size=2M", "5G", ()),
    ("preallocation=metadata,compat=0.10", "1G", ()),
    ("preallocation=metadata,lazy_refcounts=on,refcount_bits=2", "2G", ()),
    # preallocation=falloc
    ("preallocation=falloc", "0", ()),
    ("preallocation=falloc", "1537", ()),
    ("preallocation=falloc", "64M", ()),
    ("preallocation=falloc,cluster_size=512", "8M", ()),
    ("preallocation=falloc,cluster_size=512,refcount_bits=64", "16M", ()),
    ("preallocation=falloc,extended_l2=on,cluster_size=32k", "40M", ()),
    ("preallocation=falloc,compat=0.10", "10M", ()),
    # preallocation=full
    ("preallocation=full", "0", ()),
    ("preallocation=full", "3000", ()),
    ("preallocation=full", "32M", ()),
    ("preallocation=full,cluster_size=512,refcount_bits=4", "4M", ()),
    ("preallocation=full,cluster_size=2M", "9M", ()),
    ("preallocation=off", "1G", ()),
    # backing files
    ("", "", ("-b", "base.qcow2", "-F", "qcow2")),               # size from the backing file
    ("", "1G", ("-b", "base.qcow2", "-F", "qcow2")),
    ("", "", ("-b", "base.raw", "-F", "raw")),                   # raw: its length, rounded up
    ("", "", ("-b", "base.qcow2", "-F", "raw")),
    ("compat=0.10", "", ("-b", "base.qcow2", "-F", "qcow2")),
    ("cluster_size=512", "", ("-b", "base.qcow2", "-F", "qcow2")),
    ("backing_file=base.qcow2,backing_fmt=qcow2", "", ()),
    ("backing_file=missing.qcow2,backing_fmt=qcow2", "2G", ("-u",)),
    ("", "5G", ("-u", "-b", "somewhere/else.vmdk", "-F", "vmdk")),
    ("extended_l2=on,preallocation=metadata", "", ("-b", "base.qcow2", "-F", "qcow2")),
    ("extended_l2=on,preallocation=full", "1M", ("-b", "base.qcow2", "-F", "qcow2")),
    # external data files
    ("data_file=d.raw", "1G", ()),
    ("data_file=d.raw", "8T", ()),        # 16 TiB: TMPFS_MATRIX
    ("data_file=d.raw", "3000", ()),
    ("data_file=d.raw,data_file_raw=on", "10M", ()),          # implies preallocation=metadata
    ("data_file=d.raw,data_file_raw=on,cluster_size=512", "1M", ()),
    ("data_file=d.raw,preallocation=metadata", "1000", ()),
    ("data_file=d.raw,preallocation=metadata,extended_l2=on", "100M", ()),
    ("data_file=d.raw,preallocation=falloc", "3M", ()),
    ("data_file=d.raw,preallocation=full", "3000", ()),
    ("data_file=d.raw,preallocation=full,cluster_size=4k", "5M", ()),
    ("data_file=d.raw,data_file_raw=off", "1G", ("-b", "base.qcow2", "-F", "qcow2")),
]


def _args(opts: str, size: str, extra: tuple[str, ...], quiet: bool = False) -> list[str]:
    args = ["-f", "qcow2", *(["-q"] if quiet else []), *extra]
    if opts:
        args += ["-o", opts]
    return [*args, "t.qcow2", *([size] if size else [])]


def _id(case) -> str:
    opts, size, extra = case
    return " ".join(x for x in [opts, size, *extra] if x) or "defaults"


def test_matrix_is_big_enough():
    modes = {m for m in C.PREALLOC_MODES if any(f"preallocation={m}" in o for o, _, _ in MATRIX)}
    assert len(MATRIX) >= 60 and modes == set(C.PREALLOC_MODES)
    assert {"data_file=d.raw", "preallocation=metadata,cluster_size=2M"} == {
        o for o, s, _ in TMPFS_MATRIX if s == "16T"}
    sizes = {C.parse_image_size(s)[0] for _, s, _ in MATRIX if s}
    assert min(sizes) == 0 and 16 * TiB in sizes


# Files larger than ext4's largest file (16 TiB - 4 KiB with 4 KiB blocks): made on tmpfs.
TMPFS_MATRIX = [
    ("data_file=d.raw", "16T", ()),                        # the data file is 16 TiB long
    ("preallocation=metadata,cluster_size=2M", "16T", ()),  # 64 MiB of L2 tables at the end
]
TMPFS = Path("/dev/shm")


@pytest.fixture
def tmpfs_path():
    """A fresh directory on tmpfs (removed afterwards); skips where there is none."""
    if not (TMPFS.is_dir() and os.access(TMPFS, os.W_OK)):
        pytest.skip("needs a writable tmpfs at /dev/shm")
    d = Path(tempfile.mkdtemp(prefix="qcow2kit-create-", dir=TMPFS))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("case", MATRIX + TMPFS_MATRIX, ids=_id)
def test_create_matches_qemu_img(tmp_path, bases, capsys, monkeypatch, case, request):
    if case in TMPFS_MATRIX:
        tmp_path = request.getfixturevalue("tmpfs_path")
    args = _args(*case)
    dq, do, q, o = both(tmp_path, bases, args, capsys, monkeypatch)
    assert q[0] == 0, q[2]
    assert o[0] == 0, o[2]
    assert o[1] == q[1]                      # the "Formatting ..." line, byte for byte
    assert o[1].startswith("Formatting 't.qcow2', fmt=qcow2 ")
    assert files_of(do) == files_of(dq)
    for name in sorted(files_of(dq)):
        assert same_bytes(dq / name, do / name) is None, same_bytes(dq / name, do / name)


@pytest.mark.parametrize("case", [MATRIX[5], MATRIX[40], MATRIX[-4]], ids=_id)
def test_quiet_prints_nothing(tmp_path, bases, capsys, monkeypatch, case):
    dq, do, q, o = both(tmp_path, bases, _args(*case, quiet=True), capsys, monkeypatch)
    assert q == (0, "", "") and o == (0, "", "")
    for name in sorted(files_of(dq)):
        assert same_bytes(dq / name, do / name) is None


def test_an_existing_image_is_truncated_and_rewritten(tmp_path, bases, capsys, monkeypatch):
    dq, do = tmp_path / "qemu", tmp_path / "ours"
    for d in (dq, do):
        _setup(d, bases)
        (d / "t.qcow2").write_bytes(os.urandom(300_000))
        (d / "d.raw").write_bytes(os.urandom(70_000))
    args = _args("data_file=d.raw,preallocation=metadata", "1000", ())
    assert run_qemu(dq, args)[0] == 0
    assert run_ours(do, args, capsys, monkeypatch)[0] == 0
    for name in ("t.qcow2", "d.raw"):
        assert same_bytes(dq / name, do / name) is None


def test_created_images_pass_qemu_img_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i, opts in enumerate(["preallocation=metadata,cluster_size=512,refcount_bits=16",
                              "preallocation=falloc,extended_l2=on",
                              "data_file=d.raw,data_file_raw=on"]):
        C.create(f"i{i}.qcow2", "8M", options=[opts])
        r = subprocess.run([QEMU_IMG, "check", f"i{i}.qcow2"], capture_output=True, text=True,
                           check=False)
        assert r.returncode == 0, r.stdout + r.stderr


def test_library_call_with_an_option_mapping(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = C.create("lib.qcow2", 64 * MiB, options={"cluster_size": 4096,
                                                     "lazy_refcounts": True,
                                                     "preallocation": "metadata"})
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o",
                    "cluster_size=4096,lazy_refcounts=on,preallocation=metadata", "q.qcow2",
                    "64M"], check=True)
    assert same_bytes(tmp_path / "q.qcow2", tmp_path / "lib.qcow2") is None
    assert plan.options.cluster_size == 4096 and plan.options.lazy_refcounts


# ------------------------------------------------------------------------------------ failures

# (arguments, the option the message names, whether qemu-img prints Formatting first)
INVALID = [
    ("-o cluster_size=1000 t.qcow2 1G", "cluster size"),
    ("-o cluster_size=4M t.qcow2 1G", "cluster size"),
    ("-o cluster_size=256 t.qcow2 1G", "cluster size"),
    ("-o cluster_size=1.5 t.qcow2 1G", "cluster_size"),
    ("-o cluster_size= t.qcow2 1G", "cluster_size"),
    ("-o compat=0.10,refcount_bits=8 t.qcow2 1G", "refcount"),
    ("-o refcount_bits=3 t.qcow2 1G", "refcount"),
    ("-o refcount_bits=128 t.qcow2 1G", "refcount"),
    ("-o refcount_bits=0 t.qcow2 1G", "refcount"),
    ("-o refcount_bits=16k t.qcow2 1G", "refcount_bits"),
    ("-o extended_l2=on,cluster_size=8k t.qcow2 1G", "Extended L2"),
    ("-o extended_l2=on,compat=0.10 t.qcow2 1G", "Extended L2"),
    ("-o data_file=d.raw,compat=0.10 t.qcow2 1G", "External data files"),
    ("-o data_file_raw=on t.qcow2 1G", "data-file-raw"),
    ("-o data_file=d.raw,data_file_raw=on -b base.qcow2 -F qcow2 t.qcow2 1G", "data-file-raw"),
    ("-o foo=bar t.qcow2 1G", "foo"),
    ("-o =4k t.qcow2 1G", "Invalid parameter"),
    ("-o nocow t.qcow2 1G", "'cow'"),                      # "noNAME" is NAME=off
    ("-o nohelp t.qcow2 1G", "'help'"),
    ("-o help=on t.qcow2 1G", "'help'"),                   # only a bare "help" asks for help
    ("-o nocompat t.qcow2 1G", "version"),
    ("-o cluster_size=64k, t.qcow2 1G", "Invalid option list"),
    ("-o ,cluster_size=64k t.qcow2 1G", "Invalid option list"),
    ("-o compat=1.2 t.qcow2 1G", "version"),
    ("-o compat t.qcow2 1G", "version"),
    ("-o compression_type=lz4 t.qcow2 1G", "compression-type"),
    ("-o compression_type=zstd,compat=0.10 t.qcow2 1G", "Non-zlib compression"),
    ("-o lazy_refcounts=on,compat=0.10 t.qcow2 1G", "Lazy refcounts"),
    ("-o lazy_refcounts=1 t.qcow2 1G", "lazy_refcounts"),
    ("-o preallocation=xyz t.qcow2 1G", "preallocation"),
    ("-o preallocation=METADATA t.qcow2 1G", "preallocation"),
    ("-o backing_fmt=qcow2 t.qcow2 1G", "Backing format"),
    ("-F qcow2 t.qcow2 1G", "Backing format"),
    ("-b base.qcow2 t.qcow2 1G", "backing format"),
    ("-b base.qcow2 -F qcow2 -o preallocation=metadata t.qcow2 1G", "preallocation"),
    ("-b missing.qcow2 -F qcow2 t.qcow2 1G", "missing.qcow2"),
    ("-b base.qcow2 -F bogus t.qcow2 1G", "bogus"),
    ("-u -b x -F bogus t.qcow2 1G", "backing-fmt"),
    ("-u -b missing.qcow2 -F qcow2 t.qcow2", "size"),
    ("-b t.qcow2 -F qcow2 t.qcow2 1G", "backing file"),
    ("t.qcow2", "size"),
    ("-o size=5M t.qcow2 1M", "size"),
    ("t.qcow2 1Q", "size"),
    ("t.qcow2 1.5", "size"),
    ("t.qcow2 8E", "size"),
    ("t.qcow2 1e3", "size"),
    ("-o cluster_size=4k t.qcow2 1P", "too large"),
    ("-o cluster_size=4k t.qcow2 16T", "too large"),       # an L1 table of more than 32 MiB
    ("-o cluster_size=512,preallocation=metadata t.qcow2 4T", "too large"),
    ("-o cluster_size=512,data_file=" + "x" * 400 + " t.qcow2 1M", "No space"),
    ("-o cluster_size=512 -u -b " + "y" * 380 + " -F qcow2 t.qcow2 1M", "No space"),
    ("t.qcow2 1M extra", "Unexpected argument"),
    ("", "file name"),
]


@pytest.mark.parametrize("argline, names", INVALID, ids=[a[:60] for a, _ in INVALID])
def test_invalid_arguments_fail_like_qemu_img(tmp_path, bases, capsys, monkeypatch, argline,
                                              names):
    args = ["-f", "qcow2", *argline.split()]
    dq, do, q, o = both(tmp_path, bases, args, capsys, monkeypatch)
    assert q[0] == 1 and o[0] == 1
    assert o[1] == q[1]                       # Formatting printed first exactly when qemu-img does
    lines = o[2].splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcow2kit: ")
    assert names.lower() in lines[0].lower()
    # qemu-img's first line, with our program name (long names are cut short by the OS)
    qfirst = q[2].splitlines()[0].replace("qemu-img: ", "qcow2kit: ", 1)
    if "x" * 400 not in argline:
        assert lines[0].startswith(qfirst.split(" (")[0].rstrip(".")[:70])
    assert files_of(do) == files_of(dq) == set()


@pytest.mark.parametrize("argline", ["-o cluster_size=1000 t.qcow2 1G",
                                     "-o foo=bar t.qcow2 1G",
                                     "-o data_file=d.raw,compat=0.10 t.qcow2 1G",
                                     "-o cluster_size=4k t.qcow2 1P",
                                     "-b t.qcow2 -F qcow2 t.qcow2 1G"])
def test_invalid_arguments_never_touch_an_existing_file(tmp_path, capsys, monkeypatch, argline):
    """qemu-img deletes an existing IMG when creating it fails; qcow2kit checks everything
    first and leaves it alone."""
    (tmp_path / "t.qcow2").write_bytes(b"precious" * 1000)
    (tmp_path / "d.raw").write_bytes(b"data" * 10)
    rc, _, err = run_ours(tmp_path, ["-f", "qcow2", *argline.split()], capsys, monkeypatch)
    assert rc == 1 and err.startswith("qcow2kit: ")
    assert (tmp_path / "t.qcow2").read_bytes() == b"precious" * 1000
    assert (tmp_path / "d.raw").read_bytes() == b"data" * 10


def test_an_image_in_use_is_refused(tmp_path, capsys, monkeypatch):
    from qcow2kit.writer import ImageWriter

    img = tmp_path / "t.qcow2"
    img.write_bytes(b"in use" * 100)
    with ImageWriter(img):          # holds QEMU's write lock, as a running VM does
        rc, _, err = run_ours(tmp_path, ["-q", "t.qcow2", "1G"], capsys, monkeypatch)
    assert rc == 1 and "in use" in err
    assert img.read_bytes() == b"in use" * 100


def test_only_qcow2_is_created(tmp_path, capsys, monkeypatch):
    rc, _, err = run_ours(tmp_path, ["-f", "raw", "t.img", "1M"], capsys, monkeypatch)
    assert rc == 1 and "qcow2" in err and not (tmp_path / "t.img").exists()


def test_hex_size_with_a_suffix_warns_like_qemu_img(tmp_path, bases, capsys, monkeypatch):
    dq, do, q, o = both(tmp_path, bases, ["-f", "qcow2", "t.qcow2", "0x10k"], capsys,
                        monkeypatch)
    assert q[0] == o[0] == 0 and o[1] == q[1]
    assert "deprecated" in q[2] and "deprecated" in o[2]
    assert same_bytes(dq / "t.qcow2", do / "t.qcow2") is None


# ------------------------------------------------------------------------------------ -o help


def _qemu_help(args: list[str]) -> str:
    out = subprocess.run([QEMU_IMG, "create", *args], capture_output=True, text=True,
                         check=True).stdout
    # the options qcow2kit does not implement: encryption, and the file driver's nocow
    # and extent_size_hint
    return "".join(line + "\n" for line in out.splitlines()
                   if not any(k in line for k in ("encrypt", "nocow", "extent_size_hint")))


@pytest.mark.parametrize("args", [["-f", "qcow2", "-o", "help", "x.qcow2"],
                                  ["-f", "qcow2", "-o", "help"],
                                  ["-f", "qcow2", "-o", "cluster_size=4k,?", "x.qcow2"],
                                  ["-f", "qcow2", "-o", "cluster_size=4k", "-o", "help"]])
def test_option_help_lists_like_qemu_img(tmp_path, capsys, monkeypatch, args):
    rc, out, _ = run_ours(tmp_path, args, capsys, monkeypatch)
    assert rc == 0 and out == _qemu_help(args)
    assert not (tmp_path / "x.qcow2").exists()


# ------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("512", 512), ("1k", 1024), ("1K", 1024), ("1.5k", 1536), ("1.7k", 1741),
    ("1.1k", 1126), ("0.1k", 102), ("1.", 1), ("4096.0", 4096), ("010", 10), ("+5", 5),
    (" 5M", 5 * MiB), ("0x100", 256), ("0X10", 16), ("1b", 1), ("1B", 1), ("5E", 5 << 60),
    ("7.99E", 9211842821808707328), ("1.999999999999999999999k", 1024),
    ("9223372036854775807", (1 << 63) - 1),
])
def test_sizes_parse_like_qemu_strtosz(text, value):
    assert C.parse_image_size(text)[0] == value


@pytest.mark.parametrize("text", ["1.5", "1.0001", ".5k", "1.5b", "1 k", "1k ", "0x", "1e3",
                                  "1kk", "1KiB", "-5", "8E", "18446744073709551615", ""])
def test_sizes_qemu_refuses(text):
    with pytest.raises(C.CreateError) as exc:
        C.parse_image_size(text)
    assert exc.value.option == "size"


@pytest.mark.parametrize("extra", [("-b", "base.qcow2", "-F", "qcow2"),
                                   ("-o", "data_file=d.raw,preallocation=metadata")])
def test_image_in_another_directory(tmp_path, bases, capsys, monkeypatch, extra):
    """A relative backing file is found next to the image (its size is read there); a relative
    data file is created relative to the working directory, as QEMU 7.2 does."""
    dq, do = tmp_path / "qemu", tmp_path / "ours"
    for d in (dq, do):
        d.mkdir()
        (d / "sub").mkdir()
        shutil.copy(bases / "base.qcow2", d / "sub" / "base.qcow2")
    args = ["-f", "qcow2", *extra, "sub/t.qcow2", *([] if "-b" in extra else ["1000"])]
    q = run_qemu(dq, args)
    o = run_ours(do, args, capsys, monkeypatch)
    assert q[0] == o[0] == 0 and o[1] == q[1]
    names = sorted(str(p.relative_to(dq)) for p in dq.rglob("*"))
    assert names == sorted(str(p.relative_to(do)) for p in do.rglob("*"))
    for name in names:
        if (dq / name).is_file():
            assert same_bytes(dq / name, do / name) is None


@pytest.mark.parametrize("opt", ["encrypt.format=luks", "encryption=on", "nocow=on",
                                 "extent_size_hint=0"])
def test_qemu_options_qcow2kit_does_not_implement_are_refused(tmp_path, capsys, monkeypatch,
                                                              opt):
    rc, out, err = run_ours(tmp_path, ["-o", opt, "t.qcow2", "1M"], capsys, monkeypatch)
    name = opt.split("=")[0]
    assert rc == 1 and out == "" and f"'{name}'" in err and "not supported" in err
    assert not (tmp_path / "t.qcow2").exists()
