"""The chain of files behind an image: backing files (qcow2 or raw), external data files.

Opening them follows QEMU (``bdrv_open_backing_file``, ``qcow2_do_open`` for the
data file): names are resolved against the image's directory, a missing format
is probed, loops and over-deep chains are refused.  :func:`block_status` is the
one walk of the chain for a guest range: who provides what, as QEMU's block
status (the mapper's batch scan, :mod:`qcow2kit.mapping`, is the vectorized
form of the same walk).

This module does not import the :class:`~qcow2kit.image.Image` front (which
imports it); :class:`Qcow2Layer` names what it needs of a qcow2 image.
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Iterator, NamedTuple, Protocol

from .. import spec
from .. import tables as T
from ..errors import (BackingChainError, BackingFileNotFoundError, CorruptImageError,
                      DataFileNotFoundError, ImageNotFoundError, Qcow2Error,
                      UnsupportedFeatureError)
from ..source import ByteSource, SourceKind, open_source
from .l2 import Segment


def _reason(exc: Qcow2Error) -> str:
    """``exc``'s message without its leading file name (for wrapping it under another file's)."""
    prefix = f"{exc.path}: " if exc.path else ""
    return exc.message[len(prefix):] if prefix and exc.message.startswith(prefix) else exc.message


class RawImage:
    """A raw file in a backing chain (or a data file): guest offset = file offset."""

    format = "raw"

    def __init__(self, src: ByteSource, filename: str) -> None:
        self.src = src
        self.filename = filename
        self.size = src.size
        self.backing = None

    @property
    def closed(self) -> bool:
        return self.src.closed

    def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        mv = memoryview(buf).cast("B")
        mv[:] = self.src.read_padded(offset, len(mv), field="raw data")

    def read(self, offset: int, length: int) -> bytes:
        return self.src.read_padded(offset, length, field="raw data")

    def close(self) -> None:
        self.src.close()

    def __enter__(self) -> "RawImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Qcow2Layer(Protocol):
    """What the chain needs of a qcow2 layer (:class:`qcow2kit.image.Image` is one)."""

    filename: str
    size: int

    @property
    def backing(self) -> "Qcow2Layer | RawImage | None": ...

    def segments(self, offset: int, length: int) -> Iterator[Segment]: ...

    def readinto(self, offset: int, buf: memoryview | bytearray) -> None: ...

    def close(self) -> None: ...


#: Opens a qcow2 backing file from its source and name, within the chain seen so far.
OpenQcow2 = Callable[[ByteSource, str], Qcow2Layer]


def open_backing(filename: str, name: str, backing_format: str | None,
                 format_ext_offset: int | None, chain: tuple[str, ...], max_depth: int,
                 source_kind: SourceKind, open_qcow2: OpenQcow2) -> Qcow2Layer | RawImage:
    """Open the backing file ``name`` (already resolved) of the image ``filename``.

    ``chain`` holds the real paths of the images above it, top first, for the
    loop and depth checks; ``open_qcow2`` builds a qcow2 layer from the opened
    source (the front passes its own constructor, with its options).
    """
    real = os.path.realpath(name)
    if real in chain:
        raise BackingChainError(f"{filename}: backing chain loops back to {name}",
                                field="backing_file_offset", offset=8, path=filename)
    if len(chain) > max_depth:
        raise BackingChainError(f"{filename}: backing chain is deeper than {max_depth} images",
                                field="backing_file_offset", offset=8, path=filename)
    try:
        src = open_source(name, source_kind)
    except ImageNotFoundError as exc:
        raise BackingFileNotFoundError(
            f"{filename}: cannot open backing file {name!r}: {exc.strerror}",
            errno.ENOENT, name, field="backing_file_offset", offset=8, path=filename) from exc
    except Qcow2Error as exc:
        raise BackingChainError(f"{filename}: cannot open backing file {name!r}: {_reason(exc)}",
                                field="backing_file_offset", offset=8, path=filename) from exc
    fmt = backing_format
    if fmt is None:  # probe, as QEMU does when no format is recorded
        fmt = "qcow2" if src.size >= 4 and src.read_at(0, 4) == spec.QCOW_MAGIC else "raw"
    try:
        if fmt == "qcow2":
            return open_qcow2(src, name)
        if fmt == "raw":
            return RawImage(src, name)
    except BaseException:
        src.close()
        raise
    src.close()
    raise UnsupportedFeatureError(f"{filename}: backing file format {fmt!r} is not supported "
                                  f"(qcow2 and raw are)", field="backing format",
                                  offset=format_ext_offset, path=filename)


def open_data_file(filename: str, path: str, ext_offset: int | None,
                   source_kind: SourceKind) -> ByteSource:
    """Open the external data file ``path`` (already resolved) of the image ``filename``."""
    try:
        return open_source(path, source_kind)
    except ImageNotFoundError as exc:
        raise DataFileNotFoundError(
            f"{filename}: cannot open external data file {path!r}: {exc.strerror}",
            errno.ENOENT, path, field="data file extension", offset=ext_offset,
            path=filename) from exc
    except Qcow2Error as exc:
        raise CorruptImageError(f"{filename}: cannot open external data file {path!r}: "
                                f"{_reason(exc)}", field="data file extension",
                                offset=ext_offset, path=filename) from exc


def read_backing(backing: Qcow2Layer | RawImage, offset: int, dst: memoryview) -> None:
    """Read from a backing image; what lies beyond its size reads as zeros."""
    n = len(dst)
    inside = max(0, min(n, backing.size - offset))
    if inside:
        backing.readinto(offset, dst[:inside])
    if inside < n:
        dst[inside:] = bytes(n - inside)


def backing_reach(backing: Qcow2Layer | RawImage | None, start: int, end: int) -> int:
    """Where the backing file stops providing the range [start, end) a layer leaves unallocated.

    The backing file provides [start, reach); from ``reach`` on (no backing
    file, or past its end) the range reads as zeros at the layer's own depth,
    as QEMU's ``bdrv_co_block_status`` has it.  The one rule of both chain
    walks: :func:`block_status` here and the mapper's vectorized resolver.
    """
    if backing is None:
        return start
    return max(start, min(end, backing.size))


class Status(NamedTuple):
    """Allocation status of a guest range through the whole chain (like QEMU's block status).

    ``depth`` is the chain index of the layer that provides the data (0 =
    this image); ``data`` whether a layer stores data for the range (False
    means it reads as zeros); ``zero`` whether it is known to read as zeros.
    ``layer`` is the image that provides it.
    """

    guest: int
    length: int
    data: bool
    zero: bool
    depth: int
    kind: T.ClusterKind
    layer: "Qcow2Layer | RawImage | None"


def block_status(img: Qcow2Layer | RawImage, offset: int, length: int, depth: int = 0
                 ) -> Iterator[Status]:
    """Walk ``[offset, offset+length)`` through the backing chain, yielding who provides what.

    Unallocated ranges of a layer are resolved in its backing file; past the
    end of the backing file, or with no backing file, they read as zeros.
    """
    end = min(offset + length, img.size)
    if offset >= end:
        return
    if isinstance(img, RawImage):
        yield Status(offset, end - offset, True, False, depth, T.DATA, img)
        return
    for seg in img.segments(offset, end - offset):
        if seg.kind in (T.DATA, T.COMPRESSED):
            yield Status(seg.guest, seg.length, True, False, depth, seg.kind, img)
        elif seg.kind == T.ZERO:
            yield Status(seg.guest, seg.length, False, True, depth, seg.kind, img)
        else:
            back = img.backing
            seg_end = seg.guest + seg.length
            reach = backing_reach(back, seg.guest, seg_end)
            if reach > seg.guest:
                assert back is not None
                yield from block_status(back, seg.guest, reach - seg.guest, depth + 1)
            if reach < seg_end:
                yield Status(reach, seg_end - reach, False, True, depth, T.UNALLOCATED, None)
