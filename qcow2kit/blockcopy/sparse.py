"""Which parts of a buffer hold data and which read as zeros (qemu-img convert's ``-S``).

Zeros are detected in blocks aligned to guest offsets (the first and last
block of a buffer may be partial): a block holding any non-zero byte is
written whole, a block of zeros is left as a hole.  The block is 4 KiB by
default; a larger ``min_sparse`` makes it the largest power of two not above
``min_sparse``, as ``qemu-img convert -S`` does (it aligns its requests that
way).  ``min_sparse=0`` turns detection off: everything is data.
"""

from __future__ import annotations

import numpy as np

from ..boolruns import true_runs

SPARSE_BLOCK = 4096
DEFAULT_MIN_SPARSE = 4096
#: qemu-img's limit for -S (32768 sectors)
MAX_MIN_SPARSE = 16 << 20


def block_size(min_sparse: int) -> int:
    """The detection block for ``-S min_sparse`` (not 0)."""
    return max(SPARSE_BLOCK, 1 << (min_sparse.bit_length() - 1))


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
        words = np.frombuffer(buf, dtype=np.uint64).reshape(-1, block // 8)
        nonzero = words.any(axis=1)
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
