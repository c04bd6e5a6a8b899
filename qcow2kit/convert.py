"""Conversion of an image's guest content to a raw file or a new qcow2 image
(``qemu-img convert -O raw|qcow2``).

The copy runs on the block-copy engine (:mod:`qcow2kit.blockcopy`): reads in
host order by default, ``workers`` of them at once, retried on I/O errors.

- raw: the output is sparse where the guest reads zeros: ranges the chain knows
  to be zero are never read, and data read from the image is written only in
  4 KiB blocks that are not all zero (qemu-img's default ``-S 4k``), so the
  result has the same bytes and the same holes a qemu-img conversion has.
- qcow2: a new image written by the image builder (:mod:`qcow2kit.builder`),
  whose clusters are reserved in guest order before the copy starts, so the
  output is unfragmented while the source is read front to back (see
  :mod:`qcow2kit.blockcopy.qcow2target`); a cluster is allocated when it holds
  a non-zero byte, as with qemu-img.  ``compress`` (``-c``) stores compressed
  clusters; ``backing_file`` (``-B``) leaves unallocated what the source's own
  backing chain provides, as qemu-img does: the new backing file is taken to
  have that content.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .blockcopy import (DEFAULT_CHUNK, DEFAULT_MAX_INFLIGHT, DEFAULT_MIN_SPARSE, DEFAULT_WORKERS,
                        CopyBitmap, CopyJob, CopyResult, CopyTarget, RawFileTarget, ReadSource,
                        TeeTarget, read_source)
from .blockcopy.engine import DEFAULT_BACKOFF, DEFAULT_RETRIES
from .blockcopy.tasks import job_granularity
from .blockcopy.qcow2target import Qcow2Target, reserve_data
from .boolruns import merge_spans
from .builder import ImageBuilder
from .createopts import backing_virtual_size, full_backing_name
from .errors import CopyIncompleteError, TargetError
from .image import Image
from .mapping import DEFAULT_MEMORY, FLAG_DATA, FLAG_ZERO, resolved_batches
from .target import check_new_target, open_raw_target, remove_created, source_files

#: failed ranges named in the one line of a CopyIncompleteError
_LISTED = 4


class _Progress:
    """The callbacks of one conversion: totals (retries add to them) and increments."""

    def __init__(self, total: int, progress: Callable[[int], None] | None,
                 on_total: Callable[[int], None] | None) -> None:
        self.done = 0
        self.total = total
        self.progress = progress
        self.on_total = on_total

    def __call__(self, done: int, new_total: int) -> None:
        if new_total != self.total:
            self.total = new_total
            if self.on_total is not None:
                self.on_total(new_total)
        if self.progress is not None and done > self.done:
            self.progress(done - self.done)
        self.done = max(self.done, done)


@dataclass
class CopySettings:
    """How a conversion's copy runs (see :func:`convert_to_raw` for each knob)."""

    order: str = "host"
    memory: int = DEFAULT_MEMORY
    workers: int = DEFAULT_WORKERS
    max_chunk: int = DEFAULT_CHUNK
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    min_sparse: int = DEFAULT_MIN_SPARSE
    rate_limit: int | None = None
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF


class PlannedCopy:
    """The copy of one conversion: its reads planned (and the source's tables checked) on
    creation, before any target is touched; :meth:`run` copies into a target.

    ``pending`` (a copy bitmap) restricts the copy to its set bits, and the reads to the
    data inside them (nothing else is read).  ``window`` cuts the guest disk into windows
    of that many bytes, each planned, read (in host order) and copied by a job of its own,
    one after the other: what a ``watcher`` gathering whole blocks holds at once stays
    within about a window.  ``watcher`` (a :class:`~qcow2kit.blockcopy.CopyTarget`) is
    shown the guest content as it is copied (:class:`~qcow2kit.blockcopy.TeeTarget`).
    """

    def __init__(self, img: Image, settings: CopySettings, *,
                 pending: CopyBitmap | None = None, window: int | None = None,
                 watcher: CopyTarget | None = None,
                 progress: Callable[[int], None] | None = None,
                 on_total: Callable[[int], None] | None = None) -> None:
        self.img = img
        self.settings = settings
        self.pending = pending
        self.watcher = watcher
        size = img.size
        if window is None or window >= size:
            self.windows: list[tuple[int, int | None]] = [(0, None)]
        else:
            if window <= 0:
                raise ValueError(f"window must be positive, not {window}")
            self.windows = [(w, min(window, size - w)) for w in range(0, size, window)]
        self.first = self._source(*self.windows[0])
        # Plans (host order: every L2 table of the chain read and checked before the
        # first read) before the target is touched: a corrupt table stops us here.
        total = self.first.start(want_total=on_total is not None or settings.order == "guest")
        if len(self.windows) > 1:
            total = self._source(0, None).data_bytes()     # every table of the chain checked
        self.report = _Progress(total, progress, on_total)

    def _source(self, start: int, length: int | None) -> ReadSource:
        st = self.settings
        return read_source(self.img, st.order, memory=st.memory, max_chunk=st.max_chunk,
                           start=start, length=length, only=self.pending)

    @property
    def total(self) -> int:
        return self.report.total

    def run(self, target: CopyTarget, keep: list[tuple[int, int]] | None = None, *,
            on_copied: Callable[[list[tuple[int, int]]], None] | None = None) -> CopyResult:
        """Copy into ``target`` (only within ``keep``'s ranges when given); a target error
        that stopped the copy is raised.  ``on_copied`` is the engine's (a resumable
        copy's checkpoints hear of each task written)."""
        st = self.settings
        if self.watcher is not None:
            target = TeeTarget(target, self.watcher)
        out = CopyResult()
        several = len(self.windows) > 1
        for i, (w, n) in enumerate(self.windows):
            source = self.first if i == 0 else self._source(w, n)
            progress: Callable[[int, int], None] = self.report
            if several:
                progress = self._window_progress(out.done, self.report.total, source)
            job = CopyJob(source, target, workers=st.workers, max_inflight=st.max_inflight,
                          min_sparse=st.min_sparse, rate_limit=st.rate_limit,
                          retries=st.retries, backoff=st.backoff, progress=progress,
                          on_copied=on_copied)
            bitmap = job.bitmap
            end = self.img.size if n is None else w + n
            bitmap.clear(0, w)
            bitmap.clear(end, self.img.size - end)
            if self.pending is not None:
                _clear_outside(bitmap, self.pending.iter_runs(), w, end)
            if keep is not None:
                _clear_outside(bitmap, iter(keep), w, end)
            result = job.run()
            _add_result(out, result)
            if result.stopped is not None:
                raise result.stopped
        return out

    def _window_progress(self, done_before: int, total_before: int, source: ReadSource
                         ) -> Callable[[int, int], None]:
        """Progress of one window's job, after the windows before it (the first total
        counted every window's data; a window's retries add to it)."""
        def report(done: int, total: int) -> None:
            self.report(done_before + done, total_before + max(0, total - source.total))
        return report


def _clear_outside(bitmap: CopyBitmap, ranges: Iterator[tuple[int, int]], start: int,
                   end: int) -> None:
    """Clear the bits of ``[start, end)`` that none of the (sorted) ``ranges`` covers."""
    pos = start
    for a, n in ranges:
        if a + n <= pos:
            continue
        if a >= end:
            break
        if a > pos:
            bitmap.clear(pos, a - pos)
        pos = max(pos, a + n)
    if end > pos:
        bitmap.clear(pos, end - pos)


def _add_result(out: CopyResult, r: CopyResult) -> None:
    for name in ("total", "done", "copied", "written", "reads", "read_bytes", "retries",
                 "discarded"):
        setattr(out, name, getattr(out, name) + getattr(r, name))
    out.peak_inflight = max(out.peak_inflight, r.peak_inflight)
    out.failed += r.failed
    out.stopped = out.stopped or r.stopped


def convert_to_raw(img: Image, dst: str | os.PathLike[str], *,
                   progress: Callable[[int], None] | None = None,
                   order: str = "host", memory: int = DEFAULT_MEMORY,
                   workers: int = DEFAULT_WORKERS, max_chunk: int = DEFAULT_CHUNK,
                   max_inflight: int = DEFAULT_MAX_INFLIGHT,
                   min_sparse: int = DEFAULT_MIN_SPARSE, rate_limit: int | None = None,
                   retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
                   fsync: bool = False, existing: bool = False,
                   on_total: Callable[[int], None] | None = None) -> CopyResult:
    """Write ``img``'s guest content to ``dst`` as a sparse raw file; returns the job's result.

    ``order="host"`` (the default) reads the stored data in host-offset
    order, so the disk under the image reads front to back (see
    :mod:`qcow2kit.hostorder`); ``order="guest"`` reads guest offsets in
    sequence.  Both give the same file.  ``workers`` reads run at once
    (qemu-img's ``-m``), each at most ``max_chunk`` bytes, with at most
    ``max_inflight`` bytes of buffers in flight; ``min_sparse`` is qemu-img's
    ``-S`` (0: write everything, the output is fully allocated) and
    ``rate_limit`` its ``-r`` (bytes per second).  Like qemu-img convert
    (whose target cache mode is "unsafe"), the output is not flushed unless
    ``fsync``.  ``existing`` is qemu-img's ``-n``: ``dst`` must exist, at least
    as large as the image; it keeps its length, and what the guest reads as
    zeros is made zeros there (holes punched).

    Nothing is written before the whole source has been opened and its
    tables validated, and ``dst`` is opened through
    :func:`qcow2kit.target.open_raw_target`: it may not be any file the
    source reads, a QEMU process may not be using it, and a file this call
    created is removed again if the call fails or is interrupted.

    An I/O error is retried (``retries`` times, after ``backoff`` seconds,
    doubling).  Source ranges that keep failing are left as zeros in ``dst``,
    everything else is copied, and :class:`qcow2kit.errors.CopyIncompleteError`
    is raised at the end, listing them (``dst`` is kept).  A target that keeps
    failing (ENOSPC) stops the copy with its error, as any other error does.

    ``on_total`` is called before any copying with the number of guest bytes
    that hold data (what will be read), and again if retries add to it;
    ``progress`` then with the guest bytes of data read and written since its
    last call (ranges that read as zeros are not read, and not counted).
    """
    avoid = source_files(img)          # the whole chain opens, or we stop here
    settings = CopySettings(order, memory, workers, max_chunk, max_inflight, min_sparse,
                            rate_limit, retries, backoff)
    copy = PlannedCopy(img, settings, progress=progress, on_total=on_total)
    with open_raw_target(dst, img.size, avoid, existing=existing) as fd_target:
        if on_total is not None:
            on_total(copy.total)
        target = RawFileTarget(fd_target.fd, fd_target.path, img.size,
                               zero_initialized=not existing)
        result = copy.run(target)
        if fsync:
            target.flush()
    if result.failed:
        raise incomplete_error(fd_target.path, result)
    return result


def convert_to_qcow2(img: Image, dst: str | os.PathLike[str], *,
                     options: Sequence[str] = (), compress: bool = False,
                     backing_file: str | None = None, backing_fmt: str | None = None,
                     progress: Callable[[int], None] | None = None,
                     order: str = "host", memory: int = DEFAULT_MEMORY,
                     workers: int = DEFAULT_WORKERS, max_chunk: int = DEFAULT_CHUNK,
                     max_inflight: int = DEFAULT_MAX_INFLIGHT,
                     min_sparse: int = DEFAULT_MIN_SPARSE, rate_limit: int | None = None,
                     retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
                     fsync: bool = False, existing: bool = False,
                     on_total: Callable[[int], None] | None = None) -> CopyResult:
    """Write ``img``'s guest content to a new qcow2 image ``dst``; returns the job's result.

    ``options`` are qemu-img's ``-o`` strings for the new image (``cluster_size=...``,
    ``compat=...``, ``compression_type=...``...; not ``preallocation``), ``compress``
    its ``-c``, ``backing_file``/``backing_fmt`` its ``-B``/``-F`` (the name is stored
    as given, relative to ``dst``'s directory; the file must exist).  The other
    arguments are :func:`convert_to_raw`'s.  ``fsync`` flushes at each of the
    builder's checkpoints (its "writeback" mode) instead of never (qemu-img's
    "unsafe", the default).  ``existing`` is qemu-img's ``-n``: ``dst`` exists, at least
    as large as the source, and is an empty image exactly as ``qemu-img create`` wrote it
    (anything else is refused); its options, size and backing file stay, and what the
    source reads as zeros becomes zero clusters (version 3), as qemu-img writes them.

    As for raw: every file of the source is opened and its tables read before
    ``dst`` is created; ``dst`` (and an external data file named in ``options``) may
    not be any file the source reads, nor in use by QEMU; a file this call created
    is removed again when it fails.  After failed source ranges (kept as zeros) the
    image is completed and :class:`qcow2kit.errors.CopyIncompleteError` raised.
    """
    dst = os.fspath(dst)
    avoid = source_files(img)
    settings = CopySettings(order, memory, workers, max_chunk, max_inflight, min_sparse,
                            rate_limit, retries, backoff)
    copy = PlannedCopy(img, settings, progress=progress, on_total=on_total)
    before = check_new_target(dst, avoid)
    if existing:
        if before is None:
            raise TargetError(f"Could not open '{dst}': Could not open '{dst}': "
                              f"No such file or directory", path=dst)
    backing_size = 0
    if backing_file is not None:
        backing_size, _ = backing_virtual_size(full_backing_name(dst, backing_file),
                                               backing_fmt or "")
    # The image (and a data file) are created only after every option has been checked.
    builder = ImageBuilder(dst, img.size, create_options=options, backing_file=backing_file,
                           backing_fmt=backing_fmt, cache="writeback" if fsync else "unsafe",
                           check_files=lambda path: check_new_target(path, avoid),
                           existing=existing)
    data_before = builder.data_file_before
    try:
        if builder.size < img.size:
            raise TargetError("output file is smaller than input file", path=dst)
        zeros = ("hide" if backing_file is not None or (existing and builder.options.backing_file)
                 else "zero" if existing else "none")
        target = Qcow2Target(builder, compress=compress, zeros=zeros)
        unit = max(job_granularity(img, max_chunk), builder.cluster_size)
        keep: list[tuple[int, int]] | None = None
        if backing_file is not None:
            keep = list(_own_ranges(img, unit, backing_size, memory))
        if not compress:
            if min_sparse == 0:
                reserve_data(builder, keep if keep is not None else [(0, img.size)])
            else:
                data = data_ranges(img, memory)
                reserve_data(builder, data if keep is None else intersect(data, keep))
        if on_total is not None:
            on_total(copy.total)
        result = copy.run(target, keep)
        target.finish()
    except BaseException:
        builder.close()
        if existing:
            raise
        remove_created(dst, before)
        if builder.options.data_file is not None:
            remove_created(builder.options.data_file, data_before)
        raise
    if result.failed:
        raise incomplete_error(dst, result)
    return result


def data_ranges(img: Image, memory: int) -> Iterator[tuple[int, int]]:
    """The guest ranges that hold data through the chain, adjacent ones merged."""
    return merge_spans(_data_spans(img, memory))


def _data_spans(img: Image, memory: int) -> Iterator[tuple[int, int]]:
    for runs in resolved_batches(img, memory=memory):
        f = runs["flags"]
        data = runs[((f & np.uint8(FLAG_DATA)) != 0) & ((f & np.uint8(FLAG_ZERO)) == 0)]
        if not data.size:
            continue
        starts = data["start"].astype(np.int64)
        ends = starts + data["length"].astype(np.int64)
        # runs that touch merged here, in numpy: one span per gap, not one per cluster
        brk = np.flatnonzero(starts[1:] != ends[:-1]) + 1
        first = np.concatenate(([0], brk))
        last = np.concatenate((brk, [len(starts)])) - 1
        yield from zip(starts[first].tolist(), ends[last].tolist())


def _own_ranges(img: Image, unit: int, backing_size: int, memory: int
                ) -> Iterator[tuple[int, int]]:
    """What a target with a backing file must hold itself (``-B``), in whole ``unit``s:
    the ranges the source's top image decides (data or zeros; everything when it has no
    backing file), except zeros beyond the end of the new backing file (it reads zeros
    there already).  Merged and in guest order."""
    return merge_spans(_own_spans(img, unit, backing_size, memory))


def _own_spans(img: Image, unit: int, backing_size: int, memory: int
               ) -> Iterator[tuple[int, int]]:
    alone = len(img.chain()) == 1
    for runs in resolved_batches(img, memory=memory):
        f = runs["flags"]
        data = ((f & np.uint8(FLAG_DATA)) != 0) & ((f & np.uint8(FLAG_ZERO)) == 0)
        own = (runs["depth"] == 0) | alone
        starts = runs["start"].astype(np.int64)
        ends = starts + runs["length"].astype(np.int64)
        own &= data | (starts < backing_size)
        for a, e in zip(starts[own].tolist(), ends[own].tolist()):
            yield a // unit * unit, min(-(-e // unit) * unit, img.size)


def intersect(runs: Iterator[tuple[int, int]], keep: list[tuple[int, int]]
               ) -> Iterator[tuple[int, int]]:
    """``runs`` within ``keep`` (both sorted)."""
    k = 0
    for a, n in runs:
        e = a + n
        while k < len(keep) and keep[k][0] + keep[k][1] <= a:
            k += 1
        j = k
        while j < len(keep) and keep[j][0] < e:
            lo, hi = max(a, keep[j][0]), min(e, keep[j][0] + keep[j][1])
            if hi > lo:
                yield lo, hi - lo
            j += 1


def incomplete_error(path: str, result: CopyResult) -> CopyIncompleteError:
    """One line naming the ranges that could not be copied (the first few) and why."""
    failed = result.failed
    nbytes = sum(f.length for f in failed)
    listed = "; ".join(f"guest {f}" for f in failed[:_LISTED])
    more = f"; and {len(failed) - _LISTED} more" if len(failed) > _LISTED else ""
    return CopyIncompleteError(
        f"{path}: {len(failed)} range{'s' if len(failed) > 1 else ''} ({nbytes} bytes) could "
        f"not be copied and read as zeros there: {listed}{more}", failed, path=path)
