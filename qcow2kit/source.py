"""Byte sources: bounds-checked reads from an image file.

Everything qcow2kit reads from a file goes through :meth:`ByteSource.read_at`,
which refuses reads that start or end outside the file (or overflow) with an
error naming what was being read.  Two implementations: :class:`PreadSource`
(``os.pread``, the default, no address-space cost) and :class:`MmapSource`
(a read-only mapping, cheaper for many small reads of a file that fits the
address space comfortably).
"""

from __future__ import annotations

import mmap
import os
import stat
from typing import Literal

from .errors import ImageNotFoundError, ImageOpenError, OutOfBoundsError, Qcow2Error, ShortReadError

SourceKind = Literal["pread", "mmap"]

CLOSED_MESSAGE = "I/O operation on closed image"


def closed_error() -> ValueError:
    """What any read of a closed image (or of its closed source) raises, as io does."""
    return ValueError(CLOSED_MESSAGE)


class ByteSource:
    """A read-only view of one file with bounds-checked reads."""

    path: str
    size: int

    def _read(self, offset: int, length: int) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def _readinto(self, offset: int, buf: memoryview) -> None:
        buf[:] = self._read(offset, len(buf))

    @property
    def closed(self) -> bool:
        return False

    def check_range(self, offset: int, length: int, *, field: str) -> None:
        """Raise :class:`OutOfBoundsError` unless [offset, offset+length) lies inside the file.

        A closed source raises ``ValueError`` (see :func:`closed_error`).
        """
        if self.closed:
            raise closed_error()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfBoundsError(
                f"{self.path}: {field} [{offset:#x}, +{length:#x}) lies outside the file "
                f"of {self.size} bytes", field=field, offset=offset, path=self.path)

    def read_at(self, offset: int, length: int, *, field: str = "data") -> bytes:
        """Exactly ``length`` bytes at ``offset``; the whole range must be inside the file."""
        self.check_range(offset, length, field=field)
        return self._read(offset, length)

    def readinto_at(self, offset: int, buf: memoryview | bytearray, *, field: str = "data") -> None:
        """Fill ``buf`` from ``offset``; the whole range must be inside the file."""
        mv = memoryview(buf).cast("B")
        self.check_range(offset, len(mv), field=field)
        self._readinto(offset, mv)

    def read_padded(self, offset: int, length: int, *, field: str = "data") -> bytes:
        """Read ``length`` bytes, zero-filling whatever lies past the end of the file.

        This is how QEMU's block layer reads a file beyond EOF (the request is
        padded with zeros, whether it starts before the end or past it); used
        for data clusters, L2 tables, compressed streams and raw backing files.
        A range wholly past the end costs no read.
        """
        if self.closed:
            raise closed_error()
        if offset < 0 or length < 0:
            raise OutOfBoundsError(f"{self.path}: {field} lies outside the file "
                                   f"of {self.size} bytes", field=field, offset=offset,
                                   path=self.path)
        avail = max(0, min(length, self.size - offset))
        data = self._read(offset, avail) if avail else b""
        return data + bytes(length - avail) if avail < length else data

    def fileno(self) -> int:
        """The descriptor the bytes are read through (-1 once closed)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def close(self) -> None:
        pass

    def __enter__(self) -> "ByteSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_error(exc: OSError, path: str, offset: int, length: int) -> OSError:
    """``exc`` from a pread, again, naming the file, the offset and the length."""
    return OSError(exc.errno, f"read error at offset {offset:#x} ({length} bytes): "
                              f"{exc.strerror or exc}", path)


class PreadSource(ByteSource):
    """Reads with ``os.pread`` on a file descriptor opened read-only."""

    def __init__(self, path: str | os.PathLike[str], *, fd: int | None = None) -> None:
        self.path = os.fspath(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)) if fd is None else fd
        except OSError as exc:
            raise open_error(self.path, exc) from exc
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        elif stat.S_ISREG(st.st_mode):
            self.size = st.st_size
        else:
            if fd is None:
                os.close(self.fd)
            raise Qcow2Error(f"{self.path}: not a regular file or block device", path=self.path)
        self.reads = 0          # number of pread calls: I/O counts are asserted in tests
        self.bytes_read = 0

    def _read(self, offset: int, length: int) -> bytes:
        chunks = []
        done = 0
        while done < length:
            try:
                chunk = os.pread(self.fd, length - done, offset + done)
            except OSError as exc:
                raise read_error(exc, self.path, offset + done, length - done) from exc
            self.reads += 1
            if not chunk:
                raise ShortReadError(f"{self.path}: file shrank while reading",
                                       offset=offset + done, path=self.path)
            chunks.append(chunk)
            done += len(chunk)
        self.bytes_read += length
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _readinto(self, offset: int, buf: memoryview) -> None:
        done = 0
        length = len(buf)
        while done < length:
            try:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
            except OSError as exc:
                raise read_error(exc, self.path, offset + done, length - done) from exc
            self.reads += 1
            if n <= 0:
                raise ShortReadError(f"{self.path}: file shrank while reading",
                                       offset=offset + done, path=self.path)
            done += n
        self.bytes_read += length

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class MmapSource(ByteSource):
    """Reads from a read-only memory mapping of the whole file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._pread = PreadSource(self.path)
        self.size = self._pread.size
        self._map = mmap.mmap(self._pread.fd, 0, access=mmap.ACCESS_READ) if self.size else None

    def _read(self, offset: int, length: int) -> bytes:
        assert self._map is not None or length == 0
        return self._map[offset:offset + length] if self._map is not None else b""

    def _readinto(self, offset: int, buf: memoryview) -> None:
        if self._map is not None:
            buf[:] = self._map[offset:offset + len(buf)]

    @property
    def closed(self) -> bool:
        return self._pread.closed

    def fileno(self) -> int:
        return self._pread.fd

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._pread.close()


def open_error(path: str, exc: OSError) -> ImageOpenError:
    """The error for an ``open()`` of ``path`` that failed with ``exc``.

    A missing file gives an :class:`ImageNotFoundError` (a FileNotFoundError
    too); any other failure an :class:`ImageOpenError` with the same errno.
    """
    errno = exc.errno if exc.errno is not None else 0
    cls = ImageNotFoundError if isinstance(exc, FileNotFoundError) else ImageOpenError
    return cls(f"{path}: cannot open: {os.strerror(errno)}", errno, path)


def open_source(path: str | os.PathLike[str], kind: SourceKind = "pread") -> ByteSource:
    """Open ``path`` as a :class:`ByteSource` of the given kind."""
    if kind == "pread":
        return PreadSource(path)
    if kind == "mmap":
        return MmapSource(path)
    raise ValueError(f"unknown source kind {kind!r} (expected 'pread' or 'mmap')")
