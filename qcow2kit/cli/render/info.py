"""``qemu-img info`` output: JSON (QEMU's writer) and the human form.

The human form follows block/qapi.c (``bdrv_image_info_dump``,
``bdrv_snapshot_dump``, the recursive format-specific dump) and
``size_to_str`` (util/cutils.c).
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Sequence

from .qemujson import QAPI_STRUCTS, element_type, ordered_items, to_qemu_json


def render_info_json(info: Mapping[str, Any]) -> str:
    """``qemu-img info --output=json`` for one image (with the final newline)."""
    return to_qemu_json(info, qapi_type="ImageInfo") + "\n"


def render_info_chain_json(infos: Sequence[Mapping[str, Any]]) -> str:
    """``qemu-img info --backing-chain --output=json``: a list of ImageInfo."""
    return to_qemu_json(list(infos), qapi_type="ImageInfo") + "\n"



# --------------------------------------------------------------------------
# qemu-img info, human form
# --------------------------------------------------------------------------

_SIZE_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def size_to_str(n: int) -> str:
    """QEMU's ``size_to_str``: 3 significant digits and a binary unit.

    The unit switches one step early, so that the number stays below 1000
    (1000 KiB shows as "0.977 MiB").  ``0`` is "0 B".
    """
    n = int(n) & 0xFFFFFFFFFFFFFFFF           # the C argument is a uint64_t
    _, exp = math.frexp(n / (1000.0 / 1024.0))
    i = int((exp - 1) / 10)                   # C division truncates toward zero
    div = 1 << (i * 10)
    return "%0.3g %sB" % (n / div, _SIZE_SUFFIXES[i])


def _c_pad(s: str, width: int, limit: int, left: bool = True) -> bytes:
    """printf("%-*s") on a string cut to ``limit - 1`` bytes (pstrcpy), in bytes."""
    raw = s.encode("utf-8", "surrogateescape")[: limit - 1]
    pad = b" " * max(0, width - len(raw))
    return raw + pad if left else pad + raw


def render_snapshot_table(snapshots: Sequence[Mapping[str, Any]]) -> str:
    """The ``Snapshot list:`` table (header, then one line per snapshot).

    Dates are local time, as QEMU's ``localtime_r``: set ``TZ`` to compare.
    """
    lines = ["%-10s%-17s%8s%20s%13s%11s\n" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")]
    for sn in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
        clock_ns = sn["vm-clock-sec"] * 1_000_000_000 + sn["vm-clock-nsec"]
        secs = clock_ns // 1_000_000_000
        clock = "%02d:%02d:%02d.%03d" % (secs // 3600, (secs // 60) % 60, secs % 60,
                                        (clock_ns // 1_000_000) % 1000)
        icount = sn.get("icount")
        icount_s = "" if icount is None or icount == -1 or icount == 0xFFFFFFFFFFFFFFFF \
            else str(icount)
        # "%-9s %-16s %8s%20s%13s%11s": id_str is char[128], name char[256]
        line = (_c_pad(sn["id"], 9, 128) + b" " + _c_pad(sn["name"], 16, 256) + b" "
                + ("%8s%20s%13s%11s\n" % (size_to_str(sn["vm-state-size"]), date, clock,
                                          icount_s)).encode())
        lines.append(line.decode("utf-8", "surrogateescape"))
    return "".join(lines)


def _dump_value(out: list[str], value: Any, type_ref: Any, indent: int) -> None:
    if isinstance(value, Mapping):
        _dump_dict(out, value, type_ref, indent)
    elif isinstance(value, (list, tuple)):
        _dump_list(out, value, element_type(type_ref), indent)
    elif value is True or value is False:
        out.append("true" if value else "false")
    elif isinstance(value, int):
        out.append(str(int(value)))
    elif isinstance(value, float):
        out.append("%.17g" % value)
    elif isinstance(value, str):
        out.append(value)
    else:
        raise TypeError(f"cannot dump {type(value).__name__}")


def _is_composite(value: Any) -> bool:
    return isinstance(value, (Mapping, list, tuple))


def _dump_dict(out: list[str], d: Mapping[str, Any], type_ref: Any, indent: int) -> None:
    for key, value, typ in ordered_items(d, type_ref):
        composite = _is_composite(value)
        out.append("%s%s:%s" % (" " * (4 * indent), key.replace("-", " "),
                                "\n" if composite else " "))
        _dump_value(out, value, typ, indent + 1)
        if not composite:
            out.append("\n")


def _dump_list(out: list[str], items: Sequence[Any], elem_type: Any, indent: int) -> None:
    for i, value in enumerate(items):
        composite = _is_composite(value)
        out.append("%s[%d]:%s" % (" " * (4 * indent), i, "\n" if composite else " "))
        _dump_value(out, value, elem_type, indent + 1)
        if not composite:
            out.append("\n")


def render_info_human(info: Mapping[str, Any]) -> str:
    """``qemu-img info`` human output for one image, from its JSON-form dict."""
    out: list[str] = []
    actual = info.get("actual-size")
    disk = "unavailable" if actual is None else size_to_str(actual)
    out.append("image: %s\nfile format: %s\nvirtual size: %s (%d bytes)\ndisk size: %s\n"
               % (info["filename"], info["format"], size_to_str(info["virtual-size"]),
                  info["virtual-size"], disk))
    if info.get("encrypted"):
        out.append("encrypted: yes\n")
    if info.get("cluster-size") is not None:
        out.append("cluster_size: %d\n" % info["cluster-size"])
    if info.get("dirty-flag"):
        out.append("cleanly shut down: no\n")
    backing = info.get("backing-filename")
    if backing is not None:
        out.append("backing file: %s" % backing)
        full = info.get("full-backing-filename")
        if full is None:
            out.append(" (cannot determine actual path)")
        elif full != backing:
            out.append(" (actual path: %s)" % full)
        out.append("\n")
        if info.get("backing-filename-format") is not None:
            out.append("backing file format: %s\n" % info["backing-filename-format"])
    snapshots = info.get("snapshots")
    if snapshots is not None:
        out.append("Snapshot list:\n")
        out.append(render_snapshot_table(snapshots))
    spec = info.get("format-specific")
    if spec is not None:
        out.append("Format specific information:\n")
        data_type = QAPI_STRUCTS["ImageInfoSpecific"].variants.get(spec.get("type"))
        data_ref = dict(QAPI_STRUCTS[data_type].members)["data"] if data_type else None
        data = spec.get("data")
        if _is_composite(data):
            _dump_value(out, data, data_ref, 1)
        elif data is not None:
            _dump_value(out, data, None, 1)
    return "".join(out)


def render_info_chain_human(infos: Sequence[Mapping[str, Any]]) -> str:
    """``qemu-img info --backing-chain``: the images separated by a blank line."""
    return "\n".join(render_info_human(i) for i in infos)
