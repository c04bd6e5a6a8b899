"""What the engine reads, in which order, and the tasks cut from it.

A *read* (:class:`Read`) is one request to the source: one pread (a
:class:`qcow2kit.hostorder.ReadSpec` of a planner, a compressed stream
included), or several consecutive preads of the plan issued one after the
other into one buffer of at most ``max_chunk`` bytes (a fragmented image has
a pread per cluster or so: grouped, a task carries as many bytes as on an
unfragmented image, and the engine's per-task work is paid once per group).
It knows, before it is issued, which guest ranges its bytes belong to.

A *task* (:class:`Task`) is a read plus the guest ranges it still has to
copy: the runs of set bits of the copy bitmap inside the read's ranges,
cleared when the task is created (:meth:`CopyBitmap.take`), so tasks never
overlap.  A read whose bits were all cleared (a discard came first) costs
nothing.

The reads come from the host-order planner (:class:`qcow2kit.hostorder.HostOrderPlan`,
a valid reverse map when there is one) or, in guest order, from the L2 scan
unsorted (:class:`qcow2kit.hostorder.GuestOrderPlan`); either way no longer
than ``max_chunk``, and grouped up to ``max_chunk`` in the plan's order.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..hostorder import (GuestOrderPlan, GuestRanges, HostOrderPlan, ReadSpec, read_spec,
                         read_spec_into, read_specs, spec_pieces)
from ..image import Image
from ..mapping import DEFAULT_MEMORY, FLAG_DATA, FLAG_ZERO, check_memory, resolved_batches
from .bitmap import CopyBitmap

DEFAULT_CHUNK = 1 << 20

Range = tuple[int, int]


@dataclass
class Read:
    """One request to the source: ``cost`` bytes of buffer while it is in flight.

    ``pieces`` lists ``(guest, length, at)``: guest bytes ``[guest, guest+length)``
    are ``data[at:at+length]`` of what ``fetch()`` returns.
    """

    pieces: list[tuple[int, int, int]]
    cost: int
    fetch: Callable[[], memoryview]
    #: ``split(size)``: the same bytes as reads of at most ``size`` bytes (None: one stream)
    split: Callable[[int], list["Read"]] | None = None
    #: the preads ``fetch()`` issues (I/O counts)
    preads: int = 1


@dataclass
class Task:
    """A read and the guest ranges it copies (runs taken from the copy bitmap)."""

    read: Read
    ranges: list[Range]
    attempt: int = 0
    #: parts of ``ranges`` discarded since the task was created: never written
    cancelled: list[Range] = field(default_factory=list)
    writing: bool = False
    #: ``(guest, length, at)`` of each range: its bytes are ``data[at:at+length]`` of the read
    segments: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.ranges)

    def overlaps(self, offset: int, length: int) -> bool:
        return any(a < offset + length and offset < a + n for a, n in self.ranges)


def cut(bitmap: CopyBitmap, read: Read,
        partial: dict[int, list[Range]] | None = None) -> Task | None:
    """The task of ``read``: the set bits inside its guest ranges, taken (cleared) now.

    A read may cover a job cluster only in part: where a file hole or the end of
    the file cuts a cluster, the planner reads the data and leaves the rest (which
    reads as zeros).  Taking such a cluster clears its bit, so ``partial`` (the
    job's, when given) records which of its bytes were taken; a later piece of the
    same cluster (another read's) still takes its own bytes, and what no piece
    covered is zeros, which the job writes at its end (:func:`uncovered`).
    """
    ranges: list[Range] = []
    segments: list[tuple[int, int, int]] = []
    take = bitmap.take
    gran = bitmap.granularity
    for g, n, at in read.pieces:
        got = take(g, n)
        if partial is not None and n and (g % gran or (g + n) % gran and g + n < bitmap.size):
            for e in {g // gran, (g + n - 1) // gran}:
                lo, hi = max(g, e * gran), min(g + n, (e + 1) * gran)
                if lo == e * gran and hi == min((e + 1) * gran, bitmap.size):
                    continue                  # this piece covers the whole cluster
                if any(a <= lo and hi <= a + m for a, m in got):
                    partial.setdefault(e, []).append((lo, hi - lo))
                elif e in partial and not any(a < hi and lo < a + m for a, m in partial[e]):
                    partial[e].append((lo, hi - lo))     # taken before by another piece
                    got.append((lo, hi - lo))
        for a, m in got:
            ranges.append((a, m))
            segments.append((a, m, at + a - g))
    return Task(read, ranges, segments=segments) if ranges else None


def uncovered(partial: dict[int, list[Range]], gran: int, size: int) -> list[Range]:
    """The bytes of the partly taken job clusters that no piece covered (they read as
    zeros), as ranges."""
    out: list[Range] = []
    for e in sorted(partial):
        pos, end = e * gran, min((e + 1) * gran, size)
        for a, m in sorted(partial[e]):
            if a > pos:
                out.append((pos, a - pos))
            pos = max(pos, a + m)
        if end > pos:
            out.append((pos, end - pos))
    return out


def job_granularity(img: Image, max_chunk: int) -> int:
    """The job cluster: the largest power of two dividing every boundary a read can have.

    Reads start and end at (sub)cluster boundaries of each layer, at each
    layer's end and at multiples of ``max_chunk``; so a bit of the copy bitmap
    never belongs to two reads.
    """
    g = max_chunk
    for layer in img.chain():
        if isinstance(layer, Image):
            unit = layer.cluster_size >> (5 if layer.header.extended_l2 else 0)
            g = math.gcd(g, unit)
        g = math.gcd(g, layer.size) if layer.size else g
    return math.gcd(g, img.size) if img.size else g    # a power of two: max_chunk is one


class ReadSource:
    """The reads of an image in one order, planned (and its tables checked) by :meth:`start`."""

    order: str

    def __init__(self, img: Image, *, memory: int = DEFAULT_MEMORY,
                 max_chunk: int = DEFAULT_CHUNK, start: int = 0,
                 length: int | None = None, only: GuestRanges | None = None) -> None:
        check_memory(memory)
        if max_chunk < 4096 or max_chunk & (max_chunk - 1):
            raise ValueError(f"max_chunk must be a power of two of at least 4096, not {max_chunk}")
        self.img = img
        self.memory = memory
        self.max_chunk = max_chunk
        #: the guest range whose data is read (the whole image by default)
        self.range_start = start
        self.range_length = length
        #: the guest ranges whose data is read (a copy bitmap: what is pending), None: all
        self.only = only
        self.total = 0
        self.started = False

    def start(self, want_total: bool = True) -> int:
        """Plan; return the guest bytes of data to read (0 when not ``want_total`` and unknown)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Read]:
        raise NotImplementedError

    def data_bytes(self) -> int:
        """Guest bytes that hold data, through the whole chain (one scan of the tables); with
        ``only``, the data in those ranges of the source's guest range."""
        if self.only is not None:
            plan = HostOrderPlan(self.img, self.range_start, self.range_length,
                                 memory=self.memory, only=self.only)
            return sum(int(runs["length"].sum()) for runs in plan.data_runs())
        total = 0
        for runs in resolved_batches(self.img, memory=self.memory):
            f = runs["flags"]
            data = ((f & np.uint8(FLAG_DATA)) != 0) & ((f & np.uint8(FLAG_ZERO)) == 0)
            total += int(runs["length"][data].sum())
        return total


class HostOrderReads(ReadSource):
    """The planner's preads (:func:`qcow2kit.hostorder.read_specs`): each file front to back.

    Consecutive preads are grouped into one read of at most ``max_chunk`` bytes (its
    preads issued one after the other by the worker), so tasks stay as large on a
    fragmented image as on an unfragmented one."""

    order = "host"

    def start(self, want_total: bool = True) -> int:
        self.started = True
        self.plan = HostOrderPlan(self.img, self.range_start, self.range_length,
                                  memory=self.memory, max_request=self.max_chunk,
                                  only=self.only)
        specs = read_specs(self.plan)
        # The first read of a merged plan comes only after every L2 table of the
        # chain has been read and validated: a corrupt table stops us here.
        first = next(specs, None)
        plan = self.plan
        self.total = (plan.stats.data_bytes if plan.source == "l2" and plan.strategy == "merge"
                      else self.data_bytes() if want_total else 0)
        self._specs: Iterator[ReadSpec] = (itertools.chain([first], specs) if first is not None
                                           else iter(()))
        return self.total

    def __iter__(self) -> Iterator[Read]:
        group: list[ReadSpec] = []
        size = 0
        for spec in self._specs:
            if group and (spec.compressed or size + spec.length > self.max_chunk):
                yield self._group(group)
                group, size = [], 0
            if spec.compressed:
                yield self._read(spec)
                continue
            group.append(spec)
            size += spec.length
        if group:
            yield self._group(group)

    def _group(self, specs: list[ReadSpec]) -> Read:
        if len(specs) == 1:
            return self._read(specs[0])
        pieces: list[tuple[int, int, int]] = []
        at = 0
        for spec in specs:
            pieces += [(g, n, at + a) for g, n, a in spec_pieces(self.plan, spec)]
            at += spec.length
        return Read(pieces, at, functools.partial(self._fetch_group, specs, at),
                    functools.partial(self._split_group, specs), len(specs))

    def _fetch_group(self, specs: list[ReadSpec], total: int) -> memoryview:
        mv = memoryview(bytearray(total))
        at = 0
        for spec in specs:
            read_spec_into(self.plan, spec, mv[at:at + spec.length])
            at += spec.length
        return mv

    def _split_group(self, specs: list[ReadSpec], size: int) -> list[Read]:
        return [read for spec in specs for read in self._split(spec, size)]

    def _read(self, spec: ReadSpec) -> Read:
        plan = self.plan
        pieces = spec_pieces(plan, spec)
        cost = spec.length + (sum(n for _, n, _ in pieces) if spec.compressed else 0)
        return Read(pieces, cost, functools.partial(read_spec, plan, spec),
                    None if spec.compressed else functools.partial(self._split, spec))

    def _split(self, spec: ReadSpec, size: int) -> list[Read]:
        out = []
        for pos in range(0, spec.length, size):
            sub = ReadSpec(spec.file, spec.host + pos, min(size, spec.length - pos), False,
                           spec.runs)
            read = self._read(sub)
            if read.pieces:
                out.append(read)
        return out


class GuestOrderReads(HostOrderReads):
    """Guest order (:class:`qcow2kit.hostorder.GuestOrderPlan`): the chain's data runs in
    guest sequence, read in parallel and grouped as in host order (not through the
    chain's caches)."""

    order = "guest"

    def start(self, want_total: bool = True) -> int:
        self.started = True
        self.plan = GuestOrderPlan(self.img, self.range_start, self.range_length,
                                   memory=self.memory, max_request=self.max_chunk,
                                   only=self.only)
        self.total = self.data_bytes()     # validates every table on the way
        self._specs = read_specs(self.plan)
        return self.total


def read_source(img: Image, order: str = "host", *, memory: int = DEFAULT_MEMORY,
                max_chunk: int = DEFAULT_CHUNK, start: int = 0,
                length: int | None = None, only: GuestRanges | None = None) -> ReadSource:
    """The reads of ``img`` in ``order`` ("host" or "guest"); ``start``/``length`` restrict
    them to a guest range, ``only`` to the set bits of a copy bitmap (nothing else is
    read: the reads are planned from the data inside those ranges)."""
    classes: dict[str, type[ReadSource]] = {"host": HostOrderReads, "guest": GuestOrderReads}
    if order in classes:
        return classes[order](img, memory=memory, max_chunk=max_chunk, start=start,
                              length=length, only=only)
    raise ValueError(f"order must be 'host' or 'guest', not {order!r}")
