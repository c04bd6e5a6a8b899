"""``qcow2kit checksum``: ovirt-imageio's block checksum of an image's guest content."""

from __future__ import annotations

import argparse
import json
import textwrap

from .args import (EXIT_OK, OptionError, add_force_share_option, help_formatter,
                   open_for_reading, parse_count, parse_memory, parse_size)
from .render.output import emit, progress_bar


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "checksum", formatter_class=help_formatter,
        help="the block checksum of an image's guest content (ovirt-imageio's)",
        description=textwrap.dedent("""\
            Print the checksum ovirt-imageio computes for a disk (its client.checksum
            and the /checksum API): the guest content cut into blocks (4 MiB by
            default), a BLAKE2b digest of 32 bytes per block, and a BLAKE2b digest of
            those digests in guest order.  The output is the same JSON object:
            {"algorithm": "blake2b", "block_size": N, "checksum": "..."}; two images
            with the same guest content have the same checksum, whatever their
            format or layout.

            The stored data is read in host order (each file of the chain front to
            back) by the block-copy engine; each block is hashed as soon as all of it
            is read, and the block digests are combined in guest order.  The guest
            disk is taken in windows (--window; by default the memory budget,
            --memory) so that memory stays bounded however the image is fragmented.
            """),
        epilog=textwrap.dedent("""\
            examples:
              qcow2kit checksum disk.qcow2
              qcow2kit checksum --block-size 1M overlay.qcow2
            """))
    p.add_argument("--block-size", default="4M", metavar="SIZE",
                   help="block size (a multiple of 4096; default 4M, ovirt-imageio's)")
    p.add_argument("--window", default=None, metavar="SIZE",
                   help="guest bytes gathered at once (whole blocks; default: the memory "
                        "budget)")
    p.add_argument("--order", choices=["host", "guest"], default="host",
                   help="read the stored data in host order (default) or guest order")
    p.add_argument("--memory", default="32M", metavar="SIZE",
                   help="memory budget for planning the reads and for the blocks "
                        "gathered at once (default 32M)")
    p.add_argument("-m", dest="workers", default="8", metavar="N",
                   help="reads in flight (1 to 64, default 8)")
    p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    add_force_share_option(p)
    p.add_argument("filename", help="the image")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..blockcopy import MAX_WORKERS
    from ..checksum import checksum

    block = parse_size(args.block_size, "block size")
    if block <= 0 or block % 4096:
        raise OptionError(f"invalid block size {args.block_size!r}: must be a positive "
                          f"multiple of 4096")
    window = parse_size(args.window, "window") if args.window is not None else None
    memory = parse_memory(args.memory)
    workers = parse_count(args.workers, "number of reads in flight (-m)", 1, MAX_WORKERS)
    with open_for_reading(args.filename, force_share=args.force_share) as img:
        with progress_bar(enabled=args.progress, what="checksummed", of_size=img.size) as bar:
            if args.progress:
                bar.start(img.size)
            result = checksum(img, block_size=block, order=args.order, memory=memory,
                              window=window, workers=workers, progress=bar)
    emit(json.dumps(result) + "\n")
    return EXIT_OK
