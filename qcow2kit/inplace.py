"""In-place edits of an existing qcow2 image, in the order QEMU keeps for its own metadata.

:class:`InplaceEditor` holds the image through :class:`qcow2kit.writer.ImageWriter`
(QEMU's writer locks) and offers what an edit of metadata needs: new clusters
(refcounted, the first free run, with new refcount blocks when the run needs them),
freeing clusters, writing bytes, and patching the header and its extensions.

The order is QEMU's (block/qcow2-refcount.c): a refcount increase is on disk before
anything refers to the cluster; a reference is removed (and synced) before the
refcount drops; the switch from the old state to the new one is a single small
write in cluster 0.  A crash between any two steps leaves the old or the new state
plus, at worst, leaked clusters (``qemu-img check`` exit status 3, never 2).  Each
ordered step ends with :meth:`ImageWriter.step`, where a test can stop the process.

Images this cannot edit safely are refused: version 2 headers, the dirty or corrupt
bit set, unknown incompatible features (:class:`qcow2kit.image.Image` refuses those).
When new clusters lie past what the refcount table covers, a bigger table is made
first (new table and blocks past the end, one 12-byte header write to switch, the
old table freed); beyond QEMU's limit of the table, :class:`qcow2kit.errors.Qcow2Error`
is raised before anything is written.
"""

from __future__ import annotations

import os

import numpy as np

from . import spec
from . import tables as T
from .boolruns import true_runs
from .errors import (CorruptImageError, ImageNotFoundError, ImageOpenError, Qcow2Error,
                     UnsupportedFeatureError)
from .image import Image
from .image.header import Header, HeaderExtensionRecord
from .layout import header as H
from .locks import HELD_BY_WRITER, REFUSED_BY_WRITER, LockConflictError, first_conflict
from .writer import ImageWriter

SECTOR = 512
END_ENTRY = H.encode_extension(spec.EXT_END, b"")
_FRAME = H.ExtensionFrame.sizeof()


# ------------------------------------------------------------------ header and extensions


def set_header_field(w: ImageWriter, name: str, value: int) -> None:
    """Write one header field in place (its offset and encoding from the declaration)."""
    offset, raw = H.field_patch(name, value)
    w.pwrite(raw, offset)


def extension_area(header: Header) -> tuple[int, int]:
    """(offset of the end-of-extensions entry, end of the extension area incl. that entry)."""
    off = header.header_length
    for ext in header.extensions:
        off = ext.offset + len(H.encode_extension(ext.type, ext.data))
    return off, off + len(END_ENTRY)


def _extension_room(img: Image, ext_type: int, data_len: int) -> tuple[int, int | None]:
    """Where a new extension goes (the end entry's offset) and where the backing file
    name must move to make room (None: it stays); a Qcow2Error when cluster 0 is full."""
    h = img.header
    cs = img.cluster_size
    end_entry, _ = extension_area(h)
    entry_len = _FRAME + data_len + (-data_len % 8)
    new_end = end_entry + entry_len + len(END_ENTRY)   # the extension + new end entry
    target = None
    if h.backing_file_offset and h.backing_file_offset < new_end:
        target = (max(new_end, h.backing_file_offset + h.backing_file_size) + 7) // 8 * 8
        if target + h.backing_file_size > cs:
            raise Qcow2Error(f"no room in cluster 0 for header extension {ext_type:#010x}",
                             field="backing_file_offset",
                             offset=H.field_offset("backing_file_offset")).locate(img.filename)
    elif not h.backing_file_offset and new_end > cs:
        raise Qcow2Error(f"no room in cluster 0 for header extension {ext_type:#010x}",
                         field="header extension", offset=end_entry).locate(img.filename)
    return end_entry, target


def check_extension_room(img: Image, ext_type: int, data_len: int) -> None:
    """Raise the Qcow2Error :func:`publish_extension` would raise, before writing anything."""
    _extension_room(img, ext_type, data_len)


def publish_extension(w: ImageWriter, img: Image, ext_type: int, data: bytes) -> None:
    """Append a header extension: move the backing file name out of the way if needed
    (step), write the extension's data and a new end entry past the current end entry,
    then turn the current end entry into the new extension's frame with one aligned
    8-byte write (step).  Before that write the extension is invisible."""
    end_entry, target = _extension_room(img, ext_type, len(data))
    if w.pread(end_entry, len(END_ENTRY)) != END_ENTRY:
        raise Qcow2Error(f"no end-of-extensions entry at {end_entry:#x}; "
                         f"refusing to add an extension", field="header extension",
                         offset=end_entry).locate(img.filename)
    entry = H.encode_extension(ext_type, data)
    if target is not None:
        h = img.header
        w.pwrite(w.pread(h.backing_file_offset, h.backing_file_size), target)
        w.sync()
        set_header_field(w, "backing_file_offset", target)
        w.sync()
    w.step()                                                   # backing name out of the way
    w.pwrite(entry[_FRAME:] + END_ENTRY, end_entry + _FRAME)
    w.sync()
    w.pwrite(entry[:_FRAME], end_entry)    # one aligned 8-byte write: the end entry becomes it
    w.sync()
    w.step()                                                   # extension in the list


# ------------------------------------------------------------------ the editor


def _missing(reftable: np.ndarray, lo: int, hi: int) -> list[int]:
    """Indices in [lo, hi) of a refcount table with no refcount block (past its end too)."""
    idx = np.arange(lo, hi, dtype=np.int64)
    inside = idx < reftable.shape[0]
    has = np.zeros(idx.shape[0], dtype=bool)
    has[inside] = (reftable[idx[inside]] & np.uint64(spec.REFT_OFFSET_MASK)) != 0
    return idx[~has].tolist()


def _refuse_if_in_use(path: str) -> None:
    """QEMU's words when another process's locks forbid writing (the writer checks again)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        cls = ImageNotFoundError if isinstance(exc, FileNotFoundError) else ImageOpenError
        raise cls(f"Could not open '{path}': Could not open '{path}': {exc.strerror}",
                  exc.errno or 0, path, path=path) from exc
    try:
        reason = first_conflict(fd, HELD_BY_WRITER, REFUSED_BY_WRITER)
    except OSError:
        reason = None                       # no OFD locks here: the writer decides
    finally:
        os.close(fd)
    if reason:
        raise LockConflictError(f"Could not open '{path}': ", reason, path)


class InplaceEditor:
    """An existing image opened for in-place metadata edits (see the module's docstring).

    Use as a context manager; :attr:`image` is a fresh read-only view after each
    change of the header (:meth:`reload`).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        _refuse_if_in_use(self.path)
        self.writer = ImageWriter(self.path)
        self.image: Image | None = None
        try:
            self.reload()
        except BaseException:
            self.close()
            raise

    # -- state ---------------------------------------------------------------

    def reload(self) -> Image:
        """Read the header again (after it changed) and forget the refcount table."""
        if self.image is not None:
            self.image.close()
            self.image = None
        self.image = Image.open(self.path, follow_backing=False, locking=False)  # we hold them
        h = self.image.header
        if h.corrupt:
            raise UnsupportedFeatureError(
                f"Could not open '{self.path}': qcow2: Image is corrupt; cannot be opened "
                f"read/write", path=self.path)
        if h.dirty:
            raise UnsupportedFeatureError(
                f"{self.path}: the image is dirty (not closed cleanly with lazy refcounts); "
                f"run 'qemu-img check -r all' on it first", field="incompatible_features",
                offset=H.field_offset("incompatible_features"), path=self.path)
        self.cluster_size = h.cluster_size
        self.per_block = h.cluster_size * 8 >> h.refcount_order
        n_entries = h.refcount_table_clusters * h.cluster_size // 8
        self._reftable = T.decode_u64_table(
            self.writer.pread(h.refcount_table_offset, n_entries * 8)).copy()
        if self._reftable.shape[0] != n_entries:
            raise CorruptImageError("the refcount table runs past the end of the file",
                                    field="refcount_table_offset",
                                    offset=H.field_offset("refcount_table_offset"),
                                    path=self.path)
        self._free_hint = 0      # every cluster below it is in use (QEMU's free_cluster_index)
        return self.image

    @property
    def header(self) -> Header:
        assert self.image is not None
        return self.image.header

    def require_v3(self, message: str = "version 2 images are not edited in place") -> None:
        if self.header.version < 3:
            raise UnsupportedFeatureError(message, field="version",
                                          offset=H.field_offset("version")).locate(self.path)

    def close(self) -> None:
        if self.image is not None:
            self.image.close()
            self.image = None
        self.writer.close()

    def __enter__(self) -> "InplaceEditor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw I/O -------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        return self.writer.pread(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write bytes (not synced: :meth:`sync_step` ends a step)."""
        self.writer.pwrite(data, offset)

    def sync_step(self) -> None:
        """Make what was written durable and end one ordered step."""
        self.writer.sync()
        self.writer.step()

    # -- refcounts -----------------------------------------------------------

    def _block_offset(self, i: int) -> int:
        if i >= self._reftable.shape[0]:
            return 0
        off = int(self._reftable[i]) & spec.REFT_OFFSET_MASK
        if off and (off % self.cluster_size or off + self.cluster_size > self.writer.size):
            raise CorruptImageError(f"refcount block offset {off:#x} is invalid (refcount "
                                    f"table index {i})", field="refcount table entry",
                                    offset=self.header.refcount_table_offset + 8 * i,
                                    path=self.path)
        return off

    def _counts(self, i: int) -> np.ndarray | None:
        """The refcounts of block ``i`` (a writable copy), None when it has no block."""
        off = self._block_offset(i)
        if not off:
            return None
        return T.decode_refcount_block(self.writer.pread(off, self.cluster_size),
                                       self.header.refcount_order).copy()

    def refcount(self, cluster: int) -> int:
        counts = self._counts(cluster // self.per_block)
        return 0 if counts is None else int(counts[cluster % self.per_block])

    def _find_free(self, n: int) -> int:
        """The first cluster of the first run of ``n`` clusters with refcount 0."""
        per = self.per_block
        present = np.flatnonzero(self._reftable & np.uint64(spec.REFT_OFFSET_MASK))
        last = int(present[-1]) if present.shape[0] else -1
        run: int | None = None            # start of the free run reaching the current block
        for i in range(self._free_hint // per, last + 1):
            base = i * per
            counts = self._counts(i)
            if counts is None:
                run = max(base, self._free_hint) if run is None else run
                if base + per - run >= n:
                    return run
                continue
            free = counts == 0
            if self._free_hint > base:
                free[:self._free_hint - base] = False
            starts, ends = true_runs(free)
            a = -1
            for s, e in zip(starts.tolist(), ends.tolist()):
                a = run if (s == 0 and run is not None) else base + s
                if base + e - a >= n:
                    return a
            run = a if starts.shape[0] and int(ends[-1]) == per else None
        return run if run is not None else max((last + 1) * per, self._free_hint)

    def _missing_blocks(self, a: int, b: int) -> list[int]:
        """Refcount table indices covering clusters [a, b) that have no refcount block."""
        return _missing(self._reftable, a // self.per_block, (b - 1) // self.per_block + 1)

    def allocate(self, n: int) -> int:
        """Refcount ``n`` contiguous new clusters (synced, one step) and return the byte
        offset of the first.  They may hold a freed cluster's old bytes: write them whole."""
        self.require_v3()
        if n <= 0:
            raise ValueError("allocate at least one cluster")
        if -(-(self.writer.size // self.cluster_size + n) // self.per_block) * 8 > \
                spec.MAX_REFTABLE_SIZE:
            raise Qcow2Error(f"{n} more clusters would need a refcount table larger than "
                             f"QEMU's limit ({spec.MAX_REFTABLE_SIZE} bytes)",
                             field="refcount_table_clusters",
                             offset=H.field_offset("refcount_table_clusters"), path=self.path)
        k = 0
        for _ in range(64):
            start = self._find_free(n + k)
            m = len(self._missing_blocks(start, start + n + k))
            if m <= k:
                break
            k = m
        else:  # pragma: no cover - k only grows, by the few blocks a run can miss
            raise Qcow2Error("cannot place new refcount blocks", path=self.path)
        # shrink to exactly the blocks the final run misses (each shrink keeps it free)
        while True:
            missing = self._missing_blocks(start, start + n + k)
            if len(missing) == k:
                break
            k = len(missing)
        if missing and missing[-1] >= self._reftable.shape[0]:
            self._grow_reftable(missing[-1] + 1, start + n + k)
            return self.allocate(n)
        end = start + n + k
        cs = self.cluster_size
        order = self.header.refcount_order
        if self.writer.size < end * cs:
            self.writer.truncate(end * cs)       # zeros past the end: no one refers to them
        per = self.per_block
        block_at = {idx: start + n + j for j, idx in enumerate(missing)}
        # 1. existing blocks count the new clusters (data and new refcount blocks)
        for i in range(start // per, (end - 1) // per + 1):
            if i in block_at:
                continue
            counts = self._counts(i)
            assert counts is not None
            a, b = max(start, i * per) - i * per, min(end, (i + 1) * per) - i * per
            if counts[a:b].any():
                raise CorruptImageError(f"cluster {i * per + a + int(np.flatnonzero(counts[a:b])[0])}"
                                        f" chosen as free is in use", path=self.path)
            counts[a:b] = 1
            self.writer.pwrite(T.encode_refcount_block(counts, order), self._block_offset(i))
        if missing:
            self.writer.sync()
            # 2. the new refcount blocks, describing the run (themselves included)
            for i, c in block_at.items():
                counts = np.zeros(per, dtype=np.uint64)
                a, b = max(start, i * per) - i * per, min(end, (i + 1) * per) - i * per
                counts[a:b] = 1
                self.writer.pwrite(T.encode_refcount_block(counts, order), c * cs)
            self.writer.sync()
            # 3. the refcount table refers to them
            for i, c in block_at.items():
                self._reftable[i] = c * cs
                self.writer.pwrite(int(c * cs).to_bytes(8, "big"),
                                   self.header.refcount_table_offset + 8 * i)
        self.sync_step()
        self._free_hint = end
        return start * cs

    def _grow_reftable(self, need_entries: int, after: int) -> None:
        """A bigger refcount table, as QEMU's qcow2_refcount_area makes one: the new table
        and the refcount blocks that describe it go past ``after`` and the end of the file
        (counted before anything refers to them), the header is switched to it by one
        12-byte write (offset and size side by side), then the old table is freed."""
        cs = self.cluster_size
        per = self.per_block
        order = self.header.refcount_order
        old = self._reftable
        old_n = old.shape[0]
        area = max(after, -(-self.writer.size // cs))
        entries, nblocks = max(need_entries, old_n), 0
        for _ in range(64):                 # both only grow, by a few clusters at most
            tclusters = -(-entries * 8 // cs)
            end = area + tclusters + nblocks
            if -(-end // per) > entries:
                entries = -(-end // per)
                continue
            missing = _missing(old, area // per, (end - 1) // per + 1)
            if len(missing) == nblocks:
                break
            nblocks = len(missing)
        else:  # pragma: no cover
            raise Qcow2Error("cannot lay out a new refcount table", path=self.path)
        if tclusters * cs > spec.MAX_REFTABLE_SIZE:
            raise Qcow2Error(f"a refcount table of {tclusters * cs} bytes would exceed QEMU's "
                             f"limit ({spec.MAX_REFTABLE_SIZE})",
                             field="refcount_table_clusters",
                             offset=H.field_offset("refcount_table_clusters"), path=self.path)
        entries = tclusters * cs // 8
        block_at = {idx: area + tclusters + j for j, idx in enumerate(missing)}
        self.writer.truncate(max(self.writer.size, end * cs))
        # 1. existing refcount blocks count the area's clusters in their ranges
        for i in range(area // per, (end - 1) // per + 1):
            if i in block_at:
                continue
            counts = self._counts(i)
            assert counts is not None
            a, b = max(area, i * per) - i * per, min(end, (i + 1) * per) - i * per
            if counts[a:b].any():
                raise CorruptImageError("clusters past the end of the file are in use",
                                        path=self.path)
            counts[a:b] = 1
            self.writer.pwrite(T.encode_refcount_block(counts, order), self._block_offset(i))
        self.writer.sync()
        # 2. the new blocks (each counts the area's clusters in its range, itself included)
        table = np.zeros(entries, dtype=np.uint64)
        table[:old_n] = old
        for i, c in block_at.items():
            counts = np.zeros(per, dtype=np.uint64)
            a, b = max(area, i * per) - i * per, min(end, (i + 1) * per) - i * per
            counts[a:b] = 1
            self.writer.pwrite(T.encode_refcount_block(counts, order), c * cs)
            table[i] = c * cs
        # 3. the new table, not yet referred to
        self.writer.pwrite(T.encode_u64_table(table), area * cs)
        self.sync_step()
        # 4. the switch: offset and size of the table in one write
        off_at, raw_off = H.field_patch("refcount_table_offset", area * cs)
        size_at, raw_size = H.field_patch("refcount_table_clusters", tclusters)
        if size_at != off_at + len(raw_off):
            raise AssertionError("refcount_table_offset and _clusters are not side by side")
        self.writer.pwrite(raw_off + raw_size, off_at)
        self.sync_step()
        old_off, old_clusters = self.header.refcount_table_offset, -(-old_n * 8 // cs)
        self.reload()
        # 5. nothing refers to the old table any more
        self.free([(old_off, old_clusters)])

    def free(self, ranges: "list[tuple[int, int]]", *, lenient: bool = False) -> int:
        """Drop one reference from each cluster of ``ranges`` (``(byte offset, clusters)``
        pairs), synced, one step.  Whatever referred to them must already be gone (synced).

        A cluster whose refcount is already 0 is an error, nothing written; with
        ``lenient`` (old metadata that may be damaged) its range is skipped instead, left
        to ``qemu-img check``.  Returns how many ranges were skipped."""
        self.require_v3()
        cs = self.cluster_size
        per = self.per_block
        order = self.header.refcount_order
        by_block: dict[int, list[tuple[int, int]]] = {}
        skipped = 0
        for offset, n in ranges:
            if offset % cs or n <= 0:
                if lenient:
                    skipped += 1
                    continue
                raise ValueError(f"free: bad range {offset:#x} +{n} clusters")
            first = offset // cs
            for i in range(first // per, (first + n - 1) // per + 1):
                a, b = max(first, i * per) - i * per, min(first + n, (i + 1) * per) - i * per
                by_block.setdefault(i, []).append((a, b))
        if not by_block:
            return skipped
        updated: dict[int, np.ndarray] = {}
        for i, spans in sorted(by_block.items()):      # all checked before anything is written
            counts = self._counts(i)
            if counts is None:
                if lenient:
                    skipped += len(spans)
                    continue
                raise CorruptImageError(f"freeing clusters of refcount block {i}, which does "
                                        f"not exist", path=self.path)
            for a, b in spans:
                if not counts[a:b].all():
                    if lenient:
                        skipped += 1
                        continue
                    raise CorruptImageError(f"freeing clusters [{i * per + a}, {i * per + b})"
                                            f" of which some have refcount 0", path=self.path)
                counts[a:b] -= np.uint64(1)
            updated[i] = counts
        for i, counts in updated.items():
            self.writer.pwrite(T.encode_refcount_block(counts, order), self._block_offset(i))
            self._free_hint = min(self._free_hint, i * per + min(a for a, _ in by_block[i]))
        self.sync_step()
        return skipped

    # -- header --------------------------------------------------------------

    def set_header_field(self, name: str, value: int) -> None:
        """One header field rewritten (one small write in the first sector), synced, a step;
        the header is read again."""
        self.require_v3()
        set_header_field(self.writer, name, value)
        self.sync_step()
        self.reload()

    def extension(self, ext_type: int) -> HeaderExtensionRecord | None:
        for ext in self.header.extensions:
            if ext.type == ext_type:
                return ext
        return None

    def replace_extension_data(self, ext_type: int, data: bytes) -> None:
        """Overwrite an extension's data with as many bytes, in one write (synced, a step)."""
        self.require_v3()
        ext = self.extension(ext_type)
        if ext is None or len(ext.data) != len(data):
            raise ValueError(f"no header extension {ext_type:#010x} of {len(data)} bytes")
        self.writer.pwrite(data, ext.offset + _FRAME)
        self.sync_step()
        self.reload()

    def add_extension(self, ext_type: int, data: bytes) -> None:
        """Append a header extension (:func:`publish_extension`: two steps)."""
        self.require_v3()
        assert self.image is not None
        publish_extension(self.writer, self.image, ext_type, data)
        self.reload()

    def remove_extension(self, ext_type: int) -> None:
        """Remove a header extension: the last one in the list by one aligned 8-byte
        write of an end entry over its frame, another by one rewrite of the area (synced,
        a step)."""
        self.require_v3()
        exts = self.header.extensions
        idx = next((k for k, e in enumerate(exts) if e.type == ext_type), None)
        if idx is None:
            return
        if idx == len(exts) - 1:
            self.writer.pwrite(END_ENTRY, exts[idx].offset)
        else:
            start = self.header.header_length
            _, area_end = extension_area(self.header)
            kept = H.encode_extensions([(e.type, e.data) for e in exts if e.type != ext_type])
            self.writer.pwrite(kept + bytes(max(0, area_end - start - len(kept))), start)
        self.sync_step()
        self.reload()


__all__ = ["END_ENTRY", "InplaceEditor", "check_extension_room", "extension_area",
           "publish_extension",
           "set_header_field"]
