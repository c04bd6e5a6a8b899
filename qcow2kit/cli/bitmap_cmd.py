"""``qcow2kit bitmap``: list and show the persistent dirty bitmaps of an image (``--list``,
``--show NAME``), or edit one as ``qemu-img bitmap`` does (``--add``, ``--remove``,
``--clear``, ``--enable``, ``--disable``, ``--merge``; :mod:`qcow2kit.bitmapedit`)."""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any

from ..image import Bitmap
from ..units import qemu_strtosz
from .args import (EXIT_OK, INT64_MAX, CommandError, add_force_share_option, help_formatter,
                   open_for_reading)
from .render.output import PROG, emit


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bitmap", formatter_class=help_formatter,
        help="list, show or edit the persistent dirty bitmaps of an image (qemu-img bitmap)",
        description=textwrap.dedent("""\
            Read the persistent dirty bitmaps QEMU keeps in a qcow2 image (the bitmap
            directory and each bitmap's table).  --list names each bitmap with its
            granularity, its flags and how many bytes it marks dirty; --show NAME prints
            the dirty ranges of one bitmap, merged, as QEMU exports them (qemu-nbd -B
            NAME, read through x-dirty-bitmap).  Nothing is written.

            Otherwise, as `qemu-img bitmap` 7.2: run the operations given, in their
            order, on BITMAP of FILENAME (--add [-g GRANULARITY] [--disable], --remove,
            --clear, --enable, --disable, --merge SOURCE [-b FILE [-F FMT]]); the first
            that fails stops (exit status 1), those before it stay done.  Each is a
            crash-safe edit: new metadata in new clusters, one write switches to it, the
            old clusters are freed.  The image must not be in use (QEMU's locks), dirty or
            marked corrupt.

            A bitmap flagged in-use was left by a QEMU process that did not close the
            image: QEMU will not trust its content, and neither should a backup.
            """),
        epilog=textwrap.dedent("""\
            examples:
              qcow2kit bitmap --list disk.qcow2
              qcow2kit bitmap --show backup-1 --output=json disk.qcow2
              qcow2kit bitmap --add -g 64k disk.qcow2 backup-2
              qcow2kit bitmap --merge backup-1 --remove disk.qcow2 backup-1-old
            """))
    p.add_argument("--list", action="store_true", help="list the bitmaps")
    p.add_argument("--show", metavar="NAME", help="print the dirty ranges of bitmap NAME")
    p.add_argument("--output", choices=["human", "json"], default="human",
                   help="output format (default: human)")
    add_force_share_option(p)
    for op, text in (("add", "add BITMAP (empty; enabled unless --disable is given too)"),
                     ("remove", "remove BITMAP (also one left in use)"),
                     ("clear", "mark every granule of BITMAP clean"),
                     ("enable", "let QEMU record guest writes in BITMAP"),
                     ("disable", "stop recording writes in BITMAP (with --add: add it "
                                 "disabled)")):
        p.add_argument(f"--{op}", dest="ops", action=_OpAction, nargs=0, const=op,
                       default=[], help=text)
    p.add_argument("--merge", dest="ops", action=_OpAction, metavar="SOURCE", const="merge",
                   help="mark dirty in BITMAP what bitmap SOURCE marks dirty")
    p.add_argument("-g", dest="granularity", metavar="GRANULARITY",
                   help="the granularity of an added bitmap (default: the cluster size, "
                        "within 4k..64k)")
    p.add_argument("-b", dest="source_file", metavar="FILE",
                   help="--merge reads SOURCE from FILE instead of the image")
    p.add_argument("-F", dest="source_fmt", metavar="FMT", help="the format of FILE")
    p.add_argument("-f", dest="fmt", metavar="FMT", help="the image's format (qcow2; raw has no bitmaps)")
    p.add_argument("filename", nargs="?", help="the image")
    p.add_argument("bitmap", nargs="?", help="the bitmap an operation works on")
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


class _OpAction(argparse.Action):
    """Operations in command-line order: ``(op, SOURCE or None)``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        ops = list(getattr(namespace, self.dest) or [])
        ops.append((self.const, values if self.const == "merge" else None))
        setattr(namespace, self.dest, ops)


_NEED_OP = ("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")


def _granularity(text: str | None) -> int:
    """-g as qemu-img reads it (cvtnum), 0 when absent."""
    if text is None:
        return 0
    try:
        value, _ = qemu_strtosz(text)
    except OverflowError:
        value = 1 << 64
    except ValueError:
        raise CommandError(f"Invalid granularity specified. You may use k, M, G, T, P or E "
                           f"suffixes for\n{PROG}: kilobytes, megabytes, gigabytes, terabytes, "
                           f"petabytes and exabytes.") from None
    if value > INT64_MAX:
        raise CommandError(f"Invalid granularity specified. Must be between 0 and "
                           f"{INT64_MAX}.")
    return value


def _edit(args: argparse.Namespace) -> int:
    from ..bitmapedit import edit_bitmaps

    granularity = _granularity(args.granularity)
    if not args.ops:
        raise CommandError(_NEED_OP)
    ops = [op for op, _ in args.ops]
    if granularity and "add" not in ops:
        raise CommandError("granularity only supported with --add")
    if args.source_fmt is not None and args.source_file is None:
        raise CommandError("-F only supported with -b")
    if args.source_file is not None and "merge" not in ops:
        raise CommandError("Merge bitmap source file only supported with --merge")
    if args.filename is None or args.bitmap is None or args.extra:
        raise CommandError("Expecting filename and bitmap name")
    # qemu-img passes the granularity on as 32 bits, and 0 as "the default"
    edit_bitmaps(args.filename, args.bitmap, args.ops,
                 granularity=(granularity & 0xFFFFFFFF) if granularity else None,
                 add_disabled="disable" in ops, source_file=args.source_file,
                 source_fmt=args.source_fmt, fmt=args.fmt)
    return EXIT_OK


def _flags(bm: Bitmap) -> list[str]:
    return [name for name, on in (("in-use", bm.in_use), ("auto", bm.auto)) if on]


def run(args: argparse.Namespace) -> int:
    if not (args.list or args.show is not None):
        return _edit(args)
    if args.list and args.show is not None:
        raise CommandError("--list and --show exclude each other")
    if args.ops or args.granularity or args.source_file or args.source_fmt:
        raise CommandError("--list and --show do not combine with bitmap operations")
    if args.filename is None or args.bitmap is not None or args.extra:
        raise CommandError("--list and --show take one argument: the image")
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
