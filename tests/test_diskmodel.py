"""The rotating-disk model of DISK-MODEL.md (qcow2kit.diskmodel).

Default parameters, used by the hand-computed cases below:
  half rotation      = 60 s / 7200 / 2            = 4.1666667 ms
  overhead           = 0.1 ms
  first/positioning  = overhead + half rotation   = 4.2666667 ms  (+ seek when the head moves)
  rate               = 250 MB/s = 250_000 bytes per ms, so 250_000 bytes take 1 ms
  t_tt = 0.5 ms, avg = 8 ms, full = 16 ms: full - t_tt = 15.5, avg - t_tt = 7.5
  A = (8/3)*15.5 - 5*7.5     = 41.333333 - 37.5      = 3.8333333 ms (= 23/6)
  B = 5*7.5 - (5/3)*15.5     = 37.5 - 25.833333      = 11.666667 ms (= 35/3)
  capacity = 4e12 bytes
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcow2kit.diskmodel import (
    CostAccumulator,
    DiskModel,
    DiskModelError,
    merge_runs,
    parse_overrides,
)

M = DiskModel()
MS = 1e-3


def arr(*values):
    return np.array(values, dtype=np.int64)


def reference_costs(model: DiskModel, offsets, lengths, head=None):
    """A plain per-request loop over the rules of DISK-MODEL.md, to check the vectorized code."""
    rate = model.transfer_mb_s * 1e6
    fixed = model.overhead_ms * MS + 30.0 / model.rpm
    out = []
    for o, n in zip(map(int, offsets), map(int, lengths)):
        if head is None:
            pos = fixed
        elif o == head:
            pos = 0.0
        elif o > head:
            g = o - head
            pos = min(g / rate, fixed + model.seek_time(g))
        else:
            pos = fixed + model.seek_time(head - o)
        out.append(pos + n / rate)
        head = o + n
    return out


# ---------------------------------------------------------------------------
# Parameters and the seek curve
# ---------------------------------------------------------------------------


def test_derived_parameters():
    assert M.half_rotation_s == pytest.approx(4.1666666667 * MS, rel=1e-10)
    assert M.A == pytest.approx(23 / 6 * MS, rel=1e-12)
    assert M.B == pytest.approx(35 / 3 * MS, rel=1e-12)
    assert M.rate_bytes_s == 250e6


def test_seek_endpoints():
    # u = 0: t_tt + 0 + 0 (the formula; the cost rules only seek for d > 0)
    assert M.seek_time(0) == 0.5 * MS
    # u = 1: t_tt + A + B = 0.5 + 3.8333333 + 11.666667 = 16 ms, the full stroke
    assert M.seek_time(M.capacity_bytes) == 16.0 * MS
    # u = 0.25: 0.5 + 3.8333333*0.25 + 11.666667*0.5 = 0.5 + 0.9583333 + 5.8333333 = 7.2916667 ms
    assert M.seek_time(1_000_000_000_000) == pytest.approx(7.2916666667 * MS, rel=1e-10)
    # vectorized, increasing
    d = np.linspace(0, M.capacity_bytes, 1001)
    s = M.seek_time(d)
    assert isinstance(s, np.ndarray) and s.shape == d.shape
    assert np.all(np.diff(s) > 0)


def test_mean_seek_is_the_average_seek():
    # |X - Y| / capacity for X, Y uniform on [0, 1] has density 2(1 - u): integrate on a fine grid.
    u = np.linspace(0.0, 1.0, 2_000_001)
    f = M.seek_time(u * M.capacity_bytes) * 2.0 * (1.0 - u)
    mean = float(np.sum((f[1:] + f[:-1]) * 0.5 * np.diff(u)))
    assert abs(mean - 8.0 * MS) < 1e-3 * MS
    # the same by sampling start/end pairs (standard error ~ 0.004 ms)
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, M.capacity_bytes, (2, 1_000_000))
    assert float(M.seek_time(np.abs(a - b)).mean()) == pytest.approx(8.0 * MS, abs=0.02 * MS)


def test_mean_seek_for_other_parameters():
    m = DiskModel(track_to_track_ms=0.23, average_seek_ms=7.4, full_stroke_ms=15.0)
    u = np.linspace(0.0, 1.0, 2_000_001)
    f = m.seek_time(u * m.capacity_bytes) * 2.0 * (1.0 - u)
    mean = float(np.sum((f[1:] + f[:-1]) * 0.5 * np.diff(u)))
    assert abs(mean - 7.4 * MS) < 1e-3 * MS
    assert m.seek_time(m.capacity_bytes) == pytest.approx(15.0 * MS, rel=1e-12)


# ---------------------------------------------------------------------------
# Hand-computed request sequences
# ---------------------------------------------------------------------------


def test_single_request():
    # 1_000_000 bytes: overhead 0.1 + half rotation 4.1666667 + 1e6/250e6 s = 4 ms -> 8.2666667 ms
    assert M.cost(arr(0), arr(1_000_000)) == pytest.approx(8.2666666667 * MS, rel=1e-10)
    # the same anywhere on the disk: the first request never seeks
    assert M.cost(arr(3_000_000_000_000), arr(1_000_000)) == M.cost(arr(0), arr(1_000_000))


def test_two_sequential_requests():
    # [0, 500_000) then [500_000, 1_000_000): (4.2666667 + 2) + 2 = 8.2666667 ms,
    # the same as one 1 MB request.
    c = M.costs(arr(0, 500_000), arr(500_000, 500_000))
    assert c[0] == pytest.approx(6.2666666667 * MS, rel=1e-10)
    assert c[1] == pytest.approx(2.0 * MS, rel=1e-12)
    assert M.cost(arr(0, 500_000), arr(500_000, 500_000)) == pytest.approx(8.2666666667 * MS, rel=1e-10)


def test_small_forward_gap_reads_through():
    # [0, 250_000) then [500_000, 750_000): gap g = 250_000 bytes.
    #   read through: g / rate = 1 ms
    #   seek: u = 250_000 / 4e12 = 6.25e-8, sqrt(u) = 2.5e-4,
    #         seek = 0.5 + 3.8333333*6.25e-8 + 11.666667*2.5e-4 = 0.5029169 ms,
    #         overhead + seek + half rotation = 0.1 + 0.5029169 + 4.1666667 = 4.7695836 ms
    #   min -> 1 ms.  Total = (4.2666667 + 1) + (1 + 1) = 7.2666667 ms
    c = M.costs(arr(0, 500_000), arr(250_000, 250_000))
    assert c[1] == pytest.approx(2.0 * MS, rel=1e-12)
    assert M.cost(arr(0, 500_000), arr(250_000, 250_000)) == pytest.approx(7.2666666667 * MS, rel=1e-10)


def test_large_forward_gap_seeks():
    # [0, 250_000) then [1e12 + 250_000, +250_000): gap g = 1e12 bytes, u = 0.25.
    #   read through: 1e12 / 250e6 = 4000 s
    #   seek: 7.2916667 ms (see test_seek_endpoints); 0.1 + 7.2916667 + 4.1666667 = 11.5583333 ms
    #   Total = (4.2666667 + 1) + (11.5583333 + 1) = 17.825 ms
    offsets = arr(0, 1_000_000_000_000 + 250_000)
    lengths = arr(250_000, 250_000)
    assert M.costs(offsets, lengths)[1] == pytest.approx(12.5583333333 * MS, rel=1e-10)
    assert M.cost(offsets, lengths) == pytest.approx(17.825 * MS, rel=1e-10)


def test_forward_gap_threshold():
    # The two options cross where g / rate = 0.1 + seek(g) + 4.1666667 ms, near g = 1.19 MB:
    # 1_150_000 bytes read through in 4.6 ms (< 4.7726 ms of positioning),
    # 1_250_000 bytes would take 5 ms, positioning ~ 0.1 + 0.5065 + 4.1667 = 4.7732 ms.
    for g, expect_read in ((1_150_000, True), (1_250_000, False)):
        c = M.costs(arr(0, 1000 + g), arr(1000, 1000))[1] - 1000 / 250e6
        positioned = M.overhead_s + M.half_rotation_s + M.seek_time(g)
        assert c == pytest.approx(g / 250e6 if expect_read else positioned, rel=1e-12)


def test_backward_jump():
    # [1e12 - 250_000, 1e12) then [0, 250_000): head 1e12, d = 1e12, u = 0.25:
    #   (4.2666667 + 1) + (0.1 + 7.2916667 + 4.1666667 + 1) = 17.825 ms
    assert M.cost(arr(1_000_000_000_000 - 250_000, 0), arr(250_000, 250_000)) == pytest.approx(
        17.825 * MS, rel=1e-10)
    # re-reading the same 250_000 bytes is a backward jump of 250_000 bytes, never "read through":
    #   (4.2666667 + 1) + (4.7695836 + 1) = 11.0362503 ms
    assert M.cost(arr(0, 0), arr(250_000, 250_000)) == pytest.approx(
        (4.2666666667 + 1 + 0.1 + 0.5 + 23 / 6 * 6.25e-8 + 35 / 3 * 2.5e-4 + 4.1666666667 + 1) * MS,
        rel=1e-10)


def test_costs_match_the_rules_loop():
    rng = np.random.default_rng(3)
    offsets = rng.integers(0, 5_000_000, 500)
    offsets[100:200] = np.cumsum(np.full(100, 4096)) + 10_000  # some sequential stretches
    lengths = rng.integers(0, 200_000, 500)
    lengths[100:200] = 4096
    got = M.costs(offsets, lengths)
    ref = reference_costs(M, offsets, lengths)
    np.testing.assert_allclose(got, ref, rtol=1e-13, atol=0)
    got_head = M.costs(offsets, lengths, head=1234)
    np.testing.assert_allclose(got_head, reference_costs(M, offsets, lengths, head=1234), rtol=1e-13)


def test_sequential_bound():
    # 4 GiB / 250 MB/s = 4294967296 / 250e6 = 17.179869184 s
    assert M.sequential_bound(4 << 30) == pytest.approx(17.179869184, rel=1e-15)
    assert M.sequential_bound(0) == 0.0


def test_empty_and_input_checks():
    assert M.cost(arr(), arr()) == 0.0
    assert M.costs([], []).shape == (0,)
    # uint64 and Python lists are accepted
    assert M.cost(np.array([0, 4096], dtype=np.uint64), np.array([4096, 4096], dtype=np.uint64)) == \
        M.cost([0, 4096], [4096, 4096])
    with pytest.raises(DiskModelError, match="differ in length"):
        M.cost(arr(0, 1), arr(1))
    with pytest.raises(DiskModelError, match="negative offset"):
        M.cost(arr(-1), arr(1))
    with pytest.raises(DiskModelError, match="negative length"):
        M.cost(arr(0), arr(-1))
    with pytest.raises(DiskModelError, match="capacity"):
        M.cost(arr(M.capacity_bytes - 10), arr(11))
    with pytest.raises(DiskModelError, match="integer"):
        M.cost(np.array([0.0]), np.array([1.0]))
    with pytest.raises(DiskModelError, match="above 2"):
        M.cost(np.array([2**63], dtype=np.uint64), np.array([1], dtype=np.uint64))


def test_merge_runs():
    o, n = merge_runs(arr(0, 10, 20, 100, 50, 60), arr(10, 10, 5, 1, 10, 10))
    assert o.tolist() == [0, 100, 50] and n.tolist() == [25, 1, 20]
    o, n = merge_runs(arr(), arr())
    assert o.size == 0 and n.size == 0


# ---------------------------------------------------------------------------
# Parameters: overrides, parsing, JSON
# ---------------------------------------------------------------------------


def test_as_dict_and_json():
    d = M.as_dict()
    assert d == {"rpm": 7200, "track_to_track_ms": 0.5, "average_seek_ms": 8.0,
                 "full_stroke_ms": 16.0, "transfer_mb_s": 250.0, "overhead_ms": 0.1,
                 "capacity_bytes": 4_000_000_000_000}
    assert DiskModel(**json.loads(json.dumps(d))) == M


def test_parse_and_overrides():
    m = DiskModel.parse("rpm=5400,transfer_mb_s=150")
    assert m.rpm == 5400 and m.transfer_mb_s == 150.0 and m.overhead_ms == 0.1
    assert m.half_rotation_s == pytest.approx(30 / 5400)
    assert DiskModel.parse(" rpm = 5400 , ") == DiskModel(rpm=5400)
    assert DiskModel.parse("") == M and DiskModel.parse(None) == M
    assert DiskModel.parse("capacity_bytes=2e12").capacity_bytes == 2_000_000_000_000
    assert DiskModel.parse("capacity_bytes=1_000_000_000_000").capacity_bytes == 10**12
    assert parse_overrides("overhead_ms=0") == {"overhead_ms": 0}
    assert DiskModel.from_overrides(rpm="10000", overhead_ms=0.2) == DiskModel(rpm=10000, overhead_ms=0.2)


@pytest.mark.parametrize("spec, message", [
    ("rpms=5400", "unknown disk-model parameter 'rpms'; known: rpm,"),
    ("rpm", "not of the form name=value"),
    ("rpm=", "not of the form name=value"),
    ("=5", "not of the form name=value"),
    ("rpm=fast", "rpm: 'fast' is not a number"),
    ("rpm=5400,rpm=7200", "given twice"),
    ("rpm=0", "rpm must be positive"),
    ("rpm=-7200", "rpm must be positive"),
    ("rpm=nan", "rpm must be finite"),
    ("transfer_mb_s=inf", "transfer_mb_s must be finite"),
    ("overhead_ms=-1", "overhead_ms must not be negative"),
    ("capacity_bytes=1.5", "whole number of bytes"),
    ("average_seek_ms=20", "track_to_track_ms <= average_seek_ms <= full_stroke_ms"),
    ("average_seek_ms=2", "non-monotonic"),
    ("average_seek_ms=15", "non-monotonic"),
])
def test_parse_errors(spec, message):
    with pytest.raises(DiskModelError) as e:
        DiskModel.parse(spec)
    assert message in str(e.value)
    assert isinstance(e.value, ValueError)


def test_from_overrides_errors():
    with pytest.raises(DiskModelError, match="unknown disk-model parameters 'a', 'b'"):
        DiskModel.from_overrides(a=1, b=2)
    with pytest.raises(DiskModelError, match="must be a number"):
        DiskModel.from_overrides(rpm=None)
    with pytest.raises(DiskModelError, match="must be a number"):
        DiskModel(rpm=True)


# ---------------------------------------------------------------------------
# The reference figure of DISK-MODEL.md
# ---------------------------------------------------------------------------

CLUSTER = 64 << 10
NCLUSTERS = (4 << 30) // CLUSTER          # 65536
# Host offset of the first data cluster: header, L1, refcount table/blocks and the
# 8 L2 tables of a 4 GiB image take 14 clusters; we put the data at 2 MiB.  The costs
# only depend on differences of offsets, so the figures do not depend on this choice.
DATA_START = 2 << 20


def reader_requests(seed: int):
    """The requests a reader issues for a 4 GiB image whose clusters lie in random host order."""
    perm = np.random.default_rng(seed).permutation(NCLUSTERS)
    host = DATA_START + perm.astype(np.int64) * CLUSTER   # host offset of guest cluster i
    lengths = np.full(NCLUSTERS, CLUSTER, dtype=np.int64)
    guest = merge_runs(host, lengths)                     # guest order, runs merged
    hosted = merge_runs(np.sort(host), lengths)           # host order: one sequential run
    return guest, hosted


def expected_guest_order_seconds(model: DiskModel) -> float:
    """Expectation over random permutations of the guest-order cost.

    Consecutive guest clusters X, Y are a uniformly random ordered pair of distinct
    clusters; k = Y - X occurs for N - |k| of the N(N-1) pairs.  With the head at the
    end of X: k = 1 is sequential, k > 1 a forward gap of (k - 1) clusters, k < 0 a
    backward jump of (|k| + 1) clusters.
    """
    n = NCLUSTERS
    rate = model.rate_bytes_s
    fixed = model.overhead_s + model.half_rotation_s
    k = np.arange(1, n, dtype=np.int64)
    weight = (n - k).astype(np.float64)
    gap = (k - 1) * CLUSTER
    fwd = np.where(gap == 0, 0.0, np.minimum(gap / rate, fixed + model.seek_time(gap)))
    back = fixed + model.seek_time((k + 1) * CLUSTER)
    mean_positioning = float(np.sum(weight * (fwd + back))) / (n * (n - 1))
    return fixed + (n - 1) * mean_positioning + model.sequential_bound(n * CLUSTER)


def test_reference_figure():
    (go, gl), (ho, hl) = reader_requests(seed=2024)
    assert gl.sum() == hl.sum() == 4 << 30
    assert ho.size == 1                                   # host order merges into one run
    guest = M.cost(go, gl)
    host = M.cost(ho, hl)
    bound = M.sequential_bound(4 << 30)
    # Published: guest 343.0 s, host 17.19 s, bound 17.18 s, "about 20x".
    assert guest == pytest.approx(343.0, rel=0.01)
    assert host == pytest.approx(17.19, rel=0.01)
    assert bound == pytest.approx(17.18, rel=0.01)
    assert guest / host == pytest.approx(20.0, rel=0.01)
    # host order = one request: overhead + half rotation + 4 GiB / rate
    #            = 0.0001 + 0.0041667 + 17.179869 = 17.184136 s
    assert host == pytest.approx(0.0001 + 30 / 7200 + 17.179869184, rel=1e-12)
    # The guest figure varies with the permutation by ~0.03 s (per-request cost
    # ~5.23 ms, std ~0.1 ms, over 65535 requests): within 0.1% of its expectation.
    expected = expected_guest_order_seconds(M)
    assert expected == pytest.approx(343.0, rel=0.001)
    assert guest == pytest.approx(expected, rel=0.001)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_reference_figure_other_seeds(seed):
    (go, gl), _ = reader_requests(seed)
    assert M.cost(go, gl) == pytest.approx(343.0, rel=0.001)


def test_reference_merged_equals_unmerged():
    perm = np.random.default_rng(5).permutation(NCLUSTERS)
    host = DATA_START + perm.astype(np.int64) * CLUSTER
    lengths = np.full(NCLUSTERS, CLUSTER, dtype=np.int64)
    assert M.cost(*merge_runs(host, lengths)) == pytest.approx(M.cost(host, lengths), rel=1e-12)
    assert M.cost(*merge_runs(np.sort(host), lengths)) == pytest.approx(
        M.cost(np.sort(host), lengths), rel=1e-12)


def test_reference_streaming():
    (go, gl), _ = reader_requests(seed=2024)
    acc = CostAccumulator(M)
    for a in range(0, go.size, 4096):
        acc.add(go[a:a + 4096], gl[a:a + 4096])
    assert acc.seconds == M.cost(go, gl)
    assert acc.requests == go.size and acc.bytes == 4 << 30


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

# offsets/lengths over a range where both reading through and seeking happen
_offsets = st.one_of(st.integers(0, 4_000_000), st.integers(0, 3_000_000_000_000))
_lengths = st.one_of(st.integers(0, 300_000), st.integers(0, 50_000_000))
_requests = st.lists(st.tuples(_offsets, _lengths), max_size=60)


def _split(reqs):
    if not reqs:
        return arr(), arr()
    o, n = zip(*reqs)
    return np.array(o, dtype=np.int64), np.array(n, dtype=np.int64)


@given(_requests, st.lists(st.integers(0, 60), max_size=8))
@settings(max_examples=300, deadline=None)
def test_accumulator_equals_cost_over_any_split(reqs, cuts):
    o, n = _split(reqs)
    bounds = sorted({0, len(reqs), *(c for c in cuts if c <= len(reqs))})
    acc = CostAccumulator(M)
    acc.add(arr(), arr())  # an empty batch does not consume the first-request state
    for a, b in zip(bounds, bounds[1:]):
        acc.add(o[a:b], n[a:b])
    assert acc.seconds == M.cost(o, n)                    # exactly, not approximately
    assert acc.requests == len(reqs)
    assert acc.bytes == int(n.sum())
    assert acc.head == (None if not reqs else int(o[-1] + n[-1]))


@given(_requests)
@settings(max_examples=300, deadline=None)
def test_cost_properties(reqs):
    o, n = _split(reqs)
    total = M.cost(o, n)
    per = M.costs(o, n)
    # at least the transfer time, and exactly the first-request extra for a sequential read
    assert total >= M.sequential_bound(int(n.sum()))
    if reqs:
        assert total >= M.overhead_s + M.half_rotation_s
    assert total == pytest.approx(math.fsum(per.tolist()), rel=1e-15, abs=0)
    np.testing.assert_allclose(per, reference_costs(M, o, n), rtol=1e-13)
    # only differences of offsets matter
    shift = 123_456_789
    if not reqs or int((o + n).max()) + shift <= M.capacity_bytes:
        assert M.cost(o + shift, n) == total
    # merging contiguous requests changes nothing (up to rounding)
    assert M.cost(*merge_runs(o, n)) == pytest.approx(total, rel=1e-12, abs=1e-15)


def _disjoint(gaps, lengths):
    """Non-overlapping requests in increasing order from gap/length lists."""
    ends = np.cumsum(np.array(gaps, dtype=np.int64) + np.array(lengths, dtype=np.int64))
    lengths = np.array(lengths, dtype=np.int64)
    return ends - lengths, lengths


_gaps = st.one_of(st.just(0), st.integers(0, 3_000_000), st.integers(0, 100_000_000_000))
_sizes = st.integers(1, 2_000_000)


@given(st.lists(st.tuples(_gaps, _sizes), min_size=1, max_size=40), st.randoms(use_true_random=False))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_host_sorted_order_never_costs_more(parts, rnd):
    gaps, sizes = zip(*parts)
    o, n = _disjoint(gaps, sizes)
    order = list(range(len(o)))
    rnd.shuffle(order)
    sorted_cost = M.cost(o, n)
    assert sorted_cost <= M.cost(o[order], n[order]) * (1 + 1e-12)


@given(st.lists(st.tuples(_gaps, _sizes), min_size=1, max_size=5))
@settings(max_examples=150, deadline=None)
def test_host_sorted_order_is_optimal_small(parts):
    gaps, sizes = zip(*parts)
    o, n = _disjoint(gaps, sizes)
    sorted_cost = M.cost(o, n)
    best = min(M.cost(o[list(p)], n[list(p)]) for p in itertools.permutations(range(len(o))))
    assert sorted_cost <= best * (1 + 1e-12)


@given(st.sampled_from([5400, 7200, 10000, 15000]),
       st.floats(0.0, 1.0), st.floats(0.34, 0.73), st.floats(5.0, 20.0),
       st.floats(50.0, 300.0), st.floats(0.0, 0.5))
@settings(max_examples=100, deadline=None)
def test_other_models_keep_the_properties(rpm, t_tt, frac, full, rate, overhead):
    # average seek anywhere in the monotonic range t_tt + [1/3, 11/15] * (full - t_tt)
    m = DiskModel(rpm=rpm, track_to_track_ms=t_tt, average_seek_ms=t_tt + frac * (full - t_tt),
                  full_stroke_ms=full, transfer_mb_s=rate, overhead_ms=overhead)
    assert m.seek_time(m.capacity_bytes) == pytest.approx(full * MS, rel=1e-12)
    s = m.seek_time(np.linspace(0, m.capacity_bytes, 257))
    assert np.all(np.diff(s) >= -1e-18)
    rng = np.random.default_rng(int(rpm + rate))
    o = np.sort(rng.choice(10**9, 40, replace=False)).astype(np.int64) * 100
    n = np.full(40, 100, dtype=np.int64)
    perm = rng.permutation(40)
    assert m.cost(o, n) <= m.cost(o[perm], n[perm]) * (1 + 1e-12)
    assert m.cost(o, n) >= m.sequential_bound(int(n.sum()))
