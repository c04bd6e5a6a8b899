"""Conversion of an image's guest content to a raw file (``qemu-img convert -O raw``).

The copy runs on the block-copy engine (:mod:`qcow2kit.blockcopy`): reads in
host order by default, ``workers`` of them at once, retried on I/O errors.
The output is sparse where the guest reads zeros: ranges the chain knows to
be zero are never read, and data read from the image is written only in
4 KiB blocks that are not all zero (qemu-img's default ``-S 4k``), so the
result has the same bytes and the same holes a qemu-img conversion has.
"""

from __future__ import annotations

import os
from typing import Callable

from .blockcopy import (DEFAULT_CHUNK, DEFAULT_MAX_INFLIGHT, DEFAULT_MIN_SPARSE, DEFAULT_WORKERS,
                        CopyJob, CopyResult, RawFileTarget, read_source)
from .blockcopy.engine import DEFAULT_BACKOFF, DEFAULT_RETRIES
from .errors import CopyIncompleteError
from .image import Image
from .mapping import DEFAULT_MEMORY
from .target import open_raw_target, source_files

#: failed ranges named in the one line of a CopyIncompleteError
_LISTED = 4


def convert_to_raw(img: Image, dst: str | os.PathLike[str], *,
                   progress: Callable[[int], None] | None = None,
                   order: str = "host", memory: int = DEFAULT_MEMORY,
                   workers: int = DEFAULT_WORKERS, max_chunk: int = DEFAULT_CHUNK,
                   max_inflight: int = DEFAULT_MAX_INFLIGHT,
                   min_sparse: int = DEFAULT_MIN_SPARSE, rate_limit: int | None = None,
                   retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
                   fsync: bool = False,
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
    ``fsync``.

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
    source = read_source(img, order, memory=memory, max_chunk=max_chunk)
    # Plans (host order: every L2 table of the chain read and checked before the
    # first read) before the target is touched: a corrupt table stops us here.
    total = source.start(want_total=on_total is not None or order == "guest")
    state = {"done": 0, "total": total}

    def report(done: int, new_total: int) -> None:
        if new_total != state["total"]:
            state["total"] = new_total
            if on_total is not None:
                on_total(new_total)
        if progress is not None and done > state["done"]:
            progress(done - state["done"])
        state["done"] = max(state["done"], done)

    with open_raw_target(dst, img.size, avoid) as fd_target:
        if on_total is not None:
            on_total(total)
        target = RawFileTarget(fd_target.fd, fd_target.path, img.size)
        job = CopyJob(source, target, workers=workers, max_inflight=max_inflight,
                      min_sparse=min_sparse, rate_limit=rate_limit, retries=retries,
                      backoff=backoff, progress=report)
        result = job.run()
        if result.stopped is not None:
            raise result.stopped
        if fsync:
            target.flush()
    if result.failed:
        raise incomplete_error(fd_target.path, result)
    return result


def incomplete_error(path: str, result: CopyResult) -> CopyIncompleteError:
    """One line naming the ranges that could not be copied (the first few) and why."""
    failed = result.failed
    nbytes = sum(f.length for f in failed)
    listed = "; ".join(f"guest {f}" for f in failed[:_LISTED])
    more = f"; and {len(failed) - _LISTED} more" if len(failed) > _LISTED else ""
    return CopyIncompleteError(
        f"{path}: {len(failed)} range{'s' if len(failed) > 1 else ''} ({nbytes} bytes) could "
        f"not be copied and read as zeros there: {listed}{more}", failed, path=path)
