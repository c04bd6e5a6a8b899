"""The copy bitmap: one bit per job cluster, set while that cluster is still to be copied.

As in QEMU's block-copy, a task is cut from the set bits and clears them when
it is created (so two tasks never cover the same cluster), a failed task sets
its bits again, and a discard clears bits so that the range is never copied.

Bits are packed eight to a byte (numpy ``uint8``, little bit order: bit ``i``
is ``bits[i >> 3] >> (i & 7) & 1``), so the bitmap of a 1 TiB disk with 64 KiB
job clusters takes 2 MiB.  Every operation works on a byte range (edge bytes
masked, whole bytes assigned), never per bit in Python.

The class is not thread-safe by itself: the engine calls it under its lock.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..boolruns import true_runs

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


_SMALL = 64                 # ranges of up to this many bits take the plain-integer path


class CopyBitmap:
    """Bits over ``[0, size)`` in clusters of ``granularity`` bytes (the last may be partial).

    Byte ranges passed in are rounded outwards to whole clusters; ranges
    coming out are clipped to ``size``.
    """

    def __init__(self, size: int, granularity: int, *, fill: bool = True) -> None:
        if granularity <= 0 or granularity & (granularity - 1):
            raise ValueError(f"granularity must be a power of two, not {granularity}")
        if size < 0:
            raise ValueError(f"size must not be negative, not {size}")
        self.size = size
        self.granularity = granularity
        self.nbits = -(-size // granularity)
        self._bits = np.zeros(-(-self.nbits // 8), dtype=np.uint8)
        self._mv = self._bits.data             # the same bytes, for the plain-integer paths
        if fill:
            self._set_bits(0, self.nbits, True)

    @property
    def nbytes(self) -> int:
        """Memory the bits take."""
        return int(self._bits.nbytes)

    # ------------------------------------------------------------------ bit ranges

    def _bit_range(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length < 0:
            raise ValueError(f"bad range {offset:#x}+{length:#x}")
        g = self.granularity
        lo = min(offset // g, self.nbits)
        hi = min(-(-(offset + length) // g), self.nbits)
        return lo, max(lo, hi)

    def _set_bits(self, lo: int, hi: int, value: bool) -> None:
        if lo >= hi:
            return
        b = self._bits
        first, last = lo >> 3, (hi - 1) >> 3
        if first == last:
            mask = np.uint8(((1 << (hi - lo)) - 1) << (lo & 7))
            b[first] = (b[first] | mask) if value else (b[first] & ~mask)
            return
        head = np.uint8((0xFF << (lo & 7)) & 0xFF)
        tail = np.uint8((1 << (((hi - 1) & 7) + 1)) - 1)
        b[first] = (b[first] | head) if value else (b[first] & ~head)
        b[last] = (b[last] | tail) if value else (b[last] & ~tail)
        b[first + 1:last] = 0xFF if value else 0

    def _get_bits(self, lo: int, hi: int) -> np.ndarray:
        """The bits [lo, hi) as a bool array."""
        if lo >= hi:
            return np.zeros(0, dtype=bool)
        first = lo >> 3
        chunk = np.unpackbits(self._bits[first:((hi - 1) >> 3) + 1], bitorder="little")
        return chunk[lo - (first << 3):hi - (first << 3)].astype(bool)

    # ------------------------------------------------------------------ byte ranges

    def set(self, offset: int, length: int) -> None:
        """Mark ``[offset, offset+length)`` as still to copy."""
        self._set_bits(*self._bit_range(offset, length), True)

    def clear(self, offset: int, length: int) -> None:
        """Mark ``[offset, offset+length)`` as done (or not to be copied)."""
        self._set_bits(*self._bit_range(offset, length), False)

    def runs(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The runs of set bits inside the range, as ``(offset, length)`` byte ranges.

        Only whole clusters count; the range should be cluster-aligned (the
        engine's ranges are: the granularity divides every boundary of the
        image's layers).
        """
        lo, hi = self._bit_range(offset, length)
        g = self.granularity
        if hi - lo <= _SMALL:
            return self._small_runs(lo, hi, offset, length)
        bits = self._get_bits(lo, hi)
        if not bits.any():
            return []
        rises, falls = true_runs(bits)
        out = []
        for r, f in zip(rises.tolist(), falls.tolist()):
            a = max((lo + r) * g, offset)
            b = min((lo + f) * g, offset + length, self.size)
            if b > a:
                out.append((a, b - a))
        return out

    def _small_runs(self, lo: int, hi: int, offset: int, length: int) -> list[tuple[int, int]]:
        """:meth:`runs` for at most ``_SMALL`` bits, in plain integers: a task usually covers a
        few clusters, and numpy's per-call cost dominated there."""
        if lo >= hi:
            return []
        first = lo >> 3
        word = int.from_bytes(self._mv[first:((hi - 1) >> 3) + 1], "little")
        word = (word >> (lo - (first << 3))) & ((1 << (hi - lo)) - 1)
        return self._word_runs(word, lo, hi, offset, length)

    def _word_runs(self, word: int, lo: int, hi: int, offset: int, length: int
                   ) -> list[tuple[int, int]]:
        """The runs of ``word``, the bits [lo, hi) (bit 0 is bit ``lo``), as byte ranges."""
        if not word:
            return []
        g, end = self.granularity, min(offset + length, self.size)
        nb = hi - lo
        if word == (1 << nb) - 1:         # all set: the usual case
            a, b = max(lo * g, offset), min(hi * g, end)
            return [(a, b - a)] if b > a else []
        out = []
        i = 0
        while i < nb:
            if not (word >> i) & 1:
                i += 1
                continue
            j = i
            while j < nb and (word >> j) & 1:
                j += 1
            a = max((lo + i) * g, offset)
            b = min((lo + j) * g, end)
            if b > a:
                out.append((a, b - a))
            i = j
        return out

    def take(self, offset: int, length: int) -> list[tuple[int, int]]:
        """:meth:`runs` of the range, cleared: what a new task takes over."""
        g = self.granularity
        if offset < 0 or length < 0:
            raise ValueError(f"bad range {offset:#x}+{length:#x}")
        end = offset + length
        lo = offset // g
        hi = -(-end // g)
        if hi > self.nbits:
            hi = self.nbits
        if hi - lo > _SMALL:
            out = self.runs(offset, length)
            for a, n in out:
                self.clear(a, n)
            return out
        if lo >= hi or not length:
            return []
        # A task's range (the engine takes one per piece of a read, thousands a second):
        # its bytes read, tested and cleared as one integer, no numpy call.  Every set bit
        # of [lo, hi) meets the range, so clearing them all is clearing what is returned.
        first, stop = lo >> 3, ((hi - 1) >> 3) + 1
        mv = self._mv
        word = int.from_bytes(mv[first:stop], "little")
        shift = lo - (first << 3)
        mask = ((1 << (hi - lo)) - 1) << shift
        sel = word & mask
        if not sel:
            return []
        mv[first:stop] = (word & ~mask).to_bytes(stop - first, "little")
        if sel == mask:                   # all set: the usual case
            a, b = lo * g, hi * g
            if a < offset:
                a = offset
            if b > end:
                b = end
            if b > self.size:
                b = self.size
            return [(a, b - a)]
        return self._word_runs(sel >> shift, lo, hi, offset, length)

    def count(self) -> int:
        """Bytes still marked (whole clusters, the last clipped to ``size``)."""
        n = int(_POPCOUNT[self._bits].sum(dtype=np.int64))   # bits past nbits are never set
        if n and self.nbits and self._get_bits(self.nbits - 1, self.nbits)[0]:
            return n * self.granularity - (self.nbits * self.granularity - self.size)
        return n * self.granularity

    def iter_runs(self, window: int = 1 << 30) -> Iterator[tuple[int, int]]:
        """Every run of set bits, in order, a window of bytes at a time (merged across windows)."""
        pend: tuple[int, int] | None = None
        step = max(self.granularity, window // self.granularity * self.granularity)
        for pos in range(0, self.size, step):
            for a, n in self.runs(pos, min(step, self.size - pos)):
                if pend is not None and pend[0] + pend[1] == a:
                    pend = (pend[0], pend[1] + n)
                else:
                    if pend is not None:
                        yield pend
                    pend = (a, n)
        if pend is not None:
            yield pend
