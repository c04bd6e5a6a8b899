"""``qcow2kit``: qemu-img compatible commands over the qcow2kit library.

Each command lives in its own module (``cli/<command>_cmd.py``: its parser and
what it runs); they parse their arguments, call the library, and hand the
result to :mod:`qcow2kit.cli.render`, the only place that formats output.
Errors from the library become one line on stderr (``qcow2kit: <what>:
<why>``) and exit status 1; ``--debug`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap
import threading
from typing import Callable, Sequence

from .. import __version__
from ..errors import Qcow2Error
from . import (backup_cmd, bench_cmd, bitmap_cmd, checksum_cmd, compare_cmd, convert_cmd,
               create_cmd, demo_cmd, dump_cmd, info_cmd, map_cmd, rmap_cmd, snapshot_cmd)
from .args import (EXIT_ERROR, EXIT_SIGINT, EXIT_SIGTERM, add_common_options, CommandError,
                   help_formatter, OptionError, Parser, Terminated, UsageError)
from .args import run_showing_warnings
from .render.output import error as print_error


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="qcow2kit", formatter_class=help_formatter,
        description=textwrap.dedent("""\
            qcow2kit: look inside qcow2 disk images, with commands whose output and exit
            codes match qemu-img's.  Run `qcow2kit COMMAND --help` for each command.
            """),
        epilog=textwrap.dedent("""\
            examples:
              qcow2kit demo
              qcow2kit info --output=json disk.qcow2
              qcow2kit convert -O raw disk.qcow2 disk.raw
              qcow2kit compare disk.qcow2 disk.raw
            """))
    parser.add_argument("--version", action="version", version=f"qcow2kit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info_cmd.add_parser(sub)
    map_cmd.add_parser(sub)
    convert_cmd.add_parser(sub)
    bitmap_cmd.add_parser(sub)
    checksum_cmd.add_parser(sub)
    backup_cmd.add_parser(sub)
    compare_cmd.add_parser(sub)
    bench_cmd.add_parser(sub)
    rmap_cmd.add_parser(sub)
    demo_cmd.add_parser(sub)
    create_cmd.add_parser(sub)
    snapshot_cmd.add_parser(sub)
    dump_cmd.add_parser(sub)
    for leaf in _leaf_parsers(parser):
        if leaf is not parser:
            add_common_options(leaf)
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser that runs a command (subcommands of subcommands included)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    out: list[argparse.ArgumentParser] = []
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            out.extend(_leaf_parsers(child))
    return out


def _command_parser(parser: argparse.ArgumentParser,
                    args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command ``args`` was parsed for."""
    for name in ("command", "bench_command"):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, name, None)
        if not subs or chosen is None or chosen not in subs[0].choices:
            break
        parser = subs[0].choices[chosen]
    return parser


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):
        # Like qemu-img and other C tools: a closed pipe (`| head`) ends us quietly.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as exc:
        exc.parser.print_usage(sys.stderr)
        command = exc.parser.prog.partition(" ")[2]
        print_error(f"{command}: {exc}" if command else str(exc))
        return EXIT_ERROR
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    debug = getattr(args, "debug", False)
    func: Callable[[argparse.Namespace], int] = args.func
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run_showing_warnings(func, args)
    except (Qcow2Error, CommandError, OSError) as exc:
        if debug:
            raise
        message = _describe(exc)
        if isinstance(exc, OptionError):
            message = f"{_command_parser(parser, args).prog.partition(' ')[2]}: {message}"
        print_error(message)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print_error("interrupted")
        return EXIT_SIGINT
    except Terminated:
        if debug:
            raise
        print_error("terminated")
        return EXIT_SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, Qcow2Error) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
