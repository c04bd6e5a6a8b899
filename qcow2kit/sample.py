"""Synthetic, fragmented qcow2 images whose content proves itself.

:func:`make_fragmented_image` writes, without QEMU, a qcow2 v3 image that looks
like one a VM has been writing to at random for a while: the guest clusters it
holds sit in a shuffled host order, L2 tables are allocated on demand between
the data clusters (as QEMU's ``l2_allocate`` does), refcount blocks appear in
the stream where the file grows past the reach of the previous one, some
clusters are plain "reads as zero" entries, and optionally some are stored
deflate-compressed and packed several to a host cluster (as QEMU's
``qcow2_alloc_bytes`` packs them).

Every byte of guest data is derived from its own guest offset: the 8-byte,
big-endian word at guest offset ``o`` (``o`` a multiple of 8) is
``o | tag << 56``.  A reader that puts a cluster at the wrong place, or reads
the wrong host bytes, gets words that name the offset they really came from.
:class:`SampleInfo` describes the image that was written: how many clusters
of each kind, where each guest cluster lives in the file, and what a reader
must return for any guest range (:meth:`SampleInfo.expected_guest_bytes`).

The image is written with ``os.pwrite`` in large chunks (data runs in host
order, each table once); memory is a few arrays of one integer per guest
cluster plus one chunk buffer, never the image itself.

Refcounts are exact: 1 for every metadata and normal data cluster (which also
carry the COPIED flag in their L1/L2 entries), and for a host cluster holding
compressed data, the number of compressed clusters whose data touches it
(qemu-img check counts references the same way), so ``qemu-img check``
reports neither leaks nor corruptions.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from qcow2kit import spec

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

_SECTOR = 512                      # the unit of the compressed-size field
_CHUNK_BYTES = 8 * 1024 * 1024     # data is generated and written this much at a time
_REFCOUNT_ORDER = 4                # 16-bit refcounts
_DEFLATE_WBITS = -12               # raw deflate with a 4 KiB window: what QEMU inflates with


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


def _header_cluster(cluster_size: int, cluster_bits: int, virtual_size: int, l1_size: int,
                    l1_table_offset: int, refcount_table_offset: int,
                    refcount_table_clusters: int) -> bytes:
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        spec.QCOW_MAGIC,
        3,                          # version
        0, 0,                       # backing_file_offset, backing_file_size
        cluster_bits,
        virtual_size,
        spec.CRYPT_NONE,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        0, 0,                       # nb_snapshots, snapshots_offset
        0, 0, 0,                    # incompatible, compatible, autoclear features
        _REFCOUNT_ORDER,
        spec.V3_HEADER_SIZE,        # header_length
    )
    # compression_type (deflate) and padding up to header_length
    header += bytes([spec.COMPRESSION_ZLIB]) + bytes(spec.V3_HEADER_SIZE - len(header) - 1)
    assert len(header) == spec.V3_HEADER_SIZE

    # Feature-name table, as QEMU writes it (it fits even in a 512-byte cluster).
    names = b"".join(struct.pack(">BB46s", ftype, bit, name.encode("ascii"))
                     for (ftype, bit), name in sorted(spec.KNOWN_FEATURE_NAMES.items()))
    ext = struct.pack(">II", spec.EXT_FEATURE_TABLE, len(names)) + names
    end = struct.pack(">II", spec.EXT_END, 0)
    if len(header) + len(ext) + len(end) <= cluster_size:
        header += ext
    header += end
    return header


class _Layout:
    """Sizes of the metadata in front of the data, and where the refcount blocks go after it."""

    def __init__(self, cluster_bits: int, n_guest: int, l1_size: int) -> None:
        self.cb = cluster_bits
        self.cs = 1 << cluster_bits
        self.per_block = self.cs * 8 >> _REFCOUNT_ORDER   # refcount entries per refcount block
        self.n_guest = n_guest
        self.l1_size = l1_size
        self.l1_clusters = _ceil_div(l1_size * 8, self.cs)

    def front(self, stream_clusters: int) -> tuple[int, int]:
        """Smallest (refcount_table_clusters, front refcount blocks) for a stream of that many clusters.

        The file starts with header, refcount table, the refcount blocks that cover the front, L1.
        After it, refcount block k (k >= number of front blocks) sits at cluster k * per_block,
        the first cluster it covers, and every other cluster is taken in turn by the stream.
        """
        per = self.per_block
        rt_clusters, n_front = 1, 1
        while True:
            first_free = 1 + rt_clusters + n_front + self.l1_clusters
            if first_free > n_front * per:
                n_front += 1
                continue
            end = self.stream_end(first_free, n_front, stream_clusters)
            n_blocks = max(n_front, _ceil_div(end, per))
            need = _ceil_div(n_blocks * 8, self.cs)
            if need > rt_clusters:
                rt_clusters = need
                continue
            if rt_clusters * self.cs > spec.MAX_REFTABLE_SIZE:
                raise ValueError("image too large: refcount table would exceed QEMU's limit")
            return rt_clusters, n_front

    def stream_end(self, first_free: int, n_front: int, count: int) -> int:
        """Cluster index after the last of ``count`` stream clusters (refcount blocks included)."""
        if count == 0:
            return first_free
        per = self.per_block
        j = count - 1
        boundary = n_front * per
        if first_free + j < boundary:
            return first_free + j + 1
        j -= boundary - first_free
        # each later block's first cluster is its refcount block; the other per - 1 are stream
        last = (n_front + j // (per - 1)) * per + j % (per - 1) + 1
        return last + 1


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
    Write order is random; each write allocates the L2 table it needs (if not yet there) and then
    its data cluster at the end of the file, so host order is a random permutation of the guest
    clusters with L2 tables and refcount blocks interleaved.
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
    l2_bits = cb - 3
    n_guest = _ceil_div(virtual_size, cs)
    l1_size = _ceil_div(n_guest, 1 << l2_bits)
    if l1_size * 8 > spec.MAX_L1_SIZE:
        raise ValueError("virtual_size too large for this cluster size (L1 table over QEMU's limit)")
    lay = _Layout(cb, n_guest, l1_size)
    per = lay.per_block

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

    # Upper bound of stream clusters (exact without compression): one per L2 table, one per write.
    n_l2_used = np.unique(write_order >> l2_bits).shape[0]
    rt_clusters, n_front = lay.front(n_l2_used + n_alloc)
    refcount_table_offset = cs
    front_blocks_at = 1 + rt_clusters
    l1_at = front_blocks_at + n_front
    first_free = l1_at + lay.l1_clusters

    csize_shift = 62 - (cb - 8)
    csize_mask = (1 << (cb - 8)) - 1

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        # --- simulate the allocations (QEMU-like: always the next cluster at the end) -------
        l2_cluster = [-1] * l1_size
        data_cluster = {}            # guest -> host cluster (normal)
        comp_pieces = []             # (guest, byte offset, length)
        cur = first_free
        comp_free = -1               # free byte offset in the partly used compressed cluster
        kinds_list = kinds.tolist()
        for g in write_order.tolist():
            t = g >> l2_bits
            if l2_cluster[t] < 0:
                if cur % per == 0:   # the file grows into a new refcount block's range
                    cur += 1
                l2_cluster[t] = cur
                cur += 1
            kind = kinds_list[g]
            if kind == KIND_NORMAL:
                if cur % per == 0:
                    cur += 1
                data_cluster[g] = cur
                cur += 1
            elif kind == KIND_COMPRESSED:
                comp = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, _DEFLATE_WBITS)
                data = comp.compress(cluster_pattern(g, cb, tag)) + comp.flush()
                size = len(data)
                if size >= cs:       # not worth it: QEMU would write it uncompressed too
                    kinds_list[g] = KIND_NORMAL
                    if cur % per == 0:
                        cur += 1
                    data_cluster[g] = cur
                    cur += 1
                    continue
                # like qcow2_alloc_bytes: pack into the partly used cluster while it has room
                # (even after other allocations), spill into the next cluster only if that is
                # the next one allocated
                if comp_free >= 0 and size <= cs - (comp_free & (cs - 1)):
                    off = comp_free
                elif comp_free >= 0 and (comp_free >> cb) + 1 == cur and cur % per != 0:
                    off = comp_free
                    cur += 1
                else:
                    if cur % per == 0:
                        cur += 1
                    off = cur << cb
                    cur += 1
                os.pwrite(fd, data, off)
                comp_pieces.append((g, off, size))
                comp_free = off + size
                if comp_free & (cs - 1) == 0:
                    comp_free = -1
            # KIND_ZERO: the L2 entry only
        end = cur                      # clusters in the file
        n_blocks = _ceil_div(end, per)
        assert n_blocks * 8 <= rt_clusters * cs and n_blocks >= n_front
        kinds = np.array(kinds_list, dtype=np.uint8)
        os.ftruncate(fd, end << cb)

        # --- arrays describing the layout ---------------------------------------------------
        host_offsets = np.full(n_guest, -1, dtype=np.int64)
        if data_cluster:
            gs = np.fromiter(data_cluster.keys(), dtype=np.int64, count=len(data_cluster))
            hc = np.fromiter(data_cluster.values(), dtype=np.int64, count=len(data_cluster))
            host_offsets[gs] = hc << cb
        else:
            gs = hc = np.zeros(0, dtype=np.int64)
        comp_offsets = np.full(n_guest, -1, dtype=np.int64)
        comp_lengths = np.zeros(n_guest, dtype=np.int64)
        if comp_pieces:
            cp = np.array(comp_pieces, dtype=np.int64)
            comp_offsets[cp[:, 0]] = cp[:, 1]
            comp_lengths[cp[:, 0]] = cp[:, 2]
        else:
            cp = np.zeros((0, 3), dtype=np.int64)
        l2_offsets = np.array(l2_cluster, dtype=np.int64)
        l2_offsets[l2_offsets >= 0] <<= cb
        block_clusters = np.concatenate([
            np.arange(front_blocks_at, front_blocks_at + n_front, dtype=np.int64),
            np.arange(n_front, n_blocks, dtype=np.int64) * per,
        ])

        # --- normal data, in host order, in large runs ------------------------------------
        order = np.argsort(hc, kind="stable")
        gs, hc = gs[order], hc[order]
        chunk = max(1, _CHUNK_BYTES >> cb)
        for i in range(0, gs.shape[0], chunk):
            g_part, h_part = gs[i:i + chunk], hc[i:i + chunk]
            buf = memoryview(_words(g_part, cb, tag).astype(">u8").tobytes())
            breaks = np.flatnonzero(np.diff(h_part) != 1) + 1
            starts = np.concatenate([[0], breaks])
            stops = np.concatenate([breaks, [h_part.shape[0]]])
            for a, b in zip(starts.tolist(), stops.tolist()):
                os.pwrite(fd, buf[a << cb:b << cb], int(h_part[a]) << cb)

        # --- L2 tables ------------------------------------------------------------------
        entries_per_l2 = 1 << l2_bits
        l2e = np.zeros(l1_size * entries_per_l2, dtype=np.uint64)
        l2e[:n_guest][kinds == KIND_ZERO] = spec.OFLAG_ZERO
        normal = host_offsets >= 0
        l2e[:n_guest][normal] = host_offsets[normal].astype(np.uint64) | np.uint64(spec.OFLAG_COPIED)
        if cp.shape[0]:
            coff = cp[:, 1]
            extra_sectors = ((coff + cp[:, 2] - 1) // _SECTOR) - (coff // _SECTOR)
            assert (extra_sectors <= csize_mask).all() and (coff < (1 << csize_shift)).all()
            l2e[cp[:, 0]] = (coff.astype(np.uint64)
                             | (extra_sectors.astype(np.uint64) << np.uint64(csize_shift))
                             | np.uint64(spec.OFLAG_COMPRESSED))
        l2e_be = l2e.astype(">u8").reshape(l1_size, entries_per_l2)
        for t in np.flatnonzero(l2_offsets >= 0).tolist():
            os.pwrite(fd, l2e_be[t].tobytes(), int(l2_offsets[t]))
        del l2e

        # --- L1 -------------------------------------------------------------------------
        l1 = np.where(l2_offsets >= 0, l2_offsets.astype(np.uint64) | np.uint64(spec.OFLAG_COPIED),
                      np.uint64(0)).astype(">u8")
        if l1_size:
            os.pwrite(fd, l1.tobytes(), l1_at << cb)

        # --- refcounts ------------------------------------------------------------------
        refcounts = np.zeros(n_blocks * per, dtype=np.int64)
        refcounts[0] = 1                                              # header
        refcounts[1:1 + rt_clusters] = 1                              # refcount table
        refcounts[block_clusters] += 1                                # refcount blocks
        refcounts[l1_at:l1_at + lay.l1_clusters] = 1                  # L1
        refcounts[l2_offsets[l2_offsets >= 0] >> cb] += 1             # L2 tables
        refcounts[hc] += 1                                            # normal data
        if cp.shape[0]:                                               # compressed: per touch
            first = cp[:, 1] >> cb
            last = (cp[:, 1] + cp[:, 2] - 1) >> cb
            np.add.at(refcounts, first, 1)
            spans = last != first
            np.add.at(refcounts, last[spans], 1)
            assert ((last - first) <= 1).all()
        assert refcounts.max() <= 0xFFFF
        rc = refcounts.astype(">u2").reshape(n_blocks, per)
        del refcounts
        os.pwrite(fd, rc[:n_front].tobytes(), front_blocks_at << cb)
        for k in range(n_front, n_blocks):
            os.pwrite(fd, rc[k].tobytes(), int(block_clusters[k]) << cb)
        del rc

        reftable = (block_clusters.astype(np.uint64) << np.uint64(cb)).astype(">u8")
        os.pwrite(fd, reftable.tobytes(), refcount_table_offset)

        # --- header last ----------------------------------------------------------------
        os.pwrite(fd, _header_cluster(cs, cb, virtual_size, l1_size, l1_at << cb if l1_size else 0,
                                      refcount_table_offset, rt_clusters), 0)
    finally:
        os.close(fd)

    n_comp_real = int(cp.shape[0])
    return SampleInfo(
        path=path,
        virtual_size=virtual_size,
        cluster_bits=cb,
        cluster_size=cs,
        allocated_clusters=n_alloc,
        zero_clusters=n_zero,
        compressed_clusters=n_comp_real,
        file_size=end << cb,
        seed=seed,
        tag=tag,
        l1_table_offset=l1_at << cb if l1_size else 0,
        l1_size=l1_size,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=rt_clusters,
        refcount_block_offsets=block_clusters << cb,
        l2_table_offsets=l2_offsets,
        kinds=kinds,
        host_offsets=host_offsets,
        compressed_offsets=comp_offsets,
        compressed_lengths=comp_lengths,
    )
