"""``qcow2kit demo``: the built-in sample, and what qcow2kit makes of it."""

from __future__ import annotations

import argparse
import os
import tempfile
import textwrap

from .args import (EXIT_ERROR, EXIT_OK, CommandError, help_formatter, parse_count, parse_size)
from .render.output import emit

DEMO_MIN_SIZE = 1 << 20
DEMO_MAX_SIZE = 16 << 30


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", formatter_class=help_formatter,
        help="make a sample fragmented image and show what qcow2kit does with it",
        description=textwrap.dedent("""\
            Build a sample qcow2 image whose clusters lie in shuffled host order (as a
            VM's disk becomes after random writes), without qemu-img, in a temporary
            directory; then show its info, how its guest space maps to the file, and
            check that every cluster reads back what was written.  The directory is
            removed afterwards unless --keep is given.
            """),
        epilog="example:\n  qcow2kit demo --size 64M\n")
    p.add_argument("--size", default="256M",
                   help="virtual size of the sample, 1M to 16G (default 256M)")
    p.add_argument("--seed", default="1", help="shuffle seed, 0 to 2**32-1 (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the sample image and print its path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .demo import run_demo

    size = parse_size(args.size, "size (--size)", minimum=DEMO_MIN_SIZE, maximum=DEMO_MAX_SIZE)
    size = -(-size // 512) * 512        # QEMU rounds a virtual size up to whole sectors
    seed = parse_count(args.seed, "seed (--seed)", 0, (1 << 32) - 1)
    keep_path = os.path.abspath("qcow2kit-sample.qcow2")
    if args.keep and os.path.lexists(keep_path):
        raise CommandError(f"{keep_path}: already exists; remove it or run the demo elsewhere "
                           f"(--keep never overwrites a file)")
    with tempfile.TemporaryDirectory(prefix="qcow2kit-demo-") as tmp:
        path = keep_path if args.keep else os.path.join(tmp, "sample.qcow2")
        text, ok = run_demo(path, size=size, seed=seed)
        emit(text)
    return EXIT_OK if ok else EXIT_ERROR
