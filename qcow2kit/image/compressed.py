"""Compressed clusters: inflating them (zlib or zstd, as QEMU's qcow2-threads.c) and a small cache."""

from __future__ import annotations

import zlib
from collections import OrderedDict

from .. import spec
from ..errors import CorruptImageError, Qcow2Error
from ..source import ByteSource

#: Decompressed clusters kept by :class:`ClusterCache` (a guest read of a compressed
#: cluster usually meets the same cluster again in its next few requests).
CACHED_CLUSTERS = 8


def inflate(src: ByteSource, coffset: int, csize: int, cluster_size: int,
            compression_type: int) -> bytes:
    """The cluster stored compressed at ``coffset`` (``csize`` bytes) of ``src``; thread-safe."""
    # The sector-rounded length may run past EOF: QEMU reads that tail as zeros.
    comp = src.read_padded(coffset, csize, field="compressed cluster")
    cs = cluster_size
    try:
        if compression_type == spec.COMPRESSION_ZSTD:
            out = _zstd_decompress(comp, cs)
        else:
            d = zlib.decompressobj(-12)
            out = d.decompress(comp, cs)
    except (zlib.error, Exception) as exc:
        if isinstance(exc, Qcow2Error):
            raise
        raise CorruptImageError(f"compressed cluster does not decompress: {exc}",
                                field="compressed data", offset=coffset) from exc
    if len(out) != cs:
        raise CorruptImageError(f"compressed cluster decompresses to {len(out)} bytes, "
                                f"not {cs}", field="compressed data", offset=coffset)
    return out


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


class ClusterCache:
    """The last few decompressed clusters, by host offset of their stream (least recent first)."""

    def __init__(self, size: int = CACHED_CLUSTERS) -> None:
        self.size = size
        self.clusters: OrderedDict[int, bytes] = OrderedDict()

    def get(self, coffset: int) -> bytes | None:
        out = self.clusters.get(coffset)
        if out is not None:
            self.clusters.move_to_end(coffset)
        return out

    def put(self, coffset: int, data: bytes) -> None:
        self.clusters[coffset] = data
        if len(self.clusters) > self.size:
            self.clusters.popitem(last=False)

    def clear(self) -> None:
        self.clusters.clear()
