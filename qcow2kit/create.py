"""New qcow2 images, byte for byte the files ``qemu-img create -f qcow2`` (QEMU 7.2) writes.

``qemu-img create`` is deterministic: it writes a minimal image (header, a
refcount table and an empty refcount block), then grows it to the requested
size through QEMU's ordinary allocator (``qcow2_co_create`` and
``qcow2_co_truncate`` in block/qcow2.c).  Where clusters land, which ones are
left free, what stale bytes a freed refcount table leaves behind and how long
the file ends up all follow from that sequence, so this module replays it on
:class:`qcow2kit.alloc.Allocator` (:func:`plan`) and only then writes the file
(:func:`write_plan`).  The arguments are read and checked by
:mod:`qcow2kit.createopts`; :func:`prepare` and :func:`create` run the three
steps in qemu-img's order.

Everything is validated and the whole layout computed before any file is
touched, so invalid arguments never truncate an existing file.  Nothing here
prints: ``formatting_line`` and ``options_help`` (of createopts, also reachable
from here) return the text ``qemu-img`` prints, the CLI
(``qcow2kit.cli.create_cmd``) prints it.
"""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import spec
from . import tables as T
from .alloc import EFBIG_MESSAGE, Allocator, TooLargeError
from .createopts import (PREALLOC_MODES, CreateError, CreateOptions, formatting_line,
                         has_help_option, is_valid_option_list, options_help,
                         parse_image_size, read_request)
from .layout import header as H

if TYPE_CHECKING:
    from .writer import ImageWriter

__all__ = [
    # the steps of one create, and create itself
    "CreateRequest", "Prepared", "prepare", "CreatePlan", "plan", "write_plan", "create",
    "ImageTooLargeError", "header_cluster",
    # the argument side (qcow2kit.createopts), for the callers of create
    "CreateError", "CreateOptions", "PREALLOC_MODES", "parse_image_size", "options_help",
    "is_valid_option_list", "has_help_option", "formatting_line",
]


class ImageTooLargeError(CreateError, TooLargeError):
    """The virtual size needs more metadata than QEMU allows (its ``-EFBIG``)."""


@dataclass
class CreatePlan:
    """Everything ``create`` writes, computed before anything is written."""

    path: str
    options: CreateOptions
    header: bytes                        # cluster 0
    file_length: int
    data_file_path: str | None
    data_file_length: int
    allocator: Allocator
    _block_index: dict[int, int] | None = None

    # -- content of the image file, in writing order ---------------------------

    def metadata_chunks(self) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) of everything but cluster 0 and data: stale bytes first, then the
        refcount blocks, the refcount table, the L1 and the L2 tables."""
        a = self.allocator
        for c in sorted(a.stale):
            yield c << a.cb, bytes(a.stale[c])
        for c in sorted(a.refblocks):
            yield c << a.cb, self.refcount_block(c)
        yield a.reftable_offset, T.encode_u64_table(a.reftable)
        if a.l1.shape[0]:
            yield a.l1_offset, T.encode_u64_table(a.l1)
        for l1_index in sorted(a.l2_tables):
            yield a.l2_tables[l1_index] << a.cb, self.l2_table(l1_index)

    def refcount_block(self, cluster: int) -> bytes:
        """The final content of the refcount block stored in ``cluster``."""
        a = self.allocator
        if self._block_index is None:
            self._block_index = {int(off) >> a.cb: i for i, off in enumerate(a.reftable.tolist())
                                 if off}
        i = self._block_index.get(cluster)
        counts = (a.refcount_counts(i) if i is not None
                  else np.zeros(a.rb_size, dtype=np.uint64))
        return T.encode_refcount_block(counts, a.order)

    def l2_table(self, l1_index: int) -> bytes:
        """The final content of the L2 table under ``l1_index``."""
        a = self.allocator
        first = l1_index << a.l2_bits
        end = first + a.l2_size
        entries = np.zeros(a.l2_size, dtype=np.uint64)
        i = max(0, bisect.bisect_right(a.run_starts, first) - 1)
        while i < len(a.runs) and a.runs[i].guest < end:
            run = a.runs[i]
            i += 1
            s = max(run.guest, first)
            e = min(run.guest + run.count, end)
            if s >= e:
                continue
            host = (np.arange(s, e, dtype=np.uint64) - np.uint64(run.guest)
                    + np.uint64(run.host)) << np.uint64(a.cb)
            entries[s - first:e - first] = host | np.uint64(spec.OFLAG_COPIED)
        bitmaps = np.zeros(a.l2_size, dtype=np.uint64) if a.extended_l2 else None
        return T.encode_l2(entries, bitmaps)

    @property
    def zero_writes(self) -> list[tuple[int, int]]:
        return list(self.allocator.zero_writes)

    @property
    def fill(self) -> tuple[int, int, str] | None:
        return self.allocator.fill

    @property
    def data_zero_writes(self) -> list[tuple[int, int]]:
        return list(self.allocator.data_zero_writes)

    @property
    def data_fill(self) -> tuple[int, int, str] | None:
        return self.allocator.data_fill

    def image_bytes(self) -> bytes:
        """The whole image file in memory (for tests and small images)."""
        buf = bytearray(self.file_length)
        for off, chunk in self.metadata_chunks():
            buf[off:off + len(chunk)] = chunk
        buf[:len(self.header)] = self.header
        return bytes(buf[:self.file_length])


def header_cluster(o: CreateOptions, a: Allocator) -> bytes:
    """Cluster 0 as QEMU's qcow2_update_header writes it at the end of create."""
    incompat = 0
    if o.data_file is not None:
        incompat |= spec.INCOMPAT_DATA_FILE
    if o.compression_type != spec.COMPRESSION_ZLIB:
        incompat |= spec.INCOMPAT_COMPRESSION
    if o.extended_l2:
        incompat |= spec.INCOMPAT_EXTL2
    fields = {
        "version": o.version, "backing_file_offset": 0, "backing_file_size": 0,
        "cluster_bits": o.cluster_bits, "size": o.size, "crypt_method": spec.CRYPT_NONE,
        "l1_size": a.l1.shape[0], "l1_table_offset": a.l1_offset,
        "refcount_table_offset": a.reftable_offset,
        "refcount_table_clusters": a.reftable.shape[0] * 8 // a.cs,
        "nb_snapshots": 0, "snapshots_offset": 0,
        "incompatible_features": incompat,
        "compatible_features": spec.COMPAT_LAZY_REFCOUNTS if o.lazy_refcounts else 0,
        "autoclear_features": spec.AUTOCLEAR_DATA_FILE_RAW if o.data_file_raw else 0,
        "refcount_order": o.refcount_order, "header_length": spec.V3_HEADER_SIZE,
        "compression_type": o.compression_type}
    # qcow2_update_header's order: backing format, data file, feature-name table (which
    # QEMU leaves out of images with clusters of 4 KiB or less)
    exts: list[tuple[int, bytes]] = []
    if o.data_file is not None:
        exts.append((spec.EXT_DATA_FILE, H.encode_name_extension(o.data_file)))
    if o.version >= 3 and o.cluster_size > 4096:
        exts.append((spec.EXT_FEATURE_TABLE,
                     H.encode_feature_table(sorted(spec.KNOWN_FEATURE_NAMES.items()))))
    first = H.encode_header_area(H.HeaderArea(fields, exts), place_backing_file=True)
    if len(first) > o.cluster_size:
        raise CreateError("Could not update qcow2 header: No space left on device")
    if o.backing_file is not None:
        if o.backing_fmt is not None:
            exts.insert(0, (spec.EXT_BACKING_FORMAT, H.encode_name_extension(o.backing_fmt)))
        raw = H.encode_header_area(
            H.HeaderArea(fields, exts, H.encode_name_extension(o.backing_file)),
            place_backing_file=True)
        if len(raw) > o.cluster_size:
            raise CreateError(f"Could not assign backing file '{o.backing_file}' with format "
                              f"'{o.backing_fmt}': No space left on device")
    else:
        raw = first
    return raw + bytes(o.cluster_size - len(raw))


def plan(path: str, o: CreateOptions) -> CreatePlan:
    """Replay ``qcow2_co_create`` for ``o`` and return what to write (touches no file)."""
    a = Allocator(o.cluster_bits, o.refcount_order, extended_l2=o.extended_l2,
                  has_data_file=o.data_file is not None)
    try:
        a.alloc_clusters(3 * a.cs)                  # header, refcount table, refcount block
        a.truncate(o.size, o.preallocation)
    except TooLargeError as exc:
        raise ImageTooLargeError(f"{path}: {exc.message}", option="size", path=path) from None
    try:
        header = header_cluster(o, a)
    except CreateError as exc:
        raise CreateError(f"{path}: {exc.message}", path=path) from None
    data_path = None
    if o.data_file is not None:
        data_path = o.data_file
    return CreatePlan(path=path, options=o, header=header, file_length=a.file_length,
                      data_file_path=data_path, data_file_length=a.data_length, allocator=a)


# --------------------------------------------------------------------------- writing

_FILE_MODE = 0o644          # what QEMU's file driver creates files with (before the umask)
_ZERO_CHUNK = 1 << 20


def _open_for_create(path: str) -> tuple[ImageWriter, bool]:
    """Open ``path`` for writing with QEMU's locks; create it if missing.

    Returns the writer and whether the file was created here.  An existing
    file is not truncated yet (that happens only when everything is known).
    """
    from .writer import ImageWriter

    created = False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     _FILE_MODE)
        os.close(fd)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise CreateError(f"Could not create '{path}': {exc.strerror}", path=path) from None
    try:
        return ImageWriter(path), created
    except BaseException:
        if created:
            os.unlink(path)
        raise


def _write_zeros(w: ImageWriter, offset: int, length: int) -> None:
    buf = bytes(min(length, _ZERO_CHUNK))
    end = offset + length
    while offset < end:
        n = min(len(buf), end - offset)
        w.pwrite(buf[:n] if n < len(buf) else buf, offset)
        offset += n


def _fill(w: ImageWriter, fill: tuple[int, int, str] | None) -> None:
    """The data area of falloc/full preallocation, as QEMU's file driver does it."""
    if fill is None:
        return
    start, end, mode = fill
    if end <= start:
        return
    if mode == "falloc":
        os.posix_fallocate(w.fd, start, end - start)
    else:
        _write_zeros(w, start, end - start)


def write_plan(p: CreatePlan, *, sync: bool = True) -> None:
    """Write the image (and its data file) that :func:`plan` computed.

    The files are created, or truncated when they exist, only now; QEMU's
    image locks are taken first (a file in use by QEMU is refused).  Order:
    data areas, metadata, fsync, header, fsync; a failure removes the files.
    ``sync=False`` keeps the order and leaves out the fsyncs (qemu-img's
    cache=unsafe: safe when the process is killed, not after a power cut).
    """
    writers: list[ImageWriter] = []
    made: list[str] = []
    try:
        _write_plan(p, writers, made, sync)
    except CreateError as exc:
        raise CreateError(f"{p.path}: {exc.message}", option=exc.option, path=p.path) from None
    except OSError as exc:
        if exc.errno == errno.EFBIG:   # the file system's limit; qemu-img says the same then
            raise ImageTooLargeError(f"{p.path}: {EFBIG_MESSAGE}", option="size",
                                     path=p.path) from None
        raise
    finally:
        for wr in writers:
            wr.close()


def _write_plan(p: CreatePlan, writers: list[ImageWriter], made: list[str],
                sync: bool = True) -> None:
    """Open (locked) both files, then truncate and write them; on failure remove the files
    created here and the ones already truncated (their old content is gone anyway, and
    QEMU removes them too), never a file that was only opened."""
    existing: list[str] = []
    try:
        w, created = _open_for_create(p.path)
        writers.append(w)
        (made if created else existing).append(p.path)
        dw = None
        if p.data_file_path is not None:
            # QEMU 7.2 creates a relative data file name relative to its working
            # directory (not the image's), and stores the name as given
            dw, created = _open_for_create(p.data_file_path)
            writers.append(dw)
            (made if created else existing).append(p.data_file_path)
        made.extend(existing)
        w.truncate(0)
        w.truncate(p.file_length)
        if dw is not None:
            dw.truncate(0)
            dw.truncate(p.data_file_length)
            for off, n in p.data_zero_writes:
                _write_zeros(dw, off, n)
            _fill(dw, p.data_fill)
            if sync:
                dw.sync()
        _fill(w, p.fill)
        for off, n in p.zero_writes:
            _write_zeros(w, off, n)
        for off, chunk in p.metadata_chunks():
            if off + len(chunk) > p.file_length:
                raise AssertionError(f"metadata at {off:#x} beyond the planned file end")
            w.pwrite(chunk, off)
        if sync:
            w.sync()
        w.pwrite(p.header, 0)
        if sync:
            w.sync()
    except BaseException:
        for wr in writers:
            wr.close()
        for path in made:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise


@dataclass
class CreateRequest:
    """The arguments of one ``qemu-img create``, as text (what the command line gives)."""

    filename: str
    size: str | None = None
    options: Sequence[str] = ()
    backing_file: str | None = None
    backing_fmt: str | None = None
    unsafe: bool = False            # -u: do not open the backing file


@dataclass
class Prepared:
    """A validated request: the plan, the line qemu-img prints and any warnings."""

    plan: CreatePlan
    formatting: str
    warnings: list[str]


def prepare(req: CreateRequest) -> Prepared:
    """Parse and validate ``req`` exactly as qemu-img does, and compute the whole image.

    Raises :class:`CreateError` (the message is what qemu-img would say) and
    touches no file.
    """
    got = read_request(req.filename, req.size, req.options, backing_file=req.backing_file,
                       backing_fmt=req.backing_fmt, unsafe=req.unsafe)
    try:   # qemu-img has printed the Formatting line when planning fails
        return Prepared(plan(req.filename, got.options), got.formatting, got.warnings)
    except CreateError as exc:
        exc.formatting = got.formatting
        raise


def request(filename: str, size: int | str | None = None, *,
            options: Mapping[str, object] | Sequence[str] = (),
            backing_file: str | None = None, backing_fmt: str | None = None,
            unsafe: bool = False) -> CreateRequest:
    """The request of a :func:`create` call (``options`` as -o strings or a mapping)."""
    if isinstance(options, Mapping):
        items = []
        for k, v in options.items():
            text = ("on" if v else "off") if isinstance(v, bool) else str(v)
            items.append(f"{k}={text.replace(',', ',,')}")
        opt_lists: Sequence[str] = [",".join(items)] if items else []
    else:
        opt_lists = list(options)
    return CreateRequest(filename, None if size is None else str(size), opt_lists,
                         backing_file, backing_fmt, unsafe)


def create(filename: str, size: int | str | None = None, *,
           options: Mapping[str, object] | Sequence[str] = (),
           backing_file: str | None = None, backing_fmt: str | None = None,
           unsafe: bool = False, sync: bool = True) -> CreatePlan:
    """Create ``filename`` like ``qemu-img create -f qcow2`` and return what was written.

    ``options`` are qemu-img's ``-o`` options, either as ``-o`` strings or as a
    mapping (``{"cluster_size": 4096, "lazy_refcounts": True}``); ``unsafe`` is
    qemu-img's ``-u`` (the backing file is not opened); ``sync=False`` leaves out
    the fsyncs (see :func:`write_plan`).
    """
    prepared = prepare(request(filename, size, options=options, backing_file=backing_file,
                               backing_fmt=backing_fmt, unsafe=unsafe))
    write_plan(prepared.plan, sync=sync)
    return prepared.plan
