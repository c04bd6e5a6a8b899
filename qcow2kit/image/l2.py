"""L2 tables: the one reader, its validation, and the table cache.

Every L2 read of the package goes through :class:`L2Reader`: a single table
for random access (:meth:`L2Reader.table`, through the byte-bounded LRU
cache, as QEMU's qcow2-cache.c keeps tables), a batch of tables under a range
of L1 entries with one pread per run of back-to-back tables
(:meth:`L2Reader.read_tables`, uncached: a scan would only flush the cache),
or a slice of one table (:meth:`L2Reader.read_slice`).  :meth:`check_units`
refuses the entries QEMU refuses (``qcow2_get_host_offset`` and friends).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from .. import spec
from .. import tables as T
from ..errors import CorruptImageError
from ..source import ByteSource
from .header import Header

DEFAULT_L2_CACHE_BYTES = 4 * 1024 * 1024

#: Entry words and subcluster bitmaps (None unless extended) of one L2 table.
Table = tuple[np.ndarray, np.ndarray | None]


class TablePart(NamedTuple):
    """Entries of one L2 table as read: the L1 index, entry words, bitmaps, index of the first entry."""

    l1_index: int
    entries: np.ndarray
    bitmaps: np.ndarray | None
    first: int


class Segment(NamedTuple):
    """A guest range of one kind, as resolved by :meth:`Image.segments`.

    ``host`` is the byte offset of the data (in the data file when the image
    has one) for DATA; for COMPRESSED the offset of the compressed stream,
    with ``csize`` its length and ``skip`` the offset of ``guest`` inside the
    decompressed cluster.
    """

    guest: int
    length: int
    kind: T.ClusterKind
    host: int = 0
    csize: int = 0
    skip: int = 0


class L2Cache:
    """Decoded L2 tables by host offset, least recently used first, within ``budget`` bytes."""

    def __init__(self, budget: int, table_bytes: int) -> None:
        self.budget = max(budget, table_bytes)      # at least one table
        self.table_bytes = table_bytes
        self.tables: OrderedDict[int, Table] = OrderedDict()
        self.used = 0

    def get(self, offset: int) -> Table | None:
        table = self.tables.get(offset)
        if table is not None:
            self.tables.move_to_end(offset)
        return table

    def put(self, offset: int, table: Table) -> None:
        while self.tables and self.used + self.table_bytes > self.budget:
            self.tables.popitem(last=False)
            self.used -= self.table_bytes
        self.tables[offset] = table
        self.used += self.table_bytes

    def clear(self) -> None:
        self.tables.clear()
        self.used = 0


class L2Reader:
    """The L1 table and the L2 tables of one image file.

    The L1 table is the active one (the header's ``l1_table_offset`` and
    ``l1_size``) unless ``l1`` gives another (offset, entries): an internal
    snapshot's, already validated by the caller.
    """

    def __init__(self, src: ByteSource, header: Header, geometry: T.L2Geometry, filename: str,
                 cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
                 l1: tuple[int, int] | None = None) -> None:
        self.src = src
        self.header = header
        self.l1_table_offset, self.l1_size = \
            (header.l1_table_offset, header.l1_size) if l1 is None else l1
        self.geometry = geometry
        self.filename = filename
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.cache = L2Cache(cache_bytes, self.cluster_size)
        self._l1: np.ndarray | None = None

    @property
    def l1(self) -> np.ndarray:
        """The L1 table as uint64 entries (read on first use)."""
        if self._l1 is None:
            n = self.l1_size
            raw = self.src.read_at(self.l1_table_offset, n * 8, field="L1 table") if n else b""
            self._l1 = T.decode_u64_table(raw)
        return self._l1

    def clear(self) -> None:
        self._l1 = None
        self.cache.clear()

    # -- reading -------------------------------------------------------------

    def _misaligned(self, l1_index: int, l2_off: int) -> CorruptImageError:
        return CorruptImageError(f"L2 table offset {l2_off:#x} is not cluster aligned (L1 "
                                 f"index {l1_index})", field="l1_table_offset",
                                 offset=self.l1_table_offset + 8 * l1_index
                                 ).locate(self.filename)

    def _split(self, words: np.ndarray) -> Table:
        if self.geometry.extended:
            return words[0::2], words[1::2]
        return words, None

    def table(self, l1_index: int) -> Table | None:
        """Entry words (and subcluster bitmaps) of the L2 table under ``l1_index``, or None (cached)."""
        l1 = self.l1
        if l1_index >= l1.shape[0]:
            return None
        l2_off = int(l1[l1_index]) & spec.L1E_OFFSET_MASK
        if l2_off == 0:
            return None
        cached = self.cache.get(l2_off)
        if cached is not None:
            return cached
        part = self.read_tables(l1_index, l1_index + 1)[0]
        table = (part.entries, part.bitmaps)
        self.cache.put(l2_off, table)
        return table

    def read_tables(self, l1_lo: int, l1_hi: int) -> list[TablePart]:
        """The L2 tables under L1 entries [l1_lo, l1_hi), uncached.

        Tables that lie back to back in the file are read with one pread;
        unallocated L1 entries cost nothing.  Past the end of the file, QEMU
        reads a table as zeros (unallocated entries), and so does this.
        """
        l1 = self.l1
        hi = min(l1_hi, l1.shape[0])
        if l1_lo >= hi:
            return []
        offs = (l1[l1_lo:hi] & np.uint64(spec.L1E_OFFSET_MASK)).astype(np.int64)
        idx = np.flatnonzero(offs)
        if idx.shape[0] == 0:
            return []
        cs = self.cluster_size
        o = offs[idx]
        bad = np.flatnonzero(o % cs)
        if bad.shape[0]:
            raise self._misaligned(int(idx[bad[0]]) + l1_lo, int(o[bad[0]]))
        brk = np.flatnonzero((np.diff(o) != cs) | (np.diff(idx) != 1)) + 1
        starts = np.concatenate(([0], brk))
        stops = np.concatenate((brk, [o.shape[0]]))
        per = cs // 8
        out: list[TablePart] = []
        for a, b in zip(starts.tolist(), stops.tolist()):
            raw = self.src.read_padded(int(o[a]), (b - a) * cs, field="L2 table")
            words = T.decode_u64_table(raw)
            for k in range(b - a):
                entries, bitmaps = self._split(words[k * per:(k + 1) * per])
                out.append(TablePart(int(idx[a + k]) + l1_lo, entries, bitmaps, 0))
        return out

    def read_slice(self, l1_index: int, first: int, stop: int) -> list[TablePart]:
        """Entries [first, stop) of the L2 table under ``l1_index`` (none if unallocated), uncached.

        Only the bytes of those entries are read, so a window smaller than a
        table's span costs memory for its own entries alone.
        """
        l1 = self.l1
        if l1_index >= l1.shape[0]:
            return []
        l2_off = int(l1[l1_index]) & spec.L1E_OFFSET_MASK
        if l2_off == 0:
            return []
        if l2_off % self.cluster_size:
            raise self._misaligned(l1_index, l2_off)
        es = self.geometry.entry_size
        raw = self.src.read_padded(l2_off + first * es, (stop - first) * es, field="L2 table")
        entries, bitmaps = self._split(T.decode_u64_table(raw))
        return [TablePart(l1_index, entries, bitmaps, first)]

    # -- validation ----------------------------------------------------------

    def error(self, l1_index: int, guest: int, fld: str, what: str) -> CorruptImageError:
        """A CorruptImageError pointing at the L2 entry (or its bitmap word) of ``guest``."""
        geo = self.geometry
        l2_index = (guest >> self.cluster_bits) & (geo.l2_entries - 1)
        entry = (int(self.l1[l1_index]) & spec.L1E_OFFSET_MASK) + l2_index * geo.entry_size
        if fld == "l2 bitmap":
            entry += 8
        return CorruptImageError(f"{what} (L1 index {l1_index}, L2 index {l2_index})",
                                 field=fld, offset=entry).locate(self.filename)

    def check_units(self, l1_index: int, c0: int, entries: np.ndarray, units: T.L2Units) -> None:
        """Refuse L2 entries QEMU refuses (``qcow2_get_host_offset`` and friends).

        ``entries`` are the entry words of clusters ``c0..`` of the L2 table
        under ``l1_index`` and ``units`` their classification.  Raises
        :class:`CorruptImageError` naming the first bad entry.
        """
        geo = self.geometry
        hdr = self.header
        cb = self.cluster_bits
        upc = geo.units_per_cluster
        n = entries.shape[0]
        base = l1_index << (cb + geo.l2_bits)

        def fail(ci: int, fld: str, what: str) -> None:
            g = base + ((c0 + ci) << cb)
            raise self.error(l1_index, g, fld, what)

        invalid = units.kind == T.INVALID
        if invalid.any():
            ci = int(np.flatnonzero(invalid)[0]) // upc
            fail(ci, "l2 bitmap", f"invalid subcluster state at guest offset "
                                  f"{base + ((c0 + ci) << cb):#x}")
        comp = (entries & np.uint64(spec.OFLAG_COMPRESSED)) != 0
        if hdr.has_data_file and comp.any():
            fail(int(np.flatnonzero(comp)[0]), "l2 entry",
                 "compressed cluster in an image with an external data file")
        if hdr.version < 3 and not geo.extended:
            zero = ((entries & np.uint64(spec.OFLAG_ZERO)) != 0) & ~comp
            if zero.any():
                fail(int(np.flatnonzero(zero)[0]), "l2 entry",
                     "zero cluster entry in a version 2 image")
        valid = units.offset_valid.reshape(n, upc).any(axis=1) if upc > 1 else units.offset_valid
        if valid.any():
            coff = entries & np.uint64(spec.L2E_OFFSET_MASK)
            bad = valid & ((coff & np.uint64(self.cluster_size - 1)) != 0)
            if bad.any():
                ci = int(np.flatnonzero(bad)[0])
                fail(ci, "l2 entry", f"cluster offset {int(coff[ci]):#x} is not aligned to "
                                     f"the cluster size")
            if hdr.has_data_file:
                guest = (np.arange(c0, c0 + n, dtype=np.uint64) << np.uint64(cb)) + np.uint64(base)
                bad = valid & (coff != guest)
                if bad.any():
                    ci = int(np.flatnonzero(bad)[0])
                    fail(ci, "l2 entry", f"external data file offset {int(coff[ci]):#x} does "
                                         f"not match the guest offset {int(guest[ci]):#x}")
