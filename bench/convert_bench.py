#!/usr/bin/env python3
"""convert (issue 9): qcow2kit convert against qemu-img convert and a sequential dd read, in one run.

All parts use one image: 64 KiB clusters in random host order with data in every cluster
(images.make_random_image(fill_data=True), 4 GiB at scale 1), in a fresh temporary directory
(under --workdir), removed at the end unless --keep.  Every timed command is forked by
compare_qemu's small launcher (wall time fork->reap, CPU and peak RSS from wait4), with the page
cache dropped right before it (order_bench.drop_caches: sync; echo 3 > drop_caches; needs root;
--warm leaves the cache as it is), the commands of a part rotating their order every repetition,
the output file removed before each run, and the time of an `os.sync()` right after each run
recorded beside it (none of the commands flushes its output: qemu-img's target cache mode is
'unsafe', qcow2kit's default is the same).

Parts (each can be left out with --skip):
  raw      `qcow2kit convert -O raw IMG OUT`, `qemu-img convert -O raw IMG OUT` and
           `dd if=IMG of=/dev/null bs=1M` (the sequential read of the source file: the physical
           limit), --repeat times; outputs: cmp of the two raw files, `qemu-img compare` of
           qcow2kit's with the source, the fill pattern spot-checked in qemu-img's
  qcow2    `qcow2kit convert -O qcow2 IMG OUT` and `qemu-img convert -O qcow2 IMG OUT` (both
           at their default cache modes) and the same dd, --repeat times; outputs: `qemu-img
           compare` with the source, `qemu-img check --output=json` (exit code, leaks,
           corruptions, fragmented clusters %).  Runs only when `qcow2kit convert --help` lists
           qcow2 among the -O choices; reported as "not available" otherwise
  threads  `-m N` for N in --threads (1,2,4,8,16): qcow2kit convert -O raw and qemu-img convert
           -O raw, --threads-repeat times each (default --repeat), outputs cmp'd with the first
           qemu-img output
  model    the rotating-disk model (qcow2kit/diskmodel.py, DISK-MODEL.md) of reading the image's
           data in guest and in host order, from `qcow2kit bench order --output=json
           --drop-caches IMG` run once through order_bench.part_model (modelled seconds, request
           counts, the sequential bound, and the cold reads bench order measures)
  trace    the reads the converts really issue: `strace -ff -ttt -y` of one warm-cache run each
           of qcow2kit convert -O raw (host order; and with -m 1: one reader, so no two reads
           race), qcow2kit convert --order=guest -O raw and qemu-img convert -O raw; every
           pread64/preadv of the source file (metadata included), in the order the syscalls
           were entered over all threads, costed by qcow2kit.diskmodel.DiskModel() as one
           sequence (no reordering by the disk), and the same reads sorted by offset

    python -m bench.convert_bench --scale 1/64 -n 1 --warm          # quick try (seconds)
    python -m bench.convert_bench --workdir /tmp -n 3 --json conv.json --markdown conv.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import fractions
import json
import os
import re
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
from bench import order_bench as ob

MiB = cq.MiB
QEMU = cq.QEMU
CLUSTER = ob.CLUSTER
FULL_SIZE = 4 * images.GiB
PARTS = ("raw", "qcow2", "threads", "model", "trace")
DEFAULT_THREADS = (1, 2, 4, 8, 16)
RATIO_TARGET = 1.0   # issue 9: qcow2kit convert <= 1.0x qemu-img convert, both formats

Log = Callable[[str], None]


# ---------------------------------------------------------------- helpers

def qcow2_target_available(kit: list[str]) -> tuple[bool, str]:
    """Does `qcow2kit convert --help` list qcow2 among the -O choices?"""
    try:
        p = subprocess.run([*kit, "convert", "--help"], capture_output=True, text=True,
                           timeout=60)
    except OSError as e:
        return False, str(e)
    if p.returncode != 0:
        return False, f"convert --help exited {p.returncode}"
    m = re.search(r"-O \{([^}]*)\}", p.stdout)
    if m:
        choices = [c.strip() for c in m.group(1).split(",")]
    else:  # no argparse choices: the -O entry of the options list, up to the next option
        m = re.search(r"^\s+-O\b(.*?)(?=^\s+-\w)", p.stdout, re.M | re.S)
        choices = re.findall(r"\b(raw|qcow2)\b", m.group(1)) if m else []
    if "qcow2" in choices:
        return True, "available"
    return False, f"-O choices: {', '.join(choices) or '?'}"


def cold_rotation(tools: dict[str, list[str]], outs: dict[str, Path | None], repeat: int,
                  work: Path, warm: bool, label: str, log: Log) -> tuple[dict[str, Any], set[str]]:
    """Run every command of ``tools`` ``repeat`` times, the order rotating, each from a cold
    cache (unless ``warm``) with its output removed first, and an os.sync() timed after it."""
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    caches: set[str] = set()
    order = list(tools)
    for rep in range(repeat):
        k = rep % len(order)
        for tool in order[k:] + order[:k]:
            out = outs.get(tool)
            if out is not None:
                out.unlink(missing_ok=True)
            caches.add("warm" if warm else ob.drop_caches())
            r = ob.run(tools[tool], work / "cmd.out", work / "cmd.err")
            t = time.perf_counter()
            os.sync()
            r["flush_s"] = time.perf_counter() - t
            runs[tool].append(r)
            log(f"  {label} #{rep + 1} {tool:22s} {r['wall_s']:8.2f} s (+ sync "
                f"{r['flush_s']:5.2f} s) cpu {r['user_s'] + r['sys_s']:6.2f} s "
                f"{r['maxrss_mib']:7.1f} MiB exit {r['exit']}"
                + (f"  {ob.last_err(r)}" if r["exit"] else ""))
    return runs, caches


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out = {}
    for t, rs in runs.items():
        s = ob.summary(rs)
        ok = [r for r in rs if r["exit"] == 0]
        s["flush_s"] = cq.median([r["flush_s"] for r in ok])
        s["wall_plus_flush_s"] = cq.median([r["wall_s"] + r["flush_s"] for r in ok])
        out[t] = s
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def per_rep_ratios(runs: dict[str, list[dict[str, Any]]], a: str, b: str) -> list[float]:
    return [x["wall_s"] / y["wall_s"] for x, y in zip(runs[a], runs[b])
            if x["exit"] == 0 and y["exit"] == 0 and y["wall_s"] > 0]


def wall_table(summ: dict[str, Any], names: list[str]) -> list[str]:
    """Markdown lines: each command's median wall time [min–max], CPU and peak RSS."""
    lines = ["| command | wall, median [min–max] | CPU (user+sys) | peak RSS |",
             "|---|---:|---:|---:|"]
    for name in names:
        s = summ[name]
        lines.append(f"| {name} | {s['wall_s']['median']:.2f} s [{s['wall_s']['min']:.2f}–"
                     f"{s['wall_s']['max']:.2f}] | {s['cpu_s']:.2f} s | "
                     f"{s['maxrss_mib']:.1f} MiB |")
    return lines


def write_report(text: str, report: dict[str, Any], markdown: str | None,
                 json_path: str | None) -> None:
    """Print the markdown text; write it, and the report as JSON, where asked."""
    print(text)
    if markdown:
        Path(markdown).write_text(text)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2, default=str))


def qemu_compare(src: Path, out: Path, out_fmt: str) -> dict[str, Any]:
    p = subprocess.run([QEMU, "compare", "-f", "qcow2", "-F", out_fmt, str(src), str(out)],
                       capture_output=True, text=True)
    return {"exit": p.returncode, "equal": p.returncode == 0,
            "text": (p.stdout + p.stderr).strip()[-300:]}


def qemu_check(path: Path) -> dict[str, Any]:
    """`qemu-img check --output=json`: exit code, leaks, corruptions, fragmentation %."""
    p = subprocess.run([QEMU, "check", "--output=json", str(path)], capture_output=True,
                       text=True)
    res: dict[str, Any] = {"exit": p.returncode}
    try:
        j = json.loads(p.stdout)
    except ValueError:
        res["error"] = (p.stdout + p.stderr).strip()[-300:]
        return res
    alloc = j.get("allocated-clusters", 0)
    frag = j.get("fragmented-clusters", 0)
    res.update({k: j.get(k, 0) for k in ("leaks", "corruptions", "check-errors")})
    res.update({"allocated_clusters": alloc, "fragmented_clusters": frag,
                "fragmented_pct": 100.0 * frag / alloc if alloc else 0.0,
                "image_end_offset": j.get("image-end-offset")})
    res["clean"] = (p.returncode == 0 and not res["leaks"] and not res["corruptions"]
                    and not res["check-errors"])
    return res


def file_sizes(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"apparent": st.st_size, "disk": st.st_blocks * 512}


def dd_cmd(img: Path) -> list[str]:
    return ["dd", f"if={img}", "of=/dev/null", "bs=1M", "status=none"]


# ---------------------------------------------------------------- part: raw

def part_raw(img: Path, size: int, work: Path, kit: list[str], args: argparse.Namespace,
             log: Log) -> dict[str, Any]:
    outs: dict[str, Path | None] = {"qemu-img": work / "qemu.raw", "qcow2kit": work / "kit.raw",
                                    "dd": None}
    tools = {"qemu-img": [QEMU, "convert", "-O", "raw", str(img), str(outs["qemu-img"])],
             "qcow2kit": [*kit, "convert", "-O", "raw", str(img), str(outs["qcow2kit"])],
             "dd": dd_cmd(img)}
    runs, caches = cold_rotation(tools, outs, args.repeat, work, args.warm, "raw", log)
    res: dict[str, Any] = {"commands": {t: shlex.join(c) for t, c in tools.items()},
                           "runs": runs, "summary": summarize(runs), "cache": sorted(caches)}
    w = {t: res["summary"][t]["wall_s"]["median"] for t in tools}
    res["ratios"] = {"qcow2kit/qemu-img": ratio(w["qcow2kit"], w["qemu-img"]),
                     "qcow2kit/dd": ratio(w["qcow2kit"], w["dd"]),
                     "qemu-img/dd": ratio(w["qemu-img"], w["dd"])}
    wf = {t: res["summary"][t]["wall_plus_flush_s"] for t in ("qemu-img", "qcow2kit")}
    res["ratio_with_flush"] = ratio(wf["qcow2kit"], wf["qemu-img"])
    res["per_rep_ratio"] = per_rep_ratios(runs, "qcow2kit", "qemu-img")
    q, k = outs["qemu-img"], outs["qcow2kit"]
    assert q is not None and k is not None
    ok_q = q.exists() and runs["qemu-img"][-1]["exit"] == 0
    ok_k = k.exists() and runs["qcow2kit"][-1]["exit"] == 0
    res["pattern_ok"] = ob.spot_check_pattern(q, size) if ok_q else None
    if ok_q and ok_k:
        same, text = ob.cmp_files(q, k)
        res["identical"] = {"same": same, "cmp": text}
        res["compare"] = qemu_compare(img, k, "raw")
    else:
        res["identical"] = {"same": False, "cmp": "no output"}
        res["compare"] = {"equal": False, "text": "no output"}
    log(f"  raw: cmp {'identical' if res['identical']['same'] else res['identical']['cmp']}; "
        f"qemu-img compare {'equal' if res['compare']['equal'] else res['compare']['text']}")
    res["outputs"] = {t: file_sizes(o) for t, o in outs.items() if o is not None and o.exists()}
    res["ok"] = (not any(s["failed"] for s in res["summary"].values())
                 and res["identical"]["same"] and res["compare"]["equal"]
                 and res["pattern_ok"] is not False)
    for o in outs.values():
        if o is not None and not args.keep:
            o.unlink(missing_ok=True)
    return res


# ---------------------------------------------------------------- part: qcow2

def part_qcow2(img: Path, work: Path, kit: list[str], args: argparse.Namespace,
               log: Log) -> dict[str, Any]:
    avail, detail = qcow2_target_available(kit)
    if not avail:
        log(f"  qcow2: not available ({detail})")
        return {"status": "not available", "detail": detail, "ok": True}
    opts = ["-o", args.qcow2_options] if args.qcow2_options else []
    outs: dict[str, Path | None] = {"qemu-img": work / "qemu.qcow2",
                                    "qcow2kit": work / "kit.qcow2", "dd": None}
    tools = {"qemu-img": [QEMU, "convert", "-O", "qcow2", *opts, str(img),
                          str(outs["qemu-img"])],
             "qcow2kit": [*kit, "convert", "-O", "qcow2", *opts, str(img),
                          str(outs["qcow2kit"])],
             "dd": dd_cmd(img)}
    runs, caches = cold_rotation(tools, outs, args.repeat, work, args.warm, "qcow2", log)
    res: dict[str, Any] = {"status": "measured",
                           "commands": {t: shlex.join(c) for t, c in tools.items()},
                           "runs": runs, "summary": summarize(runs), "cache": sorted(caches)}
    w = {t: res["summary"][t]["wall_s"]["median"] for t in tools}
    res["ratios"] = {"qcow2kit/qemu-img": ratio(w["qcow2kit"], w["qemu-img"]),
                     "qcow2kit/dd": ratio(w["qcow2kit"], w["dd"]),
                     "qemu-img/dd": ratio(w["qemu-img"], w["dd"])}
    wf = {t: res["summary"][t]["wall_plus_flush_s"] for t in ("qemu-img", "qcow2kit")}
    res["ratio_with_flush"] = ratio(wf["qcow2kit"], wf["qemu-img"])
    res["per_rep_ratio"] = per_rep_ratios(runs, "qcow2kit", "qemu-img")
    res["verify"] = {}
    ok = not any(s["failed"] for s in res["summary"].values())
    for t in ("qemu-img", "qcow2kit"):
        o = outs[t]
        assert o is not None
        if not (o.exists() and runs[t][-1]["exit"] == 0):
            res["verify"][t] = {"compare": {"equal": False, "text": "no output"},
                                "check": {"clean": False, "exit": None}}
            ok = False
            continue
        v = {"compare": qemu_compare(img, o, "qcow2"), "check": qemu_check(o),
             "sizes": file_sizes(o)}
        res["verify"][t] = v
        ok &= v["compare"]["equal"] and v["check"].get("clean", False)
        c = v["check"]
        log(f"  qcow2 {t}: compare {'equal' if v['compare']['equal'] else v['compare']['text']}; "
            f"check exit {c['exit']}, leaks {c.get('leaks')}, corruptions "
            f"{c.get('corruptions')}, {cq.fmt(c.get('fragmented_pct'), '.2f')}% fragmented")
        if not args.keep:
            o.unlink(missing_ok=True)
    res["ok"] = ok
    return res


# ---------------------------------------------------------------- part: threads (-m table)

def part_threads(img: Path, work: Path, kit: list[str], args: argparse.Namespace,
                 log: Log) -> dict[str, Any]:
    ref = work / "threads-ref.raw"  # the first good output, which every later one must equal
    rows = []
    ok = True
    for m in args.threads:
        outs: dict[str, Path | None] = {"qemu-img": work / "threads-qemu.raw",
                                        "qcow2kit": work / "threads-kit.raw"}
        tools = {t: ([QEMU] if t == "qemu-img" else kit) + ["convert", "-m", str(m), "-O", "raw",
                                                             str(img), str(o)]
                 for t, o in outs.items()}
        runs, caches = cold_rotation(tools, outs, args.threads_repeat, work, args.warm,
                                     f"-m {m:2d}", log)
        same: dict[str, bool] = {}
        for t, o in outs.items():
            assert o is not None
            if o.exists() and runs[t][-1]["exit"] == 0:
                if not ref.exists():
                    o.rename(ref)
                    same[t] = True
                else:
                    same[t] = ob.cmp_files(ref, o)[0]
            else:
                same[t] = False
            o.unlink(missing_ok=True)
        s = summarize(runs)
        row = {"m": m, "summary": s, "runs": runs, "identical": same, "cache": sorted(caches),
               "ratio": ratio(s["qcow2kit"]["wall_s"]["median"], s["qemu-img"]["wall_s"]["median"])}
        ok &= all(same.values()) and not any(x["failed"] for x in s.values())
        rows.append(row)
    if not args.keep:
        ref.unlink(missing_ok=True)
    return {"commands": {"qemu-img": f"{QEMU} convert -m N -O raw IMG OUT",
                         "qcow2kit": f"{shlex.join(kit)} convert -m N -O raw IMG OUT"},
            "repeat": args.threads_repeat, "rows": rows, "ok": ok,
            "order": "the -m values in turn; for each, the two tools alternating"}


# ---------------------------------------------------------------- part: trace

_READ_RE = re.compile(r"^(\d+\.\d+) (pread64|preadv|preadv2)\((\d+)<([^>]*)>, (.*)\) = (\d+)\s*$")


def parse_strace_reads(prefix: Path, source: str) -> tuple[list[int], list[int]]:
    """Offsets and lengths (bytes returned) of every positioned read of ``source`` in the
    `strace -ff -ttt -y -o PREFIX` files (removed), sorted by the time each syscall was
    entered.  The offset is the last argument (pread64, preadv) or the one before the flags
    (preadv2)."""
    rows = []
    for f in prefix.parent.glob(prefix.name + ".*"):
        with open(f, errors="replace") as fh:
            for line in fh:
                m = _READ_RE.match(line)
                if not m or m.group(4) != source or int(m.group(6)) <= 0:
                    continue
                rest = m.group(5).rsplit(", ", 2)
                offset = rest[-2] if m.group(2) == "preadv2" else rest[-1]
                rows.append((float(m.group(1)), int(offset), int(m.group(6))))
        f.unlink()
    rows.sort()
    return [r[1] for r in rows], [r[2] for r in rows]


def part_trace(img: Path, work: Path, kit: list[str], args: argparse.Namespace,
               log: Log) -> dict[str, Any]:
    import numpy as np

    from qcow2kit.diskmodel import DiskModel
    model = DiskModel()
    out = work / "trace.raw"
    tools = {"qcow2kit (host order)": [*kit, "convert", "-O", "raw", str(img), str(out)],
             "qcow2kit -m 1 (host order)": [*kit, "convert", "-m", "1", "-O", "raw", str(img),
                                            str(out)],
             "qcow2kit --order=guest": [*kit, "convert", "--order=guest", "-O", "raw", str(img),
                                        str(out)],
             "qemu-img": [QEMU, "convert", "-O", "raw", str(img), str(out)]}
    source = str(img.resolve())
    res: dict[str, Any] = {"model": model.as_dict(), "tools": {},
                           "commands": {t: shlex.join(c) for t, c in tools.items()}}
    ok = True
    for t, cmd in tools.items():
        out.unlink(missing_ok=True)
        prefix = work / "strace"
        p = subprocess.run(["strace", "-ff", "-ttt", "-y", "-s", "0", "--seccomp-bpf",
                            "-e", "trace=pread64,preadv,preadv2", "-o", str(prefix), *cmd],
                           capture_output=True, text=True)
        offs, lens = parse_strace_reads(prefix, source)
        out.unlink(missing_ok=True)
        if p.returncode != 0 or not offs:
            ok = False
            res["tools"][t] = {"exit": p.returncode, "error": p.stderr.strip()[-300:]}
            log(f"  trace {t}: FAILED exit {p.returncode}")
            continue
        o = np.asarray(offs, dtype=np.int64)
        n = np.asarray(lens, dtype=np.int64)
        backward = int(np.count_nonzero(o[1:] < o[:-1] + n[:-1])) if len(o) > 1 else 0
        order = np.lexsort((n, o))
        x = {"reads": len(offs), "bytes": int(n.sum()),
             "reads_of_1MiB": int(np.count_nonzero(n == MiB)),
             "reads_of_64KiB": int(np.count_nonzero(n == CLUSTER)),
             "largest": int(n.max()), "backward_steps": backward,
             "model_seconds": model.cost(o, n),
             "model_seconds_sorted": model.cost(o[order], n[order]),
             "sequential_bound_seconds": model.sequential_bound(int(n.sum()))}
        res["tools"][t] = x
        log(f"  trace {t}: {x['reads']:,} reads, {x['bytes'] / MiB:.1f} MiB, "
            f"{backward:,} backward; model {x['model_seconds']:.3f} s in issue order, "
            f"{x['model_seconds_sorted']:.3f} s sorted by offset")
    res["ok"] = ok
    return res


# ---------------------------------------------------------------- report

def fmt_s(s: dict[str, Any]) -> str:
    w = s["wall_s"]
    if w["median"] is None:
        return "FAILED"
    return f"{w['median']:.2f} s [{w['min']:.2f}–{w['max']:.2f}]"


def fx(x: float | None, spec: str = ".2f") -> str:
    return cq.fmt(x, spec, "×")


def _compare_table(L: list[str], x: dict[str, Any], names: dict[str, str]) -> None:
    L.append("| command | wall, median [min–max] | CPU (user+sys) | peak RSS | `sync` after |")
    L.append("|---|---:|---:|---:|---:|")
    for t, label in names.items():
        s = x["summary"][t]
        L.append(f"| {label} | {fmt_s(s)} | {cq.fmt(s['cpu_s'], '.2f', ' s')} | "
                 f"{cq.fmt(s['maxrss_max_mib'], '.1f', ' MiB')} | "
                 f"{cq.fmt(s['flush_s'], '.2f', ' s')} |"
                 + (f" ({s['failed']} FAILED)" if s["failed"] else ""))
    r = x["ratios"]
    pr = x["per_rep_ratio"]
    L.append("")
    L.append(f"Ratios of the medians: qcow2kit/qemu-img **{fx(r['qcow2kit/qemu-img'])}** "
             f"(per repetition {', '.join(f'{v:.2f}' for v in pr) or '-'}; counting the `sync` "
             f"after each run {fx(x['ratio_with_flush'])}), qcow2kit/dd "
             f"{fx(r['qcow2kit/dd'])}, qemu-img/dd {fx(r['qemu-img/dd'])}. "
             f"Cache: {', '.join(x['cache'])}.")


def render_markdown(report: dict[str, Any]) -> str:
    m, v, a = report["machine"], report["versions"], report["args"]
    L: list[str] = []
    size = report["image"]["size"] if report.get("image") else 0
    L.append(f"convert bench (issue 9) — {report['date']}")
    L.append("")
    L.append(f"Command: `{a['command']}`. Machine: {m['nproc']} CPUs ({m['cpu_model']}), "
             f"{m['ram_gib']} GiB RAM, Linux {m['kernel']}; {v['qemu_img']}; Python "
             f"{v['python']}, numpy {v['numpy']}; qcow2kit {v['qcow2kit']} ({v['git']}); "
             f"qcow2kit command `{shlex.join(a['qcow2kit_cmd'])}`; load average at start "
             f"{a['loadavg']}.")
    if report.get("image"):
        b = report["image"]
        L.append("")
        L.append(f"Image: {size / 2**30:g} GiB, {b['data_clusters']:,} data clusters of 64 KiB "
                 f"in random host order (seed {a['seed']}), data in every cluster; "
                 f"{b['disk_bytes'] / MiB:.0f} MiB on disk; built in "
                 f"{sum(b['seconds'].values()):.1f} s.")
    res = report["results"]
    n = a["repeat"]
    if "raw" in res:
        x = res["raw"]
        L.append("")
        L.append(f"### convert -O raw (cold cache, median of {n})")
        L.append("")
        _compare_table(L, x, {"qemu-img": "`qemu-img convert -O raw`",
                              "qcow2kit": "`qcow2kit convert -O raw`",
                              "dd": "`dd if=IMG of=/dev/null bs=1M` (sequential read)"})
        L.append(f"Outputs: cmp qemu-img vs qcow2kit "
                 f"{'identical' if x['identical']['same'] else x['identical']['cmp']}; "
                 f"`qemu-img compare` source vs qcow2kit's "
                 f"{'equal' if x['compare']['equal'] else x['compare']['text']}; fill pattern "
                 f"in qemu-img's output {x['pattern_ok']}.")
    if "qcow2" in res:
        x = res["qcow2"]
        L.append("")
        L.append(f"### convert -O qcow2 (cold cache, median of {n})")
        L.append("")
        if x["status"] != "measured":
            L.append(f"**pending**: `qcow2kit convert -O qcow2` is not available in the code "
                     f"measured ({x['detail']}).")
        else:
            _compare_table(L, x, {"qemu-img": "`qemu-img convert -O qcow2` (`-t unsafe`)",
                                  "qcow2kit": "`qcow2kit convert -O qcow2`",
                                  "dd": "`dd if=IMG of=/dev/null bs=1M` (sequential read)"})
            L.append("")
            L.append("| output | `qemu-img compare` with the source | `qemu-img check` exit | "
                     "leaks / corruptions | fragmented | file size (on disk) |")
            L.append("|---|---|---:|---|---:|---:|")
            for t, vv in x["verify"].items():
                c = vv["check"]
                sz = vv.get("sizes", {})
                L.append(f"| {t} | {'equal' if vv['compare']['equal'] else vv['compare']['text']}"
                         f" | {c.get('exit')} | {c.get('leaks', '-')} / "
                         f"{c.get('corruptions', '-')} | "
                         f"{cq.fmt(c.get('fragmented_pct'), '.2f', '%')} "
                         f"({c.get('fragmented_clusters', '-')} of "
                         f"{c.get('allocated_clusters', '-')} clusters) | "
                         f"{cq.fmt(sz.get('apparent', 0) / MiB, '.1f', ' MiB')} "
                         f"({cq.fmt(sz.get('disk', 0) / MiB, '.1f', ' MiB')}) |")
    if "threads" in res:
        x = res["threads"]
        L.append("")
        L.append(f"### `-m N` (convert -O raw, cold cache, median of {x['repeat']})")
        L.append("")
        L.append("| -m | qemu-img | qcow2kit | qcow2kit / qemu-img | outputs identical |")
        L.append("|---:|---:|---:|---:|---|")
        for row in x["rows"]:
            s = row["summary"]
            L.append(f"| {row['m']} | {fmt_s(s['qemu-img'])} | {fmt_s(s['qcow2kit'])} | "
                     f"{fx(row['ratio'])} | "
                     f"{'yes' if all(row['identical'].values()) else row['identical']} |")
        L.append("")
        L.append(f"Order: {x['order']}.")
    if "model" in res:
        x = res["model"]
        L.append("")
        L.append("### Modelled rotating-disk time of the reads (qcow2kit/diskmodel.py)")
        L.append("")
        if "host" not in x:
            L.append("FAILED: " + ob.last_err(x["runs"][-1]) if x.get("runs") else "FAILED")
        else:
            L.append("From `qcow2kit bench order --output=json --drop-caches IMG` "
                     "(order_bench.part_model): every stored data byte, one read per run of "
                     "host-contiguous clusters of at most 1 MiB, guest order vs host order (the "
                     "plan convert uses); metadata reads not counted.")
            L.append("")
            L.append("| order | requests | MiB | model (7200 rpm) | bench order's cold read here |")
            L.append("|---|---:|---:|---:|---:|")
            for o in ("guest", "host"):
                ms = x[f"measured_{o}_s"]
                L.append(f"| {o} | {x[o]['requests']:,} | {x[o]['bytes'] / MiB:,.0f} | "
                         f"{x[o]['model_seconds']:.3f} s | {cq.fmt(ms['median'], '.2f', ' s')} |")
            L.append(f"| sequential bound | | | {x['sequential_bound_seconds']:.3f} s | |")
            L.append("")
            L.append(f"Modelled speed-up of host order {fx(x['speedup_model'], '.1f')}; "
                     f"host / bound {x['host_over_bound']:.5f}.")
    if "trace" in res:
        x = res["trace"]
        L.append("")
        L.append("### The reads convert really issues (strace), costed by the same model")
        L.append("")
        L.append("One warm-cache run of each under `strace -ff -ttt -y -e "
                 "trace=pread64,preadv,preadv2`; every read of the source file (metadata "
                 "included) in syscall-entry order across threads, costed as one sequence "
                 "(`DiskModel().cost`); 'sorted' is the same reads in offset order (what a "
                 "disk that reorders its whole queue could do). With the default -m 8, eight "
                 "workers take the tasks in host order, but their preads enter the kernel "
                 "slightly out of order (the backward steps), each of which the model charges "
                 "a seek and half a turn; -m 1 shows the plan's order itself.")
        L.append("")
        L.append("| command | reads | MiB | of 1 MiB | of 64 KiB | backward steps | "
                 "model, issue order | model, sorted |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for t, y in x["tools"].items():
            if "reads" not in y:
                L.append(f"| {t} | FAILED (exit {y['exit']}) | | | | | | |")
                continue
            L.append(f"| {t} | {y['reads']:,} | {y['bytes'] / MiB:,.1f} | "
                     f"{y['reads_of_1MiB']:,} | {y['reads_of_64KiB']:,} | "
                     f"{y['backward_steps']:,} | {y['model_seconds']:.3f} s | "
                     f"{y['model_seconds_sorted']:.3f} s |")
    L.append("")
    L.append(f"Overall: {'ok' if not report['failed'] else 'FAILED (see above)'}.")
    return "\n".join(L)


# ---------------------------------------------------------------- main

def parse_skip(text: str) -> set[str]:
    out = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part not in PARTS:
            raise argparse.ArgumentTypeError(f"unknown part {part!r}: choose from "
                                             f"{', '.join(PARTS)}")
        out.add(part)
    return out


def parse_threads(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad list {text!r}") from None
    if not vals or any(not 1 <= v <= 64 for v in vals):
        raise argparse.ArgumentTypeError("-m values must be 1 to 64")
    return vals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=cq.parse_scale, default=fractions.Fraction(1),
                   help="fraction of the 4 GiB image, e.g. 1/64")
    p.add_argument("--repeat", "-n", type=int, default=3, help="runs per command (3)")
    p.add_argument("--threads", type=parse_threads, default=list(DEFAULT_THREADS),
                   help="-m values of the threads part (1,2,4,8,16)")
    p.add_argument("--threads-repeat", type=int, default=None,
                   help="runs per -m value and tool (default: --repeat)")
    p.add_argument("--skip", type=parse_skip, default=set(),
                   help=f"comma-separated parts to leave out: {', '.join(PARTS)}")
    p.add_argument("--qcow2-options", "-o", default="",
                   help="create options given to both converts with -o in the qcow2 part")
    p.add_argument("--warm", action="store_true",
                   help="do not drop the page cache before each run (quick tries, tests)")
    p.add_argument("--workdir", help="directory in which to make the temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the image and outputs")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the report as markdown")
    p.add_argument("--seed", type=int, default=1, help="shuffle seed of the image (1)")
    p.add_argument("--qcow2kit", default=None, help="command that runs qcow2kit (default: the "
                   "qcow2kit script on PATH, else `python -m qcow2kit`)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.threads_repeat is None:
        args.threads_repeat = args.repeat
    if args.threads_repeat < 1:
        p.error("--threads-repeat must be at least 1")
    parts = [x for x in PARTS if x not in args.skip]
    if not parts:
        p.error("--skip leaves nothing to run")
    needs = {"qemu-img": QEMU, "dd": "dd"}
    if "trace" in parts:
        needs["strace"] = "strace"
    for name, exe in needs.items():
        if shutil.which(exe) is None:
            print(f"convert_bench: {name} not found", file=sys.stderr)
            return 2

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    kit = ob.kit_command(args.qcow2kit)
    subs = [["convert"]] + ([["bench", "order"]] if "model" in parts else [])
    for sub in subs:
        ok, detail = ob.available([*kit, *sub])
        if not ok:
            print(f"convert_bench: `{shlex.join([*kit, *sub])}` is not available: {detail}",
                  file=sys.stderr)
            return 2

    size = cq.scaled_size(FULL_SIZE, args.scale, CLUSTER)
    outputs = (2 if "raw" in parts else 0) + (2 if "qcow2" in parts else 0) + \
        (2 if "threads" in parts else 0) + (1 if "trace" in parts else 0)
    need = 256 * MiB + size * (1 + min(outputs, 2))   # outputs are removed part by part
    parent = args.workdir or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need:
        print(f"convert_bench: {parent} has {free / 2**30:.1f} GiB free, needs about "
              f"{need / 2**30:.1f} GiB", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="qcow2kit-convert-", dir=parent))
    log(f"work directory {work}; parts: {', '.join(parts)}")
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "machine": cq.machine_info(), "versions": ob.versions(),
        "args": {"scale": str(args.scale), "repeat": args.repeat, "parts": parts,
                 "threads": args.threads, "threads_repeat": args.threads_repeat,
                 "seed": args.seed, "warm": args.warm, "qcow2_options": args.qcow2_options,
                 "qcow2kit_cmd": kit, "workdir": str(work),
                 "pythonpath": os.environ.get("PYTHONPATH"),
                 "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                 "command": "python -m bench.convert_bench " + shlex.join(
                     sys.argv[1:] if argv is None else argv)},
        "target_ratio": RATIO_TARGET, "image": None, "results": {},
    }
    failed = False
    try:
        img = work / "random-filled.qcow2"
        log(f"building the image: {size / 2**30:g} GiB, data in every cluster ...")
        b = images.make_random_image(img, size, seed=args.seed, cluster_size=CLUSTER,
                                     fill_data=True)
        report["image"] = b.as_dict()
        log(f"  built in {sum(b.seconds.values()):.1f} s ({b.disk_bytes / MiB:.0f} MiB)")
        res = report["results"]
        if "raw" in parts:
            log("raw: convert -O raw against qemu-img and dd ...")
            res["raw"] = part_raw(img, size, work, kit, args, log)
        if "qcow2" in parts:
            log("qcow2: convert -O qcow2 against qemu-img and dd ...")
            res["qcow2"] = part_qcow2(img, work, kit, args, log)
        if "threads" in parts:
            log("threads: -m table ...")
            res["threads"] = part_threads(img, work, kit, args, log)
        if "model" in parts:
            log("model: qcow2kit bench order ...")
            margs = argparse.Namespace(repeat=1)
            x = ob.part_model(img, work, kit, margs, None, log)
            x["ok"] = "host" in x and x["summary"]["failed"] == 0
            res["model"] = x
        if "trace" in parts:
            log("trace: the reads of each convert under strace ...")
            res["trace"] = part_trace(img, work, kit, args, log)
        failed = not all(x.get("ok", False) for x in res.values())
        report["failed"] = failed
        text = render_markdown(report)
        print(text)
        if args.markdown:
            Path(args.markdown).write_text(text + "\n")
            log(f"wrote {args.markdown}")
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
