#!/usr/bin/env python3
"""Read order (issue 4), side by side in one run: the disk model, host-order planning, real reads.

Parts (each can be left out with --skip):
  model    on a 4 GiB image of 64 KiB clusters in random host order, every cluster holding data
           (images.make_random_image(fill_data=True)): `qcow2kit bench order --output=json IMG`
           --repeat times (the first also with --plot, default docs/order-4g.png at scale 1):
           modelled guest-order and host-order seconds, the sequential bound (host order must
           be within 1% of it) and the measured cold-cache read times of both orders
  map      on the 256 GiB random image (no data written): `qcow2kit map --order=host
           --memory=64M --output=json IMG` against `qemu-img map --output=json IMG`, order
           alternating, median of --repeat: times, ratio, peak RSS; qcow2kit's output must be
           sorted by host offset and hold the same multiset of extent lines as qemu-img's
           (compared by a streamed, order-independent hash)
  convert  on the 4 GiB image: `qcow2kit convert -O raw IMG OUT` (host order, the default),
           `qcow2kit convert --order=guest ...` and `qemu-img convert -O raw IMG OUT`, each
           with a cold page cache (sync; echo 3 > /proc/sys/vm/drop_caches before each run),
           order rotating, median of --repeat; outputs compared with cmp

Images are sparse files in a fresh temporary directory (under --workdir), removed at the end
unless --keep.  Every measured command is forked by compare_qemu's small launcher, so its wall
time and peak RSS are its own.  Prints a table; --json FILE writes every figure with the machine
and the versions.

    python bench/order_bench.py --scale 1/64 --repeat 1    # quick try (seconds)
    python bench/order_bench.py --json order.json          # full scale (about 10 minutes)
"""
from __future__ import annotations

import argparse
import datetime as dt
import fractions
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench import compare_qemu as cq
from bench import images

REPO = cq.REPO
MiB = cq.MiB
QEMU, KIT = cq.QEMU, cq.KIT
CLUSTER = 65536
PARTS = ("model", "map", "convert")
FULL_SIZES = {"filled": 4 * images.GiB, "random": 256 * images.GiB}
DEFAULT_PLOT = REPO / "docs" / "order-4g.png"

# Targets (set for scale 1)
BOUND_TOLERANCE = 0.01          # host-order model time within 1% of the sequential bound
MAP_RATIO_TARGET = 3.0          # qcow2kit map --order=host <= 3x qemu-img map
MAP_RSS_TARGET_MIB = 160        # peak RSS of qcow2kit map --order=host --memory=64M
CONVERT_RATIO_TARGET = 1.0      # qcow2kit convert (host order) <= 1.0x qemu-img convert, cold
# Reference figures of DISK-MODEL.md for the 4 GiB image (shown beside ours, not a target)
REFERENCE_MODEL = {"guest": 343.0, "host": 17.19, "bound": 17.18}

CONVERT_TOOLS = ("qemu-img", "qcow2kit-host", "qcow2kit-guest")


# ---------------------------------------------------------------- page cache

def drop_caches() -> str:
    """sync, then drop the page cache (needs root); 'dropped' or why not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return "dropped"
    except OSError as e:
        return f"warm ({e.strerror or e})"


# ---------------------------------------------------------------- map output analysis

_M128 = (1 << 128) - 1


def _entry(line: bytes) -> bytes:
    """One extent of a `map --output=json` line, without the list punctuation around it
    ('[' before the first, ',' after each, ']' after the last)."""
    line = line.rstrip(b"\r\n ")
    if line.startswith(b"["):
        line = line[1:]
    if line.endswith(b"]"):
        line = line[:-1]
    if line.endswith(b","):
        line = line[:-1]
    return line.strip()


def _field(line: bytes, key: bytes) -> int | None:
    i = line.find(key)
    if i < 0:
        return None
    j = i + len(key)
    k = j
    while k < len(line) and 48 <= line[k] <= 57:
        k += 1
    return int(line[j:k]) if k > j else None


def analyze_map_output(path: str | os.PathLike[str], *, chunk: int = 8 * MiB) -> dict[str, Any]:
    """Stream a `map --output=json` file: sha256 of the bytes; line count; the multiset hash of
    its extents (count and sum mod 2**128 of BLAKE2b-128 of each extent's text, so it does not
    depend on their order); the sum of their lengths; whether the extents that have a host
    offset come in non-decreasing offset order, before any extent without one.  Memory: one
    chunk and one line at a time."""
    sha = hashlib.sha256()
    blake = hashlib.blake2b
    msum = 0
    lines = nbytes = total_len = 0
    last_off = -1
    unsorted = 0
    first_unsorted: int | None = None
    without_offset = 0
    offset_after_none = 0
    tail = b""
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            if data:
                sha.update(data)
                nbytes += len(data)
                parts = (tail + data).split(b"\n")
                tail = parts.pop()
            else:
                parts = [tail] if tail.strip() else []
                tail = b""
            for raw in parts:
                e = _entry(raw)
                if not e:
                    continue
                lines += 1
                msum += int.from_bytes(blake(e, digest_size=16).digest(), "little")
                total_len += _field(e, b'"length": ') or 0
                off = _field(e, b'"offset": ')
                if off is None:
                    without_offset += 1
                    continue
                if without_offset:
                    offset_after_none += 1
                if off < last_off:
                    unsorted += 1
                    if first_unsorted is None:
                        first_unsorted = lines
                last_off = off
            if not data:
                break
    return {"sha256": sha.hexdigest(), "bytes": nbytes, "lines": lines,
            "multiset": f"{lines}:{msum & _M128:032x}", "total_length": total_len,
            "sorted_by_offset": unsorted == 0 and offset_after_none == 0,
            "unsorted_lines": unsorted, "first_unsorted_line": first_unsorted,
            "without_offset": without_offset, "offset_after_no_offset": offset_after_none}


# ---------------------------------------------------------------- running

def kit_command(spec: str | None) -> list[str]:
    if spec:
        return shlex.split(spec)
    exe = shutil.which("qcow2kit")
    return [exe] if exe else [sys.executable, "-m", "qcow2kit"]


def available(cmd: list[str]) -> tuple[bool, str]:
    """Does ``cmd --help`` exit 0?  (False, last line of its complaint) otherwise."""
    try:
        p = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    except OSError as e:
        return False, str(e)
    text = (p.stderr or p.stdout).strip()
    return p.returncode == 0, ("available" if p.returncode == 0 else
                               text.splitlines()[-1] if text else f"exit {p.returncode}")


def run(cmd: list[str], out: Path, err: Path) -> dict[str, Any]:
    """compare_qemu.run_child plus the command line."""
    r = cq.run_child(cmd, out, err)
    r["cmd"] = shlex.join(cmd)
    return r


def last_err(r: dict[str, Any]) -> str:
    return r["stderr"].splitlines()[-1] if r.get("stderr") else ""


def stats(values: list[float]) -> dict[str, Any]:
    return {"median": cq.median(values), "min": min(values, default=None),
            "max": max(values, default=None), "values": values}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["exit"] == 0]
    return {"runs": len(runs), "failed": len(runs) - len(ok),
            "wall_s": stats([r["wall_s"] for r in ok]),
            "cpu_s": cq.median([r["user_s"] + r["sys_s"] for r in ok]),
            "maxrss_mib": cq.median([r["maxrss_mib"] for r in ok]),
            "maxrss_max_mib": max((r["maxrss_mib"] for r in ok), default=None)}


# ---------------------------------------------------------------- part 1: model

def part_model(img: Path, work: Path, kit: list[str], args: argparse.Namespace, plot: str | None,
               log: Callable[[str], None]) -> dict[str, Any]:
    runs = []
    for rep in range(args.repeat):
        cmd = [*kit, "bench", "order", "--output=json", "--drop-caches"]
        if plot and rep == 0:
            cmd += ["--plot", plot]
        r = run([*cmd, str(img)], work / "order.json", work / "order.err")
        if r["exit"] == 0:
            try:
                r["result"] = json.loads((work / "order.json").read_text())
            except ValueError as e:
                r["exit"] = -1
                r["stderr"] += f"\nbad JSON: {e}"
        runs.append(r)
        res = r.get("result")
        if res:
            g, h = res["guest"], res["host"]
            log(f"  model #{rep + 1}: guest {g['model_seconds']:.2f} s ({g['requests']} req), "
                f"host {h['model_seconds']:.3f} s ({h['requests']} req), bound "
                f"{res['sequential_bound_seconds']:.3f} s; measured guest "
                f"{cq.fmt(g['measured_seconds'])} s, host {cq.fmt(h['measured_seconds'])} s "
                f"(cache {res['cache']}); wall {r['wall_s']:.1f} s, RSS {r['maxrss_mib']:.1f} MiB")
        else:
            log(f"  model #{rep + 1}: FAILED exit {r['exit']}: {last_err(r)}")
    ok = [r["result"] for r in runs if r.get("result")]
    out: dict[str, Any] = {"runs": runs, "summary": summary(runs), "plot": plot}
    if not ok:
        return out
    first = ok[0]
    g, h = first["guest"], first["host"]
    bound = first["sequential_bound_seconds"]
    keys = ("requests", "bytes", "model_seconds")
    out.update({
        "guest": {k: g[k] for k in keys}, "host": {k: h[k] for k in keys},
        "sequential_bound_seconds": bound,
        "host_over_bound": h["model_seconds"] / bound if bound else None,
        "host_within_bound": bool(bound) and h["model_seconds"] <= bound * (1 + BOUND_TOLERANCE),
        "speedup_model": g["model_seconds"] / h["model_seconds"] if h["model_seconds"] else None,
        "deterministic": all(all(o[s][k] == first[s][k] for k in keys for s in ("guest", "host"))
                             for o in ok),
        "measured_guest_s": stats([o["guest"]["measured_seconds"] for o in ok
                                   if o["guest"]["measured_seconds"] is not None]),
        "measured_host_s": stats([o["host"]["measured_seconds"] for o in ok
                                  if o["host"]["measured_seconds"] is not None]),
        "cache": sorted({o["cache"] for o in ok}),
        "model": first["model"], "planning": first.get("planning"),
    })
    mg, mh = out["measured_guest_s"]["median"], out["measured_host_s"]["median"]
    out["speedup_measured"] = mg / mh if mg and mh else None
    return out


# ---------------------------------------------------------------- part 2: map

def part_map(img: Path, work: Path, kit: list[str], args: argparse.Namespace,
             log: Callable[[str], None]) -> dict[str, Any]:
    tools = {QEMU: [QEMU, "map", "--output=json", str(img)],
             KIT: [*kit, "map", "--order=host", f"--memory={args.memory}", "--output=json",
                   str(img)]}
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    analysis: dict[str, dict[str, Any]] = {}
    order = list(tools)
    for rep in range(args.repeat):
        for tool in (order if rep % 2 == 0 else order[::-1]):
            out = work / f"map-{tool}.json"
            r = run(tools[tool], out, work / f"map-{tool}.err")
            if r["exit"] == 0:
                if tool not in analysis:  # the first output of each tool in full
                    t = time.perf_counter()
                    analysis[tool] = analyze_map_output(out)
                    analysis[tool]["seconds"] = time.perf_counter() - t
                    r["sha256"] = analysis[tool]["sha256"]
                else:  # later ones must be the same bytes
                    r["sha256"] = cq.digest(out)[0]
            runs[tool].append(r)
            log(f"  map #{rep + 1} {tool:9s} {r['wall_s']:8.3f} s {r['maxrss_mib']:7.1f} MiB "
                f"exit {r['exit']}" + (f"  {last_err(r)}" if r["exit"] else ""))
            if not args.keep:
                out.unlink(missing_ok=True)
    res: dict[str, Any] = {"commands": {t: shlex.join(c) for t, c in tools.items()},
                           "runs": runs, "summary": {t: summary(runs[t]) for t in runs},
                           "analysis": analysis}
    for t in runs:
        res["summary"][t]["stable"] = len({r.get("sha256") for r in runs[t]
                                           if r["exit"] == 0}) <= 1
    q, k = res["summary"][QEMU]["wall_s"]["median"], res["summary"][KIT]["wall_s"]["median"]
    res["ratio"] = k / q if q and k else None
    qa, ka = analysis.get(QEMU), analysis.get(KIT)
    res["complete"] = bool(qa and ka and qa["multiset"] == ka["multiset"])
    res["sorted"] = bool(ka and ka["sorted_by_offset"])
    return res


# ---------------------------------------------------------------- part 3: convert

def cmp_files(a: Path, b: Path) -> tuple[bool, str]:
    p = subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True)
    return p.returncode == 0, (p.stdout + p.stderr).strip()


def spot_check_pattern(path: Path, size: int, samples: int = 64) -> bool:
    """A few clusters of the raw output hold images.pattern (guest offsets in the words)."""
    import numpy as np
    rng = np.random.default_rng(4)
    with open(path, "rb") as f:
        for c in rng.integers(0, max(1, size // CLUSTER), samples).tolist():
            f.seek(c * CLUSTER)
            if f.read(CLUSTER) != images.pattern(c * CLUSTER, CLUSTER):
                return False
    return True


def part_convert(img: Path, size: int, work: Path, kit: list[str], args: argparse.Namespace,
                 log: Callable[[str], None]) -> dict[str, Any]:
    outs = {t: work / f"convert-{t}.raw" for t in CONVERT_TOOLS}
    tools = {"qemu-img": [QEMU, "convert", "-O", "raw", str(img), str(outs["qemu-img"])],
             "qcow2kit-host": [*kit, "convert", "-O", "raw", str(img),
                               str(outs["qcow2kit-host"])],
             "qcow2kit-guest": [*kit, "convert", "--order=guest", "-O", "raw", str(img),
                                str(outs["qcow2kit-guest"])]}
    startup = {QEMU: [QEMU, "--version"], KIT: [*kit, "--version"]}
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    start_runs: dict[str, list[dict[str, Any]]] = {t: [] for t in startup}
    caches = set()
    order = list(tools)
    for rep in range(args.repeat):
        k = rep % len(order)
        for tool in order[k:] + order[:k]:
            outs[tool].unlink(missing_ok=True)
            caches.add(drop_caches())
            r = run(tools[tool], work / "convert.out", work / "convert.err")
            t = time.perf_counter()
            os.sync()  # what the command left dirty (qemu-img's default cache mode: unsafe)
            r["flush_s"] = time.perf_counter() - t
            runs[tool].append(r)
            log(f"  convert #{rep + 1} {tool:14s} {r['wall_s']:8.2f} s (+ sync "
                f"{r['flush_s']:5.2f} s) {r['maxrss_mib']:7.1f} MiB exit {r['exit']}"
                + (f"  {last_err(r)}" if r["exit"] else ""))
        for tool, cmd in startup.items():  # start-up alone, from a cold cache
            caches.add(drop_caches())
            start_runs[tool].append(run(cmd, work / "startup.out", work / "startup.err"))
    res: dict[str, Any] = {"commands": {t: shlex.join(c) for t, c in tools.items()},
                           "runs": runs, "summary": {}, "cache": sorted(caches),
                           "startup_cold_s": {t: stats([r["wall_s"] for r in rs
                                                        if r["exit"] == 0])
                                              for t, rs in start_runs.items()}}
    for t in runs:
        s = summary(runs[t])
        s["flush_s"] = cq.median([r["flush_s"] for r in runs[t] if r["exit"] == 0])
        s["wall_plus_flush_s"] = cq.median([r["wall_s"] + r["flush_s"] for r in runs[t]
                                            if r["exit"] == 0])
        res["summary"][t] = s
    ref = outs["qemu-img"]
    res["identical"] = {}
    if ref.exists() and runs["qemu-img"][-1]["exit"] == 0:
        res["pattern_ok"] = spot_check_pattern(ref, size)
        for t in ("qcow2kit-host", "qcow2kit-guest"):
            if outs[t].exists() and runs[t][-1]["exit"] == 0:
                same, text = cmp_files(ref, outs[t])
                res["identical"][t] = {"same": same, "cmp": text}
                log(f"  cmp qemu-img {t}: {'identical' if same else text}")
            else:
                res["identical"][t] = {"same": False, "cmp": "no output"}
    for o in outs.values():
        if o.exists():
            st = o.stat()
            res.setdefault("outputs", {})[o.name] = {"apparent": st.st_size,
                                                     "disk": st.st_blocks * 512}
            if not args.keep:
                o.unlink()
    w = {t: res["summary"][t]["wall_s"]["median"] for t in tools}
    q = w["qemu-img"]
    res["ratio_host"] = w["qcow2kit-host"] / q if q and w["qcow2kit-host"] else None
    res["ratio_guest"] = w["qcow2kit-guest"] / q if q and w["qcow2kit-guest"] else None
    wf = {t: res["summary"][t]["wall_plus_flush_s"] for t in tools}
    res["ratio_host_with_flush"] = (wf["qcow2kit-host"] / wf["qemu-img"]
                                    if wf["qemu-img"] and wf["qcow2kit-host"] else None)
    return res


# ---------------------------------------------------------------- targets and report

def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []

    def add(what: str, target: str, value: str, ok: bool | None) -> None:
        out.append({"what": what, "target": target, "value": value,
                    "status": "n/a" if ok is None else "met" if ok else "MISSED"})

    r = report["results"]
    if "model" in r:
        m = r["model"]
        if "host" in m:
            add("model: host order within 1% of the sequential bound",
                f"<= {1 + BOUND_TOLERANCE:.2f}x bound",
                f"{m['host']['model_seconds']:.3f} s / {m['sequential_bound_seconds']:.3f} s "
                f"= {m['host_over_bound']:.5f}x", m["host_within_bound"])
        else:
            add("model: host order within 1% of the sequential bound", "", "FAILED", False)
    if "map" in r:
        m = r["map"]
        ks = m["summary"][KIT]
        add("map: qcow2kit map --order=host / qemu-img map time", f"<= {MAP_RATIO_TARGET:.1f}x",
            cq.fmt(m["ratio"], ".2f", "x"), None if m["ratio"] is None
            else m["ratio"] <= MAP_RATIO_TARGET)
        rss = ks["maxrss_max_mib"]
        add("map: qcow2kit peak RSS (--memory=64M)", f"<= {MAP_RSS_TARGET_MIB} MiB",
            cq.fmt(rss, ".1f", " MiB"), None if rss is None else rss <= MAP_RSS_TARGET_MIB)
        ka = m["analysis"].get(KIT, {})
        add("map: output sorted by offset", "sorted",
            "sorted" if m["sorted"] else f"{ka.get('unsorted_lines', '-')} lines out of order",
            m["sorted"])
        add("map: output complete (multiset of lines = qemu-img's)", "equal",
            "equal" if m["complete"] else "DIFFERENT", m["complete"])
    if "convert" in r:
        c = r["convert"]
        add("convert: qcow2kit (host order) / qemu-img time, cold cache",
            f"<= {CONVERT_RATIO_TARGET:.1f}x", cq.fmt(c["ratio_host"], ".2f", "x"),
            None if c["ratio_host"] is None else c["ratio_host"] <= CONVERT_RATIO_TARGET)
        same = all(v["same"] for v in c["identical"].values()) and bool(c["identical"])
        add("convert: outputs identical (cmp)", "identical",
            ", ".join(f"{t}: {'identical' if v['same'] else v['cmp']}"
                      for t, v in c["identical"].items()) or "-", same)
    return out


def render(report: dict[str, Any]) -> str:
    L: list[str] = []
    m, v = report["machine"], report["versions"]
    L.append(f"read order (issue 4) -- {report['date']}")
    L.append(f"machine: {m['nproc']} CPUs, {m['cpu_model']}, {m['ram_gib']} GiB RAM, "
             f"Linux {m['kernel']}; {v['qemu_img']}; Python {v['python']}, numpy {v['numpy']}, "
             f"qcow2kit {v['qcow2kit']} ({v['git']})")
    L.append(f"scale {report['args']['scale']}, median of {report['args']['repeat']} runs")
    L.append("")
    L.append("images:")
    for name, b in report["images"].items():
        secs = ", ".join(f"{k} {x:.2f} s" for k, x in b["seconds"].items())
        L.append(f"  {name:7s} {b['size'] / 2**30:8.2f} GiB {b['data_clusters']:>10,} clusters "
                 f"disk {b['disk_bytes'] / MiB:8.1f} MiB  build: {secs}")
    res = report["results"]
    if "model" in res:
        x = res["model"]
        L.append("")
        L.append("1. disk model (qcow2kit bench order), filled image:")
        if "host" in x:
            ref = report["args"]["scale"] == "1"
            L.append(f"  {'order':6s} {'requests':>9s} {'model s':>10s} {'measured s (median)':>20s}"
                     + ("   DISK-MODEL.md" if ref else ""))
            for o in ("guest", "host"):
                ms = x[f"measured_{o}_s"]
                L.append(f"  {o:6s} {x[o]['requests']:>9,} {x[o]['model_seconds']:>10.3f} "
                         f"{cq.fmt(ms['median']):>10s} ({cq.fmt(ms['min'])}-{cq.fmt(ms['max'])})"
                         + (f"   {REFERENCE_MODEL[o]:.2f} s" if ref else ""))
            L.append(f"  sequential bound {x['sequential_bound_seconds']:.3f} s; host/bound "
                     f"{x['host_over_bound']:.5f}; modelled speed-up {x['speedup_model']:.1f}x, "
                     f"measured here {cq.fmt(x['speedup_measured'], '.2f', 'x')}; cache "
                     f"{', '.join(x['cache'])}; deterministic {x['deterministic']}")
            s = x["summary"]
            L.append(f"  command wall {s['wall_s']['median']:.1f} s, peak RSS "
                     f"{s['maxrss_max_mib']:.1f} MiB; plot {x['plot'] or '-'}")
        else:
            L.append("  FAILED: " + last_err(x["runs"][-1]))
    if "map" in res:
        x = res["map"]
        L.append("")
        L.append("2. planning: map --output=json on the random image (warm cache):")
        L.append(f"  {'tool':9s} {'wall s':>8s} {'min':>8s} {'max':>8s} {'cpu s':>8s} "
                 f"{'RSS MiB':>8s} {'lines':>11s} {'MiB':>7s} by-offset multiset")
        for t, s in x["summary"].items():
            a = x["analysis"].get(t, {})
            w = s["wall_s"]
            L.append(f"  {t:9s} {cq.fmt(w['median']):>8s} {cq.fmt(w['min']):>8s} "
                     f"{cq.fmt(w['max']):>8s} {cq.fmt(s['cpu_s']):>8s} "
                     f"{cq.fmt(s['maxrss_max_mib'], '.1f'):>8s} "
                     f"{format(a.get('lines', 0), ','):>11s} "
                     f"{cq.fmt(a['bytes'] / MiB if a else None, '.1f'):>7s} "
                     f"{str(a.get('sorted_by_offset', '-')):9s} {a.get('multiset', '-')[:24]}"
                     + (f"  ({s['failed']} FAILED)" if s["failed"] else ""))
        L.append(f"  ratio qcow2kit/qemu-img {cq.fmt(x['ratio'], '.2f', 'x')}; complete "
                 f"{x['complete']}, sorted {x['sorted']}")
    if "convert" in res:
        x = res["convert"]
        L.append("")
        L.append("3. real reads: convert -O raw of the filled image, cold cache each run:")
        L.append(f"  {'tool':15s} {'wall s':>8s} {'min':>8s} {'max':>8s} {'cpu s':>8s} "
                 f"{'RSS MiB':>8s} {'+sync s':>8s}")
        for t, s in x["summary"].items():
            w = s["wall_s"]
            L.append(f"  {t:15s} {cq.fmt(w['median'], '.2f'):>8s} {cq.fmt(w['min'], '.2f'):>8s} "
                     f"{cq.fmt(w['max'], '.2f'):>8s} {cq.fmt(s['cpu_s'], '.2f'):>8s} "
                     f"{cq.fmt(s['maxrss_max_mib'], '.1f'):>8s} {cq.fmt(s['flush_s'], '.2f'):>8s}"
                     + (f"  ({s['failed']} FAILED)" if s["failed"] else ""))
        st = x["startup_cold_s"]
        L.append(f"  ratio host/qemu-img {cq.fmt(x['ratio_host'], '.2f', 'x')}, guest/qemu-img "
                 f"{cq.fmt(x['ratio_guest'], '.2f', 'x')}; with the following sync "
                 f"{cq.fmt(x['ratio_host_with_flush'], '.2f', 'x')}; cold start-up: qemu-img "
                 f"{cq.fmt(st[QEMU]['median'], '.2f')} s, qcow2kit "
                 f"{cq.fmt(st[KIT]['median'], '.2f')} s; cache {', '.join(x['cache'])}; "
                 f"pattern {x.get('pattern_ok', '-')}")
    L.append("")
    note = "" if report["args"]["scale"] == "1" else "  (targets are set for scale 1)"
    L.append("targets:" + note)
    for t in report["targets"]:
        L.append(f"  {t['status']:7s} {t['what']}: {t['value']} (target {t['target']})")
    return "\n".join(L)


# ---------------------------------------------------------------- main

def versions() -> dict[str, Any]:
    """compare_qemu.versions() plus where qcow2kit was imported from: when that is not this
    repository's work tree (e.g. PYTHONPATH=<export of a commit>), the work tree's commit in
    "git" says nothing about the code measured."""
    v = cq.versions()
    try:
        import qcow2kit
        path = Path(qcow2kit.__file__).resolve().parent
    except ImportError:
        return v
    v["qcow2kit_path"] = str(path)
    if path != REPO / "qcow2kit":
        v["git"] = f"not the work tree ({v['git']})"
    return v



def parse_skip(text: str) -> set[str]:
    names = {"1": "model", "2": "map", "3": "convert"}
    out = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        name = names.get(part, part)
        if name not in PARTS:
            raise argparse.ArgumentTypeError(f"unknown part {part!r}: choose from "
                                             f"{', '.join(PARTS)} (or 1, 2, 3)")
        out.add(name)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=cq.parse_scale, default=fractions.Fraction(1),
                   help="fraction of the full sizes (4 GiB filled, 256 GiB random), e.g. 1/64")
    p.add_argument("--repeat", "-n", type=int, default=3, help="runs per measurement (3)")
    p.add_argument("--workdir", help="directory in which to make the temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the images and outputs")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--skip", type=parse_skip, default=set(),
                   help="comma-separated parts to leave out: model, map, convert (or 1, 2, 3)")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="plot of the first `bench order` run (default: docs/order-4g.png at "
                   "scale 1, none otherwise)")
    p.add_argument("--no-plot", action="store_true", help="draw no plot")
    p.add_argument("--memory", default="64M", help="qcow2kit map --memory (64M)")
    p.add_argument("--seed", type=int, default=1, help="shuffle seed of both images (1)")
    p.add_argument("--qcow2kit", default=None, help="command that runs qcow2kit (default: the "
                   "qcow2kit script on PATH, else `python -m qcow2kit`)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    parts = [x for x in PARTS if x not in args.skip]
    if not parts:
        p.error("--skip leaves nothing to run")
    if shutil.which(QEMU) is None:
        print("order_bench: qemu-img not found (apt-get install qemu-utils)", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    kit = kit_command(args.qcow2kit)
    subs = {"model": ["bench", "order"], "map": ["map"], "convert": ["convert"]}
    for part in parts:
        ok, detail = available([*kit, *subs[part]])
        if not ok:
            print(f"order_bench: `{shlex.join([*kit, *subs[part]])}` is not available: "
                  f"{detail}", file=sys.stderr)
            return 2
    plot = None
    if "model" in parts and not args.no_plot:
        plot = args.plot or (str(DEFAULT_PLOT) if args.scale == 1 else None)
        if plot:
            Path(plot).parent.mkdir(parents=True, exist_ok=True)

    sizes = {n: cq.scaled_size(full, args.scale, CLUSTER) for n, full in FULL_SIZES.items()}
    need = 256 * MiB
    if "model" in parts or "convert" in parts:
        need += sizes["filled"] * (1 + (3 if "convert" in parts else 0))
    if "map" in parts:
        need += sizes["random"] // CLUSTER * (12 + 130 * 2)
    parent = args.workdir or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need:
        print(f"order_bench: {parent} has {free / 2**30:.1f} GiB free, needs about "
              f"{need / 2**30:.1f} GiB", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="qcow2kit-order-", dir=parent))
    log(f"work directory {work} ({free / 2**30:.1f} GiB free, needs about "
        f"{need / 2**30:.2f} GiB); parts: {', '.join(parts)}")

    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "machine": cq.machine_info(), "versions": versions(),
        "args": {"scale": str(args.scale), "repeat": args.repeat, "parts": parts,
                 "seed": args.seed, "memory": args.memory, "qcow2kit_cmd": kit,
                 "workdir": str(work), "plot": plot,
                 "pythonpath": os.environ.get("PYTHONPATH")},
        "targets_set": {"bound_tolerance": BOUND_TOLERANCE, "map_ratio": MAP_RATIO_TARGET,
                        "map_rss_mib": MAP_RSS_TARGET_MIB, "convert_ratio": CONVERT_RATIO_TARGET,
                        "reference_model_s": REFERENCE_MODEL},
        "images": {}, "results": {},
    }
    failed = False
    try:
        filled = work / "filled.qcow2"
        if "model" in parts or "convert" in parts:
            log(f"building filled: {sizes['filled'] / 2**30:g} GiB, data in every cluster ...")
            b = images.make_random_image(filled, sizes["filled"], seed=args.seed,
                                         cluster_size=CLUSTER, fill_data=True)
            report["images"]["filled"] = b.as_dict()
            log(f"  built in {sum(b.seconds.values()):.1f} s ({b.disk_bytes / MiB:.0f} MiB)")
        if "model" in parts:
            log("1. disk model: qcow2kit bench order ...")
            x = report["results"]["model"] = part_model(filled, work, kit, args, plot, log)
            # (below scale 1 the first request's fixed cost, ~4.3 ms, can exceed 1% of the bound)
            failed |= x["summary"]["failed"] > 0 or "host" not in x or (
                args.scale == 1 and not x["host_within_bound"])
        if "map" in parts:
            rnd = work / "random.qcow2"
            log(f"building random: {sizes['random'] / 2**30:g} GiB ...")
            b = images.make_random_image(rnd, sizes["random"], seed=args.seed,
                                         cluster_size=CLUSTER)
            report["images"]["random"] = b.as_dict()
            log(f"  built in {sum(b.seconds.values()):.1f} s ({b.disk_bytes / MiB:.0f} MiB)")
            log("2. planning: map ...")
            x = report["results"]["map"] = part_map(rnd, work, kit, args, log)
            failed |= (any(s["failed"] for s in x["summary"].values())
                       or not (x["complete"] and x["sorted"]))
            if not args.keep:
                rnd.unlink()
        if "convert" in parts:
            log("3. real reads: convert, cold cache ...")
            x = report["results"]["convert"] = part_convert(filled, sizes["filled"], work, kit,
                                                            args, log)
            failed |= (any(s["failed"] for s in x["summary"].values())
                       or not all(v["same"] for v in x["identical"].values())
                       or x.get("pattern_ok") is False)
        report["targets"] = evaluate_targets(report)
        report["failed"] = failed
        print(render(report))
        if args.json:
            with open(args.json, "w") as jf:
                json.dump(report, jf, indent=2)
                jf.write("\n")
            log(f"wrote {args.json}")
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
