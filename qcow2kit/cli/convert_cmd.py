"""``qcow2kit convert``: qemu-img convert -O raw|qcow2, through qcow2kit.convert."""

from __future__ import annotations

import argparse
import textwrap

from .args import (EXIT_OK, CommandError, OptionError, add_force_share_option, help_formatter,
                   open_for_reading, parse_count, parse_memory, parse_size, parse_snapshot)
from .render.output import emit, progress_bar


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", formatter_class=help_formatter,
        help="write an image's guest content to a raw file or a new qcow2 image",
        description=textwrap.dedent("""\
            Convert a qcow2 image (with its backing chain and data file) to a raw
            file or a new qcow2 image, as `qemu-img convert` does.  Without -O the
            output is raw, as with qemu-img.  A raw output has the same bytes as
            qemu-img's and holes wherever the guest reads zeros (blocks of 4 KiB).
            A qcow2 output (-O qcow2, created with the -o options of `qcow2kit
            create`) has its clusters in guest order, so it is unfragmented
            however fragmented the source is, while the source is still read in
            host order; a cluster is stored when it holds a non-zero byte.

            Nothing is written until the whole source has opened (backing files,
            data files) and its tables have been read and checked.  DST is refused
            when it is the source or any file of its chain (whatever the path), or
            when a QEMU process uses it; otherwise it is created, or an existing
            file is truncated (with -n: written into, nothing else changed).  If the
            conversion fails or is interrupted (exit 130 on ^C, 143 on SIGTERM), a
            DST this run created is removed.

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

            Differences from qemu-img: a data cluster of the source that turns out to
            hold only zeros becomes an allocated zero cluster of a qcow2 output (kept
            in place, so the output stays unfragmented; qemu-img leaves it
            unallocated); -n writes into raw files, and into qcow2 images only while they
            are empty as qemu-img create wrote them; -o preallocation is refused.

            examples:
              qcow2kit convert -O raw disk.qcow2 disk.raw
              qcow2kit convert -O qcow2 fragmented.qcow2 compact.qcow2
              qcow2kit convert -O qcow2 -c -o compression_type=zstd disk.qcow2 small.qcow2
              qcow2kit convert -O qcow2 -B base.qcow2 -F qcow2 overlay.qcow2 new-overlay.qcow2
              qcow2kit convert -n -O raw disk.qcow2 /existing/disk.raw
              qcow2kit convert -p -O raw overlay.qcow2 flat.raw
              qcow2kit convert -m 16 -S 64k -r 100M -O raw disk.qcow2 disk.raw
              qcow2kit convert -l before-upgrade -O raw disk.qcow2 old.raw
              qcow2kit convert -l snapshot.id=2 -O raw disk.qcow2 old.raw
            """))
    p.add_argument("-O", dest="output_format", default="raw", metavar="FMT",
                   help="output format: raw (the default) or qcow2")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="options of the new qcow2 image, as qemu-img create's (-o help lists "
                        "them): cluster_size, compat, refcount_bits, extended_l2, "
                        "lazy_refcounts, compression_type, data_file...; may be repeated")
    p.add_argument("-c", dest="compress", action="store_true",
                   help="compress the clusters of the qcow2 output (zlib, or zstd with -o "
                        "compression_type=zstd)")
    p.add_argument("-n", dest="existing", action="store_true",
                   help="skip creating the target: write into DST, which must exist and be "
                        "at least as large as SRC: a raw file (what SRC reads as zeros is "
                        "punched out of it), or, with -O qcow2, an empty image as qemu-img "
                        "create writes it (zero clusters where SRC reads zeros)")
    p.add_argument("-B", dest="backing_file", metavar="BACKING",
                   help="create the qcow2 output with backing file BACKING (stored as given, "
                        "relative to DST's directory) and leave unallocated what SRC's own "
                        "backing chain provides: BACKING must have that content")
    p.add_argument("-F", dest="backing_fmt", metavar="FMT",
                   help="format of BACKING (qcow2 or raw; required with -B, as in qemu-img)")
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
    p.add_argument("src", nargs="?", help="the qcow2 image to read")
    p.add_argument("dst", nargs="?", help="the raw file or qcow2 image to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..blockcopy import MAX_MIN_SPARSE, MAX_WORKERS
    from ..convert import convert_to_qcow2, convert_to_raw
    from .. import createopts as C

    # Every option is checked before any file is opened, with qemu-img's messages.
    fmt = args.output_format
    if fmt not in ("raw", "qcow2"):
        raise CommandError(f"Unknown file format '{fmt}'")
    for text in args.options:
        if not C.is_valid_option_list(text):
            raise CommandError(f"Invalid option list: {text}")
    if C.has_help_option(args.options):
        if fmt != "qcow2":
            raise CommandError(f"Format driver '{fmt}' does not support image creation")
        emit(C.options_help(with_filename=args.dst is not None))
        return EXIT_OK
    if args.dst is None or args.src is None:
        raise CommandError("Must specify image file name")
    if args.existing and args.options:
        raise CommandError("-o has no effect when skipping image creation")
    if args.compress and fmt != "qcow2":
        raise CommandError("Compression not supported for this file format")
    if args.backing_file is not None:
        if fmt != "qcow2":
            raise CommandError(f"Backing file not supported for file format '{fmt}'")
        if args.backing_fmt is None:
            raise CommandError("Use of backing file requires explicit backing format")
    memory = parse_memory(args.memory)
    inflight = parse_count(args.inflight, "number of reads in flight (-m)", 1, MAX_WORKERS)
    sparse = parse_size(args.sparse_size, "sparse size (-S)", maximum=MAX_MIN_SPARSE)
    if sparse % 512:
        raise OptionError(f"invalid sparse size (-S) {args.sparse_size!r}: must be a multiple "
                          f"of 512 up to {MAX_MIN_SPARSE} (0 turns sparse detection off)")
    rate = parse_size(args.rate_limit, "rate limit (-r)")
    snapshot = None if args.snapshot is None else parse_snapshot(args.snapshot)
    if fmt == "qcow2":
        opts = C.parse_option_lists(args.options)
        if args.compress and opts.has("data_file"):
            raise CommandError("Compression is not supported with an external data file "
                               "(data_file)")
        if opts.get("preallocation") not in (None, "off"):
            raise CommandError(f"{args.dst}: error while converting qcow2: qcow2kit does not "
                               f"preallocate converted images (preallocation="
                               f"{opts.get('preallocation')})")
    # At a snapshot, the image's own size, as qemu-img's -l (QEMU switches the L1 table only).
    with open_for_reading(args.src, force_share=args.force_share, snapshot=snapshot,
                          snapshot_size="image") as img:
        common = dict(order=args.order, memory=memory, workers=inflight, fsync=args.fsync,
                      min_sparse=sparse, rate_limit=rate or None)
        with progress_bar(enabled=args.progress, what="converted: read and wrote",
                          of_size=img.size) as bar:
            if fmt == "raw":
                convert_to_raw(img, args.dst, progress=bar, on_total=bar.start,
                               existing=args.existing, **common)
            else:
                try:
                    convert_to_qcow2(img, args.dst, progress=bar, on_total=bar.start,
                                     options=args.options, compress=args.compress,
                                     backing_file=args.backing_file,
                                     backing_fmt=args.backing_fmt, existing=args.existing,
                                     **common)
                except C.CreateError as exc:     # qemu-img's words for a failed creation
                    text = exc.message
                    if text.startswith(f"{args.dst}: "):
                        text = text[len(args.dst) + 2:]
                    raise CommandError(f"{args.dst}: error while converting qcow2: "
                                       f"{text}") from None
    return EXIT_OK
