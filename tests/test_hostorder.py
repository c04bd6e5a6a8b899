"""Host-order reading (``qcow2kit.hostorder``) and the commands built on it.

1. Every readable factory image, under the default budget and under 64 KiB budgets with both
   sort strategies: the pieces of ``read_host_order`` cover each guest byte qemu-img map calls
   stored data (data, not zero) exactly once, ``zero_ranges`` cover the rest exactly once, the
   bytes equal ``qemu-img convert``'s output, host offsets never go back inside a file and files
   come top layer first.
2. Small budgets on fragmented sample images (thousands of clusters, some compressed): many
   windows, same guarantees, for the "merge" and the "rescan" strategy; ``sorted_runs`` directly
   on the plan's runs and on random rows (hypothesis).
3. Memory: tracemalloc peaks of planning stay within the budget plus a constant.
4. ``coalesce`` against a plain-Python reference (hypothesis).
5. ``qcow2kit map --order=host`` against ``qemu-img map`` (JSON with and without --all, human).
6. ``qcow2kit convert`` in both orders byte-identical to ``qemu-img convert``; ``-p``.
7. ``qcow2kit bench order``: JSON shape, byte counts, model figures, --no-measure, --plot,
   --model.
8. Encrypted images are refused.

The strategy is chosen with ``HostOrderPlan(strategy=...)`` (read_host_order takes the plan).
No image here has a reverse map, so every plan comes from the L2 tables (``source == "l2"``).

Regressions of bugs these tests found are kept as ordinary tests.
"""

from __future__ import annotations

import filecmp
import json
import math
import os
import subprocess
import tracemalloc
from functools import reduce

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import factory  # tests/ is on sys.path (conftest.py)
from qemu import (QEMU_IMG, QEMU_IO, cli_in_process, have_qemu, merge_ranges, open_args,
                  qemu_convert_raw, qemu_img_map, run)
from qcow2kit import benchorder, hostorder, sort
from qcow2kit.benchorder import split_requests
from qcow2kit.convert import convert_to_raw
from qcow2kit.errors import UnsupportedFeatureError
from qcow2kit.hostorder import (REQUEST_DTYPE, RUN_DTYPE, HostOrderPlan, coalesce,
                                read_host_order, zero_ranges)
from qcow2kit.sort import BYTES_PER_RUN, PlanStats
from qcow2kit.image import Image
from qcow2kit.mapping import DEFAULT_MEMORY
from qcow2kit.sample import KIND_COMPRESSED, KIND_NORMAL, make_fragmented_image

KiB = 1 << 10
MiB = 1 << 20

qemu = pytest.mark.qemu

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HUMAN_REFUSAL = "File contains external, encrypted or compressed clusters."
BENCH_KEYS = {"guest", "host", "sequential_bound_seconds", "model", "cache", "files",
              "planning"}
ORDER_KEYS = {"requests", "bytes", "model_seconds", "measured_seconds"}

#: (name, read_host_order keywords, strategy): budgets small enough for several windows on the
#: larger factory images (the minimum the L2 scan accepts is 64 KiB), short requests.
#: No read_gap here: on ext4, reading through a gap that is an unwritten (fallocated) extent
#: makes SEEK_DATA report it as data from then on, which changes what qemu-img map (and
#: qcow2kit) say about metadata-preallocated images such as "bitmaps" for the rest of the
#: session.  read_gap is tested on the sample images, which have no unwritten extents.
VARIANTS = [
    ("default", {}, "merge"),
    ("merge-64K-maxreq-8K", {"memory": 64 * KiB, "max_request": 8 * KiB}, "merge"),
    ("rescan-64K-maxreq-12K", {"memory": 64 * KiB, "max_request": 12 * KiB}, "rescan"),
]


# =========================================================================== helpers


def _readable(factory_images) -> list[factory.ImageCase]:
    return [c for _, c in sorted(factory_images.items()) if not c.encrypted]


def _encrypted(factory_images) -> list[factory.ImageCase]:
    out = [c for _, c in sorted(factory_images.items()) if c.encrypted]
    assert out, "the factory has no encrypted case any more"
    return out


def _qemu(case: factory.ImageCase, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of qemu-img run in the image's directory."""
    p = case.path.absolute()
    proc = subprocess.run([QEMU_IMG, *args, *open_args(case)], cwd=p.parent,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def _coverage(ranges, lo: int, hi: int, unit: int) -> np.ndarray:
    """How many of ``ranges`` cover each ``unit``-sized block of [lo, hi)."""
    diff = np.zeros((hi - lo) // unit + 1, dtype=np.int64)
    if ranges:
        r = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
        np.add.at(diff, (r[:, 0] - lo) // unit, 1)
        np.add.at(diff, (r[:, 0] + r[:, 1] - lo) // unit, -1)
    return np.cumsum(diff[:-1])


def check_host_read(img: Image, expected, data_ranges, *, start: int = 0,
                    length: int | None = None, plan: HostOrderPlan | None = None,
                    **kw) -> list[str]:
    """Read ``img`` in host order and check it against the truth; returns the problems found.

    ``expected(guest, n)`` gives the true guest bytes, ``data_ranges`` the guest ranges that
    hold stored data (data and not zero).
    """
    problems: list[str] = []
    end = img.size if length is None else min(img.size, start + length)
    nfiles = len(img.chain())
    # Zero ranges before reading, as a converter takes them: on ext4 a read can turn an
    # unwritten extent of a metadata-preallocated image into "data" for SEEK_DATA (readahead
    # fills its page cache), which changes the block status of "bitmaps" and "extl2_2M".
    zeros = list(zero_ranges(img, start, length, memory=kw.get("memory", DEFAULT_MEMORY)))
    pieces: list[tuple[int, int]] = []
    last_file = -1
    last_host = -1
    for item in read_host_order(img, start, length, plan=plan, **kw):
        if not 0 <= item.file < nfiles:
            problems.append(f"file index {item.file} outside the chain of {nfiles}")
        if item.file < last_file:
            problems.append(f"file {item.file} after file {last_file}")
        elif item.file == last_file and item.host < last_host:
            problems.append(f"file {item.file}: host {item.host:#x} after {last_host:#x}")
        last_file, last_host = item.file, item.host
        for g, n, data in item.pieces:
            if n <= 0 or len(data) != n or not start <= g <= g + n <= end:
                problems.append(f"bad piece {g:#x}+{n:#x} (data {len(data)}) in "
                                f"[{start:#x}, {end:#x})")
                continue
            if bytes(data) != expected(g, n):
                problems.append(f"wrong bytes for guest {g:#x}+{n:#x} "
                                f"(file {item.file}, host {item.host:#x})")
            pieces.append((g, n))
    for g, n in zeros:
        if n <= 0 or not start <= g <= g + n <= end:
            problems.append(f"bad zero range {g:#x}+{n:#x}")
        elif expected(g, n) != bytes(n):
            problems.append(f"zero range {g:#x}+{n:#x} does not read as zeros")
    if problems:
        return problems
    data_ranges = [(s, n) for s, n in data_ranges if n]
    unit = reduce(math.gcd, [start, end] + [v for r in pieces + zeros + data_ranges for v in r])
    if end > start:
        cov_data = _coverage(pieces, start, end, unit)
        cov_zero = _coverage(zeros, start, end, unit)
        want = _coverage(data_ranges, start, end, unit)
        if (cov_data != want).any():
            i = int(np.flatnonzero(cov_data != want)[0])
            problems.append(f"guest {start + i * unit:#x}: read {int(cov_data[i])} times, "
                            f"qemu says data {int(want[i])}")
        if ((cov_data + cov_zero) != 1).any():
            i = int(np.flatnonzero((cov_data + cov_zero) != 1)[0])
            problems.append(f"guest {start + i * unit:#x}: covered {int(cov_data[i])}x by "
                            f"pieces, {int(cov_zero[i])}x by zero ranges")
    if merge_ranges(pieces) != merge_ranges(data_ranges):
        problems.append("merged piece ranges differ from the merged data extents")
    return problems


def _qemu_data_ranges(case: factory.ImageCase) -> list[tuple[int, int]]:
    return [(e["start"], e["length"]) for e in qemu_img_map(case)
            if e["data"] and not e["zero"]]


def _raw_reader(path):
    fd = os.open(path, os.O_RDONLY)

    def expected(g: int, n: int) -> bytes:
        b = os.pread(fd, n, g)
        assert len(b) == n
        return b

    return fd, expected


def _sample_data_ranges(info) -> list[tuple[int, int]]:
    cs = info.cluster_size
    idx = np.flatnonzero(info.kinds >= KIND_NORMAL)
    return [(c * cs, min(cs, info.virtual_size - c * cs)) for c in idx.tolist()]


def _key(rows: np.ndarray, file_field: str = "file", host_field: str = "host") -> np.ndarray:
    return rows[file_field].astype(np.uint64) << np.uint64(56) | rows[host_field]


# =========================================================================== fixtures


@pytest.fixture(scope="module")
def sample4k(tmp_path_factory):
    """48 MiB, 4 KiB clusters, 75 % filled in shuffled host order, a tenth compressed."""
    path = tmp_path_factory.mktemp("hostorder-sample4k") / "frag4k.qcow2"
    info = make_fragmented_image(path, virtual_size=48 * MiB, cluster_bits=12, fill=0.75,
                                 seed=11, compressed_fraction=0.1)
    assert info.compressed_clusters > 500 and info.allocated_clusters > 9000
    return path, info


@pytest.fixture(scope="module")
def sample64k(tmp_path_factory):
    """32 MiB, 64 KiB clusters, shuffled, a fifth compressed (for bench order)."""
    path = tmp_path_factory.mktemp("hostorder-sample64k") / "frag64k.qcow2"
    info = make_fragmented_image(path, virtual_size=32 * MiB, cluster_bits=16, fill=0.75,
                                 seed=5, compressed_fraction=0.2)
    return path, info


# =========================================================================== 1. factory images


@qemu
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_read_host_order_factory_images(variant, factory_images, qemu_raw):
    _, kw, strategy = variant
    failures = {}
    several_windows = []
    for case in _readable(factory_images):
        fd, expected = _raw_reader(qemu_raw(case))
        try:
            with Image.open(case.path) as img:
                plan = HostOrderPlan(img, strategy=strategy, **kw)
                assert plan.source == "l2"
                problems = check_host_read(img, expected, _qemu_data_ranges(case), plan=plan,
                                           **kw)
                if plan.stats.windows > 1:
                    several_windows.append(case.name)
        finally:
            os.close(fd)
        if problems:
            failures[case.name] = problems[:5]
    assert not failures
    if strategy == "rescan":
        # the small budget really cuts some plans into windows (the merge strategy keeps at
        # least 1024 runs in memory, more than any factory image has)
        assert several_windows


# =========================================================================== 2. small budgets


@pytest.mark.parametrize("read_gap", [0, 64 * KiB])
@pytest.mark.parametrize("strategy", ["merge", "rescan"])
def test_small_budget_many_windows(strategy, read_gap, sample4k):
    path, info = sample4k
    with Image.open(path) as img:
        plan = HostOrderPlan(img, memory=64 * KiB, read_gap=read_gap, strategy=strategy)
        problems = check_host_read(img, info.expected_guest_bytes, _sample_data_ranges(info),
                                   plan=plan, memory=64 * KiB)
        assert not problems, problems[:5]
        st_ = plan.stats
        assert st_.windows > 4
        assert st_.passes == (1 if strategy == "merge" else st_.windows + 1)
        assert st_.data_bytes == info.allocated_clusters * info.cluster_size
        assert st_.runs > 1024  # more than one spill chunk / the rescan cap


@pytest.mark.parametrize("strategy", ["merge", "rescan"])
def test_sorted_runs_on_plan_scan(strategy, sample4k):
    path, _ = sample4k
    with Image.open(path) as img:
        plan = HostOrderPlan(img, memory=64 * KiB)
        allrows = np.concatenate(list(plan._scan()))
        sizes = [layer.data_source.size for layer in plan.layers]
        stats = PlanStats()
        batches = list(sort.sorted_runs(plan._scan, sizes, memory=32 * KiB, stats=stats,
                                             strategy=strategy))
    assert stats.windows == len(batches) > 1
    assert stats.runs == allrows.shape[0]
    got = np.concatenate(batches)
    assert got.dtype == RUN_DTYPE
    assert (_key(got)[1:] >= _key(got)[:-1]).all()
    # the same rows, each once (guest offsets are unique)
    assert np.array_equal(np.sort(got, order=["guest"]), np.sort(allrows, order=["guest"]))


def test_bad_strategy(sample4k):
    with pytest.raises(ValueError, match="strategy"):
        list(sort.sorted_runs(lambda: iter(()), [0], memory=MiB, strategy="quick"))
    with Image.open(sample4k[0]) as img, pytest.raises(ValueError, match="strategy"):
        HostOrderPlan(img, strategy="quick")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 5000), nfiles=st.integers(1, 3),
       memory=st.sampled_from([16 * KiB, 128 * KiB, 1 * MiB]),
       strategy=st.sampled_from(["merge", "rescan"]), batch=st.integers(64, 900),
       dups=st.booleans())
def test_sorted_runs_property(seed, n, nfiles, memory, strategy, batch, dups):
    rng = np.random.default_rng(seed)
    sizes = [int(s) for s in rng.integers(1, 1 << 36, nfiles)]
    rows = np.zeros(n, dtype=RUN_DTYPE)
    rows["file"] = rng.integers(0, nfiles, n)
    span = np.array(sizes, dtype=np.uint64)[rows["file"]]
    if dups:  # few distinct offsets: many equal keys
        rows["host"] = rng.integers(0, 64, n).astype(np.uint64) * np.uint64(4096)
    else:     # some beyond the file's size (the histogram clamps them)
        rows["host"] = (rng.random(n) * 1.1 * span.astype(np.float64)).astype(np.uint64)
    rows["length"] = rows["rlen"] = rng.integers(1, 1 << 16, n)
    rows["guest"] = np.arange(n, dtype=np.uint64)  # identity of each row
    parts = [rows[a:a + batch] for a in range(0, n, batch)]

    stats = PlanStats()
    out = list(sort.sorted_runs(lambda: iter(parts), sizes, memory=memory, stats=stats,
                                     strategy=strategy))
    got = np.concatenate(out) if out else np.empty(0, RUN_DTYPE)
    k = _key(got)
    assert (k[1:] >= k[:-1]).all()
    assert np.array_equal(np.sort(got["guest"]), rows["guest"])
    assert np.array_equal(got[np.argsort(got["guest"])], rows)
    assert stats.runs == n and stats.data_bytes == int(rows["length"].sum())
    assert stats.windows == len(out)


def test_sub_range_with_compressed_clusters(sample4k):
    path, info = sample4k
    cs = info.cluster_size
    comp = np.flatnonzero(info.kinds == KIND_COMPRESSED)
    c = int(comp[len(comp) // 2])
    ranges = [
        (c * cs + 100, 7 * cs + 333),           # starts inside a compressed cluster
        (c * cs - 1000, 1000 + cs // 2),        # ends inside it
        (c * cs + 17, 5),                       # a few bytes of it
        (0, 3 * cs + 1),
        (info.virtual_size - 5 * cs - 7, 5 * cs + 7),
        (12345, 40 * cs),
    ]
    with Image.open(path) as img:
        for a, n in ranges:
            want = [(max(s, a), min(s + ln, a + n) - max(s, a))
                    for s, ln in _sample_data_ranges(info) if s < a + n and s + ln > a]
            for kw in ({}, {"memory": 64 * KiB, "max_request": 3000}):
                problems = check_host_read(img, info.expected_guest_bytes, want, start=a,
                                           length=n, **kw)
                assert not problems, (a, n, kw, problems[:5])


@pytest.fixture(scope="module")
def compressed_chain(tmp_path_factory):
    """A 512-byte-cluster top over a 64 KiB-cluster base of compressed clusters (packed two
    streams to a host cluster); top writes split each base cluster into fall-through pieces."""
    if not have_qemu():
        pytest.skip("needs qemu-img / qemu-io")
    d = tmp_path_factory.mktemp("compressed-chain")
    base, top = d / "base.qcow2", d / "top.qcow2"
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536",
                 base, "1M"])
    run([QEMU_IO, "-f", "qcow2", "-c", "write -c -P 1 0 64k",
                 "-c", "write -c -P 2 64k 64k", "-c", "write -c -P 5 192k 64k", base])
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512",
                 "-b", base, "-F", "qcow2", top])
    run([QEMU_IO, "-f", "qcow2", "-c", "write -P 3 10000 1000",
                 "-c", "write -P 4 100000 512", "-c", "write -P 6 200000 512", top])
    raw = qemu_convert_raw(top, d / "top.raw")
    data = [(e["start"], e["length"]) for e in qemu_img_map(top)
            if e["data"] and not e["zero"]]
    return top, raw, data


@qemu
def test_compressed_backing_pieces_bytes(compressed_chain):
    """The bytes and the coverage are right (the order is not: see the next test)."""
    top, raw, data = compressed_chain
    fd, expected = _raw_reader(raw)
    try:
        with Image.open(top) as img:
            problems = check_host_read(img, expected, data)
            for order in ("host", "guest"):
                dst = raw.with_name(f"top.{order}.raw")
                convert_to_raw(img, dst, order=order)
                assert filecmp.cmp(dst, raw, shallow=False), order
    finally:
        os.close(fd)
    assert all("after" in p for p in problems), problems


@qemu
def test_compressed_backing_pieces_in_host_order(compressed_chain):
    top, raw, data = compressed_chain
    fd, expected = _raw_reader(raw)
    try:
        with Image.open(top) as img:
            problems = check_host_read(img, expected, data)
    finally:
        os.close(fd)
    assert not problems


@qemu
def test_compressed_backing_cluster_read_once(compressed_chain):
    top, _, _ = compressed_chain
    with Image.open(top) as img:
        reads = [(item.file, item.host) for item in read_host_order(img)]
    assert len(reads) == len(set(reads)), sorted(reads)


# =========================================================================== 3. memory


def _warm_up(path) -> None:
    """One traced run first: numpy and the allocator set up caches once per process."""
    with Image.open(path) as img:
        tracemalloc.start()
        for _ in HostOrderPlan(img, memory=1 * MiB, length=4 * MiB).requests():
            pass
        tracemalloc.stop()


def _planning_peak(path, memory: int) -> tuple[int, int, int]:
    """(tracemalloc peak, requests, bytes) of iterating plan.requests() (image already open)."""
    with Image.open(path) as img:
        img.l1_table  # noqa: B018 - loaded before tracing, as any reader has it
        plan = HostOrderPlan(img, memory=memory)
        tracemalloc.start()
        try:
            nreq = nbytes = 0
            for reqs in plan.requests():
                nreq += reqs.shape[0]
                nbytes += int(reqs["length"].sum())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return peak, nreq, nbytes


#: Measured (Python 3.11, this numpy): planning the 104858-cluster image peaks at about
#: 0.9-1.1 MB with a 1 MiB budget (903,945 bytes with the current merge, 1,125,835 with the
#: one before) and at 12,649,113 bytes with the default 32 MiB budget (one in-memory sort of
#: all 104857 runs, ~120 bytes each).  Beyond the budget a plan holds one window's
#: REQUEST_DTYPE rows (31 bytes per request), the merge's per-chunk read blocks (26 chunks x
#: 256 rows here, more than its 4096-row share: see the merge-memory test below), the L2 scan's
#: Python objects and numpy temporaries; 256 KiB covers that.
PLAN_SLACK = 256 * KiB


def test_planning_memory_bound(tmp_path):
    path = tmp_path / "frag512.qcow2"
    info = make_fragmented_image(path, virtual_size=64 * MiB, cluster_bits=9, fill=0.8,
                                 seed=7, compressed_fraction=0.0)
    assert info.allocated_clusters >= 100_000
    _warm_up(path)
    small, nreq_small, bytes_small = _planning_peak(path, 1 * MiB)
    big, nreq_big, bytes_big = _planning_peak(path, DEFAULT_MEMORY)
    stored = info.allocated_clusters * info.cluster_size
    assert bytes_small == bytes_big == stored
    assert small <= 1 * MiB + PLAN_SLACK, small
    assert small * 5 < big, (small, big)


def _random_scan(n: int, batch: int = 1024, seed: int = 1):
    """A re-iterable scan of ``n`` random rows made batch by batch (never all held)."""
    def scan():
        rng = np.random.default_rng(seed)
        for a in range(0, n, batch):
            m = min(batch, n - a)
            b = np.zeros(m, RUN_DTYPE)
            b["host"] = rng.integers(0, 1 << 34, m).astype(np.uint64) & ~np.uint64(511)
            b["length"] = b["rlen"] = 512
            b["guest"] = np.arange(a, a + m, dtype=np.uint64) * np.uint64(512)
            yield b
    return scan


def _sort_peak(n: int, memory: int, strategy: str) -> int:
    tracemalloc.start()
    try:
        count = 0
        for rows in sort.sorted_runs(_random_scan(n), [1 << 34], memory=memory,
                                          strategy=strategy):
            count += rows.shape[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == n
    return peak


#: The merge keeps at least 1024 rows in memory (its cap's floor): the bound for a budget.
def _sort_bound(memory: int) -> int:
    return max(memory, 1024 * BYTES_PER_RUN) + PLAN_SLACK


def test_sorted_runs_rescan_memory_does_not_grow():
    _sort_peak(2000, 128 * KiB, "rescan")  # warm-up
    peak = _sort_peak(60_000, 128 * KiB, "rescan")
    assert peak <= _sort_bound(128 * KiB), peak


def test_sorted_runs_merge_memory_does_not_grow():
    _sort_peak(2000, 128 * KiB, "merge")  # warm-up
    peak = _sort_peak(60_000, 128 * KiB, "merge")
    assert peak <= _sort_bound(128 * KiB), peak


# =========================================================================== 4. coalesce


def _coalesce_reference(runs, max_request: int, read_gap: int) -> list[tuple]:
    """Requests for sorted runs, one run at a time: (file, host, length, first, nruns, comp)."""
    reqs: list[list[int]] = []
    for i, (f, h, rlen, c) in enumerate(runs):
        if reqs:
            cur = reqs[-1]
            gap = h - (cur[1] + cur[2])
            if (f == cur[0] and not c and not cur[5] and 0 <= gap <= read_gap
                    and h + rlen - cur[1] <= max_request):
                cur[2] = h + rlen - cur[1]
                cur[4] += 1
                continue
        reqs.append([f, h, rlen, i, 1, int(c)])
    return [tuple(r) for r in reqs]


@st.composite
def _sorted_runs_st(draw):
    n = draw(st.integers(0, 40))
    runs = []
    f = 0
    pos = 0
    for _ in range(n):
        if draw(st.integers(0, 9)) == 0:
            f += 1
            pos = draw(st.integers(0, 4)) * 512
        gap = draw(st.sampled_from([0, 0, 0, 0, 1, 512, 4096, 65536]))
        rlen = draw(st.sampled_from([1, 512, 4096, 65536, 1 << 20, 3 << 20])
                    | st.integers(1, 1 << 21))
        comp = draw(st.integers(0, 5)) == 0
        h = pos + gap
        runs.append((f, h, rlen, comp))
        pos = h + rlen
    return runs


@settings(max_examples=200, deadline=None)
@given(runs=_sorted_runs_st(),
       max_request=st.sampled_from([1, 4096, 65536, 1 << 20, 4 << 20]) | st.integers(1, 1 << 22),
       read_gap=st.sampled_from([0, 0, 1, 512, 4096, 1 << 20]))
def test_coalesce_matches_reference(runs, max_request, read_gap):
    arr = np.zeros(len(runs), dtype=RUN_DTYPE)
    if runs:
        f, h, rlen, c = zip(*runs)
        arr["file"] = f
        arr["host"] = h
        arr["rlen"] = rlen
        arr["length"] = rlen
        arr["compressed"] = c
        arr["guest"] = np.arange(len(runs)) * (1 << 22)
    got = coalesce(arr, max_request=max_request, read_gap=read_gap)
    assert got.dtype == REQUEST_DTYPE
    assert [tuple(int(v) for v in r) for r in got.tolist()] == \
        _coalesce_reference(runs, max_request, read_gap)
    # requests tile the runs in order
    assert int(got["nruns"].sum()) == len(runs)
    if len(got):
        assert got["first_run"][0] == 0
        assert (got["first_run"][1:] == got["first_run"][:-1] + got["nruns"][:-1]).all()
    # pread pieces of a request never exceed max_request and add up to the request
    _, _, lengths = split_requests(got, max_request)
    assert (lengths <= max_request).all()
    assert int(lengths.sum()) == int(got["length"].sum())


# =========================================================================== 5. map --order=host


def _json_lines(text: str) -> list[str]:
    """The entries of map JSON, one string each, without the list brackets and commas."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            line = line[1:]
        if line.endswith(",") or line.endswith("]"):
            line = line[:-1]
        if line:
            out.append(line)
    return out


def _has_offset_and_data(entry: dict) -> bool:
    return "offset" in entry and entry["data"]


def _check_order(entries: list[dict], problems: list[str], what: str) -> None:
    """Located data extents first in (depth, offset) order, then the others in guest order."""
    located = [_has_offset_and_data(e) for e in entries]
    if located != sorted(located, reverse=True):
        problems.append(f"{what}: located data extents do not come first")
    keys = [(e["depth"], e["offset"]) for e in entries if _has_offset_and_data(e)]
    if keys != sorted(keys):
        problems.append(f"{what}: not in (depth, offset) order")
    rest = [e["start"] for e in entries if not _has_offset_and_data(e)]
    if rest != sorted(rest):
        problems.append(f"{what}: the other extents are not in guest order")


@qemu
def test_map_host_order_json(factory_images, capsys):
    """Without --all: qemu-img's data lines, those with an offset first in (depth, offset)
    order, then (as map_host_order documents) data without an offset (compressed)."""
    failures = {}
    checked_compressed = False
    for case in _readable(factory_images):
        rc, qout, qerr = _qemu(case, "map", "--output=json")
        assert rc == 0, qerr
        qlines = _json_lines(qout)
        qentries = [json.loads(line) for line in qlines]
        want_located = sorted(q for q, e in zip(qlines, qentries) if _has_offset_and_data(e))
        want_data = sorted(q for q, e in zip(qlines, qentries) if e["data"])
        if not want_data:
            continue  # see test_map_host_order_json_without_data
        path = str(case.path.absolute())
        rc, out, err = cli_in_process(capsys, "map", "--order=host", "--output=json", path)
        lines = _json_lines(out)
        entries = [json.loads(line) for line in lines]
        problems = []
        if rc != 0 or err:
            problems.append(f"rc {rc}: {err}")
        if sorted(q for q, e in zip(lines, entries) if _has_offset_and_data(e)) != want_located:
            problems.append("located lines differ from qemu-img's data lines with an offset")
        if sorted(lines) != want_data:
            problems.append("lines differ from qemu-img's data lines")
        checked_compressed |= want_data != want_located
        _check_order(entries, problems, "data")
        with Image.open(case.path) as img:  # both strategies give the same listing
            merge, rescan = ([r for b in hostorder.map_host_order(
                img, memory=64 * KiB, include_all=True, strategy=strategy) for r in b.tolist()]
                for strategy in ("merge", "rescan"))
            if merge != rescan:
                problems.append("map_host_order: merge and rescan differ")
        rc, out, err = cli_in_process(capsys, "map", "--order=host", "--all", "--output=json", path)
        lines = _json_lines(out)
        if rc != 0 or sorted(lines) != sorted(qlines):
            problems.append(f"--all: rc {rc}, lines differ from qemu-img's")
        _check_order([json.loads(line) for line in lines], problems, "--all")
        if problems:
            failures[case.name] = problems
    assert not failures
    assert checked_compressed


@qemu
def test_map_host_order_json_without_data(factory_images, capsys):
    case = factory_images["empty"]
    rc, out, err = cli_in_process(capsys, "map", "--order=host", "--output=json",
                        str(case.path.absolute()))
    assert rc == 0 and not err
    assert _json_lines(out) == []


def _human_rows(text: str) -> list[tuple[int, int, int, str]]:
    rows = []
    for line in text.splitlines()[1:]:
        start, length, mapped, name = line.split(None, 3)
        rows.append((int(start, 16), int(length, 16), int(mapped, 16), name))
    return rows


@qemu
def test_map_host_order_human(factory_images, capsys):
    failures = {}
    checked_refusal = False
    for case in _readable(factory_images):
        qrc, qout, qerr = _qemu(case, "map")
        _, qjson, _ = _qemu(case, "map", "--output=json")
        want = sorted((e["start"], e["length"], e["offset"]) for e in json.loads(qjson)
                      if _has_offset_and_data(e) and not e["zero"])
        rc, out, err = cli_in_process(capsys, "map", "--order=host", str(case.path.absolute()))
        problems = []
        if qrc != 0:
            # qemu-img refuses compressed data; so does the host-order listing, and
            # (unlike qemu-img, which prints the lines before it) it prints nothing
            checked_refusal = True
            if rc != 1 or err != f"qcow2kit: {HUMAN_REFUSAL}\n" or HUMAN_REFUSAL not in qerr:
                problems.append(f"rc {rc}, stderr {err!r}; qemu-img said {qerr!r}")
            if out:
                problems.append("stdout is not empty after a refusal")
            if problems:
                failures[case.name] = problems
            continue
        if not out.startswith("Offset          Length          Mapped to       File\n"):
            problems.append("no header")
        rows = _human_rows(out)
        if sorted(r[:3] for r in rows) != want:
            problems.append("printed extents differ from qemu-img's data extents")
        if rc != 0 or err or sorted(out.splitlines()) != sorted(qout.splitlines()):
            problems.append(f"rc {rc}: lines differ from qemu-img's")
        names: list[str] = []
        last = -1
        for _, _, mapped, name in rows:
            if not names or names[-1] != name:
                if name in names:
                    problems.append(f"{name} comes back after another file")
                names.append(name)
                last = -1
            if mapped < last:
                problems.append("mapped offsets go back")
            last = mapped
        if problems:
            failures[case.name] = problems
    assert not failures
    assert checked_refusal


# =========================================================================== 6. convert


@qemu
def test_convert_both_orders_equal_qemu(factory_images, qemu_raw, tmp_path, capsys):
    failures = {}
    for case in _readable(factory_images):
        ref = qemu_raw(case)
        for order in ("host", "guest"):
            dst = tmp_path / f"{case.name}.{order}.raw"
            rc, out, err = cli_in_process(capsys, "convert", "-O", "raw", f"--order={order}",
                                str(case.path), str(dst))
            if rc != 0 or out or err:
                failures[(case.name, order)] = (rc, out, err)
            elif not filecmp.cmp(dst, ref, shallow=False):
                failures[(case.name, order)] = "differs from qemu-img convert"
            dst.unlink(missing_ok=True)
    assert not failures


@qemu
def test_convert_progress(factory_images, qemu_raw, tmp_path, capsys):
    case = factory_images["chain3"]
    for order in ("host", "guest"):
        dst = tmp_path / f"p-{order}.raw"
        rc, out, err = cli_in_process(capsys, "convert", "-p", "-O", "raw", f"--order={order}",
                            "--memory=64K", str(case.path), str(dst))
        assert rc == 0 and out == ""
        assert err.strip(), "no progress on stderr"
        assert filecmp.cmp(dst, qemu_raw(case), shallow=False)


def test_convert_progress_adds_up(sample4k, tmp_path):
    path, info = sample4k
    for order in ("host", "guest"):
        done: list[int] = []
        totals: list[int] = []
        dst = tmp_path / f"{order}.raw"
        with Image.open(path) as img:
            convert_to_raw(img, dst, progress=done.append, on_total=totals.append, order=order,
                           memory=64 * KiB)
        # Progress counts the data read and written, not the ranges skipped as zeros:
        # normal and compressed clusters (the sample's sizes are whole clusters).
        data = int(np.isin(info.kinds, (KIND_NORMAL, KIND_COMPRESSED)).sum()) * info.cluster_size
        assert totals == [data] and sum(done) == data < info.virtual_size
        with open(dst, "rb") as fh:
            for a in range(0, info.virtual_size, 8 * MiB):
                assert fh.read(8 * MiB) == info.expected_guest_bytes(
                    a, min(8 * MiB, info.virtual_size - a))
    with Image.open(path) as img, pytest.raises(ValueError, match="order"):
        convert_to_raw(img, tmp_path / "x.raw", order="random")


# =========================================================================== 7. bench order


def _bench(capsys, path, *args: str) -> dict:
    rc, out, err = cli_in_process(capsys, "bench", "order", "--output=json", *args, str(path))
    assert rc == 0, err
    return json.loads(out)


def _no_drop_caches(monkeypatch) -> None:
    """Keep bench order from dropping the page cache of the whole machine when run as root
    (it would also flip SEEK_DATA of unwritten extents back to holes and so change what
    qemu-img map says about other tests' images); it falls back to posix_fadvise."""
    real_open = open

    def guarded_open(file, *args, **kwargs):
        if os.fspath(file) == "/proc/sys/vm/drop_caches":
            raise PermissionError(13, "not in tests", file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(benchorder, "open", guarded_open, raising=False)


def test_bench_order_json(sample64k, capsys, monkeypatch):
    path, info = sample64k
    _no_drop_caches(monkeypatch)
    r = _bench(capsys, path)
    assert set(r) == BENCH_KEYS
    for order in ("guest", "host"):
        assert set(r[order]) == ORDER_KEYS
        assert isinstance(r[order]["measured_seconds"], float)
        assert r[order]["measured_seconds"] >= 0
        assert r[order]["requests"] > 0
    assert r["guest"]["bytes"] == r["host"]["bytes"]
    assert r["host"]["model_seconds"] <= r["guest"]["model_seconds"]
    assert r["host"]["requests"] < r["guest"]["requests"]
    assert r["cache"] in ("fadvise", "warm")
    assert r["files"] == [str(path)]
    assert {"passes", "windows"} <= set(r["planning"])
    assert r["planning"].get("source", "l2") == "l2"
    assert r["sequential_bound_seconds"] == pytest.approx(
        r["host"]["bytes"] / (r["model"]["transfer_mb_s"] * 1e6))

    r2 = _bench(capsys, path, "--no-measure")
    for order in ("guest", "host"):
        assert r2[order]["measured_seconds"] is None
        assert {k: v for k, v in r2[order].items() if k != "measured_seconds"} == \
            {k: v for k, v in r[order].items() if k != "measured_seconds"}

    r3 = _bench(capsys, path, "--no-measure", "--model", "rpm=5400")
    assert r3["model"]["rpm"] == 5400
    assert {k: v for k, v in r3["model"].items() if k != "rpm"} == \
        {k: v for k, v in r2["model"].items() if k != "rpm"}
    for order in ("guest", "host"):
        assert r3[order]["model_seconds"] > r2[order]["model_seconds"]
        assert r3[order]["bytes"] == r2[order]["bytes"]

    rc, out, err = cli_in_process(capsys, "bench", "order", "--no-measure", str(path))
    assert rc == 0 and "sequential bound" in out and "host" in out


def test_bench_order_sequential_bound(tmp_path, capsys):
    path = tmp_path / "full.qcow2"
    info = make_fragmented_image(path, virtual_size=128 * MiB, cluster_bits=16, fill=1.0,
                                 seed=3, compressed_fraction=0.0)
    r = _bench(capsys, path, "--no-measure")
    stored = info.allocated_clusters * info.cluster_size
    assert r["host"]["bytes"] == r["guest"]["bytes"] == stored
    bound = r["sequential_bound_seconds"]
    assert bound <= r["host"]["model_seconds"] <= 1.01 * bound
    assert r["guest"]["model_seconds"] > 5 * r["host"]["model_seconds"]


@qemu
def test_bench_order_bytes_on_a_chain(factory_images, capsys):
    case = factory_images["chain3"]
    stored = sum(n for _, n in _qemu_data_ranges(case))
    for memory in ("32M", "64K"):
        r = _bench(capsys, case.path.absolute(), "--no-measure", f"--memory={memory}")
        assert r["host"]["bytes"] == r["guest"]["bytes"] == stored
        assert len(r["files"]) == 3
        assert r["host"]["model_seconds"] <= r["guest"]["model_seconds"]


def test_bench_order_plot(sample64k, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, _ = sample64k
    png = tmp_path / "order.png"
    r = _bench(capsys, path, "--no-measure", f"--plot={png}")
    assert "_samples" not in r and set(r) == BENCH_KEYS
    assert png.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("model", ["rpm=fast", "bogus=1", "rpm", "rpm=5400,rpm=7200"])
def test_bench_order_bad_model(model, sample64k, capsys):
    path, _ = sample64k
    rc, out, err = cli_in_process(capsys, "bench", "order", "--no-measure", "--model", model, str(path))
    assert rc == 1 and out == ""
    assert err.startswith("qcow2kit: ") and err.count("\n") == 1 and err.endswith("\n")


# =========================================================================== 8. encrypted


@qemu
def test_encrypted_refused(factory_images, tmp_path, capsys):
    for case in _encrypted(factory_images):
        with Image.open(case.path) as img:
            with pytest.raises(UnsupportedFeatureError):
                next(read_host_order(img))
            dst = tmp_path / f"{case.name}.raw"
            for order in ("host", "guest"):
                with pytest.raises(UnsupportedFeatureError):
                    convert_to_raw(img, dst, order=order)
            assert not dst.exists()
        for argv in (["convert", "-O", "raw", str(case.path), str(dst)],
                     ["convert", "-O", "raw", "--order=guest", str(case.path), str(dst)],
                     ["bench", "order", "--no-measure", str(case.path)]):
            rc, out, err = cli_in_process(capsys, *argv)
            assert rc == 1 and out == ""
            assert err.startswith("qcow2kit: ") and err.count("\n") == 1
            assert "encrypted" in err
