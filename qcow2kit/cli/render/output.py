"""Writing: the one place the command line prints (stdout, stderr, progress)."""

from __future__ import annotations

import os
import time
from typing import Any, Iterable

# --------------------------------------------------------------------------
# Writing (the one place the command line prints)
# --------------------------------------------------------------------------

PROG = "qcow2kit"


def _write_text(stream: Any, text: str) -> None:
    # names from os.fsdecode() carry undecodable bytes as surrogate escapes:
    # write them back as the original bytes, as qemu-img prints them
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        stream.flush()
        buffer.write(text.encode("utf-8", "surrogateescape"))
        buffer.flush()
    else:
        stream.write(text)
        stream.flush()


def emit(text: str, stream: Any = None) -> None:
    """Write rendered ``text`` as is to stdout (or ``stream``)."""
    import sys
    _write_text(sys.stdout if stream is None else stream, text)


SPOOL_IN_MEMORY = 16 << 20   # output held in memory before it spills to a temporary file


def _regular_file_position(raw: Any) -> int | None:
    """Where output to ``raw`` starts, when it is a regular file we may cut back."""
    import fcntl
    import stat
    try:
        fd = raw.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw.flush()
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:   # `>>`: writes go to the end
            return os.fstat(fd).st_size
        return os.lseek(fd, 0, os.SEEK_CUR)
    except (AttributeError, OSError, ValueError):
        return None


def emit_chunks(chunks: Iterable[bytes], stream: Any = None, *, all_or_nothing: bool = False
                ) -> None:
    """Write already-encoded output chunks to stdout (or ``stream``).

    By default they are written as they come.  With ``all_or_nothing`` an error
    part-way through leaves stdout as it was: output to a regular file is
    streamed and cut back on an error; to anything else (a pipe, a terminal) it
    is kept (in memory up to SPOOL_IN_MEMORY, then in an unlinked temporary
    file) until ``chunks`` is exhausted, and only then copied out.
    """
    import shutil
    import sys
    import tempfile

    out = sys.stdout if stream is None else stream
    raw = getattr(out, "buffer", None)

    def write(data: bytes) -> None:
        if raw is not None:
            raw.write(data)
        else:
            out.write(data.decode("utf-8", "surrogateescape"))

    start = _regular_file_position(raw) if all_or_nothing else None
    if not all_or_nothing or start is not None:
        # Streamed.  Into a regular file, an error cuts the file back to where this
        # output began, which is the same as never having written it, at no cost.
        try:
            for chunk in chunks:
                write(chunk)
        except BaseException:
            if start is not None and raw is not None:
                raw.flush()
                os.ftruncate(raw.fileno(), start)
                os.lseek(raw.fileno(), start, os.SEEK_SET)
            raise
        finally:
            if raw is not None:
                raw.flush()
            out.flush()
        return
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        for chunk in chunks:
            spool.write(chunk)
        spool.seek(0)
        if raw is not None:
            out.flush()
            shutil.copyfileobj(spool, raw, 1 << 20)
            raw.flush()
        else:
            while True:
                block = spool.read(1 << 20)
                if not block:
                    break
                write(block)
        out.flush()


def error(message: str, stream: Any = None) -> None:
    """One error line on stderr, ``qcow2kit: message`` (qemu-img's shape)."""
    import sys
    _write_text(sys.stderr if stream is None else stream, f"{PROG}: {message}\n")


def warning(message: str, stream: Any = None) -> None:
    """One warning line on stderr, ``qcow2kit: warning: message`` (QEMU's warn_report shape)."""
    import sys
    _write_text(sys.stderr if stream is None else stream, f"{PROG}: warning: {message}\n")


class progress_bar:  # noqa: N801 - used as a function: ``with progress_bar(n) as advance``
    """Context manager yielding ``advance(nbytes)``; shows a bar on stderr when
    ``enabled`` (tqdm), does nothing otherwise.

    ``total`` is the number of bytes that will really be read and written (it
    may be given later, through ``advance.start(total)``, once it is known); the
    rate shown is the rate of that work, not of skipped holes.  When the block
    ends without an error, the bar is replaced by one summary line that stays:
    the bytes done, the time and the rate (with ``of_size``, the size of the
    whole disk they belong to)."""

    def __init__(self, total: int | None = None, *, enabled: bool = True, stream: Any = None,
                 what: str = "copied", of_size: int | None = None) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream
        self.what = what
        self.of_size = of_size
        self.done = 0
        self._bar: Any = None
        self._t0 = 0.0

    def _out(self) -> Any:
        import sys
        return self.stream if self.stream is not None else sys.stderr

    def start(self, total: int) -> None:
        """Set the total (bytes to be done) and show the bar; again when it grows (retries)."""
        if self._bar is not None:
            self.total = self._bar.total = total
            self._bar.refresh()
            return
        self.total = total
        if self.enabled and self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                             file=self._out(), leave=False, dynamic_ncols=True)
        self._t0 = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> "progress_bar":
        if self.total is not None:
            self.start(self.total)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.enabled and exc_type is None:
            took = max(time.monotonic() - self._t0, 1e-9)
            line = f"{self.what} {human_bytes(self.done)} in {took:.2f} s"
            if self.done:
                line += f" ({human_bytes(int(self.done / took))}/s)"
            if self.of_size is not None:
                line += (f"; {human_bytes(max(0, self.of_size - self.done))} of the "
                         f"{human_bytes(self.of_size)} disk read as zeros and were skipped")
            _write_text(self._out(), line + "\n")


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB' (binary units, one decimal)."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
