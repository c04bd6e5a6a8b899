"""``qcow2kit create``: a new qcow2 image, the same file ``qemu-img create -f qcow2`` writes.

The library part (option parsing, validation, layout, writing) is
:mod:`qcow2kit.create`; this module only maps the command line onto it and
prints what qemu-img prints: the "Formatting ..." line (unless ``-q``), the
``-o help`` list, warnings and errors as ``qcow2kit: <message>`` with exit
status 1.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from .args import EXIT_OK, help_formatter
from .render.output import emit, error


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``create`` on the ``qcow2kit`` command's subparsers."""
    p = subparsers.add_parser(
        "create", formatter_class=help_formatter,
        help="create a new qcow2 image, byte for byte what qemu-img create writes",
        description=textwrap.dedent("""\
            Create a qcow2 image of SIZE bytes (suffixes k, M, G, T, P, E: powers of
            1024), as `qemu-img create -f qcow2` does.  The file written is the same,
            byte for byte, as qemu-img 7.2's for the same arguments, preallocation
            included; so is the line printed before it.  Every argument is checked
            before any file is touched: invalid arguments leave an existing IMG as it
            is.  An existing IMG is truncated and rewritten, as with qemu-img, unless a
            QEMU process holds it (its image locks are honoured).

            Options (-o, comma separated, may be repeated; `-o help` lists them):
            cluster_size, compat (0.10/v2 or 1.1/v3), lazy_refcounts, refcount_bits,
            extended_l2, compression_type (zlib, zstd), backing_file, backing_fmt,
            data_file, data_file_raw, preallocation (off, metadata, falloc, full), size.
            Without SIZE, the size is the backing file's (which is then opened; -u
            does not open it and needs SIZE).
            """),
        epilog=textwrap.dedent("""\
            examples:
              qcow2kit create disk.qcow2 20G
              qcow2kit create -o cluster_size=4k,preallocation=metadata disk.qcow2 1G
              qcow2kit create -b base.qcow2 -F qcow2 overlay.qcow2
            """))
    p.add_argument("-f", dest="fmt", default="qcow2", metavar="FMT",
                   help="image format (only qcow2)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="format options, e.g. cluster_size=4k,lazy_refcounts=on")
    p.add_argument("-b", dest="backing_file", metavar="BACKING", help="backing file")
    p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="format of the backing file")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="do not open the backing file (SIZE is then required)")
    p.add_argument("-q", dest="quiet", action="store_true",
                   help="quiet: do not print the Formatting line")
    p.add_argument("filename", nargs="?", metavar="IMG", help="the image to create")
    p.add_argument("size", nargs="?", metavar="SIZE", help="virtual size")
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``create``.  Errors are raised to :func:`qcow2kit.cli.main.main`, the one funnel
    that prints them (``qcow2kit: <message>``, exit status 1)."""
    from .. import create as C

    try:
        if args.fmt != "qcow2":
            raise C.CreateError(f"only the qcow2 format can be created, not '{args.fmt}'",
                                option="-f")
        for text in args.options:
            if not C.is_valid_option_list(text):
                raise C.CreateError(f"Invalid option list: {text}")
        if C.has_help_option(args.options):
            emit(C.options_help(with_filename=args.filename is not None))
            return EXIT_OK
        if args.filename is None:
            raise C.CreateError("Expecting image file name")
        if args.extra:
            raise C.CreateError(f"Unexpected argument: {args.extra[0]}")
        prepared = C.prepare(C.CreateRequest(
            filename=args.filename, size=args.size, options=args.options,
            backing_file=args.backing_file, backing_fmt=args.backing_fmt, unsafe=args.unsafe))
        for w in prepared.warnings:
            error(f"warning: {w}")
        if not args.quiet:
            emit(prepared.formatting + "\n")
            sys.stdout.flush()
        C.write_plan(prepared.plan)
    except C.CreateError as exc:
        if exc.formatting is not None and not args.quiet:
            # qemu-img prints the Formatting line before it finds these errors
            emit(exc.formatting + "\n")
        raise
    return EXIT_OK
