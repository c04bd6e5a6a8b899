"""Declarations of qcow2's on-disk structures (construct), without I/O.

The error funnel: all decoding of file bytes into structures goes through
:func:`parse`, the one place where construct's failures (and short input)
become :class:`~qcow2kit.errors.Qcow2Error` s naming the structure (``field``)
and its file offset.  The file's path is not known here; it is added in one
place, :meth:`Qcow2Error.locate <qcow2kit.errors.Qcow2Error.locate>`, by the
image front that read the bytes.

:func:`field_offsets` gives where each field of a fixed-size declaration
lies, so no module writes a structure's field offset as a literal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import construct

from ..errors import InvalidHeaderError, Qcow2Error


def parse(struct: construct.Construct, data: bytes, *, what: str, offset: int,
          error: type[Qcow2Error] = InvalidHeaderError, **context: Any) -> Any:
    """Parse ``data`` (read from file ``offset``) with ``struct``; errors name ``what`` and ``offset``.

    Input shorter than a fixed-size ``struct`` is refused as cut short (construct would
    say "stream read less than specified amount"); any other construct failure is
    turned into ``error`` too.
    """
    try:
        size = struct.sizeof(**context)
    except construct.SizeofError:
        size = None
    if size is not None and len(data) < size:
        raise error(f"{what} is cut short ({len(data)} of {size} bytes)", field=what,
                    offset=offset)
    try:
        return struct.parse(data, **context)
    except construct.ConstructError as exc:
        raise error(f"cannot decode {what}: {exc.__class__.__name__}: {exc}",
                    field=what, offset=offset) from exc


def build(struct: construct.Construct, value: Any, **context: Any) -> bytes:
    """Encode ``value`` with ``struct`` (used by the writer and by round-trip tests)."""
    return struct.build(value, **context)


class Field(NamedTuple):
    """Where a field of a fixed-size declaration lives: byte offset, size, declaration."""

    name: str
    offset: int
    size: int
    subcon: construct.Construct


def field_offsets(struct: construct.Struct) -> Mapping[str, Field]:
    """Every named field of the fixed-size ``struct``, in order, with its byte offset."""
    out: dict[str, Field] = {}
    pos = 0
    for sc in struct.subcons:
        size = sc.sizeof()
        if sc.name:
            out[sc.name] = Field(sc.name, pos, size, sc)
        pos += size
    return out


def offset_of(struct: construct.Struct, name: str) -> int:
    """Byte offset of field ``name`` inside ``struct`` (e.g. a snapshot entry's ``l1_size``: 8)."""
    return field_offsets(struct)[name].offset
