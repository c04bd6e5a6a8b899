"""The qcow2 side of a copy that can be killed at any moment and resumed (the pending
bitmap and its checkpoints are :mod:`.pending`'s): the target it needs
(:class:`MappedQcow2Target`) and the pending bits kept inside it (:class:`BitmapStore`).

A qcow2 target is made resumable by mapping it completely before the copy starts
(every cluster that will hold data allocated, its L2 entry and refcount on disk,
everything that must read as zeros already a zero cluster), so the copy itself
changes no metadata: it writes data in place into clusters the image already maps,
which a resumed copy can do again without knowing what the first one did.  A raw
file needs nothing of the kind.

The pending bits of a qcow2 target are a persistent bitmap of the target itself
(:class:`BitmapStore`, named :data:`PENDING_BITMAP`, disabled so that QEMU never
records writes in it): added with the bits of everything to copy before the copy
starts, its data clusters rewritten in place at each checkpoint (bits are only ever
cleared, after the data they stand for is on disk, so any mix of old and new bytes
is safe), removed when the copy is complete.  ``qemu-img info`` lists it while a
copy is unfinished.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from .. import spec
from .. import tables as T
from ..bitmapedit import add_bitmap
from ..errors import BitmapNotFoundError, Qcow2Error
from ..image import Image
from ..writer import ImageWriter
from .pending import PendingMap, pack_bits
from .target import CopyTarget, _punch_hole, io_error, write_zero_chunks


class MappedQcow2Target(CopyTarget):
    """Guest data written in place into the data clusters the qcow2 image at ``path``
    already maps (see the module docstring); ``writer`` holds the image's locks;
    ``fresh``: the image was just mapped, nothing written yet.

    Writing where the image maps no data cluster is an error: the image is not the
    one this copy mapped.  Zeros are made by punching holes into data clusters (the
    image maps them over holes from the start); zero and, without a backing file,
    unallocated clusters read as zeros already.
    """

    threadsafe = True

    def __init__(self, img: Image, writer: ImageWriter, *, fresh: bool = False) -> None:
        if img.header.has_data_file:
            raise Qcow2Error("a resumable copy cannot write into an image with an external "
                             "data file", path=img.filename)
        # a fresh image reads zeros wherever nothing was written; a resumed copy may
        # find its own data from before where the source now reads zeros
        self.zero_initialized = fresh
        self.img = img
        self.w = writer
        self.path = img.filename or writer.path
        self.size = img.size
        self.sparse_block = img.cluster_size
        self.has_backing = img.backing_filename is not None
        self.writes = 0
        self.bytes_written = 0
        self._lock = threading.Lock()     # the image's L2 cache is not shared between threads
        # the mapping does not change during the copy: resolved once per L2 table's span
        # (a lookup per write cost ~0.3 ms, the most of an incremental backup's CPU)
        self._span_bits = img.cluster_bits + img.geometry.l2_bits
        self._spans: dict[int, tuple[list[int], list[Any]]] = {}

    def _span(self, k: int) -> tuple[list[int], list[Any]]:
        """The segments of the guest span of L2 table ``k`` and their guest offsets."""
        with self._lock:
            got = self._spans.get(k)
            if got is None:
                segs = list(self.img.segments(k << self._span_bits, 1 << self._span_bits))
                got = self._spans[k] = ([s.guest for s in segs], segs)
            return got

    def _segments(self, offset: int, length: int) -> list[Any]:
        out = []
        end = min(offset + length, self.size)
        pos = max(offset, 0)
        while pos < end:
            k = pos >> self._span_bits
            stop = min(end, (k + 1) << self._span_bits)
            starts, segs = self._span(k)
            i = max(bisect.bisect_right(starts, pos) - 1, 0)
            while i < len(segs) and segs[i].guest < stop:
                seg = segs[i]
                a, b = max(seg.guest, pos), min(seg.guest + seg.length, stop)
                if a < b:
                    cut = a - seg.guest
                    if seg.kind == T.DATA:
                        seg = seg._replace(host=seg.host + cut)
                    elif seg.kind == T.COMPRESSED:
                        seg = seg._replace(skip=seg.skip + cut)
                    out.append(seg._replace(guest=a, length=b - a))
                i += 1
            pos = stop
        return out

    def _unmapped(self, seg: Any) -> Qcow2Error:
        return Qcow2Error(f"guest range {seg.guest:#x}+{seg.length:#x} of the target is "
                          f"{seg.kind}, not a data cluster mapped for this copy",
                          path=self.path)

    def write(self, offset: int, data: memoryview) -> None:
        for seg in self._segments(offset, len(data)):
            if seg.kind != T.DATA:
                raise self._unmapped(seg)
            at = seg.guest - offset
            try:
                self.w.pwrite(data[at:at + seg.length], seg.host)
            except OSError as exc:
                raise io_error(exc, self.path, "write", seg.host) from exc
            with self._lock:
                self.writes += 1
                self.bytes_written += seg.length

    def write_zeroes(self, offset: int, length: int, *, allocate: bool = False) -> None:
        for seg in self._segments(offset, length):
            if seg.kind == T.DATA:
                self._zero_host(seg.host, seg.length)
            elif seg.kind == T.ZERO or (seg.kind == T.UNALLOCATED and not self.has_backing):
                continue
            else:
                raise self._unmapped(seg)

    def _zero_host(self, host: int, length: int) -> None:
        try:
            if not _punch_hole(self.w.fd, host, length):
                write_zero_chunks(lambda at, data: self.w.pwrite(data, at), host, length)
        except OSError as exc:
            raise io_error(exc, self.path, "write", host) from exc

    def flush(self) -> None:
        try:
            self.w.sync()
        except OSError as exc:
            raise io_error(exc, self.path, "flush", None) from exc


PENDING_BITMAP = "qcow2kit-copy-pending"


class BitmapStore:
    """The pending bits of a copy in the persistent bitmap ``name`` of the target
    (see the module docstring); ``writer`` is the target's (it holds the locks)."""

    def __init__(self, img: Image, writer: ImageWriter, name: str = PENDING_BITMAP) -> None:
        bm = img.bitmap(name)
        if bm.auto or bm.in_use:
            raise Qcow2Error(f"bitmap '{name}' of {img.filename} is "
                             f"{'in use' if bm.in_use else 'enabled'}: not a copy's "
                             f"pending bitmap", path=img.filename)
        self.path = img.filename or writer.path
        self.name = name
        self.w = writer
        self.cluster_size = img.cluster_size
        self.granularity = bm.granularity
        raw = img.src.read_at(bm.bitmap_table_offset, 8 * bm.bitmap_table_size,
                              field="bitmap table")
        self.clusters = (np.frombuffer(raw, dtype=">u8").astype(np.uint64)
                         & np.uint64(spec.BME_TABLE_ENTRY_OFFSET_MASK))

    @staticmethod
    def create(path: str, granularity: int, runs: Iterable[tuple[int, int]],
               name: str = PENDING_BITMAP) -> None:
        """Add the pending bitmap to the image at ``path``, ``runs`` marked."""
        add_bitmap(path, name, granularity, enabled=False, dirty=runs)

    @staticmethod
    def load(img: Image, name: str = PENDING_BITMAP) -> PendingMap | None:
        """The pending map kept in ``img``; None when it has no such bitmap."""
        try:
            bm = img.bitmap(name)
        except BitmapNotFoundError:
            return None
        return PendingMap.from_runs(img.size, bm.granularity, img.dirty_ranges(name))

    def save(self, todo: np.ndarray, changed: np.ndarray) -> None:
        per = self.cluster_size * 8
        for k in np.unique(changed // per).tolist():
            host = int(self.clusters[k])
            if not host:               # an all-zeros cluster has no bit to clear
                continue
            raw = pack_bits(todo[k * per:(k + 1) * per])
            self.w.pwrite(raw + bytes(self.cluster_size - len(raw)), host)
        self.w.sync()


__all__ = ["BitmapStore", "MappedQcow2Target", "PENDING_BITMAP"]
