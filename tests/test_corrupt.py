"""Corrupted images: every validation qcow2kit makes, one patched field at a time.

Each case takes a small valid image made by qemu-img/qemu-io, patches the bytes of one field with
``struct.pack_into`` at the field's offset, and asserts the exact exception class, its ``field``
and ``offset``, and *when* it is raised: at open (header, extensions, table bounds), on first
access of the snapshot table or the bitmap directory (both loaded lazily), or on a guest read (L2
tables, data cluster descriptors, compressed streams, the backing chain).  Where QEMU has the same
check, ``test_qemu_refuses_too`` shows that qemu-img/qemu-io refuse the same file as well (the
texts differ; only the refusal is compared; each case's ``notes`` says where QEMU 7.2 is more
lenient).  Field offsets come from the qcow2 spec (QEMU's docs/interop/qcow2.rst) and are
computed here with ``struct``, never through qcow2kit.

Then: the CLI turns each of these errors into one ``qcow2kit: ...`` line and exit status 1;
random byte flips in the first 512 bytes of a valid image raise nothing but ``Qcow2Error``; and
the dirty and corrupt bits open (read-only) as they do in QEMU.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcow2kit import (BackingChainError, BackingFileNotFoundError, CorruptImageError, Image,
                      InvalidHeaderError, NotQcow2Error, OutOfBoundsError, Qcow2Error,
                      UnsupportedFeatureError)
from qcow2kit.cli.main import main as cli_main
from qcow2kit.info import image_info
from qemu import QEMU_IMG, QEMU_IO, run_process
from qemu import qemu_create as _create
from qemu import qemu_io as _io
from qemu import run_process as _must

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not (QEMU_IMG and QEMU_IO), reason="needs qemu-img and qemu-io")]

KiB = 1024
MiB = 1024 * KiB

# Spec constants, written out here on purpose (not imported from qcow2kit.spec).
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62


# ------------------------------------------------------------------------------------------
# Base images (made once per session by QEMU) and byte-level helpers


def _run(argv, cwd=None) -> subprocess.CompletedProcess:
    return run_process(argv, cwd=cwd, ok=None)


def _build_plain(d: Path) -> None:
    _create(d / "img.qcow2", "1M")
    _io(d / "img.qcow2", "write -P 0x11 0 128k")


def _build_plain4k(d: Path) -> None:
    _create(d / "img.qcow2", "1M", "cluster_size=4k")
    _io(d / "img.qcow2", "write -P 0x11 0 16k")


def _build_zlib(d: Path) -> None:
    _create(d / "img.qcow2", "1M")
    _io(d / "img.qcow2", "write -c -P 0x22 0 64k", "write -P 0x23 64k 64k")


def _build_zstd(d: Path) -> None:
    _create(d / "img.qcow2", "1M", "compression_type=zstd")
    _io(d / "img.qcow2", "write -c -P 0x22 0 64k", "write -P 0x23 64k 64k")


def _build_extl2(d: Path) -> None:
    _create(d / "img.qcow2", "1M", "extended_l2=on")
    _io(d / "img.qcow2", "write -P 0x33 0 4k", "write -z 8k 4k")


def _build_snap(d: Path) -> None:
    _create(d / "img.qcow2", "1M")
    _io(d / "img.qcow2", "write -P 0x44 0 64k")
    _must([QEMU_IMG, "snapshot", "-c", "snap1", d / "img.qcow2"])


def _build_bitmap(d: Path) -> None:
    _create(d / "img.qcow2", "1M")
    _must([QEMU_IMG, "bitmap", "--add", d / "img.qcow2", "bm0"])
    _io(d / "img.qcow2", "write -P 0x55 0 64k")


def _build_backing(d: Path) -> None:
    _create(d / "base.qcow2", "1M")
    _io(d / "base.qcow2", "write -P 0x66 0 512k")   # the rest unallocated: reads go deeper
    _create(d / "img.qcow2", "1M", backing="base.qcow2")
    _io(d / "img.qcow2", "write -P 0x67 0 64k")


BUILDERS: dict[str, Callable[[Path], None]] = {
    "plain": _build_plain,        # 64 KiB clusters, 128 KiB of data
    "plain4k": _build_plain4k,    # 4 KiB clusters (no feature-name table: QEMU omits it)
    "zlib": _build_zlib,          # cluster 0 deflate-compressed, cluster 1 plain
    "zstd": _build_zstd,          # the same with compression_type=zstd
    "extl2": _build_extl2,        # extended L2: subclusters 0-1 allocated, 4-5 zero
    "snap": _build_snap,          # one internal snapshot (its table ends the file)
    "bitmap": _build_bitmap,      # one persistent bitmap
    "backing": _build_backing,    # img.qcow2 over base.qcow2
}


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corrupt-bases")
    for name, build in BUILDERS.items():
        (root / name).mkdir()
        build(root / name)
    return root


@pytest.fixture
def make(bases, tmp_path) -> Callable[[str], Path]:
    """base name -> path of a private copy of that base (its whole directory)."""
    def copy(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(bases / name, d)
        return d / "img.qcow2"
    return copy


def peek(path: Path, fmt: str, off: int) -> int:
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def poke(path: Path, fmt: str, off: int, *values) -> None:
    """struct.pack_into the file itself at ``off``."""
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        struct.pack_into(fmt, m, off, *values)


def cluster_size(path: Path) -> int:
    return 1 << peek(path, ">I", 20)


def l1_offset(path: Path) -> int:
    return peek(path, ">Q", 40)


def l2_offset(path: Path, l1_index: int = 0) -> int:
    return peek(path, ">Q", l1_offset(path) + 8 * l1_index) & OFFSET_MASK


def ext_offset(path: Path, ext_type: int) -> int:
    """File offset of the type field of the first header extension of ``ext_type``."""
    off = peek(path, ">I", 100) if peek(path, ">I", 4) >= 3 else 72
    while True:
        t, n = peek(path, ">I", off), peek(path, ">I", off + 4)
        if t == ext_type:
            return off
        assert t != 0, f"no header extension {ext_type:#x}"
        off += 8 + (n + 7) // 8 * 8


def set_bits(path: Path, off: int, bits: int) -> None:
    poke(path, ">Q", off, peek(path, ">Q", off) | bits)


def clear_bits(path: Path, off: int, bits: int) -> None:
    poke(path, ">Q", off, peek(path, ">Q", off) & ~bits)


def add_feature_name(path: Path, ftype: int, bit: int, name: str) -> None:
    """Append an entry to the feature-name table (the last extension of a plain QEMU image)."""
    ext = ext_offset(path, EXT_FEATURE_TABLE)
    n = peek(path, ">I", ext + 4)
    assert n % 48 == 0 and peek(path, ">Q", ext + 8 + n) == 0  # followed by the end marker
    poke(path, ">BB46s", ext + 8 + n, ftype, bit, name.encode())
    poke(path, ">I", ext + 4, n + 48)


def truncate(path: Path, n: int) -> None:
    os.truncate(path, n)


def bitmaps_ext(path: Path) -> int:
    return ext_offset(path, EXT_BITMAPS)


def bitmap_dir(path: Path) -> int:
    return peek(path, ">Q", bitmaps_ext(path) + 8 + 16)


def snapshot_entry(path: Path) -> int:
    return peek(path, ">Q", 64)


def compressed_descriptor(path: Path) -> tuple[int, int, int]:
    """(L2 entry file offset, host offset, length in bytes) of guest cluster 0 (compressed)."""
    cb = peek(path, ">I", 20)
    e_off = l2_offset(path)
    entry = peek(path, ">Q", e_off)
    assert entry & COMPRESSED
    shift = 62 - (cb - 8)
    host = entry & ((1 << shift) - 1)
    nsect = ((entry >> shift) & ((1 << (cb - 8)) - 1)) + 1
    return e_off, host, nsect * 512 - (host & 511)


# ------------------------------------------------------------------------------------------
# Patches that need more than one poke (each returns the expected error offset when the offset
# depends on the image)


def _huge_snapshot_table(p: Path, count: int) -> None:
    """``count`` entries with 64 KiB id and name each: 512 of them pass QEMU's 64 MiB limit for
    the snapshot table (found after the last entry); with more, at the start of entry 512."""
    entry = 40 + 65535 + 65535
    stride = (entry + 7) // 8 * 8
    start = (os.path.getsize(p) + 65535) // 65536 * 65536
    os.truncate(p, start + count * stride + 65536)   # sparse
    with open(p, "r+b") as f:
        for i in range(count):
            f.seek(start + i * stride)
            f.write(struct.pack(">QIHHIIQII", 0, 0, 65535, 65535, 0, 0, 0, 0, 0))
    poke(p, ">IQ", 60, count, start)


def _snapshot_name_past_eof(p: Path) -> int:
    e = snapshot_entry(p)
    extra, id_size = peek(p, ">I", e + 36), peek(p, ">H", e + 12)
    poke(p, ">H", e + 14, 65535)
    return e + 40 + extra + id_size


def _replace_compressed(p: Path, data: bytes) -> int:
    _, host, length = compressed_descriptor(p)
    assert len(data) <= length
    with open(p, "r+b") as f:
        f.seek(host)
        f.write(data)
    return host


def _compressed_past_eof(p: Path) -> int:
    e_off, host, _ = compressed_descriptor(p)
    entry = peek(p, ">Q", e_off)
    poke(p, ">Q", e_off, entry - host + 0x10000000)
    return e_off


def _retype_feature_table(p: Path, ext_type: int, length: int | None = None,
                          data: bytes | None = None) -> int:
    ext = ext_offset(p, EXT_FEATURE_TABLE)
    poke(p, ">I", ext, ext_type)
    if length is not None:
        poke(p, ">I", ext + 4, length)
    if data is not None:
        with open(p, "r+b") as f:
            f.seek(ext + 8)
            f.write(data)
    return ext


def _rebase_unsafe(img: Path, backing: str) -> None:
    _must([QEMU_IMG, "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing, img.name],
          cwd=img.parent)


def _backing_name(p: Path, name: bytes) -> None:
    """Point the backing file name at ``name``, stored just before the end of cluster 0."""
    off = cluster_size(p) - 64
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(name)
    poke(p, ">QI", 8, off, len(name))


# ------------------------------------------------------------------------------------------
# The cases


@dataclass(frozen=True)
class Case:
    id: str
    base: str
    patch: Callable[[Path], int | None]
    exc: type[Qcow2Error]
    field: str | None
    offset: int | None          # FROM_PATCH: the value the patch returned
    when: str = "open"          # open | snapshots | bitmaps | read
    qemu: str | None = "open"   # QEMU refuses at "open" / fails at "read" / None: not compared
    match: str | None = None    # a regex the message must contain
    xfail: str | None = None    # a library bug: the test states what should happen
    notes: str = field(default="", compare=False)


FROM_PATCH = -1
PAST_EOF = ("QEMU 7.2 checks alignment and overflow only (validate_table_offset); "
            "what lies past EOF reads as zeros")

CASES = [
    # --- magic, size, version -----------------------------------------------------------
    Case("magic", "plain", lambda p: poke(p, ">4s", 0, b"QFI\0"), NotQcow2Error, "magic", 0),
    Case("short-0", "plain", lambda p: truncate(p, 0), NotQcow2Error, "magic", 0),
    Case("short-3", "plain", lambda p: truncate(p, 3), NotQcow2Error, "magic", 0),
    Case("short-50", "plain", lambda p: truncate(p, 50), NotQcow2Error, "header", 0),
    Case("short-80-v3", "plain", lambda p: truncate(p, 80), NotQcow2Error, "header_length", 100),
    Case("version-1", "plain", lambda p: poke(p, ">I", 4, 1), UnsupportedFeatureError,
         "version", 4),
    Case("version-4", "plain", lambda p: poke(p, ">I", 4, 4), UnsupportedFeatureError,
         "version", 4),
    # --- cluster_bits, header_length -------------------------------------------------------
    Case("cluster_bits-8", "plain", lambda p: poke(p, ">I", 20, 8), InvalidHeaderError,
         "cluster_bits", 20),
    Case("cluster_bits-22", "plain", lambda p: poke(p, ">I", 20, 22), InvalidHeaderError,
         "cluster_bits", 20),
    Case("header_length-96", "plain", lambda p: poke(p, ">I", 100, 96), InvalidHeaderError,
         "header_length", 100, match="shorter"),
    Case("header_length-108", "plain", lambda p: poke(p, ">I", 100, 108), InvalidHeaderError,
         "header_length", 100, match="multiple of 8"),
    Case("header_length-over-cluster", "plain", lambda p: poke(p, ">I", 100, 65536 + 8),
         InvalidHeaderError, "header_length", 100, match="cluster size"),
    Case("header_length-past-eof", "plain4k",
         lambda p: (truncate(p, 300), poke(p, ">I", 100, 304)) and None,
         InvalidHeaderError, "header_length", 100, match="file size", qemu=None,
         notes="QEMU reads the missing header bytes as zeros"),
    # --- backing file name -----------------------------------------------------------------
    Case("backing_file_offset-over-cluster", "backing", lambda p: poke(p, ">Q", 8, 65536 + 8),
         InvalidHeaderError, "backing_file_offset", 8),
    Case("backing_file_size-1024", "backing", lambda p: poke(p, ">I", 16, 1024),
         InvalidHeaderError, "backing_file_size", 16),
    Case("backing-name-past-cluster", "backing", lambda p: poke(p, ">QI", 8, 65536 - 4, 10),
         InvalidHeaderError, "backing_file_offset", 8, qemu=None,
         notes="QEMU reads the name anyway (it only checks the offset)"),
    # --- crypt_method, refcount_order ------------------------------------------------------
    Case("crypt_method-3", "plain", lambda p: poke(p, ">I", 32, 3), InvalidHeaderError,
         "crypt_method", 32),
    Case("crypt_method-aes-read", "plain", lambda p: poke(p, ">I", 32, 1),
         UnsupportedFeatureError, "crypt_method", 32, when="read", qemu=None,
         notes="legacy AES opens (info works) but its data cannot be read"),
    Case("crypt_method-luks-without-header", "plain", lambda p: poke(p, ">I", 32, 2),
         InvalidHeaderError, "crypt_method", 32, qemu=None,
         notes="qemu-img info opens without the crypto layer and succeeds"),
    Case("refcount_order-7", "plain", lambda p: poke(p, ">I", 96, 7), InvalidHeaderError,
         "refcount_order", 96),
    # --- feature bits ----------------------------------------------------------------------
    Case("incompat-bit5-unnamed", "plain", lambda p: set_bits(p, 72, 1 << 5),
         UnsupportedFeatureError, "incompatible_features", 72, match=r"bit 5"),
    Case("incompat-bit5-named", "plain",
         lambda p: (add_feature_name(p, 0, 5, "frobnicated clusters"),
                    set_bits(p, 72, 1 << 5)) and None,
         UnsupportedFeatureError, "incompatible_features", 72,
         match=r"frobnicated clusters.*bit 5"),
    Case("incompat-bit63-4k-no-table", "plain4k", lambda p: set_bits(p, 72, 1 << 63),
         UnsupportedFeatureError, "incompatible_features", 72, match=r"bit 63"),
    Case("compression-bit-with-zlib", "plain", lambda p: set_bits(p, 72, 1 << 3),
         InvalidHeaderError, "incompatible_features", 72),
    Case("zstd-without-compression-bit", "zstd", lambda p: clear_bits(p, 72, 1 << 3),
         InvalidHeaderError, "incompatible_features", 72),
    Case("compression_type-2", "zstd", lambda p: poke(p, ">B", 104, 2),
         UnsupportedFeatureError, "compression_type", 104),
    Case("extl2-4k-clusters", "plain4k", lambda p: set_bits(p, 72, 1 << 4),
         InvalidHeaderError, "cluster_bits", 20),
    Case("data-file-bit-without-name", "plain", lambda p: set_bits(p, 72, 1 << 2),
         InvalidHeaderError, "incompatible_features", 72, qemu="read",
         notes="qemu-img info opens without I/O; qemu-io: 'data-file' is required"),
    Case("data-file-raw-without-data-file", "plain", lambda p: set_bits(p, 88, 1 << 1),
         InvalidHeaderError, "autoclear_features", 88, qemu=None,
         notes="QEMU 7.2 ignores the bit without a data file"),
    # --- refcount table, L1, snapshot table bounds ----------------------------------------
    Case("refcount_table_clusters-0", "plain", lambda p: poke(p, ">I", 56, 0),
         InvalidHeaderError, "refcount_table_clusters", 56),
    Case("refcount_table_clusters-over-8MiB", "plain", lambda p: poke(p, ">I", 56, 129),
         InvalidHeaderError, "refcount_table_clusters", 56),
    Case("refcount_table_offset-unaligned", "plain",
         lambda p: poke(p, ">Q", 48, peek(p, ">Q", 48) + 0x200),
         InvalidHeaderError, "refcount_table_offset", 48),
    Case("refcount_table_offset-past-eof", "plain", lambda p: poke(p, ">Q", 48, 0x10000000),
         InvalidHeaderError, "refcount_table_offset", 48, qemu=None, notes=PAST_EOF),
    Case("refcount_table_offset-2^56", "plain", lambda p: poke(p, ">Q", 48, 1 << 56),
         InvalidHeaderError, "refcount_table_offset", 48, qemu=None, notes=PAST_EOF),
    Case("l1_size-over-32MiB", "plain", lambda p: poke(p, ">I", 36, 32 * MiB // 8 + 1),
         InvalidHeaderError, "l1_size", 36),
    Case("l1_size-0", "plain", lambda p: poke(p, ">I", 36, 0),
         InvalidHeaderError, "l1_size", 36, match="too small"),
    Case("l1_size-too-small-for-size", "plain", lambda p: poke(p, ">Q", 24, 600 * MiB),
         InvalidHeaderError, "l1_size", 36, match="too small"),
    Case("size-2^63", "plain", lambda p: poke(p, ">Q", 24, 1 << 63),
         InvalidHeaderError, "size", 24),
    Case("l1_table_offset-unaligned", "plain",
         lambda p: poke(p, ">Q", 40, l1_offset(p) + 0x200),
         InvalidHeaderError, "l1_table_offset", 40),
    Case("l1_table_offset-past-eof", "plain", lambda p: poke(p, ">Q", 40, 0x10000000),
         InvalidHeaderError, "l1_table_offset", 40, qemu=None, notes=PAST_EOF),
    Case("nb_snapshots-65537", "snap", lambda p: poke(p, ">I", 60, 65537),
         InvalidHeaderError, "nb_snapshots", 60),
    Case("snapshots_offset-past-eof", "snap", lambda p: poke(p, ">Q", 64, 0x10000000),
         InvalidHeaderError, "snapshots_offset", 64, qemu=None, notes=PAST_EOF),
    Case("snapshots_offset-unaligned", "snap",
         lambda p: poke(p, ">Q", 64, peek(p, ">Q", 64) + 8),
         InvalidHeaderError, "snapshots_offset", 64),
    # --- header extensions -----------------------------------------------------------------
    Case("ext-length-past-cluster", "plain",
         lambda p: poke(p, ">I", ext_offset(p, EXT_FEATURE_TABLE) + 4, 65536) or
         ext_offset(p, EXT_FEATURE_TABLE) + 4,
         InvalidHeaderError, "header extension length", FROM_PATCH),
    Case("ext-length-past-backing-name", "backing",
         lambda p: poke(p, ">I", 116, peek(p, ">Q", 8)) or 116,
         InvalidHeaderError, "header extension length", FROM_PATCH,
         notes="extensions must end before the backing file name"),
    Case("ext-duplicate-backing-format", "backing",
         lambda p: _retype_feature_table(p, EXT_BACKING_FORMAT),
         InvalidHeaderError, "header extension type", FROM_PATCH, qemu=None,
         notes="QEMU takes the last one"),
    Case("ext-backing-format-1024", "plain",
         lambda p: _retype_feature_table(p, EXT_BACKING_FORMAT, 1024),
         InvalidHeaderError, "backing format extension", FROM_PATCH),
    Case("ext-data-file-name-1024", "plain",
         lambda p: _retype_feature_table(p, EXT_DATA_FILE, 1024),
         InvalidHeaderError, "data file extension", FROM_PATCH, qemu=None,
         notes="QEMU 7.2 accepts any length here"),
    Case("ext-crypto-length-384", "plain", lambda p: _retype_feature_table(p, EXT_CRYPTO),
         InvalidHeaderError, "crypto header extension", FROM_PATCH, qemu=None,
         notes="QEMU only reads it for encrypted images"),
    Case("ext-crypto-range-unaligned", "plain",
         lambda p: _retype_feature_table(p, EXT_CRYPTO, 16, struct.pack(">QQ", 0x200, 0x1000))
         + 8,
         InvalidHeaderError, "crypto header offset", FROM_PATCH, qemu=None),
    Case("bitmaps-ext-length-16", "bitmap", lambda p: poke(p, ">I", bitmaps_ext(p) + 4, 16)
         or bitmaps_ext(p),
         InvalidHeaderError, "bitmaps extension", FROM_PATCH),
    Case("bitmaps-ext-nb_bitmaps-0", "bitmap", lambda p: poke(p, ">I", bitmaps_ext(p) + 8, 0)
         or bitmaps_ext(p) + 8,
         InvalidHeaderError, "nb_bitmaps", FROM_PATCH),
    Case("bitmaps-ext-nb_bitmaps-65536", "bitmap",
         lambda p: poke(p, ">I", bitmaps_ext(p) + 8, 65536) or bitmaps_ext(p) + 8,
         InvalidHeaderError, "nb_bitmaps", FROM_PATCH),
    Case("bitmaps-ext-directory-size-over-64MiB", "bitmap",
         lambda p: poke(p, ">Q", bitmaps_ext(p) + 16, 1024 * 65535 + 1) or bitmaps_ext(p) + 16,
         InvalidHeaderError, "bitmap_directory_size", FROM_PATCH),
    Case("bitmaps-ext-directory-offset-unaligned", "bitmap",
         lambda p: poke(p, ">Q", bitmaps_ext(p) + 24, bitmap_dir(p) + 8) or bitmaps_ext(p) + 24,
         InvalidHeaderError, "bitmap_directory_offset", FROM_PATCH),
    Case("bitmaps-ext-directory-past-eof", "bitmap",
         lambda p: poke(p, ">Q", bitmaps_ext(p) + 24, 0x10000000) or bitmaps_ext(p) + 24,
         InvalidHeaderError, "bitmap_directory_offset", FROM_PATCH),
    # --- snapshot table (read on first access) ---------------------------------------------
    Case("snapshot-extra_data_size-1025", "snap",
         lambda p: poke(p, ">I", snapshot_entry(p) + 36, 1025) or snapshot_entry(p) + 36,
         InvalidHeaderError, "extra_data_size", FROM_PATCH, when="snapshots"),
    Case("snapshot-l1_size-over-32MiB", "snap",
         lambda p: poke(p, ">I", snapshot_entry(p) + 8, 32 * MiB // 8 + 1)
         or snapshot_entry(p) + 8,
         InvalidHeaderError, "l1_size", FROM_PATCH, when="snapshots", qemu=None,
         notes="QEMU checks a snapshot's L1 size only when it loads the snapshot"),
    Case("snapshot-name-past-eof", "snap", _snapshot_name_past_eof,
         OutOfBoundsError, "snapshot 0 name", FROM_PATCH, when="snapshots", qemu=None,
         notes=PAST_EOF),
    Case("snapshot-table-over-64MiB", "snap", lambda p: _huge_snapshot_table(p, 520),
         InvalidHeaderError, "snapshots_offset", 64, when="snapshots"),
    Case("snapshot-table-over-64MiB-at-end", "snap", lambda p: _huge_snapshot_table(p, 512),
         InvalidHeaderError, "snapshots_offset", 64, when="snapshots"),
    # --- bitmap directory (read on first access) -------------------------------------------
    Case("bitmap-name_size-1024", "bitmap",
         lambda p: poke(p, ">H", bitmap_dir(p) + 18, 1024) or bitmap_dir(p) + 18,
         CorruptImageError, "name_size", FROM_PATCH, when="bitmaps"),
    Case("bitmap-granularity_bits-8", "bitmap",
         lambda p: poke(p, ">B", bitmap_dir(p) + 17, 8) or bitmap_dir(p) + 17,
         CorruptImageError, "granularity_bits", FROM_PATCH, when="bitmaps"),
    Case("bitmap-granularity_bits-32", "bitmap",
         lambda p: poke(p, ">B", bitmap_dir(p) + 17, 32) or bitmap_dir(p) + 17,
         CorruptImageError, "granularity_bits", FROM_PATCH, when="bitmaps"),
    Case("bitmap-entry-past-directory", "bitmap",
         lambda p: poke(p, ">I", bitmap_dir(p) + 20, 1000) or bitmap_dir(p),
         CorruptImageError, "bitmap_directory_size", FROM_PATCH, when="bitmaps"),
    Case("bitmap-second-entry-missing", "bitmap",
         lambda p: poke(p, ">I", bitmaps_ext(p) + 8, 2)
         or bitmap_dir(p) + peek(p, ">Q", bitmaps_ext(p) + 16),
         CorruptImageError, "bitmap_directory_size", FROM_PATCH, when="bitmaps"),
    # --- L1 / L2 / data (found on a guest read) --------------------------------------------
    Case("l2-offset-unaligned", "plain",
         lambda p: poke(p, ">Q", l1_offset(p), COPIED | (l2_offset(p) + 0x200)) or l1_offset(p),
         CorruptImageError, "l1_table_offset", FROM_PATCH, when="read", qemu="read"),
    Case("data-offset-unaligned", "plain",
         lambda p: poke(p, ">Q", l2_offset(p), peek(p, ">Q", l2_offset(p)) + 0x200)
         or l2_offset(p),
         CorruptImageError, "l2 entry", FROM_PATCH, when="read", qemu="read"),
    Case("extl2-allocated-and-zero", "extl2",
         lambda p: set_bits(p, l2_offset(p) + 8, 1 << 32) or l2_offset(p) + 8,
         CorruptImageError, "l2 bitmap", FROM_PATCH, when="read", qemu="read"),
    Case("extl2-allocated-without-offset", "extl2",
         lambda p: poke(p, ">Q", l2_offset(p), 0) or l2_offset(p) + 8,
         CorruptImageError, "l2 bitmap", FROM_PATCH, when="read", qemu="read"),
    Case("zlib-stream-garbage", "zlib", lambda p: _replace_compressed(p, b"\xff" * 64),
         CorruptImageError, "compressed data", FROM_PATCH, when="read", qemu="read"),
    Case("zlib-stream-short", "zlib",
         lambda p: _replace_compressed(p, zlib.compress(b"x" * 100)[2:-4] + bytes(16)),
         CorruptImageError, "compressed data", FROM_PATCH, when="read", qemu="read",
         match="decompresses to 100 bytes"),
    Case("zstd-stream-garbage", "zstd", lambda p: _replace_compressed(p, b"\xff" * 64),
         CorruptImageError, "compressed data", FROM_PATCH, when="read", qemu="read"),
    Case("zstd-stream-short", "zstd",
         lambda p: _replace_compressed(p, zstandard.ZstdCompressor().compress(b"x" * 100)
                                       + bytes(16)),
         CorruptImageError, "compressed data", FROM_PATCH, when="read", qemu="read",
         match="decompresses to 100 bytes"),
    Case("compressed-past-eof", "zlib", _compressed_past_eof,
         CorruptImageError, "l2 entry", FROM_PATCH, when="read", qemu=None),
    # --- backing chain (opened lazily: found on a read of an unallocated range) ------------
    Case("backing-self", "backing", lambda p: _rebase_unsafe(p, p.name),
         BackingChainError, "backing_file_offset", 8, when="read", match="loop"),
    Case("backing-loop-A-B-A", "backing", lambda p: _rebase_unsafe(p.parent / "base.qcow2",
                                                                    p.name),
         BackingChainError, "backing_file_offset", 8, when="read", match="loop"),
    Case("backing-missing", "backing", lambda p: os.unlink(p.parent / "base.qcow2"),
         BackingFileNotFoundError, "backing_file_offset", 8, when="read"),
    Case("backing-is-a-directory", "backing", lambda p: _backing_name(p, b"."),
         BackingChainError, "backing_file_offset", 8, when="read"),
]

BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES)


def _params(cases):
    out = []
    for c in cases:
        marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def _prepare(make, case: Case) -> tuple[Path, int | None]:
    path = make(case.base)
    got = case.patch(path)
    return path, (got if case.offset == FROM_PATCH else case.offset)


def _trigger(case: Case, path: Path) -> None:
    """Do what must fail; before that, everything up to it must succeed."""
    if case.when == "open":
        Image.open(path).close()
        return
    with Image.open(path) as img:
        if case.when in ("snapshots", "bitmaps"):
            getattr(img, case.when)
        else:
            assert case.when == "read"
            img.read(0, img.size)


@pytest.mark.parametrize("case", _params(CASES))
def test_corruption_is_refused(make, case: Case):
    path, offset = _prepare(make, case)
    with pytest.raises(Qcow2Error) as ei:
        _trigger(case, path)
    exc = ei.value
    assert type(exc) is case.exc, f"{type(exc).__name__}: {exc}"
    assert (exc.field, exc.offset) == (case.field, offset), str(exc)
    if case.match:
        assert ei.match(case.match)
    # the message names the file, and str() names field and offset
    assert exc.path is not None and Path(exc.path).name in str(exc)
    if exc.field is not None:
        assert exc.field in str(exc) and f"{offset:#x}" in str(exc)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if c.when != "open"])
def test_lazy_checks_let_the_image_open(make, case: Case):
    """Errors found in tables are not raised at open: the header is valid."""
    path, _ = _prepare(make, case)
    with Image.open(path) as img:
        assert img.size == 1 * MiB


def _qemu_refuses(case: Case, path: Path) -> None:
    chain = ["--backing-chain"] if case.base == "backing" and case.when == "read" else []
    info = _run([QEMU_IMG, "info", "--output=json", "-f", "qcow2", *chain, path.name],
                cwd=path.parent)
    if case.qemu == "open":
        assert info.returncode != 0, f"qemu-img info accepted it:\n{info.stdout}"
        return
    assert info.returncode == 0, info.stderr
    io = _run([QEMU_IO, "-r", "-f", "qcow2", "-c", "read 0 1M", path.name], cwd=path.parent)
    assert io.returncode != 0 or "failed" in io.stdout + io.stderr, io.stdout + io.stderr


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if c.qemu])
def test_qemu_refuses_too(make, case: Case):
    path, _ = _prepare(make, case)
    _qemu_refuses(case, path)


def test_qemu_names_the_unknown_feature_too(make):
    path, _ = _prepare(make, BY_ID["incompat-bit5-named"])
    r = _run([QEMU_IMG, "info", "-f", "qcow2", path])
    assert r.returncode != 0 and "frobnicated clusters" in r.stderr


# ------------------------------------------------------------------------------------------
# The CLI: one line on stderr, exit status 1, no traceback


def _cli_argv(case: Case, path: Path) -> list[str]:
    if case.when != "read":
        return ["info", str(path)]
    if case.id.startswith("backing"):
        return ["info", "--backing-chain", str(path)]
    return ["convert", "-O", "raw", str(path), str(path.with_suffix(".raw"))]


def _assert_one_error_line(rc: int, stderr: str) -> None:
    assert rc == 1
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcow2kit: "), stderr


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_cli_reports_one_line(make, case: Case, capsys):
    path, _ = _prepare(make, case)
    rc = cli_main(_cli_argv(case, path))
    out, err = capsys.readouterr()
    _assert_one_error_line(rc, err)


CLI_SUBSET = ["magic", "short-0", "version-4", "cluster_bits-22", "header_length-108",
              "incompat-bit5-named", "refcount_table_offset-past-eof", "l1_size-over-32MiB",
              "nb_snapshots-65537", "ext-length-past-cluster", "snapshot-extra_data_size-1025",
              "bitmap-name_size-1024", "l2-offset-unaligned", "zstd-stream-garbage",
              "backing-self", "backing-loop-A-B-A"]


@pytest.mark.parametrize("case_id", CLI_SUBSET)
def test_cli_subprocess_reports_one_line(make, case_id):
    case = BY_ID[case_id]
    path, _ = _prepare(make, case)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    r = subprocess.run([sys.executable, "-m", "qcow2kit", *_cli_argv(case, path)],
                       capture_output=True, text=True, env=env, timeout=60)
    _assert_one_error_line(r.returncode, r.stderr)
    if case.when == "open":
        assert r.stdout == ""


def test_missing_backing_file_is_a_backing_chain_error(make):
    """A missing backing file fails only when its data is needed, and names the file."""
    path, _ = _prepare(make, BY_ID["backing-missing"])
    with Image.open(path) as img:
        img.read(0, 64 * KiB)                   # allocated here: no need for the backing file
        with pytest.raises(BackingChainError, match="base.qcow2") as ei:
            img.read(0, img.size)
    assert ei.value.path == str(path)


def test_compressed_cluster_past_eof_is_corrupt(make):
    """A compressed cluster past EOF fails on read only, naming the L2 entry."""
    path, _ = _prepare(make, BY_ID["compressed-past-eof"])
    with Image.open(path) as img:
        assert img.read(64 * KiB, 64 * KiB) == b"\x23" * (64 * KiB)
        with pytest.raises(CorruptImageError) as ei:
            img.read(0, 64 * KiB)
    assert ei.value.field == "l2 entry"


def test_unsupported_backing_format(make):
    path = make("backing")
    ext = ext_offset(path, EXT_BACKING_FORMAT)
    poke(path, ">5s", ext + 8, b"vmdk\0")
    with Image.open(path) as img:
        assert img.header.backing_format == "vmdk"
        with pytest.raises(UnsupportedFeatureError, match="vmdk"):
            img.read(0, img.size)


# ------------------------------------------------------------------------------------------
# Things that must NOT be refused


def test_backing_chain_too_deep(make):
    top = make("backing")
    base = top.parent / "base.qcow2"
    _create(top.parent / "top2.qcow2", "1M", backing="img.qcow2")
    with Image.open(top.parent / "top2.qcow2", max_backing_depth=1) as img:
        with pytest.raises(BackingChainError) as ei:
            img.read(0, img.size)
    assert (ei.value.field, ei.value.offset) == ("backing_file_offset", 8)
    assert ei.value.path == str(top)
    with Image.open(top.parent / "top2.qcow2") as img:   # the default depth is enough
        assert img.read(64 * KiB, 1) == b"\x66" and base.exists()


#: Tables pointing past the end of the file: QEMU 7.2 reads there as zeros (an L2 table of
#: unallocated entries, a data cluster of zeros), and so does qcow2kit (tests/test_truncated.py
#: cuts real images short).
PAST_EOF_POINTERS = {
    "l2-offset-past-eof": lambda p: poke(p, ">Q", l1_offset(p), COPIED | 0x10000000),
    "data-offset-past-eof": lambda p: poke(p, ">Q", l2_offset(p), COPIED | 0x10000000),
}


@pytest.mark.parametrize("patch", list(PAST_EOF_POINTERS))
def test_pointers_past_eof_read_as_zeros_like_qemu(make, tmp_path, capsys, patch):
    path = make("plain")
    PAST_EOF_POINTERS[patch](path)
    qemu_raw, our_raw = tmp_path / "qemu.raw", tmp_path / "qcow2kit.raw"
    _must([QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", path, qemu_raw])
    want = qemu_raw.read_bytes()
    assert want[:64 * KiB] == bytes(64 * KiB)
    with Image.open(path) as img:
        assert img.read(0, img.size) == want
    assert cli_main(["convert", "-O", "raw", str(path), str(our_raw)]) == 0, capsys.readouterr()
    assert our_raw.read_bytes() == want


def test_unknown_compatible_and_autoclear_bits_open(make):
    path = make("plain")
    set_bits(path, 80, 1 << 5)
    set_bits(path, 88, 1 << 9)
    with Image.open(path) as img:
        assert img.read(0, 128 * KiB) == b"\x11" * (128 * KiB)
    assert _run([QEMU_IMG, "info", "-f", "qcow2", path]).returncode == 0


def test_unknown_header_extension_is_kept(make):
    path = make("plain")
    ext = _retype_feature_table(path, 0x12345678)
    with Image.open(path) as img:
        rec = [e for e in img.header.extensions if e.type == 0x12345678]
        assert len(rec) == 1 and rec[0].offset == ext and len(rec[0].data) == 384
        assert img.read(0, 4) == b"\x11" * 4
    assert _run([QEMU_IMG, "info", "-f", "qcow2", path]).returncode == 0


def _qemu_info(path: Path) -> dict:
    r = _run([QEMU_IMG, "info", "--output=json", "-f", "qcow2", path.name], cwd=path.parent)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_dirty_bit_opens_and_reads(make):
    path = make("plain")
    set_bits(path, 72, 1 << 0)
    with Image.open(path) as img:
        assert img.header.dirty
        assert img.read(0, img.size) == b"\x11" * (128 * KiB) + bytes(MiB - 128 * KiB)
        ours = image_info(img)
    theirs = _qemu_info(path)
    assert ours["dirty-flag"] is theirs["dirty-flag"] is True
    assert peek(path, ">Q", 72) == 1   # neither of us repaired it on a read-only open


def test_corrupt_bit_opens_read_only(make):
    path = make("plain")
    set_bits(path, 72, 1 << 1)
    with Image.open(path) as img:
        assert img.header.corrupt and img.read_only
        assert img.read(0, 128 * KiB) == b"\x11" * (128 * KiB)
        ours = image_info(img)
    theirs = _qemu_info(path)
    assert ours["format-specific"]["data"]["corrupt"] is True
    assert theirs["format-specific"]["data"]["corrupt"] is True
    assert ours["dirty-flag"] is theirs["dirty-flag"] is False


# ------------------------------------------------------------------------------------------
# Fuzzing: byte flips in the header area


@pytest.fixture(scope="session")
def fuzz_base(tmp_path_factory) -> tuple[Path, bytes]:
    """A small image with something in every structure the header points at."""
    d = tmp_path_factory.mktemp("fuzz")
    p = d / "img.qcow2"
    _create(p, "1M")
    _must([QEMU_IMG, "bitmap", "--add", p, "bm0"])
    _io(p, "write -P 0x11 0 64k", "write -c -P 0x12 128k 64k", "write -z 256k 64k",
        "write -P 0x13 300k 20k")
    _must([QEMU_IMG, "snapshot", "-c", "s1", p])
    _io(p, "write -P 0x14 512k 64k")
    return d, p.read_bytes()


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang("took more than 20 s: a loop that does not advance?")


@settings(max_examples=300, deadline=timedelta(seconds=10),
          suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.integers(0, 511), st.integers(1, 255)),
                      min_size=1, max_size=8))
def test_header_byte_flips_raise_only_qcow2_errors(fuzz_base, flips):
    d, data = fuzz_base
    buf = bytearray(data)
    for pos, mask in flips:
        buf[pos] ^= mask
    path = d / "fuzzed.qcow2"
    path.write_bytes(buf)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)
    try:
        with Image.open(path) as img:
            n = min(img.size, 2 * MiB)
            img.read(0, n)
            if img.size > n:
                img.read(img.size - 64 * KiB, 64 * KiB)
            image_info(img)
            img.snapshots
            img.bitmaps
    except Qcow2Error:
        pass
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_header_byte_flips_base_is_valid(fuzz_base):
    d, data = fuzz_base
    with Image.open(d / "img.qcow2") as img:
        assert len(img.snapshots) == 1 and len(img.bitmaps) == 1
        got = img.read(0, img.size)
    assert got[:64 * KiB] == b"\x11" * (64 * KiB)
    assert got[128 * KiB:192 * KiB] == b"\x12" * (64 * KiB)
    assert got[512 * KiB:576 * KiB] == b"\x14" * (64 * KiB)
