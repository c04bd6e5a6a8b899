"""checksum (issue 10): ``qcow2kit checksum`` against ovirt-imageio's ``client.checksum``.

One run, cold cache before every command (unless --warm), on the random-layout
image of the other benchmarks (4 GiB, 65,536 clusters of 64 KiB in random host
order, data in every cluster; ``--scale`` for a fraction of it).  ovirt-imageio
reads the image through qemu-nbd in guest order and hashes in one thread;
qcow2kit reads it in host order with the block-copy engine.  The two checksums
must be equal (checked once more after the timed runs).

    python -m bench.checksum_bench --workdir /tmp -n 3 [--markdown FILE] [--json FILE]

``--baseline DIR`` adds a third command in the same rotation: ``qcow2kit checksum``
run with ``PYTHONPATH=DIR`` (another checkout, e.g. ``git archive`` of an older
commit), for before/after figures measured under the same conditions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import compare_qemu as cq
from bench import images
from bench import order_bench as ob
from bench.convert_bench import (cold_rotation, per_rep_ratios, ratio, summarize, wall_table,
                                  write_report)

OVIRT = ("import json, sys\n"
         "from ovirt_imageio import client\n"
         "print(json.dumps(client.checksum(sys.argv[1])))\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="where the temporary directory goes")
    p.add_argument("-n", "--repeat", type=int, default=3, help="runs per command (3)")
    p.add_argument("--scale", default="1", help="fraction of the 4 GiB image, e.g. 1/64")
    p.add_argument("--warm", action="store_true", help="do not drop the page cache")
    p.add_argument("--baseline", metavar="DIR",
                   help="also time qcow2kit from this source tree (PYTHONPATH=DIR)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--markdown", metavar="FILE")
    args = p.parse_args(argv)
    try:
        import ovirt_imageio  # noqa: F401
    except ImportError:
        print("ovirt-imageio is not installed (pip install ovirt-imageio)", file=sys.stderr)
        return 2
    size = cq.scaled_size(4 << 30, cq.parse_scale(args.scale), 65536)
    work = Path(tempfile.mkdtemp(prefix="qcow2kit-checksum-", dir=args.workdir))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        img = work / "random-filled.qcow2"
        log(f"building {size >> 20} MiB random-layout image ...")
        images.make_random_image(img, size, fill_data=True)
        kit = ob.kit_command(None)
        tools = {"ovirt-imageio": [sys.executable, "-c", OVIRT, str(img)],
                 "qcow2kit": [*kit, "checksum", str(img)]}
        if args.baseline:
            tools["qcow2kit (baseline)"] = ["env", f"PYTHONPATH={Path(args.baseline).resolve()}",
                                            sys.executable, "-P", "-m", "qcow2kit", "checksum",
                                            str(img)]
        runs, caches = cold_rotation(tools, {}, args.repeat, work, args.warm, "checksum", log)
        values = {}
        for name, cmd in tools.items():
            r = ob.run(cmd, work / f"{name}.out", work / f"{name}.err")
            values[name] = (json.loads((work / f"{name}.out").read_text())
                            if r["exit"] == 0 else None)
        summ = summarize(runs)
        report: dict[str, Any] = {
            "image_bytes": size, "repeat": args.repeat, "cache": sorted(caches),
            "summary": summ, "runs": runs, "values": values,
            "equal": all(v is not None and v == values["ovirt-imageio"]
                         for v in values.values()),
            "ratio": ratio(summ["qcow2kit"]["wall_s"]["median"],
                           summ["ovirt-imageio"]["wall_s"]["median"]),
            "per_rep": per_rep_ratios(runs, "qcow2kit", "ovirt-imageio"),
            "versions": cq.versions(), "machine": cq.machine_info()}
        lines = [f"checksum of a {size >> 20} MiB random-layout image, median of {args.repeat}, "
                 f"cache {', '.join(sorted(caches))}", "",
                 *wall_table(summ, list(tools))]
        lines += ["", f"qcow2kit / ovirt-imageio: **{report['ratio']:.2f}×** (per repetition "
                  f"{', '.join(f'{x:.2f}' for x in report['per_rep'])}); checksums equal: "
                  f"{report['equal']} ({values['qcow2kit']})"]
        if args.baseline:
            base = "qcow2kit (baseline)"
            report["baseline_ratio"] = ratio(summ[base]["wall_s"]["median"],
                                             summ["ovirt-imageio"]["wall_s"]["median"])
            report["baseline_per_rep"] = per_rep_ratios(runs, base, "ovirt-imageio")
            lines.append(f"baseline ({args.baseline}) / ovirt-imageio: "
                         f"{report['baseline_ratio']:.2f}× (per repetition "
                         f"{', '.join(f'{x:.2f}' for x in report['baseline_per_rep'])})")
        write_report("\n".join(lines) + "\n", report, args.markdown, args.json)
        return 0 if report["equal"] else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
