"""The file a conversion writes to, opened so that a mistake never destroys data.

``qemu-img convert`` refuses to write into its own source (its image locks
see to that); a converter that simply opens its target with ``O_TRUNC``
empties the source, or a backing file, on a typo.  :func:`open_raw_target`
is the one way qcow2kit opens a target, and it touches nothing until every
check has passed:

1. the source is already open and validated (the caller's part): a run that
   fails on the source never reaches the target;
2. the target is refused when it is the same file (device and inode, whatever
   the path says: symlinks, hard links, ``./x``) as any file the source reads:
   the image, each backing file, each external data file;
3. a new target is created with ``O_EXCL`` (so we know it is ours to remove);
   an existing one is opened without truncating;
4. the descriptor is checked again (the path may have changed in between), and
   QEMU's image locks of a writer are taken: a target a QEMU process uses is
   refused, as qemu-img refuses it;
5. only then is it truncated to the new size.

If the run then fails or is interrupted, :meth:`RawTarget.abort` removes a
target this run created (an existing target has been truncated by then, as
qemu-img's would be; it is never removed).

With ``QCOW2KIT_TARGET_STOP`` set in the environment, the process sends
itself SIGSTOP once the target is open, so a test can interrupt it there.
"""

from __future__ import annotations

import os
import signal
import stat
from typing import TYPE_CHECKING

from .errors import TargetError
from .source import ByteSource
from .locks import lock_for_writing

if TYPE_CHECKING:
    from .image import Image

FileId = tuple[int, int]


def source_files(img: "Image") -> dict[FileId, str]:
    """(device, inode) -> role, for every file reading ``img`` touches.

    Opens the whole chain (backing files and external data files), so a
    missing or broken one fails here, before any target is touched.
    """
    from .image import Image

    files: dict[FileId, str] = {}
    for depth, layer in enumerate(img.chain()):
        role = ("the source image" if depth == 0 else
                f"backing file {layer.filename!r} of the source")
        files.setdefault(_file_id(layer.src), role)
        if isinstance(layer, Image):
            layer._check_readable()
            if layer.header.has_data_file:
                files.setdefault(_file_id(layer.data_source),
                                 f"the external data file of {layer.filename!r}")
    return files


def _file_id(src: ByteSource) -> FileId:
    fd = src.fileno()
    if fd >= 0:
        return _file_id_fd(fd)
    st = os.stat(src.path)
    return (st.st_dev, st.st_ino)


def _kind(mode: int) -> str | None:
    """Why a file of this mode cannot be a raw target (None when it can)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISBLK(mode):
        return "is a block device (only regular files can be written)"
    if stat.S_ISCHR(mode):
        return "is a character device, which cannot hold an image (only regular files can)"
    return "is not a regular file"


class RawTarget:
    """An open, locked, truncated target file.  Use :func:`open_raw_target`."""

    def __init__(self, path: str, fd: int, created: bool) -> None:
        self.path = path
        self.fd = fd
        self.created = created
        self._id = _file_id_fd(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        """Close; remove the file if this run created it (and it is still ours)."""
        self.close()
        if self.created:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._id:
                    os.unlink(self.path)
            except OSError:
                pass
            self.created = False

    def __enter__(self) -> "RawTarget":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def _file_id_fd(fd: int) -> FileId:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def _refuse(path: str, why: str) -> TargetError:
    return TargetError(f"{path}: cannot write the target: {why}", path=path)


def check_new_target(path: str | os.PathLike[str], avoid: dict[FileId, str]) -> FileId | None:
    """Step 2 for a target another writer creates (the image builder): ``path`` may not be
    any file of ``avoid`` nor anything but a regular file.  Returns the (device, inode) of
    the file there now, None when there is none (the caller's to remove on failure)."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _refuse(path, exc.strerror or str(exc)) from exc
    if (st.st_dev, st.st_ino) in avoid:
        raise _refuse(path, f"it is {avoid[(st.st_dev, st.st_ino)]}")
    why = _kind(st.st_mode)
    if why:
        raise _refuse(path, f"it {why}")
    return (st.st_dev, st.st_ino)


def remove_created(path: str | os.PathLike[str], before: FileId | None) -> None:
    """Remove ``path`` when it did not exist ``before`` (:func:`check_new_target`)."""
    if before is not None:
        return
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


def open_raw_target(path: str | os.PathLike[str], size: int,
                    avoid: dict[FileId, str], *, existing: bool = False) -> RawTarget:
    """Open ``path`` to receive ``size`` bytes of raw guest data (steps 2 to 5 above).

    ``avoid`` is :func:`source_files` of the source: a target that is any of
    them is refused.  ``existing`` (qemu-img's ``-n``) opens a file that must
    exist and be at least ``size`` bytes long, and keeps its length and content.
    """
    path = os.fspath(path)
    cloexec = getattr(os, "O_CLOEXEC", 0)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise _refuse(path, exc.strerror or str(exc)) from exc
    if st is not None:
        if (st.st_dev, st.st_ino) in avoid:
            raise _refuse(path, f"it is {avoid[(st.st_dev, st.st_ino)]}")
        why = _kind(st.st_mode)
        if why:
            raise _refuse(path, f"it {why}")
    if existing and st is None:
        # qemu-img's words, the reason included twice as it says it
        raise TargetError(f"Could not open '{path}': Could not open '{path}': "
                          f"No such file or directory", path=path)
    if existing and st is not None and st.st_size < size:
        raise TargetError("output file is smaller than input file", path=path)
    created = st is None
    try:
        if created:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | cloexec, 0o644)
        else:
            fd = os.open(path, os.O_RDWR | cloexec)   # QEMU's read locks need read access
    except OSError as exc:
        raise _refuse(path, exc.strerror or str(exc)) from exc
    target = RawTarget(path, fd, created)
    try:
        st2 = os.fstat(fd)
        if (st2.st_dev, st2.st_ino) in avoid:   # the name was swapped since the stat above
            raise _refuse(path, f"it is {avoid[(st2.st_dev, st2.st_ino)]}")
        why = _kind(st2.st_mode)
        if why:
            raise _refuse(path, f"it {why}")
        lock_for_writing(fd, path)
        try:
            if st2.st_size and not existing:
                # Empty it first, so what it held does not show through the new holes.
                # Only when it held something: on ext4 a truncation to 0 makes close()
                # flush every delayed allocation (its auto_da_alloc rule), which cost a
                # fresh 1 GiB conversion two seconds of waiting.
                os.ftruncate(fd, 0)
            if not existing:
                os.ftruncate(fd, size)
        except OSError as exc:
            raise _refuse(path, f"cannot set its size to {size}: "
                                f"{exc.strerror or exc}") from exc
        if os.environ.get("QCOW2KIT_TARGET_STOP"):
            # Test hook: stop here, target open and truncated, nothing copied yet, so a
            # test can deliver SIGINT/SIGTERM at this exact point (then SIGCONT).
            os.kill(os.getpid(), signal.SIGSTOP)
    except BaseException:
        target.abort()
        raise
    return target
