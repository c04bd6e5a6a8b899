"""Reading an image in host-offset order, in bounded memory.

qcow2 maps guest clusters to host clusters but keeps no reverse map, so to
visit data in host order the planner (:class:`HostOrderPlan`) scans the L2
tables of every layer (:func:`qcow2kit.mapping.resolved_batches`) and sorts
the data runs by (file, host offset) with :mod:`qcow2kit.sort`, in bounded
memory whatever the image size (an external merge by default, or rescans per
host window).  With a valid persistent reverse map (:mod:`qcow2kit.rmap`) it
reads the map instead: its records are already in host order.

So the order is strictly non-decreasing per file over the whole image.  Files
are visited top layer first (its data file if it has one), then each backing
layer for what it still provides.  Host-contiguous runs are coalesced into
requests of at most ``max_request`` bytes.

:func:`read_specs` gives the ordered reads without reading; :func:`read_one`
and :func:`read_host_order` read them, one pread per request, and say which
guest ranges the bytes belong to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np

from .image import Image, RawImage
from .rmap import format as rmap_format
from .sort import PlanStats, sorted_runs
from .mapping import (DEFAULT_MEMORY, FLAG_COMPRESSED, FLAG_DATA, FLAG_OFFSET, FLAG_ZERO,
                      resolved_batches)

#: One planned read: ``length`` bytes at ``host`` in file ``file`` (a chain depth).
#: Runs of several guest ranges share a request; see :data:`RUN_DTYPE`.
REQUEST_DTYPE = np.dtype([("file", "<u2"), ("host", "<u8"), ("length", "<u8"),
                          ("first_run", "<u8"), ("nruns", "<u4"), ("compressed", "u1")])

#: One guest range of a request: guest [guest, guest+length) is stored at ``host`` in
#: the file, which is read for ``rlen`` bytes (= length, except for a compressed
#: cluster, whose stream of rlen bytes at host decompresses to the whole cluster).
RUN_DTYPE = np.dtype([("file", "<u2"), ("host", "<u8"), ("length", "<u8"), ("guest", "<u8"),
                      ("rlen", "<u8"), ("compressed", "u1")])

DEFAULT_MAX_REQUEST = 1 << 20


class GuestRanges(Protocol):
    """Guest ranges a plan is restricted to (a copy bitmap's set bits: what is still pending)."""

    def runs(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The ranges inside ``[offset, offset+length)``, in order, as ``(offset, length)``."""
        ...


def clip_runs(runs: np.ndarray, only: GuestRanges) -> np.ndarray:
    """The parts of RUN_DTYPE ``runs`` (in guest order) that lie inside ``only``'s ranges.

    A run that several ranges cut becomes several runs; the host offset of a part
    moves with its guest offset (a compressed run keeps its stream: it is read whole,
    and only the part's guest bytes are taken from it).  Vectorized: one search of the
    ranges per batch, no loop per run.
    """
    if runs.shape[0] == 0:
        return runs
    guest = runs["guest"].astype(np.int64)
    end = guest + runs["length"].astype(np.int64)
    lo, hi = int(guest.min()), int(end.max())
    ranges = only.runs(lo, hi - lo)
    if not ranges:
        return runs[:0]
    r = np.array(ranges, dtype=np.int64).reshape(-1, 2)
    r_start, r_end = r[:, 0], r[:, 0] + r[:, 1]
    j0 = np.searchsorted(r_end, guest, side="right")    # first range ending after the start
    j1 = np.searchsorted(r_start, end, side="left")     # ranges starting before the end
    count = np.maximum(j1 - j0, 0)
    idx = np.repeat(np.arange(runs.shape[0]), count)
    if idx.shape[0] == 0:
        return runs[:0]
    first_of = np.repeat(np.cumsum(count) - count, count)
    k = j0[idx] + (np.arange(idx.shape[0]) - first_of)
    new_g = np.maximum(guest[idx], r_start[k])
    new_e = np.minimum(end[idx], r_end[k])
    out = runs[idx].copy()
    comp = out["compressed"] != 0
    shift = new_g - guest[idx]
    out["host"] = np.where(comp, out["host"], out["host"].astype(np.int64) + shift)
    out["guest"] = new_g
    out["length"] = new_e - new_g
    out["rlen"] = np.where(comp, out["rlen"], new_e - new_g)
    return out


def _data_runs(runs: np.ndarray, include_holes: bool = False) -> np.ndarray:
    """The runs that must be read: stored data with a host offset.

    The holes of a metadata-preallocated file (data that reads as zero) are
    left out unless ``include_holes``: the reverse map records them, as they
    are allocated clusters all the same.
    """
    f = runs["flags"]
    data = (f & np.uint8(FLAG_DATA)) != 0
    zero = (f & np.uint8(FLAG_ZERO)) != 0
    located = (f & np.uint8(FLAG_OFFSET | FLAG_COMPRESSED)) != 0
    sel = runs[data & (include_holes | ~zero) & located]
    out = np.empty(sel.shape[0], dtype=RUN_DTYPE)
    out["file"] = sel["depth"]
    out["host"] = sel["offset"]
    out["length"] = sel["length"]
    out["guest"] = sel["start"]
    out["rlen"] = sel["length"]
    out["compressed"] = (sel["flags"] & np.uint8(FLAG_COMPRESSED)) != 0
    return out


def coalesce(runs: np.ndarray, *, max_request: int = DEFAULT_MAX_REQUEST,
             read_gap: int = 0) -> np.ndarray:
    """Requests (REQUEST_DTYPE) for host-sorted ``runs``: contiguous runs of one file share one read.

    A run joins the previous request when it starts where that ends (or, with
    ``read_gap``, at most that many bytes later: the gap is read through and
    thrown away) and the request stays within ``max_request`` bytes.  A
    compressed run is always a request of its own.  Runs longer than
    ``max_request`` are not split here; the reader reads them in pieces.
    """
    n = runs.shape[0]
    out = np.empty(0, dtype=REQUEST_DTYPE)
    if n == 0:
        return out
    host = runs["host"].astype(np.int64)
    length = runs["rlen"].astype(np.int64)
    comp = runs["compressed"] != 0
    end = host + length
    new = np.ones(n, dtype=bool)
    gap = host[1:] - end[:-1]
    new[1:] = ((runs["file"][1:] != runs["file"][:-1]) | (gap < 0) | (gap > read_gap)
               | comp[1:] | comp[:-1])
    # Pieces of one compressed cluster (a top layer splitting it) share its one read.
    same_stream = (comp[1:] & comp[:-1] & (runs["file"][1:] == runs["file"][:-1])
                   & (host[1:] == host[:-1]))
    new[1:] &= ~same_stream
    # Enforce max_request greedily inside each chain of joinable runs (loop per chain
    # only where a chain is long enough to need cutting).
    heads = np.flatnonzero(new)
    stops = np.append(heads[1:], n)
    span = end[stops - 1] - host[heads]
    for h, s in zip(heads[span > max_request].tolist(), stops[span > max_request].tolist()):
        start = host[h]
        for i in range(h + 1, s):
            if end[i] - start > max_request:
                new[i] = True
                start = host[i]
    heads = np.flatnonzero(new)
    stops = np.append(heads[1:], n)
    out = np.empty(heads.shape[0], dtype=REQUEST_DTYPE)
    out["file"] = runs["file"][heads]
    out["host"] = host[heads]
    out["length"] = np.maximum.reduceat(end, heads) - host[heads]
    out["first_run"] = heads
    out["nruns"] = stops - heads
    out["compressed"] = comp[heads]
    return out


class HostOrderPlan:
    """The host-ordered reads of an image, produced window by window.

    With ``use_rmap`` (the default) a valid reverse map (:mod:`qcow2kit.rmap`)
    replaces the L2 scan and the sort: its records are already in host order.
    ``source`` says which was used ("rmap" or "l2") and ``source_reason`` why.

    ``strategy`` chooses how the global sort stays within ``memory``: "merge"
    (one L2 scan, sorted chunks spilled to a temporary file and merged) or
    "rescan" (a histogram scan, then one scan per host window; no temporary
    space).  See :func:`sorted_runs`.

    Iterating yields ``(requests, runs)`` pairs: REQUEST_DTYPE rows whose
    ``first_run``/``nruns`` index into the RUN_DTYPE ``runs`` of the same
    window.  ``files`` names the file of each ``file`` index.
    """

    def __init__(self, img: Image, start: int = 0, length: int | None = None, *,
                 memory: int = DEFAULT_MEMORY, max_request: int = DEFAULT_MAX_REQUEST,
                 read_gap: int = 0, strategy: str = "merge", use_rmap: bool = True,
                 include_holes: bool = False, only: GuestRanges | None = None) -> None:
        if strategy not in ("merge", "rescan"):
            raise ValueError(f"strategy must be 'merge' or 'rescan', not {strategy!r}")
        self.img = img
        self.strategy = strategy
        self.start = start
        self.length = length
        self.memory = memory
        self.max_request = max_request
        self.read_gap = read_gap
        self.layers: list[Image | RawImage] = img.chain()
        self.files = [_file_name(layer) for layer in self.layers]
        self.stats = PlanStats()
        # Half the budget for the L2 scan, half for the runs being sorted.
        self._scan_memory = max(64 * 1024, memory // 2)
        self.use_rmap = use_rmap
        self.include_holes = include_holes
        #: the guest ranges whose data is read (None: all of ``[start, start+length)``)
        self.only = only
        self.source, self.source_reason = self._choose_source()

    def _choose_source(self) -> tuple[str, str]:
        """Plan from a valid reverse map when one covers everything, else from the L2 tables."""
        if not self.use_rmap:
            return "l2", "reverse map not requested"
        if self.img.snapshot is not None:
            return "l2", "reverse map not used: it maps the active L1 table, not a snapshot's"
        info = rmap_format.status(self.img)
        if not info.present:
            return "l2", "no reverse map"
        if not info.valid:
            return "l2", f"reverse map not used: {info.reason}"
        if self.img.header.backing_file:
            return "l2", "reverse map not used: it covers this image only, and it has a backing file"
        if (self.start != 0 or (self.length is not None and self.length < self.img.size)
                or self.only is not None):
            return "l2", "reverse map not used: only part of the disk was asked for"
        self._rmap_info = info
        return "rmap", "valid reverse map"

    def _rmap_runs(self) -> Iterator[np.ndarray]:
        """Host-sorted RUN_DTYPE batches straight from the reverse map (one sequential read)."""
        img = self.img
        info = self._rmap_info
        unit_bits = info.unit_bits
        comp = rmap_format.compressed_records(img, info)
        ci = 0
        for host_u, guest_u, count in rmap_format.records(img, info):
            host = host_u << np.uint64(unit_bits)
            guest = guest_u << np.uint64(unit_bits)
            length = count << np.uint64(unit_bits)
            over = guest + length > np.uint64(img.size)
            if over.any():
                length = np.where(over, np.uint64(img.size) - guest, length)
            limit = host[-1] + length[-1]
            cj = ci + int(np.searchsorted(comp["host"][ci:], limit, side="left"))
            out = np.empty(host.shape[0] + (cj - ci), dtype=RUN_DTYPE)
            n = host.shape[0]
            out["file"][:n] = 0
            out["host"][:n] = host
            out["length"][:n] = length
            out["guest"][:n] = guest
            out["rlen"][:n] = length
            out["compressed"][:n] = 0
            self._fill_compressed(out[n:], comp[ci:cj])
            had_compressed = cj > ci
            ci = cj
            # Data records are in host order already; compressed ones are merged in.
            yield out[np.argsort(out["host"], kind="stable")] if had_compressed else out
        if ci < comp.shape[0]:
            rest = np.empty(comp.shape[0] - ci, dtype=RUN_DTYPE)
            self._fill_compressed(rest, comp[ci:])
            yield rest

    def _fill_compressed(self, out: np.ndarray, comp: np.ndarray) -> None:
        cs = self.img.cluster_size
        out["file"] = 0
        out["host"] = comp["host"]
        out["guest"] = comp["guest"] << np.uint64(self.img.cluster_bits)
        out["length"] = np.minimum(np.uint64(cs),
                                   np.uint64(self.img.size) - out["guest"])
        out["rlen"] = comp["clen"]
        out["compressed"] = 1

    def _scan(self) -> Iterator[np.ndarray]:
        for runs in resolved_batches(self.img, self.start, self.length,
                                     memory=self._scan_memory, holes=not self.include_holes):
            data = _data_runs(runs, self.include_holes)
            yield data if self.only is None else clip_runs(data, self.only)

    def data_runs(self) -> Iterator[np.ndarray]:
        """The runs the plan reads (RUN_DTYPE batches, in guest order, not sorted by host)."""
        return self._scan()

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        sizes = [_data_size(layer) for layer in self.layers]
        self.stats = PlanStats()  # figures of the latest iteration
        if self.source == "rmap":
            for runs in self._rmap_runs():
                self.stats.runs += runs.shape[0]
                self.stats.data_bytes += int(runs["length"].sum())
                self.stats.windows += 1
                yield coalesce(runs, max_request=self.max_request, read_gap=self.read_gap), runs
            return
        for runs in sorted_runs(self._scan, sizes, memory=self.memory // 2, stats=self.stats,
                                strategy=self.strategy):
            runs = _fix_compressed(self.layers, runs)
            yield coalesce(runs, max_request=self.max_request, read_gap=self.read_gap), runs

    def requests(self) -> Iterator[np.ndarray]:
        """The read requests only (what a disk model needs), window by window."""
        for reqs, _ in self:
            yield reqs


class GuestOrderPlan(HostOrderPlan):
    """The same reads in guest order: each window's runs as the tables list them, unsorted,
    host-contiguous neighbours coalesced (what :func:`guest_order_requests` counts).

    Iterating yields ``(requests, runs)`` pairs as :class:`HostOrderPlan` does, so
    :func:`read_specs` and :func:`read_spec` read them (in parallel, without the chain's
    caches).  No reverse map, no sort: guest order is the order of the L2 scan.
    """

    def __init__(self, img: Image, start: int = 0, length: int | None = None, *,
                 memory: int = DEFAULT_MEMORY, max_request: int = DEFAULT_MAX_REQUEST,
                 only: GuestRanges | None = None) -> None:
        super().__init__(img, start, length, memory=memory, max_request=max_request,
                         use_rmap=False, only=only)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        self.stats = PlanStats()
        for runs in self._scan():
            runs = _fix_compressed(self.layers, runs)
            self.stats.runs += runs.shape[0]
            self.stats.data_bytes += int(runs["length"].sum())
            self.stats.windows += 1
            yield coalesce(runs, max_request=self.max_request), runs


def _data_size(layer: Image | RawImage) -> int:
    if isinstance(layer, Image):
        return layer.data_source.size
    return layer.size


def _file_name(layer: Image | RawImage) -> str:
    if isinstance(layer, Image) and layer.header.has_data_file:
        return layer.data_file_path or layer.filename
    return layer.filename


def _fix_compressed(layers: list[Image | RawImage], runs: np.ndarray) -> np.ndarray:
    """Compressed runs cover whole clusters of guest data; their read length is the stream's."""
    comp = np.flatnonzero(runs["compressed"])
    if comp.shape[0] == 0:
        return runs
    runs = runs.copy()
    for i in comp.tolist():
        layer = layers[int(runs["file"][i])]
        assert isinstance(layer, Image)
        g = int(runs["guest"][i])
        cstart = g >> layer.cluster_bits << layer.cluster_bits
        seg = next(layer.segments(cstart, 1))
        runs["host"][i] = seg.host
        runs["rlen"][i] = seg.csize
    # Keep (file, host) order after the fix-up (offsets do not change, lengths may).
    return runs


@dataclass
class HostReadItem:
    """One read in host order.

    ``file`` is the chain depth (see ``HostOrderPlan.files``), ``host`` and
    ``length`` the bytes read from that file; ``pieces`` lists
    ``(guest_offset, length, data)`` with ``data`` a memoryview of the guest
    bytes (decompressed for a compressed cluster).
    """

    file: int
    host: int
    length: int
    pieces: list[tuple[int, int, memoryview]]


@dataclass
class ReadSpec:
    """One pread the host-order reader will issue: ``length`` bytes at ``host`` in file
    ``file``, covering ``runs`` (RUN_DTYPE rows); ``compressed`` for a compressed stream.
    ``pieces``, when :func:`read_specs` made the spec, is what :func:`spec_pieces` says."""

    file: int
    host: int
    length: int
    compressed: bool
    runs: np.ndarray
    pieces: list[tuple[int, int, int]] | None = None


def read_specs(plan: HostOrderPlan) -> Iterator[ReadSpec]:
    """The preads of a plan, in order (requests longer than max_request cut in pieces)."""
    max_request = plan.max_request
    for reqs, runs in plan:
        if reqs.shape[0] == 0:
            continue
        # Plain lists per window: a copy asks for every read's pieces, one by one.
        guest, length, host = (runs["guest"].tolist(), runs["length"].tolist(),
                               runs["host"].tolist())
        for f, h, rlen, first, nr, comp in zip(
                reqs["file"].tolist(), reqs["host"].tolist(), reqs["length"].tolist(),
                reqs["first_run"].tolist(), reqs["nruns"].tolist(),
                reqs["compressed"].tolist()):
            rs = runs[first:first + nr]
            if comp:
                yield ReadSpec(f, h, rlen, True, rs)
                continue
            for pos in range(0, max(rlen, 1), max_request):
                lo, hi = h + pos, h + min(rlen, pos + max_request)
                pieces = []
                for k in range(first, first + nr):
                    a, b = max(host[k], lo), min(host[k] + length[k], hi)
                    if b > a:
                        pieces.append((guest[k] + (a - host[k]), b - a, a - lo))
                yield ReadSpec(f, lo, hi - lo, False, rs, pieces)


def spec_pieces(plan: HostOrderPlan, spec: ReadSpec) -> list[tuple[int, int, int]]:
    """Where the bytes of one read belong, without reading: ``(guest, length, at)`` for each
    guest range, ``at`` being its offset in the bytes :func:`read_one` returns for the
    read (decompressed, for a compressed stream)."""
    if spec.pieces is not None:
        return spec.pieces
    rs = spec.runs
    if spec.compressed:
        layer = plan.layers[spec.file]
        assert isinstance(layer, Image)
        cpieces = []
        for k in range(rs.shape[0]):   # every piece of this one stream
            g = int(rs["guest"][k])
            skip = g - (g >> layer.cluster_bits << layer.cluster_bits)
            cpieces.append((g, int(rs["length"][k]), skip))
        return cpieces
    lo, hi = spec.host, spec.host + spec.length
    hs = rs["host"].astype(np.int64)
    ls = rs["length"].astype(np.int64)
    pieces = []
    for k in np.flatnonzero((hs < hi) & (hs + ls > lo)).tolist():
        a = max(int(hs[k]), lo)
        b = min(int(hs[k] + ls[k]), hi)
        pieces.append((int(rs["guest"][k]) + (a - int(hs[k])), b - a, a - lo))
    return pieces


def read_spec(plan: HostOrderPlan, spec: ReadSpec) -> memoryview:
    """The bytes of one read of the plan (decompressed for a compressed stream; thread-safe)."""
    layer = plan.layers[spec.file]
    if spec.compressed:
        assert isinstance(layer, Image)
        return memoryview(layer.inflate(spec.host, spec.length))
    src = layer.data_source if isinstance(layer, Image) else layer.src
    return memoryview(src.read_padded(spec.host, spec.length, field="data cluster"))


def read_spec_into(plan: HostOrderPlan, spec: ReadSpec, buf: memoryview) -> None:
    """:func:`read_spec` of a read that is not compressed, into ``buf`` (its length)."""
    assert not spec.compressed and len(buf) == spec.length
    layer = plan.layers[spec.file]
    src = layer.data_source if isinstance(layer, Image) else layer.src
    avail = max(0, min(spec.length, src.size - spec.host))
    if avail:
        src.readinto_at(spec.host, buf[:avail], field="data cluster")
    if avail < spec.length:              # past the end of the file: zeros, as read_padded
        buf[avail:] = bytes(spec.length - avail)


def read_one(plan: HostOrderPlan, spec: ReadSpec) -> HostReadItem:
    """Issue one pread of the plan and say where its bytes belong (thread-safe)."""
    data = read_spec(plan, spec)
    return HostReadItem(spec.file, spec.host, spec.length,
                        [(g, n, data[at:at + n]) for g, n, at in spec_pieces(plan, spec)])


def read_host_order(img: Image, start: int = 0, length: int | None = None, *,
                    memory: int = DEFAULT_MEMORY, max_request: int = DEFAULT_MAX_REQUEST,
                    read_gap: int = 0, plan: HostOrderPlan | None = None
                    ) -> Iterator[HostReadItem]:
    """Yield the image's stored guest data in host order, one item per read request.

    Every data cluster (or subcluster) of every layer that the guest sees
    comes out exactly once; ranges that read as zero are not read (use
    :func:`zero_ranges` for them).  A request longer than ``max_request``
    (a long contiguous run) is read in ``max_request`` pieces.  To keep
    several reads in flight, use :func:`read_specs` and :func:`read_one`
    from a thread pool.
    """
    img._check_readable()
    p = plan or HostOrderPlan(img, start, length, memory=memory, max_request=max_request,
                              read_gap=read_gap)
    for spec in read_specs(p):
        yield read_one(p, spec)


def zero_ranges(img: Image, start: int = 0, length: int | None = None, *,
                memory: int = DEFAULT_MEMORY) -> Iterator[tuple[int, int]]:
    """Guest ranges that read as zeros without reading anything (merged, guest order)."""
    pend: tuple[int, int] | None = None
    for runs in resolved_batches(img, start, length, memory=memory):
        f = runs["flags"]
        z = ((f & np.uint8(FLAG_ZERO)) != 0) | ((f & np.uint8(FLAG_DATA)) == 0)
        sel = runs[z]
        for s, n in zip(sel["start"].tolist(), sel["length"].tolist()):
            if pend is not None and pend[0] + pend[1] == s:
                pend = (pend[0], pend[1] + n)
            else:
                if pend is not None:
                    yield pend
                pend = (s, n)
    if pend is not None:
        yield pend


def guest_order_requests(img: Image, start: int = 0, length: int | None = None, *,
                         memory: int = DEFAULT_MEMORY, max_request: int = DEFAULT_MAX_REQUEST
                         ) -> Iterator[np.ndarray]:
    """The requests a guest-order reader issues (REQUEST_DTYPE, no run index), batch by batch.

    Runs are taken in guest order and host-contiguous neighbours in the same
    file are coalesced, exactly as :func:`coalesce` does for host order.
    """
    for runs in resolved_batches(img, start, length, memory=memory):
        d = _data_runs(runs)
        yield coalesce(_fix_compressed(img.chain(), d), max_request=max_request)


def map_host_order(img: Image, start: int = 0, length: int | None = None, *,
                   memory: int = DEFAULT_MEMORY, include_all: bool = False,
                   strategy: str = "merge") -> Iterator[np.ndarray]:
    """The extents of :func:`qcow2kit.mapping.map_batches` sorted by (file, host offset).

    Extents with a host offset come first, ordered by chain depth (their
    file) and offset; then, in guest order, data extents without an offset
    (compressed or encrypted data), and with ``include_all`` the extents
    that hold no data.  Memory stays bounded as for :class:`HostOrderPlan`.
    """
    from .mapping import map_batches

    layers = img.chain()
    sizes = [_data_size(layer) for layer in layers]
    scan_memory = max(64 * 1024, memory // 2)

    def located() -> Iterator[np.ndarray]:
        for b in map_batches(img, start, length, memory=scan_memory):
            f = b["flags"]
            yield b[((f & np.uint8(FLAG_DATA)) != 0) & ((f & np.uint8(FLAG_OFFSET)) != 0)]

    yield from sorted_runs(located, sizes, memory=memory // 2, file_field="depth",
                           host_field="offset", strategy=strategy)
    for b in map_batches(img, start, length, memory=scan_memory):
        f = b["flags"]
        data = (f & np.uint8(FLAG_DATA)) != 0
        off = (f & np.uint8(FLAG_OFFSET)) != 0
        rest = (data & ~off) | (~data if include_all else np.zeros(b.shape[0], bool))
        if rest.any():
            yield b[rest]
