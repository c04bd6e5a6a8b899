"""A file-like view of an image's guest content.

:class:`GuestFile` is an :class:`io.RawIOBase` over what a guest sees: reads
go through :meth:`Image.readinto` (backing chain, data file, compressed and
zero clusters), so anything that reads a binary file reads a qcow2 chain::

    with qcow2kit.open_guest("overlay.qcow2") as f:        # owns its image
        mbr = f.read(512)
        shutil.copyfileobj(f, out, 1 << 20)

    with qcow2kit.open("disk.qcow2") as img:
        tar = tarfile.open(fileobj=qcow2kit.GuestFile(img))  # borrows img

It reads, seeks and tells like a file opened ``"rb"`` with ``buffering=0``;
wrap it in :class:`io.BufferedReader` for many small reads.  It never writes.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

from . import spec
from .image import DEFAULT_L2_CACHE_BYTES, Image, RawImage, open as _open_image
from .source import SourceKind

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["GuestFile", "open_guest"]


class GuestFile(io.RawIOBase):
    """Read-only, seekable binary file over the guest content of ``image``.

    ``len(f)`` is the virtual size.  Seeking past the end is allowed, as with
    files; reads there return ``b""``.  ``owns_image``: close ``image`` when
    the view is closed (what :func:`open_guest` does); otherwise the image
    stays open and the caller closes it.
    """

    def __init__(self, image: Image | RawImage, *, owns_image: bool = False) -> None:
        super().__init__()
        self.image = image
        self.owns_image = False      # until the checks pass: __del__ must not close the image
        self._pos = 0
        if image.closed:
            raise ValueError("I/O operation on closed image")
        self.owns_image = owns_image

    # -- what a binary file says about itself ---------------------------------

    @property
    def name(self) -> str:
        """The image's file name (tarfile, zipfile and others show it)."""
        return self.image.filename

    @property
    def mode(self) -> str:
        return "rb"

    @property
    def size(self) -> int:
        """The virtual size of the disk, in bytes."""
        return self.image.size

    def __len__(self) -> int:
        return self.image.size

    def __bool__(self) -> bool:
        return True         # a file object is true, even over a disk of size 0

    def readable(self) -> bool:
        self._checkClosed()
        return True

    def seekable(self) -> bool:
        self._checkClosed()
        return True

    def writable(self) -> bool:
        self._checkClosed()
        return False

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<GuestFile name={self.name!r} size={self.size}{state}>"

    # -- position --------------------------------------------------------------

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._checkClosed()
        offset = offset.__index__()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self.image.size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    # -- reads -----------------------------------------------------------------

    def readinto(self, buffer: WriteableBuffer) -> int:
        """Fill as much of ``buffer`` as the disk has from the position; 0 at the end."""
        self._checkClosed()
        mv = memoryview(buffer).cast("B")
        n = max(0, min(len(mv), self.image.size - self._pos))
        if n:
            self.image.readinto(self._pos, mv[:n])
            self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes from the position (all that is left if ``size`` < 0 or None).

        Only what the disk still holds is allocated, so a huge ``size`` near
        the end is harmless.
        """
        self._checkClosed()
        if size is None or size < 0:
            return self.readall()
        n = max(0, min(size, self.image.size - self._pos))
        buf = bytearray(n)
        if n:
            self.image.readinto(self._pos, buf)
            self._pos += n
        return bytes(buf)

    def readall(self) -> bytes:
        """Everything from the position to the end of the disk, in one allocation."""
        self._checkClosed()
        return self.read(max(0, self.image.size - self._pos))

    def write(self, b: object) -> int:
        self._checkClosed()
        raise io.UnsupportedOperation("write: the guest view of an image is read-only")

    # -- closing ---------------------------------------------------------------

    def close(self) -> None:
        """Close the view, and the image too when the view owns it."""
        if self.closed:
            return
        try:
            if self.owns_image:
                self.image.close()
        finally:
            super().close()


def open_guest(path: str | os.PathLike[str], *, source: SourceKind = "pread",
               follow_backing: bool = True, l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
               max_backing_depth: int = spec.MAX_BACKING_DEPTH,
               force_share: bool = False) -> GuestFile:
    """Open the qcow2 image ``path`` and return a :class:`GuestFile` that owns it.

    The options are those of :func:`qcow2kit.open` (the image is locked as
    qemu-img locks what it reads; ``force_share``: as qemu-img's ``-U``);
    closing the file closes the image and its backing chain, releasing the locks.
    """
    img = _open_image(path, source=source, follow_backing=follow_backing,
                      l2_cache_bytes=l2_cache_bytes, max_backing_depth=max_backing_depth,
                      force_share=force_share)
    return GuestFile(img, owns_image=True)
