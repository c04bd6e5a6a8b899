"""Conversion of an image's guest content to a raw file (``qemu-img convert -O raw``).

The output is sparse where the guest reads zeros: ranges the chain knows to
be zero are never read, and data read from the image is written only in
4 KiB blocks that are not all zero (qemu-img's default ``-S 4k``), so the
result has the same bytes and the same holes a qemu-img conversion has.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np

from .hostorder import HostOrderPlan, ReadSpec, read_one, read_specs
from .image import Image, block_status
from .mapping import DEFAULT_MEMORY, FLAG_DATA, FLAG_ZERO, check_memory, resolved_batches
from .target import RawTarget, open_raw_target, source_files

SPARSE_BLOCK = 4096
DEFAULT_CHUNK = 4 * 1024 * 1024
DEFAULT_INFLIGHT = 8


def _write_nonzero(fd: int, offset: int, buf: memoryview, path: str = "") -> int:
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
            _pwrite_all(fd, buf, offset, path)
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
        _pwrite_all(fd, buf[r:f], offset + r, path)
        written += f - r
    return written


def _pwrite_all(fd: int, buf: memoryview, offset: int, path: str) -> None:
    """Write all of ``buf`` at ``offset``; an error names the file and the offset."""
    done = 0
    try:
        while done < len(buf):
            done += os.pwrite(fd, buf[done:], offset + done)
    except OSError as exc:
        raise _io_error(exc, path, "write", offset + done) from exc


MAX_INFLIGHT = 64


def convert_to_raw(img: Image, dst: str | os.PathLike[str], *,
                   progress: Callable[[int], None] | None = None,
                   chunk_size: int = DEFAULT_CHUNK, order: str = "host",
                   memory: int = DEFAULT_MEMORY, inflight: int = DEFAULT_INFLIGHT,
                   fsync: bool = False,
                   on_total: Callable[[int], None] | None = None) -> int:
    """Write ``img``'s guest content to ``dst`` as a sparse raw file; returns bytes written.

    ``order="host"`` (the default) reads the stored data in host-offset
    order, so the disk under the image reads front to back (see
    :mod:`qcow2kit.hostorder`), keeping up to ``inflight`` reads in flight
    (qemu-img convert keeps 8) in consecutive host order; ``order="guest"``
    reads guest offsets in sequence.  Both give the same file.  Like
    qemu-img convert (whose target cache mode is "unsafe"), the output is
    not flushed unless ``fsync``.

    Nothing is written before the whole source has been opened and its
    tables validated, and ``dst`` is opened through
    :func:`qcow2kit.target.open_raw_target`: it may not be any file the
    source reads, a QEMU process may not be using it, and a file this call
    created is removed again if the call fails or is interrupted.

    ``on_total`` is called once, before any copying, with the number of
    guest bytes that hold data (what will be read); ``progress`` then with
    the guest bytes of data read and written since its last call (ranges
    that read as zeros are not read, and not counted).
    """
    if order not in ("host", "guest"):
        raise ValueError(f"order must be 'host' or 'guest', not {order!r}")
    if not 1 <= inflight <= MAX_INFLIGHT:
        raise ValueError(f"inflight must be between 1 and {MAX_INFLIGHT}, not {inflight}")
    if chunk_size < SPARSE_BLOCK or chunk_size % SPARSE_BLOCK:
        raise ValueError(f"chunk_size must be a positive multiple of {SPARSE_BLOCK}")
    check_memory(memory)
    avoid = source_files(img)          # the whole chain opens, or we stop here
    if order == "host":
        plan = HostOrderPlan(img, memory=memory)
        specs = read_specs(plan)
        # The first read of a merged plan comes only after every L2 table of the
        # chain has been read and validated: a corrupt table stops us here.
        first = next(specs, None)
        total = (plan.stats.data_bytes if plan.source == "l2" and plan.strategy == "merge"
                 else _data_bytes(img, memory) if on_total is not None else 0)
        todo: Iterator[ReadSpec] = (itertools.chain([first], specs) if first is not None
                                    else iter(()))
    else:
        total = _data_bytes(img, memory)  # validates every table on the way
    with open_raw_target(dst, img.size, avoid) as target:
        if on_total is not None:
            on_total(total)
        if order == "host":
            written = _convert_host_order(plan, todo, target, progress, inflight)
        else:
            written = _convert_guest_order(img, target, progress, chunk_size)
        if fsync:
            try:
                os.fsync(target.fd)
            except OSError as exc:
                raise _io_error(exc, target.path, "flush", None) from exc
    return written


def _data_bytes(img: Image, memory: int) -> int:
    """Guest bytes that hold data, through the whole chain (one scan of the tables)."""
    total = 0
    for runs in resolved_batches(img, memory=memory):
        f = runs["flags"]
        data = ((f & np.uint8(FLAG_DATA)) != 0) & ((f & np.uint8(FLAG_ZERO)) == 0)
        total += int(runs["length"][data].sum())
    return total


def _io_error(exc: OSError, path: str, what: str, offset: int | None) -> OSError:
    """``exc`` again, naming the file, the operation and the offset."""
    where = f" at offset {offset:#x}" if offset is not None else ""
    return OSError(exc.errno, f"{what} error{where}: {exc.strerror or exc}", path)


def _convert_host_order(plan: HostOrderPlan, specs: Iterator[ReadSpec], target: RawTarget,
                        progress: Callable[[int], None] | None, inflight: int) -> int:
    fd = target.fd

    def copy(spec: ReadSpec) -> tuple[int, int]:
        item = read_one(plan, spec)      # a read error already names its file and offset
        done = wrote = 0
        for guest, n, data in item.pieces:
            wrote += _write_nonzero(fd, guest, data, target.path)
            done += n
        return done, wrote

    written = 0
    if inflight <= 1:
        for spec in specs:
            done, wrote = copy(spec)
            written += wrote
            if progress is not None:
                progress(done)
        return written
    # Reads are submitted in host order and at most `inflight` run at once, as
    # qemu-img convert's parallel requests do; os.pread/pwrite release the GIL.
    pool = ThreadPoolExecutor(max_workers=inflight)
    try:
        pending: deque[Future[tuple[int, int]]] = deque()
        for spec in specs:
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
    finally:
        # On an error or an interrupt, queued reads are dropped and the running
        # ones finish before the caller removes or closes the target.
        pool.shutdown(wait=True, cancel_futures=True)
    return written


def _convert_guest_order(img: Image, target: RawTarget,
                         progress: Callable[[int], None] | None, chunk_size: int) -> int:
    written = 0
    buf = bytearray(chunk_size)
    # One walk of the chain (block_status streams it window by window); what needs
    # reading is read a chunk at a time, known-zero ranges stay holes.
    for st in block_status(img, 0, img.size):
        if not st.data:
            continue
        pos, end = st.guest, st.guest + st.length
        while pos < end:
            mv = memoryview(buf)[:min(chunk_size, end - pos)]
            img.readinto(pos, mv)
            written += _write_nonzero(target.fd, pos, mv, target.path)
            if progress is not None:
                progress(len(mv))
            pos += len(mv)
    return written
