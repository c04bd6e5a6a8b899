"""Units (clusters, hash blocks) assembled from pieces that come in any order.

A target that needs whole units (compression, block hashing) hands every piece of
guest data, and every range known to read as zeros, to :class:`Gather`; a unit is
returned once all of its bytes are known, whatever order its pieces came in.
"""

from __future__ import annotations

import threading

import numpy as np

_SECTOR = 512


class Gather:
    """Units of ``unit`` bytes of a guest disk of ``size`` bytes (the last may be shorter)."""

    def __init__(self, unit: int, size: int) -> None:
        self.unit = unit
        self.size = size
        self._lock = threading.Lock()
        self._partial: dict[int, tuple[bytearray, np.ndarray]] = {}

    def add(self, offset: int, length: int, data: memoryview | None
            ) -> list[tuple[int, bytearray | None]]:
        """Account ``data`` (or, when None, ``length`` bytes of zeros) at ``offset``; returns
        the units now complete as ``(index, content)``, content None for a whole unit of
        zeros that was never started (nothing was stored for it)."""
        u = self.unit
        end = min(offset + length, self.size)
        done: list[tuple[int, bytearray | None]] = []
        pos = offset
        with self._lock:
            while pos < end:
                k = pos // u
                lo, hi = pos - k * u, min(end, (k + 1) * u) - k * u
                ulen = min(u, self.size - k * u)
                entry = self._partial.get(k)
                if entry is None and data is None and lo == 0 and hi == ulen:
                    done.append((k, None))
                    pos = k * u + hi
                    continue
                if entry is None:
                    entry = self._partial[k] = (bytearray(ulen),
                                                np.zeros(-(-ulen // _SECTOR), dtype=bool))
                buf, known = entry
                if data is not None:
                    buf[lo:hi] = data[pos - offset:pos - offset + hi - lo]
                else:
                    buf[lo:hi] = bytes(hi - lo)
                known[lo // _SECTOR:-(-hi // _SECTOR)] = True
                if known.all():
                    del self._partial[k]
                    done.append((k, buf))
                pos = k * u + hi
        return done

    def rest(self) -> list[tuple[int, bytearray]]:
        """The units still incomplete (what is unknown reads as zeros), taken out."""
        with self._lock:
            out = sorted((k, buf) for k, (buf, _) in self._partial.items())
            self._partial.clear()
        return out
