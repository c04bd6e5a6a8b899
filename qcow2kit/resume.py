"""The targets of resumable copies: made, found again, and finished.

A resumable copy (:mod:`qcow2kit.blockcopy.resumable`) needs a target whose metadata
will not change while it copies, and durable pending bits beside or inside it:

- a qcow2 target is created *mapped* (:func:`map_qcow2_target`): every cluster the copy
  may write is allocated in guest order (unfragmented) as a data cluster over a hole of
  the file, and, when the target has a backing file, every cluster it must hide
  without data is a zero cluster, all of it on disk (fsync) before the copy starts; its
  pending bits then go into a persistent bitmap of the image (:class:`BitmapStore`);
- a raw target is a sparse file of the guest size; its pending bits go into a journal
  beside it, ``TARGET.pending`` (:class:`JournalStore`).

:func:`pending_of` finds the pending bits of an interrupted copy again, or says why
the file is not one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from .blockcopy.pending import JournalStore, PendingMap, pending_granularity, remove_journal
from .blockcopy.qcow2target import reserve_data
from .blockcopy.resumable import PENDING_BITMAP, BitmapStore
from .boolruns import runs_mask, true_runs
from .builder import ImageBuilder
from .convert import data_ranges, intersect
from .errors import Qcow2Error
from .image import Image

JOURNAL_SUFFIX = ".pending"


def map_qcow2_target(img: Image, dst: str, keep: Sequence[tuple[int, int]] | None, *,
                     options: Sequence[str] = (), backing_file: str | None = None,
                     backing_fmt: str | None = None, memory: int,
                     check_files: Callable[[str], object] | None = None) -> int:
    """Create ``dst``, mapped for a copy of ``img``'s guest ranges ``keep`` (whole clusters;
    None: everything); returns its cluster size.

    Clusters of ``keep`` that hold data in ``img`` become data clusters over holes of the
    file; with ``backing_file``, the other clusters of ``keep`` become zero clusters (the
    backing file must not show through there).  Everything is on disk on return: made in
    the builder's "unsafe" cache mode (its steps in order, without an fsync each: a killed
    process leaves a valid image, a power cut may not), then one fsync.  Callers make it
    under a name nothing trusts until then (the backup's part file).
    """
    builder = ImageBuilder(dst, img.size, create_options=options, backing_file=backing_file,
                           backing_fmt=backing_fmt, cache="unsafe", check_files=check_files)
    try:
        cs = builder.cluster_size
        ranges = list(keep) if keep is not None else [(0, img.size)]
        reserve_data(builder, intersect(data_ranges(img, memory), ranges))
        if backing_file is not None:
            _zero_unreserved(builder, ranges)
        builder.unreserve(keep=True, as_data=True)
        builder.finish()
    except BaseException:
        builder.close()
        raise
    fd = os.open(dst, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return cs


def _zero_unreserved(builder: ImageBuilder, ranges: Sequence[tuple[int, int]]) -> None:
    """Zero clusters wherever ``ranges`` (whole clusters) has no reserved cluster; one L2
    table's worth of guest clusters at a time."""
    if not ranges:
        return
    cs, step, n = builder.cluster_size, builder.l2_size, builder.guest_clusters
    arr = np.array(ranges, dtype=np.int64).reshape(-1, 2)
    first, last = arr[:, 0] // cs, -(-(arr[:, 0] + arr[:, 1]) // cs)
    chunks = runs_mask(first // step, (last - 1) // step + 1, 0, -(-n // step))
    for k in np.flatnonzero(chunks).tolist():
        lo, hi = k * step, min((k + 1) * step, n)
        zero = runs_mask(first, last, lo, hi) & ~builder.reserved(lo * cs, (hi - lo) * cs)
        starts, ends = true_runs(zero)
        for s, e in zip(starts.tolist(), ends.tolist()):
            a = (lo + s) * cs
            builder.write_zero(a, min((lo + e) * cs, builder.size) - a)


def start_pending(img: Image, dst: str, fmt: str, keep: Iterable[tuple[int, int]] | None,
                  cluster_size: int, tag: bytes) -> PendingMap:
    """Record, durably, that ``keep`` (None: everything) of the new target ``dst`` is still
    to copy; returns the pending map."""
    g = pending_granularity(img.size, cluster_size)
    runs = list(keep) if keep is not None else [(0, img.size)]
    pending = PendingMap.from_runs(img.size, g, runs)
    if fmt == "qcow2":
        BitmapStore.create(dst, g, pending.runs())
    else:
        JournalStore(dst + JOURNAL_SUFFIX, img.size, g, tag).save(pending.todo)
    return pending


class NotResumableError(Qcow2Error):
    """The target is not an interrupted copy that can be resumed."""


def pending_of(dst: str, fmt: str, size: int, tag: bytes, *,
               backing: str | None = None) -> PendingMap:
    """The pending map of the interrupted copy into ``dst`` (:class:`NotResumableError`
    when there is none, or it is not a copy of ``size`` bytes made with ``tag``; a qcow2
    ``dst`` has no room for the tag, but must have the backing file name ``backing``)."""
    if not os.path.exists(dst):
        raise NotResumableError(f"{dst}: nothing to resume: the file does not exist",
                                path=dst)
    if fmt == "raw":
        j = JournalStore.load(dst + JOURNAL_SUFFIX)
        if j is None:
            raise NotResumableError(f"{dst}: nothing to resume: no {dst + JOURNAL_SUFFIX} "
                                    f"(the copy finished, or was not started by qcow2kit)",
                                    path=dst)
        if j.size != size or j.tag != tag:
            raise NotResumableError(f"{dst}: {dst + JOURNAL_SUFFIX} is the journal of "
                                    f"another copy ({j.tag.decode(errors='replace')})",
                                    path=dst)
        if os.path.getsize(dst) != size:
            raise NotResumableError(f"{dst}: is {os.path.getsize(dst)} bytes, not {size}: "
                                    f"not the target of this copy", path=dst)
        return PendingMap.from_journal(j)
    with Image.open(dst, follow_backing=False) as timg:
        pending = BitmapStore.load(timg)
        if pending is None:
            raise NotResumableError(f"{dst}: nothing to resume: it has no bitmap "
                                    f"'{PENDING_BITMAP}' (the copy finished, or was not "
                                    f"started by qcow2kit)", path=dst)
        if timg.size != size:
            raise NotResumableError(f"{dst}: its size {timg.size} is not the source's {size}: "
                                    f"not the target of this copy", path=dst)
        if timg.backing_filename != backing:
            raise NotResumableError(f"{dst}: its backing file is "
                                    f"{timg.backing_filename or 'none'}, not "
                                    f"{backing or 'none'}: not the target of this copy",
                                    path=dst)
    return pending


def finish_pending(dst: str, fmt: str) -> None:
    """The copy is complete and flushed: drop its pending bits."""
    if fmt == "raw":
        remove_journal(dst + JOURNAL_SUFFIX)
    else:
        from .bitmapedit import remove_bitmap
        remove_bitmap(dst, PENDING_BITMAP)


__all__ = ["JOURNAL_SUFFIX", "NotResumableError", "finish_pending", "map_qcow2_target",
           "pending_of", "start_pending"]
