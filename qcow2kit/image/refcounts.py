"""The refcount table and its blocks (QEMU's block/qcow2-refcount.c)."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .. import spec
from .. import tables as T
from ..errors import CorruptImageError
from ..source import ByteSource
from .header import Header


def refcount_blocks(src: ByteSource, h: Header, end_cluster: int | None = None
                    ) -> Iterator[tuple[int, bytes, int]]:
    """Refcount blocks as ``(first cluster, raw entries, number of entries)``.

    With ``end_cluster``, only the table entries and refcount entries for
    clusters below it are read.  Block offsets are validated (aligned, in
    the file) before they are read.
    """
    cs = h.cluster_size
    per_block = cs * 8 // h.refcount_bits
    n_entries = h.refcount_table_clusters * cs // 8
    if end_cluster is not None:
        n_entries = min(n_entries, -(-end_cluster // per_block))
    table = T.decode_u64_table(src.read_at(h.refcount_table_offset, n_entries * 8,
                                           field="refcount table"))
    for i in np.flatnonzero(table & np.uint64(spec.REFT_OFFSET_MASK)).tolist():
        block_off = int(table[i]) & spec.REFT_OFFSET_MASK
        if block_off % cs or block_off + cs > src.size:
            raise CorruptImageError(f"refcount block offset {block_off:#x} is invalid "
                                    f"(refcount table index {i})", field="refcount table entry",
                                    offset=h.refcount_table_offset + 8 * i)
        first = i * per_block
        wanted = per_block if end_cluster is None else min(per_block, end_cluster - first)
        raw = src.read_at(block_off, -(-wanted * h.refcount_bits // 8), field="refcount block")
        yield first, raw, wanted


def clusters_in_use(src: ByteSource, h: Header, end_cluster: int, stop_at: int) -> int:
    """How many clusters below ``end_cluster`` have a refcount other than zero (QEMU's lookup).

    Refcounts are looked up as ``qcow2_get_refcount`` does, more leniently
    than :func:`refcount_blocks`: a refcount block past the end of the file
    reads as zeros (a truncated image).  Counting stops once it reaches
    ``stop_at``; an unaligned refcount block is an error after which QEMU's
    ``qcow2_detect_metadata_preallocation`` gives up, so the count is 0.
    """
    cs = h.cluster_size
    per_block = cs * 8 // h.refcount_bits
    n_entries = min(h.refcount_table_clusters * cs // 8, -(-end_cluster // per_block))
    table = T.decode_u64_table(src.read_at(h.refcount_table_offset, n_entries * 8,
                                           field="refcount table"))
    count = 0
    for i in np.flatnonzero(table & np.uint64(spec.REFT_OFFSET_MASK)).tolist():
        block_off = int(table[i]) & spec.REFT_OFFSET_MASK
        if block_off % cs:
            return 0
        n = min(per_block, end_cluster - i * per_block)
        raw = src.read_padded(block_off, -(-n * h.refcount_bits // 8), field="refcount block")
        count += T.count_nonzero_refcounts(raw, h.refcount_order, n)
        if count >= stop_at:
            return count
    return count
