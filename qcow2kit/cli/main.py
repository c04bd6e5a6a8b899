"""``qcow2kit``: qemu-img compatible commands over the qcow2kit library.

Each subcommand parses its arguments, calls the library, and hands the
result to :mod:`qcow2kit.cli.render`, the only module that formats output.
Errors from the library become one line on stderr (``qcow2kit: <what>:
<why>``) and a non-zero exit status; ``--debug`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import textwrap
from typing import Callable, Sequence

from .. import __version__
from ..errors import Qcow2Error

EXIT_OK = 0
EXIT_ERROR = 1      # what qemu-img returns for a failed info/convert


class CommandError(Exception):
    """A usage or environment error detected by the CLI itself (exit 1)."""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", formatter_class=_formatter,
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
    p.add_argument("filename", help="the image")
    p.set_defaults(func=cmd_info)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", formatter_class=_formatter,
        help="write an image's guest content to a raw file",
        description=textwrap.dedent("""\
            Convert a qcow2 image (with its backing chain and data file) to a raw
            image, as `qemu-img convert -O raw` does: the output has the same bytes,
            and holes wherever the guest reads zeros (blocks of 4 KiB).  DST is
            created or truncated.

            By default the stored data is read in host-offset order (each file of
            the chain front to back), which turns a fragmented image's random reads
            into one sequential pass on a rotating disk; --order=guest reads in
            guest order instead.  The output is the same either way.
            """),
        epilog=textwrap.dedent("""\
            examples:
              qcow2kit convert -O raw disk.qcow2 disk.raw
              qcow2kit convert -p -O raw overlay.qcow2 flat.raw
            """))
    p.add_argument("-O", dest="output_format", required=True, choices=["raw"],
                   help="output format (only raw)")
    p.add_argument("-f", dest="input_format", choices=["qcow2"], default="qcow2",
                   help="input format (only qcow2)")
    p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    p.add_argument("--order", choices=["host", "guest"], default="host",
                   help="read the stored data in host-offset order, so a rotating disk reads "
                        "the image front to back (default), or in guest order")
    p.add_argument("--memory", default="32M", metavar="SIZE",
                   help="memory budget for planning the host-order reads (default 32M)")
    p.add_argument("-m", dest="inflight", type=int, default=8, metavar="N",
                   help="reads kept in flight in host order (default 8, as qemu-img's -m)")
    p.add_argument("--fsync", action="store_true",
                   help="flush DST to disk before exiting (qemu-img convert does not: its "
                        "target cache mode is 'unsafe')")
    p.add_argument("src", help="the qcow2 image to read")
    p.add_argument("dst", help="the raw file to write")
    p.set_defaults(func=cmd_convert)


def _add_map(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "map", formatter_class=_formatter,
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
    p.add_argument("filename", help="the image")
    p.set_defaults(func=cmd_map)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", formatter_class=_formatter,
        help="benchmarks: `bench order` compares guest-order and host-order reads",
        description="Benchmarks of an image.  See `qcow2kit bench order --help`.")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    o = bsub.add_parser(
        "order", formatter_class=_formatter,
        help="model and measure reading an image in guest order and in host order",
        description=textwrap.dedent("""\
            For guest order and host order, count the read requests a reader issues
            for every stored data byte of the image (one pread each, at most
            --max-request bytes), cost them with the rotating-disk model (7200 rpm,
            see --model), and time the same preads on this machine with a cold page
            cache: caches are dropped when running as root, else the files are
            evicted with posix_fadvise(DONTNEED), else the result says the cache was
            warm.  The sequential bound is the stored bytes at the transfer rate.

            JSON: {"guest": {"requests", "bytes", "model_seconds",
            "measured_seconds"}, "host": {...}, "sequential_bound_seconds",
            "model": {parameters}, "cache", "files", "planning"}.
            """),
        epilog=textwrap.dedent("""\
            examples:
              qcow2kit bench order disk.qcow2
              qcow2kit bench order --output=json --no-measure --model rpm=5400 disk.qcow2
              qcow2kit bench order --plot=order.png disk.qcow2     (needs matplotlib)
            """))
    o.add_argument("--output", choices=["human", "json"], default="human",
                   help="output format (default: human)")
    o.add_argument("--plot", metavar="FILE.png", help="draw disk position against request "
                   "number for both orders (needs matplotlib)")
    o.add_argument("--model", metavar="NAME=VALUE,...", default=None,
                   help="override disk model parameters, e.g. rpm=5400,transfer_mb_s=150")
    o.add_argument("--no-measure", action="store_true",
                   help="only model; do not read the data")
    o.add_argument("--memory", default="32M", metavar="SIZE",
                   help="memory budget for planning (default 32M)")
    o.add_argument("--max-request", default="1M", metavar="SIZE",
                   help="largest single read (default 1M)")
    o.add_argument("filename", help="the image")
    o.set_defaults(func=cmd_bench_order)


def _add_rmap(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rmap", formatter_class=_formatter,
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
    p.add_argument("filename", help="the image")
    p.set_defaults(func=cmd_rmap)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", formatter_class=_formatter,
        help="make a sample fragmented image and show what qcow2kit does with it",
        description=textwrap.dedent("""\
            Build a sample qcow2 image whose clusters lie in shuffled host order (as a
            VM's disk becomes after random writes), without qemu-img, in a temporary
            directory; then show its info, how its guest space maps to the file, and
            check that every cluster reads back what was written.  The directory is
            removed afterwards unless --keep is given.
            """),
        epilog="example:\n  qcow2kit demo --size 64M\n")
    p.add_argument("--size", default="256M", help="virtual size of the sample (default 256M)")
    p.add_argument("--seed", type=int, default=1, help="shuffle seed (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the sample image and print its path")
    p.set_defaults(func=cmd_demo)


def parse_size(text: str, what: str = "size") -> int:
    """Parse a size like qemu-img does: a number with an optional k, M, G, T, P, E suffix
    (powers of 1024), exactly (no float rounding), at most INT64_MAX."""
    from decimal import Decimal, InvalidOperation

    t = text.strip()
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
             "p": 1 << 50, "e": 1 << 60}
    suffix = t[-1:].lower() if t and t[-1].isalpha() else ""
    num = t[:-1] if suffix else t
    try:
        value = Decimal(num)
    except InvalidOperation:
        raise CommandError(f"invalid {what} {text!r}: expected a number with an optional "
                           f"k/M/G/T suffix") from None
    if suffix not in units or not value.is_finite() or value < 0:
        raise CommandError(f"invalid {what} {text!r}")
    result = int(value * units[suffix])
    if result > (1 << 63) - 1:
        raise CommandError(f"invalid {what} {text!r}: larger than the largest offset "
                           f"({(1 << 63) - 1})")
    return result


# --------------------------------------------------------------------------- commands


def cmd_info(args: argparse.Namespace) -> int:
    from .. import image as image_mod
    from ..info import chain_info, image_info
    from . import render

    with image_mod.Image.open(args.filename, follow_backing=args.backing_chain) as img:
        if args.backing_chain:
            infos = chain_info(img)
            if args.output == "json":
                render.emit(render.to_qemu_json(infos) + "\n")
            else:
                render.emit(render.render_info_chain_human(infos))
        else:
            info = image_info(img)
            if args.output == "json":
                render.emit(render.to_qemu_json(info) + "\n")
            else:
                render.emit(render.render_info_human(info))
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from .. import image as image_mod
    from ..convert import convert_to_raw
    from . import render

    with image_mod.Image.open(args.src) as img:
        with render.progress_bar(img.size, enabled=args.progress) as advance:
            if args.inflight < 1:
                raise CommandError("-m: the number of reads in flight must be at least 1")
            convert_to_raw(img, args.dst, progress=advance, order=args.order,
                           memory=parse_size(args.memory), inflight=args.inflight,
                           fsync=args.fsync)
    return EXIT_OK


def cmd_map(args: argparse.Namespace) -> int:
    from .. import image as image_mod
    from ..mapping import layer_filenames, map_batches
    from . import render

    start = parse_size(args.start_offset, "start offset")
    max_length = (parse_size(args.max_length, "length") if args.max_length is not None
                  else None)
    memory = parse_size(args.memory)
    with image_mod.Image.open(args.filename) as img:
        if args.order == "host":
            from ..hostorder import map_host_order
            batches = map_host_order(img, start, max_length, memory=memory,
                                     include_all=args.all)
        else:
            if args.all:
                raise CommandError("--all only applies to --order=host (guest order lists "
                                   "every extent already)")
            batches = map_batches(img, start, max_length, memory=memory)
        if args.output == "json":
            # qemu-img prints one empty, flag-less extent at the start offset when the
            # range is empty; map_json_chunks does the same given empty_start.
            chunks = render.map_json_chunks(
                batches, empty_start=None if args.order == "host" and not args.all else start)
        else:
            chunks = render.map_human_chunks(batches, layer_filenames(img))
        try:
            render.emit_chunks(chunks)
        except ValueError as exc:  # the human form cannot show data without an offset
            raise CommandError(str(exc)) from None
    return EXIT_OK


def cmd_bench_order(args: argparse.Namespace) -> int:
    from .. import image as image_mod
    from ..benchorder import bench_order, plot_order
    from ..diskmodel import DiskModel
    from . import render

    try:
        model = DiskModel.parse(args.model)
    except ValueError as exc:
        raise CommandError(f"--model: {exc}") from None
    with image_mod.Image.open(args.filename) as img:
        result = bench_order(img, model=model, memory=parse_size(args.memory),
                             max_request=parse_size(args.max_request),
                             measure=not args.no_measure,
                             plot_points=20000 if args.plot else 0)
    if args.plot:
        try:
            plot_order(result, args.plot, title=os.path.basename(args.filename))
        except RuntimeError as exc:
            raise CommandError(str(exc)) from None
        result.pop("_samples", None)
    if args.output == "json":
        render.emit(render.plain_json(result) + "\n")
    else:
        render.emit(render.render_bench_order_human(result))
    return EXIT_OK


def cmd_rmap(args: argparse.Namespace) -> int:
    from .. import image as image_mod
    from .. import rmap
    from . import render

    memory = parse_size(args.memory)
    result: dict = {"filename": args.filename, "action": args.action}
    rc = EXIT_OK
    if args.action == "build":
        info = rmap.build(args.filename, memory=memory)
        result["rmap"] = info.as_json()
    elif args.action == "drop":
        result["dropped"] = rmap.drop(args.filename)
    else:
        with image_mod.Image.open(args.filename, follow_backing=args.action == "verify") as img:
            info = rmap.status(img)
            if info.valid:
                info.extra["units"] = sum(int(c.sum()) for _, _, c in rmap.records(img, info))
                info.extra["clusters"] = info.extra["units"] >> (img.cluster_bits
                                                                 - info.unit_bits)
            result["rmap"] = info.as_json()
            if args.action == "verify":
                ok, diffs = rmap.verify(img, memory=memory)
                result["matches"] = ok
                result["differences"] = diffs
                rc = EXIT_OK if ok else EXIT_ERROR
    if args.output == "json":
        render.emit(render.plain_json(result) + "\n")
    else:
        render.emit(render.render_rmap_human(result))
    return rc


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo
    from . import render

    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="qcow2kit-demo-") as tmp:
        path = os.path.join(tmp, "sample.qcow2")
        if args.keep:
            path = os.path.abspath("qcow2kit-sample.qcow2")
        text, ok = run_demo(path, size=size, seed=args.seed)
        render.emit(text)
    return EXIT_OK if ok else EXIT_ERROR


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcow2kit", formatter_class=_formatter,
        description=textwrap.dedent("""\
            qcow2kit: look inside qcow2 disk images, with commands whose output and exit
            codes match qemu-img's.  Run `qcow2kit COMMAND --help` for each command.
            """),
        epilog=textwrap.dedent("""\
            examples:
              qcow2kit demo
              qcow2kit info --output=json disk.qcow2
              qcow2kit convert -O raw disk.qcow2 disk.raw
            """))
    parser.add_argument("--version", action="version", version=f"qcow2kit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_info(sub)
    _add_map(sub)
    _add_convert(sub)
    _add_bench(sub)
    _add_rmap(sub)
    _add_demo(sub)
    from .create_cmd import add_parser as _add_create
    _add_create(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):
        # Like qemu-img and other C tools: a closed pipe (`| head`) ends us quietly.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (Qcow2Error, CommandError, OSError) as exc:
        if args.debug:
            raise
        from . import render
        render.error(_describe(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
