"""Conversion of an image's guest content to a raw file (``qemu-img convert -O raw``).

The output is sparse where the guest reads zeros: ranges the chain knows to
be zero are never read, and data read from the image is written only in
4 KiB blocks that are not all zero (qemu-img's default ``-S 4k``), so the
result has the same bytes and the same holes a qemu-img conversion has.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from .hostorder import HostOrderPlan, ReadSpec, read_one, read_specs, zero_ranges
from .image import Image, block_status
from .mapping import DEFAULT_MEMORY

SPARSE_BLOCK = 4096
DEFAULT_CHUNK = 4 * 1024 * 1024
DEFAULT_INFLIGHT = 8


def _write_nonzero(fd: int, offset: int, buf: memoryview) -> int:
    """Write the blocks of ``buf`` that are not all zero; returns the bytes written.

    Blocks are aligned to guest offsets, so the first and last may be partial.
    Runs of non-zero blocks are written with one pwrite each.
    """
    n = len(buf)
    if n == 0:
        return 0
    if offset % SPARSE_BLOCK == 0 and n % SPARSE_BLOCK == 0:
        # The common case (whole aligned blocks): test 8 bytes at a time, no byte-wide copy.
        words = np.frombuffer(buf, dtype=np.uint64).reshape(-1, SPARSE_BLOCK // 8)
        nonzero = words.any(axis=1)
        if nonzero.all():
            os.pwrite(fd, buf, offset)
            return n
        edges = np.arange(0, n + 1, SPARSE_BLOCK, dtype=np.int64)
    else:
        arr = np.frombuffer(buf, dtype=np.uint8)
        first = (-offset) % SPARSE_BLOCK or SPARSE_BLOCK
        edges = np.concatenate(([0], np.arange(first, n, SPARSE_BLOCK), [n])).astype(np.int64)
        nonzero = np.logical_or.reduceat(arr != 0, edges[:-1])
    # Runs of consecutive non-zero blocks: starts where nonzero rises, ends where it falls.
    padded = np.concatenate(([False], nonzero, [False]))
    rises = np.flatnonzero(~padded[:-1] & padded[1:])
    falls = np.flatnonzero(padded[:-1] & ~padded[1:])
    written = 0
    for r, f in zip(edges[rises].tolist(), edges[falls].tolist()):
        os.pwrite(fd, buf[r:f], offset + r)
        written += f - r
    return written


def convert_to_raw(img: Image, dst: str | os.PathLike[str], *,
                   progress: Callable[[int], None] | None = None,
                   chunk_size: int = DEFAULT_CHUNK, order: str = "host",
                   memory: int = DEFAULT_MEMORY, inflight: int = DEFAULT_INFLIGHT,
                   fsync: bool = False) -> int:
    """Write ``img``'s guest content to ``dst`` as a sparse raw file; returns bytes written.

    ``order="host"`` (the default) reads the stored data in host-offset
    order, so the disk under the image reads front to back (see
    :mod:`qcow2kit.hostorder`), keeping up to ``inflight`` reads in flight
    (qemu-img convert keeps 8) in consecutive host order; ``order="guest"``
    reads guest offsets in sequence.  Both give the same file.  Like
    qemu-img convert (whose target cache mode is "unsafe"), the output is
    not flushed unless ``fsync``.  ``progress`` is called with the number of
    guest bytes done since its last call.
    """
    if order not in ("host", "guest"):
        raise ValueError(f"order must be 'host' or 'guest', not {order!r}")
    img._check_readable()
    fd = os.open(os.fspath(dst), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0),
                 0o644)
    written = 0
    try:
        os.ftruncate(fd, img.size)
        if order == "host":
            written = _convert_host_order(img, fd, progress, memory, inflight)
        else:
            written = _convert_guest_order(img, fd, progress, chunk_size)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return written


def _convert_host_order(img: Image, fd: int, progress: Callable[[int], None] | None,
                        memory: int, inflight: int) -> int:
    if progress is not None:
        for _, n in zero_ranges(img, memory=memory):
            progress(n)  # nothing to read or write: the file is already zero there
    plan = HostOrderPlan(img, memory=memory)

    def copy(spec: ReadSpec) -> tuple[int, int]:
        item = read_one(plan, spec)
        done = wrote = 0
        for guest, n, data in item.pieces:
            wrote += _write_nonzero(fd, guest, data)
            done += n
        return done, wrote

    written = 0
    if inflight <= 1:
        for spec in read_specs(plan):
            done, wrote = copy(spec)
            written += wrote
            if progress is not None:
                progress(done)
        return written
    # Reads are submitted in host order and at most `inflight` run at once, as
    # qemu-img convert's parallel requests do; os.pread/pwrite release the GIL.
    with ThreadPoolExecutor(max_workers=inflight) as pool:
        pending: deque[Future[tuple[int, int]]] = deque()
        for spec in read_specs(plan):
            pending.append(pool.submit(copy, spec))
            if len(pending) >= inflight:
                done, wrote = pending.popleft().result()
                written += wrote
                if progress is not None:
                    progress(done)
        while pending:
            done, wrote = pending.popleft().result()
            written += wrote
            if progress is not None:
                progress(done)
    return written


def _convert_guest_order(img: Image, fd: int, progress: Callable[[int], None] | None,
                         chunk_size: int) -> int:
    written = 0
    buf = bytearray(chunk_size)
    pos = 0
    while pos < img.size:
        n = min(chunk_size, img.size - pos)
        # Find what in this chunk needs reading; known-zero ranges stay holes.
        for st in block_status(img, pos, n):
            if not st.data:
                continue
            mv = memoryview(buf)[:st.length]
            img.readinto(st.guest, mv)
            written += _write_nonzero(fd, st.guest, mv)
        if progress is not None:
            progress(n)
        pos += n
    return written
