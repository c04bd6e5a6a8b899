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
about a window (plus the engine's reads in flight).
"""

from __future__ import annotations

import hashlib
from typing import Callable

from .blockcopy import DEFAULT_WORKERS, CopyJob, CopyTarget, read_source
from .blockcopy.gather import Gather
from .errors import CopyIncompleteError
from .image import Image
from .mapping import DEFAULT_MEMORY
from .target import source_files

BLOCK_SIZE = 4 << 20
ALGORITHM = "blake2b"
DIGEST_SIZE = 32
DEFAULT_WINDOW = 256 << 20


def _digest(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


class _HashTarget(CopyTarget):
    """Receives the guest data of blocks ``[first, first+count)`` and hashes each block once
    all of it is known."""

    zero_initialized = False      # zeros are reported too: they complete blocks
    threadsafe = True

    def __init__(self, size: int, block_size: int, first: int, count: int,
                 zero_digest: bytes) -> None:
        self.size = size
        self.block_size = block_size
        self.first = first
        self.digests: list[bytes | None] = [None] * count
        self._zero = zero_digest
        self._gather = Gather(block_size, size)

    def write(self, offset: int, data: memoryview) -> None:
        self._hash(self._gather.add(offset, len(data), data))

    def write_zeroes(self, offset: int, length: int, *, allocate: bool = False) -> None:
        self._hash(self._gather.add(offset, length, None))

    def _hash(self, done: list[tuple[int, bytearray | None]]) -> None:
        bs = self.block_size
        for b, buf in done:       # hashlib releases the GIL: workers hash in parallel
            if buf is None:
                blen = min(bs, self.size - b * bs)
                d = self._zero if blen == bs else _digest(bytes(blen))
            else:
                d = _digest(buf)
            self.digests[b - self.first] = d


def checksum(img: Image, *, block_size: int = BLOCK_SIZE, order: str = "host",
             memory: int = DEFAULT_MEMORY, window: int = DEFAULT_WINDOW,
             workers: int = DEFAULT_WORKERS,
             progress: Callable[[int], None] | None = None) -> dict[str, object]:
    """ovirt-imageio's block checksum of ``img``'s guest content (see the module docstring).

    ``block_size`` must be a positive multiple of 4096 (ovirt-imageio's rule);
    ``window`` (rounded to whole blocks) bounds the blocks being gathered at once.
    ``progress`` is called with the guest bytes done after each window.  A read that
    keeps failing raises :class:`qcow2kit.errors.CopyIncompleteError`.
    """
    if block_size <= 0 or block_size % 4096:
        raise ValueError(f"block size must be a positive multiple of 4096, not {block_size}")
    source_files(img)        # every file of the chain opens and can be read (not encrypted)
    size = img.size
    window = max(block_size, window // block_size * block_size)
    zero = _digest(bytes(block_size))
    outer = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for w in range(0, size, window):
        w_end = min(w + window, size)
        first = w // block_size
        count = -(-(w_end - w) // block_size)
        target = _HashTarget(size, block_size, first, count, zero)
        # only this window's data is planned and read
        source = read_source(img, order, memory=memory, start=w, length=w_end - w)
        job = CopyJob(source, target, workers=workers)
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
        for k, d in enumerate(target.digests):
            if d is None:        # pragma: no cover - every byte is data or zeros
                raise AssertionError(f"block {first + k} was never completed")
            outer.update(d)
        if progress is not None:
            progress(w_end - w)
    return {"algorithm": ALGORITHM, "block_size": block_size, "checksum": outer.hexdigest()}


def block_hasher(size: int, block_size: int = BLOCK_SIZE) -> CopyTarget:
    """A copy target that hashes the guest content of a whole disk of ``size`` bytes as a
    copy passes it (pieces in any order, zeros included): what ``backup --checksum`` puts
    beside the copy (:class:`qcow2kit.blockcopy.TeeTarget`); :func:`hasher_checksum` then
    gives the checksum.  Pieces of blocks wait in memory until their block is complete."""
    if block_size <= 0 or block_size % 4096:
        raise ValueError(f"block size must be a positive multiple of 4096, not {block_size}")
    return _HashTarget(size, block_size, 0, -(-size // block_size), _digest(bytes(block_size)))


def hasher_checksum(hasher: CopyTarget) -> dict[str, object]:
    """The checksum (the JSON object of :func:`checksum`) of what a :func:`block_hasher`
    received; every block must be complete."""
    if not isinstance(hasher, _HashTarget):
        raise TypeError(f"not a block_hasher: {hasher!r}")
    outer = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for k, d in enumerate(hasher.digests):
        if d is None:
            raise ValueError(f"block {k} was never completed")
        outer.update(d)
    return {"algorithm": ALGORITHM, "block_size": hasher.block_size,
            "checksum": outer.hexdigest()}
