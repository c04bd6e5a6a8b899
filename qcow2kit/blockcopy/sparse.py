"""Which parts of a buffer hold data and which read as zeros (qemu-img convert's ``-S``).

Zeros are detected in blocks aligned to guest offsets (the first and last
block of a buffer may be partial): a block holding any non-zero byte is
written whole, a block of zeros is left as a hole.  The block is 4 KiB by
default; a larger ``min_sparse`` makes it the largest power of two not above
``min_sparse``, as ``qemu-img convert -S`` does (it aligns its requests that
way).  ``min_sparse=0`` turns detection off: everything is data.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..boolruns import true_runs

SPARSE_BLOCK = 4096
DEFAULT_MIN_SPARSE = 4096
#: qemu-img's limit for -S (32768 sectors)
MAX_MIN_SPARSE = 16 << 20


def block_size(min_sparse: int) -> int:
    """The detection block for ``-S min_sparse`` (not 0)."""
    return max(SPARSE_BLOCK, 1 << (min_sparse.bit_length() - 1))


def _nonzero_blocks(words: np.ndarray) -> np.ndarray:
    """Which rows of ``words`` (one block per row) hold a non-zero word.  A block of data
    seldom starts with a zero word: the first words decide most blocks, and only the
    others are scanned whole."""
    nonzero = words[:, 0] != 0
    if not nonzero.all():
        rest = np.flatnonzero(~nonzero)
        nonzero[rest] = words[rest].any(axis=1)
    return nonzero


def data_runs(buf: memoryview, offset: int, min_sparse: int = DEFAULT_MIN_SPARSE
              ) -> list[tuple[int, int]]:
    """``(start, end)`` of the runs of ``buf`` (guest bytes at ``offset``) to write as data."""
    n = len(buf)
    if n == 0:
        return []
    if min_sparse == 0:
        return [(0, n)]
    block = block_size(min_sparse)
    if offset % block == 0 and n % block == 0:
        # The common case (whole aligned blocks): test 8 bytes at a time, no byte-wide copy.
        nonzero = _nonzero_blocks(np.frombuffer(buf, dtype=np.uint64).reshape(-1, block // 8))
        if nonzero.all():
            return [(0, n)]
        edges = np.arange(0, n + 1, block, dtype=np.int64)
    else:
        arr = np.frombuffer(buf, dtype=np.uint8)
        first = (-offset) % block or block
        edges = np.concatenate(([0], np.arange(first, n, block), [n])).astype(np.int64)
        nonzero = np.logical_or.reduceat(arr != 0, edges[:-1])
    if not nonzero.any():
        return []
    starts, ends = true_runs(nonzero)       # in blocks; edges turns them into bytes
    return list(zip(edges[starts].tolist(), edges[ends].tolist()))


def split_segments(buf: memoryview, segments: list[tuple[int, int, int]],
                   min_sparse: int = DEFAULT_MIN_SPARSE
                   ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """:func:`data_runs` of every segment ``(guest, length, at)`` of one read's bytes ``buf``
    (``buf[at:at+length]`` holds guest bytes at ``guest``): the data to write, as
    ``(guest, at, length)``, and the ranges that read as zeros, as ``(guest, length)``.

    When every segment is made of whole blocks that are also whole blocks of ``buf`` (a
    read of whole clusters, the usual case), the blocks of the whole buffer are tested in
    one numpy call instead of one per segment.
    """
    writes: list[tuple[int, int, int]] = []
    zeros: list[tuple[int, int]] = []
    if min_sparse == 0:
        return [(g, at, n) for g, n, at in segments if n], zeros
    block = block_size(min_sparse)
    nblocks = len(buf) // block
    limit = nblocks * block
    if all(not (g | n | at) % block and at + n <= limit for g, n, at in segments):
        words = np.frombuffer(buf, dtype=np.uint64, count=limit // 8)
        nonzero = _nonzero_blocks(words.reshape(nblocks, block // 8))
        if nonzero.all():
            return [(g, at, n) for g, n, at in segments if n], zeros
        for g, n, at in segments:
            starts, ends = true_runs(nonzero[at // block:(at + n) // block])
            _split(g, n, at, zip((starts * block).tolist(), (ends * block).tolist()),
                   writes, zeros)
        return writes, zeros
    for g, n, at in segments:
        _split(g, n, at, data_runs(buf[at:at + n], g, min_sparse), writes, zeros)
    return writes, zeros


def _split(g: int, n: int, at: int, runs: Iterable[tuple[int, int]],
           writes: list[tuple[int, int, int]], zeros: list[tuple[int, int]]) -> None:
    """Segment ``(g, n, at)`` cut by its data ``runs`` (offsets in the segment): the data
    appended to ``writes`` as ``(guest, at, length)``, the rest to ``zeros``."""
    pos = 0
    for s, e in runs:
        if s > pos:
            zeros.append((g + pos, s - pos))
        writes.append((g + s, at + s, e - s))
        pos = e
    if pos < n:
        zeros.append((g + pos, n - pos))
