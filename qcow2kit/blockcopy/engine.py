"""The block-copy engine: workers run tasks cut from the copy bitmap, in the source's order.

After QEMU's block-copy (block/block-copy.c): the copy bitmap says what is
still to copy; the caller's thread walks the reads of the source in order
(host order by default, see :mod:`.tasks`), cuts a task from each (taking
its bits, so tasks never overlap) and queues it, keeping the buffers of the
tasks in flight under ``max_inflight`` bytes; ``workers`` threads run the
tasks: read (os.pread / preadv: the GIL is released), find the zeros
(:mod:`.sparse`), write the data (os.pwrite).

A task that fails with an I/O error (EIO, a short read, ENOSPC...) sets its
bits again and is cut and run again after a backoff (``backoff`` seconds,
doubling), up to ``retries`` times; then its ranges are reported in
:attr:`CopyResult.failed` and the job goes on with the rest, unless the error
was the target's (a write error that persists stops the job: every other
write would fail too).  Any other error (a corrupt image) stops the job and is
raised by :meth:`CopyJob.run`.

:meth:`CopyJob.discard` may be called from any thread while the job runs:
the range's bits are cleared, tasks in flight that overlap it never write
there (a write already under way is waited for), and the target drops the
range, so it reads as zeros there when ``discard`` returns.

At the end, what is still marked in the bitmap is what the source reads as
zeros without any read (unallocated and zero clusters): nothing to do for a
``zero_initialized`` target, else written as zeros (stored when
``min_sparse`` is 0, like ``qemu-img convert -S 0``).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import Qcow2Error, ShortReadError
from .bitmap import CopyBitmap
from .sparse import DEFAULT_MIN_SPARSE, MAX_MIN_SPARSE, split_segments
from .target import CopyTarget
from .tasks import Range, ReadSource, Task, cut, job_granularity, uncovered

DEFAULT_WORKERS = 8
MAX_WORKERS = 64
DEFAULT_MAX_INFLIGHT = 128 << 20
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.05

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FailedRange:
    """Guest bytes ``[offset, offset+length)`` that could not be copied, and why."""

    offset: int
    length: int
    error: str

    def __str__(self) -> str:
        return f"{self.offset:#x}+{self.length:#x} ({self.error})"


@dataclass
class CopyResult:
    """What a job did.  ``done``/``total`` are the progress figures (retries included)."""

    total: int = 0
    done: int = 0
    copied: int = 0           # guest bytes of data copied (read, and written or found zero)
    written: int = 0          # bytes written to the target as data
    reads: int = 0            # preads issued to the source (attempts)
    read_bytes: int = 0       # bytes those reads returned (the I/O count tests assert on)
    retries: int = 0
    discarded: int = 0
    peak_inflight: int = 0    # the most buffer bytes in flight at once
    failed: list[FailedRange] = field(default_factory=list)
    #: the target error that stopped the job (the rest was not copied), or None
    stopped: OSError | None = None

    @property
    def complete(self) -> bool:
        return not self.failed and self.stopped is None


class RateLimit:
    """At most ``rate`` bytes per second on average (qemu-img's ``-r``); the first go at once."""

    def __init__(self, rate: int) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        self._next = 0.0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> float:
        """Reserve ``n`` bytes; returns how long to wait before moving them."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + n / self.rate
            return start - now


def retryable(exc: BaseException) -> bool:
    """An I/O error that may pass (EIO, ENOSPC, a short read), not a fault of the image."""
    if isinstance(exc, ShortReadError):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, Qcow2Error)


def subtract(a: int, n: int, cuts: list[Range]) -> list[Range]:
    """``[a, a+n)`` without the ``cuts``, as ranges."""
    out = [(a, a + n)]
    for c, m in cuts:
        nxt = []
        for x, y in out:
            if c >= y or c + m <= x:
                nxt.append((x, y))
                continue
            if x < c:
                nxt.append((x, c))
            if c + m < y:
                nxt.append((c + m, y))
        out = nxt
    return [(x, y - x) for x, y in out if y > x]


class _Failure(Exception):
    def __init__(self, exc: BaseException, side: str) -> None:
        super().__init__(str(exc))
        self.exc = exc
        self.side = side


class CopyJob:
    """Copy ``source``'s guest content to ``target`` (see the module's docstring).

    ``source`` is a :class:`.tasks.ReadSource` (its :meth:`start` is called
    here when the caller has not done it); ``progress(done, total)`` is called
    from the workers, one call at a time, after every task.  ``on_copied(ranges)``
    is called from the worker after each task whose writes all returned, with the
    guest ranges it covered (data and zeros; discarded parts left out): what a
    resumable copy may mark done once the target is flushed.
    """

    def __init__(self, source: ReadSource, target: CopyTarget, *,
                 workers: int = DEFAULT_WORKERS, max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 min_sparse: int = DEFAULT_MIN_SPARSE, rate_limit: int | None = None,
                 retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
                 progress: Progress | None = None,
                 on_copied: Callable[[list[Range]], None] | None = None) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be between 1 and {MAX_WORKERS}, not {workers}")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be positive, not {max_inflight}")
        if not 0 <= min_sparse <= MAX_MIN_SPARSE or min_sparse % 512:
            raise ValueError(f"min_sparse must be a multiple of 512 up to {MAX_MIN_SPARSE}, "
                             f"not {min_sparse}")
        if retries < 0:
            raise ValueError(f"retries must not be negative, not {retries}")
        self.source = source
        self.target = target
        self.workers = workers
        self.max_inflight = max_inflight
        self.min_sparse = min_sparse
        # zeros are looked for in blocks of at least the target's unit (a qcow2 target
        # stores whole clusters, as qemu-img's does)
        self.sparse = min_sparse and max(min_sparse, target.sparse_block)
        self.rate = RateLimit(rate_limit) if rate_limit else None
        self.retries = retries
        self.backoff = backoff
        self.progress = progress
        self.on_copied = on_copied
        self.size = source.img.size
        self.bitmap = CopyBitmap(self.size, job_granularity(source.img, source.max_chunk))
        self.result = CopyResult()
        self._cond = threading.Condition()
        self._progress_lock = threading.Lock()
        self._live: dict[int, Task] = {}
        self._edges: list[Range] = []      # discarded ranges: no later task writes there
        # job clusters a read covered in part (a file hole, the end of the file): the bytes
        # taken so far (tasks.cut); the rest is zeros, written at the end
        self._partial: dict[int, list[Range]] = {}
        self._inflight = 0
        self._pending = 0
        self._stop = False
        self._fatal: BaseException | None = None
        self._target_lock: contextlib.AbstractContextManager[object] = (
            contextlib.nullcontext() if target.threadsafe else threading.Lock())
        self._wake = threading.Event()      # set on stop: pauses (rate, backoff) end at once

    # ------------------------------------------------------------------ discard / cancel

    def discard(self, offset: int, length: int) -> None:
        """Never copy ``[offset, offset+length)``; it reads as zeros on the target on return."""
        end = min(offset + length, self.size)
        if offset < 0 or length < 0:
            raise ValueError(f"bad range {offset:#x}+{length:#x}")
        if offset >= end:
            return
        g = self.bitmap.granularity
        inner_a = -(-offset // g) * g
        inner_b = end if end == self.size else end // g * g
        with self._cond:
            if inner_b > inner_a:
                self.bitmap.clear(inner_a, inner_b - inner_a)
            # no later task writes there: partial clusters keep their bits, and a cluster a
            # read covers in part may still be taken piece by piece (tasks.cut)
            self._edges.append((offset, end - offset))
            for t in self._live.values():
                if t.overlaps(offset, end - offset):
                    t.cancelled.append((offset, end - offset))
            while any(t.writing and t.overlaps(offset, end - offset) for t in self._live.values()):
                self._cond.wait()
            self.result.discarded += end - offset
        with self._target_lock:
            self.target.discard(offset, end - offset)

    def cancel(self) -> None:
        """Stop: no new task starts; :meth:`run` returns once the running ones end."""
        with self._cond:
            self._stop = True
            self._wake.set()
            self._cond.notify_all()

    # ------------------------------------------------------------------ the job

    def run(self) -> CopyResult:
        """Copy everything; returns the result (failed ranges included), raises a fatal error."""
        res = self.result
        if not self.source.started:
            self.source.start()
        res.total = self.source.total
        q: queue.Queue[Task | None] = queue.Queue()
        threads = [threading.Thread(target=self._worker, args=(q,), daemon=True,
                                    name=f"blockcopy-{i}") for i in range(self.workers)]
        for th in threads:
            th.start()
        try:
            for read in self.source:
                with self._cond:
                    # As block-copy creates a task only when it can run: at most one
                    # task per worker, within the bound on buffers in flight.
                    while ((self._pending >= self.workers
                            or self._inflight and self._inflight + read.cost > self.max_inflight)
                           and not self._stop):
                        self._cond.wait()
                    if self._stop:
                        break
                    task = cut(self.bitmap, read, self._partial)
                    if task is None:
                        continue
                    self._register(task)
                    self._pending += 1
                    self._inflight += read.cost
                    res.peak_inflight = max(res.peak_inflight, self._inflight)
                q.put(task)
        except BaseException:
            self.cancel()
            raise
        finally:
            for _ in threads:
                q.put(None)
            for th in threads:
                th.join()
        if self._fatal is not None:
            raise self._fatal
        if res.stopped is None and not self._stop:
            self._zero_the_rest()
        return res

    def _register(self, task: Task) -> None:
        task.cancelled = [e for e in self._edges if task.overlaps(*e)]
        self._live[id(task)] = task

    def _zero_the_rest(self) -> None:
        """What the source reads as zeros without a read: write it unless the target has it.
        That is what is still marked in the bitmap, and the bytes of partly read clusters
        that no read covered (holes, the end of a file)."""
        allocate = self.min_sparse == 0
        if self.target.zero_initialized and not allocate:
            return
        with self._cond:
            gaps = uncovered(self._partial, self.bitmap.granularity, self.size)
            gaps = [r for a, n in gaps for r in subtract(a, n, self._edges)]
        for a, n in gaps:
            with self._target_lock:
                self.target.write_zeroes(a, n, allocate=allocate)
        while True:
            with self._cond:
                runs = self.bitmap.take(0, self.size) if self.size else []
            if not runs:
                return
            for a, n in runs:
                with self._target_lock:
                    self.target.write_zeroes(a, n, allocate=allocate)

    def _worker(self, q: "queue.Queue[Task | None]") -> None:
        while True:
            task = q.get()
            if task is None:
                return
            try:
                if not self._stop:
                    self._run(task)
            except BaseException as exc:   # a fatal error: stop everything, run() raises it
                with self._cond:
                    if self._fatal is None:
                        self._fatal = exc
                    self._stop = True
                    self._wake.set()
            finally:
                with self._cond:
                    self._inflight -= task.read.cost
                    self._pending -= 1
                    self._live.pop(id(task), None)
                    self._cond.notify_all()

    def _run(self, task: Task) -> None:
        res = self.result
        while True:
            nbytes = task.nbytes
            try:
                self._attempt(task)
            except _Failure as f:
                with self._cond:
                    res.done += nbytes
                    again = task.attempt < self.retries and not self._stop
                    keep = [r for a, n in task.ranges for r in subtract(a, n, task.cancelled)]
                    if again:
                        for a, n in keep:
                            self.bitmap.set(a, n)
                        res.total += nbytes
                        res.retries += 1
                        task.attempt += 1
                    elif self._can_split(task, f):
                        for a, n in keep:        # cut again below, one job cluster at a time
                            self.bitmap.set(a, n)
                        res.total += nbytes
                    else:
                        self._failed(keep, f)
                self._report()
                if not again:
                    if self._can_split(task, f):
                        self._run_split(task)
                    return
                self._wake.wait(self.backoff * (1 << (task.attempt - 1)))
                with self._cond:
                    if self._stop:
                        return
                    retry = cut(self.bitmap, task.read, self._partial)
                    if retry is None:
                        return
                    task.ranges, task.segments = retry.ranges, retry.segments
                    task.cancelled = [e for e in self._edges if task.overlaps(*e)]
                continue
            with self._cond:
                res.done += nbytes
                done = ([r for a, n in task.ranges for r in subtract(a, n, task.cancelled)]
                        if task.cancelled else task.ranges)
                res.copied += sum(n for _, n in done) if task.cancelled else nbytes
            if self.on_copied is not None:
                self.on_copied(done)
            self._report()
            return

    def _can_split(self, task: Task, f: _Failure) -> bool:
        """A read that keeps failing is tried once more per job cluster, so that only the
        clusters that fail are reported (a target error stops the job instead)."""
        return (f.side == "source" and task.read.split is not None and not self._stop
                and task.read.cost > self.bitmap.granularity)

    def _run_split(self, task: Task) -> None:
        assert task.read.split is not None
        for read in task.read.split(self.bitmap.granularity):
            with self._cond:
                if self._stop:
                    return
                sub = cut(self.bitmap, read, self._partial)
                if sub is None:
                    continue
                sub.attempt = self.retries       # no retries left: one attempt each
                self._register(sub)
            try:
                self._run(sub)
            finally:
                with self._cond:
                    self._live.pop(id(sub), None)
                    self._cond.notify_all()

    def _failed(self, ranges: list[Range], f: _Failure) -> None:
        text = str(f.exc)
        filename = getattr(f.exc, "filename", None)
        if isinstance(f.exc, OSError) and filename and not isinstance(f.exc, Qcow2Error):
            text = f"{filename}: {f.exc.strerror or f.exc}"
        for a, n in ranges:
            last = self.result.failed[-1] if self.result.failed else None
            if last is not None and last.offset + last.length == a and last.error == text:
                self.result.failed[-1] = FailedRange(last.offset, last.length + n, text)
            else:
                self.result.failed.append(FailedRange(a, n, text))
        if f.side == "target" and isinstance(f.exc, OSError):
            self.result.stopped = f.exc
            self._stop = True
            self._wake.set()
            self._cond.notify_all()

    def _attempt(self, task: Task) -> None:
        read = task.read
        if self.rate is not None:
            delay = self.rate.reserve(read.cost)
            if delay > 0:
                self._wake.wait(delay)
        data = None
        try:
            data = read.fetch()
        except BaseException as exc:
            if retryable(exc):
                raise _Failure(exc, "source") from exc
            raise
        finally:
            with self._cond:
                self.result.reads += read.preads
                if data is not None:
                    self.result.read_bytes += len(data)
        writes, zeros = split_segments(data, task.segments, self.sparse)
        if self.target.zero_initialized:
            zeros = []
        with self._cond:
            cuts = list(task.cancelled)
            task.writing = True
        written = 0
        target = self.target
        try:
            with self._target_lock:
                if not cuts:               # the usual case: nothing discarded meanwhile
                    for off, at, n in writes:
                        target.write(off, data[at:at + n])
                        written += n
                    for off, m in zeros:
                        target.write_zeroes(off, m)
                else:
                    for off, at, n in writes:
                        for a, m in subtract(off, n, cuts):
                            target.write(a, data[at + a - off:at + a - off + m])
                            written += m
                    for off, m in zeros:
                        for a, k in subtract(off, m, cuts):
                            target.write_zeroes(a, k)
        except BaseException as exc:
            if retryable(exc):
                raise _Failure(exc, "target") from exc
            raise
        finally:
            with self._cond:
                task.writing = False
                self.result.written += written
                self._cond.notify_all()

    def _report(self) -> None:
        if self.progress is None:
            return
        with self._progress_lock:
            with self._cond:
                done, total = self.result.done, self.result.total
            self.progress(done, total)
