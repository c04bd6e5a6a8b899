#!/usr/bin/env python3
"""`qemu-img map` against `qcow2kit map`, side by side, on large sparse images built here.

Images (built in a fresh temporary directory, removed at the end unless --keep):
  prealloc  1 TiB, `qemu-img create -o preallocation=metadata`: 16.7 M mapped 64 KiB clusters,
            host order = guest order
  random    256 GiB, the same then every data cluster's host offset shuffled among the L2
            entries (4.19 M extents); `qemu-img check` must pass on it
--scale divides both sizes (e.g. --scale 1/64: 16 GiB and 4 GiB) for a quick try.

For each image, each measurement is repeated --repeat times (median reported), the order of the
two commands alternating between repetitions: each command runs as a child with stdout to a file,
forked by a small launcher process (see LAUNCHER); wall time from fork to reap, peak RSS from
os.wait4's rusage of that child; outputs compared by SHA-256.  Also times the library scanner
(qcow2kit.mapping.map_batches) in a child process, with
no output, in clusters per second.  Prints a table; --json FILE writes every figure with the
machine and the versions.

    python bench/compare_qemu.py --scale 1/64          # quick (seconds)
    python bench/compare_qemu.py --json map.json       # full scale (about 3 minutes with check)
"""
from __future__ import annotations

import argparse
import datetime as dt
import fractions
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import images

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
FULL_SIZES = {"prealloc": images.TiB, "random": 256 * images.GiB}
TARGETS = {  # image -> maximum ratio qcow2kit/qemu-img wall time (and identical output)
    "prealloc": 0.5,
    "random": 1.0,
}
RSS_TARGET_MIB = 100
API_TARGET_CPS = 50e6  # clusters per second, on the prealloc image
QEMU = "qemu-img"
KIT = "qcow2kit"

API_SCAN = r"""
import json, sys, time
t0 = time.perf_counter()
try:
    import qcow2kit
    from qcow2kit.mapping import map_batches
except (ImportError, AttributeError) as e:
    print(json.dumps({"available": False, "error": f"{type(e).__name__}: {e}"}))
    sys.exit(0)
path, memory = sys.argv[1], int(sys.argv[2])
t1 = time.perf_counter()
with qcow2kit.open(path) as img:
    t2 = time.perf_counter()
    extents = batches = covered = 0
    for batch in map_batches(img, start=0, length=None, memory=memory):
        batches += 1
        extents += len(batch)
        if batch.dtype.names and "length" in batch.dtype.names:
            covered += int(batch["length"].sum())
    t3 = time.perf_counter()
    size, cs = img.size, img.cluster_size
print(json.dumps({"available": True, "import_s": t1 - t0, "open_s": t2 - t1, "scan_s": t3 - t2,
                  "batches": batches, "extents": extents, "covered_bytes": covered,
                  "size": size, "cluster_size": cs}))
"""


# ---------------------------------------------------------------- measuring children

# Linux charges a child's ru_maxrss with the high-water RSS of the memory it had before exec,
# which for a fork (or vfork, as subprocess uses) of this process is *this* process's peak (tens to
# hundreds of MiB after numpy and the image builders).  So each measured command is forked by a
# fresh, small launcher (python -I -S, ~7 MiB), which times it from fork to reap and reports
# os.wait4's rusage of that child alone.
LAUNCHER = r"""
import os, sys, time
out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
err = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
null = os.open(os.devnull, os.O_RDONLY)
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.dup2(null, 0); os.dup2(out, 1); os.dup2(err, 2)
        os.execvp(sys.argv[3], sys.argv[3:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
t1 = time.perf_counter()
print(t1 - t0, ru.ru_maxrss, ru.ru_utime, ru.ru_stime, os.waitstatus_to_exitcode(status))
"""


def run_child(cmd: list[str], stdout_path: Path, stderr_path: Path) -> dict[str, Any]:
    """Run ``cmd`` with stdout/stderr to files, through LAUNCHER: wall time fork->reap and the
    command's own peak RSS from os.wait4."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, str(stdout_path),
                        str(stderr_path), *cmd], capture_output=True, text=True)
    outer = time.perf_counter() - t0
    try:
        wall, rss_kib, utime, stime, code = p.stdout.split()
    except ValueError:
        raise RuntimeError(f"launcher failed (exit {p.returncode}): {p.stderr.strip()}") from None
    return {"wall_s": float(wall), "maxrss_mib": int(rss_kib) / 1024,  # Linux: KiB
            "user_s": float(utime), "sys_s": float(stime), "exit": int(code),
            "launcher_wall_s": outer,
            "stderr": stderr_path.read_text(errors="replace")[-2000:].strip()}


def digest(path: Path) -> tuple[str, int, int]:
    """(sha256 hex, number of lines, bytes) of a file, streamed."""
    h = hashlib.sha256()
    lines = size = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
            lines += chunk.count(b"\n")
            size += len(chunk)
    return h.hexdigest(), lines, size


def tool_available(cmd: list[str]) -> tuple[bool, str]:
    try:
        p = subprocess.run([*cmd, "map", "--help"], capture_output=True, text=True, timeout=60)
    except OSError as e:
        return False, str(e)
    text = (p.stderr or p.stdout).strip()
    return p.returncode == 0, text.splitlines()[-1] if text else f"exit {p.returncode}"


# ---------------------------------------------------------------- environment

def first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except OSError as e:
        return f"unavailable ({e})"
    return out.strip().splitlines()[0] if out.strip() else ""


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
            "cpu_model": cpu, "ram_bytes": ram, "ram_gib": round(ram / 2**30, 1),
            "kernel": platform.release()}


def versions() -> dict[str, Any]:
    import numpy
    v: dict[str, Any] = {"qemu_img": first_line([QEMU, "--version"]),
                         "python": platform.python_version(), "numpy": numpy.__version__}
    try:
        import qcow2kit
        v["qcow2kit"] = getattr(qcow2kit, "__version__", "?")
    except ImportError:
        v["qcow2kit"] = None
    commit = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "-C", str(REPO), "status", "--porcelain", "--", "qcow2kit"])
    v["git"] = commit + ("+dirty" if dirty else "")
    return v


# ---------------------------------------------------------------- the benchmark

def parse_scale(text: str) -> fractions.Fraction:
    try:
        f = fractions.Fraction(text)
    except (ValueError, ZeroDivisionError) as e:
        raise argparse.ArgumentTypeError(f"bad scale {text!r}: {e}") from None
    if not 0 < f <= 1:
        raise argparse.ArgumentTypeError("scale must be in (0, 1]")
    return f


def scaled_size(full: int, scale: fractions.Fraction, cluster_size: int) -> int:
    size = int(full * scale) // cluster_size * cluster_size
    return max(size, cluster_size)


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["exit"] == 0]
    return {
        "runs": len(runs), "failed": len(runs) - len(ok),
        "wall_s": median([r["wall_s"] for r in ok]),
        "wall_min_s": min((r["wall_s"] for r in ok), default=None),
        "wall_max_s": max((r["wall_s"] for r in ok), default=None),
        "maxrss_mib": median([r["maxrss_mib"] for r in ok]),
        "maxrss_max_mib": max((r["maxrss_mib"] for r in ok), default=None),
        "cpu_s": median([r["user_s"] + r["sys_s"] for r in ok]),
        "sha256": ok[0]["sha256"] if ok else None,
        "lines": ok[0]["lines"] if ok else None,
        "bytes": ok[0]["bytes"] if ok else None,
        "stable": len({r["sha256"] for r in ok}) <= 1,
    }


def bench_image(name: str, path: Path, work: Path, tools: dict[str, list[str]],
                api: bool, args: argparse.Namespace, log) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    api_runs: list[dict[str, Any]] = []
    order = list(tools)
    for rep in range(args.repeat):
        for tool in (order if rep % 2 == 0 else order[::-1]):
            out = work / f"map-{name}-{tool}.json"
            r = run_child([*tools[tool], "map", "--output=json", str(path)], out,
                          work / f"map-{name}-{tool}.err")
            if r["exit"] == 0:
                r["sha256"], r["lines"], r["bytes"] = digest(out)
            runs[tool].append(r)
            log(f"  {name} #{rep + 1} {tool:9s} {r['wall_s']:8.3f} s "
                f"{r['maxrss_mib']:7.1f} MiB  exit {r['exit']}"
                + (f"  {r['stderr'].splitlines()[-1]}" if r["exit"] and r["stderr"] else ""))
        if api:
            r = run_child([sys.executable, "-c", API_SCAN, str(path), str(args.memory)],
                          work / "api.out", work / "api.err")
            try:
                r.update(json.loads((work / "api.out").read_text()))
            except ValueError:
                r["available"] = False
                r["error"] = r["stderr"].splitlines()[-1] if r["stderr"] else "no output"
            api_runs.append(r)
            if not r.get("available") or r["exit"]:
                log(f"  {name} API scan unavailable: {r.get('error') or r['stderr'][-300:]}")
                api = False
            else:
                log(f"  {name} #{rep + 1} API scan {r['scan_s']:8.3f} s "
                    f"{r['maxrss_mib']:7.1f} MiB")
    res: dict[str, Any] = {"runs": runs, "summary": {t: summarize(runs[t]) for t in runs}}
    ok_api = [r for r in api_runs if r.get("available") and r["exit"] == 0]
    if ok_api:
        r0 = ok_api[0]
        covered = r0["covered_bytes"] or r0["size"]
        clusters = -(-covered // r0["cluster_size"])
        scan = median([r["scan_s"] for r in ok_api])
        res["api"] = {"available": True, "scan_s": scan,
                      "wall_s": median([r["wall_s"] for r in ok_api]),
                      "maxrss_mib": median([r["maxrss_mib"] for r in ok_api]),
                      "clusters": clusters, "extents": r0["extents"], "batches": r0["batches"],
                      "covered_bytes": r0["covered_bytes"], "memory": args.memory,
                      "clusters_per_s": clusters / scan if scan else None}
    else:
        res["api"] = {"available": False,
                      "error": api_runs[-1].get("error") if api_runs else "not run"}
    res["api_runs"] = api_runs
    q, k = res["summary"].get(QEMU), res["summary"].get(KIT)
    if q and k and q["wall_s"] and k["wall_s"]:
        res["ratio"] = k["wall_s"] / q["wall_s"]
        res["cpu_ratio"] = k["cpu_s"] / q["cpu_s"] if q["cpu_s"] else None
        res["identical"] = (k["failed"] == 0 and q["failed"] == 0 and q["stable"]
                            and k["stable"] and k["sha256"] == q["sha256"])
    else:
        res["ratio"] = res["cpu_ratio"] = None
        res["identical"] = None
    return res


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each 'met', 'MISSED' or 'pending' (qcow2kit part not available)."""
    out = []

    def add(what: str, target: str, value: str, ok: bool | None, failed: bool = False) -> None:
        status = ("FAILED" if failed else "pending" if ok is None else
                  "met" if ok else "MISSED")
        out.append({"what": what, "target": target, "value": value, "status": status})

    for name, limit in TARGETS.items():
        if name not in results:
            continue
        r = results[name]
        ratio, same = r["ratio"], r["identical"]
        kit = r["summary"].get(KIT)
        add(f"{name}: qcow2kit/qemu-img time, output", f"<= {limit:.1f}x, identical",
            "-" if ratio is None else f"{ratio:.2f}x, {'identical' if same else 'DIFFERENT'}",
            None if ratio is None else (ratio <= limit and bool(same)),
            failed=bool(kit and kit["failed"] == kit["runs"]))
    for name, r in results.items():
        for tool in (QEMU, KIT):
            s = r["summary"].get(tool)
            rss = s["maxrss_max_mib"] if s else None
            add(f"{name}: {tool} peak RSS", f"<= {RSS_TARGET_MIB} MiB",
                "-" if rss is None else f"{rss:.1f} MiB",
                None if rss is None else rss <= RSS_TARGET_MIB,
                failed=bool(s and s["failed"] == s["runs"]))
    if "prealloc" in results:
        a = results["prealloc"]["api"]
        cps = a.get("clusters_per_s")
        add("prealloc: API scan (map_batches)", f">= {API_TARGET_CPS / 1e6:.0f} M clusters/s",
            "-" if cps is None else f"{cps / 1e6:.1f} M clusters/s",
            None if cps is None else cps >= API_TARGET_CPS)
    return out


# ---------------------------------------------------------------- report

def fmt(x: float | None, spec: str = ".3f", unit: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


def render(report: dict[str, Any]) -> str:
    L = []
    m, v = report["machine"], report["versions"]
    L.append(f"qcow2kit map vs qemu-img map -- {report['date']}")
    L.append(f"machine: {m['nproc']} CPUs, {m['cpu_model']}, {m['ram_gib']} GiB RAM; "
             f"{v['qemu_img']}; Python {v['python']}, numpy {v['numpy']}, "
             f"qcow2kit {v['qcow2kit']} ({v['git']})")
    L.append(f"scale {report['args']['scale']}, median of {report['args']['repeat']} runs "
             f"(order alternating), warm page cache")
    L.append("")
    L.append("images:")
    for name, img in report["images"].items():
        b = img["build"]
        secs = ", ".join(f"{k} {v:.2f} s" for k, v in b["seconds"].items())
        chk = img.get("check")
        chk_s = ("check skipped" if chk is None else
                 f"qemu-img check exit {chk['exit']} in {chk['seconds']:.1f} s")
        L.append(f"  {name:9s} {b['size'] / 2**30:10.2f} GiB  {b['data_clusters']:>10,} clusters"
                 f"  disk {b['disk_bytes'] / MiB:7.1f} MiB  build: {secs}; {chk_s}")
    L.append("")
    hdr = (f"  {'image':9s} {'tool':9s} {'wall s':>9s} {'min':>8s} {'max':>8s} "
           f"{'cpu s':>8s} {'RSS MiB':>8s} {'lines':>10s} {'out MiB':>8s}  sha256")
    L.append("map --output=json:")
    L.append(hdr)
    for name, r in report["results"].items():
        for tool, s in r["summary"].items():
            L.append(f"  {name:9s} {tool:9s} {fmt(s['wall_s']):>9s} {fmt(s['wall_min_s']):>8s} "
                     f"{fmt(s['wall_max_s']):>8s} {fmt(s['cpu_s']):>8s} "
                     f"{fmt(s['maxrss_max_mib'], '.1f'):>8s} "
                     f"{'-' if s['lines'] is None else format(s['lines'], ','):>10s} "
                     f"{fmt(None if s['bytes'] is None else s['bytes'] / MiB, '.1f'):>8s}  "
                     f"{(s['sha256'] or '-')[:16]}"
                     + ("" if s["failed"] == 0 else f"  ({s['failed']} FAILED)"))
        if KIT not in r["summary"]:
            L.append(f"  {name:9s} {KIT:9s} pending ({report['qcow2kit_map']['detail']})")
        if r["ratio"] is not None:
            L.append(f"  {name:9s} ratio qcow2kit/qemu-img {r['ratio']:.2f}x wall, "
                     f"{fmt(r['cpu_ratio'], '.2f', 'x')} CPU; outputs "
                     f"{'identical' if r['identical'] else 'DIFFERENT'}")
    L.append("")
    L.append("API scan (qcow2kit.mapping.map_batches, no output, in a child process):")
    for name, r in report["results"].items():
        a = r["api"]
        if a.get("available"):
            L.append(f"  {name:9s} scan {a['scan_s']:.3f} s, {a['clusters']:,} clusters, "
                     f"{a['clusters_per_s'] / 1e6:.1f} M clusters/s, {a['extents']:,} extents "
                     f"in {a['batches']} batches, child {a['wall_s']:.3f} s, "
                     f"RSS {a['maxrss_mib']:.1f} MiB (memory={a['memory']})")
        else:
            L.append(f"  {name:9s} pending ({a.get('error')})")
    L.append("")
    note = "" if report["args"]["scale"] == "1" else "  (targets are set for scale 1)"
    L.append("targets:" + note)
    for t in report["targets"]:
        L.append(f"  {t['status']:8s} {t['what']}: {t['value']} (target {t['target']})")
    return "\n".join(L)


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=parse_scale, default=fractions.Fraction(1),
                   help="fraction of the full sizes (1 TiB, 256 GiB), e.g. 1/64 (default 1)")
    p.add_argument("--repeat", "-n", type=int, default=3, help="runs per measurement (3)")
    p.add_argument("--images", default="prealloc,random",
                   help="comma-separated subset of prealloc,random (default both)")
    p.add_argument("--workdir", help="directory in which to make the temporary directory "
                   "(default: the system's temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the images and map outputs")
    p.add_argument("--skip-check", action="store_true",
                   help="skip `qemu-img check` of the built images (takes ~90 s on the full "
                   "random image)")
    p.add_argument("--seed", type=int, default=1, help="shuffle seed of the random image (1)")
    p.add_argument("--qcow2kit", default=None,
                   help="command that runs qcow2kit (default: the qcow2kit script on PATH, "
                   "else `python -m qcow2kit`)")
    p.add_argument("--memory", type=int, default=32 << 20,
                   help="memory budget in bytes passed to map_batches (32 MiB)")
    p.add_argument("--no-api", action="store_true", help="skip the API scan")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)

    names = [n.strip() for n in args.images.split(",") if n.strip()]
    bad = [n for n in names if n not in FULL_SIZES]
    if bad or not names:
        p.error(f"--images: unknown {bad}, choose from {list(FULL_SIZES)}")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if shutil.which(QEMU) is None:
        print("compare_qemu: qemu-img not found (apt-get install qemu-utils)", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    kit_exe = shutil.which("qcow2kit")
    kit_cmd = (shlex.split(args.qcow2kit) if args.qcow2kit else
               [kit_exe] if kit_exe else [sys.executable, "-m", "qcow2kit"])
    kit_ok, kit_detail = tool_available(kit_cmd)
    tools = {QEMU: [QEMU]}
    if kit_ok:
        tools[KIT] = kit_cmd
        kit_detail = "available"
    else:
        kit_detail = f"`{shlex.join(kit_cmd)} map` not available yet: {kit_detail}"
    log(f"qcow2kit map: {kit_detail}")

    cs = 65536
    sizes = {n: scaled_size(FULL_SIZES[n], args.scale, cs) for n in names}
    parent = args.workdir or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    # metadata (L2 8 B + refcount 2 B per cluster, plus slack) and the map outputs (~125 B per
    # extent per tool for the random image)
    need = sum(s // cs * 12 + 64 * MiB for s in sizes.values())
    need += sizes.get("random", 0) // cs * 130 * len(tools) + 256 * MiB
    free = shutil.disk_usage(parent).free
    if free < need:
        print(f"compare_qemu: {parent} has {free / 2**30:.1f} GiB free, needs about "
              f"{need / 2**30:.1f} GiB", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="qcow2kit-bench-", dir=parent))
    log(f"work directory {work} ({free / 2**30:.1f} GiB free, needs about "
        f"{need / 2**30:.2f} GiB)")

    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(), "versions": versions(),
        "args": {"scale": str(args.scale), "repeat": args.repeat, "images": names,
                 "seed": args.seed, "memory": args.memory, "skip_check": args.skip_check,
                 "qcow2kit_cmd": kit_cmd, "workdir": str(work)},
        "qcow2kit_map": {"available": kit_ok, "detail": kit_detail},
        "images": {}, "results": {},
    }
    failed = False
    try:
        for name in names:
            path = work / f"{name}.qcow2"
            log(f"building {name}: {sizes[name] / 2**30:g} GiB ...")
            if name == "prealloc":
                b = images.make_prealloc_image(path, sizes[name], cluster_size=cs)
            else:
                b = images.make_random_image(path, sizes[name], seed=args.seed, cluster_size=cs)
            entry: dict[str, Any] = {"build": b.as_dict(), "check": None}
            log(f"  built in {sum(b.seconds.values()):.2f} s ({b.seconds}), "
                f"{b.disk_bytes / MiB:.1f} MiB on disk")
            if not args.skip_check:
                log(f"  qemu-img check {name} ...")
                rc, secs, text = images.qemu_img_check(path)
                entry["check"] = {"exit": rc, "seconds": secs, "output": text}
                log(f"  check exit {rc} in {secs:.1f} s")
                if rc != 0:
                    print(f"compare_qemu: qemu-img check failed on {path} (exit {rc}):\n{text}",
                          file=sys.stderr)
                    failed = True
            report["images"][name] = entry
            report["results"][name] = bench_image(name, path, work, tools,
                                                  not args.no_api, args, log)
            if any(s["failed"] for s in report["results"][name]["summary"].values()):
                failed = True
            if not args.keep:
                for f in work.glob(f"map-{name}-*"):
                    f.unlink()
        report["targets"] = evaluate_targets(report["results"])
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
