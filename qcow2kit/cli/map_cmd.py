"""``qcow2kit map``: qemu-img map, in guest or host order."""

from __future__ import annotations

import argparse
import textwrap

from .args import (EXIT_OK, add_force_share_option, CommandError, help_formatter, open_for_reading,
                   OptionError, parse_memory, parse_size)
from .render.output import emit_chunks


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "map", formatter_class=help_formatter,
        help="show how the guest disk maps to the image file(s)",
        description=textwrap.dedent("""\
            Print the extents of the guest disk, as `qemu-img map` does: which layer of
            the backing chain provides each range (depth), whether it reads as zeros,
            whether data is stored, and at which host offset.  The output is
            byte-identical to qemu-img map of QEMU 7.2 in both forms.

            The JSON form lists every extent; the human form only the ranges that hold
            data, with the file they are in (it fails, as qemu-img does, on compressed or
            encrypted data, which has no host offset).  Compressed extents never merge
            with others (their `compressed` flag is known to the library; QEMU 7.2's
            JSON has no such key, so it is not printed).

            The L1/L2 tables are scanned in batches that fit the --memory budget, so a
            map of a multi-terabyte image needs no more memory than one of a small one.
            """),
        epilog=textwrap.dedent("""\
            examples:
              qcow2kit map disk.qcow2
              qcow2kit map --output=json --start-offset=1G --max-length=64M overlay.qcow2
              qcow2kit map --order=host --output=json --memory=64M big.qcow2
            """))
    p.add_argument("--output", choices=["human", "json"], default="human",
                   help="output format (default: human)")
    p.add_argument("-f", "--format", choices=["qcow2"], default="qcow2",
                   help="image format (only qcow2)")
    p.add_argument("-s", "--start-offset", default="0", metavar="OFFSET",
                   help="first guest byte to map (suffixes k, M, G, T allowed)")
    p.add_argument("-l", "--max-length", default=None, metavar="LENGTH",
                   help="map at most this many bytes (default: to the end)")
    p.add_argument("--memory", default="32M", metavar="SIZE",
                   help="memory budget for table scanning (default 32M)")
    p.add_argument("--order", choices=["guest", "host"], default="guest",
                   help="guest: qemu-img's order (default); host: data extents sorted by "
                        "file (chain depth) then host offset, as a host-order reader visits "
                        "them")
    p.add_argument("--all", action="store_true",
                   help="with --order=host, also list the extents that hold no data "
                        "(after the data extents, in guest order)")
    add_force_share_option(p)
    p.add_argument("filename", help="the image")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .render.map import map_human_chunks, map_json_chunks   # numpy tables: only for map
    from ..mapping import layer_filenames, map_batches

    start = parse_size(args.start_offset, "start offset")
    max_length = (parse_size(args.max_length, "length") if args.max_length is not None
                  else None)
    memory = parse_memory(args.memory)
    with open_for_reading(args.filename, force_share=args.force_share) as img:
        if args.order == "host":
            from ..hostorder import map_host_order
            batches = map_host_order(img, start, max_length, memory=memory,
                                     include_all=args.all)
        else:
            if args.all:
                raise OptionError("--all only applies to --order=host (guest order lists "
                                   "every extent already)")
            batches = map_batches(img, start, max_length, memory=memory)
        if args.output == "json":
            # qemu-img prints one empty, flag-less extent at the start offset when the
            # range is empty; map_json_chunks does the same given empty_start.
            chunks = map_json_chunks(
                batches, empty_start=None if args.order == "host" and not args.all else start)
        else:
            chunks = map_human_chunks(batches, layer_filenames(img))
        try:
            # Nothing reaches stdout unless the whole map succeeds (qemu-img prints
            # the lines before an error; a script then sees a truncated map).
            emit_chunks(chunks, all_or_nothing=True)
        except ValueError as exc:  # the human form cannot show data without an offset
            raise CommandError(str(exc)) from None
    return EXIT_OK
