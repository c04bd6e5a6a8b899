"""The one place that modifies images: locked, ordered, fsync'd writes.

:class:`ImageWriter` opens an image read-write only after taking QEMU's image
locks of a writer (:func:`qcow2kit.locks.lock_for_writing`): it holds
consistent read, write and resize and refuses others' write and resize, as a
QEMU writer does, and refuses to go on when another process holds or refuses
those.  Every write is followed by ``fsync`` when asked, so callers can
order data before metadata and metadata before the header.

A test can stop the writer between steps: with ``QCOW2KIT_WRITER_STOP_AT=N``
in the environment, :meth:`ImageWriter.step` sends the process SIGSTOP after
step N, so a test can SIGKILL it at that exact point.
"""

from __future__ import annotations

import os
import signal
from typing import Sequence

from .errors import Qcow2Error
from .locks import HELD_BY_WRITER, REFUSED_BY_WRITER, lock_for_writing

_IOV_MAX = 1024


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
