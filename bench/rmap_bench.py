#!/usr/bin/env python3
"""The persistent reverse map: build time, planning from it, and its size (issue 5).

Builds (sparse, in a temporary directory removed afterwards unless --keep) the 256 GiB image
with every cluster's host offset shuffled and the 1 TiB metadata-preallocated (sequential)
image of bench/images.py, then measures in this process, median of --repeat runs:

  scan        one L2 scan: qcow2kit.mapping.map_batches over the whole image, no output
  build       qcow2kit.rmap.build (compute, write, fsync, publish)
  plan-l2     HostOrderPlan(use_rmap=False, include_holes=True): all requests, L2 scan + sort
  plan-rmap   HostOrderPlan(use_rmap=True): all requests, from the map

and reports the map size in bytes and bytes per data cluster. Targets (issue 5): build <= 2x
one scan on the random image; plan from the map <= 0.5x the L2-based plan.

    python bench/rmap_bench.py --scale 1/64      # quick
    python bench/rmap_bench.py --json rmap.json  # full scale
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench import images
from bench.compare_qemu import machine_info, parse_scale, scaled_size, versions

import qcow2kit
from qcow2kit.rmap import build as rmap_build
from qcow2kit.rmap.format import RmapInfo
from qcow2kit.hostorder import HostOrderPlan
from qcow2kit.mapping import map_batches


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times = []
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(path: Path, repeat: int) -> dict[str, Any]:
    res: dict[str, Any] = {}

    def scan() -> int:
        with qcow2kit.open(path) as img:
            return sum(b.shape[0] for b in map_batches(img))

    def plan(use: bool) -> tuple[int, str]:
        with qcow2kit.open(path) as img:
            p = HostOrderPlan(img, use_rmap=use, include_holes=True)
            return sum(r.shape[0] for r in p.requests()), p.source

    rmap_build.drop(path)
    res["scan_s"], res["extents"] = timed(scan, repeat)
    res["plan_l2_s"], (res["requests_l2"], _) = timed(lambda: plan(False), repeat)

    def build() -> RmapInfo:
        return rmap_build.build(path)

    res["build_s"], info = timed(build, repeat)
    res["rmap_bytes"] = info.length
    res["rmap_data_records"] = info.nb_data_records
    res["rmap_clusters"] = info.extra.get("clusters")
    res["bytes_per_cluster"] = (info.length / info.extra["clusters"]
                                if info.extra.get("clusters") else None)
    res["plan_rmap_s"], (res["requests_rmap"], source) = timed(lambda: plan(True), repeat)
    res["plan_rmap_source"] = source
    res["build_vs_scan"] = res["build_s"] / res["scan_s"]
    res["plan_rmap_vs_l2"] = res["plan_rmap_s"] / res["plan_l2_s"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", default="1", help="fraction of the full sizes (e.g. 1/64)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default=None, help="write all figures to this file")
    args = ap.parse_args(argv)
    scale = parse_scale(args.scale)
    work = Path(tempfile.mkdtemp(prefix="qcow2kit-rmap-bench-", dir=args.workdir))
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(),
                              "versions": versions(), "scale": str(scale), "images": {}}
    try:
        for name, full, make in (("random", 256 * images.GiB, images.make_random_image),
                                 ("prealloc", images.TiB, images.make_prealloc_image)):
            path = work / f"{name}.qcow2"
            make(str(path), scaled_size(full, scale, 65536))
            r = measure(path, args.repeat)
            report["images"][name] = r
            print(f"{name:9} scan {r['scan_s']:.2f} s | build {r['build_s']:.2f} s "
                  f"({r['build_vs_scan']:.2f}x scan) | plan L2 {r['plan_l2_s']:.2f} s, "
                  f"from map {r['plan_rmap_s']:.2f} s ({r['plan_rmap_vs_l2']:.2f}x) | map "
                  f"{r['rmap_bytes']} bytes, {r['rmap_data_records']} records, "
                  f"{r['bytes_per_cluster']:.3f} bytes/cluster")
            path.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rnd = report["images"]["random"]
    print(f"targets: build <= 2x scan on random: {rnd['build_vs_scan']:.2f}x "
          f"({'met' if rnd['build_vs_scan'] <= 2 else 'NOT met'}); plan from map <= 0.5x: "
          f"{rnd['plan_rmap_vs_l2']:.2f}x ({'met' if rnd['plan_rmap_vs_l2'] <= 0.5 else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
