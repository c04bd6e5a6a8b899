"""Image information in the shape of ``qemu-img info --output=json`` (QEMU 7.2).

:func:`image_info` returns the same object qemu-img prints for one image;
:func:`chain_info` the list that ``--backing-chain`` prints.  Keys are
QEMU's (hyphenated), values computed from the image exactly as QEMU's
``bdrv_query_image_info`` and ``qcow2_get_specific_info`` do.
"""

from __future__ import annotations

import os
from typing import Any

from . import spec
from .errors import InvalidHeaderError
from .image import Image, RawImage
from .layout import header as H


def _actual_size(path: str) -> int | None:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return None


def _bitmap_flags(flags: int) -> list[str]:
    # The order qemu-img 7.2 prints them in (checked against an in-use bitmap).
    out = []
    if flags & spec.BME_FLAG_IN_USE:
        out.append("in-use")
    if flags & spec.BME_FLAG_AUTO:
        out.append("auto")
    return out


def encrypt_info(img: Image) -> dict[str, Any]:
    """The ``encrypt`` object of format-specific data (LUKS details decoded from the LUKS header)."""
    if img.header.crypt_method == spec.CRYPT_AES:
        return {"format": "aes"}
    from .layout.luks import luks_info

    ext = img.header.crypto_ext
    if ext is None:  # read_header refuses this already; kept for direct callers
        raise InvalidHeaderError("LUKS image without an encryption header",
                                 field="crypt_method",
                                 offset=H.field_offset("crypt_method")).locate(img.filename)
    raw = img.src.read_at(ext["offset"], ext["length"], field="LUKS header")
    return luks_info(raw)


def format_specific(img: Image) -> dict[str, Any]:
    h = img.header
    data: dict[str, Any]
    if h.version == 2:
        data = {"compat": "0.10", "compression-type": h.compression_name,
                "refcount-bits": h.refcount_bits}
    else:
        data = {"compat": "1.1", "compression-type": h.compression_name,
                "lazy-refcounts": h.lazy_refcounts}
        bitmaps = img.bitmaps
        if bitmaps:
            data["bitmaps"] = [{"flags": _bitmap_flags(b.flags), "name": b.name,
                                "granularity": b.granularity} for b in bitmaps]
        data["refcount-bits"] = h.refcount_bits
        if img.encrypted:
            data["encrypt"] = encrypt_info(img)
        if h.has_data_file:
            if h.data_file is not None:
                data["data-file"] = h.data_file
            data["data-file-raw"] = h.data_file_raw
        data["corrupt"] = h.corrupt
        data["extended-l2"] = h.extended_l2
    if h.version == 2 and img.encrypted:
        data["encrypt"] = encrypt_info(img)
    return {"type": "qcow2", "data": data}


def snapshot_info(img: Image) -> list[dict[str, Any]]:
    """The internal snapshots as ``qemu-img info --output=json`` lists them."""
    out: list[dict[str, Any]] = []
    for sn in img.snapshots:
        s: dict[str, Any] = {
            "icount": sn.icount, "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
            "name": sn.name, "date-sec": sn.date_sec, "date-nsec": sn.date_nsec,
            "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000, "id": sn.id,
            "vm-state-size": sn.vm_state_size}
        if s["icount"] is None:
            del s["icount"]
        out.append(s)
    return out


def image_info(img: Image | RawImage) -> dict[str, Any]:
    """``qemu-img info --output=json`` for one image."""
    info: dict[str, Any] = {"virtual-size": img.size, "filename": img.filename,
                            "format": img.format}
    if isinstance(img, RawImage):
        actual = _actual_size(img.filename)
        if actual is not None:
            info["actual-size"] = actual
        info["dirty-flag"] = False
        return info
    h = img.header
    if img.snapshots:
        info["snapshots"] = snapshot_info(img)
    info["cluster-size"] = img.cluster_size
    actual = _actual_size(img.filename)
    if actual is not None:
        info["actual-size"] = actual
    info["format-specific"] = format_specific(img)
    if img.encrypted:
        info["encrypted"] = True
    if h.backing_file:
        if h.backing_format:
            info["backing-filename-format"] = h.backing_format
        info["full-backing-filename"] = img.full_backing_filename
        info["backing-filename"] = h.backing_file
    info["dirty-flag"] = h.dirty
    return info


def chain_info(img: Image) -> list[dict[str, Any]]:
    """``qemu-img info --backing-chain --output=json``: one object per image, top first."""
    return [image_info(layer) for layer in img.chain()]
