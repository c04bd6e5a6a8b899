"""``qcow2kit convert``: qemu-img convert -O raw, through qcow2kit.convert."""

from __future__ import annotations

import argparse
import textwrap

from .args import (EXIT_OK, OptionError, add_force_share_option, help_formatter,
                   open_for_reading, parse_count, parse_memory, parse_size, parse_snapshot)
from .render.output import progress_bar


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", formatter_class=help_formatter,
        help="write an image's guest content to a raw file",
        description=textwrap.dedent("""\
            Convert a qcow2 image (with its backing chain and data file) to a raw
            image, as `qemu-img convert -O raw` does: the output has the same bytes,
            and holes wherever the guest reads zeros (blocks of 4 KiB).  Without -O
            the output is raw, as with qemu-img.

            Nothing is written until the whole source has opened (backing files,
            data files) and its tables have been read and checked.  DST is refused
            when it is the source or any file of its chain (whatever the path), or
            when a QEMU process uses it; otherwise it is created, or an existing
            file is truncated.  If the conversion fails or is interrupted (exit 130
            on ^C, 143 on SIGTERM), a DST this run created is removed.

            By default the stored data is read in host-offset order (each file of
            the chain front to back), which turns a fragmented image's random reads
            into one sequential pass on a rotating disk; --order=guest reads in
            guest order instead.  The output is the same either way.
            """),
        epilog=textwrap.dedent("""\
            A read or write that fails with an I/O error is tried again a few times
            (with a growing pause); a source range that keeps failing is left as
            zeros in DST, the rest is copied, and the error names those ranges
            (guest offset+length) and exits 1, keeping DST.  A target that keeps
            failing (no space left) stops the copy with its error.

            examples:
              qcow2kit convert -O raw disk.qcow2 disk.raw
              qcow2kit convert -p -O raw overlay.qcow2 flat.raw
              qcow2kit convert -m 16 -S 64k -r 100M -O raw disk.qcow2 disk.raw
              qcow2kit convert -l before-upgrade -O raw disk.qcow2 old.raw
              qcow2kit convert -l snapshot.id=2 -O raw disk.qcow2 old.raw
            """))
    p.add_argument("-O", dest="output_format", default="raw", choices=["raw"],
                   help="output format (only raw, the default)")
    p.add_argument("-l", dest="snapshot", metavar="SNAPSHOT", action="append",
                   help="copy the internal snapshot SNAPSHOT instead of the current content: "
                        "snapshot.id=ID,snapshot.name=NAME (either or both must match), or "
                        "NAME_OR_ID (tried as an id, then as a name), as qemu-img's -l; the "
                        "output has the image's current virtual size, as with qemu-img")
    p.add_argument("-f", dest="input_format", choices=["qcow2"], default="qcow2",
                   help="input format (only qcow2)")
    p.add_argument("-p", dest="progress", action="store_true",
                   help="show a progress bar of the data read and written (ranges that "
                        "read as zeros are skipped, not counted), then a summary line")
    p.add_argument("--order", choices=["host", "guest"], default="host",
                   help="read the stored data in host-offset order, so a rotating disk reads "
                        "the image front to back (default), or in guest order")
    p.add_argument("--memory", default="32M", metavar="SIZE",
                   help="memory budget for planning the host-order reads (default 32M, "
                        "at least 64K)")
    p.add_argument("-m", dest="inflight", default="8", metavar="N",
                   help="copy workers: reads and writes in flight, taken in host order "
                        "(1 to 64, default 8, as qemu-img's -m)")
    p.add_argument("-S", dest="sparse_size", default="4k", metavar="SIZE",
                   help="zeros must fill this many consecutive bytes to be left as a hole "
                        "(a multiple of 512 up to 16M, default 4k); 0 writes everything, so "
                        "the output is fully allocated (qemu-img's -S)")
    p.add_argument("-r", dest="rate_limit", default="0", metavar="RATE",
                   help="read at most RATE bytes per second (k, M, G suffixes; 0, the "
                        "default, means no limit; qemu-img's -r)")
    p.add_argument("--fsync", action="store_true",
                   help="flush DST to disk before exiting (qemu-img convert does not: its "
                        "target cache mode is 'unsafe')")
    add_force_share_option(p, "SRC")
    p.add_argument("src", help="the qcow2 image to read")
    p.add_argument("dst", help="the raw file to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..blockcopy import MAX_MIN_SPARSE, MAX_WORKERS
    from ..convert import convert_to_raw

    # Every option is checked before any file is opened.
    memory = parse_memory(args.memory)
    inflight = parse_count(args.inflight, "number of reads in flight (-m)", 1, MAX_WORKERS)
    sparse = parse_size(args.sparse_size, "sparse size (-S)", maximum=MAX_MIN_SPARSE)
    if sparse % 512:
        raise OptionError(f"invalid sparse size (-S) {args.sparse_size!r}: must be a multiple "
                          f"of 512 up to {MAX_MIN_SPARSE} (0 turns sparse detection off)")
    rate = parse_size(args.rate_limit, "rate limit (-r)")
    snapshot = None if args.snapshot is None else parse_snapshot(args.snapshot)
    # At a snapshot, the image's own size, as qemu-img's -l (QEMU switches the L1 table only).
    with open_for_reading(args.src, force_share=args.force_share, snapshot=snapshot,
                          snapshot_size="image") as img:
        with progress_bar(enabled=args.progress, what="converted: read and wrote",
                                 of_size=img.size) as bar:
            convert_to_raw(img, args.dst, progress=bar, on_total=bar.start, order=args.order,
                           memory=memory, workers=inflight, fsync=args.fsync,
                           min_sparse=sparse, rate_limit=rate or None)
    return EXIT_OK
