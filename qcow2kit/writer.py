"""The one place that modifies images: locked, ordered, fsync'd writes.

:class:`ImageWriter` opens an image read-write only after taking QEMU's image
locks (one-byte OFD locks, see QEMU's file-posix ``raw_apply_lock_bytes``):
bytes 100 + i mean "I hold permission i", 200 + i "I refuse to share
permission i" (i: 0 consistent read, 1 write, 2 write-unchanged, 3 resize).
It holds read/write/resize and refuses others' write and resize, as a QEMU
writer does, and refuses to go on when another process holds or refuses
those.  Every write is followed by ``fsync`` when asked, so callers can
order data before metadata and metadata before the header.

A test can stop the writer between steps: with ``QCOW2KIT_WRITER_STOP_AT=N``
in the environment, :meth:`ImageWriter.step` sends the process SIGSTOP after
step N, so a test can SIGKILL it at that exact point.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
from typing import Iterable, Sequence

from .errors import ImageLockedError, Qcow2Error

PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

_IOV_MAX = 1024
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
_FLOCK = "hhxxxxqqixxxx"


def _flock(fd: int, cmd: int, ltype: int, byte: int) -> int:
    """One OFD lock call on ``byte``; returns the l_type the kernel answers."""
    arg = struct.pack(_FLOCK, ltype, os.SEEK_SET, byte, 1, 0)
    res = fcntl.fcntl(fd, cmd, arg)
    return struct.unpack(_FLOCK, res)[0]


def lock_conflicts(fd: int, held: Iterable[int], refused: Iterable[int]) -> list[str]:
    """What other processes hold that conflicts with holding ``held`` and refusing ``refused``."""
    names = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}
    out = []
    for perm in held:   # does anyone refuse to share a permission we want?
        if _flock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, LOCK_SHARED_BASE + perm) != fcntl.F_UNLCK:
            out.append(f"another process refuses to share '{names[perm]}'")
    for perm in refused:  # does anyone hold a permission we refuse to share?
        if _flock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, LOCK_PERM_BASE + perm) != fcntl.F_UNLCK:
            out.append(f"another process holds '{names[perm]}'")
    return out


HELD_BY_WRITER = (PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE)
REFUSED_BY_WRITER = (PERM_WRITE, PERM_RESIZE)


def lock_for_writing(fd: int, path: str) -> None:
    """Take QEMU's locks of a writer on ``fd`` (held: consistent read, write, resize;
    refused to others: write, resize); raise :class:`ImageLockedError` when another
    process holds or refuses one of them.  Closing ``fd`` releases the locks."""
    try:
        for perm in HELD_BY_WRITER:
            _flock(fd, _F_OFD_SETLK, fcntl.F_RDLCK, LOCK_PERM_BASE + perm)
        for perm in REFUSED_BY_WRITER:
            _flock(fd, _F_OFD_SETLK, fcntl.F_RDLCK, LOCK_SHARED_BASE + perm)
        conflicts = lock_conflicts(fd, HELD_BY_WRITER, REFUSED_BY_WRITER)
    except OSError as exc:
        raise ImageLockedError(f"{path}: cannot take the image locks: {exc.strerror} "
                               f"(is a QEMU process using the image?)", path=path) from exc
    if conflicts:
        raise ImageLockedError(f"{path}: the image is in use ({'; '.join(conflicts)}); "
                               f"stop the process using it first", path=path)


class ImageWriter:
    """A read-write handle on an image, locked like a QEMU writer."""

    HELD = HELD_BY_WRITER
    REFUSED = REFUSED_BY_WRITER

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self.fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise Qcow2Error(f"{self.path}: cannot open for writing: {exc.strerror}",
                             path=self.path) from exc
        self._step = 0
        self._stop_at = int(os.environ.get("QCOW2KIT_WRITER_STOP_AT", "0") or 0)
        try:
            lock_for_writing(self.fd, self.path)
        except BaseException:
            os.close(self.fd)
            raise

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        mv = memoryview(data).cast("B")
        done = 0
        while done < len(mv):
            done += os.pwrite(self.fd, mv[done:], offset + done)

    def pwritev(self, buffers: Sequence[bytes | bytearray | memoryview], offset: int) -> None:
        """``buffers`` one after the other from ``offset`` (few system calls)."""
        views = [memoryview(b).cast("B") for b in buffers]
        i = 0
        while i < len(views):
            done = os.pwritev(self.fd, views[i:i + _IOV_MAX], offset)
            offset += done
            while i < len(views) and done >= len(views[i]):
                done -= len(views[i])
                i += 1
            if done:
                views[i] = views[i][done:]

    def sync(self) -> None:
        os.fsync(self.fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def step(self) -> None:
        """Mark the end of one ordered step (data synced); the test hook may stop here."""
        self._step += 1
        if self._stop_at and self._step == self._stop_at:
            os.kill(os.getpid(), signal.SIGSTOP)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)   # closing the descriptor releases the OFD locks
            self.fd = -1

    def __enter__(self) -> "ImageWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
