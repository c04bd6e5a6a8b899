"""What every command shares: exit codes, the errors the CLI raises, the parser
class (usage errors exit 1, as qemu-img's), and qemu-img's forms of numbers."""

from __future__ import annotations

import argparse
import os
import signal
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from ..units import qemu_strtosz

if TYPE_CHECKING:
    from ..image import Image, SnapshotRef

EXIT_OK = 0
EXIT_ERROR = 1      # what qemu-img returns for a failed info/convert
EXIT_SIGINT = 128 + signal.SIGINT     # 130, as a shell reports a process ended by ^C
EXIT_SIGTERM = 128 + signal.SIGTERM   # 143


class CommandError(Exception):
    """A usage or environment error detected by the CLI itself (exit 1)."""


class OptionError(CommandError):
    """An option's value is invalid; the message is prefixed with the command's name."""


class UsageError(Exception):
    """Bad command-line syntax: the parser's message, printed after the command's usage."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``finally`` blocks clean up."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 1 as qemu-img's do (argparse's own is 2).

    Subcommand parsers are made from this class too, so a mistake shows the
    usage line of the command it was made in.
    """

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        raise UsageError(self, message)


def help_formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def add_common_options(p: argparse.ArgumentParser) -> None:
    """Options every command takes (also accepted before the command name)."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show a traceback on errors")


def add_force_share_option(p: argparse.ArgumentParser, what: str = "the image") -> None:
    """``-U``/``--force-share``, as every reading command of qemu-img has it."""
    p.add_argument("-U", "--force-share", action="store_true",
                   help=f"read {what} even while another process (a VM, qemu-nbd, qemu-io) "
                        f"has it open for writing, as qemu-img -U does; the data may then be "
                        f"inconsistent (a warning says so). Without -U such an image is "
                        f"refused, with qemu-img's message")


def open_for_reading(path: str, *, force_share: bool, follow_backing: bool = True,
                     metadata_only: bool = False, **options: Any) -> "Image":
    """Open an image as qemu-img's reading commands do: locked, with its whole chain.

    Every file of the chain (backing files, external data files) is opened and
    locked now, so a file that is missing or used by a writer fails before any
    output.  ``metadata_only`` opens as ``qemu-img info`` does: without the
    "consistent read" permission, and only the image itself (its backing files
    as they are asked for).  ``options`` go to :meth:`Image.open` (``snapshot``...).
    """
    from ..image import Image

    img = Image.open(path, follow_backing=follow_backing, force_share=force_share,
                     consistent_read=not metadata_only, **options)
    if metadata_only:
        return img
    try:
        for layer in img.chain():
            if isinstance(layer, Image) and layer.header.has_data_file:
                layer.data_source   # noqa: B018 - opens (and locks) the data file
    except BaseException:
        img.close()
        raise
    return img


def run_showing_warnings(func: Callable[[argparse.Namespace], int],
                         args: argparse.Namespace) -> int:
    """Run a command; the library's :class:`~qcow2kit.locks.ForceShareWarning` (an image
    read with -U while a writer has it) becomes one ``qcow2kit: warning:`` line on stderr."""
    import warnings

    from ..locks import ForceShareWarning
    from .render.output import warning

    def show(message: Warning | str, category: type[Warning], *rest: object) -> None:
        if issubclass(category, ForceShareWarning):
            warning(str(message))
        else:
            previous(message, category, *rest)   # type: ignore[arg-type]

    with warnings.catch_warnings():
        previous = warnings.showwarning
        warnings.simplefilter("always", ForceShareWarning)
        warnings.showwarning = show   # type: ignore[assignment]
        return func(args)


INT64_MAX = (1 << 63) - 1


def parse_size(text: str, what: str = "size", *, minimum: int = 0,
               maximum: int = INT64_MAX) -> int:
    """Parse a size or offset as qemu-img does (:func:`qcow2kit.units.qemu_strtosz`).

    Decimal or ``0x`` hexadecimal, with an optional suffix b, k, M, G, T, P or E
    (any case; powers of 1024); a decimal fraction needs a suffix (``1.5k``).
    The result must lie in ``[minimum, maximum]``.
    """
    try:
        value, _ = qemu_strtosz(text)
    except OverflowError:
        value = 1 << 64
    except ValueError:
        raise OptionError(f"invalid {what} {text!r}: expected a number (decimal or 0x hex) "
                          f"with an optional k, M, G, T, P or E suffix") from None
    if value < minimum or value > maximum:
        raise OptionError(f"invalid {what} {text!r}: must be between {minimum} and {maximum}")
    return value


def check_writable_dir(path: str, what: str) -> None:
    """Fail early (before long work) when ``path`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OptionError(f"{what}: {path}: no such directory {folder!r}")
    if os.path.isdir(path):
        raise OptionError(f"{what}: {path}: is a directory")


def parse_memory(text: str) -> int:
    """A ``--memory`` budget: a size of at least 64 KiB."""
    from ..mapping import MIN_MEMORY
    value = parse_size(text, "memory budget (--memory)")
    if value < MIN_MEMORY:
        raise OptionError(f"invalid memory budget (--memory) {text!r}: must be at least 64K "
                           f"({MIN_MEMORY} bytes)")
    return value


SNAPSHOT_OPT_PREFIX = "snapshot."
SNAPSHOT_KEYS = ("snapshot.id", "snapshot.name")


def parse_snapshot(values: list[str]) -> "str | SnapshotRef":
    """``-l``'s values (the option may be repeated), as qemu-img convert reads them.

    ``snapshot.id=ID,snapshot.name=NAME`` (either or both) becomes a
    :class:`qcow2kit.image.SnapshotRef`, in QEMU's option syntax: ``,,`` is a
    comma inside a value, a key given twice keeps its last value, a trailing
    comma is ignored, and a key without ``=`` means ``KEY=on`` (``noKEY``:
    ``KEY=off``).  Anything else is the short form, an id or a name (looked
    up as an id first).  As in qemu-img, a long form given anywhere wins over
    short forms; otherwise the last one counts.
    """
    from ..image import SnapshotRef
    longs = [v for v in values if v.startswith(SNAPSHOT_OPT_PREFIX)]
    if not longs:
        return values[-1]
    text = longs[-1]
    found: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        key_end = len(text)
        for stop in ("=", ","):
            at = text.find(stop, pos)
            if 0 <= at < key_end:
                key_end = at
        key = text[pos:key_end]
        if key_end == len(text) or text[key_end] == ",":      # "KEY": implied on/off
            value = "on"
            if key.startswith("no"):
                key, value = key[2:], "off"
            pos = key_end + 1
        else:
            chars: list[str] = []
            i = key_end + 1
            while i < len(text) and not (text[i] == "," and not text.startswith(",,", i)):
                chars.append(text[i])
                i += 2 if text[i] == "," else 1
            value = "".join(chars)
            pos = i + 1
        if key not in SNAPSHOT_KEYS:
            raise OptionError(f"invalid snapshot (-l) {text!r}: unknown parameter {key!r} "
                              f"(expected snapshot.id=ID and/or snapshot.name=NAME)")
        found[key] = value
    return SnapshotRef(id=found.get("snapshot.id"), name=found.get("snapshot.name"))


def parse_count(text: str, what: str, lo: int, hi: int) -> int:
    """A whole number in ``[lo, hi]`` (decimal or 0x hex), for options such as ``-m``."""
    try:
        value = int(text, 0)
    except ValueError:
        raise OptionError(f"invalid {what} {text!r}: expected a whole number") from None
    if not lo <= value <= hi:
        raise OptionError(f"invalid {what} {text!r}: must be between {lo} and {hi}")
    return value
