"""``qcow2kit bitmap --list | --show NAME``: the persistent dirty bitmaps of an image."""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any

from ..image import Bitmap
from .args import EXIT_OK, add_force_share_option, help_formatter, open_for_reading
from .render.output import emit


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bitmap", formatter_class=help_formatter,
        help="list the persistent dirty bitmaps of an image, or show one's dirty ranges",
        description=textwrap.dedent("""\
            Read the persistent dirty bitmaps QEMU keeps in a qcow2 image (the bitmap
            directory and each bitmap's table).  --list names each bitmap with its
            granularity, its flags and how many bytes it marks dirty; --show NAME prints
            the dirty ranges of one bitmap, merged, as QEMU exports them (qemu-nbd -B
            NAME, read through x-dirty-bitmap).  Nothing is written.

            A bitmap flagged in-use was left by a QEMU process that did not close the
            image: QEMU will not trust its content, and neither should a backup.
            """),
        epilog=textwrap.dedent("""\
            examples:
              qcow2kit bitmap --list disk.qcow2
              qcow2kit bitmap --show backup-1 --output=json disk.qcow2
            """))
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="list the bitmaps")
    what.add_argument("--show", metavar="NAME", help="print the dirty ranges of bitmap NAME")
    p.add_argument("--output", choices=["human", "json"], default="human",
                   help="output format (default: human)")
    add_force_share_option(p)
    p.add_argument("filename", help="the image")
    p.set_defaults(func=run)


def _flags(bm: Bitmap) -> list[str]:
    return [name for name, on in (("in-use", bm.in_use), ("auto", bm.auto)) if on]


def run(args: argparse.Namespace) -> int:
    with open_for_reading(args.filename, force_share=args.force_share) as img:
        if args.list:
            rows: list[dict[str, Any]] = []
            for bm in img.bitmaps:
                dirty = sum(n for _, n in img.dirty_ranges(bm.name))
                rows.append({"name": bm.name, "granularity": bm.granularity,
                             "flags": _flags(bm), "dirty": dirty})
            if args.output == "json":
                emit(json.dumps(rows, indent=4) + "\n")
            elif rows:
                width = max(len("NAME"), *(len(r["name"]) for r in rows))
                lines = [f"{'NAME':<{width}}  {'GRANULARITY':>11}  {'DIRTY BYTES':>15}  FLAGS"]
                for r in rows:
                    lines.append(f"{r['name']:<{width}}  {r['granularity']:>11}  "
                                 f"{r['dirty']:>15}  {','.join(r['flags']) or '-'}")
                emit("\n".join(lines) + "\n")
            return EXIT_OK
        ranges = list(img.dirty_ranges(args.show))
        if args.output == "json":
            emit(json.dumps([{"start": a, "length": n} for a, n in ranges], indent=4) + "\n")
        else:
            emit("".join(f"{a:#x} {n:#x}\n" for a, n in ranges))
    return EXIT_OK
