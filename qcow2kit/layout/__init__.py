"""Declarations of qcow2's on-disk structures (construct), without I/O.

All parsing of file bytes into structures goes through :func:`parse`, which
turns construct's exceptions into :class:`~qcow2kit.errors.InvalidHeaderError`
naming the structure and the file offset.
"""

from __future__ import annotations

from typing import Any

import construct

from ..errors import InvalidHeaderError, Qcow2Error


def parse(struct: construct.Construct, data: bytes, *, what: str, offset: int,
          error: type[Qcow2Error] = InvalidHeaderError, **context: Any) -> Any:
    """Parse ``data`` (read from file ``offset``) with ``struct``; errors name ``what`` and ``offset``."""
    try:
        return struct.parse(data, **context)
    except construct.ConstructError as exc:
        raise error(f"cannot decode {what}: {exc.__class__.__name__}: {exc}",
                    field=what, offset=offset) from exc


def build(struct: construct.Construct, value: Any, **context: Any) -> bytes:
    """Encode ``value`` with ``struct`` (used by the writer and by round-trip tests)."""
    return struct.build(value, **context)
