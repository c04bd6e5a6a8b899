"""Comparing the guest content of two images, with qemu-img compare's verdicts.

``qemu-img compare`` (QEMU 7.2) walks both disks in guest order by block
status: ranges that both read as zeros are skipped, the others are read and
compared in 512-byte sectors, and the first mismatch is reported as the start
of its sector (counted from the start of the block-status chunk it lies in,
which is a multiple of 512 except after the odd end of a raw file).  When the
sizes differ, the common part is compared, then the rest of the larger disk
must read as zeros.  ``strict`` mode first requires equal sizes, then also
equal block status (QEMU's flags: allocated, zero, data, offset valid and
end-of-file) at every chunk.

Here the verdict is the same, but the work is different:

* the allocation of both images is known before any read (the mapper's
  batches, :mod:`qcow2kit.mapping`), so ranges that read as zeros are never
  read, on either side;
* the disk is taken in guest windows of ``window`` bytes (128 MiB, whole
  MiB so that no read job cuts a cluster), one after the other, so a
  mismatch in an early window ends the work early and memory is bounded by
  two window buffers: in each window the data of both images is read at the
  same time, each into its buffer (zeros where it stores none), a qcow2
  image in host order by the block-copy engine (16 reads in flight), a raw
  file front to back, and the two buffers are compared in one sweep.

The first differing byte of the first window that has one gives the offset.
Strict mode models ``bdrv_block_status_above`` from the mapper's runs
(:func:`first_status_mismatch`); a content mismatch before the first status
mismatch is still reported first, as qemu-img's chunk-by-chunk walk does.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from . import spec
from .blockcopy import DEFAULT_CHUNK, CopyJob, CopyTarget, read_source
from .errors import CopyIncompleteError
from .image import Image, RawImage
from .image.chain import FLAG_DATA, FLAG_OFFSET, FLAG_PRESENT, FLAG_ZERO
from .locks import ReadLocks
from .mapping import DEFAULT_MEMORY, EXTENT_DTYPE, resolved_batches
from .source import open_source

SECTOR = 512
DEFAULT_WINDOW = 128 << 20
#: reads in flight for a qcow2 image: a window's clusters lie all over a fragmented file
WORKERS = 16
#: bytes read from a raw file at once
RAW_CHUNK = 4 << 20
#: guest bytes whose block status is compared at once in strict mode
STATUS_WINDOW = 256 << 20

#: QEMU's block-status flags as compared in strict mode (BDRV_BLOCK_EOF's own bit here)
STATUS_EOF = 0x80

AnyImage = Image | RawImage


# ---------------------------------------------------------------------------- opening

#: Formats QEMU 7.2 knows (so a -f naming one is not an "Unknown driver") but qcow2kit
#: does not read.
QEMU_FORMATS = frozenset({
    "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write",
    "copy-on-read", "dmg", "file", "ftp", "ftps", "host_cdrom", "host_device", "http", "https",
    "iscsi", "luks", "nbd", "nfs", "null-aio", "null-co", "nvme", "parallels", "preallocate",
    "qcow", "qed", "quorum", "rbd", "replication", "snapshot-access", "ssh", "throttle",
    "vdi", "vhdx", "vmdk", "vpc", "vvfat"})


class FormatError(Exception):
    """An image cannot be opened in the format asked for (QEMU's words, without the
    ``Could not open 'NAME': `` prefix the caller adds)."""


def probe_format(path: str) -> str:
    """The format QEMU's probing finds for ``path``, of the two qcow2kit reads: qcow2
    (its magic) or raw (anything else)."""
    src = open_source(path)
    try:
        return "qcow2" if src.size >= 4 and src.read_at(0, 4) == spec.QCOW_MAGIC else "raw"
    finally:
        src.close()


def check_format(fmt: str) -> None:
    """Refuse a format qcow2kit cannot compare (a :class:`FormatError` in QEMU's words for a
    format QEMU does not know either)."""
    if fmt in ("qcow2", "raw"):
        return
    if fmt in QEMU_FORMATS:
        raise FormatError(f"qcow2kit reads only qcow2 and raw images, not {fmt}")
    raise FormatError(f"Unknown driver '{fmt}'")


def open_raw(path: str, *, force_share: bool = False) -> RawImage:
    """Open ``path`` as a raw image, locked as qemu-img locks what it reads."""
    src = open_source(path)
    try:
        ReadLocks(force_share=force_share).lock(src.fileno(), path, "raw",
                                                f"Could not open '{path}': ")
        return RawImage(src, path)
    except BaseException:
        src.close()
        raise


def guest_size(img: AnyImage) -> int:
    """The disk size qemu-img sees: a raw file's size rounded up to whole sectors."""
    if isinstance(img, RawImage):
        return -(-img.size // SECTOR) * SECTOR
    return img.size


# ---------------------------------------------------------------------------- result

@dataclass
class CompareResult:
    """What qemu-img compare would say.

    ``size_mismatch``: the sizes differ (a warning, or in strict mode the verdict);
    ``mismatch``: the offset of the first differing sector; ``status_mismatch``
    (strict mode): the offset where block status first differs.
    """

    size_mismatch: bool = False
    strict: bool = False
    #: the size of the shorter disk: a mismatch at or past it lies in the larger one's rest
    common_size: int = 0
    mismatch: int | None = None
    status_mismatch: int | None = None

    @property
    def identical(self) -> bool:
        return (self.mismatch is None and self.status_mismatch is None
                and not (self.strict and self.size_mismatch))


# ---------------------------------------------------------------------------- reading

class _Window(CopyTarget):
    """The guest bytes of ``[start, end)`` of one image, zeros where it stores none; the
    ranges that hold data are listed in ``pieces``."""

    zero_initialized = True
    threadsafe = True

    def __init__(self, size: int, start: int, end: int) -> None:
        self.size = size
        self.start = start
        # zeroed pages from the kernel, only touched where data is written
        self.buf: memoryview = np.zeros(end - start, np.uint8).data
        self.pieces: list[tuple[int, int]] = []

    def write(self, offset: int, data: memoryview) -> None:
        at = offset - self.start
        self.buf[at:at + len(data)] = data
        self.pieces.append((offset, len(data)))

    def write_zeroes(self, offset: int, length: int, *, allocate: bool = False) -> None:
        pass


def _first_diff(a: memoryview | bytearray, b: memoryview | bytes) -> int | None:
    """Index of the first byte where ``a`` and ``b`` (same length) differ, or None."""
    x = np.frombuffer(a, np.uint8)
    y = np.frombuffer(b, np.uint8)
    n8 = len(x) // 8 * 8
    if n8 and not np.array_equal(x[:n8].view(np.uint64), y[:n8].view(np.uint64)):
        return int(np.flatnonzero(x[:n8] != y[:n8])[0])
    if n8 < len(x) and not np.array_equal(x[n8:], y[n8:]):
        return n8 + int(np.flatnonzero(x[n8:] != y[n8:])[0])
    return None


def _first_nonzero(a: memoryview | bytearray) -> int | None:
    x = np.frombuffer(a, np.uint8)
    n8 = len(x) // 8 * 8
    if n8 and x[:n8].view(np.uint64).any():
        return int(np.flatnonzero(x[:n8])[0])
    if n8 < len(x) and x[n8:].any():
        return n8 + int(np.flatnonzero(x[n8:])[0])
    return None


def _merged(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(start, end)`` of the union of ``(offset, length)`` pieces, sorted."""
    out: list[tuple[int, int]] = []
    for a, n in sorted(pieces):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], a + n))
        else:
            out.append((a, a + n))
    return out


def _first_difference(first: _Window, second: _Window, lo: int, hi: int) -> int | None:
    """The first guest offset of ``[lo, hi)`` where two windows differ (only where one of
    them holds data: elsewhere both are zeros)."""
    base = first.start
    x, y = first.buf, second.buf
    if lo == base and len(x) == len(y) == hi - lo:   # a whole window: one sweep
        d = _first_diff(x, y)
        return None if d is None else base + d
    for a, b in _merged(first.pieces + second.pieces):
        a, b = max(a, lo), min(b, hi)
        if a >= b:
            continue
        d = _first_diff(x[a - base:b - base], y[a - base:b - base])
        if d is not None:
            return a + d
    return None


def _first_nonzero_data(win: _Window, lo: int, hi: int) -> int | None:
    """The first guest offset of ``[lo, hi)`` in a window that is not zero."""
    x = win.buf
    for a, b in _merged(win.pieces):
        a, b = max(a, lo), min(b, hi)
        if a >= b:
            continue
        d = _first_nonzero(x[a - win.start:b - win.start])
        if d is not None:
            return a + d
    return None


def _run_job(img: Image, target: CopyTarget, start: int, end: int, *, memory: int,
             workers: int) -> None:
    """Hand the guest bytes of ``[start, end)`` of ``img`` to ``target`` (read in host order)."""
    source = read_source(img, "host", memory=memory, start=start, length=end - start)
    job = CopyJob(source, target, workers=workers, min_sparse=0)
    if start:
        job.bitmap.clear(0, start)
    if end < img.size:
        job.bitmap.clear(end, img.size - end)
    result = job.run()
    if result.failed:
        f = result.failed[0]
        raise CopyIncompleteError(
            f"{img.filename}: {len(result.failed)} range(s) could not be read, first {f}",
            result.failed, path=img.filename)
    if result.stopped is not None:
        raise result.stopped


def _raw_regions(img: RawImage, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """``(offset, length, data)`` ranges of a raw file covering ``[start, end)``: its data
    regions (SEEK_DATA/SEEK_HOLE) and, as not data, its holes and what lies past its end."""
    fd = img.src.fileno()
    pos = start
    fsize = img.size
    while pos < end:
        if pos >= fsize:
            yield pos, end - pos, False
            return
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            d = fsize
        d = min(d, end)
        if d > pos:
            yield pos, d - pos, False
            pos = d
            continue
        h = min(os.lseek(fd, d, os.SEEK_HOLE), end, fsize)
        yield d, h - d, True
        pos = h


def _load_raw(img: RawImage, win: _Window, start: int, end: int) -> None:
    """Read the data regions of ``[start, end)`` of a raw file into ``win``, front to back
    (its holes, and what lies past its end, stay zeros)."""
    buf = memoryview(win.buf)
    for off, n, data in _raw_regions(img, start, end):
        if not data:
            continue
        for pos in range(off, off + n, RAW_CHUNK):
            k = min(RAW_CHUNK, off + n - pos)
            img.src.readinto_at(pos, buf[pos - win.start:pos - win.start + k],
                                field="raw data")
        win.pieces.append((off, n))


def _load(img: AnyImage, start: int, end: int, *, memory: int, workers: int) -> _Window:
    """The guest bytes of ``[start, end)`` (and on to the next 1 MiB) of ``img``: its data
    read (a qcow2 image in host order), zeros elsewhere.  ``start`` must be a multiple of
    1 MiB."""
    # read up to a whole 1 MiB (or the end of the disk): a read job must not cut a cluster
    stop = min(guest_size(img), -(-end // DEFAULT_CHUNK) * DEFAULT_CHUNK)
    win = _Window(guest_size(img), start, stop)
    if isinstance(img, RawImage):
        _load_raw(img, win, start, stop)
    else:
        _run_job(img, win, start, stop, memory=memory, workers=workers)
    return win


def _sector(offset: int, odd_ends: list[int]) -> int:
    """The offset qemu-img names for a difference at byte ``offset``: the start of its
    sector, or, past the end of a raw file whose size is not a multiple of 512 but inside
    the sector that size is rounded up to, that end (where a block-status chunk starts)."""
    for end in odd_ends:
        if end <= offset < end + SECTOR - end % SECTOR:   # in the sector the end rounds up to
            return end
    return offset // SECTOR * SECTOR


def _odd_ends(*images: AnyImage) -> list[int]:
    ends = []
    for img in images:
        for layer in ([img] if isinstance(img, RawImage) else img.chain()):
            if isinstance(layer, RawImage) and layer.size % SECTOR:
                ends.append(layer.size)
    return ends


# ---------------------------------------------------------------------------- status (-s)

def _chain(img: AnyImage) -> list[AnyImage]:
    return [img] if isinstance(img, RawImage) else img.chain()


def _spans(img: AnyImage) -> list[int]:
    """The guest bytes one L2 table of each layer maps (QEMU's block status never crosses
    one); 0 for a raw layer."""
    return [layer.cluster_size << layer.geometry.l2_bits if isinstance(layer, Image) else 0
            for layer in _chain(img)]


def _status_runs(img: AnyImage, start: int, end: int, memory: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, status) of ``[start, end)``: QEMU's block status above no base, as
    ``bdrv_block_status_above`` returns it (EOF left out)."""
    chain = _chain(img)
    has_backing = np.array([layer.backing is not None for layer in chain], bool)
    parts = list(resolved_batches(img, start, min(end, img.size) - start, memory=memory))
    if end > img.size:   # the sector a raw file's odd end is rounded up to: a hole
        tail = np.zeros(1, dtype=EXTENT_DTYPE)
        tail["start"] = max(start, img.size)
        tail["length"] = end - max(start, img.size)
        tail["flags"] = FLAG_PRESENT | FLAG_ZERO | FLAG_OFFSET
        parts.append(tail)
    runs = np.concatenate(parts) if parts else np.zeros(0, dtype=EXTENT_DTYPE)
    f = runs["flags"]
    status = f & np.uint8(FLAG_PRESENT | FLAG_ZERO | FLAG_DATA | FLAG_OFFSET)
    # Past the end of a shorter backing file: the layer below answers "zero, allocated"
    # (QEMU synthesizes those zeros there), without an offset.
    past = (((f & np.uint8(FLAG_ZERO)) != 0) & ((f & np.uint8(FLAG_PRESENT)) == 0)
            & has_backing[runs["depth"].astype(np.intp)])
    status = np.where(past, np.uint8(FLAG_ZERO | FLAG_PRESENT), status).astype(np.uint8)
    s = runs["start"].astype(np.int64)
    return s, s + runs["length"].astype(np.int64), status


def _last_extent_start(img: AnyImage, size: int, memory: int) -> int:
    """Where the block-status extent that ends at the end of the disk (BDRV_BLOCK_EOF)
    starts."""
    if size == 0:
        return 0
    spans = _spans(img)
    lo = max(0, size - max(max(spans), 1 << 20))
    starts, _, status = _status_runs(img, lo, size, memory)
    i = len(starts) - 1
    if i < 0:
        return lo
    last = int(starts[i])
    # a run of unallocated entries may cover several L2 tables: QEMU stops at each
    for depth in range(len(spans)):
        if spans[depth]:
            last = max(last, (size - 1) // spans[depth] * spans[depth])
    return last


def first_status_mismatch(a: AnyImage, b: AnyImage, *, memory: int = DEFAULT_MEMORY
                          ) -> int | None:
    """The first offset where the block status of the two images (of equal size) differs,
    as strict mode sees it (QEMU's flags, end-of-file included), or None."""
    size = guest_size(a)
    eof_a = _last_extent_start(a, size, memory)
    eof_b = _last_extent_start(b, size, memory)
    for w in range(0, size, STATUS_WINDOW):
        w1 = min(size, w + STATUS_WINDOW)
        sa, ea, ta = _status_runs(a, w, w1, memory)
        sb, eb, tb = _status_runs(b, w, w1, memory)
        points = np.union1d(np.union1d(sa, sb), [p for p in (eof_a, eof_b) if w <= p < w1])
        va = ta[np.searchsorted(ea, points, side="right")] | np.where(
            points >= eof_a, STATUS_EOF, 0).astype(np.uint8)
        vb = tb[np.searchsorted(eb, points, side="right")] | np.where(
            points >= eof_b, STATUS_EOF, 0).astype(np.uint8)
        diff = np.flatnonzero(va != vb)
        if diff.shape[0]:
            return int(points[diff[0]])
    return None


# ---------------------------------------------------------------------------- compare

def compare(a: AnyImage, b: AnyImage, *, strict: bool = False,
            window: int = DEFAULT_WINDOW, memory: int = DEFAULT_MEMORY,
            workers: int = WORKERS,
            progress: Callable[[float], None] | None = None) -> CompareResult:
    """Compare the guest content of ``a`` and ``b`` as ``qemu-img compare`` does.

    ``progress`` is called with the fraction (0 to 1) of the larger disk done after each
    window.  A read that keeps failing raises
    :class:`qcow2kit.errors.CopyIncompleteError`.
    """
    if window <= 0 or window % DEFAULT_CHUNK:
        # the engine's job clusters divide 1 MiB: a window never cuts one
        raise ValueError(f"window must be a positive multiple of 1 MiB, not {window}")
    size_a, size_b = guest_size(a), guest_size(b)
    result = CompareResult(size_mismatch=size_a != size_b, strict=strict,
                           common_size=min(size_a, size_b))
    if strict and result.size_mismatch:
        return result
    common = min(size_a, size_b)
    total = max(size_a, size_b) or 1
    odd = _odd_ends(a, b)
    limit = common
    if strict:
        result.status_mismatch = first_status_mismatch(a, b, memory=memory)
        if result.status_mismatch is not None:
            # a content mismatch before it is found first (windows end on whole 1 MiB)
            limit = min(common, -(-(result.status_mismatch + 1) // DEFAULT_CHUNK)
                        * DEFAULT_CHUNK)
    load = functools.partial(_load, memory=memory, workers=workers)
    with ThreadPoolExecutor(1) as pool:      # the second image is read meanwhile
        for w in range(0, limit, window):
            w1 = min(limit, w + window)
            pending = pool.submit(load, b, w, w1)
            try:
                first = load(a, w, w1)
            finally:
                second = pending.result()
            diff = _first_difference(first, second, w, w1)
            del first, second
            if diff is None:
                if progress is not None:
                    progress(w1 / total)
                continue
            mismatch = _sector(diff, odd)
            if result.status_mismatch is None or mismatch < result.status_mismatch:
                result.mismatch = mismatch
                result.status_mismatch = None
            return result
    if result.status_mismatch is not None:
        return result
    if size_a != size_b:
        over = a if size_a > size_b else b
        for w in range(common // DEFAULT_CHUNK * DEFAULT_CHUNK, total, window):
            w1 = min(total, w + window)
            d = _first_nonzero_data(load(over, w, w1), max(w, common), w1)
            if d is not None:
                result.mismatch = _sector(d, odd)
                return result
            if progress is not None:
                progress(w1 / total)
    return result
