"""``qcow2kit backup``: full and incremental backups from persistent dirty bitmaps."""

from __future__ import annotations

import argparse
import textwrap
from typing import TYPE_CHECKING

from .args import (EXIT_OK, CommandError, add_force_share_option, help_formatter,
                   open_for_reading, parse_count, parse_memory, parse_size)
from .render.output import emit, human_bytes, progress_bar, warning

if TYPE_CHECKING:
    from ..image import Image


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backup", formatter_class=help_formatter,
        help="a full backup, or an incremental one from a persistent dirty bitmap",
        description=textwrap.dedent("""\
            Back up a qcow2 image (offline: no QEMU process may be writing it).

            --sync full (the default without --bitmap and --base) writes the guest
            content to TARGET, a new qcow2 image (or a raw file with -O raw), as
            `qcow2kit convert` does: the source read in host order (each file front to
            back), the copy unfragmented.  A qcow2 TARGET has the source's cluster size.

            --sync incremental (the default with --bitmap or --base) writes TARGET as a
            qcow2 overlay of PREVIOUS, the backup the bitmap NAME started with: it holds
            exactly the clusters the bitmap marks dirty (at the bitmap's granularity,
            rounded out to TARGET's clusters, which are the source's), their data or
            zero clusters where they read as zeros, so that PREVIOUS plus TARGET reads as
            the source does.  Only those clusters are read, in host order.  TARGET names
            PREVIOUS (and its format) as its backing file, relative to TARGET's
            directory, so the chain can move as a whole.

            A bitmap marked in use (a QEMU process has the image open, or crashed with
            it open: the bitmap may have missed writes), inconsistent or missing is
            refused, with the reason.  --sync auto takes an incremental backup when the
            bitmap and PREVIOUS are usable, and otherwise a full one, saying why on
            stderr.  That the bitmap was started when PREVIOUS was taken is your part
            (start a new bitmap with each backup).

            --checksum also writes TARGET.checksum, ovirt-imageio's block checksum of
            the source's guest content (the JSON of `qcow2kit checksum`), computed from
            the data the copy reads: nothing is read twice.  A full backup only: an
            incremental one reads the dirty clusters alone (checksum the chain with
            `qcow2kit checksum TARGET` instead); with --sync auto it makes the backup a
            full one.

            Everything (the source and its tables, the bitmap, PREVIOUS) is checked
            before TARGET is created; an existing TARGET (or TARGET.checksum) is refused,
            never overwritten.  TARGET is made under a hidden part name and gets its name
            once its metadata and the bits of what is still to copy are on disk (a qcow2
            TARGET keeps them in a disabled persistent bitmap, qcow2kit-copy-pending, a
            raw one in TARGET.pending); the copy keeps those bits up to date, once a
            second.  A backup that is killed, fails or is interrupted (exit 130 on ^C,
            143 on SIGTERM) keeps TARGET: run the same command with --resume to copy what
            is still pending.  A backup killed before TARGET got its name leaves nothing
            to resume; run it again.  TARGET is flushed to disk before the command
            returns.

            --new-bitmap NAME starts the bitmap NAME on SRC before the copy (every write
            after the backup is in it, for the next incremental one) and, once TARGET is
            complete and on disk, removes the --bitmap one: no write is lost between two
            backups.
            """),
        epilog=textwrap.dedent("""\
            A cycle (a VM writes in between; each backup starts the next bitmap):
              qcow2kit backup --new-bitmap b1 disk.qcow2 full.qcow2
              qcow2kit backup --bitmap b1 --new-bitmap b2 --base full.qcow2 disk.qcow2 inc1.qcow2
              qcow2kit backup --bitmap b2 --new-bitmap b3 --base inc1.qcow2 disk.qcow2 inc2.qcow2
            then qemu-img compare inc2.qcow2 disk.qcow2 says they are identical.  After a
            kill or ^C, the same command with --resume finishes the backup.

            more examples:
              qcow2kit backup -O raw --checksum disk.qcow2 disk.raw
              qcow2kit backup --sync auto --bitmap b0 --base full.qcow2 disk.qcow2 next.qcow2
              qcow2kit backup -p -m 16 disk.qcow2 full.qcow2
            """))
    p.add_argument("--sync", choices=["full", "incremental", "auto"], default=None,
                   help="full, incremental (needs --bitmap and --base), or auto: incremental "
                        "when the bitmap and base are usable, else full (default: full, or "
                        "incremental when --bitmap or --base is given)")
    p.add_argument("--bitmap", metavar="NAME",
                   help="the persistent dirty bitmap of SRC that records the writes since "
                        "PREVIOUS was taken")
    p.add_argument("--base", metavar="PREVIOUS",
                   help="the previous backup (qcow2 or raw, the size of SRC): the backing "
                        "file of the incremental TARGET")
    p.add_argument("-O", dest="output_format", choices=["qcow2", "raw"], default="qcow2",
                   help="format of a full backup: qcow2 (the default) or raw; an "
                        "incremental backup is always qcow2")
    p.add_argument("--new-bitmap", metavar="NAME",
                   help="start the persistent bitmap NAME on SRC before copying (it records "
                        "the writes after this backup, for the next incremental one); the "
                        "--bitmap one is removed once TARGET is complete and on disk")
    p.add_argument("--resume", action="store_true",
                   help="finish the interrupted backup TARGET (run with the same "
                        "arguments): only what is still pending is copied")
    p.add_argument("--checksum", action="store_true",
                   help="also write TARGET.checksum: ovirt-imageio's block checksum of "
                        "SRC's guest content, computed during the copy (full backups)")
    p.add_argument("-m", dest="workers", default="8", metavar="N",
                   help="copy workers: reads and writes in flight (1 to 64, default 8)")
    p.add_argument("-r", dest="rate_limit", default="0", metavar="RATE",
                   help="read at most RATE bytes per second (k, M, G suffixes; 0, the "
                        "default, means no limit), to spare a disk that is in use")
    p.add_argument("-p", dest="progress", action="store_true",
                   help="show a progress bar of the data read and written, then a "
                        "summary line")
    p.add_argument("--memory", default="32M", metavar="SIZE",
                   help="memory budget for planning the host-order reads (default 32M)")
    add_force_share_option(p, "SRC")
    p.add_argument("src", nargs="?", help="the qcow2 image to back up")
    p.add_argument("target", nargs="?", help="the backup to create")
    p.set_defaults(func=run)


def _new_bitmap_needed(img: "Image", name: str | None, resume: bool) -> bool:
    """Whether bitmap ``name`` must be started; refused when it exists (unless a resumed
    backup started it)."""
    if name is None:
        return False
    if any(b.name == name for b in img.bitmaps):
        if resume:
            return False
        raise CommandError(f"--new-bitmap: {img.filename} already has a bitmap '{name}'")
    return True


def run(args: argparse.Namespace) -> int:
    from ..backup import interrupted, plan_backup, run_backup
    from ..bitmapedit import add_bitmap, remove_bitmap
    from ..blockcopy import MAX_WORKERS

    if args.src is None or args.target is None:
        raise CommandError("Must specify SRC and TARGET")
    sync = args.sync
    if sync is None:
        sync = "incremental" if args.bitmap is not None or args.base is not None else "full"
    workers = parse_count(args.workers, "number of workers (-m)", 1, MAX_WORKERS)
    memory = parse_memory(args.memory)
    rate = parse_size(args.rate_limit, "rate limit (-r)")
    if args.new_bitmap is not None and args.force_share:
        raise CommandError("--new-bitmap writes to SRC: it cannot be used with -U")
    with open_for_reading(args.src, force_share=args.force_share) as img:
        try:
            plan = plan_backup(img, args.target, sync=sync, bitmap=args.bitmap,
                               base=args.base, fmt=args.output_format,
                               checksum=args.checksum, resume=args.resume)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        start_new = _new_bitmap_needed(img, args.new_bitmap, args.resume)
    if plan.fallback is not None:
        warning(f"taking a full backup instead of an incremental one: {plan.fallback}")
    if start_new:
        # before the copy: every write from now on is in it (the old one retires after)
        add_bitmap(args.src, args.new_bitmap)
    incremental = plan.mode == "incremental"
    try:
        with open_for_reading(args.src, force_share=args.force_share) as img, \
                progress_bar(enabled=args.progress, what="backed up: read and wrote",
                             of_size=None if incremental else img.size) as bar:
            result = run_backup(img, plan, resume=args.resume, memory=memory,
                                workers=workers, rate_limit=rate or None, progress=bar,
                                on_total=bar.start)
    except BaseException:
        if interrupted(args.target, plan.fmt):
            warning(f"{args.target} is kept, incomplete: run the same command with --resume "
                    f"to finish it")
        raise
    if args.new_bitmap is not None and args.bitmap is not None \
            and args.bitmap != args.new_bitmap:
        remove_bitmap(args.src, args.bitmap)       # TARGET is complete and on disk
    if incremental:
        emit(f"incremental backup of {args.src} to {args.target} (backing file "
             f"{plan.backing_file}): {human_bytes(plan.dirty_bytes)} dirty in bitmap "
             f"'{plan.bitmap}', {human_bytes(result.copy.read_bytes)} read\n")
    else:
        emit(f"full backup of {args.src} to {args.target}: "
             f"{human_bytes(result.copy.read_bytes)} read\n")
    if result.checksum is not None:
        emit(f"checksum written to {plan.checksum_path}\n")
    return EXIT_OK
