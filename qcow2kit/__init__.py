"""qcow2kit: a pure-Python toolkit for qcow2 disk images.

>>> import qcow2kit
>>> with qcow2kit.open("disk.qcow2") as img:          # doctest: +SKIP
...     print(img.size, img.cluster_size, img.header.compression_name)
...     first_sector = img.read(0, 512)
>>> with qcow2kit.open_guest("disk.qcow2") as f:      # doctest: +SKIP
...     mbr = f.read(512)                              # an io.RawIOBase over the guest disk
"""

from __future__ import annotations

from .errors import (BackingChainError, BackingFileNotFoundError, CorruptImageError,
                     DataFileNotFoundError, ImageLockedError, ImageNotFoundError, ImageOpenError,
                     InvalidHeaderError, NotQcow2Error, OutOfBoundsError, Qcow2Error,
                     ReadOnlyImageError, SnapshotNotFoundError, UnsupportedFeatureError)
from .guestio import GuestFile, open_guest
from .image import (Bitmap, Header, Image, RawImage, Segment, Snapshot, SnapshotRef, Status,
                    open)
from .tables import ClusterKind

__version__ = "0.1.0"

__all__ = [
    "Image", "RawImage", "Header", "Snapshot", "SnapshotRef", "Bitmap", "Segment", "Status", "ClusterKind",
    "open", "GuestFile", "open_guest", "__version__",
    "Qcow2Error", "NotQcow2Error", "InvalidHeaderError", "CorruptImageError",
    "UnsupportedFeatureError", "OutOfBoundsError", "BackingChainError", "ImageLockedError",
    "ReadOnlyImageError", "ImageOpenError", "ImageNotFoundError", "BackingFileNotFoundError",
    "DataFileNotFoundError", "SnapshotNotFoundError",
]
