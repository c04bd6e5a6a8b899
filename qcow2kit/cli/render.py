"""Output formatting that matches qemu-img 7.2 byte for byte.

This is the only module that formats what the command line prints.  It knows:

* how QEMU orders the members of a JSON object.  ``qemu-img`` builds a QDict
  (qobject/qdict.c) from its QAPI structs and prints it by iterating the
  hash table: 512 buckets, bucket = tdb hash of the key modulo 512, every
  bucket a list with the newest insertion at its head, buckets visited in
  index order (:func:`qdict_order`).  The insertion order is the order in
  which the QAPI output visitor visits the members, i.e. the order they are
  declared in qapi/block-core.json and qapi/crypto.json (:data:`QAPI_STRUCTS`).
* QEMU's JSON writer (util/json-writer.c): 4-space indentation, ``"key": value``,
  empty containers, string escapes (:func:`to_qemu_json`).
* ``qemu-img map``'s hand-written JSON lines (:func:`map_entry_json`) and its
  human table (:func:`render_map_human`).
* ``qemu-img info``'s human output (block/qapi.c ``bdrv_image_info_dump``,
  ``bdrv_snapshot_dump``, the recursive format-specific dump) and
  ``size_to_str`` (util/cutils.c).

The renderers return text; only :func:`emit`, :func:`error` and
:func:`progress_bar` at the end of the module write to a stream.  Input dicts
use the JSON (QAPI) member names, as ``qemu-img --output=json`` prints them;
their Python order does not matter for members the schema knows (members it
does not know are taken as inserted after the known ones, in dict order).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "QDICT_BUCKET_MAX",
    "QAPI_STRUCTS",
    "qdict_hash",
    "qdict_order",
    "to_qemu_json",
    "render_info_json",
    "render_info_chain_json",
    "render_check_json",
    "render_check_human",
    "render_measure_json",
    "map_entry_json",
    "render_map_json",
    "render_map_human",
    "size_to_str",
    "render_snapshot_table",
    "render_info_human",
    "render_info_chain_human",
    "emit",
    "error",
    "progress_bar",
]

# --------------------------------------------------------------------------
# QDict iteration order
# --------------------------------------------------------------------------

QDICT_BUCKET_MAX = 512   # qobject/qdict.c


def qdict_hash(key: str) -> int:
    """The tdb hash QEMU's QDict uses for ``key`` (32-bit unsigned result).

    The value starts as 0x238F13AF times the byte length; every byte ``c`` at
    index ``i`` adds ``c << (i*5 % 24)``; the result is scrambled as a linear
    congruential step.  All arithmetic wraps at 32 bits.
    """
    data = key.encode("utf-8", "surrogateescape")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(keys: Sequence[str]) -> list[str]:
    """The order a QDict iterates keys that were inserted in ``keys`` order.

    Buckets in increasing index; within a bucket the newest insertion first.
    A key inserted twice keeps its first position (QEMU replaces the value).
    """
    buckets: dict[int, list[str]] = {}
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            continue
        seen.add(key)
        buckets.setdefault(qdict_hash(key) % QDICT_BUCKET_MAX, []).append(key)
    out: list[str] = []
    for index in sorted(buckets):
        out.extend(reversed(buckets[index]))
    return out


# --------------------------------------------------------------------------
# QAPI member declaration order (QEMU 7.2) == QDict insertion order
# --------------------------------------------------------------------------
#
# A type reference is None (scalar / enum / list of scalars), a struct name,
# or a one-element list [struct name] for a list of structs.  A union is a
# struct with a discriminator: its base members come first, then the members
# of the variant struct chosen by the discriminator's value.

class _Struct:
    __slots__ = ("members", "discriminator", "variants")

    def __init__(self, members: Iterable[tuple[str, Any]],
                 discriminator: str | None = None,
                 variants: Mapping[str, str] | None = None) -> None:
        self.members = tuple(members)
        self.discriminator = discriminator
        self.variants = dict(variants or {})


def _plain(*names: str) -> list[tuple[str, Any]]:
    return [(n, None) for n in names]


QAPI_STRUCTS: dict[str, _Struct] = {
    # qapi/block-core.json
    "ImageInfo": _Struct(
        _plain("filename", "format", "dirty-flag", "actual-size", "virtual-size",
               "cluster-size", "encrypted", "compressed", "backing-filename",
               "full-backing-filename", "backing-filename-format")
        + [("snapshots", ["SnapshotInfo"]),
           ("backing-image", "ImageInfo"),
           ("format-specific", "ImageInfoSpecific")]),
    "SnapshotInfo": _Struct(
        _plain("id", "name", "vm-state-size", "date-sec", "date-nsec",
               "vm-clock-sec", "vm-clock-nsec", "icount")),
    "ImageInfoSpecific": _Struct(
        _plain("type"), "type",
        {"qcow2": "ImageInfoSpecificQCow2Wrapper",
         "vmdk": "ImageInfoSpecificVmdkWrapper",
         "luks": "QCryptoBlockInfoLUKSWrapper",
         "rbd": "ImageInfoSpecificRbdWrapper",
         "file": "ImageInfoSpecificFileWrapper"}),
    "ImageInfoSpecificQCow2Wrapper": _Struct([("data", "ImageInfoSpecificQCow2")]),
    "ImageInfoSpecificVmdkWrapper": _Struct([("data", "ImageInfoSpecificVmdk")]),
    "QCryptoBlockInfoLUKSWrapper": _Struct([("data", "QCryptoBlockInfoLUKS")]),
    "ImageInfoSpecificRbdWrapper": _Struct([("data", "ImageInfoSpecificRbd")]),
    "ImageInfoSpecificFileWrapper": _Struct([("data", "ImageInfoSpecificFile")]),
    "ImageInfoSpecificQCow2": _Struct(
        _plain("compat", "data-file", "data-file-raw", "extended-l2",
               "lazy-refcounts", "corrupt", "refcount-bits")
        + [("encrypt", "ImageInfoSpecificQCow2Encryption"),
           ("bitmaps", ["Qcow2BitmapInfo"]),
           ("compression-type", None)]),
    "ImageInfoSpecificQCow2Encryption": _Struct(
        _plain("format"), "format",
        {"aes": "QCryptoBlockInfoQCow", "luks": "QCryptoBlockInfoLUKS"}),
    "Qcow2BitmapInfo": _Struct(_plain("name", "granularity", "flags")),
    "ImageInfoSpecificVmdk": _Struct(
        _plain("create-type", "cid", "parent-cid") + [("extents", ["ImageInfo"])]),
    "ImageInfoSpecificRbd": _Struct(_plain("encryption-format")),
    "ImageInfoSpecificFile": _Struct(_plain("extent-size-hint")),
    "ImageCheck": _Struct(
        _plain("filename", "format", "check-errors", "image-end-offset",
               "corruptions", "leaks", "corruptions-fixed", "leaks-fixed",
               "total-clusters", "allocated-clusters", "fragmented-clusters",
               "compressed-clusters")),
    "BlockMeasureInfo": _Struct(_plain("required", "fully-allocated", "bitmaps")),
    # qapi/crypto.json
    "QCryptoBlockInfoQCow": _Struct([]),
    "QCryptoBlockInfoLUKS": _Struct(
        _plain("cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg",
               "hash-alg", "payload-offset", "master-key-iters", "uuid")
        + [("slots", ["QCryptoBlockInfoLUKSSlot"])]),
    "QCryptoBlockInfoLUKSSlot": _Struct(_plain("active", "iters", "stripes", "key-offset")),
}

# When a dict's type is not known from its parent, the first of these whose
# members include all of the dict's keys is assumed.
_GUESS_ORDER = (
    "ImageInfo", "ImageCheck", "BlockMeasureInfo", "SnapshotInfo",
    "ImageInfoSpecific", "ImageInfoSpecificQCow2", "ImageInfoSpecificQCow2Encryption",
    "QCryptoBlockInfoLUKS", "QCryptoBlockInfoLUKSSlot", "Qcow2BitmapInfo",
    "ImageInfoSpecificVmdk", "ImageInfoSpecificRbd", "ImageInfoSpecificFile",
)


def _members(d: Mapping[str, Any], type_name: str) -> list[tuple[str, Any]]:
    """Members of ``type_name`` in visit order, variant members resolved from ``d``."""
    struct = QAPI_STRUCTS[type_name]
    members = list(struct.members)
    if struct.discriminator is not None:
        variant = struct.variants.get(str(d.get(struct.discriminator)))
        if variant is not None:
            members += _members(d, variant)
    return members


def _guess_type(d: Mapping[str, Any]) -> str | None:
    keys = set(d)
    for name in _GUESS_ORDER:
        if keys <= {m for m, _ in _members(d, name)}:
            return name
    return None


def _ordered_items(d: Mapping[str, Any], type_ref: Any) -> list[tuple[str, Any, Any]]:
    """``(key, value, member type)`` of ``d`` in the order QEMU prints them."""
    type_name = type_ref if isinstance(type_ref, str) else None
    if type_name not in QAPI_STRUCTS:
        type_name = _guess_type(d)
    members = dict(_members(d, type_name)) if type_name else {}
    rank = {name: i for i, name in enumerate(members)}
    known = sorted((k for k in d if k in rank), key=rank.__getitem__)
    inserted = known + [k for k in d if k not in rank]
    return [(k, d[k], members.get(k)) for k in qdict_order(inserted)]


def _element_type(type_ref: Any) -> Any:
    if isinstance(type_ref, list) and type_ref:
        return type_ref[0]
    return None


# --------------------------------------------------------------------------
# QEMU's JSON writer
# --------------------------------------------------------------------------

def _c_bytes(s: str) -> bytes:
    """The bytes QEMU would hold for ``s``: surrogate escapes (``os.fsdecode``)
    go back to their raw byte, any other lone surrogate to an encoded
    surrogate (which QEMU's decoder rejects, as it would the original)."""
    try:
        return s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return b"".join(bytes([ord(c) - 0xDC00]) if 0xDC80 <= ord(c) <= 0xDCFF
                        else c.encode("utf-8", "surrogatepass") for c in s)


def _qemu_codepoints(raw: bytes) -> Iterable[int]:
    """Decode like QEMU's ``mod_utf8_codepoint()``: -1 for every invalid
    sequence (QEMU prints U+FFFD for it).

    Learned from its behaviour: one -1 per stray continuation byte or 0xFE/0xFF;
    a truncated sequence is one -1 covering its lead byte and the continuation
    bytes present; 5- and 6-byte forms, overlong forms (except C0 80, which is
    modified UTF-8's NUL), surrogates, noncharacters and code points above
    U+10FFFF are one -1 each.
    """
    i, n = 0, len(raw)
    while i < n:
        lead = raw[i]
        if lead < 0x80:
            yield lead
            i += 1
            continue
        if lead < 0xC0 or lead >= 0xFE:
            yield -1
            i += 1
            continue
        length = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4 if lead < 0xF8 \
            else 5 if lead < 0xFC else 6
        cp = lead & (0x7F >> length)
        j = i + 1
        while j < i + length and j < n and 0x80 <= raw[j] < 0xC0:
            cp = (cp << 6) | (raw[j] & 0x3F)
            j += 1
        truncated = j < i + length
        i = j
        if truncated:
            yield -1
        elif length == 2 and cp == 0:
            yield 0
        elif cp < (0x80, 0x800, 0x10000, 0x200000, 0x4000000)[length - 2]:
            yield -1
        elif (cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF or 0xFDD0 <= cp <= 0xFDEF
              or (cp & 0xFFFE) == 0xFFFE):
            yield -1
        else:
            yield cp


_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n",
            0x0D: "\\r", 0x09: "\\t"}


def _quote(s: str) -> str:
    """A JSON string as QEMU writes it: printable ASCII stays literal, the
    usual short escapes, ``\\uXXXX`` (upper-case hex, surrogate pairs beyond
    the BMP) for everything else, U+FFFD for invalid UTF-8."""
    out = ['"']
    for cp in _qemu_codepoints(_c_bytes(s)):
        if cp in _ESCAPES:
            out.append(_ESCAPES[cp])
            continue
        if cp < 0:
            cp = 0xFFFD
        if cp > 0xFFFF:
            cp -= 0x10000
            out.append("\\u%04X\\u%04X" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF)))
        elif cp < 0x20 or cp >= 0x7F:
            out.append("\\u%04X" % cp)
        else:
            out.append(chr(cp))
    out.append('"')
    return "".join(out)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return "%.17g" % value
    if isinstance(value, str):
        return _quote(value)
    raise TypeError(f"cannot render {type(value).__name__} as QEMU JSON")


def _write(out: list[str], value: Any, type_ref: Any, depth: int, pretty: bool) -> None:
    if isinstance(value, Mapping):
        _write_container(out, "{", "}", _ordered_items(value, type_ref), depth, pretty)
    elif isinstance(value, (list, tuple)):
        elem = _element_type(type_ref)
        items = [(None, v, elem) for v in value]
        _write_container(out, "[", "]", items, depth, pretty)
    else:
        out.append(_scalar(value))


def _write_container(out: list[str], opening: str, closing: str,
                     items: Sequence[tuple[str | None, Any, Any]], depth: int,
                     pretty: bool) -> None:
    # json-writer.c: every member starts on a new line indented one level
    # deeper; the closing bracket always gets a newline at the container's
    # own level, even when there are no members ("[\n    ]").
    out.append(opening)
    inner = "\n" + " " * (4 * (depth + 1))
    for i, (key, val, typ) in enumerate(items):
        if i:
            out.append(",")
            out.append(inner if pretty else " ")
        elif pretty:
            out.append(inner)
        if key is not None:
            out.append(_quote(key))
            out.append(": ")
        _write(out, val, typ, depth + 1, pretty)
    if pretty:
        out.append("\n" + " " * (4 * depth))
    out.append(closing)


def to_qemu_json(obj: Any, pretty: bool = True, qapi_type: str | None = None) -> str:
    """``obj`` as QEMU's ``qobject_to_json[_pretty]()`` writes it (no final newline).

    Dict members are ordered as a QDict holding them would iterate them; the
    insertion order comes from ``qapi_type`` (a key of :data:`QAPI_STRUCTS`) or
    is guessed from the keys.  For a list, ``qapi_type`` names its elements.
    """
    out: list[str] = []
    type_ref: Any = qapi_type
    if isinstance(obj, (list, tuple)) and qapi_type is not None:
        type_ref = [qapi_type]
    _write(out, obj, type_ref, 0, pretty)
    return "".join(out)


def render_info_json(info: Mapping[str, Any]) -> str:
    """``qemu-img info --output=json`` for one image (with the final newline)."""
    return to_qemu_json(info, qapi_type="ImageInfo") + "\n"


def render_info_chain_json(infos: Sequence[Mapping[str, Any]]) -> str:
    """``qemu-img info --backing-chain --output=json``: a list of ImageInfo."""
    return to_qemu_json(list(infos), qapi_type="ImageInfo") + "\n"


def render_check_json(check: Mapping[str, Any]) -> str:
    """``qemu-img check --output=json`` (ImageCheck)."""
    return to_qemu_json(check, qapi_type="ImageCheck") + "\n"


def render_measure_json(measure: Mapping[str, Any]) -> str:
    """``qemu-img measure --output=json`` (BlockMeasureInfo)."""
    return to_qemu_json(measure, qapi_type="BlockMeasureInfo") + "\n"


def render_check_human(check: Mapping[str, Any]) -> str:
    """The summary ``qemu-img check`` prints on stdout (qemu-img.c
    ``dump_human_image_check``), from an ImageCheck dict.

    Only the summary: the per-cluster ``ERROR``/``Leaked cluster`` lines go to
    stderr, and the repair report of ``-r`` is not included.
    """
    corruptions = check.get("corruptions") or 0
    leaks = check.get("leaks") or 0
    errors = check.get("check-errors") or 0
    out: list[str] = []
    if not (corruptions or leaks or errors):
        out.append("No errors were found on the image.\n")
    else:
        if corruptions:
            out.append("\n%d errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image may corrupt it.\n"
                       % corruptions)
        if leaks:
            out.append("\n%d leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.\n" % leaks)
        if errors:
            out.append("\n%d internal errors have occurred during the check.\n" % errors)
    total = check.get("total-clusters") or 0
    allocated = check.get("allocated-clusters") or 0
    if total and allocated:
        fragmented = check.get("fragmented-clusters") or 0
        compressed = check.get("compressed-clusters") or 0
        out.append("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n"
                   % (allocated, total, allocated * 100.0 / total,
                      fragmented * 100.0 / allocated, compressed * 100.0 / allocated))
    if check.get("image-end-offset"):
        out.append("Image end offset: %d\n" % check["image-end-offset"])
    return "".join(out)


# --------------------------------------------------------------------------
# qemu-img map
# --------------------------------------------------------------------------

def _bool(v: Any) -> str:
    return "true" if v else "false"


def map_entry_json(entry: Mapping[str, Any]) -> str:
    """One ``qemu-img map --output=json`` entry (qemu-img.c ``dump_map_entry``).

    Fixed order start, length, depth, present, zero, data, then offset only
    when the entry has one; no separator and no newline.
    """
    text = ('{ "start": %d, "length": %d, "depth": %d, "present": %s, "zero": %s, "data": %s'
            % (entry["start"], entry["length"], entry["depth"], _bool(entry["present"]),
               _bool(entry["zero"]), _bool(entry["data"])))
    if entry.get("offset") is not None:
        text += ', "offset": %d' % entry["offset"]
    return text + "}"


def render_map_json(entries: Iterable[Mapping[str, Any]]) -> str:
    """The whole ``qemu-img map --output=json`` output.

    ``[``, the entries joined by ``,\\n``, then ``]\\n``.
    """
    return "[" + ",\n".join(map_entry_json(e) for e in entries) + "]\n"


def _hash_hex(n: int) -> str:
    # printf("%#x"): "0x..." except for zero, which is plain "0"
    return "%#x" % n if n else "0"


def render_map_human(entries: Iterable[Mapping[str, Any]]) -> str:
    """``qemu-img map`` human output.

    Entries need ``filename`` (the file the data lives in) besides the JSON
    members.  Only entries with data that does not read as zeroes are listed.
    Raises ``ValueError`` where qemu-img fails: data without a host offset
    ("File contains external, encrypted or compressed clusters.").
    """
    lines = ["%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File")]
    for e in entries:
        if e["data"] and e.get("offset") is None:
            raise ValueError("File contains external, encrypted or compressed clusters.")
        if e["data"] and not e["zero"]:
            lines.append("%-16s%-16s%-16s%s\n" % (
                _hash_hex(e["start"]), _hash_hex(e["length"]),
                _hash_hex(e.get("offset") or 0), e.get("filename") or ""))
    return "".join(lines)


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
        _dump_list(out, value, _element_type(type_ref), indent)
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
    for key, value, typ in _ordered_items(d, type_ref):
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


# --------------------------------------------------------------------------
# Writing (the one place the command line prints)
# --------------------------------------------------------------------------

PROG = "qcow2kit"


def _write_text(stream: Any, text: str) -> None:
    # names from os.fsdecode() carry undecodable bytes as surrogate escapes:
    # write them back as the original bytes, as qemu-img prints them
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        stream.flush()
        buffer.write(text.encode("utf-8", "surrogateescape"))
        buffer.flush()
    else:
        stream.write(text)
        stream.flush()


def emit(text: str, stream: Any = None) -> None:
    """Write rendered ``text`` as is to stdout (or ``stream``)."""
    import sys
    _write_text(sys.stdout if stream is None else stream, text)


SPOOL_IN_MEMORY = 16 << 20   # output held in memory before it spills to a temporary file


def _regular_file_position(raw: Any) -> int | None:
    """Where output to ``raw`` starts, when it is a regular file we may cut back."""
    import fcntl
    import stat
    try:
        fd = raw.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw.flush()
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:   # `>>`: writes go to the end
            return os.fstat(fd).st_size
        return os.lseek(fd, 0, os.SEEK_CUR)
    except (AttributeError, OSError, ValueError):
        return None


def emit_chunks(chunks: Iterable[bytes], stream: Any = None, *, all_or_nothing: bool = False
                ) -> None:
    """Write already-encoded output chunks to stdout (or ``stream``).

    By default they are written as they come.  With ``all_or_nothing`` an error
    part-way through leaves stdout as it was: output to a regular file is
    streamed and cut back on an error; to anything else (a pipe, a terminal) it
    is kept (in memory up to SPOOL_IN_MEMORY, then in an unlinked temporary
    file) until ``chunks`` is exhausted, and only then copied out.
    """
    import shutil
    import sys
    import tempfile

    out = sys.stdout if stream is None else stream
    raw = getattr(out, "buffer", None)

    def write(data: bytes) -> None:
        if raw is not None:
            raw.write(data)
        else:
            out.write(data.decode("utf-8", "surrogateescape"))

    start = _regular_file_position(raw) if all_or_nothing else None
    if not all_or_nothing or start is not None:
        # Streamed.  Into a regular file, an error cuts the file back to where this
        # output began, which is the same as never having written it, at no cost.
        try:
            for chunk in chunks:
                write(chunk)
        except BaseException:
            if start is not None and raw is not None:
                raw.flush()
                os.ftruncate(raw.fileno(), start)
                os.lseek(raw.fileno(), start, os.SEEK_SET)
            raise
        finally:
            if raw is not None:
                raw.flush()
            out.flush()
        return
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        for chunk in chunks:
            spool.write(chunk)
        spool.seek(0)
        if raw is not None:
            out.flush()
            shutil.copyfileobj(spool, raw, 1 << 20)
            raw.flush()
        else:
            while True:
                block = spool.read(1 << 20)
                if not block:
                    break
                write(block)
        out.flush()


def error(message: str, stream: Any = None) -> None:
    """One error line on stderr, ``qcow2kit: message`` (qemu-img's shape)."""
    import sys
    _write_text(sys.stderr if stream is None else stream, f"{PROG}: {message}\n")


class progress_bar:  # noqa: N801 - used as a function: ``with progress_bar(n) as advance``
    """Context manager yielding ``advance(nbytes)``; shows a bar on stderr when
    ``enabled`` (tqdm), does nothing otherwise.

    ``total`` is the number of bytes that will really be read and written (it
    may be given later, through ``advance.start(total)``, once it is known); the
    rate shown is the rate of that work, not of skipped holes.  When the block
    ends without an error, the bar is replaced by one summary line that stays:
    the bytes done, the time and the rate (with ``of_size``, the size of the
    whole disk they belong to)."""

    def __init__(self, total: int | None = None, *, enabled: bool = True, stream: Any = None,
                 what: str = "copied", of_size: int | None = None) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream
        self.what = what
        self.of_size = of_size
        self.done = 0
        self._bar: Any = None
        self._t0 = 0.0

    def _out(self) -> Any:
        import sys
        return self.stream if self.stream is not None else sys.stderr

    def start(self, total: int) -> None:
        """Set the total (bytes to be done) and show the bar."""
        self.total = total
        if self.enabled and self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                             file=self._out(), leave=False, dynamic_ncols=True)
        self._t0 = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> "progress_bar":
        if self.total is not None:
            self.start(self.total)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.enabled and exc_type is None:
            took = max(time.monotonic() - self._t0, 1e-9)
            line = f"{self.what} {_human_bytes(self.done)} in {took:.2f} s"
            if self.done:
                line += f" ({_human_bytes(int(self.done / took))}/s)"
            if self.of_size is not None:
                line += (f"; {_human_bytes(max(0, self.of_size - self.done))} of the "
                         f"{_human_bytes(self.of_size)} disk read as zeros and were skipped")
            _write_text(self._out(), line + "\n")


def _human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB' (binary units, one decimal)."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------
# qemu-img map, vectorized (numpy extent batches -> output bytes)
# --------------------------------------------------------------------------
#
# The map engine hands over extents as numpy structured arrays (EXTENT_DTYPE);
# a 256 GiB image can have millions of them, so nothing below runs Python per
# line.  Rows are formatted a block at a time in a fixed-width uint8 matrix,
# one row per line: constant text in fixed columns, every number right-aligned
# in a field as wide as the widest value of the batch (with leading zeroes),
# texts of varying length left-aligned and padded.  A boolean matrix of the
# same shape marks the cells that belong to the output, so ``mat[mask]``
# (row-major) is the block's text.  Decimal digits come from a table of all
# 4-digit groups (stored four cells at a time through a uint32 view), hex
# digits from a byte -> 2 digits table; masks, file names and the
# flag-dependent texts are rows of small tables, gathered and stored as single
# ``np.void`` items (one per row, not one per cell).

import functools  # noqa: E402  (kept next to the code that needs them)
from typing import Iterator  # noqa: E402

import numpy as np  # noqa: E402

try:  # the engine's definition, once qcow2kit/mapping.py exists
    from qcow2kit.mapping import EXTENT_DTYPE  # type: ignore[attr-defined]
except ImportError:  # until then (or during a circular import): the same layout
    EXTENT_DTYPE = np.dtype([("start", "<u8"), ("length", "<u8"), ("offset", "<u8"),
                             ("depth", "<u2"), ("kind", "u1"), ("flags", "u1")])

# extent flag bits (qcow2kit.mapping)
_F_PRESENT, _F_ZERO, _F_DATA, _F_OFFSET = 1, 2, 4, 8

MAP_HUMAN_ERROR = "File contains external, encrypted or compressed clusters."
MAP_HUMAN_HEADER = "%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File")

_ROWS = 16384                   # lines formatted at a time at most ...
_SCRATCH = 4 << 20              # ... and at most this many cells (bounds the scratch memory)
_CHUNK = 65536                  # lines per chunk yielded at most (bounds the output buffer)
_DEC4 = np.frombuffer(b"".join(b"%04d" % i for i in range(10000)), dtype=np.uint32)
_HEX2 = np.frombuffer(b"".join(b"%02x" % i for i in range(256)), dtype=np.uint16)
_POW10 = [10 ** k for k in range(1, 20)]           # all below 2**64
_POW16 = [16 ** k for k in range(1, 16)]


class MapRenderError(ValueError):
    """``qemu-img map`` (human form) refuses the image.

    ``str()`` is qemu-img's exact message; ``index`` (counting every extent
    passed in, from 0), ``start`` and ``length`` name the extent."""

    def __init__(self, index: int, start: int, length: int) -> None:
        super().__init__(MAP_HUMAN_ERROR)
        self.index, self.start, self.length = index, start, length

    def __str__(self) -> str:
        return MAP_HUMAN_ERROR


def _u64(column: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(column, dtype=np.uint64)


def _top(column: np.ndarray, where: np.ndarray | None = None) -> int:
    if where is None:
        return int(column.max())
    return int(np.max(column, where=where, initial=0))


def _ndigits(v: np.ndarray, top: int, powers: Sequence[int]) -> np.ndarray:
    """Digit count of every value of ``v`` (0 has one digit), as indices; ``top``
    is the largest value that matters (larger ones count as ``top``'s)."""
    nd = np.ones(len(v), dtype=np.uint8)
    for p in powers:
        if p > top:
            break
        nd += v >= np.uint64(p)
    return nd.astype(np.intp)


def _dec_width(top: int) -> int:
    """Width of a decimal field for values up to ``top``: whole 4-digit groups."""
    return 4 * -(-len(str(top)) // 4)


def _void(table: np.ndarray) -> np.ndarray:
    """The rows of a 2-D table as one 1-D array of opaque items (``np.void``):
    a row is then gathered and stored as one item, much faster than cell by cell."""
    table = np.ascontiguousarray(table)
    return table.view(np.dtype((np.void, table.shape[1] * table.itemsize)))[:, 0]


def _cells(mat: np.ndarray, col: int, width: int) -> np.ndarray:
    """Cells ``[col, col + width)`` of every row of ``mat``, as one void item per row."""
    return mat[:, col:col + width].view(np.dtype((np.void, width * mat.itemsize)))[:, 0]


@functools.lru_cache(maxsize=None)
def _right_keep(width: int) -> np.ndarray:
    """Item k keeps the last k of ``width`` cells (k = 0 .. width)."""
    return _void(np.arange(width) >= width - np.arange(width + 1)[:, None])


@functools.lru_cache(maxsize=None)
def _left_keep(width: int) -> np.ndarray:
    """Item k keeps the first k of ``width`` cells (k = 0 .. 32; more keeps all)."""
    return _void(np.arange(width) < np.arange(33)[:, None])


def _text_table(texts: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Texts padded to one width: (void items, void masks of their cells, their
    lengths, the width)."""
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    width = max(1, int(lengths.max()))
    table = np.frombuffer(b"".join(t.ljust(width) for t in texts),
                          dtype=np.uint8).reshape(len(texts), width)
    return _void(table), _void(np.arange(width) < lengths[:, None]), lengths, width


class _Layout:
    """One line's cells: template text and mask, and where the variable fields go."""

    def __init__(self) -> None:
        self.text = bytearray()
        self.keep: list[bool] = []
        self.fields: dict[str, tuple[int, int]] = {}

    def const(self, text: bytes, keep: bool = True) -> None:
        self.text += text
        self.keep += [keep] * len(text)

    def align(self, to: int) -> None:
        while len(self.text) % to:
            self.const(b" ", keep=False)

    def field(self, name: str, width: int, align: int = 1, fill: bytes = b" ") -> None:
        self.align(align)
        self.fields[name] = (len(self.text), width)
        self.const(fill * width, keep=False)

    def scratch(self, lines: int) -> tuple[np.ndarray, np.ndarray]:
        """A text and a mask matrix for a block of lines (as many as ``lines``,
        within :data:`_ROWS` and :data:`_SCRATCH`), the constant cells filled."""
        rows = max(1, min(lines, _ROWS, _SCRATCH // max(1, len(self.text))))
        mat = np.empty((rows, len(self.text)), dtype=np.uint8)
        mat[:] = np.frombuffer(bytes(self.text), dtype=np.uint8)
        mask = np.empty((rows, len(self.text)), dtype=bool)
        mask[:] = np.array(self.keep, dtype=bool)
        return mat, mask


class _Output:
    """The bytes of one chunk, appended block by block into one buffer.

    The buffer is sized for the widest possible lines; pages past the end of
    the real text are never touched."""

    def __init__(self, lead: bytes, rows: int, width: int) -> None:
        self.buf = np.empty(len(lead) + rows * width, dtype=np.uint8)
        self.buf[:len(lead)] = np.frombuffer(lead, dtype=np.uint8)
        self.pos = len(lead)

    def add(self, mat: np.ndarray, mask: np.ndarray) -> None:
        piece = mat[mask]
        self.buf[self.pos:self.pos + len(piece)] = piece
        self.pos += len(piece)

    def bytes(self, trim: int = 0) -> bytes:
        return self.buf[:self.pos - trim].tobytes()


# --- JSON ------------------------------------------------------------------

def _put_dec(m32: np.ndarray, mask: np.ndarray, v: np.ndarray, nd: np.ndarray,
             col: int, width: int) -> None:
    """The decimal digits of ``v`` (all below ``10**width``) right-aligned in cells
    ``[col, col + width)`` (``col`` and ``width`` multiples of 4), of which only
    the last ``nd`` are kept.  ``m32``: the text matrix seen as uint32 words."""
    word = col // 4
    q = v
    for j in range(width // 4 - 1, -1, -1):     # least significant group last
        if j:
            q2 = q // np.uint64(10000)           # (// by a constant is fast; divmod not)
            r = q - q2 * np.uint64(10000)
            q = q2
        else:
            r = q
        m32[:, word + j] = _DEC4[r.view(np.int64)]
    _cells(mask, col, width)[:] = _right_keep(width)[nd]


# the members after depth, for every value of flags & 15: the booleans, then
# the key of the offset when it is valid
_JSON_TAILS = [(', "present": %s, "zero": %s, "data": %s%s'
                % (_bool(f & _F_PRESENT), _bool(f & _F_ZERO), _bool(f & _F_DATA),
                   ', "offset": ' if f & _F_OFFSET else "")).encode()
               for f in range(16)]
_JSON_TAIL_TXT, _JSON_TAIL_KEEP, _, _JSON_TAIL_W = _text_table(_JSON_TAILS)


def _json_layout(ws: int, wl: int, wd: int, wo: int) -> _Layout:
    lay = _Layout()
    lay.const(b'{ "start": ')
    lay.field("start", ws, 4)
    lay.const(b', "length": ')
    lay.field("length", wl, 4)
    lay.const(b', "depth": ')
    lay.field("depth", wd, 4)
    lay.field("tail", _JSON_TAIL_W)
    lay.field("offset", wo, 4)
    lay.const(b"},\n")
    lay.align(4)
    return lay


def _render_json(batch: np.ndarray, first: bool) -> Iterator[bytes]:
    """The JSON lines of ``batch`` (not empty), separated by ",\\n", in chunks
    of at most :data:`_CHUNK` lines; each chunk leads with "[" (the very first)
    or the ",\\n" held back from the line before it."""
    n = len(batch)
    flags = np.ascontiguousarray(batch["flags"], dtype=np.uint8)
    has_off = (flags & _F_OFFSET) != 0
    tops = (_top(batch["start"]), _top(batch["length"]), _top(batch["depth"]),
            _top(batch["offset"], has_off))
    lay = _json_layout(*(_dec_width(t) for t in tops))
    mat, mask = lay.scratch(n)
    rows = len(mat)
    tail_txt, tail_keep = _cells(mat, *lay.fields["tail"]), _cells(mask, *lay.fields["tail"])
    for c in range(0, n, _CHUNK):
        out = _Output(b"[" if first and not c else b",\n", min(n - c, _CHUNK), mat.shape[1])
        end = min(n, c + _CHUNK)
        for a in range(c, end, rows):
            b = min(end, a + rows)
            m, k = mat[:b - a], mask[:b - a]
            m32 = m.view(np.uint32)
            for name, top in zip(("start", "length", "depth", "offset"), tops):
                v = _u64(batch[name][a:b])
                if name == "offset":
                    v = v * has_off[a:b]         # 0 where not valid (and no digits kept)
                nd = _ndigits(v, top, _POW10)
                if name == "offset":
                    nd *= has_off[a:b]
                _put_dec(m32, k, v, nd, *lay.fields[name])
            idx = (flags[a:b] & 15).astype(np.intp)
            tail_txt[:b - a] = _JSON_TAIL_TXT[idx]
            tail_keep[:b - a] = _JSON_TAIL_KEEP[idx]
            out.add(m, k)
        yield out.bytes(trim=2)          # the last ",\n" only goes out if more follows


def _empty_map_entry(start: int) -> bytes:
    # qemu-img map of an empty range still dumps its initial zero-length entry
    return map_entry_json({"start": start, "length": 0, "depth": 0, "present": False,
                           "zero": False, "data": False}).encode()


def map_json_chunks(batches: Iterable[np.ndarray], *,
                    empty_start: int | None = 0) -> Iterator[bytes]:
    """The bytes of ``qemu-img map --output=json``: a chunk per non-empty batch
    (one per :data:`_CHUNK` extents of a larger batch), then the closing ``]\\n``.

    ``batches`` are arrays with the fields of :data:`EXTENT_DTYPE` (``kind`` is
    not used); empty ones may come anywhere.  The first chunk starts with
    ``[``; entries are separated by ``,\\n`` (held back at the end of a batch
    until the next entry shows up).  When no extent comes at all (an empty
    image, or ``--start-offset`` at or past its end) qemu-img still prints its
    initial zero-length entry, at ``empty_start``:
    ``[{ "start": 0, "length": 0, "depth": 0, "present": false, ...}]``.
    Numbers print as unsigned decimals (qemu-img prints int64, so the two agree
    below 2**63, all an image can hold).
    """
    first = True
    for batch in batches:
        if len(batch):
            yield from _render_json(batch, first)
            first = False
    if first:
        # empty_start=None: a listing that may legitimately be empty (map --order=host).
        yield (b"[]\n" if empty_start is None
               else b"[" + _empty_map_entry(empty_start) + b"]\n")
    else:
        yield b"]\n"


# --- human -----------------------------------------------------------------

def _hex_len(v: int) -> int:
    """Length of printf("%#x", v): "0" for 0, else "0x" and the digits."""
    return len("%#x" % v) if v else 1


class _FileNames:
    """The file names by depth as void items padded to one width, with masks."""

    def __init__(self, filenames: Sequence[str]) -> None:
        raw = [_c_bytes(f) for f in filenames]
        self.count = len(raw)
        self.text, self.keep, self.lengths, self.width = _text_table(raw or [b""])


def _human_layout(hex_fields: Sequence[tuple[int, int]], name_width: int) -> _Layout:
    lay = _Layout()
    for name, (digits, pad) in zip(("start", "length", "offset"), hex_fields):
        lay.field(name, 2 + digits, fill=b"0")   # "0x" and the digits, right-aligned
        lay.field(name + "_pad", pad)            # spaces up to 16 cells
    lay.field("file", name_width)
    lay.const(b"\n")
    return lay


def _render_human(batch: np.ndarray, names: _FileNames) -> Iterator[bytes]:
    """The human lines of ``batch`` (not empty; every extent printed), in
    chunks of at most :data:`_CHUNK` lines."""
    n = len(batch)
    depth_all = np.ascontiguousarray(batch["depth"], dtype=np.intp)
    if int(depth_all.max()) >= names.count:
        raise IndexError("no file name for depth %d" % int(depth_all.max()))
    cols = ("start", "length", "offset")
    tops = [_top(batch[c]) for c in cols]
    digits = [len("%x" % t) for t in tops]
    pads = [max(0, 16 - _hex_len(int(batch[c].min()))) for c in cols]
    # every name is stored at full width; the names this batch uses decide the field
    name_width = int(names.lengths[depth_all].max())
    lay = _human_layout(list(zip(digits, pads)), names.width if name_width else 0)
    mat, mask = lay.scratch(n)
    rows = len(mat)
    width = mat.shape[1]
    row_base = np.arange(rows, dtype=np.intp) * width
    fields = {name: (_cells(mat, *lay.fields[name]), _cells(mask, *lay.fields[name]))
              for name in ("file", *cols) if lay.fields[name][1]}
    pad_keep = {name: _cells(mask, *lay.fields[name + "_pad"])
                for name, pad in zip(cols, pads) if pad}
    for c in range(0, n, _CHUNK):
        out = _Output(b"", min(n - c, _CHUNK), width)
        end = min(n, c + _CHUNK)
        for a in range(c, end, rows):
            b = min(end, a + rows)
            m, k = mat[:b - a], mask[:b - a]
            for name, top, h, pad in zip(cols, tops, digits, pads):
                col, w = lay.fields[name]
                v = _u64(batch[name][a:b])
                nd = _ndigits(v, top, _POW16)
                nbytes = (h + 1) // 2
                big = v.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - nbytes:]
                m[:, col + 2:col + 2 + h] = _HEX2[big].view(np.uint8)[:, 2 * nbytes - h:]
                m[:, col + 1] = ord("0")
                # "0x" ends where the digits start; for 0 only its last digit is kept
                m.reshape(-1)[row_base[:b - a] + (col + 1 + h) - nd] = ord("x")
                shown = np.where(v == 0, 1, nd + 2)
                fields[name][1][:b - a] = _right_keep(w)[shown]
                if pad:
                    pad_keep[name][:b - a] = _left_keep(pad)[np.maximum(16 - shown, 0)]
            if name_width:
                d = depth_all[a:b]
                fields["file"][0][:b - a] = names.text[d]
                fields["file"][1][:b - a] = names.keep[d]
            out.add(m, k)
        yield out.bytes()


def map_human_chunks(batches: Iterable[np.ndarray],
                     filenames: Sequence[str]) -> Iterator[bytes]:
    """The bytes of ``qemu-img map`` (human form): the header, then a chunk
    per batch that has lines to print (one per :data:`_CHUNK` lines of more).

    ``filenames[depth]`` is the file an extent's offset refers to.  A line is
    printed for every extent with data that does not read as zeroes:
    ``printf("%#-16x%#-16x%#-16x%s\\n", start, length, offset, file)``.  Where
    qemu-img fails, at an extent with data but no valid offset (compressed,
    encrypted or external clusters), the lines before it are yielded and then
    :class:`MapRenderError` (a ``ValueError`` whose text is qemu-img's message)
    is raised.  Like qemu-img, a zero extent with data is only refused when it
    is the very first extent: ``dump_map_entry`` turns every later one into a
    plain zero entry before it gets to check it.
    """
    yield MAP_HUMAN_HEADER.encode()
    names = _FileNames(filenames)
    index = 0                       # extents seen before this batch
    for batch in batches:
        n = len(batch)
        if n == 0:
            continue
        flags = np.ascontiguousarray(batch["flags"], dtype=np.uint8)
        data = (flags & _F_DATA) != 0
        bad = data & ((flags & (_F_OFFSET | _F_ZERO)) == 0)
        if index == 0 and data[0] and not flags[0] & _F_OFFSET:
            bad[0] = True
        stop = int(np.argmax(bad)) if bad.any() else n
        shown = np.flatnonzero((flags[:stop] & (_F_DATA | _F_ZERO)) == _F_DATA)
        if shown.size:
            yield from _render_human(batch if shown.size == n else batch[shown], names)
        if stop < n:
            raise MapRenderError(index + stop, int(batch["start"][stop]),
                                 int(batch["length"][stop]))
        index += n


__all__ += ["EXTENT_DTYPE", "MAP_HUMAN_ERROR", "MAP_HUMAN_HEADER", "MapRenderError",
            "map_json_chunks", "map_human_chunks"]


# --------------------------------------------------------------------------- bench order


def plain_json(obj: Any) -> str:
    """Ordinary indented JSON (for qcow2kit's own objects, which qemu-img has no form of)."""
    import json
    return json.dumps(obj, indent=2)


def render_bench_order_human(r: Mapping[str, Any]) -> str:
    """The human form of ``qcow2kit bench order``."""
    def secs(v: Any) -> str:
        return "-" if v is None else f"{v:.2f} s"

    g, h = r["guest"], r["host"]
    lines = [f"files: {', '.join(r['files'])}",
             f"{'order':<8}{'requests':>12}{'bytes':>16}{'model':>14}{'measured':>14}"]
    for name, d in (("guest", g), ("host", h)):
        lines.append(f"{name:<8}{d['requests']:>12}{d['bytes']:>16}"
                     f"{secs(d['model_seconds']):>14}{secs(d['measured_seconds']):>14}")
    lines.append(f"sequential bound: {secs(r['sequential_bound_seconds'])}")
    if h["model_seconds"]:
        lines.append(f"modelled speed-up of host order: {g['model_seconds'] / h['model_seconds']:.1f}x")
    if g["measured_seconds"] and h["measured_seconds"]:
        lines.append(f"measured here: {g['measured_seconds'] / h['measured_seconds']:.2f}x "
                     f"(page cache: {r['cache']})")
    m = r["model"]
    lines.append("model: " + ", ".join(f"{k}={v}" for k, v in m.items()))
    p = r.get("planning")
    if p and p.get("source") == "rmap":
        lines.append("host-order planning: from the reverse map (no L2 scan)")
    elif p:
        lines.append(f"host-order planning: {p['passes']} pass(es) over the L2 tables, "
                     f"{p['windows']} window(s) ({p.get('reason', '')})")
    return "\n".join(lines) + "\n"


def render_rmap_human(r: Mapping[str, Any]) -> str:
    """The human form of ``qcow2kit rmap``."""
    lines = []
    if r["action"] == "drop":
        lines.append("reverse map removed" if r["dropped"] else "no reverse map to remove")
        return "\n".join(lines) + "\n"
    m = r["rmap"]
    if not m["present"]:
        lines.append(f"reverse map: {m['reason']}")
    else:
        state = "valid" if m["valid"] else m["reason"]
        lines.append(f"reverse map: {state}")
        lines.append(f"  version {m['version']}, {m['size']} bytes at {m['offset']:#x}")
        lines.append(f"  {m['data-records']} data records, {m['compressed-records']} "
                     f"compressed records")
        if m.get("clusters") is not None:
            lines.append(f"  {m['clusters']} data clusters mapped ({m['units']} units of "
                         f"{m['unit-size']} bytes)")
    if r["action"] == "verify":
        if r["matches"]:
            lines.append("verify: the map matches the L2 tables")
        else:
            lines.append("verify: the map does NOT match the L2 tables:")
            lines.extend(f"  {d}" for d in r["differences"])
    return "\n".join(lines) + "\n"
