"""Making the page cache cold for ``bench order --drop-caches`` (never done unasked).

Dropping the caches of the whole machine (``sync; echo 3 > /proc/sys/vm/
drop_caches``, root only) disturbs everything else running on it, so it is
an explicit choice of the person running the benchmark, never a side effect
of the library.  Without root, the files read are evicted one by one with
``posix_fadvise(POSIX_FADV_DONTNEED)``.
"""

from __future__ import annotations

import os
from typing import Sequence

from ..source import ByteSource


def make_cold(sources: Sequence[ByteSource]) -> str:
    """Evict ``sources`` from the page cache; returns "dropped", "fadvise" or "warm"."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return "dropped"
    except OSError:
        pass
    ok = hasattr(os, "posix_fadvise")
    for src in sources:
        fd = src.fileno()
        if not ok or fd < 0:
            ok = False
            continue
        try:
            os.fdatasync(fd)
        except OSError:
            pass
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            ok = False
    return "fadvise" if ok else "warm"
