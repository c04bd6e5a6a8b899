"""Editing persistent dirty bitmaps offline, as ``qemu-img bitmap`` does.

:func:`edit_bitmaps` runs a sequence of operations (add, remove, clear, enable,
disable, merge) on one bitmap of an image, in the given order, with the checks,
defaults and messages of qemu-img 7.2: an operation that fails stops the sequence
(the ones before it stay done) and raises a :class:`qcow2kit.errors.Qcow2Error`
whose message is qemu-img's, ``Operation OP on bitmap NAME failed: WHY``.
:func:`add_bitmap`, :func:`remove_bitmap`, :func:`clear_bitmap`,
:func:`set_bitmap_enabled` and :func:`merge_bitmap` are the single operations.

Each operation is one crash-safe edit through :class:`qcow2kit.inplace.InplaceEditor`:
the new bitmap tables, data clusters and directory go to newly allocated clusters,
then the bitmaps header extension is switched by one write, then the old clusters
are freed.  A bitmap's bits are held in memory while it is rewritten (as QEMU holds
them), one bit per granule.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from . import spec
from .errors import BitmapNotFoundError, NotQcow2Error, Qcow2Error
from .image import Image
from .inplace import InplaceEditor, check_extension_room
from .layout import bitmaps as B
from .layout import header as H

OPS = ("add", "remove", "clear", "enable", "disable", "merge")

_MAX_PHYS_SIZE = 0x20000000      # BME_MAX_PHYS_SIZE: bytes of bitmap data QEMU accepts
_MAX_TABLE_SIZE = 0x8000000      # BME_MAX_TABLE_SIZE: bitmap table entries


class BitmapOperationError(Qcow2Error):
    """A ``qemu-img bitmap`` operation refused (the bitmap is in use, sizes differ...)."""


def default_granularity(cluster_size: int) -> int:
    """QEMU's default bitmap granularity: the cluster size, within [4 KiB, 64 KiB]."""
    return min(65536, max(4096, cluster_size))


@dataclass
class _Dir:
    """The bitmap directory being edited, and the clusters the edit frees afterwards."""

    entries: list[B.BitmapDirEntry]
    bits: dict[int, np.ndarray]          # entry index -> new packed bits (little-endian)
    frees: list[tuple[int, int]]         # (byte offset, clusters) to free after the switch


def _read_dir(ed: InplaceEditor) -> tuple[list[B.BitmapDirEntry], list[tuple[int, int]]]:
    """The directory entries QEMU sees, and the clusters the directory itself takes."""
    img = ed.image
    assert img is not None
    ext = img.header.bitmaps_ext
    if ext is None or img.header.version < 3:
        return [], []
    img.bitmaps  # noqa: B018 - validates the directory as the reader does
    raw = ed.pread(ext["bitmap_directory_offset"], ext["bitmap_directory_size"])
    entries, _ = B.decode_bitmap_directory(raw, ext["nb_bitmaps"],
                                           offset=ext["bitmap_directory_offset"])
    n = -(-ext["bitmap_directory_size"] // ed.cluster_size)
    return entries, [(ext["bitmap_directory_offset"], n)] if n else []


def _clusters_of(ed: InplaceEditor, e: B.BitmapDirEntry) -> list[tuple[int, int]]:
    """The clusters a bitmap's table and data take (to free them)."""
    cs = ed.cluster_size
    if not e.bitmap_table_size:
        return []
    out = [(e.bitmap_table_offset, -(-e.bitmap_table_size * 8 // cs))]
    raw = ed.pread(e.bitmap_table_offset, e.bitmap_table_size * 8)
    table = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
    offs = table & np.uint64(spec.BME_TABLE_ENTRY_OFFSET_MASK)
    out.extend((int(o), 1) for o in offs[offs != 0].tolist())
    return out


def _set_ranges(bits: np.ndarray, ranges: Iterable[tuple[int, int]], gran: int) -> None:
    """Set, in the packed little-endian ``bits``, every granule that meets a byte range."""
    for a, n in ranges:
        g0, g1 = a // gran, -(-(a + n) // gran)
        b0, b1 = -(-g0 // 8), g1 // 8
        if b0 <= b1:
            bits[b0:b1] = 0xFF
            for g in range(g0, min(b0 * 8, g1)):
                bits[g >> 3] |= 1 << (g & 7)
            for g in range(max(b1 * 8, g0), g1):
                bits[g >> 3] |= 1 << (g & 7)
        else:                          # within one byte
            for g in range(g0, g1):
                bits[g >> 3] |= 1 << (g & 7)


def _inconsistent(name: str) -> BitmapOperationError:
    return BitmapOperationError(f"Bitmap '{name}' is inconsistent and cannot be used\n"
                                f"Try block-dirty-bitmap-remove to delete this bitmap from disk")


def _find(entries: list[B.BitmapDirEntry], name: str) -> int:
    key = os.fsencode(name)
    for i, e in enumerate(entries):
        if e.name == key:
            return i
    raise BitmapNotFoundError(f"Dirty bitmap '{name}' not found")


def _usable(entries: list[B.BitmapDirEntry], name: str) -> int:
    i = _find(entries, name)
    if entries[i].flags & spec.BME_FLAG_IN_USE:
        raise _inconsistent(name)
    return i


# ---------------------------------------------------------------------------- operations


def _op_add(ed: InplaceEditor, d: _Dir, name: str, granularity: int | None,
            enabled: bool) -> None:
    if not name:
        raise BitmapOperationError("Bitmap name cannot be empty")
    if any(e.name == os.fsencode(name) for e in d.entries):
        raise BitmapOperationError(f"Bitmap already exists: {name}")
    h = ed.header
    gran = default_granularity(h.cluster_size) if granularity is None else granularity
    if gran < 512 or gran & (gran - 1):
        raise BitmapOperationError("Granularity must be power of 2 and at least 512")
    gbits = gran.bit_length() - 1
    why = None
    size = h.size
    if h.version < 3:
        why = "Cannot store dirty bitmaps in qcow2 v2 files"
    elif gbits > spec.MAX_BITMAP_GRANULARITY_BITS:
        why = f"Granularity exceeds maximum ({1 << spec.MAX_BITMAP_GRANULARITY_BITS} bytes)"
    elif size > (_MAX_PHYS_SIZE << gbits) or size > ((_MAX_TABLE_SIZE * h.cluster_size) << gbits):
        why = "Too much space will be occupied by the bitmap. Use larger granularity"
    elif len(os.fsencode(name)) > spec.MAX_BITMAP_NAME_SIZE:
        why = f"Name length exceeds maximum ({spec.MAX_BITMAP_NAME_SIZE} characters)"
    elif len(d.entries) >= spec.MAX_BITMAPS:
        why = "Maximum number of persistent bitmaps is already reached"
    elif len(B.encode_bitmap_directory(d.entries)) + len(B.encode_bitmap_dir_entry(
            B.BitmapDirEntry(0, 0, 0, 1, gbits, b"", os.fsencode(name)))) \
            > spec.MAX_BITMAP_DIRECTORY_SIZE:
        why = "Not enough space in the bitmap directory"
    if why:
        raise BitmapOperationError(f"Can't make bitmap '{name}' persistent in "
                                   f"'{ed.path}': {why}")
    entries = -(-(-(-size // gran)) // (h.cluster_size * 8))
    d.entries.append(B.BitmapDirEntry(0, entries, spec.BME_FLAG_AUTO if enabled else 0,
                                      spec.BME_TYPE_DIRTY_TRACKING, gbits, b"",
                                      os.fsencode(name)))
    d.bits[len(d.entries) - 1] = np.zeros(entries * h.cluster_size, dtype=np.uint8)


def _op_remove(ed: InplaceEditor, d: _Dir, name: str) -> None:
    i = _find(d.entries, name)
    d.frees.extend(_clusters_of(ed, d.entries[i]))
    del d.entries[i]


def _op_clear(ed: InplaceEditor, d: _Dir, name: str) -> None:
    i = _usable(d.entries, name)
    e = d.entries[i]
    d.frees.extend(_clusters_of(ed, e))
    d.bits[i] = np.zeros(e.bitmap_table_size * ed.cluster_size, dtype=np.uint8)


def _op_enable(d: _Dir, name: str, enabled: bool) -> None:
    i = _usable(d.entries, name)
    e = d.entries[i]
    e.flags = (e.flags | spec.BME_FLAG_AUTO) if enabled else (e.flags & ~spec.BME_FLAG_AUTO)


def _op_merge(ed: InplaceEditor, d: _Dir, name: str, source: str,
              src_img: Image | None) -> None:
    i = _usable(d.entries, name)
    img = ed.image if src_img is None else src_img
    assert img is not None
    if src_img is None:
        _usable(d.entries, source)
    elif src_img.bitmap(source).in_use:
        raise _inconsistent(source)
    dst_size, src_size = ed.header.size, img.size
    if dst_size != src_size:
        raise BitmapOperationError(f"Bitmaps are of different sizes (destination size is "
                                   f"{dst_size}, source size is {src_size}) and can't be merged")
    e = d.entries[i]
    gran = 1 << e.granularity_bits
    assert ed.image is not None
    bits = np.zeros(e.bitmap_table_size * ed.cluster_size, dtype=np.uint8)
    _set_ranges(bits, ed.image.dirty_ranges(name), gran)
    _set_ranges(bits, img.dirty_ranges(source), gran)
    d.frees.extend(_clusters_of(ed, e))
    d.bits[i] = bits


# ---------------------------------------------------------------------------- commit


def _commit(ed: InplaceEditor, d: _Dir, old_dir: list[tuple[int, int]]) -> None:
    """New clusters written, the extension switched, the old clusters freed."""
    cs = ed.cluster_size
    plans = []
    need = 0
    for i, bits in sorted(d.bits.items()):
        e = d.entries[i]
        chunks = bits.reshape(-1, cs) if bits.shape[0] else bits.reshape(0, cs)
        nonzero = np.flatnonzero(chunks.any(axis=1))
        tclusters = -(-e.bitmap_table_size * 8 // cs)
        plans.append((i, chunks, nonzero, tclusters))
        need += tclusters + nonzero.shape[0]
    if d.entries and ed.extension(spec.EXT_BITMAPS) is None:    # fail before writing
        assert ed.image is not None
        check_extension_room(ed.image, spec.EXT_BITMAPS, H.BitmapsExtension.sizeof())
    dir_bytes_len = len(B.encode_bitmap_directory(d.entries))
    dir_clusters = -(-dir_bytes_len // cs)
    need += dir_clusters
    base = ed.allocate(need) if need else 0
    pos = base
    for i, chunks, nonzero, tclusters in plans:
        e = d.entries[i]
        table = np.zeros(e.bitmap_table_size, dtype=np.uint64)
        table_off = pos
        pos += tclusters * cs
        for k in nonzero.tolist():
            ed.write(pos, chunks[k].tobytes())
            table[k] = pos
            pos += cs
        raw_table = table.astype(">u8").tobytes()
        ed.write(table_off, raw_table + bytes(tclusters * cs - len(raw_table)))
        e.bitmap_table_offset = table_off
    if d.entries:
        dir_off = pos
        raw = B.encode_bitmap_directory(d.entries)
        ed.write(dir_off, raw + bytes(dir_clusters * cs - len(raw)))   # no stale bytes kept
        ext = H.BitmapsExtension.build({"nb_bitmaps": len(d.entries), "reserved32": 0,
                                        "bitmap_directory_size": len(raw),
                                        "bitmap_directory_offset": dir_off})
    if need:
        ed.sync_step()                                   # the new state, not referenced yet
    _switch(ed, ext if d.entries else None)
    # the old state's clusters, each once; a damaged old table (a bitmap left in use may
    # hold anything) must not take references it does not own: those are left as leaks
    ed.free(sorted(set(old_dir + d.frees)), lenient=True)


def _switch(ed: InplaceEditor, ext: bytes | None) -> None:
    """Make ``ext`` the bitmaps extension (None: no bitmaps), by one write.

    QEMU reads the extension only while the autoclear bit is set, and must never see
    the bit without the extension: a new extension is written while the bit is off and
    the bit set afterwards; when the last bitmap goes, the bit is cleared first."""
    rec = ed.extension(spec.EXT_BITMAPS)
    auto = ed.header.autoclear_features
    on = bool(auto & spec.AUTOCLEAR_BITMAPS)
    if ext is not None:
        if rec is not None:
            ed.replace_extension_data(spec.EXT_BITMAPS, ext)    # the switch when the bit is on
        else:
            ed.add_extension(spec.EXT_BITMAPS, ext)
        if not on:
            ed.set_header_field("autoclear_features", auto | spec.AUTOCLEAR_BITMAPS)
    else:
        if on:
            ed.set_header_field("autoclear_features", auto & ~spec.AUTOCLEAR_BITMAPS)
        if rec is not None:
            ed.remove_extension(spec.EXT_BITMAPS)


# ---------------------------------------------------------------------------- API

Op = tuple[str, "str | None"]     # ("merge", SOURCE) or (op, None)


def _not_a_format(path: str, fmt: str) -> Qcow2Error:
    return Qcow2Error(f"Could not open '{path}': only qcow2 and raw images are supported, "
                      f"not '{fmt}'")


def _open_source(path: str, fmt: str | None) -> Image | None:
    """The image a --merge source is read from (read-locked as qemu-img does); None for
    a raw file (it has no bitmaps)."""
    if fmt not in (None, "qcow2", "raw"):
        raise _not_a_format(path, fmt)
    try:
        if fmt == "raw":
            with open(path, "rb"):
                return None
        return Image.open(path, follow_backing=False)
    except NotQcow2Error:
        if fmt == "qcow2":
            raise Qcow2Error(f"Could not open '{path}': Image is not in qcow2 format") from None
        return None
    except OSError as exc:
        raise Qcow2Error(f"Could not open '{path}': Could not open '{path}': "
                         f"{exc.strerror}") from exc


def _raw_target(path: str, name: str, ops: Sequence[Op]) -> None:
    """qemu-img bitmap on a raw image: nothing to find, nowhere to store a bitmap."""
    op = ops[0][0]
    if op == "add":
        raise BitmapOperationError(f"Operation add on bitmap {name} failed: Can't store "
                                   f"persistent bitmaps to {path}: Operation not supported")
    raise BitmapNotFoundError(f"Operation {op} on bitmap {name} failed: Dirty bitmap "
                              f"'{name}' not found")


def edit_bitmaps(path: str | os.PathLike[str], name: str, ops: Sequence[Op], *,
                 granularity: int | None = None, add_disabled: bool = False,
                 add_dirty: Iterable[tuple[int, int]] = (),
                 source_file: str | os.PathLike[str] | None = None,
                 source_fmt: str | None = None, fmt: str | None = None) -> None:
    """Run ``ops`` on bitmap ``name`` of ``path`` in order, as ``qemu-img bitmap`` does.

    ``ops`` are ``(op, None)`` for add, remove, clear, enable and disable and
    ``("merge", SOURCE)``; ``granularity`` and ``add_disabled`` are add's (``None``:
    QEMU's default, :func:`default_granularity`); a merge reads SOURCE from
    ``source_file`` (format ``source_fmt``) when given, else from ``path``.  The first
    failing operation raises (earlier ones stay done) with qemu-img's message.  ``fmt``
    is the image's format: "qcow2", "raw" (no bitmaps, none can be stored) or None
    (a file that is not qcow2 is taken as raw, as QEMU probes it).
    """
    path = os.fspath(path)
    for op, _ in ops:
        if op not in OPS:
            raise ValueError(f"unknown bitmap operation {op!r}")
    if fmt not in (None, "qcow2", "raw"):
        raise _not_a_format(path, fmt)
    try:
        ed = InplaceEditor(path)
    except NotQcow2Error:
        if fmt == "qcow2":
            raise Qcow2Error(f"Could not open '{path}': Image is not in qcow2 format") from None
        ed = None
    if ed is None or fmt == "raw":
        if ed is not None:
            ed.close()
        if ops:
            _raw_target(path, name, ops)
        return
    with ed:
        src_img = None
        if source_file is not None:
            src_img = _open_source(os.fspath(source_file), source_fmt)
        try:
            for op, arg in ops:
                try:
                    _run_op(ed, op, arg, name, granularity, add_disabled, src_img,
                            source_file is not None, add_dirty)
                except Qcow2Error as exc:
                    exc.message = f"Operation {op} on bitmap {name} failed: {exc.message}"
                    exc.args = (exc.message, *exc.args[1:])
                    exc.field = exc.offset = None
                    raise
        finally:
            if src_img is not None:
                src_img.close()


def _run_op(ed: InplaceEditor, op: str, arg: str | None, name: str, granularity: int | None,
            add_disabled: bool, src_img: Image | None, other_file: bool,
            add_dirty: Iterable[tuple[int, int]] = ()) -> None:
    entries, old_dir = _read_dir(ed)
    d = _Dir(entries, {}, [])
    if op == "add":
        _op_add(ed, d, name, granularity, not add_disabled)
        e = d.entries[-1]
        _set_ranges(d.bits[len(d.entries) - 1], add_dirty, 1 << e.granularity_bits)
    elif op == "remove":
        _op_remove(ed, d, name)
    elif op == "clear":
        _op_clear(ed, d, name)
    elif op in ("enable", "disable"):
        before = [e.flags for e in d.entries]
        _op_enable(d, name, op == "enable")
        if [e.flags for e in d.entries] == before:
            return                                       # nothing changes on disk
    else:
        assert arg is not None
        if other_file and src_img is None:
            _usable(d.entries, name)
            raise BitmapNotFoundError(f"Dirty bitmap '{arg}' not found")
        _op_merge(ed, d, name, arg, src_img)
    _commit(ed, d, old_dir)


def add_bitmap(path: str | os.PathLike[str], name: str, granularity: int | None = None,
               enabled: bool = True, dirty: Iterable[tuple[int, int]] = ()) -> None:
    """Add a persistent bitmap (``qemu-img bitmap --add [-g G] [--disable]``), empty or
    with the guest ranges ``dirty`` marked (every granule they touch)."""
    edit_bitmaps(path, name, [("add", None)], granularity=granularity,
                 add_disabled=not enabled, add_dirty=dirty)


def remove_bitmap(path: str | os.PathLike[str], name: str) -> None:
    """Remove a persistent bitmap, in use or not (``qemu-img bitmap --remove``)."""
    edit_bitmaps(path, name, [("remove", None)])


def clear_bitmap(path: str | os.PathLike[str], name: str) -> None:
    """Mark every granule of a bitmap clean (``qemu-img bitmap --clear``)."""
    edit_bitmaps(path, name, [("clear", None)])


def set_bitmap_enabled(path: str | os.PathLike[str], name: str, enabled: bool) -> None:
    """``qemu-img bitmap --enable`` / ``--disable``: whether QEMU records writes in it."""
    edit_bitmaps(path, name, [("enable" if enabled else "disable", None)])


def merge_bitmap(path: str | os.PathLike[str], name: str, source: str,
                 source_file: str | os.PathLike[str] | None = None,
                 source_fmt: str | None = None) -> None:
    """Mark dirty in ``name`` what bitmap ``source`` marks (``qemu-img bitmap --merge``)."""
    edit_bitmaps(path, name, [("merge", source)], source_file=source_file,
                 source_fmt=source_fmt)


__all__ = ["OPS", "BitmapOperationError", "add_bitmap", "clear_bitmap", "default_granularity",
           "edit_bitmaps", "merge_bitmap", "remove_bitmap", "set_bitmap_enabled"]
