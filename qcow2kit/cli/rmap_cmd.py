"""``qcow2kit rmap build|show|verify|drop``: the persistent reverse map."""

from __future__ import annotations

import argparse
import textwrap

from .args import (EXIT_ERROR, EXIT_OK, add_force_share_option, help_formatter, open_for_reading,
                   OptionError, parse_memory)
from .render.output import emit
from .render.reports import plain_json, render_rmap_human


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rmap", formatter_class=help_formatter,
        help="build, show, verify or drop the persistent reverse map (host -> guest)",
        description=textwrap.dedent("""\
            The reverse map records, for every host cluster holding guest data, which
            guest cluster it holds, in host order, inside the image (a header extension
            and data past the last used cluster; see docs/rmap-extension.md).  With a
            valid map, host-order reads need no L2 scan.  Any read-write open by QEMU
            clears the map's valid bit, so it can only ever be stale, never wrong.

              build   compute the map from the L2 tables and store it (replaces one)
              show    print its summary: records, clusters, size, valid or stale and why
              verify  compare it with the L2 tables; exit 0 only when it is present,
                      valid and matches, 1 otherwise, listing the differences
              drop    remove it and clear its bit

            build and drop write to the image: they take QEMU's image locks and refuse
            to run while a QEMU process uses the image.  Every step is fsync'd in an
            order that leaves a valid image (qemu-img check clean) at any crash.
            """),
        epilog=textwrap.dedent("""\
            examples:
              qcow2kit rmap build disk.qcow2
              qcow2kit rmap show --output=json disk.qcow2
              qcow2kit rmap verify disk.qcow2 && echo map is good
            """))
    p.add_argument("action", choices=["build", "show", "verify", "drop"])
    p.add_argument("--output", choices=["human", "json"], default="human",
                   help="output format (default: human)")
    p.add_argument("--memory", default="32M", metavar="SIZE",
                   help="memory budget for computing the map (default 32M)")
    add_force_share_option(p, "the image (show and verify only)")
    p.add_argument("filename", help="the image")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..rmap import build as rmap_build
    from ..rmap import format as rmap_format

    memory = parse_memory(args.memory)
    if args.force_share and args.action in ("build", "drop"):
        raise OptionError(f"-U/--force-share only applies to show and verify ({args.action} "
                          f"writes to the image)")
    result: dict = {"filename": args.filename, "action": args.action}
    rc = EXIT_OK
    if args.action == "build":
        info = rmap_build.build(args.filename, memory=memory)
        result["rmap"] = info.as_json()
    elif args.action == "drop":
        result["dropped"] = rmap_build.drop(args.filename)
    else:
        with open_for_reading(args.filename, force_share=args.force_share,
                              follow_backing=args.action == "verify") as img:
            info = rmap_format.status(img)
            if info.valid:
                info.extra["units"] = sum(int(c.sum()) for _, _, c in rmap_format.records(img, info))
                info.extra["clusters"] = info.extra["units"] >> (img.cluster_bits
                                                                 - info.unit_bits)
            result["rmap"] = info.as_json()
            if args.action == "verify":
                ok, diffs = rmap_build.verify(img, memory=memory)
                result["matches"] = ok
                result["differences"] = diffs
                rc = EXIT_OK if ok else EXIT_ERROR
    if args.output == "json":
        emit(plain_json(result) + "\n")
    else:
        emit(render_rmap_human(result))
    return rc
