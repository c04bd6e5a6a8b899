"""Synthetic, fragmented qcow2 images whose content proves itself.

:func:`make_fragmented_image` writes, without QEMU, a qcow2 v3 image that looks
like one a VM has been writing to at random for a while: the guest clusters it
holds sit in a shuffled host order, some clusters are plain "reads as zero"
entries, and optionally some are stored deflate-compressed and packed several
to a host cluster, a stream crossing into the next cluster when that one
follows (as QEMU's ``qcow2_alloc_bytes`` packs them).  The image is written by
:class:`qcow2kit.builder.ImageBuilder` (QEMU's allocator and write order: L2
tables, refcount blocks and a growing refcount table land where QEMU would put
them), in the random order the sample chooses; this module does no layout
arithmetic of its own.

Every byte of guest data is derived from its own guest offset: the 8-byte,
big-endian word at guest offset ``o`` (``o`` a multiple of 8) is
``o | tag << 56``.  A reader that puts a cluster at the wrong place, or reads
the wrong host bytes, gets words that name the offset they really came from.
:class:`SampleInfo` describes the image that was written: how many clusters
of each kind, where each guest cluster lives in the file (read back from the
L2 tables the builder wrote), and what a reader must return for any guest
range (:meth:`SampleInfo.expected_guest_bytes`).

Data is generated a chunk at a time; memory is a few arrays of one integer per
guest cluster plus the builder's batch, never the image itself.  Refcounts are
exact (the builder's), so ``qemu-img check`` reports neither leaks nor
corruptions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from . import spec
from . import tables as T
from .builder import ImageBuilder, compress_cluster

__all__ = [
    "KIND_UNALLOCATED",
    "KIND_ZERO",
    "KIND_NORMAL",
    "KIND_COMPRESSED",
    "SampleInfo",
    "cluster_pattern",
    "make_fragmented_image",
]

# What a guest cluster is in a sample image (SampleInfo.kinds).
KIND_UNALLOCATED = 0   # L2 entry 0 (or no L2 table): reads as zeros
KIND_ZERO = 1          # L2 entry with only bit 0 (QCOW_OFLAG_ZERO): reads as zeros
KIND_NORMAL = 2        # standard cluster: host offset | COPIED
KIND_COMPRESSED = 3    # compressed cluster descriptor

_SECTOR = 512                      # QEMU's unit of virtual sizes
_CHUNK_BYTES = 8 * 1024 * 1024     # data is generated this much at a time


def _words(guest_clusters: np.ndarray, cluster_bits: int, tag: int) -> np.ndarray:
    """The pattern words of ``guest_clusters``, one row per cluster, native uint64."""
    cluster_size = 1 << cluster_bits
    within = np.arange(0, cluster_size, 8, dtype=np.uint64)
    rows = (guest_clusters.astype(np.uint64) << np.uint64(cluster_bits))[:, None] + within[None, :]
    if tag:
        rows |= np.uint64(tag << 56)
    return rows


def cluster_pattern(guest_cluster: int, cluster_bits: int, tag: int = 0) -> bytes:
    """The full content of allocated guest cluster ``guest_cluster`` in a sample image."""
    return _words(np.array([guest_cluster]), cluster_bits, tag).astype(">u8").tobytes()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class SampleInfo:
    """What :func:`make_fragmented_image` wrote.

    Per-guest-cluster arrays (index = guest offset >> cluster_bits):

    * ``kinds``: uint8, one of KIND_UNALLOCATED, KIND_ZERO, KIND_NORMAL, KIND_COMPRESSED.
    * ``host_offsets``: int64, host byte offset of a normal cluster's data, -1 for every other kind
      (this is what ``qemu-img map`` reports as ``offset``).
    * ``compressed_offsets`` / ``compressed_lengths``: int64, byte offset and exact length of the
      deflate stream of a compressed cluster, -1 / 0 otherwise.

    ``allocated_clusters`` counts guest clusters with data (normal + compressed), like the
    ``allocated-clusters`` of ``qemu-img check``; ``compressed_clusters`` is the compressed part
    of it; ``zero_clusters`` counts zero-flagged entries (no host cluster).
    ``l2_table_offsets`` is indexed by L1 index (-1: no L2 table).
    """

    path: str
    virtual_size: int
    cluster_bits: int
    cluster_size: int
    allocated_clusters: int
    zero_clusters: int
    compressed_clusters: int
    file_size: int
    seed: int
    tag: int
    l1_table_offset: int
    l1_size: int
    refcount_table_offset: int
    refcount_table_clusters: int
    refcount_block_offsets: np.ndarray = field(repr=False)
    l2_table_offsets: np.ndarray = field(repr=False)
    kinds: np.ndarray = field(repr=False)
    host_offsets: np.ndarray = field(repr=False)
    compressed_offsets: np.ndarray = field(repr=False)
    compressed_lengths: np.ndarray = field(repr=False)

    @property
    def guest_clusters(self) -> int:
        """Number of guest clusters (the last one may be partial)."""
        return int(self.kinds.shape[0])

    @property
    def normal_clusters(self) -> int:
        return self.allocated_clusters - self.compressed_clusters

    def host_offset_of(self, guest_cluster: int) -> int:
        """Host byte offset of a normal guest cluster's data; -1 if it has none (or is compressed)."""
        if not 0 <= guest_cluster < self.guest_clusters:
            raise IndexError(f"guest cluster {guest_cluster} outside 0..{self.guest_clusters - 1}")
        return int(self.host_offsets[guest_cluster])

    def guest_clusters_in_host_order(self) -> np.ndarray:
        """The normal guest clusters, sorted by the host offset of their data."""
        normal = np.flatnonzero(self.host_offsets >= 0)
        return normal[np.argsort(self.host_offsets[normal], kind="stable")]

    def expected_guest_bytes(self, offset: int, length: int) -> bytes:
        """What a correct reader returns for guest bytes ``[offset, offset + length)``."""
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ValueError(f"range {offset}+{length} outside the virtual size {self.virtual_size}")
        if length == 0:
            return b""
        cb = self.cluster_bits
        first = offset >> cb
        last = (offset + length - 1) >> cb
        clusters = np.arange(first, last + 1, dtype=np.int64)
        has_data = self.kinds[first:last + 1] >= KIND_NORMAL
        rows = np.zeros((clusters.shape[0], self.cluster_size // 8), dtype=">u8")
        if has_data.any():
            rows[has_data] = _words(clusters[has_data], cb, self.tag)
        start = offset - (first << cb)
        return rows.reshape(-1).view(np.uint8)[start:start + length].tobytes()


def make_fragmented_image(path, *, virtual_size: int = 256 * 2**20, cluster_bits: int = 16,
                          fill: float = 0.75, seed: int = 1, compressed_fraction: float = 0.0,
                          zero_fraction: float = 0.05, tag: int = 0) -> SampleInfo:
    """Write a fragmented qcow2 v3 image at ``path`` (overwritten) and describe it.

    ``fill``: fraction of guest clusters that get data (normal or compressed).
    ``compressed_fraction``: fraction of those stored compressed (raw deflate); a cluster whose
    deflate stream would not be smaller than a cluster is stored normally instead.
    ``zero_fraction``: fraction of all guest clusters given a zero-flag entry, taken from those
    without data (so fewer when ``fill`` leaves no room).
    ``seed``: the layout (which clusters, in which host order) is a function of the arguments.
    ``tag`` (0..255): top byte of every pattern word, to tell apart images with the same layout.
    The clusters are written through :class:`~qcow2kit.builder.ImageBuilder` in a random order,
    and the builder places them in the order written: host order is a random permutation of
    the guest clusters.
    """
    path = os.fspath(path)
    if not spec.MIN_CLUSTER_BITS <= cluster_bits <= spec.MAX_CLUSTER_BITS:
        raise ValueError(f"cluster_bits must be {spec.MIN_CLUSTER_BITS}..{spec.MAX_CLUSTER_BITS}")
    if virtual_size < 0 or virtual_size % _SECTOR:
        raise ValueError("virtual_size must be a non-negative multiple of 512 (QEMU truncates to sectors)")
    for name, value in (("fill", fill), ("compressed_fraction", compressed_fraction),
                        ("zero_fraction", zero_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be within 0..1, not {value}")
    if not 0 <= tag <= 255:
        raise ValueError("tag must be 0..255")

    cb = cluster_bits
    cs = 1 << cb
    n_guest = _ceil_div(virtual_size, cs)

    # --- what each guest cluster is, and the order the "VM" wrote them in -------------------
    rng = np.random.default_rng(seed)
    n_alloc = min(n_guest, round(fill * n_guest))
    n_zero = min(n_guest - n_alloc, round(zero_fraction * n_guest))
    n_comp = min(n_alloc, round(compressed_fraction * n_alloc))
    chosen = rng.permutation(n_guest)[:n_alloc + n_zero]
    kinds = np.zeros(n_guest, dtype=np.uint8)
    kinds[chosen[:n_alloc]] = KIND_NORMAL
    kinds[chosen[:n_comp]] = KIND_COMPRESSED
    kinds[chosen[n_alloc:]] = KIND_ZERO
    write_order = chosen[rng.permutation(chosen.shape[0])]

    comp_lengths = np.zeros(n_guest, dtype=np.int64)
    # cache="unsafe": QEMU's write order without the fsyncs (a sample needs no power-cut safety)
    with ImageBuilder(path, virtual_size, cluster_size=cs, compat="1.1", refcount_bits=16,
                      compression_type="zlib", cache="unsafe") as b:
        chunk = max(1, _CHUNK_BYTES >> cb)
        for i in range(0, write_order.shape[0], chunk):
            part = write_order[i:i + chunk]
            buf = memoryview(_words(part, cb, tag).astype(">u8").tobytes())
            for j, (g, kind) in enumerate(zip(part.tolist(), kinds[part].tolist())):
                if kind == KIND_ZERO:
                    b.write_zero(g << cb, min(cs, virtual_size - (g << cb)))
                    continue
                data = buf[j << cb:(j << cb) + min(cs, virtual_size - (g << cb))]
                if kind == KIND_COMPRESSED:
                    # the builder stores a cluster that does not shrink as a normal one
                    packed = compress_cluster(bytes(data) + bytes(cs - len(data)), "zlib")
                    if len(packed) < cs:
                        comp_lengths[g] = len(packed)
                    else:
                        kinds[g] = KIND_NORMAL
                    b.write_compressed(g << cb, data)
                else:
                    b.write(g << cb, data)
    alloc = b.plan.allocator

    # --- what the builder wrote, read back from the file ----------------------------------
    host_offsets = np.full(n_guest, -1, dtype=np.int64)
    comp_offsets = np.full(n_guest, -1, dtype=np.int64)
    l1_size = int(alloc.l1.shape[0])
    l2_offsets = np.full(l1_size, -1, dtype=np.int64)
    geo = T.L2Geometry(cb, False, False)
    per_l2 = geo.l2_entries
    with open(path, "rb") as f:
        for l1_index, l2_cluster in sorted(alloc.l2_tables.items()):
            l2_offsets[l1_index] = l2_cluster << cb
            entries, bitmaps = T.decode_l2(os.pread(f.fileno(), cs, l2_cluster << cb), geo)
            units = T.classify(entries, bitmaps, geo)
            first = l1_index * per_l2
            n = min(per_l2, n_guest - first)
            kind, host = units.kind[:n], units.host[:n].astype(np.int64)
            data = kind == T.DATA
            host_offsets[first:first + n][data] = host[data]
            comp = kind == T.COMPRESSED
            comp_offsets[first:first + n][comp] = host[comp]
    assert (comp_offsets >= 0).sum() == np.count_nonzero(comp_lengths)
    comp_lengths[comp_offsets < 0] = 0
    # QEMU writes a compressed stream, not its whole cluster: the file is made to end at a
    # cluster boundary, where qemu-img check puts the image end
    file_size = _ceil_div(os.path.getsize(path), cs) * cs
    os.truncate(path, file_size)
    reftable = alloc.reftable.astype(np.int64)

    return SampleInfo(
        path=path,
        virtual_size=virtual_size,
        cluster_bits=cb,
        cluster_size=cs,
        allocated_clusters=n_alloc,
        zero_clusters=n_zero,
        compressed_clusters=int(np.count_nonzero(comp_offsets >= 0)),
        file_size=file_size,
        seed=seed,
        tag=tag,
        l1_table_offset=alloc.l1_offset,
        l1_size=l1_size,
        refcount_table_offset=alloc.reftable_offset,
        refcount_table_clusters=int(alloc.reftable.shape[0]) * 8 // cs,
        refcount_block_offsets=reftable[reftable != 0],
        l2_table_offsets=l2_offsets,
        kinds=kinds,
        host_offsets=host_offsets,
        compressed_offsets=comp_offsets,
        compressed_lengths=comp_lengths,
    )
