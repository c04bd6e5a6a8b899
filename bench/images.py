"""Builders of large, sparse qcow2 images for the benchmarks.

Every image is made by the real ``qemu-img create -o preallocation=metadata``: all L1 and L2
tables and refcount blocks are written, every guest cluster is mapped, and the data clusters are
file holes, so a 1 TiB image takes about 160 MiB of disk.

* :func:`make_prealloc_image` -- that image as qemu-img made it (host order = guest order, one L2
  table before each 512 MiB of data clusters with 64 KiB clusters).
* :func:`make_random_image` -- the same, then the host offsets of all data clusters are permuted
  among the L2 entries (fixed-seed numpy permutation), so no two guest-adjacent clusters are
  host-adjacent: ``qemu-img map`` prints one extent per cluster.  The set of referenced clusters
  does not change, so the refcounts stay valid and ``qemu-img check`` passes.
* ``fill_data=True`` (both builders) writes :func:`pattern` into every data cluster, so a reader
  can check that it returned the right guest bytes: the 8-byte word at guest offset ``g`` holds
  ``PATTERN_MAGIC << 48 | g`` as a little-endian u64.  This writes the full virtual size to
  disk: meant for images of a few GiB.

This module deliberately does not import qcow2kit: the images it builds are the oracle's, and the
few header fields it needs are read here directly (big-endian, offsets as in QEMU's qcow2.rst).
Memory is bounded: L2 tables are processed ``batch_bytes`` at a time; only the permutation (one
u64 per data cluster: 32 MiB for 256 GiB of 64 KiB clusters) is held whole.
"""
from __future__ import annotations

import os
import struct
import subprocess
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

QCOW_MAGIC = b"QFI\xfb"
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COMPRESSED = 1 << 62
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_DATA_FILE = 1 << 2

PATTERN_MAGIC = 0x514B  # "QK"
DEFAULT_BATCH_BYTES = 16 << 20

GiB = 1 << 30
TiB = 1 << 40


@dataclass
class BuildReport:
    """What building one image cost: seconds per step and the file's sizes."""

    path: str
    kind: str
    size: int
    cluster_size: int
    seconds: dict[str, float] = field(default_factory=dict)
    data_clusters: int = 0
    apparent_bytes: int = 0
    disk_bytes: int = 0
    seed: int | None = None
    fill_data: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path, "kind": self.kind, "size": self.size,
            "cluster_size": self.cluster_size, "seconds": dict(self.seconds),
            "data_clusters": self.data_clusters, "apparent_bytes": self.apparent_bytes,
            "disk_bytes": self.disk_bytes, "seed": self.seed, "fill_data": self.fill_data,
        }


@dataclass(frozen=True)
class Geometry:
    """The header fields the builders need."""

    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8


def read_geometry(fd: int) -> Geometry:
    """Read and sanity-check the header of a qcow2 image made by qemu-img (v2/v3, standard L2)."""
    hdr = os.pread(fd, 104, 0)
    if len(hdr) < 72 or hdr[:4] != QCOW_MAGIC:
        raise ValueError("not a qcow2 image")
    version, = struct.unpack_from(">I", hdr, 4)
    cluster_bits, = struct.unpack_from(">I", hdr, 20)
    size, = struct.unpack_from(">Q", hdr, 24)
    crypt, l1_size = struct.unpack_from(">II", hdr, 32)
    l1_table_offset, = struct.unpack_from(">Q", hdr, 40)
    if version not in (2, 3) or not 9 <= cluster_bits <= 21 or crypt:
        raise ValueError(f"unsupported qcow2 image (version {version}, cluster_bits "
                         f"{cluster_bits}, crypt_method {crypt})")
    if version == 3:
        incompat, = struct.unpack_from(">Q", hdr, 72)
        if incompat & (INCOMPAT_EXTL2 | INCOMPAT_DATA_FILE):
            raise ValueError("extended L2 entries / external data file images are not supported")
    file_size = os.fstat(fd).st_size
    if l1_size > (32 << 20) // 8 or l1_table_offset + 8 * l1_size > file_size:
        raise ValueError("L1 table out of bounds")
    return Geometry(cluster_bits, size, l1_size, l1_table_offset)


def read_l1(fd: int, geo: Geometry) -> np.ndarray:
    raw = os.pread(fd, 8 * geo.l1_size, geo.l1_table_offset)
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


def _l2_batches(fd: int, geo: Geometry, batch_bytes: int
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (l1 indexes, L2 entries as a (k, l2_entries) native uint64 array) per batch of
    allocated L2 tables; k * cluster_size <= max(batch_bytes, cluster_size)."""
    l1 = read_l1(fd, geo)
    l2_offsets = l1 & np.uint64(L1E_OFFSET_MASK)
    (present,) = np.nonzero(l2_offsets)
    per_batch = max(1, batch_bytes // geo.cluster_size)
    cs = geo.cluster_size
    for start in range(0, len(present), per_batch):
        idx = present[start:start + per_batch]
        buf = bytearray(len(idx) * cs)
        mv = memoryview(buf)
        for j, off in enumerate(l2_offsets[idx].tolist()):
            if os.preadv(fd, [mv[j * cs:(j + 1) * cs]], off) != cs:
                raise ValueError(f"short read of the L2 table at {off:#x}")
        entries = np.frombuffer(buf, dtype=">u8").astype(np.uint64).reshape(len(idx), -1)
        if np.any(entries & np.uint64(QCOW_OFLAG_COMPRESSED)):
            raise ValueError("compressed clusters are not supported by the shuffle")
        yield idx, entries


def _write_l2_batch(fd: int, geo: Geometry, l1: np.ndarray, idx: np.ndarray,
                    entries: np.ndarray) -> None:
    data = entries.astype(">u8")
    cs = geo.cluster_size
    mv = memoryview(data.tobytes())
    for j, off in enumerate((l1[idx] & np.uint64(L1E_OFFSET_MASK)).tolist()):
        if os.pwrite(fd, mv[j * cs:(j + 1) * cs], off) != cs:
            raise OSError(f"short write of the L2 table at {off:#x}")


def data_mapping(fd: int, geo: Geometry, batch_bytes: int = DEFAULT_BATCH_BYTES
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(guest cluster indexes, host offsets) of every mapped data cluster, in guest order."""
    guests, hosts = [], []
    mask = np.uint64(L2E_OFFSET_MASK)
    for idx, entries in _l2_batches(fd, geo, batch_bytes):
        off = entries & mask
        rows, cols = np.nonzero(off)
        guests.append(idx[rows].astype(np.uint64) * np.uint64(geo.l2_entries)
                      + cols.astype(np.uint64))
        hosts.append(off[rows, cols])
    if not guests:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    return np.concatenate(guests), np.concatenate(hosts)


def shuffle_data_clusters(path: str | os.PathLike[str], seed: int = 1,
                          batch_bytes: int = DEFAULT_BATCH_BYTES) -> int:
    """Permute the host offsets of all data clusters among the image's L2 entries.

    Two passes over the L2 tables, ``batch_bytes`` of tables at a time: the first collects the
    host offsets (entry & 0x00fffffffffffe00) of the mapped entries, the second writes them back
    in the order of ``numpy.random.default_rng(seed).permutation``, keeping each entry's flag
    bits.  Every data cluster stays referenced exactly once, so the refcounts remain right.
    Returns the number of data clusters.
    """
    mask = np.uint64(L2E_OFFSET_MASK)
    fd = os.open(path, os.O_RDWR)
    try:
        geo = read_geometry(fd)
        l1 = read_l1(fd, geo)
        chunks = [entries[(entries & mask) != 0] & mask
                  for _, entries in _l2_batches(fd, geo, batch_bytes)]
        offsets = np.concatenate(chunks) if chunks else np.zeros(0, np.uint64)
        del chunks
        n = len(offsets)
        offsets = offsets[np.random.default_rng(seed).permutation(n)]
        pos = 0
        for idx, entries in _l2_batches(fd, geo, batch_bytes):
            sel = (entries & mask) != 0
            k = int(np.count_nonzero(sel))
            entries[sel] = (entries[sel] & ~mask) | offsets[pos:pos + k]
            pos += k
            _write_l2_batch(fd, geo, l1, idx, entries)
        if pos != n:
            raise RuntimeError(f"L2 tables changed during the shuffle ({pos} != {n} entries)")
        os.fsync(fd)
        return n
    finally:
        os.close(fd)


def pattern(guest_offset: int, length: int) -> bytes:
    """The bytes ``fill_data=True`` puts at ``guest_offset`` (both multiples of 8)."""
    if guest_offset % 8 or length % 8:
        raise ValueError("pattern offsets and lengths are multiples of 8")
    words = (np.uint64(PATTERN_MAGIC << 48) + np.uint64(guest_offset)
             + np.arange(0, length, 8, dtype=np.uint64))
    return words.astype("<u8").tobytes()


def fill_data_clusters(path: str | os.PathLike[str], batch_bytes: int = DEFAULT_BATCH_BYTES
                       ) -> int:
    """Write :func:`pattern` into every mapped data cluster, in host order (sequential writes,
    one ``pwrite`` per host-contiguous run).  Returns the number of bytes written."""
    fd = os.open(path, os.O_RDWR)
    try:
        geo = read_geometry(fd)
        guest, host = data_mapping(fd, geo, batch_bytes)
        order = np.argsort(host, kind="stable")
        guest, host = guest[order], host[order]
        cs = geo.cluster_size
        words = np.arange(0, cs, 8, dtype=np.uint64)
        per_batch = max(1, batch_bytes // cs)
        written = 0
        for s in range(0, len(host), per_batch):
            g = guest[s:s + per_batch] << np.uint64(geo.cluster_bits)
            h = host[s:s + per_batch]
            buf = np.ascontiguousarray(
                ((np.uint64(PATTERN_MAGIC << 48) + g)[:, None] + words[None, :]).astype("<u8"))
            mv = memoryview(buf.data).cast("B")
            breaks = np.flatnonzero(np.diff(h) != np.uint64(cs)) + 1
            bounds = [0, *breaks.tolist(), len(h)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                n = os.pwrite(fd, mv[a * cs:b * cs], int(h[a]))
                if n != (b - a) * cs:
                    raise OSError(f"short write at host offset {int(h[a]):#x}")
                written += n
        os.fsync(fd)
        return written
    finally:
        os.close(fd)


def _qemu_img_create_prealloc(path: str, size: int, cluster_size: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"preallocation=metadata,cluster_size={cluster_size}", path, str(size)],
                   check=True)


def _finish(report: BuildReport) -> BuildReport:
    st = os.stat(report.path)
    report.apparent_bytes = st.st_size
    report.disk_bytes = st.st_blocks * 512
    return report


def make_prealloc_image(path: str | os.PathLike[str], size: int, *, cluster_size: int = 65536,
                        fill_data: bool = False) -> BuildReport:
    """``qemu-img create -f qcow2 -o preallocation=metadata PATH SIZE`` (sparse); with
    ``fill_data`` every data cluster then holds :func:`pattern`."""
    path = os.fspath(path)
    rep = BuildReport(path, "prealloc", size, cluster_size, fill_data=fill_data)
    t = time.perf_counter()
    _qemu_img_create_prealloc(path, size, cluster_size)
    rep.seconds["create"] = time.perf_counter() - t
    rep.data_clusters = -(-size // cluster_size)
    if fill_data:
        t = time.perf_counter()
        fill_data_clusters(path)
        rep.seconds["fill"] = time.perf_counter() - t
    return _finish(rep)


def make_random_image(path: str | os.PathLike[str], size: int, seed: int = 1, *,
                      cluster_size: int = 65536, fill_data: bool = False,
                      batch_bytes: int = DEFAULT_BATCH_BYTES) -> BuildReport:
    """Metadata-preallocated image whose data clusters are mapped in random host order
    (:func:`shuffle_data_clusters` with ``seed``); ``fill_data`` as for
    :func:`make_prealloc_image`, written after the shuffle so the pattern follows guest
    offsets."""
    path = os.fspath(path)
    rep = BuildReport(path, "random", size, cluster_size, seed=seed, fill_data=fill_data)
    t = time.perf_counter()
    _qemu_img_create_prealloc(path, size, cluster_size)
    rep.seconds["create"] = time.perf_counter() - t
    t = time.perf_counter()
    rep.data_clusters = shuffle_data_clusters(path, seed, batch_bytes)
    rep.seconds["shuffle"] = time.perf_counter() - t
    if fill_data:
        t = time.perf_counter()
        fill_data_clusters(path, batch_bytes)
        rep.seconds["fill"] = time.perf_counter() - t
    return _finish(rep)


def qemu_img_check(path: str | os.PathLike[str]) -> tuple[int, float, str]:
    """Run ``qemu-img check``; return (exit status, seconds, its output)."""
    t = time.perf_counter()
    proc = subprocess.run(["qemu-img", "check", os.fspath(path)], capture_output=True, text=True)
    return proc.returncode, time.perf_counter() - t, (proc.stdout + proc.stderr).strip()
