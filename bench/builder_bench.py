"""Building a qcow2 image from a raw file: qcow2kit's ImageBuilder against `qemu-img convert`.

    python -m bench.builder_bench                    # 4 GiB (about 15 GiB of temporary files)
    python -m bench.builder_bench --size 1G          # quicker
    python -m bench.builder_bench --json build.json

Writes a raw file of --size (pseudo-random clusters, every 8th cluster all zeros) in a fresh
temporary directory (under --workdir if given, removed unless --keep), then, --repeat times,
alternating the order, each to a new file: `qcow2kit.builder.build_from_raw` in a child Python
process with cache="unsafe" (no fsync, the order of the writes kept) and `qemu-img convert -O
qcow2` of the same file (its defaults: zero detection, cache=unsafe: no flush at all); the
builder with cache="writeback" (an fsync at each checkpoint step) and `qemu-img convert -t
writeback`; and `dd bs=8M` of the raw file (the floor: the same bytes read and written, no
metadata, no zero detection).  `sync` before each run; wall time from start to exit of the
child, and its CPU time (user + system, from wait4).  Then `qemu-img check` of the four
images (must exit 0) and `qemu-img compare` of each with the raw file (must be equal), and
prints the medians and the ratios builder/qemu-img at the same cache mode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qcow2kit.create import parse_image_size

CLUSTER = 65536
CHUNK = 8 << 20


def make_raw(path: Path, size: int) -> None:
    words = CHUNK // 8
    base = np.arange(words, dtype=np.uint64)
    with open(path, "wb") as f:
        for i, off in enumerate(range(0, size, CHUNK)):
            w = base + np.uint64(i * words + 1)
            with np.errstate(over="ignore"):
                w *= np.uint64(0x9E3779B97F4A7C15)
                w ^= w >> np.uint64(31)
            w.reshape(-1, CLUSTER // 8)[::8] = 0
            f.write(w.tobytes()[:size - off])


def _builder(out: Path, raw: Path, cache: str) -> list[str]:
    return [sys.executable, "-c",
            "import sys; from qcow2kit.builder import build_from_raw; "
            "build_from_raw(sys.argv[1], sys.argv[2], cache=sys.argv[3])", str(out), str(raw), cache]


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run of ``cmd``, after a ``sync``."""
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return wall, usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    size = parse_image_size(args.size)[0]
    d = Path(tempfile.mkdtemp(prefix="builder-bench-", dir=args.workdir))
    try:
        raw = d / "src.raw"
        make_raw(raw, size)
        runs_spec = {
            # name: (command, output file)
            "builder -t unsafe": (_builder(d / "builder-unsafe.qcow2", raw, "unsafe"),
                                  d / "builder-unsafe.qcow2"),
            "qemu-img convert": (["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
                                  str(d / "qemu.qcow2")], d / "qemu.qcow2"),
            "builder -t writeback": (_builder(d / "builder-wb.qcow2", raw, "writeback"),
                                     d / "builder-wb.qcow2"),
            "qemu-img convert -t writeback": (["qemu-img", "convert", "-t", "writeback", "-f", "raw",
                                               "-O", "qcow2", str(raw), str(d / "qemu-wb.qcow2")],
                                              d / "qemu-wb.qcow2"),
            "dd (read + write, the floor)": (["dd", f"if={raw}", f"of={d / 'copy.raw'}", "bs=8M",
                                              "status=none"], d / "copy.raw"),
        }
        times: dict[str, list[float]] = {k: [] for k in runs_spec}
        cpu: dict[str, list[float]] = {k: [] for k in runs_spec}
        names = list(runs_spec)
        for r in range(args.repeat):
            for name in (names if r % 2 == 0 else names[::-1]):
                cmd, out = runs_spec[name]
                out.unlink(missing_ok=True)
                wall, used = timed(cmd)
                times[name].append(wall)
                cpu[name].append(used)
        checks = {}
        for name, (_, img) in runs_spec.items():
            if name.startswith("dd"):
                continue
            chk = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
            cmp = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(img),
                                  str(raw)], capture_output=True, text=True)
            checks[name] = {"check_exit": chk.returncode, "compare_exit": cmp.returncode,
                            "check": chk.stdout.strip().splitlines()[-2:],
                            "file_bytes": img.stat().st_size}
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["builder -t unsafe"] / med["qemu-img convert"]
        ratio_wb = med["builder -t writeback"] / med["qemu-img convert -t writeback"]
        print(f"raw file: {size} bytes, 64 KiB clusters, 1/8 of them zero; {args.repeat} runs each")
        for k in times:
            c = checks.get(k)
            verdict = (f"  check exit {c['check_exit']}, compare exit {c['compare_exit']}"
                       f"  {c['check'][0] if c['check'] else ''}") if c else ""
            print(f"{k:32} median {med[k]:7.2f} s  runs {', '.join(f'{t:.2f}' for t in times[k])}"
                  f"  CPU median {statistics.median(cpu[k]):6.2f} s" + verdict)
        print(f"builder / qemu-img convert, both cache=unsafe (no flush): {ratio:.2f}x; "
              f"both cache=writeback (flushed): {ratio_wb:.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "size": size, "times": times, "cpu": cpu, "median": med, "ratio": ratio,
                "ratio_writeback": ratio_wb,
                "checks": checks,
                "machine": platform.platform(), "cpus": os.cpu_count(),
                "qemu_img": subprocess.run(["qemu-img", "--version"], capture_output=True,
                                           text=True).stdout.splitlines()[0]}, indent=2))
        ok = all(c["check_exit"] == 0 and c["compare_exit"] == 0 for c in checks.values())
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
