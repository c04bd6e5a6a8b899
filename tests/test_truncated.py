"""Truncated images read as QEMU 7.2 reads them (issue 13).

QEMU's block layer reads a file past its end as zeros (``bdrv_aligned_preadv`` pads the request,
file-posix pads a short read), and qcow2 does not compare its tables with the file size.  So in a
qcow2 file cut short:

- a data cluster wholly or partly past EOF reads as zeros (its part past EOF);
- an L2 table partly past EOF has zero entries there (unallocated), wholly past EOF it is all
  zero: what it mapped reads from the backing file, or as zeros;
- a compressed stream is read zero-padded too, and then fails to decompress (wholly past EOF
  it is all zeros; cut in the middle it is corrupt): qemu-io and qemu-img convert fail with EIO,
  and qcow2kit refuses as well; cut in its sector padding only, it still decompresses.

Each image is made by qemu-img / qemu-io (``convert -c`` for compressed clusters, then
``qemu-io write`` for an L2 table and two data clusters at the end of the file) and cut with
``os.truncate`` at points computed from its layout (parsed here with ``struct``).  Then
``Image.read`` is compared with ``qemu-io -c 'read -v'`` on ranges that start before, at and past
the end of the file, ``qcow2kit convert -O raw`` with ``qemu-img convert -O raw`` byte for byte,
and ``qcow2kit map --output=json`` with ``qemu-img map``.  Two variants: "holes", which QEMU
takes for metadata-preallocated (four data clusters punched out of the file: its map then shows
the part past EOF as zero too), and "plain", with 200 more data clusters and no holes, which it
does not (that part stays data, and convert reads it).
"""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

import factory  # tests/ is on sys.path (conftest.py)
import qcow2kit
from qcow2kit import Qcow2Error
from qcow2kit.cli.main import main as cli_main
from qemu import QEMU_IMG, QEMU_IO, data_ranges, have_qemu, qemu_img_map, qemu_io_read, run, same_file
from test_map import image_case, qemu_map_uncached, run_cli

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not have_qemu(), reason="needs qemu-img and qemu-io")]

KiB = 1024
MiB = 1024 * KiB
CS = 64 * KiB
HIGH = 512 * MiB               # the guest offset of the second L2 table's first cluster
OFFSET_MASK = 0x00FFFFFFFFFFFE00


# ------------------------------------------------------------------------------------------
# The images


def _text(rng: random.Random, n: int) -> bytes:
    words = [bytes(rng.choice(b"abcdefghij") for _ in range(rng.randint(2, 9)))
             for _ in range(500)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def build(d: Path, compression: str, variant: str) -> Path:
    """Guest clusters 0-2 random (stored as is), 4 and 6 text (compressed); then random
    clusters from 1 MiB: 4 of them punched out of the file afterwards ("holes"), or 200
    ("plain"); last, two clusters at 512 MiB written by qemu-io, which puts their L2 table and
    their data at the end of the file."""
    rng = random.Random(13)
    raw = d / "src.raw"
    extra = {"holes": 4, "plain": 200}[variant]
    with open(raw, "wb") as f:
        f.truncate(1024 * MiB)
        f.write(rng.randbytes(3 * CS))
        for c in (4, 6):
            f.seek(c * CS)
            f.write(_text(rng, CS))
        f.seek(MiB)
        f.write(rng.randbytes(extra * CS))
    path = d / f"{compression}-{variant}.qcow2"
    run([QEMU_IMG, "convert", "-q", "-c", "-O", "qcow2", "-o",
                 f"compression_type={compression}", raw, path])
    raw.unlink()
    if variant == "holes":
        for e in qemu_img_map(path):
            if e["start"] == MiB:
                subprocess.run(["fallocate", "--punch-hole", "--offset", str(e["offset"]),
                                "--length", str(e["length"]), str(path)], check=True)
    run([QEMU_IO, "-f", "qcow2", "-c", f"write -P 0x33 {HIGH} {2 * CS}", path])
    return path


@dataclass(frozen=True)
class Layout:
    l2_high: int                  # host offset of the L2 table of guest 512 MiB
    data_high: tuple[int, int]    # host offsets of guest clusters 512 MiB and 512 MiB + 64 KiB
    stream: tuple[int, int, int]  # the last compressed cluster: host offset, length in its
    #                               descriptor, length of the stream itself
    file_size: int


def _stream_length(data: bytes, compression: str) -> int:
    """How many bytes of ``data`` the compressed stream at its start takes."""
    if compression == "zlib":
        d = zlib.decompressobj(-12)
    else:
        d = zstandard.ZstdDecompressor().decompressobj()
    d.decompress(data)
    return len(data) - len(d.unused_data)


def layout(path: Path, compression: str) -> Layout:
    with open(path, "rb") as f:
        h = f.read(104)
        cluster_bits = struct.unpack(">I", h[20:24])[0]
        l1_size, l1_offset = struct.unpack(">IQ", h[36:48])
        assert 1 << cluster_bits == CS
        f.seek(l1_offset)
        l1 = [e & OFFSET_MASK for e in struct.unpack(f">{l1_size}Q", f.read(8 * l1_size))]
        f.seek(l1[0])
        low = struct.unpack(f">{CS // 8}Q", f.read(CS))
        shift = 62 - (cluster_bits - 8)
        streams = []
        for e in low:
            if e >> 62 & 1:
                host = e & ((1 << shift) - 1)
                nsect = (e >> shift & ((1 << (cluster_bits - 8)) - 1)) + 1
                streams.append((host, nsect * 512 - (host & 511)))
        host, length = max(streams)
        f.seek(host)
        stream = (host, length, _stream_length(f.read(length), compression))
        l2_high = l1[HIGH // (CS * CS // 8)]
        f.seek(l2_high)
        d0, d1 = (e & OFFSET_MASK for e in struct.unpack(">2Q", f.read(16)))
        f.seek(0, 2)
        size = f.tell()
    lay = Layout(l2_high, (d0, d1), stream, size)
    if not (stream[0] + stream[1] <= l2_high < d0 < d1 and d0 + CS == d1 and d1 + CS == size
            and stream[2] < stream[1]):
        raise factory.FactoryError(f"unexpected layout of {path}: {lay}")
    return lay


#: Where to cut, from the layout: (id, offset).
CUTS = {
    "data-partly-past-eof": lambda lay: lay.data_high[1] + CS // 2,
    "data-wholly-past-eof": lambda lay: lay.data_high[0] + CS // 2,
    "data-from-eof": lambda lay: lay.data_high[0],
    "l2-partly-past-eof": lambda lay: lay.l2_high + CS // 2,
    "l2-wholly-past-eof": lambda lay: lay.l2_high,
    "compressed-padding-past-eof": lambda lay: lay.stream[0] + lay.stream[2],
    "compressed-partly-past-eof": lambda lay: lay.stream[0] + lay.stream[2] // 2,
    "compressed-wholly-past-eof": lambda lay: lay.stream[0],
}

#: Guest ranges compared with qemu-io: clusters 0-6 (data, compressed), the two clusters at
#: 512 MiB, the second alone, and reads starting in the middle of each of them.
RANGES = [(0, 7 * CS), (HIGH, 2 * CS), (HIGH + CS, CS), (HIGH + CS // 2 + 4 * KiB, 8 * KiB),
          (HIGH + CS + 40 * KiB, 24 * KiB)]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    cache: dict[tuple[str, str], tuple[Path, Layout]] = {}

    def get(compression: str, variant: str) -> tuple[Path, Layout]:
        key = (compression, variant)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"truncated-{compression}-{variant}")
            path = build(d, compression, variant)
            cache[key] = (path, layout(path, compression))
        return cache[key]

    return get


# ------------------------------------------------------------------------------------------
# QEMU's view


def qemu_convert(path: Path, dst: Path) -> bool:
    proc = subprocess.run([QEMU_IMG, "convert", "-O", "raw", str(path), str(dst)],
                          capture_output=True)
    return proc.returncode == 0


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy ``src`` with its holes where they are (its allocation decides QEMU's heuristic)."""
    with open(src, "rb") as fs, open(dst, "wb") as fd:
        size = os.fstat(fs.fileno()).st_size
        for data, hole in data_ranges(fs.fileno(), size):
            fs.seek(data)
            fd.seek(data)
            fd.write(fs.read(hole - data))
        fd.truncate(size)


# ------------------------------------------------------------------------------------------
# The tests


PARAMS = ([pytest.param("zlib", "holes", cut, id=f"holes-{cut}") for cut in CUTS]
          + [pytest.param("zlib", "plain", cut, id=f"plain-{cut}") for cut in CUTS]
          + [pytest.param("zstd", "holes", cut, id=f"zstd-{cut}") for cut in CUTS
             if cut.startswith("compressed")])


@pytest.mark.parametrize("compression,variant,cut", PARAMS)
def test_truncated_image_reads_as_qemu_reads_it(bases, tmp_path, capsysbinary,
                                                compression, variant, cut):
    base, lay = bases(compression, variant)
    path = tmp_path / "cut.qcow2"
    copy_sparse(base, path)
    end = CUTS[cut](lay)
    assert 0 < end < lay.file_size
    os.truncate(path, end)

    # Guest ranges: qemu-io read -v against Image.read (or both refuse).
    with qcow2kit.open(path) as img:
        for off, n in RANGES:
            want = qemu_io_read(path, off, n)
            if want is None:
                with pytest.raises(Qcow2Error):
                    img.read(off, n)
            else:
                assert img.read(off, n) == want, (off, n)

    # The whole disk: qemu-img convert -O raw against qcow2kit convert -O raw.
    qraw, kraw = tmp_path / "qemu.raw", tmp_path / "qcow2kit.raw"
    qemu_ok = qemu_convert(path, qraw)
    if qemu_ok != (cut not in ("compressed-partly-past-eof", "compressed-wholly-past-eof")):
        raise factory.FactoryError(f"qemu-img convert {'succeeded' if qemu_ok else 'failed'}")
    capsysbinary.readouterr()
    rc = cli_main(["convert", "-O", "raw", str(path), str(kraw)])
    out, err = capsysbinary.readouterr()
    if qemu_ok:
        assert (rc, err) == (0, b"")
        assert same_file(kraw, qraw)
    else:
        assert rc == 1 and err.startswith(b"qcow2kit: ") and err.count(b"\n") == 1, err

    # The map (QEMU's reads no compressed stream: it always succeeds).
    case = image_case(f"cut-{cut}", path, CS)
    qrc, qout, qerr = qemu_map_uncached(case)
    assert qrc == 0, qerr
    if cut.startswith(("data-", "l2-partly")):
        # the variants: past EOF is zero where QEMU sees preallocation, data where it does not
        high = [e for e in json.loads(qout) if HIGH <= e["start"] < HIGH + 2 * CS]
        if any(e["zero"] for e in high) != (variant == "holes"):
            raise factory.FactoryError(f"qemu-img map of the {variant} variant: {high}")
    assert run_cli(capsysbinary, case, "--output=json") == (0, qout, b"")


# ------------------------------------------------------------------------------------------
# Cut in the range of a refcount block that lies past the cut


@pytest.fixture(scope="module")
def refblock_base(tmp_path_factory) -> tuple[Path, int]:
    """4 KiB clusters, 12 MiB written: the second refcount block (clusters from 8 MiB) is
    allocated after the first data clusters of its own range.  Returns (path, its offset)."""
    d = tmp_path_factory.mktemp("truncated-refblock")
    path = d / "rb.qcow2"
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k",
                 path, "64M"])
    run([QEMU_IO, "-f", "qcow2", "-c", "write -P 0x44 0 12M", path])
    with open(path, "rb") as f:
        h = f.read(64)
        f.seek(struct.unpack(">Q", h[48:56])[0])
        block = struct.unpack(">2Q", f.read(16))[1] & ~0x1FF
    per_block = 4 * KiB * 8 // 16       # clusters one refcount block covers (16-bit refcounts)
    if not per_block * 4 * KiB < block < os.path.getsize(path):
        raise factory.FactoryError(f"second refcount block at {block:#x}")
    return path, block


@pytest.mark.parametrize("delta", [-16 * KiB, 0, 2 * KiB],
                         ids=["wholly-past-eof", "from-eof", "partly-past-eof"])
def test_cut_before_a_refcount_block_maps_and_converts_as_qemu(refblock_base, tmp_path,
                                                               capsysbinary, delta):
    """QEMU's preallocation heuristic reads the refcount block covering the last clusters of
    the file like any other read: past EOF, as zeros.  (qcow2kit refused the block as lying
    outside the file, so map and convert failed.)"""
    base, block = refblock_base
    path = tmp_path / "cut.qcow2"
    copy_sparse(base, path)
    os.truncate(path, block + delta)
    case = image_case("cut-refblock", path, 4 * KiB)
    qrc, qout, qerr = qemu_map_uncached(case)
    assert qrc == 0, qerr
    assert run_cli(capsysbinary, case, "--output=json") == (0, qout, b"")
    qraw, kraw = tmp_path / "qemu.raw", tmp_path / "qcow2kit.raw"
    assert qemu_convert(path, qraw)
    capsysbinary.readouterr()
    assert cli_main(["convert", "-O", "raw", str(path), str(kraw)]) == 0, capsysbinary.readouterr()
    assert same_file(kraw, qraw)
