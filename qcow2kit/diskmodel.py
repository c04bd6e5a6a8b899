"""A deterministic model of a rotating disk, for costing a sequence of read requests.

The machine the read-order benchmark runs on has no rotating disk (and its
virtual disk hides seek costs), so ``qcow2kit bench order`` also reports what
a model of a 7200 rpm drive would need for the exact requests qcow2kit issues.
The model is specified in ``DISK-MODEL.md``; in short:

* The image file lies contiguously on the disk: file offset = disk position.
* Seek time for a head movement of ``d`` bytes, ``u = d / capacity``::

      seek(u) = t_tt + A*u + B*sqrt(u)
      A = (8/3)*(full - t_tt) - 5*(avg - t_tt)
      B = 5*(avg - t_tt) - (5/3)*(full - t_tt)

  (Ruemmler and Wilkes' square-root-then-linear shape, fitted so that
  ``seek(1)`` is the full-stroke time and the mean over uniformly random
  start/end pairs, where ``u`` has density ``2(1-u)``, is the average seek).
* Cost of a read of ``n`` bytes at offset ``o`` with the head at ``h`` (the
  end of the previous request), ``r`` the transfer rate::

      first request     overhead + half_rotation + n/r
      o == h            n/r
      o >  h (gap g)    min(g/r, overhead + seek(g) + half_rotation) + n/r
      o <  h            overhead + seek(h - o) + half_rotation + n/r

Everything is vectorized over numpy arrays of requests.  Totals are *exact*
sums of the per-request float costs, rounded once (see :func:`_exact_scaled_sum`),
so a total does not depend on the summation order nor on how a sequence is cut
into batches: :meth:`DiskModel.cost` equals a :class:`CostAccumulator` fed the
same requests in any batches, bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DiskModel",
    "DiskModelError",
    "CostAccumulator",
    "parse_overrides",
    "merge_runs",
]


class DiskModelError(ValueError):
    """A bad disk-model parameter, override string, or request sequence."""


# ---------------------------------------------------------------------------
# Exact summation of float64 arrays
# ---------------------------------------------------------------------------

# x = m * 2**e with 0.5 <= |m| < 1 (np.frexp); m * 2**53 is an integer and
# e >= -1073 for every finite double (the smallest subnormal is 0.5 * 2**-1073),
# so x * 2**_SCALE = (m * 2**53) * 2**(e + 1073) is an integer for every double.
_SCALE = 1126
_LO_BITS = 26
_LO_MASK = (1 << _LO_BITS) - 1
_CHUNK = 1 << 25


def _exact_scaled_sum(x: np.ndarray) -> int:
    """The exact sum of the float64 values ``x``, times ``2**_SCALE``, as a Python int.

    Vectorized: each value is split by ``np.frexp`` into a 53-bit integer
    mantissa and a binary exponent; the mantissas are cut into a high part
    (< 2**27 in magnitude) and a low part (< 2**26) and summed per exponent with
    ``np.bincount`` over chunks of at most 2**25 values, so every float64 partial
    sum is an integer below 2**52 and therefore exact.  The few per-exponent
    sums are then combined exactly in Python integers.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        return 0
    if not np.all(np.isfinite(x)):
        raise DiskModelError("cannot sum non-finite costs")
    mant, expo = np.frexp(x)
    mi = (mant * float(1 << 53)).astype(np.int64)  # exact: 53-bit mantissas
    hi = mi >> _LO_BITS                             # floor shift: mi = hi*2**26 + lo
    lo = mi & _LO_MASK
    emin = int(expo.min())
    idx = (expo - emin).astype(np.intp)
    nbins = int(idx.max()) + 1
    hi_tot = [0] * nbins
    lo_tot = [0] * nbins
    for a in range(0, x.size, _CHUNK):
        i = idx[a:a + _CHUNK]
        hs = np.bincount(i, weights=hi[a:a + _CHUNK], minlength=nbins).astype(np.int64)
        ls = np.bincount(i, weights=lo[a:a + _CHUNK], minlength=nbins).astype(np.int64)
        for b in np.flatnonzero(hs | ls).tolist():
            hi_tot[b] += int(hs[b])
            lo_tot[b] += int(ls[b])
    total = 0
    for b in range(nbins):
        if hi_tot[b] or lo_tot[b]:
            total += ((hi_tot[b] << _LO_BITS) + lo_tot[b]) << (b + emin + 1073)
    return total


def _scaled_to_float(total: int) -> float:
    """Correctly rounded ``total / 2**_SCALE`` (Python's int true division rounds once)."""
    return total / (1 << _SCALE)


# ---------------------------------------------------------------------------
# Request arrays
# ---------------------------------------------------------------------------

_INT64_MAX = np.iinfo(np.int64).max


def _as_int64(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise DiskModelError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind == "u":
        if int(arr.max()) > _INT64_MAX:
            raise DiskModelError(f"{name} has a value above 2**63 - 1")
        return arr.astype(np.int64)
    if arr.dtype.kind == "i":
        return arr.astype(np.int64, copy=False)
    raise DiskModelError(f"{name} must be an integer array, got dtype {arr.dtype}")


def _requests(offsets: Any, lengths: Any, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    o = _as_int64("offsets", offsets)
    n = _as_int64("lengths", lengths)
    if o.shape != n.shape:
        raise DiskModelError(
            f"offsets and lengths differ in length ({o.size} vs {n.size})")
    if o.size:
        if int(o.min()) < 0:
            raise DiskModelError(f"negative offset {int(o.min())}")
        if int(n.min()) < 0:
            raise DiskModelError(f"negative length {int(n.min())}")
        # Both are <= capacity (< 2**62 in any sane model) before they are added.
        if int(o.max()) > capacity or int(n.max()) > capacity or int((o + n).max()) > capacity:
            i = int(np.argmax((o > capacity) | (n > capacity) | (o + n > capacity)))
            raise DiskModelError(
                f"request {i} (offset {int(o[i])}, length {int(n[i])}) ends past the "
                f"modelled disk capacity of {capacity} bytes")
    return o, n


def merge_runs(offsets: Any, lengths: Any) -> tuple[np.ndarray, np.ndarray]:
    """Merge consecutive requests where one starts exactly where the previous ended.

    This is what a reader issues: one request per run of host-contiguous
    clusters.  The model costs a merged run the same as its pieces (a
    sequential request costs only its transfer), up to float rounding.
    """
    o = _as_int64("offsets", offsets)
    n = _as_int64("lengths", lengths)
    if o.shape != n.shape:
        raise DiskModelError(
            f"offsets and lengths differ in length ({o.size} vs {n.size})")
    if o.size == 0:
        return o.copy(), n.copy()
    end = o + n
    starts = np.concatenate(([0], np.flatnonzero(o[1:] != end[:-1]) + 1))
    lasts = np.concatenate((starts[1:] - 1, [o.size - 1]))
    return o[starts].copy(), end[lasts] - o[starts]


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------

_INT_FIELDS = frozenset({"capacity_bytes"})


@dataclass(frozen=True)
class DiskModel:
    """Parameters of the modelled drive (times in milliseconds, rate in decimal MB/s)."""

    rpm: float = 7200
    track_to_track_ms: float = 0.5
    average_seek_ms: float = 8.0
    full_stroke_ms: float = 16.0
    transfer_mb_s: float = 250.0
    overhead_ms: float = 0.1
    capacity_bytes: int = 4_000_000_000_000

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise DiskModelError(f"{f.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise DiskModelError(f"{f.name} must be finite, got {value!r}")
            # Store plain Python numbers (JSON-friendly, hashable the same way).
            is_int = f.name in _INT_FIELDS or isinstance(value, (int, np.integer))
            plain = int(value) if is_int else float(value)
            if f.name in _INT_FIELDS and plain != value:
                raise DiskModelError(f"{f.name} must be a whole number of bytes, got {value!r}")
            object.__setattr__(self, f.name, plain)
        for name in ("rpm", "transfer_mb_s", "capacity_bytes"):
            if getattr(self, name) <= 0:
                raise DiskModelError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("track_to_track_ms", "overhead_ms"):
            if getattr(self, name) < 0:
                raise DiskModelError(f"{name} must not be negative, got {getattr(self, name)!r}")
        t, avg, full = self.track_to_track_ms, self.average_seek_ms, self.full_stroke_ms
        if not t <= avg <= full:
            raise DiskModelError(
                "seek times must satisfy track_to_track_ms <= average_seek_ms <= full_stroke_ms, "
                f"got {t!r}, {avg!r}, {full!r}")
        # seek'(u) = A + B/(2 sqrt u) >= 0 on (0, 1] iff B >= 0 and A + B/2 >= 0, i.e.
        # (full - t)/3 <= avg - t <= (11/15)(full - t).
        span, rel = full - t, avg - t
        slack = 1e-12 * max(1.0, full)
        if not (3 * rel >= span - slack and 15 * rel <= 11 * span + slack):
            raise DiskModelError(
                f"average_seek_ms={avg!r} makes the seek curve non-monotonic: with "
                f"track_to_track_ms={t!r} and full_stroke_ms={full!r} it must lie in "
                f"[{t + span / 3:.6g}, {t + 11 * span / 15:.6g}] ms")

    # -- derived quantities (seconds, bytes per second) --------------------

    @property
    def half_rotation_s(self) -> float:
        """Mean rotational latency: half a revolution, in seconds (60 / rpm / 2)."""
        return 30.0 / self.rpm

    @property
    def track_to_track_s(self) -> float:
        return self.track_to_track_ms / 1000.0

    @property
    def overhead_s(self) -> float:
        return self.overhead_ms / 1000.0

    @property
    def rate_bytes_s(self) -> float:
        """Sustained transfer rate in bytes per second (decimal MB)."""
        return self.transfer_mb_s * 1e6

    @property
    def A(self) -> float:  # noqa: N802 (the spec's name)
        """Linear seek coefficient, seconds: (8/3)(full - t_tt) - 5(avg - t_tt)."""
        span = (self.full_stroke_ms - self.track_to_track_ms) / 1000.0
        rel = (self.average_seek_ms - self.track_to_track_ms) / 1000.0
        return (8.0 / 3.0) * span - 5.0 * rel

    @property
    def B(self) -> float:  # noqa: N802 (the spec's name)
        """Square-root seek coefficient, seconds: 5(avg - t_tt) - (5/3)(full - t_tt)."""
        span = (self.full_stroke_ms - self.track_to_track_ms) / 1000.0
        rel = (self.average_seek_ms - self.track_to_track_ms) / 1000.0
        return 5.0 * rel - (5.0 / 3.0) * span

    # -- the model -----------------------------------------------------------

    def seek_time(self, distance_bytes: Any) -> Any:
        """Seek seconds for head movements of ``distance_bytes`` (scalar or array).

        The formula itself; gives ``t_tt`` at distance 0, but the cost rules
        only apply a seek to a non-zero movement.
        """
        d = np.asarray(distance_bytes, dtype=np.float64)
        if np.any(d < 0):
            raise DiskModelError("seek distances must not be negative")
        u = d / float(self.capacity_bytes)
        s = self.track_to_track_s + self.A * u + self.B * np.sqrt(u)
        return float(s) if s.ndim == 0 else s

    def costs(self, offsets: Any, lengths: Any, *, head: int | None = None) -> np.ndarray:
        """Per-request seconds for a request sequence (numpy arrays, vectorized).

        ``head`` is the head position before the first request (the end of an
        earlier request); ``None`` means the first request pays the
        first-request cost.
        """
        o, n = _requests(offsets, lengths, self.capacity_bytes)
        if o.size == 0:
            return np.zeros(0, dtype=np.float64)
        rate = self.rate_bytes_s
        h = np.empty_like(o)
        h[1:] = o[:-1] + n[:-1]
        h[0] = o[0] if head is None else int(head)  # placeholder when first
        g = o - h                                    # exact int64
        dist = np.abs(g)
        fixed = self.overhead_s + self.half_rotation_s
        positioned = fixed + self.seek_time(dist)    # used only where g != 0
        positioning = np.where(
            g > 0, np.minimum(g / rate, positioned),
            np.where(g < 0, positioned, 0.0))
        if head is None:
            positioning[0] = fixed
        return positioning + n / rate

    def cost(self, offsets: Any, lengths: Any) -> float:
        """Total seconds for a request sequence (exact sum of :meth:`costs`, rounded once)."""
        acc = CostAccumulator(self)
        acc.add(offsets, lengths)
        return acc.seconds

    def sequential_bound(self, total_bytes: int | float) -> float:
        """The transfer time alone: ``total_bytes / rate`` seconds (no request can beat it)."""
        return float(total_bytes) / self.rate_bytes_s

    # -- parameters ----------------------------------------------------------

    def as_dict(self) -> dict[str, int | float]:
        """The parameters by name, as plain numbers (the JSON ``"model": {...}``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_overrides(cls, **overrides: Any) -> "DiskModel":
        """The default model with some parameters replaced; values may be numbers or strings."""
        names = cls.parameter_names()
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise DiskModelError(
                f"unknown disk-model parameter{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; known: {', '.join(names)}")
        values: dict[str, Any] = {k: _coerce(k, v) for k, v in overrides.items()}
        return cls(**values)

    @classmethod
    def parse(cls, spec: str | None) -> "DiskModel":
        """The model for a CLI string such as ``"rpm=5400,transfer_mb_s=150"`` (empty: defaults)."""
        return cls.from_overrides(**parse_overrides(spec))


def _coerce(name: str, value: Any) -> int | float:
    if isinstance(value, str):
        text = value.strip()
        try:
            if name in _INT_FIELDS:
                try:
                    return int(text, 10)
                except ValueError:
                    f = float(text)
                    if not f.is_integer():
                        raise DiskModelError(
                            f"{name} must be a whole number of bytes, got {value!r}") from None
                    return int(f)
            try:
                return int(text, 10)
            except ValueError:
                return float(text)
        except DiskModelError:
            raise
        except (ValueError, OverflowError):
            raise DiskModelError(f"{name}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DiskModelError(f"{name} must be a number, got {value!r}")
    return value.item() if isinstance(value, (np.integer, np.floating)) else value


def parse_overrides(spec: str | None) -> dict[str, int | float]:
    """Parse ``"name=value,name=value"`` into checked overrides (names and numbers).

    Whitespace around names and values is ignored, an empty string gives ``{}``.
    Unknown names, a missing ``=``, a repeated name or a value that is not a
    number raise :class:`DiskModelError` saying which item is at fault.
    """
    out: dict[str, int | float] = {}
    if spec is None or not spec.strip():
        return out
    names = DiskModel.parameter_names()
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name or not value.strip():
            raise DiskModelError(
                f"disk-model override {item!r} is not of the form name=value "
                f"(names: {', '.join(names)})")
        if name not in names:
            raise DiskModelError(
                f"unknown disk-model parameter {name!r}; known: {', '.join(names)}")
        if name in out:
            raise DiskModelError(f"disk-model parameter {name!r} given twice")
        out[name] = _coerce(name, value)
    return out


# ---------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------


class CostAccumulator:
    """Cost a long request sequence batch by batch, in bounded memory.

    The head position and the first-request state carry across batches, and
    the total is kept as an exact sum, so ``seconds`` after any split of a
    sequence into batches equals ``model.cost`` of the whole sequence exactly.
    """

    def __init__(self, model: DiskModel | None = None) -> None:
        self.model = model if model is not None else DiskModel()
        self.head: int | None = None
        self.requests = 0
        self.bytes = 0
        self._scaled = 0

    def add(self, offsets: Any, lengths: Any) -> float:
        """Cost a batch following everything added so far; returns the batch's seconds."""
        o, n = _requests(offsets, lengths, self.model.capacity_bytes)
        if o.size == 0:
            return 0.0
        c = self.model.costs(o, n, head=self.head)
        part = _exact_scaled_sum(c)
        self._scaled += part
        self.head = int(o[-1]) + int(n[-1])
        self.requests += int(o.size)
        self.bytes += int(n.sum(dtype=np.int64))
        return _scaled_to_float(part)

    @property
    def seconds(self) -> float:
        """Total modelled seconds so far (exact sum, rounded once)."""
        return _scaled_to_float(self._scaled)

    def __repr__(self) -> str:
        return (f"CostAccumulator(seconds={self.seconds!r}, requests={self.requests}, "
                f"bytes={self.bytes}, head={self.head!r})")
