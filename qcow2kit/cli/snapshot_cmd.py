"""``qcow2kit snapshot -l``: qemu-img snapshot -l, the internal snapshots of an image."""

from __future__ import annotations

import argparse
import textwrap

from .args import EXIT_OK, OptionError, add_force_share_option, help_formatter, open_for_reading
from .render.output import emit


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "snapshot", formatter_class=help_formatter,
        help="list the internal snapshots of an image (qemu-img snapshot -l)",
        description=textwrap.dedent("""\
            List the internal snapshots of a qcow2 image as `qemu-img snapshot -l`
            prints them: the "Snapshot list:" table of qemu-img info (id, tag, size
            of the saved VM state, date, VM clock, instruction count), nothing when
            the image has none.  The image and its backing files are opened and
            locked as qemu-img opens them; nothing is written.

            Creating, applying and deleting snapshots (qemu-img snapshot -c, -a, -d)
            is not offered: use qemu-img for those.
            """),
        epilog=textwrap.dedent("""\
            examples:
              qcow2kit snapshot -l disk.qcow2
              qcow2kit snapshot -l -U disk.qcow2     # while a VM runs (may be stale)
            """))
    p.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    for opt, what in (("-c", "create"), ("-a", "apply"), ("-d", "delete")):
        p.add_argument(opt, dest=f"op_{what}", metavar="SNAPSHOT",
                       help=f"{what} a snapshot: not offered (use qemu-img snapshot {opt})")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet (no effect on -l, "
                   "as with qemu-img)")
    add_force_share_option(p)
    p.add_argument("filename", help="the image")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..info import snapshot_info
    from .render.info import render_snapshot_table

    ops = [o for o, v in (("-c", args.op_create), ("-a", args.op_apply),
                          ("-d", args.op_delete)) if v is not None]
    if ops and args.list or len(ops) > 1:
        raise OptionError("Cannot mix '-l', '-a', '-c', '-d'")
    if ops:
        raise OptionError(f"snapshot {ops[0]} is not offered by qcow2kit: use "
                          f"qemu-img snapshot {ops[0]}")
    with open_for_reading(args.filename, force_share=args.force_share) as img:
        if args.list and img.snapshots:
            emit("Snapshot list:\n" + render_snapshot_table(snapshot_info(img)))
    return EXIT_OK
