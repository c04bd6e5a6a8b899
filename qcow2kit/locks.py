"""QEMU's image locks (file-posix), for readers and writers alike.

QEMU marks what a process does with an image by one-byte shared OFD locks
(``F_OFD_SETLK``, ``F_RDLCK``) on the image file itself: byte 100 + i means
"I hold permission i", byte 200 + i "I refuse to share permission i", where
i is 0 consistent read, 1 write, 2 write unchanged, 3 resize.  Whether
another open file holds or refuses a permission is probed with
``F_OFD_GETLK`` for a write lock on the byte.  OFD locks belong to the open
file description, so closing the descriptor releases them; two descriptors of
the same process see each other's locks as they see another process's.

What qemu-img 7.2 takes (seen with strace, and in block/file-posix.c
``raw_apply_lock_bytes``/``raw_check_lock_bytes``):

=====================  =================  =======================
file                   held               refused to others
=====================  =================  =======================
qcow2 image (reading)  consistent read    write, resize
qcow2 image (info)     nothing            write, resize
raw backing file       consistent read    nothing
external data file     consistent read    resize
writer                 read, write, res.  write, resize
=====================  =================  =======================

``qemu-img info`` opens images without I/O (``BDRV_O_NO_IO``), so it claims no
consistent read.  With ``-U`` (force share) nothing is refused, but the
permissions are still held and checked.  A conflict is reported with QEMU's
words for the first one found, wanted permissions first:
``Failed to get "write" lock`` (someone refuses what we hold) or
``Failed to get shared "write" lock`` (someone holds what we refuse), and the
hint ``Is another process using the image [FILE]?``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Iterable, Literal

from .errors import ImageLockedError

PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
#: QEMU's names of the permissions (``bdrv_perm_names``), by number.
PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
              PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
_FLOCK = "hhxxxxqqixxxx"
# errors that mean "this file system has no such locks" (NFS without a lock manager, a kernel
# without OFD locks): read without them (qemu-img fails there; README, Known limits)
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


def _flock(fd: int, cmd: int, ltype: int, byte: int) -> int:
    """One OFD lock call on ``byte``; returns the l_type the kernel answers."""
    arg = struct.pack(_FLOCK, ltype, os.SEEK_SET, byte, 1, 0)
    res = fcntl.fcntl(fd, cmd, arg)
    return struct.unpack(_FLOCK, res)[0]


def _taken(fd: int, byte: int) -> bool:
    """Does another open file hold a lock on ``byte``?"""
    return _flock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def _apply(fd: int, held: Iterable[int], refused: Iterable[int]) -> None:
    for perm in held:
        _flock(fd, _F_OFD_SETLK, fcntl.F_RDLCK, LOCK_PERM_BASE + perm)
    for perm in refused:
        _flock(fd, _F_OFD_SETLK, fcntl.F_RDLCK, LOCK_SHARED_BASE + perm)


def first_conflict(fd: int, held: Iterable[int], refused: Iterable[int]) -> str | None:
    """QEMU's words for the first conflict with holding ``held`` and refusing ``refused``
    (``raw_check_lock_bytes``'s order: held permissions first), or None."""
    for perm in held:        # does anyone refuse to share a permission we hold?
        if _taken(fd, LOCK_SHARED_BASE + perm):
            return f'Failed to get "{PERM_NAMES[perm]}" lock'
    for perm in refused:     # does anyone hold a permission we refuse to share?
        if _taken(fd, LOCK_PERM_BASE + perm):
            return f'Failed to get shared "{PERM_NAMES[perm]}" lock'
    return None


def lock_conflicts(fd: int, held: Iterable[int], refused: Iterable[int]) -> list[str]:
    """What other processes hold that conflicts with holding ``held`` and refusing ``refused``."""
    out = []
    for perm in held:
        if _taken(fd, LOCK_SHARED_BASE + perm):
            out.append(f"another process refuses to share '{PERM_NAMES[perm]}'")
    for perm in refused:
        if _taken(fd, LOCK_PERM_BASE + perm):
            out.append(f"another process holds '{PERM_NAMES[perm]}'")
    return out


# -- writers -----------------------------------------------------------------

HELD_BY_WRITER = (PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE)
REFUSED_BY_WRITER = (PERM_WRITE, PERM_RESIZE)


def lock_for_writing(fd: int, path: str) -> None:
    """Take QEMU's locks of a writer on ``fd`` (held: consistent read, write, resize;
    refused to others: write, resize); raise :class:`ImageLockedError` when another
    process holds or refuses one of them.  Closing ``fd`` releases the locks."""
    try:
        _apply(fd, HELD_BY_WRITER, REFUSED_BY_WRITER)
        conflicts = lock_conflicts(fd, HELD_BY_WRITER, REFUSED_BY_WRITER)
    except OSError as exc:
        raise ImageLockedError(f"{path}: cannot take the image locks: {exc.strerror} "
                               f"(is a QEMU process using the image?)", path=path) from exc
    if conflicts:
        raise ImageLockedError(f"{path}: the image is in use ({'; '.join(conflicts)}); "
                               f"stop the process using it first", path=path)


# -- readers -----------------------------------------------------------------

#: What a file is to the reader: a qcow2 image, a raw backing file, an external data file.
Role = Literal["qcow2", "raw", "data"]

# what each role refuses to share when reading (qemu-img 7.2, see the table above)
_REFUSED: dict[str, tuple[int, ...]] = {
    "qcow2": (PERM_WRITE, PERM_RESIZE),
    "raw": (),
    "data": (PERM_RESIZE,),
}


class LockConflictError(ImageLockedError):
    """A reader's locks conflict with another process's (QEMU's message and hint).

    ``reason`` is QEMU's words (``Failed to get shared "write" lock``),
    ``path`` the file whose locks conflict, ``opened_as`` what was being
    opened (``Could not open 'top.qcow2': Could not open backing file: ``).
    """

    def __init__(self, opened_as: str, reason: str, path: str) -> None:
        super().__init__(f"{opened_as}{reason}\nIs another process using the image [{path}]?",
                         path=path)
        self.opened_as = opened_as
        self.reason = reason


class ForceShareWarning(UserWarning):
    """An image was read with force_share while another process may change it."""


@dataclass(frozen=True)
class ReadLocks:
    """How a reader locks the files it opens.

    ``force_share``: refuse nothing to others (qemu-img's ``-U``); a warning
    (:class:`ForceShareWarning`) says so when the locks would have conflicted.
    ``consistent_read``: hold "consistent read" (False: as ``qemu-img info``,
    which opens without I/O).
    """

    force_share: bool = False
    consistent_read: bool = True

    def perms(self, role: Role) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(held, refused) for a file of this role."""
        held = (PERM_CONSISTENT_READ,) if self.consistent_read else ()
        return held, () if self.force_share else _REFUSED[role]

    def lock(self, fd: int, path: str, role: Role, opened_as: str) -> None:
        """Take the locks of ``role`` on ``fd`` (the file ``path``), as qemu-img does.

        Raises :class:`LockConflictError` with QEMU's message (prefixed by
        ``opened_as``) when another process's locks conflict; the locks taken
        so far stay on ``fd`` until the caller closes it.  A file system
        without OFD locks is read without them.
        """
        held, refused = self.perms(role)
        try:
            _apply(fd, held, refused)
            reason = first_conflict(fd, held, refused)
            would = ([PERM_NAMES[p] for p in _REFUSED[role] if _taken(fd, LOCK_PERM_BASE + p)]
                     if self.force_share and reason is None else [])
        except OSError as exc:
            if exc.errno in _NO_LOCKING:
                return
            # a byte someone holds a write lock on (not QEMU: it takes read locks only)
            why = "" if exc.errno in (errno.EAGAIN, errno.EACCES) else f": {exc.strerror}"
            raise ImageLockedError(f"{opened_as}Failed to lock byte "
                                   f"{_failed_byte(fd, held, refused)}{why}",
                                   path=path) from exc
        if reason is not None:
            raise LockConflictError(opened_as, reason, path)
        if would:
            doing = ("has it open for writing" if PERM_NAMES[PERM_WRITE] in would
                     else "may resize it")
            warnings.warn(ForceShareWarning(
                f"{path}: another process {doing}; reading it anyway (force share), "
                f"the data may be inconsistent"), stacklevel=2)


def _failed_byte(fd: int, held: Iterable[int], refused: Iterable[int]) -> int:
    """The first byte whose shared lock cannot be taken (for QEMU's 'Failed to lock byte')."""
    for byte in [LOCK_PERM_BASE + p for p in held] + [LOCK_SHARED_BASE + p for p in refused]:
        try:
            _flock(fd, _F_OFD_SETLK, fcntl.F_RDLCK, byte)
        except OSError:
            return byte
    return LOCK_PERM_BASE
