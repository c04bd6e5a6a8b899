"""``qcow2kit bench order``: guest order against host order."""

from __future__ import annotations

import argparse
import os
import textwrap

from .args import (EXIT_OK, add_force_share_option, check_writable_dir, CommandError,
                   help_formatter, open_for_reading, OptionError, parse_memory, parse_size)
from .render.output import emit
from .render.reports import plain_json, render_bench_order_human


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", formatter_class=help_formatter,
        help="benchmarks: `bench order` compares guest-order and host-order reads",
        description="Benchmarks of an image.  See `qcow2kit bench order --help`.")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    o = bsub.add_parser(
        "order", formatter_class=help_formatter,
        help="model and measure reading an image in guest order and in host order",
        description=textwrap.dedent("""\
            For guest order and host order, count the read requests a reader issues
            for every stored data byte of the image (one pread each, at most
            --max-request bytes), cost them with the rotating-disk model (7200 rpm,
            see --model), and time the same preads on this machine.  The times are
            taken with the page cache as it is ("cache": "warm") unless
            --drop-caches is given: then, before each order, the caches of the whole
            machine are dropped when running as root (sync; echo 3 >
            /proc/sys/vm/drop_caches, which slows everything else running), else the
            image's files are evicted with posix_fadvise(DONTNEED).  The sequential
            bound is the stored bytes at the transfer rate.

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
    o.add_argument("--drop-caches", action="store_true",
                   help="measure with a cold page cache: as root, drop the whole machine's "
                        "caches before each order; otherwise evict the image's files")
    o.add_argument("--memory", default="32M", metavar="SIZE",
                   help="memory budget for planning (default 32M)")
    o.add_argument("--max-request", default="1M", metavar="SIZE",
                   help="largest single read (default 1M, at least 512)")
    add_force_share_option(o)
    o.add_argument("filename", help="the image")
    o.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..benchorder import bench_order, plot_order
    from ..diskmodel import DiskModel
    from .cache import make_cold

    try:
        model = DiskModel.parse(args.model)
    except ValueError as exc:
        raise OptionError(f"--model: {exc}") from None
    memory = parse_memory(args.memory)
    max_request = parse_size(args.max_request, "largest read (--max-request)", minimum=512,
                             maximum=1 << 30)
    if args.plot:
        check_writable_dir(args.plot, "--plot")
    with open_for_reading(args.filename, force_share=args.force_share) as img:
        result = bench_order(img, model=model, memory=memory, max_request=max_request,
                             measure=not args.no_measure,
                             plot_points=20000 if args.plot else 0,
                             make_cold=make_cold if args.drop_caches else None)
    if args.plot:
        try:
            plot_order(result, args.plot, title=os.path.basename(args.filename))
        except RuntimeError as exc:
            raise CommandError(str(exc)) from None
        result.pop("_samples", None)
    if args.output == "json":
        emit(plain_json(result) + "\n")
    else:
        emit(render_bench_order_human(result))
    return EXIT_OK
