"""``qcow2kit dump``: every on-disk field of an image, with its file offset."""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Iterable
from typing import Any

from .args import EXIT_OK, OptionError, add_force_share_option, help_formatter, open_for_reading
from .render.output import emit


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..dump import SECTIONS

    p = sub.add_parser(
        "dump", formatter_class=help_formatter,
        help="print every field of an image's structures with its file offset",
        description=textwrap.dedent("""\
            Decode one kind of on-disk structure of a qcow2 image and print each field
            with the byte offset in the file where it lies, its size and its value,
            under the qcow2 specification's field names.  For debugging images: the
            structures are decoded as they are, with no more checks than decoding needs
            (qemu-img has no equivalent).

            header      the header fields (and the backing file name)
            extensions  each header extension, its data decoded where the spec declares it
            l1          the active L1 table's entries
            l2          each L2 table's entries: guest offset, kind, host offset
            refcounts   the refcount table, each block's counts as runs
            snapshots   each snapshot table entry
            bitmaps     each bitmap directory entry and its bitmap table

            Tables leave out their all-zero entries (and runs of refcount 0) unless --all.
            Tables are read one at a time, so a dump of a large image streams.
            """),
        epilog=textwrap.dedent("""\
            examples:
              qcow2kit dump header disk.qcow2
              qcow2kit dump l2 --l1-index 3 --output=json disk.qcow2
            """))
    p.add_argument("section", choices=SECTIONS, help="what to dump")
    p.add_argument("--output", choices=["human", "json"], default="human",
                   help="output format (default: human)")
    p.add_argument("--all", dest="everything", action="store_true",
                   help="include all-zero table entries (and runs of refcount 0)")
    p.add_argument("--l1-index", type=int, metavar="N",
                   help="l2: only the table under L1 entry N")
    add_force_share_option(p)
    p.add_argument("filename", help="the image")
    p.set_defaults(func=run)


def _hex(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, int):
        return str(v)
    return f"{v:#x}" if v > 9 else str(v)


def _field_lines(recs: Iterable[dict[str, Any]], indent: str = "") -> Iterable[str]:
    for r in recs:
        yield f"{indent}{r['offset']:#014x}  {r['size']:>5}  {r['field']:<28} {_hex(r['value'])}\n"


def _human(section: str, items: Iterable[dict[str, Any]]) -> Iterable[str]:
    if section == "header":
        yield f"{'OFFSET':<14}  {'SIZE':>5}  {'FIELD':<28} VALUE\n"
        yield from _field_lines(items)
        return
    for it in items:
        if section == "extensions":
            yield f"extension {it['type']:#010x} ({it['name']}) at {it['offset']:#x}, " \
                  f"{it['length']} bytes\n"
            yield from _field_lines(it["fields"], "  ")
        elif section in ("snapshots", "bitmaps"):
            yield f"{section[:-1]} {it['index']} at {it['offset']:#x}\n"
            yield from _field_lines(it["fields"], "  ")
            for e in it.get("table", []):
                what = "all ones" if e["all_ones"] else f"data at {e['data_offset']:#x}"
                yield f"  table[{e['index']}] at {e['offset']:#x} = {e['value']:#x} ({what})\n"
        elif section == "l1":
            yield f"l1[{it['index']}] at {it['offset']:#x} = {it['value']:#x} (l2 table at " \
                  f"{it['l2_offset']:#x}{', copied' if it['copied'] else ''})\n"
        elif section == "l2":
            yield f"L2 table of l1[{it['l1_index']}] at {it['offset']:#x}\n"
            for e in it["entries"]:
                extra = (f" {e['compressed_size']} bytes compressed" if e["compressed"]
                         else (", copied" if e["copied"] else "") + (", zero" if e["zero"]
                                                                       else ""))
                sub = (f", subclusters {e['subcluster_bitmap']:#018x}"
                       if "subcluster_bitmap" in e else "")
                yield f"  [{e['index']}] at {e['offset']:#x} = {e['value']:#x}: guest " \
                      f"{e['guest_offset']:#x} {e['kind']} host {e['host_offset']:#x}" \
                      f"{extra}{sub}\n"
        else:                                                    # refcounts
            yield f"refcount table[{it['index']}] at {it['offset']:#x} = {it['value']:#x}\n"
            for r in it["runs"]:
                last = r["first_cluster"] + r["count"] - 1
                yield f"  clusters {r['first_cluster']}..{last}: refcount {r['refcount']}\n"


def run(args: argparse.Namespace) -> int:
    from .. import dump

    if args.l1_index is not None and args.section != "l2":
        raise OptionError("--l1-index is for the l2 section")
    with open_for_reading(args.filename, force_share=args.force_share, metadata_only=True,
                          follow_backing=False) as img:
        s = args.section
        items: Iterable[dict[str, Any]]
        if s == "l2":
            items = dump.l2(img, l1_index=args.l1_index, everything=args.everything)
        elif s in ("l1", "refcounts", "bitmaps"):
            items = getattr(dump, s)(img, everything=args.everything)
        else:
            items = getattr(dump, s)(img)
        if args.output == "json":
            emit("[")
            for i, it in enumerate(items):          # one item at a time: tables stream
                emit(("," if i else "") + "\n    " + json.dumps(it))
            emit("\n]\n")
        else:
            for line in _human(s, items):
                emit(line)
    return EXIT_OK
