"""``qcow2kit bench order``: guest order against host order, modelled and measured.

For each order this collects the exact read requests the reader issues (one
pread per request, at most ``max_request`` bytes), costs them with the
rotating-disk model (:mod:`qcow2kit.diskmodel`), and optionally times the
same preads on this machine with a cold page cache.  The files of a chain
are laid one after another on the modelled disk, each contiguous, so file
offset + the file's base = disk position.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .diskmodel import CostAccumulator, DiskModel
from .hostorder import (DEFAULT_MAX_REQUEST, HostOrderPlan, _data_size, _file_name,
                        guest_order_requests)
from .image import Image
from .mapping import DEFAULT_MEMORY, check_memory
from .source import ByteSource


def split_requests(reqs: np.ndarray, max_request: int) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """(file, offset, length) of the preads for ``reqs``: long requests cut at ``max_request``."""
    f = reqs["file"].astype(np.int64)
    off = reqs["host"].astype(np.int64)
    ln = reqs["length"].astype(np.int64)
    pieces = np.maximum(1, -(-ln // max_request))
    if (pieces == 1).all():
        return f, off, ln
    idx = np.repeat(np.arange(ln.shape[0]), pieces)
    k = np.arange(idx.shape[0]) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    poff = off[idx] + k * max_request
    plen = np.minimum(max_request, ln[idx] - k * max_request)
    return f[idx], poff, plen


@dataclass
class OrderResult:
    """Figures for one read order."""

    requests: int = 0
    bytes: int = 0
    model_seconds: float = 0.0
    measured_seconds: float | None = None
    sample: list[tuple[int, int]] = field(default_factory=list)  # (request number, disk pos)

    def as_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "bytes": self.bytes,
                "model_seconds": self.model_seconds, "measured_seconds": self.measured_seconds}


def _cost(batches: Iterable[np.ndarray], bases: list[int], model: DiskModel,
          max_request: int, sample_every: int, timed: list[ByteSource] | None,
          buf: bytearray) -> OrderResult:
    acc = CostAccumulator(model)
    res = OrderResult()
    n = 0
    t0 = time.perf_counter()
    base = np.asarray(bases, dtype=np.int64)
    for reqs in batches:
        if reqs.shape[0] == 0:
            continue
        f, off, ln = split_requests(reqs, max_request)
        pos = base[f] + off
        acc.add(pos, ln)
        if sample_every:
            idx = np.arange(n, n + pos.shape[0])
            keep = idx % sample_every == 0
            res.sample.extend(zip(idx[keep].tolist(), pos[keep].tolist()))
        if timed is not None:
            mv = memoryview(buf)
            for fi, o, ll in zip(f.tolist(), off.tolist(), ln.tolist()):
                src = timed[fi]
                avail = max(0, min(ll, src.size - o))
                if avail:
                    src.readinto_at(o, mv[:avail], field="data")
        n += pos.shape[0]
    res.requests = acc.requests
    res.bytes = acc.bytes
    res.model_seconds = acc.seconds
    if timed is not None:
        res.measured_seconds = time.perf_counter() - t0
    return res


ColdCache = Callable[[list[ByteSource]], str]


def bench_order(img: Image, *, model: DiskModel | None = None, memory: int = DEFAULT_MEMORY,
                max_request: int = DEFAULT_MAX_REQUEST, measure: bool = True,
                plot_points: int = 0, make_cold: ColdCache | None = None) -> dict[str, Any]:
    """Model (and measure) reading every stored data byte of ``img`` in guest and host order.

    Returns the JSON object of ``qcow2kit bench order``; with ``plot_points``
    it also carries up to that many (request number, disk position) samples
    per order under ``"_samples"`` for a plot.

    The library never drops caches by itself: before each measured order it
    calls ``make_cold(sources)`` when given (the files read; it returns what
    it achieved, e.g. "dropped", which the result reports as ``"cache"``);
    without it the reads are measured as they come ("warm").
    """
    if max_request < 512:
        raise ValueError(f"max_request must be at least 512 bytes, not {max_request}")
    check_memory(memory)
    img._check_readable()
    model = model or DiskModel()
    layers = img.chain()
    sizes = [_data_size(layer) for layer in layers]
    bases = [0]
    for sz in sizes[:-1]:
        bases.append(bases[-1] + (sz + (1 << 20) - 1) // (1 << 20) * (1 << 20))
    sources = [layer.data_source if isinstance(layer, Image) else layer.src for layer in layers]
    buf = bytearray(max_request)

    plan = HostOrderPlan(img, memory=memory, max_request=max_request)
    # A first costing pass with no reads gives the request counts (for plot sampling).
    def guest() -> Iterator[np.ndarray]:
        return guest_order_requests(img, memory=memory, max_request=max_request)

    def host() -> Iterator[np.ndarray]:
        return plan.requests()

    results = {}
    cache_state = "not measured"
    for name, make in (("guest", guest), ("host", host)):
        sample_every = 0
        if plot_points:
            total = sum(split_requests(r, max_request)[0].shape[0] for r in make())
            sample_every = max(1, total // plot_points)
        timed = None
        if measure:
            cache_state = make_cold(sources) if make_cold is not None else "warm"
            timed = sources
        results[name] = _cost(make(), bases, model, max_request, sample_every, timed, buf)
    total_bytes = results["host"].bytes
    out: dict[str, Any] = {
        "guest": results["guest"].as_json(),
        "host": results["host"].as_json(),
        "sequential_bound_seconds": model.sequential_bound(total_bytes),
        "model": model.as_dict(),
        "cache": cache_state,
        "files": [_file_name(layer) for layer in layers],
        "planning": {"passes": plan.stats.passes, "windows": plan.stats.windows,
                     "source": plan.source, "reason": plan.source_reason},
    }
    if plot_points:
        out["_samples"] = {k: v.sample for k, v in results.items()}
    return out


def plot_order(result: dict[str, Any], path: str, title: str = "") -> None:
    """Draw disk position against request number for both orders (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib (pip install 'qcow2kit[plot]')") from exc
    samples = result["_samples"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, name in zip(axes, ("guest", "host")):
        pts = samples[name]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, [v / 2**30 for v in y], color="tab:blue" if name == "guest"
                    else "tab:green", markersize=1, linestyle="none", marker=".")
        r = result[name]
        ax.set_title(f"{name} order: {r['requests']} requests, model {r['model_seconds']:.1f} s")
        ax.set_xlabel("request number")
    axes[0].set_ylabel("disk position (GiB)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
