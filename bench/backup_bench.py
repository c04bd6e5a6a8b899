"""backup (issue 10): an incremental backup against a full one of the same image, one run.

The image: 64 GiB of virtual size (``--scale`` for a fraction), data in the first
``--data-percent`` (25 by default) of every GiB, written by qemu-io as large pattern
writes (one command per GiB: fast, and the file stays sparse); then a persistent bitmap
(`qemu-img bitmap --add`), then 1% of the disk's clusters (``--dirty-percent``), chosen at
random over the whole disk, written by one qemu-io run (64 KiB each): QEMU marks them in
the bitmap.  The package is byte-compiled first (``compileall``, as an installed package
is; else, under PYTHONDONTWRITEBYTECODE, every run would compile its modules again).
Then, each from a cold page cache (unless ``--warm``; dropping it needs root),
``qcow2kit backup SRC full.qcow2`` and ``qcow2kit backup --bitmap b0 --base full.qcow2
SRC inc.qcow2`` are timed, ``-n`` times each, the order alternating; the
incremental overlay is compared to the source with qemu-img compare (the chain), and one
more incremental run in this process reports the bytes it read from the source (the I/O
count), which must equal the data in the dirty clusters.  Target: incremental at most
0.05x the time of the full backup.  The images live in a temporary directory under
``--workdir`` (default /tmp) and are removed at the end.

    python -m bench.backup_bench [--workdir /tmp] [-n 1] [--scale 1/16] [--json F] [--markdown F]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import compare_qemu as cq
from bench import order_bench as ob

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = 64 << 10
TARGET_RATIO = 0.05


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_source(path: Path, size: int, data_percent: float, dirty_percent: float,
                 seed: int) -> dict[str, Any]:
    """The source image, its bitmap and the dirty clusters (see the module docstring)."""
    t0 = time.perf_counter()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"cluster_size={CLUSTER}", str(path), str(size)], check=True)
    gib = 1 << 30
    chunk = max(CLUSTER, int(min(gib, size) * data_percent / 100) // CLUSTER * CLUSTER)
    cmds = []
    for k, base in enumerate(range(0, size, gib)):
        n = min(chunk, size - base)
        cmds += ["-c", f"write -P {1 + k % 250} {base} {n}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True,
                   stdout=subprocess.DEVNULL)
    data_bytes = sum(min(chunk, size - base) for base in range(0, size, gib))
    t1 = time.perf_counter()
    subprocess.run(["qemu-img", "bitmap", "--add", str(path), "b0"], check=True)
    clusters = size // CLUSTER
    rng = random.Random(seed)
    dirty = sorted(rng.sample(range(clusters), max(1, int(clusters * dirty_percent / 100))))
    cmds = []
    for c in dirty:
        cmds += ["-c", f"write -P {rng.randrange(1, 256)} {c * CLUSTER} {CLUSTER}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True,
                   stdout=subprocess.DEVNULL)
    t2 = time.perf_counter()
    return {"virtual_bytes": size, "base_data_bytes": data_bytes, "dirty_clusters": len(dirty),
            "dirty_bytes": len(dirty) * CLUSTER, "file_bytes": path.stat().st_size,
            "build_data_s": round(t1 - t0, 2), "build_dirty_s": round(t2 - t1, 2)}


def io_count(src: Path, base: Path, work: Path) -> dict[str, Any]:
    """One more incremental backup, in this process: the bytes it read from the source."""
    from qcow2kit.backup import backup
    from qcow2kit.image import Image

    out = work / "inc-count.qcow2"
    with Image.open(src) as img:
        r = backup(img, out, bitmap="b0", base=base, sync="incremental")
    out.unlink()
    return {"read_bytes": r.copy.read_bytes, "pending_bytes": r.plan.dirty_bytes,
            "reads": r.copy.reads}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp", help="where the temporary directory goes")
    p.add_argument("-n", "--repeat", type=int, default=1, help="runs of each backup (1)")
    p.add_argument("--scale", default="1", help="fraction of the 64 GiB image, e.g. 1/16")
    p.add_argument("--data-percent", type=float, default=25.0,
                   help="percent of each GiB that holds data before the bitmap (25)")
    p.add_argument("--dirty-percent", type=float, default=1.0,
                   help="percent of the disk's clusters written after the bitmap (1)")
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--warm", action="store_true", help="do not drop the page cache")
    p.add_argument("--no-compare", action="store_true", help="skip qemu-img compare")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--markdown", metavar="FILE")
    args = p.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    size = cq.scaled_size(64 << 30, cq.parse_scale(args.scale), CLUSTER)
    work = Path(tempfile.mkdtemp(prefix="qcow2kit-backup-", dir=args.workdir))
    kit = [sys.executable, "-m", "qcow2kit"]
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "qcow2kit")],
                   check=True, stdout=subprocess.DEVNULL)
    try:
        src = work / "disk.qcow2"
        log(f"building the {size >> 30} GiB source ({args.data_percent}% data, "
            f"{args.dirty_percent}% of the clusters dirty) ...")
        image = build_source(src, size, args.data_percent, args.dirty_percent, args.seed)
        log(f"  {json.dumps(image)}")
        full, inc = work / "full.qcow2", work / "inc.qcow2"
        tools = {"full": [*kit, "backup", str(src), str(full)],
                 "incremental": [*kit, "backup", "--bitmap", "b0", "--base", str(full),
                                 str(src), str(inc)]}
        runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
        caches: set[str] = set()
        for rep in range(args.repeat):
            for name in ("full", "incremental"):
                # the incremental needs its base: the full backup of this repetition
                out = full if name == "full" else inc
                if name == "full":
                    inc.unlink(missing_ok=True)
                    full.unlink(missing_ok=True)
                caches.add("warm" if args.warm else ob.drop_caches())
                r = ob.run(tools[name], work / f"{name}.out", work / f"{name}.err")
                t = time.perf_counter()
                os.sync()
                r["flush_s"] = time.perf_counter() - t
                r["stdout"] = (work / f"{name}.out").read_text().strip()
                r["target_bytes"] = out.stat().st_size if out.exists() else None
                runs[name].append(r)
                log(f"  #{rep + 1} {name:12s} {r['wall_s']:8.2f} s (+ sync {r['flush_s']:.2f} s) "
                    f"cpu {r['user_s'] + r['sys_s']:6.2f} s {r['maxrss_mib']:7.1f} MiB "
                    f"exit {r['exit']} {ob.last_err(r) if r['exit'] else r['stdout']}")
        compare = None
        if not args.no_compare:
            c = subprocess.run(["qemu-img", "compare", str(inc), str(src)], capture_output=True,
                               text=True)
            compare = {"exit": c.returncode, "out": (c.stdout + c.stderr).strip()}
            log(f"  qemu-img compare inc.qcow2 disk.qcow2: {compare['out']}")
        count = io_count(src, full, work)
        log(f"  I/O count of an incremental run: {json.dumps(count)}")
        summ = {t: ob.summary(rs) for t, rs in runs.items()}
        f_s, i_s = summ["full"]["wall_s"]["median"], summ["incremental"]["wall_s"]["median"]
        ratio = i_s / f_s if f_s and i_s else None
        report: dict[str, Any] = {
            "image": image, "repeat": args.repeat, "cache": sorted(caches), "runs": runs,
            "summary": summ, "ratio": ratio, "target_ratio": TARGET_RATIO,
            "met": ratio is not None and ratio <= TARGET_RATIO, "compare": compare,
            "io_count": count, "versions": cq.versions(), "machine": cq.machine_info()}
        md = render(report)
        print(md)
        if args.markdown:
            Path(args.markdown).write_text(md)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        return 0 if all(r["exit"] == 0 for rs in runs.values() for r in rs) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(report: dict[str, Any]) -> str:
    im = report["image"]
    gib, mib = 1 << 30, 1 << 20
    lines = [f"{im['virtual_bytes'] / gib:.0f} GiB image, {im['base_data_bytes'] / gib:.1f} GiB "
             f"of data before the bitmap, {im['dirty_clusters']} clusters of 64 KiB dirty "
             f"({im['dirty_bytes'] / mib:.0f} MiB, at random); cache "
             f"{', '.join(report['cache'])}, median of {report['repeat']}", "",
             "| backup | wall, median | + sync | CPU (user+sys) | peak RSS | target file |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, s in report["summary"].items():
        rs = [r for r in report["runs"][name] if r["exit"] == 0]
        flush = cq.median([r["flush_s"] for r in rs])
        size = rs[-1]["target_bytes"] if rs else None
        lines.append(f"| {name} | {s['wall_s']['median']:.2f} s | {flush or 0:.2f} s | "
                     f"{s['cpu_s'] or 0:.2f} s | {s['maxrss_mib'] or 0:.0f} MiB | "
                     f"{(size or 0) / mib:.0f} MiB |")
    r = report["ratio"]
    c = report["io_count"]
    lines += ["", f"incremental / full: **{r:.3f}x** (target <= {report['target_ratio']}x: "
              f"{'met' if report['met'] else 'missed'})" if r is not None else "no ratio",
              f"I/O count of an incremental run: {c['read_bytes']} bytes read in {c['reads']} "
              f"reads for {c['pending_bytes']} bytes of dirty clusters",
              f"qemu-img compare inc.qcow2 (chain) disk.qcow2: "
              f"{(report['compare'] or {}).get('out', 'skipped')}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
