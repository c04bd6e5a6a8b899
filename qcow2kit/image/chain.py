"""The chain of files behind an image: backing files (qcow2 or raw), external data files.

Opening them follows QEMU (``bdrv_open_backing_file``, ``qcow2_do_open`` for the
data file): names are resolved against the image's directory, a missing format
is probed, loops and over-deep chains are refused.  :func:`resolve` is the one
resolver of the chain: given each layer's own status of a guest range (as
numpy runs), it says which layer answers, how far each backing file reaches
and at which depth, as QEMU's block status.  Its two callers only differ in
how they read a layer's status: :func:`block_status` from the cached L2
tables of :meth:`Image.segments`, the mapper (:mod:`qcow2kit.mapping`) from
batches of L2 tables read in one pread, with file holes.

This module does not import the :class:`~qcow2kit.image.Image` front (which
imports it); :class:`Qcow2Layer` names what it needs of a qcow2 image.
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Iterator, NamedTuple, Protocol

import numpy as np

from .. import spec
from .. import tables as T
from ..errors import (BackingChainError, BackingFileNotFoundError, CorruptImageError,
                      DataFileNotFoundError, ImageNotFoundError, Qcow2Error,
                      UnsupportedFeatureError)
from ..layout import header as H
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


_BACKING_OFF = H.field_offset("backing_file_offset")

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
        raise BackingChainError(f"backing chain loops back to {name}",
                                field="backing_file_offset", offset=_BACKING_OFF).locate(filename)
    if len(chain) > max_depth:
        raise BackingChainError(f"backing chain is deeper than {max_depth} images",
                                field="backing_file_offset", offset=_BACKING_OFF).locate(filename)
    try:
        src = open_source(name, source_kind)
    except ImageNotFoundError as exc:
        raise BackingFileNotFoundError(      # an OSError: its filename is the missing file
            f"{filename}: cannot open backing file {name!r}: {exc.strerror}", errno.ENOENT, name,
            field="backing_file_offset", offset=_BACKING_OFF, path=filename) from exc
    except Qcow2Error as exc:
        raise BackingChainError(f"cannot open backing file {name!r}: {_reason(exc)}",
                                field="backing_file_offset",
                                offset=_BACKING_OFF).locate(filename) from exc
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
    raise UnsupportedFeatureError(f"backing file format {fmt!r} is not supported "
                                  f"(qcow2 and raw are)", field="backing format",
                                  offset=format_ext_offset).locate(filename)


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
        raise CorruptImageError(f"cannot open external data file {path!r}: {_reason(exc)}",
                                field="data file extension",
                                offset=ext_offset).locate(filename) from exc


def backing_reach(backing: Qcow2Layer | RawImage | None, start: int, end: int) -> int:
    """Where the backing file stops providing the range [start, end) a layer leaves unallocated.

    The backing file provides [start, reach); from ``reach`` on (no backing
    file, or past its end) the range reads as zeros at the layer's own depth,
    as QEMU's ``bdrv_co_block_status`` has it.
    """
    if backing is None:
        return start
    return max(start, min(end, backing.size))


def read_backing(backing: Qcow2Layer | RawImage, offset: int, dst: memoryview) -> None:
    """Read from a backing image; what lies beyond its reach reads as zeros."""
    inside = backing_reach(backing, offset, offset + len(dst)) - offset
    if inside:
        backing.readinto(offset, dst[:inside])
    if inside < len(dst):
        dst[inside:] = bytes(len(dst) - inside)


# --------------------------------------------------------------------------- the resolver
#
# Both walks of the chain (block_status below, for a range at a time, and the
# mapper's batch scan, a window of L2 tables at a time) hand the resolver the
# status of each layer on its own, as an array of runs; the resolver alone
# decides which layer answers for each byte, how far a backing file reaches,
# and the depth qemu-img map reports.

#: One run: a guest range of uniform status (``offset`` is a host offset when FLAG_OFFSET
#: is set; for a compressed run the compressed stream's).  ``qcow2kit.mapping`` calls it
#: EXTENT_DTYPE once merged.
RUN_DTYPE = np.dtype([("start", "<u8"), ("length", "<u8"), ("offset", "<u8"),
                      ("depth", "<u2"), ("kind", "u1"), ("flags", "u1")])

FLAG_PRESENT = 1
FLAG_ZERO = 2
FLAG_DATA = 4
FLAG_OFFSET = 8        # ``offset`` is valid
FLAG_COMPRESSED = 16
#: A layer's own status: "ask the backing file".  No resolved run carries it.
FLAG_FALLTHROUGH = 0x80

#: A layer's own flags by :class:`~qcow2kit.tables.ClusterKind` value (FLAG_OFFSET is the
#: layer's to add: QEMU reports none for encrypted images, one for some zero clusters).
KIND_FLAGS = np.zeros(max(T.KINDS) + 1, np.uint8)
KIND_FLAGS[T.UNALLOCATED] = FLAG_FALLTHROUGH
KIND_FLAGS[T.ZERO] = FLAG_PRESENT | FLAG_ZERO
KIND_FLAGS[T.DATA] = FLAG_PRESENT | FLAG_DATA
KIND_FLAGS[T.COMPRESSED] = FLAG_PRESENT | FLAG_DATA | FLAG_COMPRESSED


class ChainLayer(Protocol):
    """One layer of a chain as the resolver sees it: its size, its backing layer, its runs."""

    @property
    def size(self) -> int: ...

    @property
    def backing(self) -> "ChainLayer | None": ...

    def runs(self, w0: int, w1: int) -> np.ndarray:
        """RUN_DTYPE runs covering [w0, w1) (``w1 <= size``) in this layer alone, in guest
        order; FLAG_FALLTHROUGH where the layer leaves the range to its backing file."""
        ...


def _overlay(top: np.ndarray, below: np.ndarray) -> np.ndarray:
    """Replace the fall-through runs of ``top`` by what ``below`` says for the same range."""
    fall = (top["flags"] & np.uint8(FLAG_FALLTHROUGH)) != 0
    # Elementary pieces: every start of either array, inside the fall-through ranges.
    pts = np.union1d(top["start"], below["start"])
    end = top["start"][-1] + top["length"][-1]
    ti = np.searchsorted(top["start"], pts, side="right") - 1
    keep_top = ~fall[ti]
    # Pieces in non-fall-through top runs collapse back to the top run itself.
    top_heads = keep_top & np.concatenate(([True], ti[1:] != ti[:-1]))
    sel_top = ti[top_heads]
    fall_pts = pts[~keep_top]
    bi = np.searchsorted(below["start"], fall_pts, side="right") - 1
    piece = below[bi].copy()
    delta = fall_pts - piece["start"]
    piece["start"] = fall_pts
    # A compressed cluster's offset is its stream's, whatever part of it a piece covers.
    piece["offset"] = np.where(piece["kind"] == T.COMPRESSED, piece["offset"],
                               piece["offset"] + delta)
    nxt = np.empty(pts.shape[0], np.uint64)
    nxt[:-1] = pts[1:]
    nxt[-1] = end
    piece["length"] = nxt[~keep_top] - fall_pts
    out = np.concatenate((top[sel_top], piece))
    return out[np.argsort(out["start"], kind="stable")]


def _clip(runs: np.ndarray, a: int, b: int) -> np.ndarray:
    """The part of a sorted, gap-free run array inside [a, b)."""
    starts = runs["start"]
    ends = starts + runs["length"]
    i = int(np.searchsorted(ends, np.uint64(a), side="right"))
    j = int(np.searchsorted(starts, np.uint64(b), side="left"))
    out = runs[i:j].copy()
    if out.shape[0]:
        cut = np.uint64(a) - out["start"][0] if out["start"][0] < a else np.uint64(0)
        out["start"][0] += cut
        out["offset"][0] += cut
        out["length"][0] -= cut
        over = out["start"][-1] + out["length"][-1]
        if over > b:
            out["length"][-1] -= over - np.uint64(b)
    return out


def resolve(layer: ChainLayer, w0: int, w1: int, depth: int = 0) -> np.ndarray:
    """Runs of [w0, w1) (``w1 <= layer.size``) with every fall-through resolved down the chain.

    This is the one resolver of the backing chain.  ``depth`` is stamped on
    each run of ``layer`` (0 = the top image, as qemu-img map's "depth").
    What a layer leaves to its backing file comes from the backing file as far
    as it reaches (:func:`backing_reach`), at the backing file's depth;
    beyond, it reads as zero at this layer's depth, not present, keeping the
    layer's own host offset where it has one (an unallocated subcluster of an
    allocated cluster), as QEMU's block status does.  The result is sorted,
    gap-free and not merged.
    """
    runs = layer.runs(w0, w1)
    runs["depth"] = depth
    fall = (runs["flags"] & np.uint8(FLAG_FALLTHROUGH)) != 0
    if not fall.any():
        return runs
    back = layer.backing
    reach = w0 if back is None else max(w0, min(w1, back.size))  # backing_reach, on layers
    parts = []
    if reach > w0:
        assert back is not None
        parts.append(resolve(back, w0, reach, depth + 1))
    if reach < w1:
        own = runs.copy() if reach == w0 else _clip(runs, reach, w1)
        f = own["flags"]
        own["flags"] = np.where((f & np.uint8(FLAG_FALLTHROUGH)) != 0,
                                np.uint8(FLAG_ZERO) | (f & np.uint8(FLAG_OFFSET)), f)
        parts.append(own)
    below = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if fall.all():  # the layer has nothing of its own here: the layers below answer for all
        return below
    return _overlay(runs, below)


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


class _SegmentLayer:
    """A chain layer for :func:`block_status`: runs from :meth:`Image.segments` (cached L2)."""

    def __init__(self, img: Qcow2Layer | RawImage) -> None:
        self.img = img
        self._backing: _SegmentLayer | None = None

    @property
    def size(self) -> int:
        return self.img.size

    @property
    def backing(self) -> "_SegmentLayer | None":
        if self._backing is None and self.img.backing is not None:   # opened on first need
            self._backing = _SegmentLayer(self.img.backing)
        return self._backing

    def runs(self, w0: int, w1: int) -> np.ndarray:
        if isinstance(self.img, RawImage):
            out = np.zeros(1, RUN_DTYPE)
            out[0] = (w0, w1 - w0, w0, 0, T.DATA, FLAG_PRESENT | FLAG_DATA | FLAG_OFFSET)
            return out
        out = np.array([(s.guest, s.length, s.host, 0, s.kind, 0)
                        for s in self.img.segments(w0, w1 - w0)], RUN_DTYPE)
        out["flags"] = KIND_FLAGS[out["kind"]]
        return out


#: Guest bytes block_status resolves at a time, in clusters of the top image.
_STATUS_WINDOW_CLUSTERS = 1 << 14


def block_status(img: Qcow2Layer | RawImage, offset: int, length: int, depth: int = 0
                 ) -> Iterator[Status]:
    """Walk ``[offset, offset+length)`` through the backing chain, yielding who provides what.

    Unallocated ranges of a layer are resolved in its backing file; past the
    end of the backing file, or with no backing file, they read as zeros (at
    the layer's depth, with ``layer`` None).  The chain is resolved by
    :func:`resolve`, the mapper's resolver, a window at a time; ``depth`` is
    added to every depth.
    """
    end = min(offset + length, img.size)
    if offset >= end:
        return
    top = _SegmentLayer(img)
    window = getattr(img, "cluster_size", 1 << 16) * _STATUS_WINDOW_CLUSTERS
    pos = offset
    while pos < end:
        w1 = min(end, (pos // window + 1) * window)
        runs = resolve(top, pos, w1, depth)
        layers: list[Qcow2Layer | RawImage] = []
        layer: _SegmentLayer | None = top
        while layer is not None and len(layers) <= int(runs["depth"].max()) - depth:
            layers.append(layer.img)
            layer = layer._backing        # only the layers the resolver opened
        for start, n, d, kind, flags in zip(runs["start"].tolist(), runs["length"].tolist(),
                                            runs["depth"].tolist(), runs["kind"].tolist(),
                                            runs["flags"].tolist()):
            yield Status(start, n, bool(flags & FLAG_DATA), bool(flags & FLAG_ZERO), d,
                         T.KINDS[kind], None if kind == T.UNALLOCATED else layers[d - depth])
        pos = w1
