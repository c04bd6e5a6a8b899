"""A copy that can be killed at any moment and resumed: the pending bitmap
(:mod:`.pending`) kept durable while the engine works, and the qcow2 target it
needs (:class:`MappedQcow2Target`).

A qcow2 target is made resumable by mapping it completely before the copy starts
(every cluster that will hold data allocated, its L2 entry and refcount on disk,
everything that must read as zeros already a zero cluster), so the copy itself
changes no metadata: it writes data in place into clusters the image already maps,
which a resumed copy can do again without knowing what the first one did.  A raw
file needs nothing of the kind.
"""

from __future__ import annotations

import threading
from typing import Any

from .. import tables as T
from ..errors import Qcow2Error
from ..image import Image
from ..writer import ImageWriter
from .engine import CopyJob, CopyResult
from .pending import Checkpointer, PendingMap, PendingStore
from .target import CopyTarget, _punch_hole, io_error
from .tasks import ReadSource

_ZERO_CHUNK = 1 << 20


class MappedQcow2Target(CopyTarget):
    """Guest data written in place into the data clusters the qcow2 image at ``path``
    already maps (see the module docstring); ``writer`` holds the image's locks.

    Writing where the image maps no data cluster is an error: the image is not the
    one this copy mapped.  Zeros are made by punching holes into data clusters (the
    image maps them over holes from the start); zero and, without a backing file,
    unallocated clusters read as zeros already.
    """

    threadsafe = True
    zero_initialized = False      # a resumed copy may find its own data from before

    def __init__(self, img: Image, writer: ImageWriter) -> None:
        if img.header.has_data_file:
            raise Qcow2Error("a resumable copy cannot write into an image with an external "
                             "data file", path=img.filename)
        self.img = img
        self.w = writer
        self.path = img.filename or writer.path
        self.size = img.size
        self.sparse_block = img.cluster_size
        self.has_backing = img.backing_filename is not None
        self.writes = 0
        self.bytes_written = 0
        self._lock = threading.Lock()     # the image's L2 cache is not shared between threads

    def _segments(self, offset: int, length: int) -> list[Any]:
        with self._lock:
            return list(self.img.segments(offset, length))

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
            if _punch_hole(self.w.fd, host, length):
                return
            zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
            pos, end = host, host + length
            while pos < end:
                n = min(len(zeros), end - pos)
                self.w.pwrite(zeros[:n], pos)
                pos += n
        except OSError as exc:
            raise io_error(exc, self.path, "write", host) from exc

    def flush(self) -> None:
        try:
            self.w.sync()
        except OSError as exc:
            raise io_error(exc, self.path, "flush", None) from exc


def run_resumable(source: ReadSource, target: CopyTarget, pending: PendingMap,
                  store: PendingStore, *, interval: float = 1.0,
                  **job_options: Any) -> tuple[CopyResult, Checkpointer]:
    """Copy what ``pending`` marks, keeping ``store`` up to date (see :mod:`.pending`).

    ``job_options`` are :class:`CopyJob`'s.  When every pending byte was copied the
    target is flushed and ``store`` removed; otherwise (failed ranges, a stop, an
    exception, a kill) the store keeps what is left for the next run.
    """
    cp = Checkpointer(pending, store, target.flush, interval=interval)
    job = CopyJob(source, target, on_copied=cp.note, **job_options)
    size = job.size
    if size:
        job.bitmap.clear(0, size)
    for a, n in pending.runs():
        job.bitmap.set(a, n)
    cp.start()
    try:
        result = job.run()
    finally:
        cp.stop()
    if result.stopped is None and not result.failed:
        target.flush()
        store.remove()
    return result, cp


__all__ = ["MappedQcow2Target", "run_resumable"]
