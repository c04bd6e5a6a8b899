"""Reading a qcow2 image, in rooms along QEMU's own seams, behind the :class:`Image` front.

==============  ===========================================================
core            :class:`Image` (and :func:`open`): the thin front
header          the header and its extensions (qcow2_do_open)
snapshots       the internal snapshot table, finding one snapshot (qcow2-snapshot.c)
bitmaps         the persistent bitmap directory (qcow2-bitmap.c)
refcounts       the refcount table and blocks (qcow2-refcount.c)
l2              the one L1/L2 reader, its validation and its cache
                (qcow2-cluster.c, qcow2-cache.c)
compressed      inflating compressed clusters (qcow2-threads.c)
chain           backing files, data files, raw layers, the chain resolver
==============  ===========================================================

The rooms import from each other downwards only (core above chain above l2
above header) and never this package or the front, so there are no circles.
"""

from .bitmaps import Bitmap
from .chain import RawImage, Status, block_status
from .core import Image, open
from .header import Header, HeaderExtensionRecord, read_header
from .l2 import DEFAULT_L2_CACHE_BYTES, Segment
from .snapshots import Snapshot, SnapshotRef

__all__ = ["Bitmap", "DEFAULT_L2_CACHE_BYTES", "Header", "HeaderExtensionRecord", "Image",
           "RawImage", "Segment", "Snapshot", "SnapshotRef", "Status", "block_status", "open",
           "read_header"]
