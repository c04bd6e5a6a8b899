"""Sorting rows by (file, host offset) in bounded memory: the numpy external sort.

The host-order planner (:mod:`qcow2kit.hostorder`) and the reverse-map builder
need every data run of an image in host order, and an image can have more runs
than a memory budget holds.  :func:`sorted_runs` sorts them anyway:

* ``strategy="merge"`` (the default): one scan; budget-sized chunks are sorted
  with numpy and spilled to an unlinked temporary file, then merged with a
  bounded fan-in, a block of every chunk in memory at a time.
* ``strategy="rescan"``: a first scan counts rows per (file, host bucket) in a
  histogram; the host range of each file is cut into windows whose rows fit the
  budget, and the scan runs again once per window keeping only its rows.  No
  temporary space, more table reads.

Rows are any structured array; the caller names its file, host and length
fields.  Nothing here knows about qcow2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

#: Bytes per kept run while sorting a window (run record + sort index + temporaries).
BYTES_PER_RUN = 128
_BUCKETS_PER_FILE = 4096


@dataclass
class PlanStats:
    """What planning cost: passes over the L2 tables and windows sorted."""

    passes: int = 0
    windows: int = 0
    runs: int = 0
    data_bytes: int = 0


def sorted_runs(scan: Callable[[], Iterable[np.ndarray]], file_sizes: list[int], *,
                memory: int, stats: PlanStats | None = None,
                file_field: str = "file", host_field: str = "host",
                length_field: str = "length", strategy: str = "merge"
                ) -> Iterator[np.ndarray]:
    """Rows from ``scan()`` in (file, host) order, batch by batch, holding about ``memory`` bytes.

    ``scan`` returns an iterator over batches of a structured array (RUN_DTYPE
    by default; the field names say which fields hold the file index, host
    offset and length).  If all rows fit the budget, one scan and one sort do
    it.  Otherwise, with ``strategy="merge"`` (default) the one scan spills
    budget-sized sorted chunks to an unlinked temporary file and merges them;
    with ``strategy="rescan"`` it histograms host offsets and calls ``scan()``
    again once per host window (no temporary space, more table reads).
    """
    if strategy == "merge":
        yield from _sorted_merge(scan, memory=memory, stats=stats, file_field=file_field,
                                 host_field=host_field, length_field=length_field)
    elif strategy == "rescan":
        yield from _sorted_rescan(scan, file_sizes, memory=memory, stats=stats,
                                  file_field=file_field, host_field=host_field,
                                  length_field=length_field)
    else:
        raise ValueError(f"strategy must be 'merge' or 'rescan', not {strategy!r}")


def _key(rows: np.ndarray, file_field: str, host_field: str) -> np.ndarray:
    """One sortable uint64 per row: file index in the top 8 bits, host offset (< 2^56) below."""
    return (rows[file_field].astype(np.uint64) << np.uint64(56)) | rows[host_field]


def _sorted_merge(scan: Callable[[], Iterable[np.ndarray]], *, memory: int,
                  stats: PlanStats | None, file_field: str, host_field: str,
                  length_field: str) -> Iterator[np.ndarray]:
    import tempfile

    st = stats if stats is not None else PlanStats()
    cap = max(1024, memory // BYTES_PER_RUN)
    pending: list[np.ndarray] = []
    count = 0
    spill = None
    chunks: list[tuple[int, int]] = []   # (first row, rows) of each sorted chunk in the spill
    dtype = None
    st.passes += 1

    def sort(rows: np.ndarray) -> np.ndarray:
        return rows[np.argsort(_key(rows, file_field, host_field), kind="stable")]

    def flush() -> None:
        nonlocal spill, pending, count
        rows = sort(np.concatenate(pending))
        if spill is None:
            spill = tempfile.TemporaryFile(prefix="qcow2kit-sort-")
        first = sum(n for _, n in chunks)
        spill.seek(first * rows.dtype.itemsize)
        rows.tofile(spill)
        chunks.append((first, rows.shape[0]))
        pending, count = [], 0

    for batch in scan():
        if batch.shape[0] == 0:
            continue
        dtype = batch.dtype
        st.runs += batch.shape[0]
        st.data_bytes += int(batch[length_field].sum())
        pending.append(batch)
        count += batch.shape[0]
        if count >= cap:
            flush()
    if spill is None:
        if pending:
            st.windows += 1
            yield sort(np.concatenate(pending))
        return
    if pending:
        flush()
    assert spill is not None and dtype is not None
    # Bound the fan-in so that one block of every merged chunk fits the budget:
    # merge groups of chunks into longer chunks (appended to the spill) until few remain.
    fanin = max(2, cap // 256 - 1)
    try:
        while len(chunks) > fanin:
            merged_chunks = []
            for g in range(0, len(chunks), fanin):
                group = chunks[g:g + fanin]
                if len(group) == 1:
                    merged_chunks.append(group[0])
                    continue
                first = _spill_end(spill, dtype)
                total = 0
                for rows in _merge_chunks(spill, group, dtype, cap, file_field, host_field):
                    spill.seek((first + total) * dtype.itemsize)
                    rows.tofile(spill)
                    total += rows.shape[0]
                merged_chunks.append((first, total))
            chunks = merged_chunks
        for out in _merge_chunks(spill, chunks, dtype, cap, file_field, host_field):
            st.windows += 1
            yield out
    finally:
        spill.close()


def _spill_end(spill: Any, dtype: np.dtype) -> int:
    spill.seek(0, os.SEEK_END)
    return spill.tell() // dtype.itemsize


def _merge_chunks(spill: Any, chunks: list[tuple[int, int]], dtype: np.dtype, cap: int,
                  file_field: str, host_field: str) -> Iterator[np.ndarray]:
    """k-way merge of sorted chunks of the spill file, in sorted batches.

    A block of each chunk is kept in memory; everything up to the smallest
    "last key loaded" of the chunks not yet exhausted is final and goes out.
    """
    k = len(chunks)
    block = max(256, cap // (k + 1))
    item = dtype.itemsize
    pos = [0] * k
    bufs: list[np.ndarray] = [np.empty(0, dtype=dtype)] * k
    keys: list[np.ndarray] = [np.empty(0, dtype=np.uint64)] * k
    while True:
        for i, (first, n) in enumerate(chunks):
            if bufs[i].shape[0] == 0 and pos[i] < n:
                take = min(block, n - pos[i])
                spill.seek((first + pos[i]) * item)
                bufs[i] = np.fromfile(spill, dtype=dtype, count=take)
                keys[i] = _key(bufs[i], file_field, host_field)
                pos[i] += take
        live = [i for i in range(k) if bufs[i].shape[0]]
        if not live:
            break
        limits = [int(keys[i][-1]) for i in live if pos[i] < chunks[i][1]]
        parts = []
        pkeys = []
        for i in live:
            cut = (int(np.searchsorted(keys[i], np.uint64(min(limits)), side="right"))
                   if limits else bufs[i].shape[0])
            if cut:
                parts.append(bufs[i][:cut])
                pkeys.append(keys[i][:cut])
                bufs[i] = bufs[i][cut:]
                keys[i] = keys[i][cut:]
        if parts:
            out = np.concatenate(parts)
            yield out[np.argsort(np.concatenate(pkeys), kind="stable")]


def _sorted_rescan(scan: Callable[[], Iterable[np.ndarray]], file_sizes: list[int], *,
                   memory: int, stats: PlanStats | None = None,
                   file_field: str = "file", host_field: str = "host",
                   length_field: str = "length") -> Iterator[np.ndarray]:
    """The rescan strategy of :func:`sorted_runs`: histogram, then one scan per host window."""
    st = stats if stats is not None else PlanStats()
    cap = max(1, memory // BYTES_PER_RUN)
    nfiles = len(file_sizes)
    bucket_bits = [max(20, (max(sz, 1) // _BUCKETS_PER_FILE).bit_length()) for sz in file_sizes]
    nbuckets = [(max(sz, 1) >> b) + 1 for sz, b in zip(file_sizes, bucket_bits)]
    hist = [np.zeros(n, dtype=np.int64) for n in nbuckets]
    kept: list[np.ndarray] | None = []
    count = 0
    st.passes += 1
    for batch in scan():
        if batch.shape[0] == 0:
            continue
        count += batch.shape[0]
        st.runs += batch.shape[0]
        st.data_bytes += int(batch[length_field].sum())
        for f in np.unique(batch[file_field]).tolist():
            sel = batch[host_field][batch[file_field] == f] >> np.uint64(bucket_bits[f])
            b = np.minimum(sel, np.uint64(nbuckets[f] - 1)).astype(np.int64)
            hist[f] += np.bincount(b, minlength=nbuckets[f])
        if kept is not None:
            if count <= cap:
                kept.append(batch)
            else:
                kept = None
    if kept is not None:
        if kept:
            allruns = np.concatenate(kept)
            order = np.lexsort((allruns[host_field], allruns[file_field]))
            st.windows += 1
            yield allruns[order]
        return
    # Windows: consecutive buckets of one file whose runs fit the cap.
    for f in range(nfiles):
        h = hist[f]
        nz = np.flatnonzero(h)
        if nz.shape[0] == 0:
            continue
        b = int(nz[0])
        last = int(nz[-1])
        while b <= last:
            total = 0
            e = b
            while e <= last and (total == 0 or total + int(h[e]) <= cap):
                total += int(h[e])
                e += 1
            lo = np.uint64(b << bucket_bits[f])
            hi = np.uint64(e << bucket_bits[f]) if e <= last else np.uint64(np.iinfo(np.uint64).max)
            st.passes += 1
            st.windows += 1
            parts = []
            for batch in scan():
                m = (batch[file_field] == f) & (batch[host_field] >= lo) & (batch[host_field] < hi)
                if m.any():
                    parts.append(batch[m])
            if parts:
                win = np.concatenate(parts)
                yield win[np.argsort(win[host_field], kind="stable")]
            b = e
