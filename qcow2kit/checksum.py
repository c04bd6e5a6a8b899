"""Block checksums of an image's guest content, the one ovirt-imageio computes.

The checksum (ovirt-imageio's ``blkhash``: its ``client.checksum`` is the
reference) splits the guest disk into blocks of ``block_size`` bytes (4 MiB by
default, the last one possibly shorter), hashes each block with BLAKE2b
(32-byte digests) and hashes the block digests, in guest order, with BLAKE2b
again: ``{"algorithm": "blake2b", "block_size": N, "checksum": HEX}``.

Here the data is read by the block-copy engine (:mod:`qcow2kit.blockcopy`), in
host order by default: a block is hashed as soon as all of its bytes have been
read (or are known to be zeros, without a read), whatever order its pieces
came in, and the digests are combined in guest order at the end.  A fragmented
image would need every block in memory at once before any is complete, so the
guest disk is taken in windows of ``window`` bytes: each window's data (only
its own: the host-order plan is made for its guest range) is read in host order
and its blocks hashed, one window after the other, which bounds the memory to
about a window (the memory budget by default, plus the engine's reads in flight).

The pieces that can serve elsewhere: :class:`BlockHasher` (block digests from
guest pieces in any order), :class:`HashingTarget` (a copy target that hashes what
the engine writes, passing it on to another target: a copy that checksums its
data as it goes) and :func:`combine` (the digests to ovirt-imageio's result).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable

from .blockcopy import DEFAULT_WORKERS, CopyJob, CopyTarget, read_source
from .blockcopy.gather import Gather
from .errors import CopyIncompleteError, Qcow2Error
from .image import Image
from .mapping import DEFAULT_MEMORY
from .target import source_files

BLOCK_SIZE = 4 << 20
ALGORITHM = "blake2b"
DIGEST_SIZE = 32


def _digest(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


class BlockHasher:
    """The block digests of guest blocks ``[first, first+count)`` of a disk of ``size``
    bytes, fed with the guest content in pieces, in any order, from any thread.

    :meth:`add` takes ``(offset, data)``, or ``(offset, None, length)`` for bytes that
    read as zeros; a block is hashed (in the calling thread: hashlib releases the GIL,
    so workers hash in parallel) as soon as all of its bytes are known, and its buffer
    dropped.  Blocks never started that are wholly zeros cost nothing (one digest
    computed once).  A piece given again replaces the bytes of the earlier one (a
discard) as long as its block is not hashed yet.  Memory: the blocks started but not yet
    complete, so a caller bounds it by feeding a window of blocks at a time (as
    :func:`checksum` does).  :meth:`finish` hashes the blocks still incomplete (their
    unknown bytes read as zeros) and returns the digests in guest order;
    :func:`combine` turns them into ovirt-imageio's result.
    """

    def __init__(self, size: int, block_size: int = BLOCK_SIZE, first: int = 0,
                 count: int | None = None) -> None:
        if block_size <= 0 or block_size % 4096:
            raise ValueError(f"block size must be a positive multiple of 4096, not {block_size}")
        self.size = size
        self.block_size = block_size
        self.first = first
        if count is None:
            count = -(-size // block_size) - first
        self.digests: list[bytes | None] = [None] * count
        self._zero = _zero_digest(block_size)
        self._gather = Gather(block_size, size)

    def add(self, offset: int, data: memoryview | None, length: int = 0) -> None:
        """Guest bytes ``[offset, offset+len(data))`` are ``data`` (or, when None, ``length``
        bytes of zeros)."""
        n = len(data) if data is not None else length
        self._hash(self._gather.add(offset, n, data))

    def finish(self) -> list[bytes]:
        """The digests in guest order, the blocks still incomplete hashed as they are
        (unknown bytes read as zeros)."""
        self._hash(self._gather.rest())
        out = []
        for k, d in enumerate(self.digests):
            if d is None:                 # never heard of: zeros
                blen = min(self.block_size, self.size - (self.first + k) * self.block_size)
                d = self._zero if blen == self.block_size else _digest(bytes(blen))
            out.append(d)
        return out

    def _hash(self, done: Iterable[tuple[int, bytearray | None]]) -> None:
        bs = self.block_size
        for b, buf in done:
            k = b - self.first
            if not 0 <= k < len(self.digests):
                raise ValueError(f"block {b} is outside the blocks hashed here")
            if self.digests[k] is not None:
                raise Qcow2Error(f"guest block {b} completed twice (a discard after its hash?)")
            if buf is None:
                blen = min(bs, self.size - b * bs)
                d = self._zero if blen == bs else _digest(bytes(blen))
            else:
                d = _digest(buf)
            self.digests[k] = d


_ZERO_DIGESTS: dict[int, bytes] = {}


def _zero_digest(block_size: int) -> bytes:
    d = _ZERO_DIGESTS.get(block_size)
    if d is None:
        d = _ZERO_DIGESTS[block_size] = _digest(bytes(block_size))
    return d


def combine(digests: Iterable[bytes], block_size: int = BLOCK_SIZE,
            outer: hashlib.blake2b | None = None) -> dict[str, object]:
    """ovirt-imageio's result from the block digests in guest order (``outer``: the hash
    of the digests before these, when they come in several parts)."""
    if outer is None:
        outer = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for d in digests:
        outer.update(d)
    return {"algorithm": ALGORITHM, "block_size": block_size, "checksum": outer.hexdigest()}


class HashingTarget(CopyTarget):
    """A copy target that feeds a :class:`BlockHasher` with everything the engine writes,
    and passes it on to ``inner`` when there is one (a copy that also checksums its data).

    It is not ``zero_initialized``, so the engine reports every zero range too (they
    complete blocks); those reach ``inner`` only when it needs them.  A discard cannot
    take back a block already hashed: it raises :class:`qcow2kit.errors.Qcow2Error`.
    """

    def __init__(self, hasher: BlockHasher, inner: CopyTarget | None = None) -> None:
        self.hasher = hasher
        self.inner = inner
        self.size = hasher.size
        self.zero_initialized = False
        self.threadsafe = inner.threadsafe if inner is not None else True
        self.sparse_block = inner.sparse_block if inner is not None else 0

    def write(self, offset: int, data: memoryview) -> None:
        if self.inner is not None:
            self.inner.write(offset, data)
        self.hasher.add(offset, data)

    def write_zeroes(self, offset: int, length: int, *, allocate: bool = False) -> None:
        inner = self.inner
        if inner is not None and (allocate or not inner.zero_initialized):
            inner.write_zeroes(offset, length, allocate=allocate)
        self.hasher.add(offset, None, length)

    def discard(self, offset: int, length: int) -> None:
        h = self.hasher
        bs = h.block_size
        end = min(offset + length, h.size)
        hashed = [b for b in range(offset // bs, -(-end // bs))
                  if 0 <= b - h.first < len(h.digests) and h.digests[b - h.first] is not None]
        if hashed:
            raise Qcow2Error(f"guest block {hashed[0]} is already hashed: a discard cannot "
                             f"take it back")
        if self.inner is not None:
            self.inner.discard(offset, length)
        h.add(offset, None, length)

    def flush(self) -> None:
        if self.inner is not None:
            self.inner.flush()


def checksum(img: Image, *, block_size: int = BLOCK_SIZE, order: str = "host",
             memory: int = DEFAULT_MEMORY, window: int | None = None,
             workers: int = DEFAULT_WORKERS,
             progress: Callable[[int], None] | None = None) -> dict[str, object]:
    """ovirt-imageio's block checksum of ``img``'s guest content (see the module docstring).

    ``block_size`` must be a positive multiple of 4096 (ovirt-imageio's rule).
    ``memory`` is the budget of the planner and of the blocks gathered at once:
    ``window`` (guest bytes, rounded down to whole blocks, at least one) defaults to
    it.  ``progress`` is called with the guest bytes done after each window.  A read
    that keeps failing raises :class:`qcow2kit.errors.CopyIncompleteError`.
    """
    if block_size <= 0 or block_size % 4096:
        raise ValueError(f"block size must be a positive multiple of 4096, not {block_size}")
    source_files(img)        # every file of the chain opens and can be read (not encrypted)
    size = img.size
    window = max(block_size, (memory if window is None else window) // block_size * block_size)
    outer = hashlib.blake2b(digest_size=DIGEST_SIZE)    # the digests so far, in order
    for w in range(0, size, window):
        w_end = min(w + window, size)
        first = w // block_size
        hasher = BlockHasher(size, block_size, first, -(-(w_end - w) // block_size))
        # only this window's data is planned and read
        source = read_source(img, order, memory=memory, start=w, length=w_end - w)
        job = CopyJob(source, HashingTarget(hasher), workers=workers)
        if w:
            job.bitmap.clear(0, w)
        if w_end < size:
            job.bitmap.clear(w_end, size - w_end)
        result = job.run()
        if result.failed:
            raise CopyIncompleteError(
                f"{img.filename}: {len(result.failed)} range(s) could not be read, first "
                f"{result.failed[0]}", result.failed, path=img.filename)
        if result.stopped is not None:
            raise result.stopped
        if any(d is None for d in hasher.digests):   # pragma: no cover - the engine's bug
            raise AssertionError(f"a block of window {w:#x} was never completed")
        for d in hasher.finish():
            outer.update(d)
        if progress is not None:
            progress(w_end - w)
    return combine((), block_size, outer)
