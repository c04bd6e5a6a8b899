"""What the engine writes to: the target interface, and the raw file target.

A target receives guest data at guest offsets (:meth:`CopyTarget.write`),
makes ranges read as zeros (:meth:`CopyTarget.write_zeroes`: the guest reads
zeros there, whether data or not) and drops ranges (:meth:`CopyTarget.discard`:
the guest reads zeros there afterwards).  ``zero_initialized`` says that what
was never written reads as zeros (a new file, a new image), so the engine
skips zero ranges altogether.  Methods are called from several worker threads
at once, for ranges that never overlap (one at a time unless ``threadsafe``).

Opening the file safely (not the source, not in use by QEMU, removed again on
failure) is :func:`qcow2kit.target.open_raw_target`'s job; :class:`RawFileTarget`
only writes through the descriptor it is given.  A qcow2 target (the image
builder) implements the same interface.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = 1 << 20


class CopyTarget:
    """The interface a block-copy target implements."""

    size: int
    #: what was never written reads as zeros
    zero_initialized: bool = False
    #: methods may run in several threads at once (else the engine calls one at a time)
    threadsafe: bool = True
    #: the smallest block the engine looks for zeros in (with ``-S``; 0: the engine's)
    sparse_block: int = 0

    def write(self, offset: int, data: memoryview) -> None:
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, *, allocate: bool = False) -> None:
        """Make the range read as zeros; ``allocate`` stores the zeros (``-S 0``)."""
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        """Drop the range: it reads as zeros afterwards."""
        self.write_zeroes(offset, length)

    def flush(self) -> None:
        pass


def io_error(exc: OSError, path: str, what: str, offset: int | None) -> OSError:
    """``exc`` again, naming the file, the operation and the offset."""
    where = f" at offset {offset:#x}" if offset is not None else ""
    return OSError(exc.errno, f"{what} error{where}: {exc.strerror or exc}", path)


def write_zero_chunks(write: Callable[[int, memoryview], None], offset: int,
                      length: int) -> None:
    """Zeros over ``[offset, offset+length)`` through ``write(offset, data)``, at most
    1 MiB a call (where a hole cannot be punched, or the zeros must be stored)."""
    zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
    pos, end = offset, offset + length
    while pos < end:
        n = min(len(zeros), end - pos)
        write(pos, zeros[:n])
        pos += n


_libc = None


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """fallocate(PUNCH_HOLE | KEEP_SIZE); False when the system cannot."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fallocate = getattr(_libc, "fallocate", None)
    if fallocate is None:
        return False
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


class RawFileTarget(CopyTarget):
    """A raw file: guest offset = file offset; holes where the guest reads zeros.

    ``zero_initialized`` is true for a file just truncated to its size (what
    :func:`qcow2kit.target.open_raw_target` gives).
    """

    def __init__(self, fd: int, path: str, size: int, *, zero_initialized: bool = True) -> None:
        self.fd = fd
        self.path = path
        self.size = size
        self.zero_initialized = zero_initialized
        self.writes = 0           # pwrite calls: I/O counts are asserted in tests
        self.bytes_written = 0

    def write(self, offset: int, data: memoryview) -> None:
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], offset + done)
                self.writes += 1
        except OSError as exc:
            raise io_error(exc, self.path, "write", offset + done) from exc
        self.bytes_written += done

    def write_zeroes(self, offset: int, length: int, *, allocate: bool = False) -> None:
        if length <= 0:
            return
        if not allocate:
            try:
                if _punch_hole(self.fd, offset, length):
                    return
            except OSError as exc:
                raise io_error(exc, self.path, "discard", offset) from exc
        write_zero_chunks(self.write, offset, length)

    def flush(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise io_error(exc, self.path, "flush", None) from exc


class TeeTarget(CopyTarget):
    """``target``, with ``watcher`` shown the whole guest content on the way (a block hasher
    computing a checksum during the copy: no second read).

    The watcher hears of every range, zeros included, so the engine sends zeros here
    (``zero_initialized`` is false); ``target`` receives them only when it needs them
    (it is not zero-initialized, or ``allocate`` stores them), as without the watcher.
    """

    def __init__(self, target: CopyTarget, watcher: CopyTarget) -> None:
        self.target = target
        self.watcher = watcher
        self.size = target.size
        self.zero_initialized = False
        self.threadsafe = target.threadsafe and watcher.threadsafe
        self.sparse_block = target.sparse_block

    def write(self, offset: int, data: memoryview) -> None:
        self.target.write(offset, data)
        self.watcher.write(offset, data)

    def write_zeroes(self, offset: int, length: int, *, allocate: bool = False) -> None:
        if allocate or not self.target.zero_initialized:
            self.target.write_zeroes(offset, length, allocate=allocate)
        self.watcher.write_zeroes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self.target.discard(offset, length)
        self.watcher.discard(offset, length)

    def flush(self) -> None:
        self.target.flush()
