"""The header: decoding and validating it and its extensions (QEMU's qcow2_do_open, qcow2_read_extensions).

Nothing here reads a table; the checks say which field is wrong and where it lies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import spec
from ..errors import InvalidHeaderError, NotQcow2Error, UnsupportedFeatureError
from ..layout import header as H
from ..layout import offset_of, parse
from ..source import ByteSource


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a



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


def _bad(msg: str, fld: str, off: int | None = None) -> InvalidHeaderError:
    """``fld`` (at ``off``; a header field's offset comes from its declaration) is wrong.

    No path: the image front adds it (:func:`qcow2kit.errors.located`).
    """
    return InvalidHeaderError(msg, field=fld, offset=H.field_offset(fld) if off is None else off)


def _check_table(file_size: int, cluster_size: int, offset: int, nbytes: int,
                 offset_field: str, what: str, field_at: int | None = None) -> None:
    """QEMU's validate_table_offset, plus: the table must lie inside the file.

    ``field_at``: where ``offset_field`` is stored, when it is not a header field.
    """
    if offset % cluster_size:
        raise _bad(f"{what} offset {offset:#x} is not aligned to the cluster size",
                   offset_field, field_at)
    if offset >= spec.HOST_OFFSET_LIMIT or offset + nbytes > spec.INT64_MAX:
        raise _bad(f"{what} offset {offset:#x} is out of range", offset_field, field_at)
    if offset + nbytes > file_size:
        raise _bad(f"{what} [{offset:#x}, +{nbytes:#x}) lies beyond the end of the file "
                   f"({file_size} bytes)", offset_field, field_at)


def read_header(src: ByteSource) -> Header:
    """Decode and validate the header and its extensions (no tables are read)."""
    if src.size < spec.V2_HEADER_SIZE:
        if src.size >= 4 and src.read_at(0, 4) != spec.QCOW_MAGIC or src.size < 4:
            raise NotQcow2Error("not a qcow2 image", field="magic",
                                offset=H.field_offset("magic"))
        raise NotQcow2Error(f"file of {src.size} bytes is too short for a qcow2 header",
                            field="header", offset=0)
    raw = src.read_at(0, spec.V2_HEADER_SIZE, field="header")
    if raw[:4] != spec.QCOW_MAGIC:
        raise NotQcow2Error("not a qcow2 image", field="magic",
                            offset=H.field_offset("magic"))
    h2 = parse(H.HeaderV2, raw, what="header", offset=0)
    if h2.version not in (2, 3):
        raise UnsupportedFeatureError(f"unsupported qcow2 version {h2.version}",
                                      field="version", offset=H.field_offset("version"))
    if not spec.MIN_CLUSTER_BITS <= h2.cluster_bits <= spec.MAX_CLUSTER_BITS:
        raise _bad(f"cluster_bits {h2.cluster_bits} is outside QEMU's range "
                   f"{spec.MIN_CLUSTER_BITS}..{spec.MAX_CLUSTER_BITS}", "cluster_bits")
    hdr = Header(**{k: v for k, v in h2.items() if not k.startswith("_") and k != "magic"})
    cs = hdr.cluster_size

    if hdr.version >= 3:
        if src.size < spec.V3_MIN_HEADER_LENGTH:
            raise NotQcow2Error(f"file of {src.size} bytes is too short for a v3 header",
                                field="header_length", offset=H.field_offset("header_length"))
        t = parse(H.HeaderV3Tail,
                  src.read_at(H.V2_HEADER_LENGTH, H.HeaderV3Tail.sizeof(), field="header"),
                  what="header", offset=H.V2_HEADER_LENGTH)
        hdr.incompatible_features = t.incompatible_features
        hdr.compatible_features = t.compatible_features
        hdr.autoclear_features = t.autoclear_features
        hdr.refcount_order = t.refcount_order
        hdr.header_length = t.header_length
        if hdr.header_length < spec.V3_MIN_HEADER_LENGTH:
            raise _bad(f"header_length {hdr.header_length} is shorter than the "
                       f"{spec.V3_MIN_HEADER_LENGTH} bytes of a version 3 header",
                       "header_length")
        if hdr.header_length % 8:
            raise _bad(f"header_length {hdr.header_length} is not a multiple of 8",
                       "header_length")
        if hdr.header_length > cs:
            raise _bad(f"header_length {hdr.header_length} exceeds the cluster size {cs}",
                       "header_length")
        if hdr.header_length > src.size:
            raise _bad(f"header_length {hdr.header_length} exceeds the file size {src.size}",
                       "header_length")
        if hdr.header_length > spec.V3_MIN_HEADER_LENGTH:
            ct = H.HEADER_FIELDS["compression_type"]
            hdr.compression_type = parse(ct.subcon, src.read_at(ct.offset, ct.size,
                                                                field="compression_type"),
                                         what="compression_type", offset=ct.offset)
    if hdr.refcount_order > spec.MAX_REFCOUNT_ORDER:
        raise _bad(f"refcount_order {hdr.refcount_order} is too large (refcount entries may "
                   f"not exceed 64 bits)", "refcount_order")

    # Features
    unknown = hdr.incompatible_features & ~spec.INCOMPAT_KNOWN
    ext_end = hdr.backing_file_offset if hdr.backing_file_offset else cs
    if hdr.backing_file_offset > cs:
        raise _bad(f"backing_file_offset {hdr.backing_file_offset:#x} lies outside cluster 0 "
                   f"({cs} bytes)", "backing_file_offset")
    _read_extensions(src, hdr, min(ext_end, src.size))
    if unknown:
        names = [spec.feature_name(hdr.feature_names, spec.FEAT_TYPE_INCOMPATIBLE, b)
                 for b in range(64) if unknown >> b & 1]
        bits = ", ".join(f"bit {b}" for b in range(64) if unknown >> b & 1)
        raise UnsupportedFeatureError(
            f"unsupported incompatible feature(s): {', '.join(names)} ({bits})",
            field="incompatible_features", offset=H.field_offset("incompatible_features"))

    if hdr.compression_type not in spec.COMPRESSION_NAMES:
        raise UnsupportedFeatureError(f"unknown compression type {hdr.compression_type}",
                                      field="compression_type", offset=H.field_offset("compression_type"))
    has_ct_bit = bool(hdr.incompatible_features & spec.INCOMPAT_COMPRESSION)
    if hdr.compression_type == spec.COMPRESSION_ZLIB and has_ct_bit:
        raise _bad("the compression type feature bit is set but compression_type is zlib",
                   "incompatible_features")
    if hdr.compression_type != spec.COMPRESSION_ZLIB and not has_ct_bit:
        raise _bad("compression_type is not zlib but the compression type feature bit is clear",
                   "incompatible_features")
    if hdr.extended_l2 and hdr.cluster_bits < spec.MIN_CLUSTER_BITS_EXTENDED_L2:
        raise _bad(f"extended L2 entries need clusters of at least "
                   f"{1 << spec.MIN_CLUSTER_BITS_EXTENDED_L2} bytes (cluster_bits is "
                   f"{hdr.cluster_bits})", "cluster_bits")
    if hdr.crypt_method > spec.CRYPT_LUKS:
        raise _bad(f"unsupported encryption method {hdr.crypt_method}", "crypt_method")
    if hdr.crypt_method == spec.CRYPT_LUKS and hdr.crypto_ext is None:
        raise _bad("LUKS encryption without a full disk encryption header extension",
                   "crypt_method")
    if hdr.has_data_file and hdr.data_file is None:
        raise _bad("the external data file feature is set but the image names no data file",
                   "incompatible_features")
    if hdr.data_file_raw and not hdr.has_data_file:
        raise _bad("data-file-raw is set but the image has no external data file",
                   "autoclear_features")

    # Backing file name
    if hdr.backing_file_offset:
        if hdr.backing_file_size > spec.MAX_BACKING_FILE_NAME:
            raise _bad(f"backing file name of {hdr.backing_file_size} bytes is longer than "
                       f"{spec.MAX_BACKING_FILE_NAME}", "backing_file_size")
        if hdr.backing_file_offset + hdr.backing_file_size > cs:
            raise _bad("backing file name extends past cluster 0", "backing_file_offset")
        name = src.read_at(hdr.backing_file_offset, hdr.backing_file_size, field="backing_file_offset")
        hdr.backing_file = name.decode("utf-8", "surrogateescape")

    # Tables
    rt_bytes = hdr.refcount_table_clusters * cs
    if hdr.refcount_table_clusters == 0:
        raise _bad("the image has no refcount table", "refcount_table_clusters")
    if rt_bytes > spec.MAX_REFTABLE_SIZE:
        raise _bad(f"refcount table of {rt_bytes} bytes exceeds QEMU's limit of "
                   f"{spec.MAX_REFTABLE_SIZE}", "refcount_table_clusters")
    _check_table(src.size, cs, hdr.refcount_table_offset, rt_bytes,
                 "refcount_table_offset", "refcount table")

    if hdr.l1_size * 8 > spec.MAX_L1_SIZE:
        raise _bad(f"L1 table of {hdr.l1_size} entries exceeds QEMU's limit of "
                   f"{spec.MAX_L1_SIZE} bytes", "l1_size")
    if hdr.size > spec.INT64_MAX:
        raise _bad(f"virtual size {hdr.size} is too large", "size")
    l2_entries = cs // (16 if hdr.extended_l2 else 8)
    needed = -(-hdr.size // (cs * l2_entries))
    if needed > hdr.l1_size:
        raise _bad(f"L1 table of {hdr.l1_size} entries is too small for a virtual size of "
                   f"{hdr.size} bytes ({needed} entries needed)", "l1_size")
    if hdr.l1_size:
        _check_table(src.size, cs, hdr.l1_table_offset, hdr.l1_size * 8,
                     "l1_table_offset", "L1 table")

    if hdr.nb_snapshots > spec.MAX_SNAPSHOTS:
        raise _bad(f"{hdr.nb_snapshots} snapshots exceed QEMU's limit of {spec.MAX_SNAPSHOTS}",
                   "nb_snapshots")
    if hdr.nb_snapshots:
        _check_table(src.size, cs, hdr.snapshots_offset,
                     hdr.nb_snapshots * spec.SNAPSHOT_HEADER_SIZE, "snapshots_offset",
                     "snapshot table")
    return hdr


def _read_extensions(src: ByteSource, hdr: Header, end: int) -> None:
    """Walk the header extensions from header_length up to ``end`` (QEMU's qcow2_read_extensions)."""
    off = hdr.header_length
    seen: set[int] = set()
    while off + H.ExtensionFrame.sizeof() <= end:
        frame = parse(H.ExtensionFrame,
                      src.read_at(off, H.ExtensionFrame.sizeof(), field="header extension"),
                      what="header extension", offset=off)
        ext_type, ext_len = frame.type, frame.length
        if ext_type == spec.EXT_END:
            return
        data_off = off + H.ExtensionFrame.sizeof()
        if ext_len > end - data_off:
            raise _bad(f"header extension {ext_type:#010x} of {ext_len} bytes runs past the end "
                       f"of the extension area ({end:#x})", "header extension length",
                       off + offset_of(H.ExtensionFrame, "length"))
        data = src.read_at(data_off, ext_len, field="header extension")
        rec = HeaderExtensionRecord(ext_type, off, data)
        hdr.extensions.append(rec)
        if ext_type in seen and ext_type in (spec.EXT_BACKING_FORMAT, spec.EXT_DATA_FILE,
                                             spec.EXT_BITMAPS, spec.EXT_CRYPTO_HEADER):
            raise _bad(f"header extension {ext_type:#010x} appears twice", "header extension type",
                       off)
        seen.add(ext_type)
        if ext_type == spec.EXT_BACKING_FORMAT:
            if ext_len > 1023:
                raise _bad(f"backing format name of {ext_len} bytes is too long",
                           "backing format extension", off)
            hdr.backing_format = data.split(b"\0", 1)[0].decode("ascii", "replace")
        elif ext_type == spec.EXT_FEATURE_TABLE:
            usable = ext_len - ext_len % H.FeatureNameEntry.sizeof()
            for e in parse(H.FeatureNameTable, data[:usable], what="feature name table",
                           offset=data_off):
                hdr.feature_names[(e.type, e.bit)] = e.name
        elif ext_type == spec.EXT_BITMAPS:
            if ext_len != H.BitmapsExtension.sizeof():
                raise _bad(f"bitmaps extension has length {ext_len}, expected 24",
                           "bitmaps extension", off)
            b = parse(H.BitmapsExtension, data, what="bitmaps extension", offset=data_off)
            # QEMU ignores the extension (all bitmaps inconsistent) when the autoclear bit is off.
            if hdr.autoclear_features & spec.AUTOCLEAR_BITMAPS:
                if b.nb_bitmaps == 0 or b.nb_bitmaps > spec.MAX_BITMAPS:
                    raise _bad(f"bitmaps extension with {b.nb_bitmaps} bitmaps (allowed: 1.."
                               f"{spec.MAX_BITMAPS})", "nb_bitmaps",
                               data_off + offset_of(H.BitmapsExtension, "nb_bitmaps"))
                if b.bitmap_directory_size > spec.MAX_BITMAP_DIRECTORY_SIZE:
                    raise _bad(f"bitmap directory of {b.bitmap_directory_size} bytes exceeds "
                               f"QEMU's limit", "bitmap_directory_size",
                               data_off + offset_of(H.BitmapsExtension, "bitmap_directory_size"))
                if b.bitmap_directory_offset % hdr.cluster_size:
                    raise _bad("bitmap directory offset is not cluster aligned",
                               "bitmap_directory_offset",
                               data_off + offset_of(H.BitmapsExtension, "bitmap_directory_offset"))
                if b.bitmap_directory_offset + b.bitmap_directory_size > src.size:
                    raise _bad("bitmap directory lies beyond the end of the file",
                               "bitmap_directory_offset",
                               data_off + offset_of(H.BitmapsExtension, "bitmap_directory_offset"))
                hdr.bitmaps_ext = {"nb_bitmaps": b.nb_bitmaps,
                                   "bitmap_directory_size": b.bitmap_directory_size,
                                   "bitmap_directory_offset": b.bitmap_directory_offset,
                                   "offset": data_off}
        elif ext_type == spec.EXT_CRYPTO_HEADER:
            if ext_len != H.CryptoHeaderExtension.sizeof():
                raise _bad(f"encryption header extension has length {ext_len}, expected 16",
                           "crypto header extension", off)
            c = parse(H.CryptoHeaderExtension, data, what="crypto header extension",
                      offset=data_off)
            if c.offset % hdr.cluster_size or c.offset + c.length > src.size:
                raise _bad(f"encryption header [{c.offset:#x}, +{c.length:#x}) is not a valid "
                           f"range of the file", "crypto header offset",
                           data_off + offset_of(H.CryptoHeaderExtension, "offset"))
            hdr.crypto_ext = {"offset": c.offset, "length": c.length}
        elif ext_type == spec.EXT_DATA_FILE:
            if ext_len > spec.MAX_DATA_FILE_NAME:
                raise _bad(f"data file name of {ext_len} bytes is too long",
                           "data file extension", off)
            hdr.data_file = H.decode_name_extension(data)
        off = data_off + _align_up(ext_len, 8)

