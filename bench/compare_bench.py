"""compare (issue 11): ``qcow2kit compare`` against ``qemu-img compare``.

One run, cold cache before every command (unless --warm), the order alternating, on the
random-layout image of the other benchmarks (4 GiB, 65,536 clusters of 64 KiB in random
host order, data in every cluster; ``--scale`` for a fraction of it) against its raw
conversion (``qemu-img convert -O raw``).  qemu-img compare reads both images in guest
order, 2 MiB at a time; qcow2kit reads them window by window, the qcow2 image in host
order with the block-copy engine, the raw file front to back.  Both must say "Images
are identical." (checked on every run), and both must find the same mismatch once a
byte of the raw file is changed (checked once after the timed runs).

    python -m bench.compare_bench --workdir /tmp -n 3 [--markdown FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import compare_qemu as cq
from bench import images
from bench import order_bench as ob
from bench.convert_bench import (cold_rotation, per_rep_ratios, ratio, summarize, wall_table,
                                  write_report)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="where the temporary directory goes")
    p.add_argument("-n", "--repeat", type=int, default=3, help="runs per command (3)")
    p.add_argument("--scale", default="1", help="fraction of the 4 GiB image, e.g. 1/64")
    p.add_argument("--warm", action="store_true", help="do not drop the page cache")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--markdown", metavar="FILE")
    args = p.parse_args(argv)
    size = cq.scaled_size(4 << 30, cq.parse_scale(args.scale), 65536)
    work = Path(tempfile.mkdtemp(prefix="qcow2kit-compare-", dir=args.workdir))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        img = work / "random-filled.qcow2"
        raw = work / "random-filled.raw"
        log(f"building {size >> 20} MiB random-layout image and its raw conversion ...")
        images.make_random_image(img, size, fill_data=True)
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(raw)], check=True)
        kit = ob.kit_command(None)
        tools = {"qemu-img": ["qemu-img", "compare", str(img), str(raw)],
                 "qcow2kit": [*kit, "compare", str(img), str(raw)]}
        runs, caches = cold_rotation(tools, {}, args.repeat, work, args.warm, "compare", log)
        summ = summarize(runs)
        identical = all(r["exit"] == 0 for rs in runs.values() for r in rs)
        # one byte changed three quarters in: both must name the same sector
        spot = size * 3 // 4 + 12345
        fd = os.open(raw, os.O_RDWR)
        try:
            old = os.pread(fd, 1, spot)
            os.pwrite(fd, bytes([old[0] ^ 1]), spot)
        finally:
            os.close(fd)
        said = {name: subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
                for name, cmd in tools.items()}
        same_mismatch = said["qemu-img"] == said["qcow2kit"] != ""
        report: dict[str, Any] = {
            "image_bytes": size, "repeat": args.repeat, "cache": sorted(caches),
            "summary": summ, "runs": runs, "identical": identical,
            "mismatch": said, "same_mismatch": same_mismatch,
            "ratio": ratio(summ["qcow2kit"]["wall_s"]["median"],
                           summ["qemu-img"]["wall_s"]["median"]),
            "per_rep": per_rep_ratios(runs, "qcow2kit", "qemu-img"),
            "versions": cq.versions(), "machine": cq.machine_info()}
        lines = [f"compare of a {size >> 20} MiB random-layout image with its raw conversion, "
                 f"median of {args.repeat}, cache {', '.join(sorted(caches))}", "",
                 *wall_table(summ, list(tools))]
        lines += ["", f"qcow2kit / qemu-img: **{report['ratio']:.2f}×** (per repetition "
                  f"{', '.join(f'{x:.2f}' for x in report['per_rep'])}); both said identical "
                  f"on every run: {identical}; one byte changed: both said "
                  f"{said['qcow2kit']!r} ({same_mismatch})"]
        write_report("\n".join(lines) + "\n", report, args.markdown, args.json)
        return 0 if identical and same_mismatch else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
