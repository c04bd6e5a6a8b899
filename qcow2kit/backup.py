"""Full and incremental backups of a qcow2 image, offline, on the block-copy engine;
resumable.

- full: the guest content as a new qcow2 image (or a raw file), read in host order and
  written unfragmented: every cluster that holds data in the source is allocated in
  guest order before the copy starts (one that turns out to hold only zeros stays
  allocated, over a hole of the file);
- incremental: a new qcow2 overlay whose backing file is the previous backup and which
  holds exactly the clusters a persistent dirty bitmap of the source marks (its ranges
  rounded out to the overlay's clusters, the overlay's cluster size being the
  source's): their data, and zero clusters where they read as zeros, so that the
  previous backup shows through everywhere else and nowhere there.  Only those ranges
  are read (the host-order plan is made from the data inside them), in host order.

:func:`plan_backup` checks everything first (the bitmap, the base, the target) and
says which kind of backup runs, and why a ``sync="auto"`` request fell back to a full
one; :func:`run_backup` then copies, :func:`backup` does both.

Resumable: the target is made complete in its metadata before the copy
(:mod:`qcow2kit.resume`), under a part name, with the pending bits of everything to
copy (a disabled persistent bitmap of the target, or ``TARGET.pending`` beside a raw
one), and gets its name only then.  The copy makes its progress durable as it goes
(:class:`~qcow2kit.blockcopy.pending.Checkpointer`: the target flushed, then the done
bits cleared), so after a kill, a failure or ^C the target is kept and ``resume``
copies only what is still pending (plus at most what finished in the last
``checkpoint_interval`` seconds); the pending bits are removed once the target is
complete and on disk.

A bitmap can drive an incremental backup only when it records every write since the
previous backup: one marked in use (QEMU sets the flag while it has the image open and
clears it when it stores the bitmap on close, so a QEMU that crashed, or a VM still
running, leaves it set) may have missed writes, and is refused, as one whose table is
inconsistent or that does not exist (:class:`~qcow2kit.errors.BitmapUnusableError`).
Whether the bitmap really started when the base was taken cannot be checked here: that
is the caller's contract (libvirt's checkpoints keep it).

``checksum``: ovirt-imageio's block checksum of the source's guest content
(:mod:`qcow2kit.checksum`), computed from the bytes the copy reads, with no second
read, and written beside the target as ``TARGET.checksum`` (the JSON of
``qcow2kit checksum``).  Only a full backup sees the whole content; an incremental one
reads the dirty clusters only, so it refuses ``checksum`` (checksum the chain with
``qcow2kit checksum`` instead).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

from . import spec
from .blockcopy import DEFAULT_WORKERS, CopyBitmap, CopyResult, CopyTarget, RawFileTarget
from .blockcopy.pending import (JournalStore, PendingMap, PendingStore, run_checkpointed,
                                sync_dir)
from .blockcopy.resumable import PENDING_BITMAP, BitmapStore, MappedQcow2Target
from .checksum import BLOCK_SIZE, BlockHasher, HashingTarget, combine
from .convert import CopySettings, PlannedCopy, incomplete_error
from .createopts import CreateError, backing_virtual_size
from .errors import (BitmapNotFoundError, BitmapUnusableError, CorruptImageError, Qcow2Error,
                     TargetError)
from .image import Image
from .mapping import DEFAULT_MEMORY
from .resume import (JOURNAL_SUFFIX, finish_pending, map_qcow2_target, pending_of,
                     start_pending)
from .target import check_new_target, open_raw_target, remove_created, source_files
from .writer import ImageWriter

SYNC_MODES = ("full", "incremental", "auto")
#: seconds between two checkpoints of a backup's pending bits
DEFAULT_CHECKPOINT_INTERVAL = 1.0
FORMATS = ("qcow2", "raw")
CHECKSUM_SUFFIX = ".checksum"


@dataclass
class BackupPlan:
    """What :func:`run_backup` will do, every input checked.

    ``mode`` is "full" or "incremental"; ``fallback`` says why ``sync="auto"`` chose a
    full backup (None otherwise); for an incremental backup ``pending`` is the copy
    bitmap of the clusters to copy (one bit per overlay cluster), ``base`` the previous
    backup, ``backing_file`` its name as the overlay stores it (relative to the
    target's directory) and ``backing_fmt`` its format.
    """

    mode: str
    target: str
    fmt: str
    bitmap: str | None = None
    fallback: str | None = None
    pending: CopyBitmap | None = None
    base: str | None = None
    backing_file: str | None = None
    backing_fmt: str | None = None
    cluster_size: int = 0
    checksum_path: str | None = None

    @property
    def dirty_bytes(self) -> int:
        """Guest bytes an incremental backup copies (whole overlay clusters); 0 for full."""
        return self.pending.count() if self.pending is not None else 0


@dataclass
class BackupResult:
    """What a backup did: the plan it ran, the copy's figures (``copy.read_bytes``: the
    bytes read from the source), and the checksum written, if any."""

    plan: BackupPlan
    copy: CopyResult
    checksum: dict[str, object] | None = None
    files: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- checks

def bitmap_problem(img: Image, name: str) -> str | None:
    """Why persistent bitmap ``name`` of ``img`` cannot drive an incremental backup, or
    None when it can (its table is read and checked)."""
    try:
        dirty_bitmap(img, name, img.cluster_size)
    except BitmapUnusableError as exc:
        return str(exc)
    return None


def dirty_bitmap(img: Image, name: str, unit: int) -> CopyBitmap:
    """The copy bitmap of an incremental backup from bitmap ``name``: one bit per ``unit``
    bytes (the overlay's cluster), set where the bitmap marks any byte dirty.

    Raises :class:`BitmapUnusableError`, naming the bitmap and why, when it is missing,
    in use, not a dirty-tracking bitmap, or its table is inconsistent.
    """
    where = f"{img.filename}: bitmap '{name}'"
    try:
        bm = img.bitmap(name)
    except BitmapNotFoundError:
        have = ", ".join(f"'{b.name}'" for b in img.bitmaps)
        raise BitmapUnusableError(f"{where} not found (the image has "
                                  f"{'bitmaps ' + have if have else 'no persistent bitmaps'})",
                                  path=img.filename) from None
    if bm.in_use:
        raise BitmapUnusableError(
            f"{where} is marked in use: a QEMU process has the image open, or one crashed "
            f"with it open, so the bitmap may have missed writes and cannot drive an "
            f"incremental backup (take a full backup and start a new bitmap)",
            path=img.filename)
    if bm.type != spec.BME_TYPE_DIRTY_TRACKING:
        raise BitmapUnusableError(f"{where} is inconsistent: type {bm.type} is not a "
                                  f"dirty-tracking bitmap", path=img.filename)
    if bm.extra_data and not bm.flags & spec.BME_FLAG_EXTRA_DATA_COMPATIBLE:
        raise BitmapUnusableError(f"{where} is inconsistent: it has extra data QEMU does not "
                                  f"understand", path=img.filename)
    pending = CopyBitmap(img.size, unit, fill=False)
    try:
        for a, n in img.dirty_ranges(name):
            pending.set(a, n)
    except CorruptImageError as exc:
        raise BitmapUnusableError(f"{where} is inconsistent: {exc}",
                                  path=img.filename) from None
    return pending


def _check_base(img: Image, base: str, target: str) -> tuple[str, str]:
    """The previous backup ``base``: (its format, its name relative to ``target``'s
    directory); refused (:class:`TargetError`) when it is missing, unreadable, a file of
    the source's chain, or not the source's size."""
    avoid = source_files(img)
    try:
        st = os.stat(base)
    except OSError as exc:
        raise TargetError(f"{base}: cannot use it as the base of an incremental backup: "
                          f"{exc.strerror or exc}", path=base) from None
    if (st.st_dev, st.st_ino) in avoid:
        raise TargetError(f"{base}: cannot use it as the base of an incremental backup: it is "
                          f"{avoid[(st.st_dev, st.st_ino)]}", path=base)
    try:
        size, fmt = backing_virtual_size(base, "")
    except (CreateError, Qcow2Error, OSError) as exc:
        raise TargetError(f"{base}: cannot use it as the base of an incremental backup: "
                          f"{exc}", path=base) from None
    if size != img.size:
        raise TargetError(f"{base}: cannot use it as the base of an incremental backup: its "
                          f"size {size} is not the source's {img.size}", path=base)
    rel = os.path.relpath(os.path.abspath(base), os.path.dirname(os.path.abspath(target)))
    return fmt, rel


def plan_backup(img: Image, target: str | os.PathLike[str], *, sync: str = "full",
                bitmap: str | None = None, base: str | os.PathLike[str] | None = None,
                fmt: str = "qcow2", checksum: bool = False, resume: bool = False) -> BackupPlan:
    """Check a backup of ``img`` to ``target`` before anything is written, and choose it.

    With ``resume``, ``target`` is what an interrupted backup with the same arguments
    left (it must exist; :func:`run_backup` checks that it is one).
    ``sync="incremental"`` needs ``bitmap`` and ``base`` and a qcow2 target, and raises
    (:class:`BitmapUnusableError`, :class:`TargetError`) when one is not usable;
    ``sync="auto"`` runs an incremental backup when it can and a full one otherwise,
    saying why in :attr:`BackupPlan.fallback`; ``sync="full"`` takes neither.  The
    target (and ``TARGET.checksum`` with ``checksum``) may not exist yet, nor be any
    file of the source's chain or the base.
    """
    target = os.fspath(target)
    base = None if base is None else os.fspath(base)
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be qcow2 or raw, not {fmt!r}")
    if sync == "full" and (bitmap is not None or base is not None):
        raise ValueError("a full backup takes no bitmap and no base (they are for "
                         "--sync incremental or auto)")
    if resume and checksum:
        raise ValueError("--checksum cannot be computed by a resumed backup (what the first "
                         "run copied would be read again): run `qcow2kit checksum` on the "
                         "source or the backup afterwards")
    avoid = source_files(img)             # the whole chain opens, or we stop here
    exists = check_new_target(target, avoid) is not None
    if resume and not exists:
        raise TargetError(f"{target}: nothing to resume: the file does not exist",
                          path=target)
    if exists and not resume:
        hint = (": it is an interrupted backup, add --resume to finish it"
                if interrupted(target, fmt) else " (a backup never overwrites one)")
        raise TargetError(f"{target}: cannot write the backup: the file exists{hint}",
                          path=target)
    plan = BackupPlan(mode="full", target=target, fmt=fmt, bitmap=bitmap,
                      cluster_size=img.cluster_size)
    if checksum:
        plan.checksum_path = target + CHECKSUM_SUFFIX
        if os.path.lexists(plan.checksum_path):
            raise TargetError(f"{plan.checksum_path}: cannot write the checksum: the file "
                              f"exists", path=plan.checksum_path)
    if sync == "full":
        return plan
    try:
        if bitmap is None or base is None:
            missing = [flag for flag, value in (("--bitmap", bitmap), ("--base", base))
                       if value is None]
            raise ValueError(f"an incremental backup needs {' and '.join(missing)}")
        if fmt != "qcow2":
            raise ValueError("an incremental backup is a qcow2 overlay (-O qcow2), not raw")
        plan.pending = dirty_bitmap(img, bitmap, img.cluster_size)
        plan.backing_fmt, plan.backing_file = _check_base(img, base, target)
        if os.path.abspath(base) == os.path.abspath(target):
            raise TargetError(f"{target}: the target cannot be its own base", path=target)
    except (ValueError, BitmapUnusableError, TargetError) as exc:
        if sync == "incremental":
            raise
        plan.pending = plan.backing_file = plan.backing_fmt = None
        plan.fallback = str(exc)
        return plan
    if checksum:
        msg = ("--checksum needs the whole guest content, and an incremental backup reads "
               "only the dirty clusters: checksum the chain with `qcow2kit checksum "
               f"{target}` afterwards, or take a full backup")
        if sync == "incremental":
            raise ValueError(msg)
        plan.pending = plan.backing_file = plan.backing_fmt = None
        plan.fallback = msg
        return plan
    plan.mode = "incremental"
    plan.base = base
    return plan


# ---------------------------------------------------------------------------- the copy

def run_backup(img: Image, plan: BackupPlan, *, resume: bool = False,
               checksum_window: int | None = None, order: str = "host",
               memory: int = DEFAULT_MEMORY, workers: int = DEFAULT_WORKERS,
               checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
               rate_limit: int | None = None,
               progress: Callable[[int], None] | None = None,
               on_total: Callable[[int], None] | None = None) -> BackupResult:
    """Copy as ``plan`` says (:func:`plan_backup`); returns what was done.

    The copy is resumable (see the module docstring): the target is made first, with
    the pending bits of everything to copy, then the copy keeps them durable.  With
    ``resume`` the target is the one an interrupted run left (:func:`plan_backup` with
    ``resume``) and only what is still pending is copied.  When anything fails before
    the pending bits are on disk, the files this call created are removed; afterwards
    the target is kept (incomplete) for ``resume``.  With a checksum planned, the guest
    disk is copied a window of ``checksum_window`` bytes at a time (each read in host
    order), so the blocks being hashed stay within about a window of memory.  On return
    the target is complete and on disk.
    """
    hasher = BlockHasher(img.size) if plan.checksum_path else None
    # the blocks being hashed are those of one window: within the memory budget
    window = (max(BLOCK_SIZE, (checksum_window or memory) // BLOCK_SIZE * BLOCK_SIZE)
              if hasher is not None else None)
    tag = _tag(img, plan)
    bits: CopyBitmap | None
    if resume:
        _drop_linked_part(plan.target)
        pending: PendingMap | None = pending_of(plan.target, plan.fmt, img.size, tag,
                                                backing=plan.backing_file)
        assert pending is not None
        bits = CopyBitmap(img.size, pending.granularity, fill=False)
        for a, n in pending.runs():
            bits.set(a, n)
    else:
        pending = None
        bits = plan.pending
    keep = None if bits is None else list(bits.iter_runs())
    settings = CopySettings(order=order, memory=memory, workers=workers, rate_limit=rate_limit)
    # planned (every table of the source checked) before the target is touched
    copy = PlannedCopy(img, settings, pending=bits, window=window,
                       watcher=HashingTarget(hasher) if hasher is not None else None,
                       progress=progress, on_total=on_total)
    if pending is None:
        pending = _make_target(img, plan, keep, tag, memory)
    if on_total is not None:
        on_total(copy.total)                 # the bar starts now that the copy starts
    if plan.fmt == "raw":
        with open_raw_target(plan.target, img.size, source_files(img), existing=True) as rt:
            target: CopyTarget = RawFileTarget(rt.fd, plan.target, img.size,
                                               zero_initialized=not resume)
            store = JournalStore(plan.target + JOURNAL_SUFFIX, img.size, pending.granularity,
                                 tag)
            result = _copy(copy, target, keep, pending, store, checkpoint_interval)
    else:
        with ImageWriter(plan.target) as w, \
                Image.open(plan.target, follow_backing=False, locking=False) as timg:
            target = MappedQcow2Target(timg, w, fresh=not resume)
            result = _copy(copy, target, keep, pending, BitmapStore(timg, w),
                           checkpoint_interval)
    if result.failed:
        raise incomplete_error(plan.target, result)
    finish_pending(plan.target, plan.fmt)
    out = BackupResult(plan, result, files=[plan.target])
    if hasher is not None and plan.checksum_path is not None:
        out.checksum = combine(hasher.finish(), BLOCK_SIZE)
        _write_new(plan.checksum_path, json.dumps(out.checksum) + "\n", True)
        out.files.append(plan.checksum_path)
    return out


def interrupted(target: str, fmt: str) -> bool:
    """Whether ``target`` is a backup that was interrupted (it has pending bits)."""
    if fmt == "raw":
        return os.path.exists(target + JOURNAL_SUFFIX)
    try:
        with Image.open(target, follow_backing=False, locking=False) as timg:
            return any(b.name == PENDING_BITMAP for b in timg.bitmaps)
    except (Qcow2Error, OSError):
        return False


def _tag(img: Image, plan: BackupPlan) -> bytes:
    """What a raw backup's journal records of the backup, compared on resume."""
    return json.dumps({"source": os.path.realpath(img.filename or ""), "size": img.size,
                       "mode": plan.mode}, sort_keys=True).encode()


def part_name(target: str) -> str:
    """Where a target is made before it gets its name (see :func:`_make_target`)."""
    d, b = os.path.split(target)
    return os.path.join(d, f".{b}.qcow2kit-part")


def _make_target(img: Image, plan: BackupPlan, keep: list[tuple[int, int]] | None,
                 tag: bytes, memory: int) -> PendingMap:
    """Create the target, mapped (qcow2) or sparse (raw), with its pending bits.

    It is made under :func:`part_name` and linked to its name only once its pending
    bits are on disk: a kill before leaves no TARGET (a part file the next run
    removes), never a TARGET that would look complete.  What was created is removed
    again when this fails."""
    avoid = source_files(img)
    part = part_name(plan.target)
    journal = plan.target + JOURNAL_SUFFIX
    for stale in (part, part + JOURNAL_SUFFIX, journal):   # a killed creation's leftovers
        if os.path.lexists(stale):
            os.unlink(stale)
    try:
        if plan.fmt == "raw":
            with open_raw_target(part, img.size, avoid):
                pass
        else:
            map_qcow2_target(img, part, keep, options=[f"cluster_size={plan.cluster_size}"],
                             backing_file=plan.backing_file, backing_fmt=plan.backing_fmt,
                             memory=memory, check_files=lambda path: check_new_target(path, avoid))
        pending = start_pending(img, part, plan.fmt, keep, plan.cluster_size, tag)
        if plan.fmt == "raw":
            os.rename(part + JOURNAL_SUFFIX, journal)
        os.link(part, plan.target)          # fails if TARGET appeared meanwhile
        os.unlink(part)
        sync_dir(plan.target)
        return pending
    except BaseException:
        for f in (part, part + JOURNAL_SUFFIX):
            remove_created(f, None)
        if plan.fmt == "raw" and not os.path.exists(plan.target):
            remove_created(journal, None)
        raise


def _drop_linked_part(target: str) -> None:
    """A kill between linking the target to its name and removing the part name leaves
    both names: drop the part name."""
    part = part_name(target)
    try:
        a, b = os.stat(part), os.stat(target)
    except OSError:
        return
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        os.unlink(part)


def _copy(copy: PlannedCopy, target: CopyTarget, keep: list[tuple[int, int]] | None,
          pending: PendingMap, store: PendingStore, interval: float) -> CopyResult:
    """The copy, its progress made durable by checkpoints; the target flushed."""
    result, _ = run_checkpointed(lambda note: copy.run(target, keep, on_copied=note), target,
                                 pending, store, interval=interval)
    return result


def _write_new(path: str, text: str, fsync: bool) -> None:
    """Create ``path`` (it must not exist) holding ``text``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                 0o644)
    try:
        try:
            os.write(fd, text.encode())
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        remove_created(path, None)
        raise


def backup(img: Image, target: str | os.PathLike[str], *, sync: str = "full",
           bitmap: str | None = None, base: str | os.PathLike[str] | None = None,
           fmt: str = "qcow2", checksum: bool = False, order: str = "host",
           memory: int = DEFAULT_MEMORY, workers: int = DEFAULT_WORKERS, resume: bool = False,
           progress: Callable[[int], None] | None = None,
           on_total: Callable[[int], None] | None = None) -> BackupResult:
    """:func:`plan_backup`, then :func:`run_backup`: a full or incremental backup of ``img``
    to ``target`` (see the module docstring)."""
    plan = plan_backup(img, target, sync=sync, bitmap=bitmap, base=base, fmt=fmt,
                       checksum=checksum, resume=resume)
    return run_backup(img, plan, resume=resume, order=order, memory=memory, workers=workers,
                      progress=progress, on_total=on_total)
