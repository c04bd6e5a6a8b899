"""``qemu-img compare``'s words: the verdict lines and the progress text."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...compare import CompareResult


def verdict_lines(result: "CompareResult") -> str:
    """What qemu-img compare prints on stdout for ``result`` (without ``-q``)."""
    if result.strict and result.size_mismatch:
        return "Strict mode: Image size mismatch!\n"
    if result.status_mismatch is not None:
        return f"Strict mode: Offset {result.status_mismatch} block status mismatch!\n"
    lines = ""
    if result.size_mismatch and (result.mismatch is None
                                 or result.mismatch >= result.common_size):
        lines += "Warning: Image size mismatch!\n"
    if result.mismatch is not None:
        return lines + f"Content mismatch at offset {result.mismatch}!\n"
    return lines + "Images are identical.\n"


def progress_text(fraction: float) -> str:
    """qemu-img's progress (-p): the percentage done, rewritten in place."""
    return f"    ({min(fraction, 1.0) * 100:.2f}/100%)\r"
