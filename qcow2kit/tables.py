"""Vectorized decoding and encoding of qcow2 tables: L1, L2 (standard and extended), refcount
tables and blocks.

Whole tables are turned into numpy arrays at once and back; nothing here loops
per entry in Python.  Every ``decode_*`` has its ``encode_*`` next to it, and
``encode(decode(raw)) == raw`` for every table QEMU writes.  Cluster kinds follow QEMU's
``qcow2_get_cluster_type`` and ``qcow2_get_subcluster_type`` (block/qcow2.h).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from . import spec


class ClusterKind(enum.IntEnum):
    """Kind of a guest unit (a cluster, or a subcluster with extended L2).

    An ``IntEnum``: the numpy arrays of kinds (``L2Units.kind``, uint8) hold
    these values, and members compare equal to them.
    """

    UNALLOCATED = 0   #: read from the backing file, or zeros
    ZERO = 1          #: reads as zeros, whatever the backing file holds
    DATA = 2          #: stored uncompressed at a host offset
    COMPRESSED = 3    #: stored compressed at a host byte offset
    INVALID = 4       #: both "allocated" and "reads as zero" set for a subcluster

    @property
    def label(self) -> str:
        """The lower-case name ("data", "zero", ...)."""
        return self.name.lower()


# Module-level names, as before the enum (and as the rest of the code base spells them).
UNALLOCATED = ClusterKind.UNALLOCATED
ZERO = ClusterKind.ZERO
DATA = ClusterKind.DATA
COMPRESSED = ClusterKind.COMPRESSED
INVALID = ClusterKind.INVALID

#: ``ClusterKind`` by value: ``KINDS[int(array_value)]`` (cheaper than calling the enum).
KINDS: tuple[ClusterKind, ...] = tuple(ClusterKind)

KIND_NAMES = {k: k.label for k in ClusterKind}

_BE64 = np.dtype(">u8")


def decode_u64_table(raw: bytes) -> np.ndarray:
    """Big-endian 64-bit table (L1, L2, refcount table) as native uint64."""
    return np.frombuffer(raw, dtype=_BE64).astype(np.uint64)


def encode_u64_table(table: np.ndarray) -> bytes:
    """Native 64-bit entries (L1, L2 words, refcount or bitmap table) as big-endian bytes."""
    return np.asarray(table, dtype=np.uint64).astype(_BE64).tobytes()


def l1_entries(l2_offsets: np.ndarray, copied: np.ndarray | bool = True) -> np.ndarray:
    """L1 entries for L2 table offsets (0 = unallocated); COPIED where ``copied`` and allocated."""
    offs = np.asarray(l2_offsets, dtype=np.uint64)
    if (offs & ~np.uint64(spec.L1E_OFFSET_MASK)).any():
        raise ValueError("L2 table offsets must be 512-byte aligned and below 2^56")
    flag = np.where(np.asarray(copied, dtype=bool) & (offs != 0),
                    np.uint64(spec.OFLAG_COPIED), np.uint64(0))
    return offs | flag


def l1_offsets(l1: np.ndarray) -> np.ndarray:
    """L2 table offsets of an L1 table (0 = unallocated)."""
    return l1 & np.uint64(spec.L1E_OFFSET_MASK)


@dataclass(frozen=True)
class L2Geometry:
    """What is needed to decode the L2 tables of one image."""

    cluster_bits: int
    extended: bool
    has_data_file: bool

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def entry_size(self) -> int:
        return spec.L2_ENTRY_SIZE_EXTENDED if self.extended else spec.L2_ENTRY_SIZE

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.entry_size

    @property
    def l2_bits(self) -> int:
        return self.l2_entries.bit_length() - 1

    @property
    def units_per_cluster(self) -> int:
        return spec.SUBCLUSTERS_PER_CLUSTER if self.extended else 1

    @property
    def unit_bits(self) -> int:
        return self.cluster_bits - (5 if self.extended else 0)

    @property
    def csize_shift(self) -> int:
        """Bit position of the compressed sector count (62 - (cluster_bits - 8))."""
        return 62 - (self.cluster_bits - 8)


@dataclass
class L2Units:
    """An L2 table (or a slice of it) decoded into per-unit arrays.

    One unit is a cluster (standard L2) or a subcluster (extended L2).
    ``host`` is the unit's host byte offset (in the data file when there is
    one) wherever ``offset_valid`` is set: DATA units, zero clusters that keep
    their host cluster (QEMU's ZERO_ALLOC) and unallocated subclusters of an
    allocated cluster (UNALLOCATED_ALLOC).  For COMPRESSED units it is the
    compressed stream's byte offset and ``csize`` its length in bytes.
    """

    kind: np.ndarray          # uint8
    host: np.ndarray          # uint64
    csize: np.ndarray         # uint64 (COMPRESSED units only, else 0)
    offset_valid: np.ndarray  # bool


def decode_l2(raw: bytes, geo: L2Geometry) -> tuple[np.ndarray, np.ndarray | None]:
    """Split a raw L2 table into its entry words (and subcluster bitmaps when extended)."""
    words = decode_u64_table(raw)
    if geo.extended:
        return words[0::2], words[1::2]
    return words, None


def encode_l2(entries: np.ndarray, bitmaps: np.ndarray | None = None) -> bytes:
    """A raw L2 table from its entry words (interleaved with the subcluster bitmaps when
    extended); the inverse of :func:`decode_l2`."""
    entries = np.asarray(entries, dtype=np.uint64)
    if bitmaps is None:
        return encode_u64_table(entries)
    bitmaps = np.asarray(bitmaps, dtype=np.uint64)
    if bitmaps.shape != entries.shape:
        raise ValueError("an extended L2 table needs one bitmap per entry")
    words = np.empty(entries.shape[0] * 2, dtype=np.uint64)
    words[0::2] = entries
    words[1::2] = bitmaps
    return encode_u64_table(words)


def compressed_descriptor(coffset: np.ndarray, nbytes: np.ndarray, geo: L2Geometry
                          ) -> np.ndarray:
    """L2 entries of compressed clusters: stream at byte ``coffset``, ``nbytes`` long.

    The descriptor stores the number of 512-byte sectors the stream touches,
    minus one, above the byte offset (QEMU's ``nb_csectors``); COPIED is never
    set on compressed clusters.
    """
    coffset = np.asarray(coffset, dtype=np.uint64)
    nbytes = np.asarray(nbytes, dtype=np.uint64)
    shift = geo.csize_shift
    if (coffset >> np.uint64(shift)).any():
        raise ValueError(f"compressed cluster offset does not fit in {shift} bits")
    if (nbytes == 0).any():
        raise ValueError("a compressed cluster has at least one byte")
    first = coffset >> np.uint64(9)
    last = (coffset + nbytes - np.uint64(1)) >> np.uint64(9)
    extra = last - first                       # additional sectors
    if (extra >> np.uint64(geo.cluster_bits - 8)).any():
        raise ValueError("compressed cluster too long for its descriptor")
    return (np.uint64(spec.OFLAG_COMPRESSED) | (extra << np.uint64(shift)) | coffset)


def subcluster_bitmap(alloc: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Extended L2 bitmap words from per-subcluster flags of shape (clusters, 32):
    bits 0-31 "allocated", bits 32-63 "reads as zero"."""
    bit = np.uint64(1) << np.arange(spec.SUBCLUSTERS_PER_CLUSTER, dtype=np.uint64)
    a = (np.asarray(alloc, dtype=bool) * bit).sum(axis=1, dtype=np.uint64)
    z = (np.asarray(zero, dtype=bool) * bit).sum(axis=1, dtype=np.uint64)
    return a | (z << np.uint64(32))


def encode_units(units: L2Units, geo: L2Geometry, copied: bool = True
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Entry words (and bitmaps) that :func:`classify` decodes into ``units``.

    The inverse of :func:`classify` for the units it returns: allocated
    clusters get COPIED when ``copied`` (what QEMU writes for clusters with
    refcount 1), compressed clusters never do.  INVALID units cannot be
    encoded (they are a decoding verdict, not a state).
    """
    kind = np.asarray(units.kind)
    if (kind == INVALID).any():
        raise ValueError("INVALID units have no encoding")
    # with an external data file COPIED is what marks data at host offset 0
    flag = np.uint64(spec.OFLAG_COPIED if copied or geo.has_data_file else 0)
    upc = geo.units_per_cluster
    n = kind.shape[0] // upc
    k = kind.reshape(n, upc)
    host = np.asarray(units.host, dtype=np.uint64).reshape(n, upc)[:, 0]
    has_off = np.asarray(units.offset_valid, dtype=bool).reshape(n, upc).any(axis=1)
    comp = k[:, 0] == COMPRESSED
    entries = np.where(has_off, host | flag, np.uint64(0))
    bitmaps: np.ndarray | None = None
    if geo.extended:
        bitmaps = np.where(comp, np.uint64(0), subcluster_bitmap(k == DATA, k == ZERO))
    else:
        entries = np.where(k[:, 0] == ZERO, entries | np.uint64(spec.OFLAG_ZERO), entries)
    if comp.any():
        csize = np.asarray(units.csize, dtype=np.uint64).reshape(n, upc)[comp, 0]
        entries[comp] = compressed_descriptor(host[comp], csize, geo)
    return entries, bitmaps


_U1 = np.uint64(1)


def classify(entries: np.ndarray, bitmaps: np.ndarray | None, geo: L2Geometry) -> L2Units:
    """Decode L2 entries into units, as QEMU's qcow2_get_subcluster_type classifies them.

    Standard L2 entries give one unit per cluster; extended ones 32 units,
    one per subcluster, with host offsets stepping by the subcluster size.
    With extended L2, a cluster whose bitmap is inconsistent (a subcluster
    both allocated and zero, or an allocated subcluster in a cluster without
    a host offset) is INVALID as a whole, as in QEMU.
    """
    offset = entries & np.uint64(spec.L2E_OFFSET_MASK)
    compressed = (entries >> np.uint64(62)) & _U1 != 0
    has_offset = offset != 0
    if geo.has_data_file:
        # Offset 0 is a valid data-file offset; COPIED disambiguates (QEMU does the same).
        has_offset |= (entries >> np.uint64(63)) != 0
    any_comp = bool(compressed.any())
    if any_comp:
        shift = np.uint64(geo.csize_shift)
        coffset = entries & np.uint64((1 << geo.csize_shift) - 1)
        nsect = ((entries >> shift) & np.uint64((1 << (geo.cluster_bits - 8)) - 1)) + _U1
        csize = np.where(compressed, nsect * np.uint64(512) - (coffset & np.uint64(511)),
                         np.uint64(0))

    if not geo.extended:
        zero = (entries & _U1) != 0
        kind = np.full(entries.shape, UNALLOCATED, dtype=np.uint8)
        kind[has_offset] = DATA
        kind[zero] = ZERO
        # A zero cluster keeps its offset only when the offset field itself is set.
        valid = has_offset & (~zero | (offset != 0))
        host = offset.copy()
        if any_comp:
            kind[compressed] = COMPRESSED
            valid &= ~compressed
            host[compressed] = coffset[compressed]
            return L2Units(kind, host, csize, valid)
        return L2Units(kind, host, np.zeros(entries.shape, np.uint64), valid)

    assert bitmaps is not None
    n = entries.shape[0]
    sc = spec.SUBCLUSTERS_PER_CLUSTER
    bit = np.arange(sc, dtype=np.uint64)
    alloc_bits = bitmaps & np.uint64(0xFFFFFFFF)
    zero_bits = bitmaps >> np.uint64(32)
    normal = has_offset & ~compressed
    invalid = np.where(normal, (alloc_bits & zero_bits) != 0, alloc_bits != 0) & ~compressed
    alloc = ((bitmaps[:, None] >> bit) & _U1).astype(bool)
    zero = ((zero_bits[:, None] >> bit) & _U1).astype(bool)
    kind = np.full((n, sc), UNALLOCATED, dtype=np.uint8)
    kind[zero] = ZERO
    kind[alloc] = DATA
    kind[invalid] = INVALID
    kind[compressed] = COMPRESSED
    sc_size = np.uint64(1 << (geo.cluster_bits - 5))
    host = offset[:, None] + bit * sc_size
    valid = np.repeat(normal[:, None], sc, axis=1) & (kind != INVALID)
    csz = np.zeros((n, sc), dtype=np.uint64)
    if any_comp:
        host[compressed] = coffset[compressed][:, None]
        csz[compressed] = csize[compressed][:, None]
    return L2Units(kind.reshape(n * sc), host.reshape(n * sc), csz.reshape(n * sc),
                   valid.reshape(n * sc))


def decode_refcount_block(raw: bytes, refcount_order: int) -> np.ndarray:
    """A refcount block as uint64 counts; widths below 8 bits are packed LSB first."""
    bits = 1 << refcount_order
    if bits >= 8:
        return np.frombuffer(raw, dtype=np.dtype(f">u{bits // 8}")).astype(np.uint64)
    packed = np.frombuffer(raw, dtype=np.uint8)
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    vals = (packed[:, None] >> shifts) & np.uint8((1 << bits) - 1)
    return vals.reshape(-1).astype(np.uint64)


def encode_refcount_block(counts: np.ndarray, refcount_order: int) -> bytes:
    """Refcounts as a refcount block of ``1 << refcount_order``-bit entries (the inverse of
    :func:`decode_refcount_block`); widths below 8 bits are packed LSB first."""
    bits = 1 << refcount_order
    counts = np.asarray(counts, dtype=np.uint64)
    if bits < 64 and (counts >> np.uint64(bits)).any():
        raise ValueError(f"refcount does not fit in {bits} bits")
    if bits >= 8:
        return counts.astype(np.dtype(f">u{bits // 8}")).tobytes()
    per_byte = 8 // bits
    if counts.shape[0] % per_byte:
        raise ValueError(f"{counts.shape[0]} refcounts do not fill whole bytes")
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    vals = counts.astype(np.uint8).reshape(-1, per_byte) << shifts
    return np.bitwise_or.reduce(vals, axis=1).astype(np.uint8).tobytes()


def count_nonzero_refcounts(raw: bytes, refcount_order: int, limit: int) -> int:
    """How many of the first ``limit`` entries of a refcount block are non-zero (no widening copy)."""
    bits = 1 << refcount_order
    if bits >= 8:
        vals = np.frombuffer(raw, dtype=np.dtype(f">u{bits // 8}"))
        return int(np.count_nonzero(vals[:limit]))
    return int(np.count_nonzero(decode_refcount_block(raw, refcount_order)[:limit]))


def run_boundaries(kind: np.ndarray, host: np.ndarray, step: int,
                   units_per_cluster: int = 1) -> np.ndarray:
    """Indices where a new run starts: kind changes, or a DATA unit is not host-contiguous.

    A COMPRESSED cluster is one run of its own (each is its own stream), and
    every INVALID unit is its own run.  ``kind`` must start at a cluster
    boundary.  The result starts with 0; runs are [b[i], b[i+1]).
    """
    n = kind.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    brk = np.empty(n, dtype=bool)
    brk[0] = True
    brk[1:] = kind[1:] != kind[:-1]
    data = kind[1:] == DATA
    brk[1:] |= data & (host[1:] != host[:-1] + np.uint64(step))
    cluster_start = (np.arange(1, n) % units_per_cluster) == 0
    brk[1:] |= (kind[1:] == COMPRESSED) & cluster_start
    brk[1:] |= kind[1:] == INVALID
    return np.flatnonzero(brk)
