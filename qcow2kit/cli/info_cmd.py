"""``qcow2kit info``: qemu-img info."""

from __future__ import annotations

import argparse
import textwrap

from .args import (EXIT_OK, add_force_share_option, help_formatter, open_for_reading)
from .render.output import emit


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", formatter_class=help_formatter,
        help="show what an image is: size, format details, snapshots, bitmaps, backing file",
        description=textwrap.dedent("""\
            Show information about a qcow2 image, as `qemu-img info` does.

            The JSON form parses to the same object as `qemu-img info --output=json`
            (QEMU 7.2 keys and values) and is printed the same way, so scripts that
            read qemu-img's output can read this one.  Nothing is written to the image.
            """),
        epilog=textwrap.dedent("""\
            examples:
              qcow2kit info disk.qcow2
              qcow2kit info --output=json --backing-chain overlay.qcow2
            """))
    p.add_argument("--output", choices=["human", "json"], default="human",
                   help="output format (default: human)")
    p.add_argument("--backing-chain", action="store_true",
                   help="show every image of the backing chain, top first")
    p.add_argument("-f", "--format", choices=["qcow2"], default="qcow2",
                   help="image format (only qcow2)")
    add_force_share_option(p)
    p.add_argument("filename", help="the image")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .render.info import render_info_chain_human, render_info_human
    from .render.qemujson import to_qemu_json
    from ..info import chain_info, image_info
    from ..locks import LockConflictError

    # Locked as qemu-img info locks: without "consistent read" (it opens without I/O),
    # refusing to share "write" and "resize"; the backing chain is not opened
    # unless --backing-chain asks for it.
    with open_for_reading(args.filename, force_share=args.force_share, metadata_only=True,
                          follow_backing=args.backing_chain) as img:
        if args.backing_chain:
            try:
                infos = chain_info(img)
            except LockConflictError as exc:
                # qemu-img info --backing-chain opens each image on its own: the error
                # names the backing file as the image it could not open
                raise LockConflictError(f"Could not open '{exc.path}': ", exc.reason,
                                        exc.path or "") from None
            if args.output == "json":
                emit(to_qemu_json(infos) + "\n")
            else:
                emit(render_info_chain_human(infos))
        else:
            info = image_info(img)
            if args.output == "json":
                emit(to_qemu_json(info) + "\n")
            else:
                emit(render_info_human(info))
    return EXIT_OK
