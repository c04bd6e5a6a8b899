"""Constants of the qcow2 format, named as in QEMU's docs/interop/qcow2.rst and block/qcow2.h.

The limits below are QEMU's (block/qcow2.h, QEMU 7.2); a parser that accepts
more than QEMU would accept images QEMU refuses, and allocating before
checking them is how CVE-2014-0143..0147 happened.
"""

from __future__ import annotations

QCOW_MAGIC = b"QFI\xfb"

# Header sizes
V2_HEADER_SIZE = 72
V3_MIN_HEADER_LENGTH = 104   # header_length must be at least this for v3
V3_HEADER_SIZE = 112         # what QEMU writes (with compression_type + padding)

# Cluster sizes: 512 B .. 2 MiB (MIN_CLUSTER_BITS, MAX_CLUSTER_BITS)
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MIN_CLUSTER_BITS_EXTENDED_L2 = 14   # extended L2 needs clusters of at least 16 KiB

# QEMU's limits
MAX_L1_SIZE = 32 * 1024 * 1024            # QCOW_MAX_L1_SIZE, bytes
MAX_REFTABLE_SIZE = 8 * 1024 * 1024       # QCOW_MAX_REFTABLE_SIZE, bytes
MAX_SNAPSHOTS = 65536                     # QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOTS_SIZE = 1024 * MAX_SNAPSHOTS # QCOW_MAX_SNAPSHOTS_SIZE (64 MiB)
MAX_SNAPSHOT_EXTRA_DATA = 1024            # QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_BITMAPS = 65535                       # QCOW2_MAX_BITMAPS
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_BITMAP_NAME_SIZE = 1023
MIN_BITMAP_GRANULARITY_BITS = 9
MAX_BITMAP_GRANULARITY_BITS = 31
MAX_BACKING_FILE_NAME = 1023
MAX_DATA_FILE_NAME = 1023
MAX_REFCOUNT_ORDER = 6
HOST_OFFSET_LIMIT = 1 << 56               # offsets are 56-bit (bits 9..55)
INT64_MAX = (1 << 63) - 1
# our cap on the backing chain's length (QEMU fixes none; loops are refused either way)
MAX_BACKING_DEPTH = 16

# Encryption methods (crypt_method)
CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

# Header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# Incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)

# Compatible feature bits
COMPAT_LAZY_REFCOUNTS = 1 << 0

# Autoclear feature bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# Feature-name table types
FEAT_TYPE_INCOMPATIBLE = 0
FEAT_TYPE_COMPATIBLE = 1
FEAT_TYPE_AUTOCLEAR = 2

# The names QEMU writes in its feature-name table, for images that have none.
KNOWN_FEATURE_NAMES = {
    (FEAT_TYPE_INCOMPATIBLE, 0): "dirty bit",
    (FEAT_TYPE_INCOMPATIBLE, 1): "corrupt bit",
    (FEAT_TYPE_INCOMPATIBLE, 2): "external data file",
    (FEAT_TYPE_INCOMPATIBLE, 3): "compression type",
    (FEAT_TYPE_INCOMPATIBLE, 4): "extended L2 entries",
    (FEAT_TYPE_COMPATIBLE, 0): "lazy refcounts",
    (FEAT_TYPE_AUTOCLEAR, 0): "bitmaps",
    (FEAT_TYPE_AUTOCLEAR, 1): "raw external data",
}

# Compression types (header byte 104)
COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# L1 / L2 entry bits
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE

# Extended L2
L2_ENTRY_SIZE = 8
L2_ENTRY_SIZE_EXTENDED = 16
SUBCLUSTERS_PER_CLUSTER = 32

# Snapshot table entry fixed part and extra data
SNAPSHOT_HEADER_SIZE = 40
SNAPSHOT_EXTRA_V3_MIN = 16     # vm_state_size_large + disk_size

# Bitmaps
BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_TYPE_DIRTY_TRACKING = 1
BITMAP_DIR_ENTRY_FIXED = 24
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1


def feature_name(table: dict[tuple[int, int], str] | None, ftype: int, bit: int) -> str:
    """Name of feature ``bit`` of type ``ftype``: from the image's own table, QEMU's names, or 'bit N'."""
    if table and (ftype, bit) in table:
        return table[(ftype, bit)]
    return KNOWN_FEATURE_NAMES.get((ftype, bit), f"unknown feature bit {bit}")
