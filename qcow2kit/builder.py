"""Write a new qcow2 image cluster by cluster: :class:`ImageBuilder`.

The builder starts from the file ``qemu-img create`` writes (it runs
:mod:`qcow2kit.create`'s planner and writer, so the header, refcount table, first refcount
block and L1 table are byte for byte QEMU's) and then keeps using the allocator
create replayed (:class:`qcow2kit.alloc.Allocator`, QEMU's ``qcow2_alloc_clusters``,
``alloc_refcount_block`` and ``qcow2_refcount_area``) to place data clusters, L2 tables and new
refcount blocks, growing the refcount table with self-describing refcount
blocks when it runs out.  Host clusters are appended in the order the caller
writes them, so writing in guest order gives an unfragmented file and writing
in any other order chooses that host order.

Write order. Writes are queued and written in batches (``batch_bytes``) and committed
at checkpoints (every ``checkpoint_bytes`` of data, when the refcount table changed, and
at ``flush``/``finish``).  A batch is step (1): its data clusters and compressed streams
(or its data in the external data file), its new L2 tables (zeroed), every refcount block
whose counts changed and, when the refcount table had to grow, the new table.  Nothing
on disk points at any of it yet, so no flush is needed between batches.  A checkpoint
then takes up to three more steps, each after an ``fsync`` (and
:meth:`ImageWriter.step`, the crash-test hook, which also follows each batch): (2) only
when the refcount table changed: the entries of the table in place, or the header's
``refcount_table_offset``/``refcount_table_clusters`` (one 12-byte write) when it moved;
(3) the L2 tables with the new entries (and the refcount block that frees a replaced
refcount table); (4) the L1 entries of new L2 tables.  So a cluster and its refcount are
on disk before any L2 entry points at it, a refcount block before the refcount table
entry that points at it, L2 entries before the L1 entry, and the header (which otherwise
never changes after create) only after the structures it points at. A writer killed at
any moment leaves an image that ``qemu-img check`` finds clean or with leaked clusters
only (allocated, not yet referenced), and every cluster committed by a checkpoint
(``on_commit`` is told which) reads back.  Few checkpoints mean few fsyncs: a 4 GiB
build makes about a dozen instead of one every few batches.

``cache="unsafe"`` (qemu-img's name; its ``convert`` default) drops the fsyncs and keeps
the order of the writes: a killed process still leaves a valid image, because the page
cache keeps what was written, but after a power cut the disk may hold later steps without
earlier ones.  Use it where the image can be rebuilt, as qemu-img convert does.

Reservations. ``reserve`` places clusters now, before their data exists; ``fill`` then
writes data into them from any thread, in any order, straight to its place in the file.
A copy that reads its source in host order but reserves in guest order thus writes an
unfragmented image.  The reservations' refcounts, new L2 tables and refcount blocks are
step 1 of the first ``fill`` (or flush); a filled cluster's L2 entry waits for the next
checkpoint like any other, so a crash leaves reserved clusters at worst leaked, and
``finish`` frees the ones never filled (they stay holes in the file).

Calls are cheap per run, not per cluster: ``write`` of many clusters queues one run, and
the L2 entries of a run are set with numpy slices.
"""

from __future__ import annotations

import contextlib
import os
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import spec
from . import tables as T
from .alloc import Allocator
from .boolruns import runs_mask, true_runs
from .create import CreatePlan, prepare, request, write_plan
from .errors import Qcow2Error
from .layout import header as H
from .writer import ImageWriter

DEFAULT_BATCH_BYTES = 64 << 20
DEFAULT_CHECKPOINT_BYTES = 1 << 30
# QEMU's names (qemu-img -t): "writeback" honours the flushes that order the steps (an fsync
# after each), "unsafe" ignores them (the write order is kept, so a killed process still
# leaves a valid image, but a power cut may not); qemu-img convert uses "unsafe" by default.
CACHE_MODES = ("writeback", "unsafe")
L2_GROUP = 8                 # L2 tables allocated together (keeps guest-order data contiguous)

_DATA, _ZERO, _COMPRESSED = 0, 1, 2
_ALL_ALLOC = np.uint64(0xFFFFFFFF)
_ALL_ZERO = np.uint64(0xFFFFFFFF << 32)


class BuilderError(Qcow2Error, ValueError):
    """A write the builder cannot do (misaligned, beyond the end, written twice...)."""


def compress_cluster(data: bytes, compression_type: str) -> bytes:
    """One cluster compressed as QEMU stores it: raw deflate (zlib, window bits -12) or a
    zstd frame."""
    if compression_type == "zstd":
        import zstandard

        return bytes(zstandard.ZstdCompressor().compress(data))
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
    return c.compress(data) + c.flush()


class ImageBuilder:
    """Build a new image at ``path`` (created, or truncated when it exists).

    ``write(guest_offset, data)`` writes whole clusters of normal data (the last
    cluster of an image whose size is not a multiple of the cluster size may be
    short); ``write_zero`` makes zero clusters (qcow2 v3); ``write_compressed``
    compressed clusters (zlib or zstd after ``compression_type``; a cluster that
    does not shrink is written normally, as QEMU does).  Each guest cluster is
    written at most once.  ``finish()`` (or leaving the ``with`` block without
    an exception) flushes what is queued; after an exception the batches already
    written are committed, what was still queued is dropped, and the image stays
    valid.  ``cache`` is ``"writeback"`` or ``"unsafe"`` (module docstring).
    ``create_options`` (qemu-img's ``-o`` strings) replace the format keywords;
    ``check_files(path)``, when given, is called on an external data file before
    anything is created (it may refuse it by raising).  ``existing`` continues the
    image at ``path`` instead of creating one (qemu-img convert's ``-n``); it must be
    empty, exactly as ``qemu-img create`` wrote it (other images are refused), and its
    own format options, size and backing file are kept (the keywords are ignored).
    """

    def __init__(self, path: str | os.PathLike[str], size: int, *, cluster_size: int = 65536,
                 compat: str = "1.1", refcount_bits: int = 16, extended_l2: bool = False,
                 compression_type: str = "zlib", backing_file: str | None = None,
                 backing_fmt: str | None = None, data_file: str | None = None,
                 lazy_refcounts: bool = False, create_options: Sequence[str] | None = None,
                 batch_bytes: int = DEFAULT_BATCH_BYTES,
                 checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES, cache: str = "writeback",
                 on_commit: Callable[[np.ndarray], None] | None = None,
                 check_files: Callable[[str], Any] | None = None,
                 existing: bool = False) -> None:
        if cache not in CACHE_MODES:
            raise BuilderError(f"cache mode {cache!r} is not one of {', '.join(CACHE_MODES)}")
        self.path = os.fspath(path)
        self.cache = cache
        if existing:
            size, create_options, backing_file, backing_fmt = _as_created(self.path)
        options: dict[str, Any] = {"cluster_size": cluster_size, "compat": compat,
                                   "refcount_bits": refcount_bits}
        if extended_l2:
            options["extended_l2"] = True
        if compression_type != "zlib":
            options["compression_type"] = compression_type
        if lazy_refcounts:
            options["lazy_refcounts"] = True
        if data_file is not None:
            options["data_file"] = data_file
        if create_options is not None:       # qemu-img's -o strings instead
            options = {}
        # Everything is checked before the file is created.
        plan = prepare(request(self.path, size, backing_file=backing_file,
                               backing_fmt=backing_fmt, unsafe=existing,
                               options=options if create_options is None
                               else list(create_options))).plan
        if plan.options.preallocation != "off":
            raise BuilderError(f"the builder writes images without preallocation, not "
                               f"preallocation={plan.options.preallocation}")
        #: what ``check_files`` (which may refuse it) said of the external data file
        self.data_file_before = (check_files(plan.options.data_file)
                                 if check_files is not None and plan.options.data_file
                                 else None)
        if existing:
            _check_as_planned(self.path, plan)
        else:
            write_plan(plan, sync=cache == "writeback")
        self.plan: CreatePlan = plan
        o = self.plan.options
        a: Allocator = self.plan.allocator
        self.options = o
        self._a = a
        self.size = o.size
        self.cluster_size = cs = o.cluster_size
        self.cluster_bits = o.cluster_bits
        self.compression_type = ("zstd" if o.compression_type == spec.COMPRESSION_ZSTD
                                 else "zlib")
        self.geo = T.L2Geometry(o.cluster_bits, o.extended_l2, o.data_file is not None)
        self.l2_size = a.l2_size
        self.l2_bits = a.l2_bits
        self.guest_clusters = -(-o.size // cs)
        self.max_refcount = (1 << o.refcount_bits) - 1
        self.batch_bytes = max(batch_bytes, cs)
        self.checkpoint_bytes = max(checkpoint_bytes, self.batch_bytes)
        self.on_commit = on_commit
        a.used.touched = []
        a.defer_free = []
        self._l2: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        # per L2 table: which of its guest clusters were queued (written at most once)
        self._written: dict[int, np.ndarray] = {}
        # queued writes: runs of guest clusters (first, count, kind, buffers)
        self._pending: list[tuple[int, int, int, list[bytes | memoryview]]] = []
        self._pending_bytes = 0
        self._extra: dict[int, dict[int, int]] = {}   # rti -> {cluster: extra references}
        self._touched_rti: set[int] = set()
        self._start_checkpoint()
        self._torn = False           # a batch failed half-written: never commit after that
        self._comp_cluster = -1      # host cluster being packed with compressed streams
        self._comp_pos = 0           # next free byte in it
        self._lock = threading.RLock()   # the queue, the L2 entries, checkpoints
        # reservations: per L2 table, the host offset of each reserved cluster (0: none)
        self._resv: dict[int, np.ndarray] = {}
        self._filled: dict[int, np.ndarray] = {}
        self._resv_new_l2: list[int] = []
        self._resv_touched: list[tuple[int, int]] = []
        self._resv_meta = False          # reservations whose metadata is not written yet
        self._resv_end = 0               # where the last reserved cluster ends
        self._w: ImageWriter | None = ImageWriter(self.path)
        # with an external data file, guest cluster n is host cluster n of that file (no
        # refcounts, as QEMU does without data_file_raw too)
        self._dw = ImageWriter(o.data_file) if o.data_file is not None else None

    # -- the caller's side ------------------------------------------------------

    def __enter__(self) -> "ImageBuilder":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.close()

    def _clusters(self, guest_offset: int, length: int) -> range:
        cs = self.cluster_size
        if guest_offset % cs or guest_offset < 0:
            raise BuilderError(f"guest offset {guest_offset:#x} is not cluster aligned")
        end = guest_offset + length
        if end > self.size:
            raise BuilderError(f"write [{guest_offset:#x}, {end:#x}) beyond the virtual size "
                               f"{self.size:#x}")
        if length % cs and end != self.size:
            raise BuilderError(f"length {length:#x} is not a whole number of clusters")
        first = guest_offset // cs
        return range(first, first + -(-length // cs))

    def _queue(self, first: int, count: int, kind: int, bufs: list[bytes | memoryview]) -> None:
        """Queue ``count`` guest clusters from ``first`` (refused as a whole when any of them
        was queued before)."""
        spans = []
        g, end = first, first + count
        while g < end:
            l1, i = g >> self.l2_bits, g & (self.l2_size - 1)
            m = min(end - g, self.l2_size - i)
            mask = self._written.get(l1)
            if mask is None:
                mask = self._written[l1] = np.zeros(self.l2_size, dtype=bool)
            elif mask[i:i + m].any():
                twice = g + int(np.argmax(mask[i:i + m]))
                raise BuilderError(f"guest cluster {twice} written twice")
            spans.append((mask, i, m))
            g += m
        for mask, i, m in spans:
            mask[i:i + m] = True
        self._pending.append((first, count, kind, bufs))
        self._pending_bytes += sum(len(b) for b in bufs) + 64 * count
        if self._pending_bytes >= self.batch_bytes:
            self._write_batch()

    def _run(self, data: bytes | bytearray | memoryview, count: int) -> list[bytes | memoryview]:
        """``count`` clusters of ``data``, the last zero-padded; ``bytes`` (or a view of
        ``bytes``: immutable) are not copied, other buffers are (the caller may reuse them)."""
        cs = self.cluster_size
        whole = memoryview(data)
        mv = whole.cast("B")
        full = min(count, len(mv) // cs)
        head: bytes | memoryview = mv[:full * cs]
        if not isinstance(whole.obj, bytes):
            head = bytes(head)
        if full == count:
            return [head]
        tail = bytes(mv[full * cs:(full + 1) * cs])
        return [head, tail + bytes(cs - len(tail))]

    def write(self, guest_offset: int, data: bytes | bytearray | memoryview) -> None:
        """Normal data clusters from ``guest_offset`` on (placed after what came before)."""
        r = self._clusters(guest_offset, memoryview(data).nbytes)
        if r:
            with self._lock:
                self._queue(r.start, len(r), _DATA, self._run(data, len(r)))

    def write_zero(self, guest_offset: int, length: int) -> None:
        """Zero clusters (reads as zeros, hides the backing file); qcow2 v3 only."""
        if self.options.version < 3:
            raise BuilderError("zero clusters need compat=1.1 (qcow2 v3)")
        r = self._clusters(guest_offset, length)
        if r:
            with self._lock:
                self._queue(r.start, len(r), _ZERO, [])

    def write_compressed(self, guest_offset: int, data: bytes | bytearray | memoryview) -> None:
        """Compressed clusters; one that does not shrink is stored as a normal cluster."""
        cs = self.cluster_size
        r = self._clusters(guest_offset, memoryview(data).nbytes)
        mv = memoryview(data).cast("B")
        for i, gc in enumerate(r):
            chunk = self._run(mv[i * cs:(i + 1) * cs], 1)[0]
            self.write_packed(gc * cs, chunk, compress_cluster(bytes(chunk), self.compression_type))

    def write_packed(self, guest_offset: int, chunk: bytes | memoryview, packed: bytes) -> None:
        """One cluster ``chunk`` (a whole cluster, zero-padded at the image's end) as its
        compressed stream ``packed`` (:func:`compress_cluster`, which callers may run in
        their own threads), or as a normal cluster when ``packed`` is not shorter."""
        if self._dw is not None:
            raise BuilderError("compressed clusters cannot be written with an external data file")
        cs = self.cluster_size
        r = self._clusters(guest_offset, min(cs, self.size - guest_offset))
        if len(chunk) != cs:
            raise BuilderError(f"a compressed cluster takes {cs} bytes, not {len(chunk)}")
        with self._lock:
            if len(packed) >= cs:
                self._queue(r.start, 1, _DATA, [bytes(chunk)])
            else:
                self._queue(r.start, 1, _COMPRESSED, [packed])

    # -- reservations -------------------------------------------------------------

    def reserve(self, guest_offset: int, length: int) -> int:
        """Place, now, the clusters ``[guest_offset, guest_offset+length)`` touches (whole
        clusters; ones reserved or written before are skipped), after everything placed so
        far; returns how many were reserved.  :meth:`fill` writes into them.  Reserving in
        guest order gives an unfragmented image whatever order the data comes in."""
        return self.reserve_runs([(guest_offset, length)])

    def reserve_runs(self, runs: Iterable[tuple[int, int]]) -> int:
        """:meth:`reserve` of each guest range ``(offset, length)`` of ``runs``, in their
        order, in one call (numpy-wide per L2 table when the ranges are sorted and touch no
        cluster twice; one range at a time otherwise); returns the clusters reserved."""
        cs = self.cluster_size
        arr = np.array(list(runs), dtype=np.int64).reshape(-1, 2)
        offs = arr[:, 0]
        ends = np.minimum(offs + arr[:, 1], self.size)
        ok = (offs >= 0) & (offs < ends)
        first, last = offs[ok] // cs, -(-ends[ok] // cs)
        if not len(first):
            return 0
        if len(first) > 1 and bool(np.any(first[1:] < last[:-1])):
            return sum(self._reserve_clusters(first[k:k + 1], last[k:k + 1])
                       for k in range(len(first)))
        return self._reserve_clusters(first, last)

    def _reserve_clusters(self, first: np.ndarray, last: np.ndarray) -> int:
        """Reserve guest clusters ``[first[k], last[k])`` (sorted, disjoint runs), L2 table
        by L2 table in guest order: its L2 table placed first, then one host run per run of
        clusters not reserved or written yet."""
        with self._lock:
            if self._w is None:
                raise BuilderError("the builder is closed")
            cs = self.cluster_size
            bits, size = self.l2_bits, self.l2_size
            a = self._a
            total = 0
            n_tables = -(-self.guest_clusters // size)
            tables = np.flatnonzero(runs_mask(first >> bits, ((last - 1) >> bits) + 1, 0,
                                              n_tables))
            a.used.touched = self._resv_touched
            try:
                for l1 in tables.tolist():
                    base = l1 << bits
                    j0 = int(np.searchsorted(last, base, side="right"))
                    j1 = int(np.searchsorted(first, base + size, side="left"))
                    want = runs_mask(first[j0:j1], last[j0:j1], base, base + size)
                    self._resv_new_l2 += self._place_l2([l1])
                    resv = self._resv.get(l1)
                    if resv is None:
                        resv = self._resv[l1] = np.zeros(size, dtype=np.uint64)
                        self._filled[l1] = np.zeros(size, dtype=bool)
                    mask = self._written.get(l1)
                    if mask is None:
                        mask = self._written[l1] = np.zeros(size, dtype=bool)
                    new = want & ~mask
                    starts, stops = true_runs(new)
                    if not len(starts):
                        continue
                    counts = stops - starts
                    if self._dw is not None:
                        # with a data file, guest cluster n is host cluster n of that file
                        hosts = (starts + base) * cs
                    else:
                        hosts = np.array([a.alloc_clusters(n * cs) for n in counts.tolist()],
                                         dtype=np.int64)
                        self._resv_end = max(self._resv_end, int((hosts + counts * cs).max()))
                    idx = np.flatnonzero(new)
                    run = np.repeat(np.arange(len(starts)), counts)
                    offsets = (hosts[run] + (idx - starts[run]) * cs).astype(np.uint64)
                    resv[idx] = offsets | np.uint64(spec.OFLAG_COPIED)
                    mask[idx] = True
                    total += len(idx)
            finally:
                a.used.touched = []
            if total or self._resv_new_l2:
                self._resv_meta = True
        return total

    def _write_reserved_meta(self) -> None:
        """Step 1 of the reservations: new L2 tables (zeroed), refcount blocks, a new
        refcount table.  Their L1 entries and the refcount table follow at the next
        checkpoint."""
        if not self._resv_meta:
            return
        w = self._w
        assert w is not None
        a = self._a
        cb = self.cluster_bits
        self._torn = True
        zero_cluster = bytes(self.cluster_size)
        for j in self._resv_new_l2:
            w.pwrite(zero_cluster, a.l2_tables[j] << cb)
        for rti in sorted(self._rtis(self._resv_touched)):
            w.pwrite(self._refcount_block(rti), int(a.reftable[rti]))
        if a.reftable_offset != self._old_reftable_offset:
            w.pwrite(T.encode_u64_table(a.reftable), a.reftable_offset)
        if w.size < self._resv_end:
            # the file covers every reserved cluster (a hole until filled): QEMU refuses
            # references to clusters beyond the end of the file
            w.truncate(self._resv_end)
        self._torn = False
        w.step()
        self._new_l2.extend(self._resv_new_l2)
        self._resv_new_l2 = []
        self._resv_touched = []
        self._resv_meta = False

    def reserved(self, guest_offset: int, length: int) -> np.ndarray:
        """For each cluster ``[guest_offset, guest_offset+length)`` touches: is it reserved
        (and not given up by :meth:`unreserve`)?"""
        cs = self.cluster_size
        first, last = guest_offset // cs, -(-(guest_offset + length) // cs)
        return self._reserved_entries(first, last) != 0

    def filled(self, guest_offset: int, length: int) -> np.ndarray:
        """For each cluster ``[guest_offset, guest_offset+length)`` touches: was it filled?"""
        cs = self.cluster_size
        first, last = guest_offset // cs, -(-(guest_offset + length) // cs)
        with self._lock:
            return self._per_cluster(self._filled, first, last, bool)

    def _reserved_entries(self, first: int, last: int) -> np.ndarray:
        return self._per_cluster(self._resv, first, last, np.uint64)

    def _per_cluster(self, tables: dict[int, np.ndarray], first: int, last: int,
                     dtype: Any) -> np.ndarray:
        """Guest clusters ``[first, last)`` gathered from per-L2-table arrays (zero where a
        table has none)."""
        out = np.zeros(last - first, dtype=dtype)
        g = first
        while g < last:
            l1, i = g >> self.l2_bits, g & (self.l2_size - 1)
            m = min(last - g, self.l2_size - i)
            t = tables.get(l1)
            if t is not None:
                out[g - first:g - first + m] = t[i:i + m]
            g += m
        return out

    def fill(self, guest_offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``guest_offset`` into reserved clusters (any byte range: what
        is never filled in a reserved cluster reads as zeros).  Thread-safe: the data goes
        straight to its place, without the builder's lock; the clusters are committed at
        the next checkpoint."""
        mv = memoryview(data).cast("B")
        n = len(mv)
        if n == 0:
            return
        cs = self.cluster_size
        end = guest_offset + n
        if guest_offset < 0 or end > self.size:
            raise BuilderError(f"fill [{guest_offset:#x}, {end:#x}) beyond the virtual size "
                               f"{self.size:#x}")
        first, last = guest_offset // cs, -(-end // cs)
        if self._resv_meta:
            with self._lock:
                self._write_reserved_meta()
        w = self._dw if self._dw is not None else self._w
        if w is None:
            raise BuilderError("the builder is closed")
        if last == first + 1:
            # one cluster (the common case: a piece of a host-order read): no numpy
            resv = self._resv.get(first >> self.l2_bits)
            entry = int(resv[first & (self.l2_size - 1)]) if resv is not None else 0
            if not entry:
                raise BuilderError(f"guest cluster {first} was not reserved")
            w.pwrite(mv, (entry & spec.L2E_OFFSET_MASK) + guest_offset - first * cs)
            with self._lock:
                self._mark_one(first)
            return
        entries = self._reserved_entries(first, last)
        if not entries.all():
            bad = first + int(np.argmin(entries != 0))
            raise BuilderError(f"guest cluster {bad} was not reserved")
        hosts = entries & np.uint64(spec.L2E_OFFSET_MASK)
        # host-contiguous segments of the clusters, written one pwrite each
        cuts = (np.flatnonzero(np.diff(hosts.astype(np.int64)) != cs) + 1).tolist()
        bounds = [0] + cuts + [last - first]
        rel = guest_offset - first * cs
        for ja, jb in zip(bounds[:-1], bounds[1:]):
            lo = max(ja * cs - rel, 0)
            hi = min(jb * cs - rel, n)
            w.pwrite(mv[lo:hi], int(hosts[ja]) + (rel if ja == 0 else 0))
        with self._lock:
            self._mark_filled(first, last)

    def _mark_one(self, g: int) -> None:
        l1, i = g >> self.l2_bits, g & (self.l2_size - 1)
        filled = self._filled[l1]
        if filled[i]:
            return
        filled[i] = True
        e, b = self._l2_table(l1)
        e[i] = self._resv[l1][i]
        if b is not None:
            b[i] = _ALL_ALLOC
        self._dirty_l2.add(l1)
        u = self._uncommitted
        if u and u[-1][0] + u[-1][1] == g:
            u[-1] = (u[-1][0], u[-1][1] + 1)
        else:
            u.append((g, 1))
        self._uncommitted_bytes += self.cluster_size
        if self._uncommitted_bytes >= self.checkpoint_bytes:
            self._checkpoint()

    def _mark_filled(self, first: int, last: int) -> None:
        dirty = self._dirty_l2
        g = first
        newly_total = 0
        while g < last:
            l1, i = g >> self.l2_bits, g & (self.l2_size - 1)
            m = min(last - g, self.l2_size - i)
            filled = self._filled[l1][i:i + m]
            newly = ~filled
            if newly.any():
                e, b = self._l2_table(l1)
                e[i:i + m][newly] = self._resv[l1][i:i + m][newly]
                if b is not None:
                    b[i:i + m][newly] = _ALL_ALLOC
                filled[newly] = True
                dirty.add(l1)
                starts, ends = true_runs(newly)
                self._uncommitted.extend((g + s0, e0 - s0)
                                         for s0, e0 in zip(starts.tolist(), ends.tolist()))
                newly_total += int(newly.sum())
            g += m
        self._uncommitted_bytes += newly_total * self.cluster_size
        if self._uncommitted_bytes >= self.checkpoint_bytes:
            self._checkpoint()

    def unreserve(self, *, keep: bool = False, as_data: bool = False) -> np.ndarray:
        """Settle the reserved clusters never filled; returns their guest cluster numbers.

        By default they are given up: their refcounts drop to 0 (holes in the file,
        never pointed at) and they may be written again.  ``keep`` keeps them in place,
        committed as clusters that read as zeros (allocated zero clusters; in a version 2
        image, which has none, data clusters over a hole of the file), so an image
        reserved in guest order stays unfragmented.  ``as_data`` (with ``keep``) commits
        them as data clusters over the file's holes in every version: they read as zeros
        until written, and writing into them in place (at their host offsets, without the
        builder) makes the data read back.  A resumable copy maps its target so."""
        out: list[np.ndarray] = []
        with self._lock:
            if self._w is None:
                raise BuilderError("the builder is closed")
            self._write_reserved_meta()
            a = self._a
            touched: list[tuple[int, int]] = []
            a.used.touched = touched
            self._touched_rti = set()
            zeros = self.options.version >= 3 and not as_data
            zero_flag = np.uint64(spec.OFLAG_ZERO if zeros and not self.geo.extended else 0)
            try:
                for l1 in sorted(self._resv):
                    resv, filled = self._resv[l1], self._filled[l1]
                    unfilled = (resv != 0) & ~filled
                    if not unfilled.any():
                        continue
                    idx = np.flatnonzero(unfilled)
                    out.append(idx + (l1 << self.l2_bits))
                    if keep:
                        e, b = self._l2_table(l1)
                        e[idx] = resv[idx] | zero_flag
                        if b is not None:
                            b[idx] = _ALL_ZERO if zeros else _ALL_ALLOC
                        filled[idx] = True
                        self._dirty_l2.add(l1)
                        starts, ends = true_runs(unfilled)
                        base = l1 << self.l2_bits
                        self._uncommitted.extend((base + s0, e0 - s0)
                                                 for s0, e0 in zip(starts.tolist(), ends.tolist()))
                        continue
                    if self._dw is None:
                        hosts = (resv[idx] & np.uint64(spec.L2E_OFFSET_MASK)).astype(np.int64)
                        brk = np.flatnonzero(np.diff(hosts, prepend=-1) != self.cluster_size)
                        stops = np.append(brk[1:], len(hosts))
                        for k0, k1 in zip(brk.tolist(), stops.tolist()):
                            a.free_clusters(int(hosts[k0]), (k1 - k0) * self.cluster_size)
                    resv[idx] = 0
                    self._written[l1][idx] = False
                w = self._w
                for rti in sorted(self._rtis(touched)):
                    w.pwrite(self._refcount_block(rti), int(a.reftable[rti]))
            finally:
                a.used.touched = []
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def finish(self) -> None:
        """Give up reservations never filled, flush what is queued and close the image."""
        with self._lock:
            if self._w is not None:
                if self._resv:
                    self.unreserve()
                self.flush()
            self.close()

    def close(self) -> None:
        """Close without writing what is still queued (dropped); batches already written
        are committed when that still works, else they stay leaked clusters (the image
        stays valid either way)."""
        with self._lock:
            if self._w is not None:
                if (self._uncommitted or self._new_l2 or self._resv_meta) and not self._torn:
                    with contextlib.suppress(OSError, Qcow2Error):
                        self._checkpoint()
                self._w.close()
                self._w = None
            if self._dw is not None:
                self._dw.close()
                self._dw = None

    # -- one batch ----------------------------------------------------------------

    def _l2_table(self, l1_index: int) -> tuple[np.ndarray, np.ndarray | None]:
        t = self._l2.get(l1_index)
        if t is None:
            t = (np.zeros(self.l2_size, dtype=np.uint64),
                 np.zeros(self.l2_size, dtype=np.uint64) if self.geo.extended else None)
            self._l2[l1_index] = t
        return t

    def _place_l2(self, l1_indexes: list[int]) -> list[int]:
        """Allocate the L2 tables of ``l1_indexes`` that have none yet, each with the next
        ``L2_GROUP - 1`` ones (so guest-order data stays contiguous); returns the new ones."""
        a = self._a
        l1_size = a.l1.shape[0]
        new_l2: list[int] = []
        for l1_index in l1_indexes:
            if l1_index in a.l2_tables:
                continue
            for j in range(l1_index, min(l1_index + L2_GROUP, l1_size)):
                if j not in a.l2_tables:
                    a.get_cluster_table(j << (self.cluster_bits + self.l2_bits))
                    self._l2_table(j)
                    new_l2.append(j)
        return new_l2

    def _alloc_compressed(self, nbytes: int) -> int:
        """Byte offset for a compressed stream, packed as QEMU's ``qcow2_alloc_bytes`` packs
        them: right after the previous stream (one more reference to its host cluster) when
        it fits there, or when the cluster allocated next is the following one, so that the
        stream crosses into it; else at the start of a new cluster."""
        cs = self.cluster_size
        c = self._comp_cluster
        pos = self._comp_pos
        if c >= 0:
            rti = c >> self._a.rb_bits
            extra = self._extra.setdefault(rti, {})
            if extra.get(c, 0) + 2 > self.max_refcount:
                c = -1                      # that cluster's refcount is full: start anew
        if c >= 0 and pos + nbytes <= (c + 1) * cs:
            extra[c] = extra.get(c, 0) + 1
            self._touched_rti.add(rti)
            self._comp_pos += nbytes
            return pos
        off = self._a.alloc_clusters(cs)
        if c >= 0 and pos < off == (c + 1) * cs:
            extra[c] = extra.get(c, 0) + 1  # the stream starts in c, ends in the new cluster
            self._touched_rti.add(rti)
            off = pos
        self._comp_cluster = (off + nbytes - 1) >> self.cluster_bits
        self._comp_pos = off + nbytes
        return off

    def _refcount_block(self, rti: int) -> bytes:
        a = self._a
        counts = a.refcount_counts(rti)
        first = rti * a.rb_size
        for c, extra in self._extra.get(rti, {}).items():
            counts[c - first] += np.uint64(extra)
        return T.encode_refcount_block(counts, a.order)

    def _rtis(self, touched: list[tuple[int, int]]) -> set[int]:
        bits = self._a.rb_bits
        out = set(self._touched_rti)
        for s, e in touched:
            out.update(range(s >> bits, ((e - 1) >> bits) + 1))
        return out

    def _barrier(self) -> None:
        """The end of one ordered step: an fsync unless the cache mode is "unsafe"."""
        assert self._w is not None
        if self.cache == "writeback":
            self._w.sync()
        self._w.step()

    def _set_entries(self, first: int, entries: np.ndarray | None, bitmap: np.uint64 | None,
                     dirty: set[int], count: int = 0) -> None:
        """L2 entries (and extended L2 bitmaps) of guest clusters ``first``... (split over
        L2 tables); ``entries`` None leaves the entries as they are."""
        n = count if entries is None else len(entries)
        k = 0
        while k < n:
            g = first + k
            l1, i = g >> self.l2_bits, g & (self.l2_size - 1)
            m = min(n - k, self.l2_size - i)
            e, b = self._l2_table(l1)
            if entries is not None:
                e[i:i + m] = entries[k:k + m]
            if b is not None and bitmap is not None:
                b[i:i + m] = bitmap
            dirty.add(l1)
            k += m

    def flush(self) -> None:
        """Write what is queued and commit it (a checkpoint, see the module docstring)."""
        with self._lock:
            if self._w is None:
                raise BuilderError("the builder is closed")
            self._write_batch()
            self._checkpoint()

    def _write_batch(self) -> None:
        """Step 1 for the queued clusters: data, new (zeroed) L2 tables, refcount blocks, a
        new refcount table; their L2 entries wait in memory for the next checkpoint."""
        w = self._w
        assert w is not None
        self._write_reserved_meta()
        if not self._pending:
            return
        self._torn = True        # until the batch is written: its L2 entries point nowhere yet
        a = self._a
        cs, cb = self.cluster_size, self.cluster_bits
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        touched: list[tuple[int, int]] = []
        a.used.touched = touched
        self._touched_rti = set()

        # placement: L2 tables first (in groups), then the clusters in the order written
        spanned: set[int] = set()
        for first, count, _, _ in pending:
            spanned.update(range(first >> self.l2_bits, ((first + count - 1) >> self.l2_bits) + 1))
        new_l2 = self._place_l2(sorted(spanned))
        writes: list[tuple[int, list[bytes | memoryview]]] = []   # host-contiguous runs
        dirty_l2 = self._dirty_l2
        data_writes: list[tuple[int, list[bytes | memoryview]]] = []
        flag = np.uint64(spec.OFLAG_COPIED)
        i = 0
        while i < len(pending):
            first, count, kind, bufs = pending[i]
            if kind == _DATA:
                j = i
                while j < len(pending) and pending[j][2] == _DATA:
                    j += 1
                if self._dw is not None:     # the data file: host offset = guest offset
                    host = -1
                else:                        # one host run for consecutive data runs
                    host = a.alloc_clusters(sum(p[1] for p in pending[i:j]) * cs)
                    writes.append((host, [buf for p in pending[i:j] for buf in p[3]]))
                for first, count, _, bufs in pending[i:j]:
                    if host < 0:
                        data_writes.append((first * cs, bufs))
                        start = first * cs
                    else:
                        start = host
                        host += count * cs
                    offsets = np.arange(count, dtype=np.uint64) * np.uint64(cs)
                    offsets += np.uint64(start)
                    self._set_entries(first, offsets | flag, _ALL_ALLOC, dirty_l2)
                i = j
                continue
            if kind == _ZERO:
                if self.geo.extended:
                    self._set_entries(first, None, _ALL_ZERO, dirty_l2, count)
                else:
                    self._set_entries(first, np.full(count, spec.OFLAG_ZERO, dtype=np.uint64),
                                      None, dirty_l2)
            else:
                payload = bufs[0]
                off = self._alloc_compressed(len(payload))
                writes.append((off, [payload]))
                self._set_entries(first, T.compressed_descriptor(
                    np.array([off]), np.array([len(payload)]), self.geo), None, dirty_l2)
            i += 1

        # step 1: data, new L2 tables (zeroed), refcount blocks, a new refcount table
        if self._dw is not None and data_writes:
            for off, bufs in data_writes:
                self._dw.pwritev(bufs, off)
        zero_cluster = bytes(cs)
        for j in new_l2:
            w.pwrite(zero_cluster, a.l2_tables[j] << cb)
        for off, bufs in writes:
            w.pwritev(bufs, off)
        for rti in sorted(self._rtis(touched)):
            w.pwrite(self._refcount_block(rti), int(a.reftable[rti]))
        if a.reftable_offset != self._old_reftable_offset:
            w.pwrite(T.encode_u64_table(a.reftable), a.reftable_offset)
        a.used.touched = []
        self._torn = False
        w.step()
        self._new_l2.extend(new_l2)
        self._uncommitted.extend((first, count) for first, count, _, _ in pending)
        self._uncommitted_bytes += sum(count for _, count, _, _ in pending) * cs
        if (self._uncommitted_bytes >= self.checkpoint_bytes
                or a.reftable_offset != self._old_reftable_offset
                or not np.array_equal(self._old_reftable, a.reftable)):
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Steps 2 to 4 for every batch written since the last checkpoint, each after a
        barrier: the refcount table, then the L2 tables, then the L1 entries."""
        w = self._w
        assert w is not None
        self._write_reserved_meta()
        if not (self._uncommitted or self._new_l2 or self._reftable_changed()):
            return
        a = self._a
        cs, cb = self.cluster_size, self.cluster_bits
        if self._dw is not None and self.cache == "writeback":
            self._dw.sync()
        self._barrier()          # the data and refcounts of step 1 are on disk

        # step 2: the refcount table entries in place, or the header pointing at a new table
        if a.reftable_offset != self._old_reftable_offset:
            off, raw = H.field_patch("refcount_table_offset", a.reftable_offset)
            off2, raw2 = H.field_patch("refcount_table_clusters", a.reftable.shape[0] * 8 // cs)
            assert off2 == off + len(raw)
            w.pwrite(raw + raw2, off)
            self._barrier()
        elif not np.array_equal(self._old_reftable, a.reftable):
            changed = np.flatnonzero(self._old_reftable != a.reftable)
            lo, hi = int(changed[0]), int(changed[-1]) + 1
            w.pwrite(T.encode_u64_table(a.reftable[lo:hi]), a.reftable_offset + 8 * lo)
            self._barrier()

        # step 3: L2 entries (and the refcount blocks that free a replaced refcount table)
        if a.defer_free:
            touched: list[tuple[int, int]] = []
            a.used.touched = touched
            self._touched_rti = set()
            free_index = a.free_index
            for off, n in a.defer_free:
                a.free_clusters(off, n)
            a.defer_free.clear()
            a.free_index = free_index      # keep appending: freed clusters stay a hole
            for rti in sorted(self._rtis(touched)):
                w.pwrite(self._refcount_block(rti), int(a.reftable[rti]))
            a.used.touched = []
        for j in sorted(self._dirty_l2 | set(self._new_l2)):
            e, b = self._l2[j]
            w.pwrite(T.encode_l2(e, b), a.l2_tables[j] << cb)
        self._barrier()

        # step 4: L1 entries of the new L2 tables
        new_l2 = self._new_l2
        if new_l2:
            lo, hi = min(new_l2), max(new_l2) + 1
            w.pwrite(T.encode_u64_table(a.l1[lo:hi]), a.l1_offset + 8 * lo)
            if self.cache == "writeback":
                w.sync()
        committed = self._uncommitted
        self._start_checkpoint()
        if self.on_commit is not None and committed:
            self.on_commit(np.concatenate([np.arange(first, first + count, dtype=np.int64)
                                           for first, count in committed]))
        if new_l2:
            w.step()

    def _reftable_changed(self) -> bool:
        a = self._a
        return (a.reftable_offset != self._old_reftable_offset
                or not np.array_equal(self._old_reftable, a.reftable))

    def _start_checkpoint(self) -> None:
        self._dirty_l2: set[int] = set()
        self._new_l2: list[int] = []
        self._uncommitted: list[tuple[int, int]] = []
        self._uncommitted_bytes = 0
        self._old_reftable = self._a.reftable.copy()
        self._old_reftable_offset = self._a.reftable_offset


def _as_created(path: str) -> tuple[int, list[str], str | None, str | None]:
    """The ``create`` arguments that would have written the image at ``path``: its size,
    its ``-o`` options, its backing file name and format."""
    from .image import Image

    with Image.open(path, follow_backing=False, locking=False) as img:
        h = img.header
        opts = [f"compat={'1.1' if h.version >= 3 else '0.10'}",
                f"cluster_size={h.cluster_size}", f"refcount_bits={h.refcount_bits}"]
        if h.extended_l2:
            opts.append("extended_l2=on")
        if h.lazy_refcounts:
            opts.append("lazy_refcounts=on")
        if h.version >= 3 and h.compression_type != spec.COMPRESSION_ZLIB:
            opts.append(f"compression_type={h.compression_name}")
        if h.has_data_file and h.data_file:
            opts.append(f"data_file={h.data_file.replace(',', ',,')}")
            if h.data_file_raw:
                opts.append("data_file_raw=on")
        return img.size, [",".join(opts)], h.backing_file or None, h.backing_format or None


def _check_as_planned(path: str, plan: CreatePlan) -> None:
    """Refuse an existing image that is not, byte for byte, what create would write (an
    image with data, snapshots, bitmaps, preallocation, encryption...): the builder can
    only continue an image whose allocation it knows."""
    def refuse(why: str) -> BuilderError:
        return BuilderError(f"{path}: only an empty image as qemu-img create writes it can be "
                            f"written into ({why})", path=path)
    with open(path, "rb") as f:
        length = os.fstat(f.fileno()).st_size
        if length != plan.file_length:
            raise refuse(f"its file is {length} bytes long, an empty one {plan.file_length}")
        chunks = [(0, plan.header), *plan.metadata_chunks()]
        for off, chunk in chunks:
            if os.pread(f.fileno(), len(chunk), off) != chunk:
                raise refuse(f"the metadata at offset {off:#x} differs")


def nonzero_clusters(buf: bytes, cluster_size: int) -> np.ndarray:
    """Which clusters of ``buf`` (a whole number of clusters) hold a non-zero byte.  A
    cluster whose first word is not zero is decided at once; only the others are scanned."""
    words = np.frombuffer(buf, dtype=np.uint64).reshape(-1, cluster_size // 8)
    nz = words[:, 0] != 0
    rest = np.flatnonzero(~nz)
    if rest.size:
        nz[rest] = words[rest].any(axis=1)
    return nz


def build_from_raw(path: str | os.PathLike[str], raw_path: str | os.PathLike[str],
                   **options: Any) -> None:
    """An image with the content of a raw file: all-zero clusters left unallocated, the
    others written in guest order (so the image is unfragmented)."""
    size = os.path.getsize(raw_path)
    with ImageBuilder(path, size, **options) as b, open(raw_path, "rb", buffering=0) as f:
        cs = b.cluster_size
        chunk = max(cs, 8 << 20) // cs * cs
        off = 0
        while off < size:
            buf = f.read(chunk)
            if not buf:
                break
            if len(buf) % cs:
                buf += bytes(-len(buf) % cs)
            view = memoryview(buf)
            starts, ends = true_runs(nonzero_clusters(buf, cs))
            for s, e in zip(starts.tolist(), ends.tolist()):
                b.write(off + s * cs, view[s * cs:min(e * cs, size - off)])
            off += chunk


def builder_options(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :class:`ImageBuilder` found in ``mapping``."""
    names = ("cluster_size", "compat", "refcount_bits", "extended_l2", "compression_type",
             "backing_file", "backing_fmt", "lazy_refcounts", "batch_bytes")
    return {k: mapping[k] for k in names if k in mapping}
