"""Image: an opened qcow2 file with its validated header, tables and backing chain.

Opening validates the header once, against QEMU's limits and the file size
(the checks mirror ``qcow2_do_open`` in QEMU's block/qcow2.c and are named in
the errors they raise).  Tables are loaded lazily: the L1 table on the first
read, L2 tables through a cache bounded in bytes.  Guest reads resolve each
range to its layer (this image, its data file, its backing chain) exactly as
QEMU does, so ``Image.read`` returns the bytes a guest would see.
"""

from __future__ import annotations

import errno
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator, NamedTuple

import numpy as np

from . import spec
from . import tables as T
from .errors import (BackingChainError, BackingFileNotFoundError, CorruptImageError,
                     DataFileNotFoundError, ImageNotFoundError, InvalidHeaderError, NotQcow2Error,
                     Qcow2Error, UnsupportedFeatureError)
from .layout import header as H
from .layout import parse
from .source import ByteSource, SourceKind, closed_error, open_source

DEFAULT_L2_CACHE_BYTES = 4 * 1024 * 1024


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _reason(exc: Qcow2Error) -> str:
    """``exc``'s message without its leading file name (for wrapping it under another file's)."""
    prefix = f"{exc.path}: " if exc.path else ""
    return exc.message[len(prefix):] if prefix and exc.message.startswith(prefix) else exc.message


# --------------------------------------------------------------------------- header


@dataclass
class HeaderExtensionRecord:
    """One header extension as found in the file (unknown types are kept as raw bytes)."""

    type: int
    offset: int        # file offset of the extension's type field
    data: bytes


@dataclass
class Header:
    """The decoded and validated header, with spec field names."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = spec.V2_HEADER_SIZE
    compression_type: int = spec.COMPRESSION_ZLIB
    extensions: list[HeaderExtensionRecord] = field(default_factory=list)
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    bitmaps_ext: dict | None = None
    crypto_ext: dict | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def extension(self, ext_type: int) -> HeaderExtensionRecord | None:
        """The first header extension of ``ext_type``, or None."""
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & spec.INCOMPAT_EXTL2)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & spec.INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & spec.AUTOCLEAR_DATA_FILE_RAW)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & spec.INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & spec.INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & spec.COMPAT_LAZY_REFCOUNTS)

    @property
    def compression_name(self) -> str:
        return spec.COMPRESSION_NAMES[self.compression_type]


def _bad(msg: str, fld: str, off: int, path: str) -> InvalidHeaderError:
    return InvalidHeaderError(f"{path}: {msg}", field=fld, offset=off, path=path)


# Field offsets in the header, for error messages.
_OFF = {
    "magic": 0, "version": 4, "backing_file_offset": 8, "backing_file_size": 16,
    "cluster_bits": 20, "size": 24, "crypt_method": 32, "l1_size": 36, "l1_table_offset": 40,
    "refcount_table_offset": 48, "refcount_table_clusters": 56, "nb_snapshots": 60,
    "snapshots_offset": 64, "incompatible_features": 72, "compatible_features": 80,
    "autoclear_features": 88, "refcount_order": 96, "header_length": 100,
    "compression_type": 104,
}


def _check_table(path: str, file_size: int, cluster_size: int, offset: int, nbytes: int,
                 offset_field: str, what: str) -> None:
    """QEMU's validate_table_offset, plus: the table must lie inside the file."""
    if offset % cluster_size:
        raise _bad(f"{what} offset {offset:#x} is not aligned to the cluster size",
                   offset_field, _OFF[offset_field], path)
    if offset >= spec.HOST_OFFSET_LIMIT or offset + nbytes > spec.INT64_MAX:
        raise _bad(f"{what} offset {offset:#x} is out of range", offset_field,
                   _OFF[offset_field], path)
    if offset + nbytes > file_size:
        raise _bad(f"{what} [{offset:#x}, +{nbytes:#x}) lies beyond the end of the file "
                   f"({file_size} bytes)", offset_field, _OFF[offset_field], path)


def read_header(src: ByteSource) -> Header:
    """Decode and validate the header and its extensions (no tables are read)."""
    path = src.path
    if src.size < spec.V2_HEADER_SIZE:
        if src.size >= 4 and src.read_at(0, 4) != spec.QCOW_MAGIC or src.size < 4:
            raise NotQcow2Error(f"{path}: not a qcow2 image", field="magic",
                                offset=0, path=path)
        raise NotQcow2Error(f"{path}: file of {src.size} bytes is too short for a qcow2 header",
                            field="header", offset=0, path=path)
    raw = src.read_at(0, spec.V2_HEADER_SIZE, field="header")
    if raw[:4] != spec.QCOW_MAGIC:
        raise NotQcow2Error(f"{path}: not a qcow2 image", field="magic",
                            offset=0, path=path)
    h2 = parse(H.HeaderV2, raw, what="header", offset=0)
    if h2.version not in (2, 3):
        raise UnsupportedFeatureError(f"{path}: unsupported qcow2 version {h2.version}",
                                      field="version", offset=4, path=path)
    if not spec.MIN_CLUSTER_BITS <= h2.cluster_bits <= spec.MAX_CLUSTER_BITS:
        raise _bad(f"cluster_bits {h2.cluster_bits} is outside QEMU's range "
                   f"{spec.MIN_CLUSTER_BITS}..{spec.MAX_CLUSTER_BITS}", "cluster_bits", 20, path)
    hdr = Header(**{k: v for k, v in h2.items() if not k.startswith("_") and k != "magic"})
    cs = hdr.cluster_size

    if hdr.version >= 3:
        if src.size < spec.V3_MIN_HEADER_LENGTH:
            raise NotQcow2Error(f"{path}: file of {src.size} bytes is too short for a v3 header",
                                field="header_length", offset=100, path=path)
        t = parse(H.HeaderV3Tail, src.read_at(72, 32, field="header"), what="header", offset=72)
        hdr.incompatible_features = t.incompatible_features
        hdr.compatible_features = t.compatible_features
        hdr.autoclear_features = t.autoclear_features
        hdr.refcount_order = t.refcount_order
        hdr.header_length = t.header_length
        if hdr.header_length < spec.V3_MIN_HEADER_LENGTH:
            raise _bad(f"header_length {hdr.header_length} is shorter than the "
                       f"{spec.V3_MIN_HEADER_LENGTH} bytes of a version 3 header",
                       "header_length", 100, path)
        if hdr.header_length % 8:
            raise _bad(f"header_length {hdr.header_length} is not a multiple of 8",
                       "header_length", 100, path)
        if hdr.header_length > cs:
            raise _bad(f"header_length {hdr.header_length} exceeds the cluster size {cs}",
                       "header_length", 100, path)
        if hdr.header_length > src.size:
            raise _bad(f"header_length {hdr.header_length} exceeds the file size {src.size}",
                       "header_length", 100, path)
        if hdr.header_length > spec.V3_MIN_HEADER_LENGTH:
            hdr.compression_type = src.read_at(104, 1, field="compression_type")[0]
    if hdr.refcount_order > spec.MAX_REFCOUNT_ORDER:
        raise _bad(f"refcount_order {hdr.refcount_order} is too large (refcount entries may "
                   f"not exceed 64 bits)", "refcount_order", 96, path)

    # Features
    unknown = hdr.incompatible_features & ~spec.INCOMPAT_KNOWN
    ext_end = hdr.backing_file_offset if hdr.backing_file_offset else cs
    if hdr.backing_file_offset > cs:
        raise _bad(f"backing_file_offset {hdr.backing_file_offset:#x} lies outside cluster 0 "
                   f"({cs} bytes)", "backing_file_offset", 8, path)
    _read_extensions(src, hdr, min(ext_end, src.size))
    if unknown:
        names = [spec.feature_name(hdr.feature_names, spec.FEAT_TYPE_INCOMPATIBLE, b)
                 for b in range(64) if unknown >> b & 1]
        bits = ", ".join(f"bit {b}" for b in range(64) if unknown >> b & 1)
        raise UnsupportedFeatureError(
            f"{path}: unsupported incompatible feature(s): {', '.join(names)} ({bits})",
            field="incompatible_features", offset=72, path=path)

    if hdr.compression_type not in spec.COMPRESSION_NAMES:
        raise UnsupportedFeatureError(f"{path}: unknown compression type {hdr.compression_type}",
                                      field="compression_type", offset=104, path=path)
    has_ct_bit = bool(hdr.incompatible_features & spec.INCOMPAT_COMPRESSION)
    if hdr.compression_type == spec.COMPRESSION_ZLIB and has_ct_bit:
        raise _bad("the compression type feature bit is set but compression_type is zlib",
                   "incompatible_features", 72, path)
    if hdr.compression_type != spec.COMPRESSION_ZLIB and not has_ct_bit:
        raise _bad("compression_type is not zlib but the compression type feature bit is clear",
                   "incompatible_features", 72, path)
    if hdr.extended_l2 and hdr.cluster_bits < spec.MIN_CLUSTER_BITS_EXTENDED_L2:
        raise _bad(f"extended L2 entries need clusters of at least "
                   f"{1 << spec.MIN_CLUSTER_BITS_EXTENDED_L2} bytes (cluster_bits is "
                   f"{hdr.cluster_bits})", "cluster_bits", 20, path)
    if hdr.crypt_method > spec.CRYPT_LUKS:
        raise _bad(f"unsupported encryption method {hdr.crypt_method}", "crypt_method", 32, path)
    if hdr.crypt_method == spec.CRYPT_LUKS and hdr.crypto_ext is None:
        raise _bad("LUKS encryption without a full disk encryption header extension",
                   "crypt_method", 32, path)
    if hdr.has_data_file and hdr.data_file is None:
        raise _bad("the external data file feature is set but the image names no data file",
                   "incompatible_features", 72, path)
    if hdr.data_file_raw and not hdr.has_data_file:
        raise _bad("data-file-raw is set but the image has no external data file",
                   "autoclear_features", 88, path)

    # Backing file name
    if hdr.backing_file_offset:
        if hdr.backing_file_size > spec.MAX_BACKING_FILE_NAME:
            raise _bad(f"backing file name of {hdr.backing_file_size} bytes is longer than "
                       f"{spec.MAX_BACKING_FILE_NAME}", "backing_file_size", 16, path)
        if hdr.backing_file_offset + hdr.backing_file_size > cs:
            raise _bad("backing file name extends past cluster 0", "backing_file_offset", 8, path)
        name = src.read_at(hdr.backing_file_offset, hdr.backing_file_size, field="backing_file_offset")
        hdr.backing_file = name.decode("utf-8", "surrogateescape")

    # Tables
    rt_bytes = hdr.refcount_table_clusters * cs
    if hdr.refcount_table_clusters == 0:
        raise _bad("the image has no refcount table", "refcount_table_clusters", 56, path)
    if rt_bytes > spec.MAX_REFTABLE_SIZE:
        raise _bad(f"refcount table of {rt_bytes} bytes exceeds QEMU's limit of "
                   f"{spec.MAX_REFTABLE_SIZE}", "refcount_table_clusters", 56, path)
    _check_table(path, src.size, cs, hdr.refcount_table_offset, rt_bytes,
                 "refcount_table_offset", "refcount table")

    if hdr.l1_size * 8 > spec.MAX_L1_SIZE:
        raise _bad(f"L1 table of {hdr.l1_size} entries exceeds QEMU's limit of "
                   f"{spec.MAX_L1_SIZE} bytes", "l1_size", 36, path)
    if hdr.size > spec.INT64_MAX:
        raise _bad(f"virtual size {hdr.size} is too large", "size", 24, path)
    l2_entries = cs // (16 if hdr.extended_l2 else 8)
    needed = -(-hdr.size // (cs * l2_entries))
    if needed > hdr.l1_size:
        raise _bad(f"L1 table of {hdr.l1_size} entries is too small for a virtual size of "
                   f"{hdr.size} bytes ({needed} entries needed)", "l1_size", 36, path)
    if hdr.l1_size:
        _check_table(path, src.size, cs, hdr.l1_table_offset, hdr.l1_size * 8,
                     "l1_table_offset", "L1 table")

    if hdr.nb_snapshots > spec.MAX_SNAPSHOTS:
        raise _bad(f"{hdr.nb_snapshots} snapshots exceed QEMU's limit of {spec.MAX_SNAPSHOTS}",
                   "nb_snapshots", 60, path)
    if hdr.nb_snapshots:
        _check_table(path, src.size, cs, hdr.snapshots_offset,
                     hdr.nb_snapshots * spec.SNAPSHOT_HEADER_SIZE, "snapshots_offset",
                     "snapshot table")
    return hdr


def _read_extensions(src: ByteSource, hdr: Header, end: int) -> None:
    """Walk the header extensions from header_length up to ``end`` (QEMU's qcow2_read_extensions)."""
    path = src.path
    off = hdr.header_length
    seen: set[int] = set()
    while off + 8 <= end:
        ext_type, ext_len = np.frombuffer(src.read_at(off, 8, field="header extension"),
                                          dtype=">u4").tolist()
        if ext_type == spec.EXT_END:
            return
        data_off = off + 8
        if ext_len > end - data_off:
            raise _bad(f"header extension {ext_type:#010x} of {ext_len} bytes runs past the end "
                       f"of the extension area ({end:#x})", "header extension length",
                       off + 4, path)
        data = src.read_at(data_off, ext_len, field="header extension")
        rec = HeaderExtensionRecord(ext_type, off, data)
        hdr.extensions.append(rec)
        if ext_type in seen and ext_type in (spec.EXT_BACKING_FORMAT, spec.EXT_DATA_FILE,
                                             spec.EXT_BITMAPS, spec.EXT_CRYPTO_HEADER):
            raise _bad(f"header extension {ext_type:#010x} appears twice", "header extension type",
                       off, path)
        seen.add(ext_type)
        if ext_type == spec.EXT_BACKING_FORMAT:
            if ext_len > 1023:
                raise _bad(f"backing format name of {ext_len} bytes is too long",
                           "backing format extension", off, path)
            hdr.backing_format = data.split(b"\0", 1)[0].decode("ascii", "replace")
        elif ext_type == spec.EXT_FEATURE_TABLE:
            usable = ext_len - ext_len % H.FeatureNameEntry.sizeof()
            for e in parse(H.FeatureNameTable, data[:usable], what="feature name table",
                           offset=data_off):
                hdr.feature_names[(e.type, e.bit)] = e.name
        elif ext_type == spec.EXT_BITMAPS:
            if ext_len != H.BitmapsExtension.sizeof():
                raise _bad(f"bitmaps extension has length {ext_len}, expected 24",
                           "bitmaps extension", off, path)
            b = parse(H.BitmapsExtension, data, what="bitmaps extension", offset=data_off)
            # QEMU ignores the extension (all bitmaps inconsistent) when the autoclear bit is off.
            if hdr.autoclear_features & spec.AUTOCLEAR_BITMAPS:
                if b.nb_bitmaps == 0 or b.nb_bitmaps > spec.MAX_BITMAPS:
                    raise _bad(f"bitmaps extension with {b.nb_bitmaps} bitmaps (allowed: 1.."
                               f"{spec.MAX_BITMAPS})", "nb_bitmaps", data_off, path)
                if b.bitmap_directory_size > spec.MAX_BITMAP_DIRECTORY_SIZE:
                    raise _bad(f"bitmap directory of {b.bitmap_directory_size} bytes exceeds "
                               f"QEMU's limit", "bitmap_directory_size", data_off + 8, path)
                if b.bitmap_directory_offset % hdr.cluster_size:
                    raise _bad("bitmap directory offset is not cluster aligned",
                               "bitmap_directory_offset", data_off + 16, path)
                if b.bitmap_directory_offset + b.bitmap_directory_size > src.size:
                    raise _bad("bitmap directory lies beyond the end of the file",
                               "bitmap_directory_offset", data_off + 16, path)
                hdr.bitmaps_ext = {"nb_bitmaps": b.nb_bitmaps,
                                   "bitmap_directory_size": b.bitmap_directory_size,
                                   "bitmap_directory_offset": b.bitmap_directory_offset,
                                   "offset": data_off}
        elif ext_type == spec.EXT_CRYPTO_HEADER:
            if ext_len != H.CryptoHeaderExtension.sizeof():
                raise _bad(f"encryption header extension has length {ext_len}, expected 16",
                           "crypto header extension", off, path)
            c = parse(H.CryptoHeaderExtension, data, what="crypto header extension",
                      offset=data_off)
            if c.offset % hdr.cluster_size or c.offset + c.length > src.size:
                raise _bad(f"encryption header [{c.offset:#x}, +{c.length:#x}) is not a valid "
                           f"range of the file", "crypto header offset", data_off, path)
            hdr.crypto_ext = {"offset": c.offset, "length": c.length}
        elif ext_type == spec.EXT_DATA_FILE:
            if ext_len > spec.MAX_DATA_FILE_NAME:
                raise _bad(f"data file name of {ext_len} bytes is too long",
                           "data file extension", off, path)
            hdr.data_file = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        off = data_off + _align_up(ext_len, 8)


# --------------------------------------------------------------------------- metadata


@dataclass
class Snapshot:
    """One internal snapshot (table entry plus decoded extra data)."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int
    icount: int | None
    extra_data: bytes
    entry_offset: int


@dataclass
class Bitmap:
    """One persistent dirty bitmap (a bitmap directory entry)."""

    name: str
    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    extra_data: bytes
    entry_offset: int

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & spec.BME_FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & spec.BME_FLAG_AUTO)


class Segment(NamedTuple):
    """A guest range of one kind, as resolved by :meth:`Image.segments`.

    ``host`` is the byte offset of the data (in the data file when the image
    has one) for DATA; for COMPRESSED the offset of the compressed stream,
    with ``csize`` its length and ``skip`` the offset of ``guest`` inside the
    decompressed cluster.
    """

    guest: int
    length: int
    kind: T.ClusterKind
    host: int = 0
    csize: int = 0
    skip: int = 0


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


# --------------------------------------------------------------------------- image


class Image:
    """An opened qcow2 image.

    Use :func:`open` or :meth:`Image.open`.  The header is validated on
    open; tables are read lazily.  ``read``/``readinto`` return guest data
    exactly as QEMU would, following the backing chain and data file.
    """

    format = "qcow2"

    def __init__(self, src: ByteSource, *, filename: str | None = None,
                 follow_backing: bool = True, source_kind: SourceKind = "pread",
                 l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
                 max_backing_depth: int = spec.MAX_BACKING_DEPTH,
                 _chain: tuple[str, ...] = ()) -> None:
        self.src = src
        self.filename = filename if filename is not None else src.path
        self.header = read_header(src)
        self.size = self.header.size
        self.cluster_bits = self.header.cluster_bits
        self.cluster_size = self.header.cluster_size
        self.read_only = True
        self.geometry = T.L2Geometry(self.cluster_bits, self.header.extended_l2,
                                     self.header.has_data_file)
        self._source_kind = source_kind
        self._follow_backing = follow_backing
        self._max_depth = max_backing_depth
        self._chain = _chain + (os.path.realpath(src.path),)
        self._l2_cache: OrderedDict[int, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._l2_cache_bytes = max(l2_cache_bytes, self.cluster_size)
        self._l2_cache_used = 0
        self._l1: np.ndarray | None = None
        self._dcache: OrderedDict[int, bytes] = OrderedDict()
        self._backing: Image | RawImage | None = None
        self._backing_opened = False
        self._data_src: ByteSource | None = None

    # -- opening ---------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, source: SourceKind = "pread",
             follow_backing: bool = True, l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
             max_backing_depth: int = spec.MAX_BACKING_DEPTH) -> "Image":
        """Open ``path`` read-only and validate its header."""
        path = os.fspath(path)
        src = open_source(path, source)
        try:
            return cls(src, filename=path, follow_backing=follow_backing, source_kind=source,
                       l2_cache_bytes=l2_cache_bytes, max_backing_depth=max_backing_depth)
        except BaseException:
            src.close()
            raise

    def close(self) -> None:
        """Close the image and its chain; closing twice is harmless.

        Anything that reads afterwards raises ``ValueError("I/O operation on
        closed image")``, as a closed file does; ``header``, ``size`` and
        ``filename`` stay available.
        """
        if self._backing is not None:
            self._backing.close()
            self._backing = None
        if self._data_src is not None:
            self._data_src.close()
            self._data_src = None
        self.src.close()
        self._l1 = None
        self._l2_cache.clear()
        self._l2_cache_used = 0
        self._dcache.clear()
        for name in ("snapshots", "bitmaps"):   # cached_property values: read again -> refused
            self.__dict__.pop(name, None)

    @property
    def closed(self) -> bool:
        return self.src.closed

    def _check_open(self) -> None:
        if self.src.closed:
            raise closed_error()

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Image {self.filename!r} v{self.header.version} size={self.size} "
                f"cluster_size={self.cluster_size}>")

    # -- properties ------------------------------------------------------

    @property
    def encrypted(self) -> bool:
        return self.header.crypt_method != spec.CRYPT_NONE

    @property
    def backing_filename(self) -> str | None:
        """The backing file name as stored in the image (may be relative)."""
        return self.header.backing_file or None

    def resolve_relative(self, name: str) -> str:
        """A name stored in this image, resolved against the image's directory (QEMU's path_combine)."""
        if os.path.isabs(name):
            return name
        base = self.filename
        slash = base.rfind("/")
        return base[:slash + 1] + name if slash >= 0 else name

    @property
    def full_backing_filename(self) -> str | None:
        return self.resolve_relative(self.header.backing_file) if self.header.backing_file else None

    @property
    def data_file_path(self) -> str | None:
        return self.resolve_relative(self.header.data_file) if self.header.has_data_file and \
            self.header.data_file else None

    @property
    def backing(self) -> "Image | RawImage | None":
        """The opened backing image (qcow2 or raw), or None."""
        self._check_open()
        if not self._backing_opened:
            self._backing_opened = True
            if self._follow_backing and self.header.backing_file:
                self._backing = self._open_backing()
        return self._backing

    def _open_backing(self) -> "Image | RawImage":
        name = self.full_backing_filename
        assert name is not None
        real = os.path.realpath(name)
        if real in self._chain:
            raise BackingChainError(f"{self.filename}: backing chain loops back to {name}",
                                    field="backing_file_offset", offset=8, path=self.filename)
        if len(self._chain) > self._max_depth:
            raise BackingChainError(f"{self.filename}: backing chain is deeper than "
                                    f"{self._max_depth} images", field="backing_file_offset",
                                    offset=8, path=self.filename)
        try:
            src = open_source(name, self._source_kind)
        except ImageNotFoundError as exc:
            raise BackingFileNotFoundError(
                f"{self.filename}: cannot open backing file {name!r}: {exc.strerror}",
                errno.ENOENT, name, field="backing_file_offset", offset=8,
                path=self.filename) from exc
        except Qcow2Error as exc:
            raise BackingChainError(f"{self.filename}: cannot open backing file {name!r}: "
                                    f"{_reason(exc)}", field="backing_file_offset", offset=8,
                                    path=self.filename) from exc
        fmt = self.header.backing_format
        if fmt is None:  # probe, as QEMU does when no format is recorded
            fmt = "qcow2" if src.size >= 4 and src.read_at(0, 4) == spec.QCOW_MAGIC else "raw"
        try:
            if fmt == "qcow2":
                return Image(src, filename=name, follow_backing=True,
                             source_kind=self._source_kind, l2_cache_bytes=self._l2_cache_bytes,
                             max_backing_depth=self._max_depth, _chain=self._chain)
            if fmt == "raw":
                return RawImage(src, name)
        except BaseException:
            src.close()
            raise
        src.close()
        raise UnsupportedFeatureError(f"{self.filename}: backing file format {fmt!r} is not "
                                      f"supported (qcow2 and raw are)", field="backing format",
                                      offset=self._ext_offset(spec.EXT_BACKING_FORMAT),
                                      path=self.filename)

    def _ext_offset(self, ext_type: int) -> int | None:
        ext = self.header.extension(ext_type)
        return ext.offset if ext is not None else None

    def chain(self) -> list["Image | RawImage"]:
        """This image and its backing images, top first."""
        out: list[Image | RawImage] = [self]
        cur: Image | RawImage | None = self.backing
        while cur is not None:
            out.append(cur)
            cur = cur.backing if isinstance(cur, Image) else None
        return out

    @property
    def data_source(self) -> ByteSource:
        """Where data clusters live: the external data file, or the image file itself."""
        self._check_open()
        if not self.header.has_data_file:
            return self.src
        if self._data_src is None:
            path = self.data_file_path
            assert path is not None
            try:
                self._data_src = open_source(path, self._source_kind)
            except ImageNotFoundError as exc:
                raise DataFileNotFoundError(
                    f"{self.filename}: cannot open external data file {path!r}: {exc.strerror}",
                    errno.ENOENT, path, field="data file extension",
                    offset=self._ext_offset(spec.EXT_DATA_FILE), path=self.filename) from exc
            except Qcow2Error as exc:
                raise CorruptImageError(f"{self.filename}: cannot open external data file "
                                        f"{path!r}: {_reason(exc)}", field="data file extension",
                                        offset=self._ext_offset(spec.EXT_DATA_FILE),
                                        path=self.filename) from exc
        return self._data_src

    # -- metadata tables ---------------------------------------------------

    @cached_property
    def snapshots(self) -> list[Snapshot]:
        """The internal snapshots, in table order."""
        self._check_open()
        hdr = self.header
        path = self.filename
        out: list[Snapshot] = []
        off = hdr.snapshots_offset
        for i in range(hdr.nb_snapshots):
            off = _align_up(off, 8)
            if off - hdr.snapshots_offset > spec.MAX_SNAPSHOTS_SIZE:
                raise _bad(f"snapshot table exceeds QEMU's limit of {spec.MAX_SNAPSHOTS_SIZE} "
                           f"bytes", "snapshots_offset", 64, path)
            sh = parse(H.SnapshotHeader,
                       self.src.read_at(off, spec.SNAPSHOT_HEADER_SIZE, field=f"snapshot {i}"),
                       what=f"snapshot table entry {i}", offset=off)
            entry_off = off
            off += spec.SNAPSHOT_HEADER_SIZE
            if sh.extra_data_size > spec.MAX_SNAPSHOT_EXTRA_DATA:
                raise _bad(f"snapshot table entry {i} has {sh.extra_data_size} bytes of extra "
                           f"data (QEMU's limit is {spec.MAX_SNAPSHOT_EXTRA_DATA})",
                           "extra_data_size", entry_off + 36, path)
            extra = self.src.read_at(off, sh.extra_data_size, field=f"snapshot {i} extra data")
            off += sh.extra_data_size
            ident = self.src.read_at(off, sh.id_str_size, field=f"snapshot {i} id")
            off += sh.id_str_size
            name = self.src.read_at(off, sh.name_size, field=f"snapshot {i} name")
            off += sh.name_size
            ex = parse(H.SnapshotExtra, extra[:24].ljust(24, b"\0"),
                       what=f"snapshot {i} extra data", offset=entry_off + 40)
            vm_state = ex.vm_state_size_large if len(extra) >= 8 else sh.vm_state_size
            disk_size = ex.disk_size if len(extra) >= 16 else self.size
            icount = ex.icount if len(extra) >= 24 else None
            if sh.l1_size * 8 > spec.MAX_L1_SIZE:
                raise _bad(f"snapshot {i} L1 table of {sh.l1_size} entries is too large",
                           "l1_size", entry_off + 8, path)
            out.append(Snapshot(
                id=ident.decode("utf-8", "replace"), name=name.decode("utf-8", "replace"),
                l1_table_offset=sh.l1_table_offset, l1_size=sh.l1_size, date_sec=sh.date_sec,
                date_nsec=sh.date_nsec, vm_clock_nsec=sh.vm_clock_nsec, vm_state_size=vm_state,
                disk_size=disk_size, icount=icount, extra_data=extra, entry_offset=entry_off))
        if off - hdr.snapshots_offset > spec.MAX_SNAPSHOTS_SIZE:
            raise _bad(f"snapshot table exceeds QEMU's limit of {spec.MAX_SNAPSHOTS_SIZE} bytes",
                       "snapshots_offset", 64, path)
        return out

    @cached_property
    def bitmaps(self) -> list[Bitmap]:
        """The persistent bitmaps of the bitmap directory (empty when the autoclear bit is off)."""
        self._check_open()
        ext = self.header.bitmaps_ext
        if ext is None:
            return []
        path = self.filename
        base = ext["bitmap_directory_offset"]
        size = ext["bitmap_directory_size"]
        raw = self.src.read_at(base, size, field="bitmap directory")
        out: list[Bitmap] = []
        pos = 0
        for i in range(ext["nb_bitmaps"]):
            pos = _align_up(pos, 8)
            if pos + spec.BITMAP_DIR_ENTRY_FIXED > size:
                raise CorruptImageError(f"{path}: bitmap directory entry {i} runs past the "
                                        f"directory size {size}", field="bitmap_directory_size",
                                        offset=base + pos, path=path)
            e = parse(H.BitmapDirEntryHeader, raw[pos:pos + spec.BITMAP_DIR_ENTRY_FIXED],
                      what=f"bitmap directory entry {i}", offset=base + pos)
            end = pos + spec.BITMAP_DIR_ENTRY_FIXED + e.extra_data_size + e.name_size
            if e.name_size > spec.MAX_BITMAP_NAME_SIZE:
                raise CorruptImageError(f"{path}: bitmap {i} name of {e.name_size} bytes is too "
                                        f"long", field="name_size", offset=base + pos + 18,
                                        path=path)
            if end > size:
                raise CorruptImageError(f"{path}: bitmap directory entry {i} runs past the "
                                        f"directory size {size}", field="bitmap_directory_size",
                                        offset=base + pos, path=path)
            if not (spec.MIN_BITMAP_GRANULARITY_BITS <= e.granularity_bits
                    <= spec.MAX_BITMAP_GRANULARITY_BITS):
                raise CorruptImageError(f"{path}: bitmap {i} granularity_bits "
                                        f"{e.granularity_bits} out of range 9..31",
                                        field="granularity_bits", offset=base + pos + 17,
                                        path=path)
            x0 = pos + spec.BITMAP_DIR_ENTRY_FIXED
            extra = raw[x0:x0 + e.extra_data_size]
            name = raw[x0 + e.extra_data_size:end]
            out.append(Bitmap(name=name.decode("utf-8", "replace"),
                              bitmap_table_offset=e.bitmap_table_offset,
                              bitmap_table_size=e.bitmap_table_size, flags=e.flags, type=e.type,
                              granularity_bits=e.granularity_bits, extra_data=extra,
                              entry_offset=base + pos))
            pos = end
        return out

    # -- refcounts -------------------------------------------------------------

    def refcount_blocks(self, end_cluster: int | None = None
                        ) -> Iterator[tuple[int, bytes, int]]:
        """Refcount blocks as ``(first cluster, raw entries, number of entries)``.

        With ``end_cluster``, only the table entries and refcount entries for
        clusters below it are read.  Block offsets are validated (aligned, in
        the file) before they are read.
        """
        self._check_open()
        return self._refcount_blocks(end_cluster)

    def _refcount_blocks(self, end_cluster: int | None) -> Iterator[tuple[int, bytes, int]]:
        h = self.header
        cs = self.cluster_size
        per_block = cs * 8 // h.refcount_bits
        n_entries = h.refcount_table_clusters * cs // 8
        if end_cluster is not None:
            n_entries = min(n_entries, -(-end_cluster // per_block))
        table = T.decode_u64_table(self.src.read_at(h.refcount_table_offset, n_entries * 8,
                                                    field="refcount table"))
        for i in np.flatnonzero(table & np.uint64(spec.REFT_OFFSET_MASK)).tolist():
            block_off = int(table[i]) & spec.REFT_OFFSET_MASK
            if block_off % cs or block_off + cs > self.src.size:
                raise CorruptImageError(f"{self.filename}: refcount block offset "
                                        f"{block_off:#x} is invalid (refcount table index {i})",
                                        field="refcount table entry",
                                        offset=h.refcount_table_offset + 8 * i,
                                        path=self.filename)
            first = i * per_block
            wanted = per_block if end_cluster is None else min(per_block, end_cluster - first)
            raw = self.src.read_at(block_off, -(-wanted * h.refcount_bits // 8),
                                   field="refcount block")
            yield first, raw, wanted

    # -- L1 / L2 -------------------------------------------------------------

    @property
    def l1_table(self) -> np.ndarray:
        """The active L1 table as uint64 entries (loaded on first use)."""
        self._check_open()
        if self._l1 is None:
            n = self.header.l1_size
            raw = self.src.read_at(self.header.l1_table_offset, n * 8, field="L1 table") if n else b""
            self._l1 = T.decode_u64_table(raw)
        return self._l1

    def l2_table(self, l1_index: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Entry words (and subcluster bitmaps) of the L2 table under ``l1_index``, or None."""
        l1 = self.l1_table      # refuses a closed image
        if l1_index >= l1.shape[0]:
            return None
        l2_off = int(l1[l1_index]) & spec.L1E_OFFSET_MASK
        if l2_off == 0:
            return None
        cached = self._l2_cache.get(l2_off)
        if cached is not None:
            self._l2_cache.move_to_end(l2_off)
            return cached
        if l2_off % self.cluster_size:
            raise CorruptImageError(f"{self.filename}: L2 table offset {l2_off:#x} is not cluster "
                                    f"aligned (L1 index {l1_index})", field="l1_table_offset",
                                    offset=self.header.l1_table_offset + 8 * l1_index,
                                    path=self.filename)
        # Past the end of the file, QEMU reads the table as zeros (unallocated entries).
        raw = self.src.read_padded(l2_off, self.cluster_size, field="L2 table")
        entry = T.decode_l2(raw, self.geometry)
        while self._l2_cache and self._l2_cache_used + self.cluster_size > self._l2_cache_bytes:
            self._l2_cache.popitem(last=False)
            self._l2_cache_used -= self.cluster_size
        self._l2_cache[l2_off] = entry
        self._l2_cache_used += self.cluster_size
        return entry

    def _l2_error(self, l1_index: int, guest: int, fld: str, what: str) -> CorruptImageError:
        """A CorruptImageError pointing at the L2 entry (or its bitmap word) of ``guest``."""
        geo = self.geometry
        l2_index = (guest >> self.cluster_bits) & (geo.l2_entries - 1)
        entry = (int(self.l1_table[l1_index]) & spec.L1E_OFFSET_MASK) + l2_index * geo.entry_size
        if fld == "l2 bitmap":
            entry += 8
        return CorruptImageError(f"{self.filename}: {what} (L1 index {l1_index}, L2 index "
                                 f"{l2_index})", field=fld, offset=entry, path=self.filename)

    def check_units(self, l1_index: int, c0: int, entries: np.ndarray, units: T.L2Units) -> None:
        """Refuse L2 entries QEMU refuses (``qcow2_get_host_offset`` and friends).

        ``entries`` are the entry words of clusters ``c0..`` of the L2 table
        under ``l1_index`` and ``units`` their classification.  Raises
        :class:`CorruptImageError` naming the first bad entry.
        """
        geo = self.geometry
        upc = geo.units_per_cluster
        n = entries.shape[0]
        base = l1_index << (self.cluster_bits + geo.l2_bits)

        def fail(ci: int, fld: str, what: str) -> None:
            g = base + ((c0 + ci) << self.cluster_bits)
            raise self._l2_error(l1_index, g, fld, what)

        invalid = units.kind == T.INVALID
        if invalid.any():
            ci = int(np.flatnonzero(invalid)[0]) // upc
            fail(ci, "l2 bitmap", f"invalid subcluster state at guest offset "
                                  f"{base + ((c0 + ci) << self.cluster_bits):#x}")
        comp = (entries & np.uint64(spec.OFLAG_COMPRESSED)) != 0
        if self.header.has_data_file and comp.any():
            fail(int(np.flatnonzero(comp)[0]), "l2 entry",
                 "compressed cluster in an image with an external data file")
        if self.header.version < 3 and not geo.extended:
            zero = ((entries & np.uint64(spec.OFLAG_ZERO)) != 0) & ~comp
            if zero.any():
                fail(int(np.flatnonzero(zero)[0]), "l2 entry",
                     "zero cluster entry in a version 2 image")
        valid = units.offset_valid.reshape(n, upc).any(axis=1) if upc > 1 else units.offset_valid
        if valid.any():
            coff = entries & np.uint64(spec.L2E_OFFSET_MASK)
            bad = valid & ((coff & np.uint64(self.cluster_size - 1)) != 0)
            if bad.any():
                ci = int(np.flatnonzero(bad)[0])
                fail(ci, "l2 entry", f"cluster offset {int(coff[ci]):#x} is not aligned to "
                                     f"the cluster size")
            if self.header.has_data_file:
                guest = (np.arange(c0, c0 + n, dtype=np.uint64) << np.uint64(self.cluster_bits)
                         ) + np.uint64(base)
                bad = valid & (coff != guest)
                if bad.any():
                    ci = int(np.flatnonzero(bad)[0])
                    fail(ci, "l2 entry", f"external data file offset {int(coff[ci]):#x} does "
                                         f"not match the guest offset {int(guest[ci]):#x}")

    def segments(self, offset: int, length: int) -> Iterator[Segment]:
        """Resolve the guest range to runs of one kind in this image alone (no backing).

        Adjacent DATA units are merged while host-contiguous; each compressed
        cluster is its own segment.  The range is clipped to the virtual size.
        """
        self._check_open()          # now, not at the first next()
        return self._segments(offset, length)

    def _segments(self, offset: int, length: int) -> Iterator[Segment]:
        geo = self.geometry
        cb = self.cluster_bits
        span_bits = cb + geo.l2_bits
        unit_bits = geo.unit_bits
        unit = 1 << unit_bits
        end = min(offset + length, self.size)
        pos = max(offset, 0)
        while pos < end:
            l1_index = pos >> span_bits
            l2_base = l1_index << span_bits
            span_end = min(end, (l1_index + 1) << span_bits)
            table = self.l2_table(l1_index)
            if table is None:
                yield Segment(pos, span_end - pos, T.UNALLOCATED)
                pos = span_end
                continue
            entries, bitmaps = table
            c0 = (pos - l2_base) >> cb
            c1 = ((span_end - 1 - l2_base) >> cb) + 1
            units = T.classify(entries[c0:c1], None if bitmaps is None else bitmaps[c0:c1], geo)
            self.check_units(l1_index, c0, entries[c0:c1], units)
            base = l2_base + (c0 << cb)
            bounds = T.run_boundaries(units.kind, units.host, unit, geo.units_per_cluster)
            ends = np.append(bounds[1:], units.kind.shape[0])
            for a, b in zip(bounds.tolist(), ends.tolist()):
                g0 = base + (a << unit_bits)
                g1 = base + (b << unit_bits)
                s = max(g0, pos)
                e = min(g1, span_end)
                if s >= e:
                    continue
                kind = T.KINDS[units.kind[a]]
                if kind == T.DATA:
                    yield Segment(s, e - s, kind, int(units.host[a]) + (s - g0))
                elif kind == T.COMPRESSED:
                    coffset = int(units.host[a])
                    if coffset >= self.src.size:
                        raise self._l2_error(l1_index, g0, "l2 entry",
                                             f"compressed cluster at {coffset:#x} lies beyond "
                                             f"the end of the file ({self.src.size} bytes)")
                    cstart = (g0 >> cb) << cb
                    yield Segment(s, e - s, kind, coffset, int(units.csize[a]), s - cstart)
                else:
                    yield Segment(s, e - s, kind)
            pos = span_end

    # -- guest reads -------------------------------------------------------

    def _decompress(self, coffset: int, csize: int) -> bytes:
        cached = self._dcache.get(coffset)
        if cached is not None:
            self._dcache.move_to_end(coffset)
            return cached
        out = self.inflate(coffset, csize)
        self._dcache[coffset] = out
        if len(self._dcache) > 8:
            self._dcache.popitem(last=False)
        return out

    def inflate(self, coffset: int, csize: int) -> bytes:
        """The cluster stored compressed at ``coffset`` (``csize`` bytes); no cache, thread-safe."""
        self._check_open()
        # The sector-rounded length may run past EOF: QEMU reads that tail as zeros.
        comp = self.src.read_padded(coffset, csize, field="compressed cluster")
        cs = self.cluster_size
        try:
            if self.header.compression_type == spec.COMPRESSION_ZSTD:
                out = _zstd_decompress(comp, cs)
            else:
                d = zlib.decompressobj(-12)
                out = d.decompress(comp, cs)
        except (zlib.error, Exception) as exc:
            if isinstance(exc, Qcow2Error):
                raise
            raise CorruptImageError(f"{self.filename}: compressed cluster does not "
                                    f"decompress: {exc}", field="compressed data",
                                    offset=coffset, path=self.filename) from exc
        if len(out) != cs:
            raise CorruptImageError(f"{self.filename}: compressed cluster "
                                    f"decompresses to {len(out)} bytes, not {cs}",
                                    field="compressed data", offset=coffset, path=self.filename)
        return out

    def _check_readable(self) -> None:
        if self.encrypted:
            method = "LUKS" if self.header.crypt_method == spec.CRYPT_LUKS else "AES"
            raise UnsupportedFeatureError(f"{self.filename}: image is encrypted ({method}); "
                                          f"reading encrypted data is not supported",
                                          field="crypt_method", offset=32, path=self.filename)

    def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        """Fill ``buf`` with guest data from ``offset``; the range must lie within the virtual size."""
        self._check_open()
        mv = memoryview(buf).cast("B")
        length = len(mv)
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"guest range [{offset}, +{length}) is outside the virtual size "
                             f"{self.size}")
        if length == 0:
            return
        self._check_readable()
        for seg in self.segments(offset, length):
            dst = mv[seg.guest - offset:seg.guest - offset + seg.length]
            if seg.kind == T.DATA:
                dst[:] = self.data_source.read_padded(seg.host, seg.length, field="data cluster")
            elif seg.kind == T.COMPRESSED:
                dst[:] = self._decompress(seg.host, seg.csize)[seg.skip:seg.skip + seg.length]
            elif seg.kind == T.UNALLOCATED and self.backing is not None:
                _read_backing(self.backing, seg.guest, dst)
            else:
                dst[:] = bytes(seg.length)

    def read(self, offset: int, length: int) -> bytes:
        """Guest data ``[offset, offset+length)``, exactly as QEMU returns it.

        The range must lie within the virtual size (``ValueError`` otherwise,
        raised before anything is allocated).  For large ranges, stream through
        :class:`qcow2kit.GuestFile` or :meth:`readinto` a buffer of your own.
        """
        self._check_open()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"guest range [{offset}, +{length}) is outside the virtual size "
                             f"{self.size}")
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)


def _read_backing(backing: Image | RawImage, offset: int, dst: memoryview) -> None:
    """Read from a backing image; what lies beyond its size reads as zeros."""
    n = len(dst)
    inside = max(0, min(n, backing.size - offset))
    if inside:
        backing.readinto(offset, dst[:inside])
    if inside < n:
        dst[inside:] = bytes(n - inside)


def _zstd_decompress(comp: bytes, cluster_size: int) -> bytes:
    import zstandard

    out = bytearray()
    data = comp
    while len(out) < cluster_size and data:
        d = zstandard.ZstdDecompressor().decompressobj()
        try:
            out += d.decompress(data)
        except zstandard.ZstdError:
            if out:
                break  # trailing sector padding after a complete frame
            raise
        data = d.unused_data
        if not d.eof:
            break
    return bytes(out[:cluster_size]) if len(out) >= cluster_size else bytes(out)


def open(path: str | os.PathLike[str], *, source: SourceKind = "pread",  # noqa: A001 - like io.open
         follow_backing: bool = True, l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
         max_backing_depth: int = spec.MAX_BACKING_DEPTH) -> Image:
    """Open a qcow2 image read-only and validate its header.

    ``source``: ``"pread"`` (default) or ``"mmap"``, how files are read.
    ``follow_backing``: open the backing chain when unallocated data is read
    (False: unallocated ranges read as zeros).  ``l2_cache_bytes``: the L2
    table cache's budget per image.  ``max_backing_depth``: the longest
    backing chain accepted.  A missing file raises :class:`ImageNotFoundError`
    (a :class:`FileNotFoundError` too).
    """
    return Image.open(path, source=source, follow_backing=follow_backing,
                      l2_cache_bytes=l2_cache_bytes, max_backing_depth=max_backing_depth)


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
    layer: "Image | RawImage | None"


def block_status(img: Image | RawImage, offset: int, length: int, depth: int = 0
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
            covered = 0
            if back is not None:
                covered = max(0, min(seg.length, back.size - seg.guest))
                if covered:
                    yield from block_status(back, seg.guest, covered, depth + 1)
            if covered < seg.length:
                yield Status(seg.guest + covered, seg.length - covered, False, True, depth,
                             T.UNALLOCATED, None)
