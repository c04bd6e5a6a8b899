"""The block-copy engine: a copy bitmap, tasks cut in host order, workers, retry, discard.

``bitmap``  the copy bitmap (what is still to copy, one bit per job cluster)
``tasks``   the reads of a source in host or guest order, and the tasks cut from them
``sparse``  which parts of a buffer are data and which zeros (``-S``)
``target``  the target interface, and the raw file target
``qcow2target``  a new qcow2 image as target (the image builder), reserved in guest order
``gather``  whole units (clusters, hash blocks) assembled from pieces in any order
``engine``  the job: workers, in-flight bound, retry with backoff, discard, progress, rate limit

Usage::

    source = read_source(img, "host")            # plans, checks the tables
    source.start()
    job = CopyJob(source, RawFileTarget(fd, path, img.size), workers=8)
    result = job.run()                           # job.discard(off, n) from any thread
    result.failed                                # [FailedRange(offset, length, error)]
"""

from .bitmap import CopyBitmap
from .engine import (DEFAULT_MAX_INFLIGHT, DEFAULT_WORKERS, MAX_WORKERS, CopyJob, CopyResult,
                     FailedRange, RateLimit)
from .sparse import DEFAULT_MIN_SPARSE, MAX_MIN_SPARSE
from .target import CopyTarget, RawFileTarget, TeeTarget
from .tasks import DEFAULT_CHUNK, GuestOrderReads, HostOrderReads, ReadSource, read_source

__all__ = ["CopyBitmap", "CopyJob", "CopyResult", "CopyTarget", "FailedRange", "GuestOrderReads",
           "HostOrderReads", "RateLimit", "RawFileTarget", "ReadSource", "TeeTarget", "read_source",
           "DEFAULT_CHUNK", "DEFAULT_MAX_INFLIGHT", "DEFAULT_MIN_SPARSE", "DEFAULT_WORKERS",
           "MAX_MIN_SPARSE", "MAX_WORKERS"]
