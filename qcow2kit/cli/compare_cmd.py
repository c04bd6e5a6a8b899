"""``qcow2kit compare``: qemu-img compare, through qcow2kit.compare."""

from __future__ import annotations

import argparse
import contextlib
import errno
import textwrap
from typing import TYPE_CHECKING

from .args import (EXIT_OK, CommandError, add_force_share_option, help_formatter,
                   open_for_reading)
from .render.compare import progress_text, verdict_lines
from .render.output import emit, error

if TYPE_CHECKING:
    from ..compare import AnyImage

#: qemu-img compare's exit codes
EXIT_DIFFERENT = 1
EXIT_OPEN = 2          # an image cannot be opened
EXIT_STATUS = 3        # block status (the tables) cannot be read
EXIT_READ = 4          # data cannot be read


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", formatter_class=help_formatter,
        help="say whether two images have the same guest content (qemu-img compare)",
        description=textwrap.dedent("""\
            Compare the guest content of two images, qcow2 (with their backing chains
            and data files) or raw, as `qemu-img compare` does, with its messages and
            exit codes: "Images are identical." (0), "Content mismatch at offset N!"
            (1, N the start of the first 512-byte sector that differs), and 2 when an
            image cannot be opened (3 when its tables cannot be read, 4 when its data
            cannot be read).  When the sizes differ, "Warning: Image size mismatch!"
            is printed and the rest of the larger image must read as zeros.  With -s
            (strict) the sizes must be equal ("Strict mode: Image size mismatch!") and
            so must the block status of every range ("Strict mode: Offset N block
            status mismatch!"), as qemu-img sees it.

            Without -f/-F the format is probed as qemu-img probes it: a file that
            starts with the qcow2 magic is qcow2, anything else raw.

            What both images leave unallocated (or zero) is never read.  The disks are
            taken in guest windows of 128 MiB (two window buffers in memory); in each,
            the stored data of both images is read at the same time, in host-offset
            order (a qcow2 image by the block-copy engine, 16 reads in flight; a raw
            file front to back), and compared; a mismatch ends the work at its window.
            A usage error exits 1 as qemu-img's does (without its "Try" line).
            """),
        epilog=textwrap.dedent("""\
            examples:
              qcow2kit compare disk.qcow2 disk.raw
              qcow2kit compare -s copy.qcow2 disk.qcow2
              qcow2kit compare -f raw -F qcow2 -q disk.img disk.qcow2 && echo same
              qcow2kit compare -p -U running-vm.qcow2 backup.qcow2
            """))
    p.add_argument("-f", dest="fmt1", metavar="FMT",
                   help="format of IMG1: qcow2 or raw (default: probed)")
    p.add_argument("-F", dest="fmt2", metavar="FMT",
                   help="format of IMG2: qcow2 or raw (default: probed)")
    p.add_argument("-s", "--strict", dest="strict", action="store_true",
                   help="strict mode: the sizes and the block status must be equal too")
    p.add_argument("-q", "--quiet", dest="quiet", action="store_true",
                   help="print nothing but errors (the exit code tells)")
    p.add_argument("-p", "--progress", dest="progress", action="store_true",
                   help="show the progress, as qemu-img does (not with -q)")
    add_force_share_option(p, "the images")
    p.add_argument("img1", nargs="?", help="the first image")
    p.add_argument("img2", nargs="?", help="the second image")
    p.set_defaults(func=run)


def _reason(exc: BaseException, path: str) -> str:
    """qemu-img's words for an image that cannot be opened."""
    from ..compare import FormatError
    from ..errors import (BackingFileNotFoundError, ImageLockedError, ImageNotFoundError,
                          Qcow2Error)
    opening = f"Could not open '{path}': "
    if isinstance(exc, ImageLockedError):
        return str(exc)
    if isinstance(exc, FormatError):
        return opening + str(exc)
    if isinstance(exc, BackingFileNotFoundError):
        return (f"{opening}Could not open backing file: Could not open '{exc.filename}': "
                f"No such file or directory")
    if (isinstance(exc, OSError) and exc.errno == errno.EISDIR
            or str(exc).endswith("not a regular file or block device")):
        return f"{opening}'file' driver requires '{path}' to be a regular file"
    if isinstance(exc, ImageNotFoundError) or (isinstance(exc, OSError)
                                               and not isinstance(exc, Qcow2Error)):
        name = exc.filename if isinstance(exc, OSError) and exc.filename else path
        return f"{opening}Could not open '{name}': {exc.strerror or exc}"
    text = str(exc)
    for prefix in (opening, f"{path}: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return opening + text


def _open(path: str, fmt: str | None, force_share: bool) -> "AnyImage":
    from ..compare import FormatError, check_format, open_raw, probe_format
    from ..target import source_files

    if fmt is not None:
        check_format(fmt)
    found = probe_format(path)
    if fmt == "qcow2" and found != "qcow2":
        raise FormatError("Image is not in qcow2 format")
    if (fmt or found) == "raw":
        return open_raw(path, force_share=force_share)
    img = open_for_reading(path, force_share=force_share)
    try:
        source_files(img)        # the whole chain opens and can be read (not encrypted)
    except BaseException:
        img.close()
        raise
    return img


def run(args: argparse.Namespace) -> int:
    from ..compare import FormatError, compare
    from ..errors import CopyIncompleteError, Qcow2Error

    if args.img1 is None or args.img2 is None:
        raise CommandError("Expecting two image file names")
    progress = args.progress and not args.quiet
    with contextlib.ExitStack() as stack:
        images = []
        for path, fmt in ((args.img1, args.fmt1), (args.img2, args.fmt2)):
            try:
                img = _open(path, fmt, args.force_share)
            except (Qcow2Error, OSError, ValueError, FormatError) as exc:
                error(_reason(exc, path))
                return EXIT_OPEN
            stack.callback(img.close)
            images.append(img)
        shown = [0.0]

        def show(fraction: float) -> None:
            shown.append(fraction)
            emit(progress_text(fraction))

        if progress:
            show(0.0)
        try:
            result = compare(images[0], images[1], strict=args.strict,
                             progress=show if progress else None)
        except (CopyIncompleteError, OSError) as exc:
            error(str(exc))
            return EXIT_READ
        except Qcow2Error as exc:
            error(str(exc))
            return EXIT_STATUS
        if progress and result.identical and shown[-1] < 1.0:
            show(1.0)
        if not args.quiet:
            emit(verdict_lines(result))
        if progress:
            emit("\n")
    return EXIT_OK if result.identical else EXIT_DIFFERENT
