"""A new qcow2 image as the engine's target, written by the image builder.

:class:`Qcow2Target` turns the engine's calls into the builder's:

- plain copies: before the copy, :func:`reserve_data` reserves a host cluster
  for every target cluster the source has data in, in guest order; the workers
  then :meth:`~qcow2kit.builder.ImageBuilder.fill` them in whatever order the
  source is read (host order), straight to their place.  The image comes out
  unfragmented, as qemu-img's does, while the source was read front to back.
  A reserved cluster that only ever received zeros becomes an allocated zero
  cluster at the end (qemu-img leaves it unallocated; freeing it would leave a
  gap that makes the image fragmented);
- ``compress``: each target cluster is gathered until all of it is known (data,
  or zeros), compressed in the worker's thread (zlib and zstd release the GIL)
  and queued; compressed streams are packed in the order clusters complete.
  A cluster of zeros is left unallocated;
- ``zeros="hide"`` (``-B``): what the source reads as zeros is written as zero
  clusters (the backing file may have data there), or, in a version 2 image,
  which has none, as clusters of zeros.  The ranges the backing file provides
  are not the target's business: the caller never marks them for copying;
- ``zeros="zero"`` (``-n``, an existing image): zero clusters in a version 3
  image (as qemu-img writes them there), nothing in a version 2 one;
- ``zeros="none"`` (a new image without backing file): nothing, it reads zeros.

``discard`` makes a range read as zeros whatever was written there before.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np

from ..boolruns import true_runs
from ..builder import ImageBuilder, compress_cluster
from ..errors import Qcow2Error
from .gather import Gather
from .target import CopyTarget

_SECTOR = 512
_ZCHUNK = 1 << 16


class Qcow2Target(CopyTarget):
    """Guest data into the image ``builder`` is building (see the module docstring)."""

    threadsafe = True

    def __init__(self, builder: ImageBuilder, *, compress: bool = False,
                 zeros: str = "none") -> None:
        if zeros not in ("none", "zero", "hide"):
            raise ValueError(f"zeros must be 'none', 'zero' or 'hide', not {zeros!r}")
        self.b = builder
        self.size = builder.size
        self.cs = builder.cluster_size
        self.sparse_block = self.cs      # whole clusters hold data, as qemu-img writes them
        self.compress = compress
        self.zeros = zeros
        # A new image without a backing file reads zeros wherever nothing was written;
        # compression needs every byte of a cluster accounted for, so it hears of zeros too.
        self.zero_initialized = zeros == "none" and not compress
        self.codec = builder.compression_type
        self.writes = 0
        self.bytes_written = 0
        self._lock = threading.Lock()
        # clusters partly filled -> which sectors were (the rest is written as zeros at the
        # end, so no cluster is left with a hole, as in qemu-img's output)
        self._part: dict[int, np.ndarray] = {}
        # compress: clusters gathered until all of each is known
        self._gather = Gather(self.cs, self.size)
        self._emitted: set[int] = set()
        # backing: clusters that read as zeros unless data fills them (settled at the end),
        # in chunks of _ZCHUNK clusters
        self._zeroed: dict[int, np.ndarray] = {}

    # -- the engine's side ----------------------------------------------------------

    def write(self, offset: int, data: memoryview) -> None:
        if self.compress:
            self._gathered(offset, data)
        else:
            self.b.fill(offset, data)
            self._partly(offset, len(data))
        with self._lock:
            self.writes += 1
            self.bytes_written += len(data)

    def write_zeroes(self, offset: int, length: int, *, allocate: bool = False) -> None:
        if length <= 0:
            return
        if self.compress:
            self._gathered(offset, None, length)
        elif allocate:             # -S 0: every cluster allocated, zeros stored
            self._store_zeros(offset, length)
        elif self.zeros != "none":
            self._note_zeros(offset, length)
        # else: a new image without backing file reads zeros there already

    def discard(self, offset: int, length: int) -> None:
        """Make the range read as zeros, also where data was already written."""
        if length <= 0:
            return
        cs = self.cs
        first = offset // cs
        if self.compress:
            last = -(-(offset + length) // cs)
            with self._lock:
                late = sorted(c for c in range(first, last) if c in self._emitted)
            if late:
                raise Qcow2Error(f"guest cluster {late[0]} is already compressed into the "
                                 f"image: a discard cannot take it back")
            self._gathered(offset, None, length)
            return
        for k in np.flatnonzero(self.b.filled(offset, length)).tolist():
            c = first + k
            lo, hi = max(offset, c * cs), min(offset + length, (c + 1) * cs, self.size)
            self.b.fill(lo, memoryview(bytes(hi - lo)))
        if self.zeros != "none":
            self._note_zeros(offset, length)

    def flush(self) -> None:
        self.b.flush()

    # -- the end ----------------------------------------------------------------------

    def finish(self) -> None:
        """Complete the image: what is still gathered, then reserved clusters never filled
        given up, then (``zeros``) zero clusters where the source reads zeros, then the
        builder's finish."""
        for c, buf in self._gather.rest():
            self._emit(c, buf)
        for c in sorted(self._part):
            known = self._part.pop(c)
            starts, ends = true_runs(~known)
            for a, e in zip(starts.tolist(), ends.tolist()):
                lo, hi = c * self.cs + a * _SECTOR, min(c * self.cs + e * _SECTOR, self.size)
                self.b.fill(lo, memoryview(bytes(hi - lo)))
        # kept in place as zero clusters: the image stays unfragmented
        self.b.unreserve(keep=True)
        cs = self.cs
        for k in sorted(self._zeroed):
            base = k * _ZCHUNK
            z = self._zeroed[k]
            zero = z & ~self.b.reserved(base * cs, min(len(z) * cs, self.size - base * cs))
            starts, ends = true_runs(zero)
            for a, e in zip(starts.tolist(), ends.tolist()):
                self._zero_clusters(base + a, base + e)
        self.b.finish()

    # -- internals ----------------------------------------------------------------------

    def _partly(self, offset: int, length: int) -> None:
        """Note the parts of the first and last cluster of a fill that cover them partly."""
        cs = self.cs
        end = offset + length
        edges = {offset // cs, (end - 1) // cs}
        for c in edges:
            lo, hi = max(offset, c * cs), min(end, (c + 1) * cs)
            clen = min(cs, self.size - c * cs)
            if hi - lo == clen:
                continue
            with self._lock:
                known = self._part.get(c)
                if known is None:
                    known = self._part[c] = np.zeros(-(-clen // _SECTOR), dtype=bool)
                known[(lo - c * cs) // _SECTOR:-(-(hi - c * cs) // _SECTOR)] = True
                if known.all():
                    del self._part[c]

    def _store_zeros(self, offset: int, length: int) -> None:
        chunk = 1 << 20
        zeros = memoryview(bytes(min(chunk, length)))
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(zeros), end - pos)
            self.b.fill(pos, zeros[:n])
            pos += n

    def _note_zeros(self, offset: int, length: int) -> None:
        cs = self.cs
        end = min(offset + length, self.size)
        first, last = offset // cs, -(-end // cs)
        with self._lock:
            while first < last:
                k = first // _ZCHUNK
                m = min(last, (k + 1) * _ZCHUNK) - first
                z = self._zeroed.get(k)
                if z is None:
                    n = min(_ZCHUNK, self.b.guest_clusters - k * _ZCHUNK)
                    z = self._zeroed[k] = np.zeros(n, dtype=bool)
                z[first - k * _ZCHUNK:first - k * _ZCHUNK + m] = True
                first += m

    def _zero_clusters(self, first: int, end: int) -> None:
        """Zero clusters ``[first, end)`` (clusters of zeros in a version 2 image)."""
        cs = self.cs
        a, b = first * cs, min(end * cs, self.size)
        if self.b.options.version >= 3:
            self.b.write_zero(a, b - a)
        elif self.zeros == "zero":
            return                 # a version 2 image without backing file: reads zeros
        else:
            zeros = bytes(min(b - a, 1 << 20))
            for pos in range(a, b, len(zeros)):
                self.b.write(pos, zeros[:min(len(zeros), b - pos)])

    def _gathered(self, offset: int, data: memoryview | None, length: int = 0) -> None:
        """Account ``data`` (or ``length`` bytes of zeros) to the clusters it falls in;
        compress and queue every cluster that is complete."""
        done = self._gather.add(offset, len(data) if data is not None else length, data)
        with self._lock:
            self._emitted.update(c for c, buf in done if buf is not None)
        for c, complete in done:
            self._emit(c, complete)

    def _emit(self, c: int, buf: bytearray | None) -> None:
        if buf is None or not np.frombuffer(buf, dtype=np.uint64).any():
            if self.zeros != "none":
                self._note_zeros(c * self.cs, self.cs)
            return
        if len(buf) < self.cs:            # the image's last cluster, zero-padded
            buf += bytes(self.cs - len(buf))
        packed = compress_cluster(bytes(buf), self.codec)
        self.b.write_packed(c * self.cs, memoryview(buf), packed)


def reserve_data(builder: ImageBuilder, runs: Iterable[tuple[int, int]]) -> int:
    """Reserve the target clusters of guest ranges ``runs`` (in guest order: the image
    comes out unfragmented); returns the clusters reserved."""
    return builder.reserve_runs(runs)


__all__ = ["Qcow2Target", "reserve_data"]
