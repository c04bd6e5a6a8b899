"""The extent map: memory-bounded batch scanning of L1/L2 tables, merged like ``qemu-img map``.

A scan walks the guest range in windows.  Each window covers a batch of L1
entries of the top image, sized so that the L2 tables and the per-unit
working arrays of every layer stay within the memory budget; L2 tables of
a batch that lie back to back in the file are read with one pread, and
unallocated L1 entries cost no read at all.  Each window is decoded with
numpy into runs, the runs a layer does not allocate are resolved in its
backing file (depth + 1) by the chain's one resolver
(:func:`qcow2kit.image.chain.resolve`), and the result is merged by qemu-img map's rules:
adjacent extents merge when depth, present, zero, data (and here compressed)
agree and host offsets, if any, are contiguous.

The status of a range in one layer follows QEMU 7.2's
``qcow2_co_block_status`` and the generic ``bdrv_co_block_status``:

====================  =====================================================
cluster / subcluster  flags
====================  =====================================================
normal                present, data, offset
zero, keeps cluster   present, zero, offset
zero                  present, zero
compressed            present, data, compressed (no offset)
unallocated           resolved in the backing file; with none, or past its
                      end: zero (and the offset, for an unallocated
                      subcluster of an allocated cluster), not present
====================  =====================================================

Like QEMU, an image that looks metadata-preallocated (some 10 % more
clusters in use than the file has clusters' worth of allocated blocks, see
:func:`detect_metadata_preallocation`) has the holes of its file reported
as zero inside normal clusters; raw backing files report their holes as
zero the same way.  Encrypted images report no host offsets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np

from . import tables as T
from .image import Image, RawImage
from .image.chain import (FLAG_COMPRESSED, FLAG_DATA, FLAG_FALLTHROUGH, FLAG_OFFSET,
                          FLAG_PRESENT, FLAG_ZERO, KIND_FLAGS, resolve)
from .image.chain import RUN_DTYPE as EXTENT_DTYPE
from .image.refcounts import clusters_in_use

# EXTENT_DTYPE (one extent: a guest range with uniform status) and the FLAG_* bits are
# the chain resolver's runs (qcow2kit.image.chain), merged.
__all__ = ["EXTENT_DTYPE", "FLAG_COMPRESSED", "FLAG_DATA", "FLAG_OFFSET", "FLAG_PRESENT",
           "FLAG_ZERO", "MERGE_FLAGS", "DEFAULT_MEMORY", "MIN_MEMORY", "Extent", "merge",
           "detect_metadata_preallocation", "check_memory", "resolved_batches", "map_batches",
           "map_extents", "iter_extents", "layer_filenames"]

#: Flags that must agree for two adjacent extents to merge.
#: (Not FLAG_COMPRESSED: qemu-img 7.2's entry_mergeable has no such field. Compressed
#: data carries no offset, so it only ever meets another offset-less data extent.)
MERGE_FLAGS = FLAG_PRESENT | FLAG_ZERO | FLAG_DATA | FLAG_OFFSET

DEFAULT_MEMORY = 32 * 1024 * 1024
#: Bytes of working memory per decoded unit (L2 entry words plus the numpy
#: temporaries of decoding, overlaying and merging), measured with tracemalloc.
BYTES_PER_UNIT = 320


class Extent(NamedTuple):
    """One merged extent, as a Python object (see :data:`EXTENT_DTYPE` for the bulk form)."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    compressed: bool
    kind: int

    @classmethod
    def from_row(cls, row: np.void) -> "Extent":
        f = int(row["flags"])
        return cls(int(row["start"]), int(row["length"]), int(row["depth"]),
                   bool(f & FLAG_PRESENT), bool(f & FLAG_ZERO), bool(f & FLAG_DATA),
                   int(row["offset"]) if f & FLAG_OFFSET else None,
                   bool(f & FLAG_COMPRESSED), int(row["kind"]))

    def as_qemu(self) -> dict:
        """The object ``qemu-img map --output=json`` (7.2) prints for this extent."""
        d = {"start": self.start, "length": self.length, "depth": self.depth,
             "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            d["offset"] = self.offset
        return d


# --------------------------------------------------------------------------- helpers


def _runs(start: np.ndarray, length: np.ndarray, offset: np.ndarray, flags: np.ndarray,
          kind: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Pack parallel arrays into an EXTENT_DTYPE array."""
    out = np.empty(start.shape[0], dtype=EXTENT_DTYPE)
    out["start"] = start
    out["length"] = length
    out["offset"] = offset
    out["flags"] = flags
    out["kind"] = kind
    out["depth"] = depth
    return out


def merge(ext: np.ndarray) -> np.ndarray:
    """Merge adjacent extents by qemu-img map's rules (vectorized).

    Two neighbours merge when depth and the flags in :data:`MERGE_FLAGS` are
    equal and, where they carry an offset, the second's offset continues the
    first.  ``ext`` must be sorted and gap-free.
    """
    n = ext.shape[0]
    if n <= 1:
        return ext
    flags = ext["flags"] & np.uint8(MERGE_FLAGS)
    same = (flags[1:] == flags[:-1]) & (ext["depth"][1:] == ext["depth"][:-1])
    has_off = (flags[1:] & np.uint8(FLAG_OFFSET)) != 0
    contiguous = ext["offset"][1:] == ext["offset"][:-1] + ext["length"][:-1]
    same &= ~has_off | contiguous
    if same.all():
        out = ext[:1].copy()
        out["length"] = ext["start"][-1] + ext["length"][-1] - ext["start"][0]
        return out
    heads = np.flatnonzero(np.concatenate(([True], ~same)))
    out = ext[heads].copy()
    ends = np.empty(heads.shape[0], dtype=np.uint64)
    ends[:-1] = ext["start"][heads[1:]]
    ends[-1] = ext["start"][-1] + ext["length"][-1]
    out["length"] = ends - out["start"]
    return out


def _file_data_regions(fd: int, size: int, cap: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray] | None:
    """Data regions of a file (SEEK_DATA/SEEK_HOLE), as sorted start and end arrays.

    Returns None when the file has more than ``cap`` regions (the caller
    then looks regions up per window instead of holding them all).
    """
    starts: list[int] = []
    ends: list[int] = []
    pos = 0
    while pos < size:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break  # ENXIO: only a hole remains
        h = os.lseek(fd, d, os.SEEK_HOLE)
        starts.append(d)
        ends.append(h)
        if cap is not None and len(starts) > cap:
            return None
        pos = h
    return np.asarray(starts, dtype=np.uint64), np.asarray(ends, dtype=np.uint64)


def _regions_for(fd: int, offsets: np.ndarray, ends: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The file's data regions that intersect any of the host ranges [offsets, ends).

    Ranges are visited in host order with a cursor on the current region, so
    the lseek calls are about two per region met plus one per range that
    starts past the cursor; memory is proportional to the ranges, not to the
    file's fragmentation.
    """
    order = np.argsort(offsets, kind="stable")
    big = 1 << 63
    d = h = -1
    starts: list[int] = []
    stops: list[int] = []

    def seek(pos: int) -> tuple[int, int]:
        try:
            nd = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return big, big
        return nd, os.lseek(fd, nd, os.SEEK_HOLE)

    for o, e in zip(offsets[order].tolist(), ends[order].tolist()):
        if o >= h:
            d, h = seek(o)
        while d < e:
            if not starts or starts[-1] != d:
                starts.append(d)
                stops.append(h)
            if h >= e:
                break
            d, h = seek(h)
    return np.asarray(starts, dtype=np.uint64), np.asarray(stops, dtype=np.uint64)


def _split_by_holes(ext: np.ndarray, mask: np.ndarray, ds: np.ndarray, de: np.ndarray,
                    *, hole_clears_data: bool = False) -> np.ndarray:
    """Split the extents selected by ``mask`` at file data/hole boundaries; holes get FLAG_ZERO.

    Offsets are host offsets into the file whose data regions are [ds, de).
    Past the end of the file counts as a hole (QEMU: EOF reads as zero).
    A qcow2 layer keeps FLAG_DATA on a hole (QEMU adds the file's ZERO to the
    qcow2 status); a raw layer's status is the file's own, so with
    ``hole_clears_data`` a hole loses FLAG_DATA.
    """
    if not mask.any():
        return ext
    # Boundaries of the file's regions, as sorted points: region i is data between
    # ds[i] and de[i], hole otherwise.
    points = np.empty(ds.shape[0] * 2, dtype=np.uint64)
    points[0::2] = ds
    points[1::2] = de
    sel = np.flatnonzero(mask)
    off = ext["offset"][sel]
    end = off + ext["length"][sel]
    # Points strictly inside (off, end) cut the extent.
    lo = np.searchsorted(points, off, side="right")
    hi = np.searchsorted(points, end, side="left")
    ncut = np.maximum(hi - lo, 0)
    pieces = ncut + 1
    total = int(pieces.sum())
    rep = np.repeat(np.arange(sel.shape[0]), pieces)
    # Piece k of extent j starts at off[j] (k = 0) or points[lo[j] + k - 1].
    first = np.zeros(total, dtype=bool)
    first[np.cumsum(pieces) - pieces] = True
    k = np.arange(total) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    pidx = np.repeat(lo, pieces) + k - 1
    pstart = np.where(first, np.repeat(off, pieces),
                      points[np.clip(pidx, 0, max(points.shape[0] - 1, 0))]
                      if points.shape[0] else np.repeat(off, pieces))
    pend = np.empty(total, dtype=np.uint64)
    pend[:-1] = pstart[1:]
    last = np.cumsum(pieces) - 1
    pend[last] = end
    # A piece is data when the number of points <= its start is odd.
    in_data = (np.searchsorted(points, pstart, side="right") % 2) == 1
    src = ext[sel][rep]
    src["start"] = src["start"] + (pstart - src["offset"])
    src["length"] = pend - pstart
    src["offset"] = pstart
    hole_flags = src["flags"] | np.uint8(FLAG_ZERO)
    if hole_clears_data:
        hole_flags &= np.uint8(~FLAG_DATA & 0xFF)
    src["flags"] = np.where(in_data, src["flags"], hole_flags)
    # Reassemble in guest order: untouched extents plus the pieces.
    keep = ext[~mask]
    out = np.concatenate((keep, src))
    return out[np.argsort(out["start"], kind="stable")]


# --------------------------------------------------------------------------- layers


@dataclass
class _Layer:
    """Per-image state of a scan: the image and what block status needs (a chain layer for
    :func:`~qcow2kit.image.chain.resolve`)."""

    img: Image | RawImage
    backing: "_Layer | None"
    prealloc: bool = False
    #: most data regions of the file held at once (from the memory budget)
    region_cap: int = 1 << 16
    regions: tuple[np.ndarray, np.ndarray] | None = None
    fragmented: bool = False

    @property
    def size(self) -> int:
        return self.img.size

    def runs(self, w0: int, w1: int) -> np.ndarray:
        return _layer_runs(self, w0, w1)

    def _fd(self) -> int:
        src = self.img.src if isinstance(self.img, RawImage) else self.img.data_source
        fd = getattr(src, "fd", None)
        return fd if fd is not None else getattr(src, "_pread").fd

    def split_by_holes(self, runs: np.ndarray, mask: np.ndarray, *,
                       hole_clears_data: bool = False) -> np.ndarray:
        """:func:`_split_by_holes` with this layer's file regions.

        The whole file's region list is kept while it has at most
        ``region_cap`` regions; a more fragmented file has its regions looked
        up per window, for the masked runs only.
        """
        if not mask.any():
            return runs
        if self.regions is None and not self.fragmented:
            src = self.img.src if isinstance(self.img, RawImage) else self.img.data_source
            self.regions = _file_data_regions(self._fd(), src.size, self.region_cap)
            self.fragmented = self.regions is None
        if self.regions is not None:
            ds, de = self.regions
        else:
            sel = runs[mask]
            ds, de = _regions_for(self._fd(), sel["offset"], sel["offset"] + sel["length"])
        return _split_by_holes(runs, mask, ds, de, hole_clears_data=hole_clears_data)


def detect_metadata_preallocation(img: Image) -> bool:
    """QEMU 7.2's ``qcow2_detect_metadata_preallocation`` (block/qcow2-refcount.c).

    ``stored`` is the file's allocation (``st_blocks * 512``, what file-posix
    reports as its allocated size) in whole clusters, rounded down, and the
    threshold is ``max(stored * 10 // 9, stored + 2)``.  The count is of the
    clusters below the end of the file (rounded up to a cluster) whose
    refcount is not zero: every cluster in use, whoever references it (the
    header, L1/L2 tables, refcount structures, the snapshot table and the
    clusters only snapshots reference, data).  The image counts as
    preallocated as soon as the count *reaches* the threshold (QEMU loops
    while ``cluster_count < threshold`` and returns ``cluster_count >=
    threshold``).  ``qcow2_co_block_status`` then sets BDRV_BLOCK_RECURSE on
    data with an offset, and ``bdrv_co_block_status`` adds the file's ZERO
    (a hole, or past EOF) to it.

    Refcounts are looked up as ``qcow2_get_refcount`` does, which is more
    lenient than :meth:`Image.refcount_blocks`: a refcount block past the end
    of the file reads as zeros (a truncated image), and an unaligned one is
    an error, after which QEMU takes the image as not preallocated.
    """
    cs = img.cluster_size
    try:
        real_allocation = os.fstat(img.src.fd).st_blocks * 512  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        real_allocation = os.stat(img.src.path).st_blocks * 512
    real_clusters = real_allocation // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = -(-img.src.size // cs)
    return clusters_in_use(img.src, img.header, end_cluster, threshold) >= threshold


def _make_layers(img: Image | RawImage, holes: bool = True,
                 region_cap: int = 1 << 16) -> _Layer:
    back = img.backing if isinstance(img, Image) else None
    layer = _Layer(img, _make_layers(back, holes, region_cap) if back is not None else None,
                   region_cap=region_cap)
    if holes and isinstance(img, Image) and not img.encrypted:
        layer.prealloc = detect_metadata_preallocation(img)
    return layer


def _units_per_byte(layer: _Layer | None) -> float:
    total = 0.0
    while layer is not None:
        if isinstance(layer.img, Image):
            total += layer.img.geometry.units_per_cluster / layer.img.cluster_size
        else:
            total += 1 / 4096
        layer = layer.backing
    return total


def _layer_runs(layer: _Layer, w0: int, w1: int) -> np.ndarray:
    """Runs of uniform status of one layer over [w0, w1) (w1 <= its size), before merging.

    Units the layer leaves to its backing file carry ``FLAG_FALLTHROUGH``; the
    resolver stamps the depth.
    """
    img = layer.img
    if isinstance(img, RawImage):
        # The raw driver passes block status to the file: data regions and holes.
        whole = _runs(np.array([w0], np.uint64), np.array([w1 - w0], np.uint64),
                      np.array([w0], np.uint64), np.array([FLAG_PRESENT | FLAG_DATA | FLAG_OFFSET],
                                                          np.uint8),
                      np.array([T.DATA], np.uint8), np.zeros(1, np.uint16))
        return layer.split_by_holes(whole, np.ones(1, bool), hole_clears_data=True)

    geo = img.geometry
    cb = img.cluster_bits
    span_bits = cb + geo.l2_bits
    unit_bits = geo.unit_bits
    l1_lo = w0 >> span_bits
    l1_hi = ((w1 - 1) >> span_bits) + 1
    # The image's one L2 reader, uncached: back-to-back tables in one pread each.
    l2 = img.l2
    if l1_hi - l1_lo == 1 and (w1 - w0) < (1 << span_bits):
        # A window inside one table's span: read only the entries it needs.
        tables = l2.read_slice(l1_lo, (w0 >> cb) & (geo.l2_entries - 1),
                               ((w1 - 1) >> cb & (geo.l2_entries - 1)) + 1)
    else:
        tables = l2.read_tables(l1_lo, l1_hi)
    crypto = img.encrypted
    pieces: list[np.ndarray] = []
    pos = w0
    for l1_index, entries, bitmaps, e0 in tables:
        t0 = max(l1_index << span_bits, w0)
        t1 = min((l1_index + 1) << span_bits, w1)
        if t0 > pos:  # unallocated L1 entries before this table
            pieces.append(_runs(np.array([pos], np.uint64), np.array([t0 - pos], np.uint64),
                                np.zeros(1, np.uint64), np.array([FLAG_FALLTHROUGH], np.uint8),
                                np.array([T.UNALLOCATED], np.uint8),
                                np.zeros(1, np.uint16)))
        base = l1_index << span_bits
        c0 = (t0 - base) >> cb
        c1 = ((t1 - 1 - base) >> cb) + 1
        ents = entries[c0 - e0:c1 - e0]   # e0: index of the first entry read
        u = T.classify(ents, None if bitmaps is None else bitmaps[c0 - e0:c1 - e0], geo)
        l2.check_units(l1_index, c0, ents, u)
        kind = u.kind
        flags = KIND_FLAGS[kind]
        if not crypto:
            flags[u.offset_valid] |= FLAG_OFFSET
        host = u.host
        n = kind.shape[0]
        step = np.uint64(1 << unit_bits)
        # Run boundaries: flags change, or an offset-carrying unit does not continue its neighbour.
        brk = np.empty(n, dtype=bool)
        brk[0] = True
        np.not_equal(flags[1:], flags[:-1], out=brk[1:])
        has_off = (flags[1:] & np.uint8(FLAG_OFFSET)) != 0
        brk[1:] |= has_off & (host[1:] != host[:-1] + step)
        if geo.units_per_cluster == 1:
            brk[1:] |= kind[1:] == T.COMPRESSED
        else:  # a compressed cluster is one run, however many subcluster units it spans
            brk[1:] |= (kind[1:] == T.COMPRESSED) & (np.arange(1, n) % geo.units_per_cluster == 0)
        heads = np.flatnonzero(brk)
        ustart = np.uint64(base + (c0 << cb)) + heads.astype(np.uint64) * step
        uend = np.empty(heads.shape[0], np.uint64)
        uend[:-1] = ustart[1:]
        uend[-1] = np.uint64(base + (c0 << cb)) + np.uint64(n) * step
        # Clip the first and last run to the window.
        s = np.maximum(ustart, np.uint64(t0))
        e = np.minimum(uend, np.uint64(t1))
        inside = e > s   # runs of the first/last cluster's units may lie outside the window
        if not inside.all():
            heads, ustart, s, e = heads[inside], ustart[inside], s[inside], e[inside]
        off = np.where(kind[heads] == T.COMPRESSED, host[heads], host[heads] + (s - ustart))
        pieces.append(_runs(s, e - s, off, flags[heads], kind[heads],
                            np.zeros(heads.shape[0], np.uint16)))
        pos = t1
    if pos < w1:
        pieces.append(_runs(np.array([pos], np.uint64), np.array([w1 - pos], np.uint64),
                            np.zeros(1, np.uint64), np.array([FLAG_FALLTHROUGH], np.uint8),
                            np.array([T.UNALLOCATED], np.uint8), np.zeros(1, np.uint16)))
    runs = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    if layer.prealloc:
        normal = (runs["kind"] == T.DATA) & ((runs["flags"] & np.uint8(FLAG_OFFSET)) != 0)
        runs = layer.split_by_holes(runs, normal)
    return runs


# --------------------------------------------------------------------------- public API


MIN_MEMORY = 64 * 1024


def check_memory(memory: int) -> None:
    """Refuse a memory budget too small to scan with (a ValueError naming it)."""
    if memory < MIN_MEMORY:
        raise ValueError(f"memory budget of {memory} bytes is too small (at least 64 KiB)")


def resolved_batches(img: Image | RawImage, start: int = 0, length: int | None = None, *,
                     memory: int = DEFAULT_MEMORY, holes: bool = True) -> Iterator[np.ndarray]:
    """Unmerged runs of ``[start, start+length)``, every layer resolved, window by window.

    Each run is uniform in one layer's L2 table: a compressed cluster is a
    run of its own whose ``offset`` is the compressed stream's host offset
    (FLAG_OFFSET is not set for it, as QEMU reports none).  The host-order
    planner consumes these; :func:`map_batches` merges them.  With
    ``holes=False`` the file holes of metadata-preallocated images are not
    looked up (their clusters stay plain data, as the reverse map wants).
    ``img`` may be a raw file (:class:`RawImage`): its data regions and holes,
    in one batch.
    """
    size = img.size
    end = size if length is None else min(size, start + max(length, 0))
    if start >= end:
        return
    check_memory(memory)
    # A file's region list (two uint64 per region, in lists while it is walked: about
    # 64 bytes each) may take a quarter of the budget before regions go per window.
    layers = _make_layers(img, holes=holes, region_cap=max(64, memory // 4 // 64))
    if isinstance(img, RawImage):   # a raw file on its own: its data regions and holes
        yield resolve(layers, start, end)
        return
    # Window: as many guest bytes as the budget allows, in whole top-level L1 entries
    # when at least one fits, else in whole clusters (the table is then kept between
    # windows so it is read once).
    span = 1 << (img.cluster_bits + img.geometry.l2_bits)
    units = max(1, memory // BYTES_PER_UNIT)
    window = int(units / _units_per_byte(layers))
    if window >= span:
        window = window // span * span
    else:  # a power of two, so windows never straddle two L2 tables
        window = max(img.cluster_size, 1 << (max(window, 1).bit_length() - 1))
    pos = start
    while pos < end:
        w1 = min(end, (pos // window + 1) * window)
        yield resolve(layers, pos, w1)
        pos = w1


def map_batches(img: Image, start: int = 0, length: int | None = None, *,
                memory: int = DEFAULT_MEMORY) -> Iterator[np.ndarray]:
    """Merged extents of ``[start, start+length)`` as EXTENT_DTYPE arrays, batch by batch.

    Consecutive batches are already merged with each other (an extent that
    could continue into the next batch is held back), so concatenating all
    batches gives exactly what ``qemu-img map`` lists.  Working memory stays
    within ``memory`` bytes plus a small constant, whatever the image size.
    """
    held: np.ndarray | None = None
    for runs in resolved_batches(img, start, length, memory=memory):
        # The extent held back from the previous window may continue into this one.
        merged = merge(runs if held is None else np.concatenate((held, runs)))
        held = merged[-1:].copy()
        if merged.shape[0] > 1:
            yield merged[:-1]
    if held is not None:
        yield held


def map_extents(img: Image, start: int = 0, length: int | None = None, *,
                memory: int = DEFAULT_MEMORY) -> np.ndarray:
    """All merged extents of a range in one array (memory grows with the extent count)."""
    parts = list(map_batches(img, start, length, memory=memory))
    return np.concatenate(parts) if parts else np.empty(0, dtype=EXTENT_DTYPE)


def iter_extents(img: Image, start: int = 0, length: int | None = None, *,
                 memory: int = DEFAULT_MEMORY) -> Iterator[Extent]:
    """Merged extents of a range as :class:`Extent` objects."""
    for batch in map_batches(img, start, length, memory=memory):
        for row in batch:
            yield Extent.from_row(row)


def layer_filenames(img: Image) -> list[str]:
    """For each depth, the file an extent's offset refers to (as qemu-img map's File column)."""
    out = []
    for layer in img.chain():
        if isinstance(layer, Image) and layer.header.has_data_file and layer.header.data_file:
            out.append(layer.header.data_file)
        else:
            out.append(layer.filename)
    return out
