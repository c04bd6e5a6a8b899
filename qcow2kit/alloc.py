"""A replay of QEMU's qcow2 cluster allocator: :class:`Allocator`.

Where a new cluster lands in a qcow2 file follows from a few routines of QEMU
7.2: ``qcow2_alloc_clusters`` and ``qcow2_alloc_clusters_at`` (the first free
run from ``free_cluster_index`` on), ``alloc_refcount_block`` (a new refcount
block, describing itself when it falls in its own range), ``qcow2_refcount_area``
(a bigger refcount table with self-describing blocks after the file's end),
and, from block/qcow2-cluster.c, L1 growth, L2 allocation and
``qcow2_alloc_host_offset`` with its copy-on-write.  :class:`Allocator` replays
them on a model of the image, one Python step per allocation run (never per
cluster): refcounts as a set of used runs (:class:`UsedClusters`), the refcount
table, the L1 table, where each L2 table is and which guest clusters map where,
and what the bytes of the file become (its length, the stale bytes a replaced
refcount table leaves behind, the zeros copy-on-write writes).

It only computes, it writes nothing: :mod:`qcow2kit.create` replays
``qemu-img create`` on it, :mod:`qcow2kit.builder` keeps allocating on it.
A request beyond QEMU's limits raises :class:`TooLargeError` (QEMU's -EFBIG).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from . import spec
from . import tables as T
from .errors import Qcow2Error

_INT_MAX = (1 << 31) - 1
_INT64_MAX = (1 << 63) - 1
_BDRV_REQUEST_MAX_BYTES = _INT_MAX & ~511          # BDRV_REQUEST_MAX_BYTES
_MAX_L1_ENTRIES = spec.MAX_L1_SIZE // 8             # QCOW_MAX_L1_SIZE / sizeof(uint64_t)
_MAX_REFTABLE = spec.MAX_REFTABLE_SIZE              # QCOW_MAX_REFTABLE_SIZE (compared as QEMU does)

#: what qemu-img says when the metadata would exceed QEMU's limits
EFBIG_MESSAGE = ("The image size is too large for file format 'qcow2' (try using a larger "
                 "cluster size)")


class TooLargeError(Qcow2Error, ValueError):
    """The image needs more metadata than QEMU allows (its ``-EFBIG``)."""


class _EAgain(Exception):
    """QEMU's -EAGAIN from alloc_refcount_block: metadata moved, search again."""


def _efbig() -> TooLargeError:
    return TooLargeError(EFBIG_MESSAGE)


class UsedClusters:
    """The set of clusters with refcount 1, as sorted disjoint half-open intervals.

    ``qemu-img create`` never shares a cluster, so a refcount is 0 or 1 and a set
    of runs describes every refcount block exactly.  (The builder keeps the extra
    references of host clusters shared by compressed streams beside it.)
    """

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        # when a list, every changed range [a, b) is recorded (the builder rewrites the
        # refcount blocks that cover them)
        self.touched: list[tuple[int, int]] | None = None

    def first_overlap(self, a: int, b: int) -> int | None:
        """Index of the first interval meeting [a, b), or None."""
        i = bisect.bisect_right(self.ends, a)
        if i < len(self.starts) and self.starts[i] < b:
            return i
        return None

    def contains(self, c: int) -> bool:
        return self.first_overlap(c, c + 1) is not None

    def add(self, a: int, b: int) -> None:
        if a >= b:
            return
        if self.first_overlap(a, b) is not None:
            raise AssertionError(f"cluster range [{a}, {b}) already in use")
        if self.touched is not None:
            self.touched.append((a, b))
        i = bisect.bisect_left(self.starts, a)
        if i > 0 and self.ends[i - 1] == a:
            self.ends[i - 1] = b
            if i < len(self.starts) and self.starts[i] == b:
                self.ends[i - 1] = self.ends[i]
                del self.starts[i], self.ends[i]
        elif i < len(self.starts) and self.starts[i] == b:
            self.starts[i] = a
        else:
            self.starts.insert(i, a)
            self.ends.insert(i, b)

    def remove(self, a: int, b: int) -> None:
        if self.touched is not None:
            self.touched.append((a, b))
        while True:
            i = self.first_overlap(a, b)
            if i is None:
                return
            s, e = self.starts[i], self.ends[i]
            del self.starts[i], self.ends[i]
            if s < a:
                self.starts.insert(i, s)
                self.ends.insert(i, a)
                i += 1
            if e > b:
                self.starts.insert(i, b)
                self.ends.insert(i, e)

    def free_run(self, start: int, n: int) -> int:
        """First p >= start with [p, p+n) free (the search of alloc_clusters_noref)."""
        p = start
        while True:
            i = self.first_overlap(p, p + n)
            if i is None:
                return p
            p = self.ends[i]

    def free_prefix(self, start: int, n: int) -> int:
        """How many clusters from ``start`` on (at most n) are free."""
        i = self.first_overlap(start, start + n)
        return n if i is None else max(0, self.starts[i] - start)

    def last_below(self, n: int) -> int:
        """The highest used cluster below n, or -1."""
        i = bisect.bisect_left(self.starts, n) - 1
        if i < 0:
            return -1
        return min(self.ends[i], n) - 1

    def runs_in(self, a: int, b: int) -> Iterator[tuple[int, int]]:
        i = bisect.bisect_right(self.ends, a)
        while i < len(self.starts) and self.starts[i] < b:
            yield max(self.starts[i], a), min(self.ends[i], b)
            i += 1


@dataclass
class Run:
    """Guest clusters [guest, guest+count) mapped to host clusters from ``host`` on."""

    guest: int
    host: int
    count: int


class Allocator:
    """A replay of the parts of QEMU's qcow2 driver that allocate clusters (those
    ``qemu-img create`` runs, which the builder keeps calling for new clusters).

    ``cluster_bits`` and ``refcount_order`` are the image's; ``extended_l2`` and
    ``has_data_file`` change the L2 geometry and where data clusters live.
    Sizes are in clusters unless named ``*_offset``/``*_bytes``.  The model
    keeps: refcounts (:class:`UsedClusters`), the refcount table, QEMU's
    ``free_cluster_index``, the L1 table, where each L2 table is and which guest
    clusters map where; and, for the bytes of the file, the length of the image
    and data files, the stale contents freed refcount tables leave behind and
    the zeros copy-on-write writes.
    """

    def __init__(self, cluster_bits: int, refcount_order: int, *, extended_l2: bool = False,
                 has_data_file: bool = False) -> None:
        self.cb = cluster_bits
        self.cs = 1 << cluster_bits
        self.order = refcount_order
        self.extended_l2 = extended_l2
        self.rb_bits = self.cb + 3 - self.order          # refcount_block_bits
        self.rb_size = 1 << self.rb_bits                  # entries per refcount block
        self.entry_size = 16 if extended_l2 else 8
        self.l2_size = self.cs // self.entry_size         # entries per L2 table (= slice)
        self.l2_bits = self.l2_size.bit_length() - 1
        self.sc_size = self.cs >> 5 if extended_l2 else self.cs
        self.has_data_file = has_data_file

        self.used = UsedClusters()
        self.free_index = 0
        self.reftable = np.zeros(self.cs // 8, dtype=np.uint64)
        self.reftable[0] = 2 * self.cs
        self.reftable_offset = self.cs
        self.max_rt_index = 0
        self.refblocks: set[int] = {2}                    # clusters holding refcount blocks
        self.l1 = np.zeros(0, dtype=np.uint64)
        self.l1_offset = 0
        self.l2_tables: dict[int, int] = {}               # l1 index -> L2 table cluster
        self.runs: list[Run] = []                        # guest -> host (sorted by guest)
        self.run_starts: list[int] = []
        # the files
        self.file_length = 3 * self.cs                    # header, reftable, refblock written
        self.data_length = 0
        self.stale: dict[int, bytearray] = {}             # freed clusters' remaining bytes
        self.zero_writes: list[tuple[int, int]] = []      # (offset, length), image file
        self.data_zero_writes: list[tuple[int, int]] = []
        self.fill: tuple[int, int, str] | None = None     # falloc/full range, image file
        self.data_fill: tuple[int, int, str] | None = None
        # when a list, a replaced refcount table is not freed but recorded here as
        # (offset, bytes): the builder frees it once the header points at the new one
        self.defer_free: list[tuple[int, int]] | None = None

    # -- writes -------------------------------------------------------------

    def _wrote(self, offset: int, length: int) -> None:
        """A write of whole clusters that end up holding live metadata."""
        self.file_length = max(self.file_length, offset + length)
        self._unstale(offset >> self.cb, (offset + length + self.cs - 1) >> self.cb)

    def _unstale(self, first: int, end: int) -> None:
        """Clusters [first, end) now hold something new: forget their stale bytes."""
        for c in [c for c in self.stale if first <= c < end]:
            del self.stale[c]

    def _zero_write(self, offset: int, length: int, data_file: bool) -> None:
        if length <= 0:
            return
        if data_file:
            self.data_zero_writes.append((offset, length))
            self.data_length = max(self.data_length, offset + length)
            return
        self.zero_writes.append((offset, length))
        self.file_length = max(self.file_length, offset + length)
        end = offset + length
        for c in [c for c in self.stale if offset >> self.cb <= c < -(-end // self.cs)]:
            a = max(offset, c << self.cb) - (c << self.cb)
            b = min(end, (c + 1) << self.cb) - (c << self.cb)
            self.stale[c][a:b] = bytes(b - a)

    # -- refcounts (block/qcow2-refcount.c) ----------------------------------

    def alloc_clusters_noref(self, n: int) -> int:
        p = self.used.free_run(self.free_index, n)
        self.free_index = p + n
        if self.free_index > 0 and self.free_index - 1 > (_INT64_MAX >> self.cb):
            raise _efbig()
        return p

    def update_refcount(self, offset: int, length: int, decrease: bool) -> None:
        """Add or drop one reference to every cluster of the byte range; raises _EAgain
        (after undoing what it did, as QEMU does) when a refcount block had to be made."""
        if length <= 0:
            return
        start = offset >> self.cb
        last = (offset + length - 1) >> self.cb
        c = start
        try:
            while c <= last:
                ti = c >> self.rb_bits
                try:
                    self.alloc_refcount_block(c)
                except _EAgain:
                    # the caller searches again, starting with the same clusters
                    self.free_index = min(self.free_index, start)
                    raise
                seg_end = min(last + 1, (ti + 1) << self.rb_bits)
                if decrease:
                    self.used.remove(c, seg_end)
                    self.free_index = min(self.free_index, c)
                else:
                    self.used.add(c, seg_end)
                c = seg_end
        except _EAgain:
            done = (c << self.cb) - offset
            if done > 0:
                try:
                    self.update_refcount(offset, done, not decrease)
                except _EAgain:   # pragma: no cover - the blocks of the undone range exist
                    pass
            raise

    def alloc_refcount_block(self, c: int) -> None:
        rti = c >> self.rb_bits
        if rti < self.reftable.shape[0] and int(self.reftable[rti]):
            return
        new_block = self.alloc_clusters_noref(1)
        if new_block >> self.rb_bits == rti:
            self.used.add(new_block, new_block + 1)        # describes itself
        else:
            self.update_refcount(new_block << self.cb, self.cs, False)
        self.refblocks.add(new_block)
        self._wrote(new_block << self.cb, self.cs)
        if rti < self.reftable.shape[0]:
            self.reftable[rti] = new_block << self.cb
            self.max_rt_index = max(self.max_rt_index, rti)
            raise _EAgain()
        blocks_used = -(-max(c + 1, new_block + 1) // self.rb_size)
        meta_offset = blocks_used * self.rb_size * self.cs
        self.refcount_area(meta_offset, 0, False, rti, new_block << self.cb)
        raise _EAgain()

    def refcount_counts(self, rti: int) -> np.ndarray:
        """The refcounts (0 or 1) of the clusters refcount block ``rti`` describes."""
        counts = np.zeros(self.rb_size, dtype=np.uint64)
        first = rti * self.rb_size
        for s, e in self.used.runs_in(first, first + self.rb_size):
            counts[s - first:e - first] = 1
        return counts

    def refcount_metadata_size(self, clusters: int, generous: bool) -> int:
        """Number of refcount blocks (qcow2_refcount_metadata_size's refblock_count)."""
        per_table_cluster = self.cs // 8
        table = blocks = n = 0
        while True:
            last = n
            blocks = -(-(clusters + table + blocks) // self.rb_size)
            table = -(-blocks // per_table_cluster)
            n = clusters + blocks + table
            if n == last and generous:
                clusters += -(-table // 2)
                n = 0
                generous = False
                continue
            if n == last:
                return blocks

    def refcount_area(self, start_offset: int, additional: int, exact: bool,
                      new_index: int, new_offset: int) -> int:
        """New self-describing refcount structures from ``start_offset`` on; the end offset."""
        cs = self.cs
        total = self.refcount_metadata_size(start_offset // cs + additional, not exact)
        if total > _MAX_REFTABLE:
            raise _efbig()
        area_index = (start_offset // cs) // self.rb_size
        table_size = total if exact else total + -(-total // 2)
        per = cs // 8
        table_size = -(-table_size // per) * per
        table_clusters = table_size * 8 // cs
        if table_size > _MAX_REFTABLE:
            raise _efbig()
        new = np.zeros(table_size, dtype=np.uint64)
        if table_size > self.max_rt_index:
            keep = self.max_rt_index + 1
        else:
            keep = table_size
        new[:keep] = self.reftable[:keep]
        if new_offset:
            new[new_index] = new_offset
        missing = np.flatnonzero(new[area_index:total] == 0) + area_index
        table_offset = start_offset + missing.shape[0] * cs
        end_offset = table_offset + table_clusters * cs
        new[missing] = (start_offset + np.arange(missing.shape[0], dtype=np.uint64) * cs
                        ).astype(np.uint64)
        first_c = start_offset // cs
        for c in range(first_c, first_c + missing.shape[0]):
            self.refblocks.add(c)
        # every new structure has refcount 1 (from start_offset to end_offset)
        self.used.add(first_c, end_offset // cs)
        if missing.shape[0]:
            self._wrote(start_offset, missing.shape[0] * cs)
        self._wrote(table_offset, table_clusters * cs)
        old_offset, old_table = self.reftable_offset, self.reftable
        self.reftable = new
        self.reftable_offset = table_offset
        nz = np.flatnonzero(new)
        self.max_rt_index = int(nz[-1]) if nz.shape[0] else 0
        # the old table stays in the file as it was, until something overwrites it
        old_bytes = T.encode_u64_table(old_table)
        for k in range(old_bytes.__len__() // cs):
            self.stale[(old_offset >> self.cb) + k] = bytearray(old_bytes[k * cs:(k + 1) * cs])
        if self.defer_free is not None:
            self.defer_free.append((old_offset, old_table.shape[0] * 8))
        else:
            self.free_clusters(old_offset, old_table.shape[0] * 8)
        return end_offset

    def free_clusters(self, offset: int, length: int) -> None:
        try:
            self.update_refcount(offset, length, True)
        except _EAgain:   # pragma: no cover - QEMU only logs a failed free
            pass

    def alloc_clusters(self, nbytes: int) -> int:
        """qcow2_alloc_clusters: a byte offset of ``nbytes`` worth of new clusters."""
        n = -(-nbytes // self.cs)
        while True:
            p = self.alloc_clusters_noref(n)
            try:
                self.update_refcount(p << self.cb, n * self.cs, False)
            except _EAgain:
                continue
            return p << self.cb

    def alloc_clusters_at(self, offset: int, n: int) -> int:
        """qcow2_alloc_clusters_at: how many of the n clusters at ``offset`` were free."""
        if n == 0:
            return 0
        while True:
            i = self.used.free_prefix(offset >> self.cb, n)
            try:
                self.update_refcount(offset, i << self.cb, False)
            except _EAgain:
                continue
            return i

    def last_cluster(self, file_size: int) -> int:
        return self.used.last_below(-(-file_size // self.cs))

    # -- L1 and L2 (block/qcow2-cluster.c) -----------------------------------

    def grow_l1(self, min_size: int) -> None:
        if min_size <= self.l1.shape[0]:
            return
        if min_size > _INT_MAX // 8 or min_size > _MAX_L1_ENTRIES:
            raise _efbig()
        off = self.alloc_clusters(8 * min_size)
        self.l1 = np.zeros(min_size, dtype=np.uint64)
        self.l1_offset = off
        self.file_length = max(self.file_length, off + 8 * min_size)
        # the L1 table covers whole clusters only up to its last entry
        self._unstale(off >> self.cb, (off + 8 * min_size) >> self.cb)

    def get_cluster_table(self, guest: int) -> int:
        l1_index = guest >> (self.cb + self.l2_bits)
        if l1_index not in self.l2_tables:
            off = self.alloc_clusters(self.cs)
            self._wrote(off, self.cs)
            self.l2_tables[l1_index] = off >> self.cb
            self.l1[l1_index] = np.uint64(off | spec.OFLAG_COPIED)
        return l1_index

    def _slice_left(self, guest: int) -> int:
        return self.l2_size - ((guest >> self.cb) & (self.l2_size - 1))

    def alloc_host_offset(self, offset: int, nbytes: int) -> tuple[int, int]:
        """qcow2_alloc_host_offset for a fresh (unallocated) range: (host offset, bytes done).

        Links the L2 entries and does the copy-on-write of the new clusters
        right away (qcow2_handle_l2meta, as preallocate_co does after each call).
        """
        cs = self.cs
        start = offset
        remaining = nbytes
        cluster_offset: int | None = None
        host_offset: int | None = None
        metas: list[tuple[int, int, int, int]] = []   # guest, host, clusters, bytes
        cur = 0
        while True:
            if host_offset is None and cluster_offset is not None:
                host_offset = cluster_offset
            start += cur
            remaining -= cur
            if cluster_offset is not None:
                cluster_offset += cur
            if remaining == 0:
                break
            cur = remaining
            # handle_copied: loads (allocating) the L2 table; fresh entries need allocation
            self.get_cluster_table(start)
            # handle_alloc
            oic = start & (cs - 1)
            n = -(-(oic + cur) // cs)
            n = min(n, _BDRV_REQUEST_MAX_BYTES >> self.cb, self._slice_left(start))
            if self.has_data_file:
                alloc = start - oic
            elif cluster_offset is None:
                alloc = self.alloc_clusters(n * cs)
            else:
                alloc = cluster_offset - (cluster_offset & (cs - 1))
                n = self.alloc_clusters_at(alloc, n)
                if n == 0:
                    break
            nb = min(oic + cur, n * cs)
            cluster_offset = alloc + oic
            cur = min(cur, nb - oic)
            metas.append((start - oic, alloc, n, oic + cur))
        done = nbytes - remaining
        assert host_offset is not None and done > 0
        for guest, host, n, end_in_run in metas:
            self._link(guest, host, n, end_in_run)
        return host_offset, done

    def _link(self, guest: int, host: int, n: int, written_end: int) -> None:
        """qcow2_alloc_cluster_link_l2 of a preallocated run: COW of the tail, then entries."""
        cow_to = -(-written_end // self.sc_size) * self.sc_size
        self._zero_write(host + written_end, cow_to - written_end, self.has_data_file)
        self._add_run(guest, host, n)

    def _add_run(self, guest: int, host: int, n: int) -> None:
        self.runs.append(Run(guest >> self.cb, host >> self.cb, n))
        self.run_starts.append(guest >> self.cb)

    # -- qcow2_co_truncate ----------------------------------------------------

    def truncate(self, size: int, prealloc: str) -> None:
        shift = self.cb + self.l2_bits
        self.grow_l1((size + (1 << shift) - 1) >> shift)
        if prealloc == "off":
            if self.has_data_file:
                self.data_length = size
        elif prealloc == "metadata" or self.has_data_file:
            self.preallocate(size, prealloc)
        else:
            self.preallocate_image(size, prealloc)

    def preallocate(self, size: int, mode: str) -> None:
        """preallocate_co from 0 to ``size``."""
        offset = 0
        remaining = size
        host = cur = 0
        step = _INT_MAX - (_INT_MAX % self.cs)
        while remaining:
            host, cur = self.alloc_host_offset(offset, min(remaining, step))
            remaining -= cur
            offset += cur
        end = host + cur
        if self.has_data_file:
            if end > self.data_length:
                if mode != "metadata":
                    self.data_fill = (self.data_length, end, mode)
                self.data_length = end
        elif end > self.file_length:
            self.file_length = end

    def preallocate_image(self, size: int, mode: str) -> None:
        """The falloc/full branch of qcow2_co_truncate (no external data file)."""
        cs = self.cs
        last = self.last_cluster(self.file_length)
        old_file_size = (last + 1) * cs if last >= 0 else -(-self.file_length // cs) * cs
        nb_data = -(-size // cs)
        nb_l2 = -(-nb_data // self.l2_size) + 1
        allocation_start = self.refcount_area(old_file_size, nb_data + nb_l2, True, 0, 0)
        got = self.alloc_clusters_at(allocation_start, nb_data)
        assert got == nb_data
        new_file_size = allocation_start + nb_data * cs
        if new_file_size > self.file_length:
            self.fill = (self.file_length, new_file_size, mode)
            self.file_length = new_file_size
        host = allocation_start
        guest = 0
        left = nb_data
        while left:
            n = min(left, self._slice_left(guest))
            self.get_cluster_table(guest)
            self._add_run(guest, host, n)
            guest += n * cs
            host += n * cs
            left -= n
