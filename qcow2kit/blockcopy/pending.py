"""What a resumable copy still has to do, kept durable as the copy goes.

A copy that may be killed at any moment keeps a *pending* bitmap: one bit per
granule of the guest disk, set while the granule is still to copy.
:class:`PendingMap` holds it in memory and hears from the engine which guest
ranges each task wrote (``CopyJob(on_copied=...)``); a granule is done when
every byte of it has been written.  :class:`Checkpointer` makes that durable
in the only safe order: first the target is flushed (the data is on disk),
then the done granules' bits are cleared in the store and the store flushed.
A kill at any moment therefore leaves a bitmap in which every cleared bit's
data is on disk; a resumed copy redoes at most what finished after the last
checkpoint (the tasks in flight, and those done within ``interval`` seconds).

A store keeps the bits: :class:`JournalStore` is a small file beside a raw
target (:mod:`qcow2kit.layout.journal`), replaced atomically (write, fsync,
rename, fsync of the directory); a qcow2 target keeps them in a persistent
bitmap of its own (see :mod:`qcow2kit.backup`).  Bits are QEMU's bitmap bits:
bit ``i`` is bit ``i % 8`` of byte ``i // 8``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from typing import Callable, Protocol

import numpy as np

from ..boolruns import true_runs
from ..errors import Qcow2Error
from ..layout.journal import Journal, bitmap_length, decode_journal, encode_journal
from .engine import CopyResult
from .target import CopyTarget

#: at most this many granules: a bigger disk gets a coarser pending bitmap
MAX_GRANULES = 1 << 24


def pending_granularity(size: int, cluster_size: int) -> int:
    """The granule of a pending bitmap: the cluster size, doubled until the disk has at most
    :data:`MAX_GRANULES` of them (a granule is a power of two of at least 512 bytes)."""
    g = max(512, cluster_size)
    while -(-size // g) > MAX_GRANULES:
        g <<= 1
    return g


def pack_bits(todo: np.ndarray) -> bytes:
    return np.packbits(todo, bitorder="little").tobytes()


def unpack_bits(raw: bytes, count: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    return bits[:count].astype(bool)


class PendingMap:
    """The granules of a copy still to do, and those done since the last checkpoint.

    Thread-safe: :meth:`note` is called by the engine's workers.
    """

    def __init__(self, size: int, granularity: int, todo: np.ndarray) -> None:
        if granularity & (granularity - 1) or granularity < 512:
            raise ValueError(f"granularity {granularity} is not a power of two >= 512")
        self.size = size
        self.granularity = granularity
        self.count = -(-size // granularity) if size else 0
        if todo.shape != (self.count,):
            raise ValueError(f"{todo.shape[0]} bits for {self.count} granules")
        self.todo = todo.astype(bool, copy=True)     # the durable state (as last saved)
        self._done = np.zeros(self.count, dtype=bool)
        self._part: dict[int, int] = {}              # granule -> bytes written so far
        self._lock = threading.Lock()

    @classmethod
    def from_runs(cls, size: int, granularity: int,
                  runs: Iterable[tuple[int, int]]) -> "PendingMap":
        """Pending wherever a granule meets one of the guest ``runs``."""
        count = -(-size // granularity) if size else 0
        todo = np.zeros(count, dtype=bool)
        for a, n in runs:
            if n > 0:
                todo[a // granularity:-(-min(a + n, size) // granularity)] = True
        return cls(size, granularity, todo)

    @classmethod
    def from_journal(cls, j: Journal) -> "PendingMap":
        """The map a journal keeps."""
        count = -(-j.size >> j.granularity_bits) if j.size else 0
        return cls(j.size, 1 << j.granularity_bits, unpack_bits(j.bitmap, count))

    def _glen(self, i: int) -> int:
        return min(self.granularity, self.size - i * self.granularity)

    def note(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Guest ``ranges`` were written (not yet durable)."""
        g = self.granularity
        with self._lock:
            for a, n in ranges:
                end = min(a + n, self.size)
                if a >= end:
                    continue
                lo, hi = -(-a // g), end // g if end != self.size else self.count
                if hi > lo:
                    self._done[lo:hi] = True
                # pieces of granules, counted until the granule is complete
                if lo > hi:                                  # inside one granule
                    pieces = [(a // g, end - a)]
                else:
                    pieces = [(a // g, min(lo * g, end) - a)] if a < lo * g else []
                    if hi < self.count and end > hi * g:
                        pieces.append((hi, end - hi * g))
                for i, m in pieces:
                    got = self._part.get(i, 0) + m
                    if got >= self._glen(i):
                        self._part.pop(i, None)
                        self._done[i] = True
                    else:
                        self._part[i] = got

    def take_done(self) -> np.ndarray:
        """Indexes of pending granules done since the last call (their bits not yet cleared)."""
        with self._lock:
            idx = np.flatnonzero(self._done & self.todo)
            self._done[:] = False
            return idx

    def cleared(self, idx: np.ndarray) -> None:
        """The bits of granules ``idx`` are durably cleared."""
        with self._lock:
            self.todo[idx] = False

    def runs(self) -> list[tuple[int, int]]:
        """The pending guest ranges (by the durable state), merged."""
        g = self.granularity
        starts, ends = true_runs(self.todo)
        return [(s * g, min(e * g, self.size) - s * g)
                for s, e in zip(starts.tolist(), ends.tolist())]

    @property
    def pending_bytes(self) -> int:
        return sum(n for _, n in self.runs())


class PendingStore(Protocol):
    """Where the pending bits are kept durable."""

    def save(self, todo: np.ndarray, changed: np.ndarray) -> None:
        """Make ``todo`` durable; ``changed`` are the granules whose bits were cleared."""


class JournalStore:
    """The pending bits in a journal file beside a raw target (see the module docstring)."""

    def __init__(self, path: str, size: int, granularity: int, tag: bytes) -> None:
        self.path = path
        self.size = size
        self.granularity = granularity
        self.tag = tag

    @staticmethod
    def load(path: str) -> Journal | None:
        """The journal at ``path``; None when there is no such file."""
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise Qcow2Error(f"{path}: cannot read the journal: {exc.strerror}",
                             path=path) from exc
        return decode_journal(raw, path=path)

    def save(self, todo: np.ndarray, changed: np.ndarray | None = None) -> None:
        raw = encode_journal(Journal(self.size, self.granularity.bit_length() - 1,
                                     self.tag, pack_bits(todo)))
        assert len(raw) - len(self.tag) - 32 == bitmap_length(self.size,
                                                              self.granularity.bit_length() - 1)
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0),
                     0o644)
        try:
            os.write(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        sync_dir(self.path)


def remove_journal(path: str) -> None:
    """Remove the journal at ``path`` (and a temporary file a killed save left), durably."""
    for p in (path, path + ".tmp"):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    sync_dir(path)


def sync_dir(path: str) -> None:
    """fsync the directory holding ``path`` (a new, renamed or removed name is durable)."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Makes a :class:`PendingMap`'s progress durable, in a thread of its own: flush the
    target, then clear the done bits in ``store``; at most one checkpoint each
    ``interval`` seconds (0: one after the other, as long as tasks finish)."""

    def __init__(self, pending: PendingMap, store: PendingStore,
                 flush_target: Callable[[], None], *, interval: float = 1.0) -> None:
        self.pending = pending
        self.store = store
        self.flush_target = flush_target
        self.interval = interval
        self.checkpoints = 0
        self.error: BaseException | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()   # cuts short the pause between checkpoints
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="blockcopy-checkpoint")

    def note(self, ranges: list[tuple[int, int]]) -> None:
        """The engine's ``on_copied``."""
        self.pending.note(ranges)
        self._wake.set()

    def start(self) -> "Checkpointer":
        self._thread.start()
        return self

    def checkpoint(self) -> None:
        """One checkpoint now (in the caller's thread)."""
        idx = self.pending.take_done()
        if not len(idx):
            return
        self.flush_target()
        todo = self.pending.todo.copy()
        todo[idx] = False
        self.store.save(todo, idx)
        self.pending.cleared(idx)
        self.checkpoints += 1

    def _loop(self) -> None:
        last = 0.0
        while True:
            self._wake.wait()
            if not self._stop:
                pause = last + self.interval - time.monotonic()
                if pause > 0:
                    self._stopping.wait(pause)
            self._wake.clear()
            # (stop() sets the flag before the event: seen here, or the event is set again)
            if self._stop:
                return
            try:
                self.checkpoint()
            except BaseException as exc:     # raised by stop(): the copy cannot be resumed
                self.error = exc
                return
            last = time.monotonic()

    def stop(self) -> None:
        """End the thread, then one last checkpoint; raises what a checkpoint raised."""
        self._stop = True
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.error is not None:
            raise self.error
        self.checkpoint()


def run_checkpointed(run: Callable[[Callable[[list[tuple[int, int]]], None]], CopyResult],
                     target: CopyTarget, pending: PendingMap, store: PendingStore, *,
                     interval: float = 1.0) -> tuple[CopyResult, Checkpointer]:
    """Run a copy, ``run(on_copied)``, with its progress made durable in ``store`` by a
    :class:`Checkpointer` (``on_copied`` goes to the engine); the target is flushed at
    the end.  The store keeps what is left when the copy did not finish; removing it
    once the copy is complete is the caller's part."""
    cp = Checkpointer(pending, store, target.flush, interval=interval).start()
    try:
        result = run(cp.note)
    finally:
        cp.stop()
    target.flush()
    return result, cp


__all__ = ["Checkpointer", "JournalStore", "MAX_GRANULES", "PendingMap", "PendingStore",
           "pack_bits", "pending_granularity", "remove_journal", "run_checkpointed",
           "sync_dir", "unpack_bits"]
