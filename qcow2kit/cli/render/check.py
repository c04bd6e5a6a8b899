"""``qemu-img check`` and ``qemu-img measure`` output (for the check and measure commands)."""

from __future__ import annotations

from typing import Any, Mapping

from .qemujson import to_qemu_json


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
