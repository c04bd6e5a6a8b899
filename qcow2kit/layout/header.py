"""The qcow2 header (cluster 0) and its extensions.

Offsets follow docs/interop/qcow2.rst: a 72-byte version 2 header, version 3
adds the feature bitmaps, refcount_order and header_length (104 bytes), and
optional fields after that, present only when header_length says so.
"""

from __future__ import annotations

from construct import (Bytes, Const, GreedyRange, Int8ub, Int16ub, Int32ub, Int64ub,
                       PaddedString, Struct, this)

from .. import spec

#: The fields common to versions 2 and 3 (bytes 0..71).
HeaderV2 = Struct(
    "magic" / Const(spec.QCOW_MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
)

#: The version 3 additions (bytes 72..103).
HeaderV3Tail = Struct(
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
)

#: One header extension: type, length, data padded to a multiple of 8.
HeaderExtension = Struct(
    "type" / Int32ub,
    "length" / Int32ub,
    "data" / Bytes(this.length),
    "padding" / Bytes((-this.length) % 8),
)

#: One entry of the feature-name table extension (48 bytes).
FeatureNameEntry = Struct(
    "type" / Int8ub,
    "bit" / Int8ub,
    "name" / PaddedString(46, "ascii"),
)
FeatureNameTable = GreedyRange(FeatureNameEntry)

#: Bitmaps extension data (24 bytes).
BitmapsExtension = Struct(
    "nb_bitmaps" / Int32ub,
    "reserved32" / Int32ub,
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)

#: Full disk encryption header pointer extension data (16 bytes).
CryptoHeaderExtension = Struct(
    "offset" / Int64ub,
    "length" / Int64ub,
)

#: Snapshot table entry, fixed part (40 bytes); extra data, id and name follow.
SnapshotHeader = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
)

#: Known snapshot extra data (v3: at least the first two fields).
SnapshotExtra = Struct(
    "vm_state_size_large" / Int64ub,
    "disk_size" / Int64ub,
    "icount" / Int64ub,
)

#: Bitmap directory entry, fixed part (24 bytes); extra data and name follow.
BitmapDirEntryHeader = Struct(
    "bitmap_table_offset" / Int64ub,
    "bitmap_table_size" / Int32ub,
    "flags" / Int32ub,
    "type" / Int8ub,
    "granularity_bits" / Int8ub,
    "name_size" / Int16ub,
    "extra_data_size" / Int32ub,
)

__all__ = [
    "HeaderV2", "HeaderV3Tail", "HeaderExtension", "FeatureNameEntry", "FeatureNameTable",
    "BitmapsExtension", "CryptoHeaderExtension", "SnapshotHeader", "SnapshotExtra",
    "BitmapDirEntryHeader",
]
