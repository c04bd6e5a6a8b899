"""QEMU's JSON, byte for byte: QDict member order and the JSON writer of QEMU 7.2.

``qemu-img`` builds a QDict (qobject/qdict.c) from its QAPI structs and prints
it by iterating the hash table: 512 buckets, bucket = tdb hash of the key
modulo 512, every bucket a list with the newest insertion at its head, buckets
visited in index order (:func:`qdict_order`).  The insertion order is the order
in which the QAPI output visitor visits the members, i.e. the order they are
declared in qapi/block-core.json and qapi/crypto.json (:data:`QAPI_STRUCTS`).
QEMU's JSON writer (util/json-writer.c): 4-space indentation, ``"key": value``,
empty containers, string escapes (:func:`to_qemu_json`).  Input dicts use the
JSON (QAPI) member names; their Python order does not matter for members the
schema knows (members it does not know are taken as inserted after the known
ones, in dict order).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence


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


def ordered_items(d: Mapping[str, Any], type_ref: Any) -> list[tuple[str, Any, Any]]:
    """``(key, value, member type)`` of ``d`` in the order QEMU prints them."""
    type_name = type_ref if isinstance(type_ref, str) else None
    if type_name not in QAPI_STRUCTS:
        type_name = _guess_type(d)
    members = dict(_members(d, type_name)) if type_name else {}
    rank = {name: i for i, name in enumerate(members)}
    known = sorted((k for k in d if k in rank), key=rank.__getitem__)
    inserted = known + [k for k in d if k not in rank]
    return [(k, d[k], members.get(k)) for k in qdict_order(inserted)]


def element_type(type_ref: Any) -> Any:
    if isinstance(type_ref, list) and type_ref:
        return type_ref[0]
    return None


# --------------------------------------------------------------------------
# QEMU's JSON writer
# --------------------------------------------------------------------------

def c_bytes(s: str) -> bytes:
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
    for cp in _qemu_codepoints(c_bytes(s)):
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
        _write_container(out, "{", "}", ordered_items(value, type_ref), depth, pretty)
    elif isinstance(value, (list, tuple)):
        elem = element_type(type_ref)
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
