"""Image: an opened qcow2 file, a thin front over the rooms of :mod:`qcow2kit.image`.

Opening validates the header once, against QEMU's limits and the file size
(:mod:`.header`, mirroring ``qcow2_do_open`` in QEMU's block/qcow2.c).
Tables are loaded lazily: the L1 table on the first read, L2 tables through
the one reader and its cache bounded in bytes (:mod:`.l2`).  Guest reads
resolve each range to its layer (this image, its data file, its backing
chain: :mod:`.chain`) exactly as QEMU does, so ``Image.read`` returns the
bytes a guest would see; compressed clusters are inflated by :mod:`.compressed`.

An image opened at an internal snapshot (``Image.open(path, snapshot=...)``)
is the same front over the snapshot's own L1 table (and so its own L2
tables), with the snapshot's virtual size, and the same backing chain and
data file: everything that reads an ``Image`` reads the snapshot through it.
"""

from __future__ import annotations

import os
from functools import cached_property
from typing import Iterator, Literal

import numpy as np

from .. import spec
from .. import tables as T
from ..errors import BitmapNotFoundError, UnsupportedFeatureError, located
from ..layout import header as H
from ..locks import ReadLocks, Role
from ..source import ByteSource, SourceKind, closed_error, open_source
from . import compressed
from .bitmaps import Bitmap, dirty_runs, read_bitmaps
from .chain import RawImage, open_backing, open_data_file, read_backing
from .header import read_header
from .l2 import DEFAULT_L2_CACHE_BYTES, L2Reader, Segment, Table
from .refcounts import refcount_blocks
from .snapshots import Snapshot, SnapshotRef, check_snapshot_l1, read_snapshots, select_snapshot

#: Which virtual size an image opened at a snapshot has: the snapshot's own
#: (``disk_size``), or the image's current one (what ``qemu-img convert -l``
#: uses: QEMU's qcow2_snapshot_load_tmp switches the L1 table only).
SnapshotSize = Literal["snapshot", "image"]


class Image:
    """An opened qcow2 image.

    Use :func:`open` or :meth:`Image.open`.  The header is validated on
    open; tables are read lazily.  ``read``/``readinto`` return guest data
    exactly as QEMU would, following the backing chain and data file.

    ``snapshot`` (an id-or-name string, a :class:`SnapshotRef` or a
    :class:`Snapshot` of this image) opens the guest content as of that
    internal snapshot: its L1 table is used instead of the active one, and
    ``size`` is its ``disk_size`` (``snapshot_size="image"``: the image's
    size, as ``qemu-img convert -l``).  ``snapshot`` then names the
    :class:`Snapshot` (None for the active state).  The snapshot's L1 table
    is validated on open (cluster aligned, inside the file).
    """

    format = "qcow2"

    def __init__(self, src: ByteSource, *, filename: str | None = None,
                 follow_backing: bool = True, source_kind: SourceKind = "pread",
                 l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
                 max_backing_depth: int = spec.MAX_BACKING_DEPTH,
                 snapshot: "str | SnapshotRef | Snapshot | None" = None,
                 snapshot_size: SnapshotSize = "snapshot",
                 _chain: tuple[str, ...] = (), _locks: ReadLocks | None = None,
                 _opened_as: str = "") -> None:
        if snapshot_size not in ("snapshot", "image"):
            raise ValueError(f"snapshot_size must be 'snapshot' or 'image', not {snapshot_size!r}")
        self.src = src
        self._locks = _locks          # how the files of the chain are locked (None: not)
        self._opened_as = _opened_as  # QEMU's words for what was being opened, for errors
        self.filename = filename if filename is not None else src.path
        with located(self.filename):
            self.header = read_header(src)
        self.size = self.header.size
        self.snapshot: Snapshot | None = None
        l1: tuple[int, int] | None = None
        if snapshot is not None:
            self.snapshot = sn = self._find_snapshot(snapshot)
            l1 = (sn.l1_table_offset, sn.l1_size)
            if snapshot_size == "snapshot":
                self.size = sn.disk_size
        self.cluster_bits = self.header.cluster_bits
        self.cluster_size = self.header.cluster_size
        self.read_only = True
        self.geometry = T.L2Geometry(self.cluster_bits, self.header.extended_l2,
                                     self.header.has_data_file)
        self._source_kind = source_kind
        self._follow_backing = follow_backing
        self._max_depth = max_backing_depth
        self._chain = _chain + (os.path.realpath(src.path),)
        self._l2 = L2Reader(src, self.header, self.geometry, self.filename, l2_cache_bytes, l1)
        self._dcache = compressed.ClusterCache()
        self._backing: Image | RawImage | None = None
        self._backing_opened = False
        self._data_src: ByteSource | None = None

    def _find_snapshot(self, which: "str | SnapshotRef | Snapshot") -> Snapshot:
        with located(self.filename):
            if isinstance(which, Snapshot):
                if which not in self.snapshots:
                    raise ValueError(f"snapshot {which.id} ({which.name!r}) is not one of "
                                     f"{self.filename}'s")
                check_snapshot_l1(which, self.src.size, self.header.cluster_size)
                return which
            return select_snapshot(self.snapshots, which, self.src.size,
                                   self.header.cluster_size)

    # -- opening ---------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, source: SourceKind = "pread",
             follow_backing: bool = True, l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
             max_backing_depth: int = spec.MAX_BACKING_DEPTH, force_share: bool = False,
             consistent_read: bool = True, locking: bool = True,
             snapshot: "str | SnapshotRef | Snapshot | None" = None,
             snapshot_size: SnapshotSize = "snapshot") -> "Image":
        """Open ``path`` read-only, lock it as qemu-img does, and validate its header (at
        ``snapshot``, if given)."""
        path = os.fspath(path)
        src = open_source(path, source)
        locks = (ReadLocks(force_share=force_share, consistent_read=consistent_read)
                 if locking else None)
        opened_as = f"Could not open '{path}': "
        try:
            if locks is not None:
                locks.lock(src.fileno(), path, "qcow2", opened_as)
            return cls(src, filename=path, follow_backing=follow_backing, source_kind=source,
                       l2_cache_bytes=l2_cache_bytes, max_backing_depth=max_backing_depth,
                       snapshot=snapshot, snapshot_size=snapshot_size,
                       _locks=locks, _opened_as=opened_as)
        except BaseException:
            src.close()
            raise

    def close(self) -> None:
        """Close the image and its chain; closing twice is harmless.

        Anything that reads afterwards raises ``ValueError("I/O operation on
        closed image")``, as a closed file does; ``header``, ``size`` and
        ``filename`` stay available.
        """
        if self._backing is not None:
            self._backing.close()
            self._backing = None
        if self._data_src is not None:
            self._data_src.close()
            self._data_src = None
        self.src.close()
        self._l2.clear()
        self._dcache.clear()
        for name in ("snapshots", "bitmaps"):   # cached_property values: read again -> refused
            self.__dict__.pop(name, None)

    @property
    def closed(self) -> bool:
        return self.src.closed

    def _check_open(self) -> None:
        if self.src.closed:
            raise closed_error()

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        at = "" if self.snapshot is None else f" snapshot={self.snapshot.id}"
        return (f"<Image {self.filename!r}{at} v{self.header.version} size={self.size} "
                f"cluster_size={self.cluster_size}>")

    # -- properties ------------------------------------------------------

    @property
    def encrypted(self) -> bool:
        return self.header.crypt_method != spec.CRYPT_NONE

    @property
    def backing_filename(self) -> str | None:
        """The backing file name as stored in the image (may be relative)."""
        return self.header.backing_file or None

    def resolve_relative(self, name: str) -> str:
        """A name stored in this image, resolved against the image's directory (QEMU's path_combine)."""
        if os.path.isabs(name):
            return name
        base = self.filename
        slash = base.rfind("/")
        return base[:slash + 1] + name if slash >= 0 else name

    @property
    def full_backing_filename(self) -> str | None:
        return self.resolve_relative(self.header.backing_file) if self.header.backing_file else None

    @property
    def data_file_path(self) -> str | None:
        return self.resolve_relative(self.header.data_file) if self.header.has_data_file and \
            self.header.data_file else None

    # -- the chain -----------------------------------------------------------

    @property
    def backing(self) -> "Image | RawImage | None":
        """The opened backing image (qcow2 or raw), or None."""
        self._check_open()
        if not self._backing_opened:
            if self._follow_backing and self.header.backing_file:
                self._backing = self._open_backing()
            self._backing_opened = True   # only once open: a failed open fails again next time
        return self._backing

    def _open_backing(self) -> "Image | RawImage":
        name = self.full_backing_filename
        assert name is not None

        opened_as = self._opened_as + "Could not open backing file: "

        def open_qcow2(src: ByteSource, filename: str) -> Image:
            self._lock(src, filename, "qcow2", opened_as)
            return Image(src, filename=filename, follow_backing=True,
                         source_kind=self._source_kind, l2_cache_bytes=self._l2.cache.budget,
                         max_backing_depth=self._max_depth, _chain=self._chain,
                         _locks=self._locks, _opened_as=opened_as)

        layer = open_backing(self.filename, name, self.header.backing_format,
                             self._ext_offset(spec.EXT_BACKING_FORMAT), self._chain,
                             self._max_depth, self._source_kind, open_qcow2)
        assert isinstance(layer, (Image, RawImage))
        if isinstance(layer, RawImage):
            self._lock(layer.src, name, "raw", opened_as)
        return layer

    def _lock(self, src: ByteSource, path: str, role: Role, opened_as: str) -> None:
        """Lock a file of the chain as this image's opener asked; close it if that fails."""
        if self._locks is not None:
            try:
                self._locks.lock(src.fileno(), path, role, opened_as)
            except BaseException:
                src.close()
                raise

    def _ext_offset(self, ext_type: int) -> int | None:
        ext = self.header.extension(ext_type)
        return ext.offset if ext is not None else None

    def chain(self) -> list["Image | RawImage"]:
        """This image and its backing images, top first."""
        out: list[Image | RawImage] = [self]
        cur: Image | RawImage | None = self.backing
        while cur is not None:
            out.append(cur)
            cur = cur.backing if isinstance(cur, Image) else None
        return out

    @property
    def data_source(self) -> ByteSource:
        """Where data clusters live: the external data file, or the image file itself."""
        self._check_open()
        if not self.header.has_data_file:
            return self.src
        if self._data_src is None:
            path = self.data_file_path
            assert path is not None
            data_src = open_data_file(self.filename, path, self._ext_offset(spec.EXT_DATA_FILE),
                                      self._source_kind)
            self._lock(data_src, path, "data", self._opened_as)
            self._data_src = data_src
        return self._data_src

    # -- metadata tables ---------------------------------------------------

    @cached_property
    def snapshots(self) -> list[Snapshot]:
        """The internal snapshots, in table order."""
        self._check_open()
        with located(self.filename):
            return read_snapshots(self.src, self.header)

    @cached_property
    def bitmaps(self) -> list[Bitmap]:
        """The persistent bitmaps of the bitmap directory (empty when the autoclear bit is off)."""
        self._check_open()
        with located(self.filename):
            return read_bitmaps(self.src, self.header)

    def bitmap(self, name: str) -> Bitmap:
        """The persistent bitmap ``name`` (:class:`BitmapNotFoundError` when there is none)."""
        for bm in self.bitmaps:
            if bm.name == name:
                return bm
        raise BitmapNotFoundError(f"Dirty bitmap '{name}' not found", path=self.filename)

    def dirty_ranges(self, name: str) -> Iterator[tuple[int, int]]:
        """The dirty ranges of persistent bitmap ``name`` as ``(guest offset, length)``, in
        order and merged (what QEMU exports for it), read one bitmap cluster at a time."""
        bm = self.bitmap(name)
        with located(self.filename):
            yield from dirty_runs(self.src, bm, self.size, self.cluster_size, self.src.size)

    def refcount_blocks(self, end_cluster: int | None = None
                        ) -> Iterator[tuple[int, bytes, int]]:
        """Refcount blocks as ``(first cluster, raw entries, number of entries)``.

        With ``end_cluster``, only the table entries and refcount entries for
        clusters below it are read.  Block offsets are validated (aligned, in
        the file) before they are read.
        """
        self._check_open()
        return self._refcount_blocks(end_cluster)

    def _refcount_blocks(self, end_cluster: int | None) -> Iterator[tuple[int, bytes, int]]:
        with located(self.filename):
            yield from refcount_blocks(self.src, self.header, end_cluster)

    # -- L1 / L2 -------------------------------------------------------------

    @property
    def l2(self) -> L2Reader:
        """The one L1/L2 reader of this image: cached single tables, uncached batches and slices."""
        self._check_open()
        return self._l2

    @property
    def l1_table(self) -> np.ndarray:
        """The L1 table as uint64 entries (loaded on first use): the active one, or the snapshot's."""
        self._check_open()
        return self._l2.l1

    def l2_table(self, l1_index: int) -> Table | None:
        """Entry words (and subcluster bitmaps) of the L2 table under ``l1_index``, or None."""
        self._check_open()
        return self._l2.table(l1_index)

    def check_units(self, l1_index: int, c0: int, entries: np.ndarray, units: T.L2Units) -> None:
        """Refuse L2 entries QEMU refuses (see :meth:`qcow2kit.image.l2.L2Reader.check_units`)."""
        self._l2.check_units(l1_index, c0, entries, units)

    # The L2 cache's state, under the names the tests of its bounds read.
    @property
    def _l2_cache(self) -> dict[int, Table]:
        return self._l2.cache.tables

    @property
    def _l2_cache_used(self) -> int:
        return self._l2.cache.used

    @property
    def _l2_cache_bytes(self) -> int:
        return self._l2.cache.budget

    def segments(self, offset: int, length: int) -> Iterator[Segment]:
        """Resolve the guest range to runs of one kind in this image alone (no backing).

        Adjacent DATA units are merged while host-contiguous; each compressed
        cluster is its own segment.  The range is clipped to the virtual size.
        """
        self._check_open()          # now, not at the first next()
        return self._segments(offset, length)

    def _segments(self, offset: int, length: int) -> Iterator[Segment]:
        geo = self.geometry
        cb = self.cluster_bits
        span_bits = cb + geo.l2_bits
        unit_bits = geo.unit_bits
        unit = 1 << unit_bits
        end = min(offset + length, self.size)
        pos = max(offset, 0)
        while pos < end:
            l1_index = pos >> span_bits
            l2_base = l1_index << span_bits
            span_end = min(end, (l1_index + 1) << span_bits)
            table = self.l2_table(l1_index)
            if table is None:
                yield Segment(pos, span_end - pos, T.UNALLOCATED)
                pos = span_end
                continue
            entries, bitmaps = table
            c0 = (pos - l2_base) >> cb
            c1 = ((span_end - 1 - l2_base) >> cb) + 1
            units = T.classify(entries[c0:c1], None if bitmaps is None else bitmaps[c0:c1], geo)
            self._l2.check_units(l1_index, c0, entries[c0:c1], units)
            base = l2_base + (c0 << cb)
            bounds = T.run_boundaries(units.kind, units.host, unit, geo.units_per_cluster)
            ends = np.append(bounds[1:], units.kind.shape[0])
            for a, b in zip(bounds.tolist(), ends.tolist()):
                g0 = base + (a << unit_bits)
                g1 = base + (b << unit_bits)
                s = max(g0, pos)
                e = min(g1, span_end)
                if s >= e:
                    continue
                kind = T.KINDS[units.kind[a]]
                if kind == T.DATA:
                    yield Segment(s, e - s, kind, int(units.host[a]) + (s - g0))
                elif kind == T.COMPRESSED:
                    coffset = int(units.host[a])
                    if coffset >= self.src.size:
                        raise self._l2.error(l1_index, g0, "l2 entry",
                                            f"compressed cluster at {coffset:#x} lies beyond "
                                            f"the end of the file ({self.src.size} bytes)")
                    cstart = (g0 >> cb) << cb
                    yield Segment(s, e - s, kind, coffset, int(units.csize[a]), s - cstart)
                else:
                    yield Segment(s, e - s, kind)
            pos = span_end

    # -- guest reads -------------------------------------------------------

    def _decompress(self, coffset: int, csize: int) -> bytes:
        out = self._dcache.get(coffset)
        if out is None:
            out = self.inflate(coffset, csize)
            self._dcache.put(coffset, out)
        return out

    def inflate(self, coffset: int, csize: int) -> bytes:
        """The cluster stored compressed at ``coffset`` (``csize`` bytes); no cache, thread-safe."""
        self._check_open()
        with located(self.filename):
            return compressed.inflate(self.src, coffset, csize, self.cluster_size,
                                      self.header.compression_type)

    def _check_readable(self) -> None:
        if self.encrypted:
            method = "LUKS" if self.header.crypt_method == spec.CRYPT_LUKS else "AES"
            raise UnsupportedFeatureError(f"image is encrypted ({method}); reading encrypted "
                                          f"data is not supported", field="crypt_method",
                                          offset=H.field_offset("crypt_method")
                                          ).locate(self.filename)

    def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        """Fill ``buf`` with guest data from ``offset``; the range must lie within the virtual size."""
        self._check_open()
        mv = memoryview(buf).cast("B")
        length = len(mv)
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"guest range [{offset}, +{length}) is outside the virtual size "
                             f"{self.size}")
        if length == 0:
            return
        self._check_readable()
        for seg in self.segments(offset, length):
            dst = mv[seg.guest - offset:seg.guest - offset + seg.length]
            if seg.kind == T.DATA:
                dst[:] = self.data_source.read_padded(seg.host, seg.length, field="data cluster")
            elif seg.kind == T.COMPRESSED:
                dst[:] = self._decompress(seg.host, seg.csize)[seg.skip:seg.skip + seg.length]
            elif seg.kind == T.UNALLOCATED and self.backing is not None:
                read_backing(self.backing, seg.guest, dst)
            else:
                dst[:] = bytes(seg.length)

    def read(self, offset: int, length: int) -> bytes:
        """Guest data ``[offset, offset+length)``, exactly as QEMU returns it.

        The range must lie within the virtual size (``ValueError`` otherwise,
        raised before anything is allocated).  For large ranges, stream through
        :class:`qcow2kit.GuestFile` or :meth:`readinto` a buffer of your own.
        """
        self._check_open()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"guest range [{offset}, +{length}) is outside the virtual size "
                             f"{self.size}")
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)


def open(path: str | os.PathLike[str], *, source: SourceKind = "pread",  # noqa: A001 - like io.open
         follow_backing: bool = True, l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
         max_backing_depth: int = spec.MAX_BACKING_DEPTH, force_share: bool = False,
         consistent_read: bool = True, locking: bool = True,
         snapshot: "str | SnapshotRef | Snapshot | None" = None,
         snapshot_size: SnapshotSize = "snapshot") -> Image:
    """Open a qcow2 image read-only, take QEMU's image locks, and validate its header.

    ``source``: ``"pread"`` (default) or ``"mmap"``, how files are read.
    ``follow_backing``: open the backing chain when unallocated data is read
    (False: unallocated ranges read as zeros).  ``l2_cache_bytes``: the L2
    table cache's budget per image.  ``max_backing_depth``: the longest
    backing chain accepted.  A missing file raises :class:`ImageNotFoundError`
    (a :class:`FileNotFoundError` too).  ``snapshot``: open the guest content
    as of that internal snapshot (an id or name, tried in that order, or a
    :class:`SnapshotRef`; see :class:`Image`); an unknown one raises
    :class:`SnapshotNotFoundError`.

    Every file of the chain (the image, its backing files when they are
    opened, its external data file) is locked as ``qemu-img`` locks what it
    reads (:mod:`qcow2kit.locks`): the image holds "consistent read" and
    refuses to share "write" and "resize", so opening fails with
    :class:`~qcow2kit.locks.LockConflictError` (an :class:`ImageLockedError`,
    QEMU's message) while a QEMU process has it open for writing, and such a
    process cannot open it for writing while it is open here.  ``close()``
    releases the locks.  ``force_share``: refuse nothing (qemu-img's ``-U``),
    with a :class:`~qcow2kit.locks.ForceShareWarning` when another process
    holds the image for writing.  ``consistent_read=False``: do not hold
    "consistent read" (as ``qemu-img info``, which only looks at metadata).
    ``locking=False``: take no locks at all (QEMU's ``file.locking=off``), for a
    caller that holds the image's locks already, e.g. through its own writer.
    """
    return Image.open(path, source=source, follow_backing=follow_backing,
                      l2_cache_bytes=l2_cache_bytes, max_backing_depth=max_backing_depth,
                      force_share=force_share, consistent_read=consistent_read,
                      locking=locking, snapshot=snapshot, snapshot_size=snapshot_size)
