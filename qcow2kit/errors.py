"""The exception tree.

Every error qcow2kit raises about an image derives from :class:`Qcow2Error`.
Errors about a specific on-disk value carry the name of the field (as the
qcow2 spec names it) and the byte offset in the file where it was found, so a
message can point a person at the exact bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

_E = TypeVar("_E", bound="Qcow2Error")


class Qcow2Error(Exception):
    """Root of all qcow2kit errors.

    ``field`` is the spec name of the value at fault (or ``None``), ``offset``
    the byte offset of that value in its file (or ``None``), ``path`` the file.
    """

    def __init__(self, message: str, *, field: str | None = None,
                 offset: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.offset = offset
        self.path = path

    def locate(self: _E, path: str) -> _E:
        """Name the file the error is about: ``path`` is set and leads the message.

        The one place a path enters an error (see :func:`located`); an error that
        already names its file (one about a backing file, say) keeps it.
        """
        if self.path is None:
            self.path = path
            self.message = f"{path}: {self.message}"
            self.args = (self.message, *self.args[1:])
        return self

    def __str__(self) -> str:
        where = []
        if self.field is not None:
            where.append(self.field)
        if self.offset is not None:
            where.append(f"at offset {self.offset:#x}")
        if where:
            return f"{self.message} ({' '.join(where)})"
        return self.message


@contextmanager
def located(path: str) -> Iterator[None]:
    """Errors raised inside name ``path`` (:meth:`Qcow2Error.locate`) unless they name a file.

    Decoders and validators (``qcow2kit.layout``, the rooms of ``qcow2kit.image``)
    raise errors with field and offset only; the image front that read the bytes
    wraps them in this, once.
    """
    try:
        yield
    except Qcow2Error as exc:
        exc.locate(path)
        raise


class NotQcow2Error(Qcow2Error):
    """The file is not a qcow2 image (bad magic or too short)."""


class InvalidHeaderError(Qcow2Error):
    """A header field or header extension is malformed or out of QEMU's limits."""


class CorruptImageError(Qcow2Error):
    """Metadata beyond the header (tables, descriptors) is inconsistent."""


class UnsupportedFeatureError(Qcow2Error):
    """The image uses something qcow2kit cannot do (unknown incompatible bits, encryption...)."""


class OutOfBoundsError(CorruptImageError):
    """A read would go outside its file, or an offset overflows."""


class ShortReadError(OutOfBoundsError):
    """A read ended early: the file is shorter than when it was opened (or, through a
    network or FUSE source, a read came back short).  May pass: a copy retries it."""


class SnapshotNotFoundError(Qcow2Error, LookupError):
    """No internal snapshot matches the id and/or name asked for (also a :class:`LookupError`)."""


class BitmapNotFoundError(Qcow2Error, LookupError):
    """No persistent bitmap of that name (also a :class:`LookupError`)."""


class BitmapUnusableError(Qcow2Error):
    """A persistent bitmap cannot drive an incremental backup: missing, in use (left by a
    crashed QEMU) or inconsistent; the message names it and says why."""


class BackingChainError(Qcow2Error):
    """A backing file cannot be opened, the chain loops or is too deep."""


class ImageOpenError(Qcow2Error, OSError):
    """A file cannot be opened: the image itself, a backing file or an external data file.

    Also an :class:`OSError`, with ``errno``, ``strerror`` and ``filename``
    (the file that could not be opened) set as ``open()`` would set them, so
    ``except OSError`` code keeps working.  ``path`` is the image whose
    operation failed (the top image when a backing file is missing).
    """

    def __init__(self, message: str, errno: int, filename: str, *, field: str | None = None,
                 offset: int | None = None, path: str | None = None) -> None:
        Qcow2Error.__init__(self, message, field=field, offset=offset,
                            path=path if path is not None else filename)
        self.errno = errno
        self.strerror = os.strerror(errno)
        self.filename = filename

    def __reduce__(self) -> tuple[Any, ...]:
        # OSError's own __reduce__ would call the class with (errno, strerror, filename).
        return (type(self), (self.message, self.errno, self.filename),
                {"field": self.field, "offset": self.offset, "path": self.path})


class ImageNotFoundError(ImageOpenError, FileNotFoundError):
    """The image file does not exist (also a :class:`FileNotFoundError`, errno ENOENT)."""


class BackingFileNotFoundError(BackingChainError, ImageNotFoundError):
    """A backing file named by the image does not exist.

    ``filename`` is the missing backing file, ``path`` the image that names it.
    """


class DataFileNotFoundError(CorruptImageError, ImageNotFoundError):
    """The external data file named by the image does not exist.

    ``filename`` is the missing data file, ``path`` the image that names it.
    """


class ImageLockedError(Qcow2Error):
    """Another process (e.g. QEMU) holds a lock that conflicts with the operation."""


class ReadOnlyImageError(Qcow2Error):
    """A write was attempted on an image opened read-only (or marked corrupt)."""


class CopyIncompleteError(Qcow2Error):
    """A copy ended, but some ranges could not be read or written (``failed``: a list of
    :class:`qcow2kit.blockcopy.FailedRange`); everything else was copied."""

    def __init__(self, message: str, failed: list[Any], *, path: str | None = None) -> None:
        super().__init__(message, path=path)
        self.failed = failed


class TargetError(Qcow2Error):
    """The target of a conversion cannot be written safely (it is the source, a device...)."""
