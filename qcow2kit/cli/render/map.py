"""``qemu-img map`` output, byte for byte: one extent at a time (the reference
renderers :func:`map_entry_json`, :func:`render_map_json`, :func:`render_map_human`)
and vectorized over numpy extent batches (:func:`map_json_chunks`,
:func:`map_human_chunks`, what the command uses).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .qemujson import c_bytes

# --------------------------------------------------------------------------
# qemu-img map
# --------------------------------------------------------------------------

def _bool(v: Any) -> str:
    return "true" if v else "false"


def map_entry_json(entry: Mapping[str, Any]) -> str:
    """One ``qemu-img map --output=json`` entry (qemu-img.c ``dump_map_entry``).

    Fixed order start, length, depth, present, zero, data, then offset only
    when the entry has one; no separator and no newline.
    """
    text = ('{ "start": %d, "length": %d, "depth": %d, "present": %s, "zero": %s, "data": %s'
            % (entry["start"], entry["length"], entry["depth"], _bool(entry["present"]),
               _bool(entry["zero"]), _bool(entry["data"])))
    if entry.get("offset") is not None:
        text += ', "offset": %d' % entry["offset"]
    return text + "}"


def render_map_json(entries: Iterable[Mapping[str, Any]]) -> str:
    """The whole ``qemu-img map --output=json`` output.

    ``[``, the entries joined by ``,\\n``, then ``]\\n``.
    """
    return "[" + ",\n".join(map_entry_json(e) for e in entries) + "]\n"


def _hash_hex(n: int) -> str:
    # printf("%#x"): "0x..." except for zero, which is plain "0"
    return "%#x" % n if n else "0"


def render_map_human(entries: Iterable[Mapping[str, Any]]) -> str:
    """``qemu-img map`` human output.

    Entries need ``filename`` (the file the data lives in) besides the JSON
    members.  Only entries with data that does not read as zeroes are listed.
    Raises ``ValueError`` where qemu-img fails: data without a host offset
    ("File contains external, encrypted or compressed clusters.").
    """
    lines = ["%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File")]
    for e in entries:
        if e["data"] and e.get("offset") is None:
            raise ValueError("File contains external, encrypted or compressed clusters.")
        if e["data"] and not e["zero"]:
            lines.append("%-16s%-16s%-16s%s\n" % (
                _hash_hex(e["start"]), _hash_hex(e["length"]),
                _hash_hex(e.get("offset") or 0), e.get("filename") or ""))
    return "".join(lines)



# --------------------------------------------------------------------------
# qemu-img map, vectorized (numpy extent batches -> output bytes)
# --------------------------------------------------------------------------
#
# The map engine hands over extents as numpy structured arrays (EXTENT_DTYPE);
# a 256 GiB image can have millions of them, so nothing below runs Python per
# line.  Rows are formatted a block at a time in a fixed-width uint8 matrix,
# one row per line: constant text in fixed columns, every number right-aligned
# in a field as wide as the widest value of the batch (with leading zeroes),
# texts of varying length left-aligned and padded.  A boolean matrix of the
# same shape marks the cells that belong to the output, so ``mat[mask]``
# (row-major) is the block's text.  Decimal digits come from a table of all
# 4-digit groups (stored four cells at a time through a uint32 view), hex
# digits from a byte -> 2 digits table; masks, file names and the
# flag-dependent texts are rows of small tables, gathered and stored as single
# ``np.void`` items (one per row, not one per cell).


try:  # the engine's definition, once qcow2kit/mapping.py exists
    from qcow2kit.mapping import EXTENT_DTYPE  # type: ignore[attr-defined]
except ImportError:  # until then (or during a circular import): the same layout
    EXTENT_DTYPE = np.dtype([("start", "<u8"), ("length", "<u8"), ("offset", "<u8"),
                             ("depth", "<u2"), ("kind", "u1"), ("flags", "u1")])

# extent flag bits (qcow2kit.mapping)
_F_PRESENT, _F_ZERO, _F_DATA, _F_OFFSET = 1, 2, 4, 8

MAP_HUMAN_ERROR = "File contains external, encrypted or compressed clusters."
MAP_HUMAN_HEADER = "%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File")

_ROWS = 16384                   # lines formatted at a time at most ...
_SCRATCH = 4 << 20              # ... and at most this many cells (bounds the scratch memory)
_CHUNK = 65536                  # lines per chunk yielded at most (bounds the output buffer)
_DEC4 = np.frombuffer(b"".join(b"%04d" % i for i in range(10000)), dtype=np.uint32)
_HEX2 = np.frombuffer(b"".join(b"%02x" % i for i in range(256)), dtype=np.uint16)
_POW10 = [10 ** k for k in range(1, 20)]           # all below 2**64
_POW16 = [16 ** k for k in range(1, 16)]


class MapRenderError(ValueError):
    """``qemu-img map`` (human form) refuses the image.

    ``str()`` is qemu-img's exact message; ``index`` (counting every extent
    passed in, from 0), ``start`` and ``length`` name the extent."""

    def __init__(self, index: int, start: int, length: int) -> None:
        super().__init__(MAP_HUMAN_ERROR)
        self.index, self.start, self.length = index, start, length

    def __str__(self) -> str:
        return MAP_HUMAN_ERROR


def _u64(column: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(column, dtype=np.uint64)


def _top(column: np.ndarray, where: np.ndarray | None = None) -> int:
    if where is None:
        return int(column.max())
    return int(np.max(column, where=where, initial=0))


def _ndigits(v: np.ndarray, top: int, powers: Sequence[int]) -> np.ndarray:
    """Digit count of every value of ``v`` (0 has one digit), as indices; ``top``
    is the largest value that matters (larger ones count as ``top``'s)."""
    nd = np.ones(len(v), dtype=np.uint8)
    for p in powers:
        if p > top:
            break
        nd += v >= np.uint64(p)
    return nd.astype(np.intp)


def _dec_width(top: int) -> int:
    """Width of a decimal field for values up to ``top``: whole 4-digit groups."""
    return 4 * -(-len(str(top)) // 4)


def _void(table: np.ndarray) -> np.ndarray:
    """The rows of a 2-D table as one 1-D array of opaque items (``np.void``):
    a row is then gathered and stored as one item, much faster than cell by cell."""
    table = np.ascontiguousarray(table)
    return table.view(np.dtype((np.void, table.shape[1] * table.itemsize)))[:, 0]


def _cells(mat: np.ndarray, col: int, width: int) -> np.ndarray:
    """Cells ``[col, col + width)`` of every row of ``mat``, as one void item per row."""
    return mat[:, col:col + width].view(np.dtype((np.void, width * mat.itemsize)))[:, 0]


@functools.lru_cache(maxsize=None)
def _right_keep(width: int) -> np.ndarray:
    """Item k keeps the last k of ``width`` cells (k = 0 .. width)."""
    return _void(np.arange(width) >= width - np.arange(width + 1)[:, None])


@functools.lru_cache(maxsize=None)
def _left_keep(width: int) -> np.ndarray:
    """Item k keeps the first k of ``width`` cells (k = 0 .. 32; more keeps all)."""
    return _void(np.arange(width) < np.arange(33)[:, None])


def _text_table(texts: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Texts padded to one width: (void items, void masks of their cells, their
    lengths, the width)."""
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    width = max(1, int(lengths.max()))
    table = np.frombuffer(b"".join(t.ljust(width) for t in texts),
                          dtype=np.uint8).reshape(len(texts), width)
    return _void(table), _void(np.arange(width) < lengths[:, None]), lengths, width


class _Layout:
    """One line's cells: template text and mask, and where the variable fields go."""

    def __init__(self) -> None:
        self.text = bytearray()
        self.keep: list[bool] = []
        self.fields: dict[str, tuple[int, int]] = {}

    def const(self, text: bytes, keep: bool = True) -> None:
        self.text += text
        self.keep += [keep] * len(text)

    def align(self, to: int) -> None:
        while len(self.text) % to:
            self.const(b" ", keep=False)

    def field(self, name: str, width: int, align: int = 1, fill: bytes = b" ") -> None:
        self.align(align)
        self.fields[name] = (len(self.text), width)
        self.const(fill * width, keep=False)

    def scratch(self, lines: int) -> tuple[np.ndarray, np.ndarray]:
        """A text and a mask matrix for a block of lines (as many as ``lines``,
        within :data:`_ROWS` and :data:`_SCRATCH`), the constant cells filled."""
        rows = max(1, min(lines, _ROWS, _SCRATCH // max(1, len(self.text))))
        mat = np.empty((rows, len(self.text)), dtype=np.uint8)
        mat[:] = np.frombuffer(bytes(self.text), dtype=np.uint8)
        mask = np.empty((rows, len(self.text)), dtype=bool)
        mask[:] = np.array(self.keep, dtype=bool)
        return mat, mask


class _Output:
    """The bytes of one chunk, appended block by block into one buffer.

    The buffer is sized for the widest possible lines; pages past the end of
    the real text are never touched."""

    def __init__(self, lead: bytes, rows: int, width: int) -> None:
        self.buf = np.empty(len(lead) + rows * width, dtype=np.uint8)
        self.buf[:len(lead)] = np.frombuffer(lead, dtype=np.uint8)
        self.pos = len(lead)

    def add(self, mat: np.ndarray, mask: np.ndarray) -> None:
        piece = mat[mask]
        self.buf[self.pos:self.pos + len(piece)] = piece
        self.pos += len(piece)

    def bytes(self, trim: int = 0) -> bytes:
        return self.buf[:self.pos - trim].tobytes()


# --- JSON ------------------------------------------------------------------

def _put_dec(m32: np.ndarray, mask: np.ndarray, v: np.ndarray, nd: np.ndarray,
             col: int, width: int) -> None:
    """The decimal digits of ``v`` (all below ``10**width``) right-aligned in cells
    ``[col, col + width)`` (``col`` and ``width`` multiples of 4), of which only
    the last ``nd`` are kept.  ``m32``: the text matrix seen as uint32 words."""
    word = col // 4
    q = v
    for j in range(width // 4 - 1, -1, -1):     # least significant group last
        if j:
            q2 = q // np.uint64(10000)           # (// by a constant is fast; divmod not)
            r = q - q2 * np.uint64(10000)
            q = q2
        else:
            r = q
        m32[:, word + j] = _DEC4[r.view(np.int64)]
    _cells(mask, col, width)[:] = _right_keep(width)[nd]


# the members after depth, for every value of flags & 15: the booleans, then
# the key of the offset when it is valid
_JSON_TAILS = [(', "present": %s, "zero": %s, "data": %s%s'
                % (_bool(f & _F_PRESENT), _bool(f & _F_ZERO), _bool(f & _F_DATA),
                   ', "offset": ' if f & _F_OFFSET else "")).encode()
               for f in range(16)]
_JSON_TAIL_TXT, _JSON_TAIL_KEEP, _, _JSON_TAIL_W = _text_table(_JSON_TAILS)


def _json_layout(ws: int, wl: int, wd: int, wo: int) -> _Layout:
    lay = _Layout()
    lay.const(b'{ "start": ')
    lay.field("start", ws, 4)
    lay.const(b', "length": ')
    lay.field("length", wl, 4)
    lay.const(b', "depth": ')
    lay.field("depth", wd, 4)
    lay.field("tail", _JSON_TAIL_W)
    lay.field("offset", wo, 4)
    lay.const(b"},\n")
    lay.align(4)
    return lay


def _render_json(batch: np.ndarray, first: bool) -> Iterator[bytes]:
    """The JSON lines of ``batch`` (not empty), separated by ",\\n", in chunks
    of at most :data:`_CHUNK` lines; each chunk leads with "[" (the very first)
    or the ",\\n" held back from the line before it."""
    n = len(batch)
    flags = np.ascontiguousarray(batch["flags"], dtype=np.uint8)
    has_off = (flags & _F_OFFSET) != 0
    tops = (_top(batch["start"]), _top(batch["length"]), _top(batch["depth"]),
            _top(batch["offset"], has_off))
    lay = _json_layout(*(_dec_width(t) for t in tops))
    mat, mask = lay.scratch(n)
    rows = len(mat)
    tail_txt, tail_keep = _cells(mat, *lay.fields["tail"]), _cells(mask, *lay.fields["tail"])
    for c in range(0, n, _CHUNK):
        out = _Output(b"[" if first and not c else b",\n", min(n - c, _CHUNK), mat.shape[1])
        end = min(n, c + _CHUNK)
        for a in range(c, end, rows):
            b = min(end, a + rows)
            m, k = mat[:b - a], mask[:b - a]
            m32 = m.view(np.uint32)
            for name, top in zip(("start", "length", "depth", "offset"), tops):
                v = _u64(batch[name][a:b])
                if name == "offset":
                    v = v * has_off[a:b]         # 0 where not valid (and no digits kept)
                nd = _ndigits(v, top, _POW10)
                if name == "offset":
                    nd *= has_off[a:b]
                _put_dec(m32, k, v, nd, *lay.fields[name])
            idx = (flags[a:b] & 15).astype(np.intp)
            tail_txt[:b - a] = _JSON_TAIL_TXT[idx]
            tail_keep[:b - a] = _JSON_TAIL_KEEP[idx]
            out.add(m, k)
        yield out.bytes(trim=2)          # the last ",\n" only goes out if more follows


def _empty_map_entry(start: int) -> bytes:
    # qemu-img map of an empty range still dumps its initial zero-length entry
    return map_entry_json({"start": start, "length": 0, "depth": 0, "present": False,
                           "zero": False, "data": False}).encode()


def map_json_chunks(batches: Iterable[np.ndarray], *,
                    empty_start: int | None = 0) -> Iterator[bytes]:
    """The bytes of ``qemu-img map --output=json``: a chunk per non-empty batch
    (one per :data:`_CHUNK` extents of a larger batch), then the closing ``]\\n``.

    ``batches`` are arrays with the fields of :data:`EXTENT_DTYPE` (``kind`` is
    not used); empty ones may come anywhere.  The first chunk starts with
    ``[``; entries are separated by ``,\\n`` (held back at the end of a batch
    until the next entry shows up).  When no extent comes at all (an empty
    image, or ``--start-offset`` at or past its end) qemu-img still prints its
    initial zero-length entry, at ``empty_start``:
    ``[{ "start": 0, "length": 0, "depth": 0, "present": false, ...}]``.
    Numbers print as unsigned decimals (qemu-img prints int64, so the two agree
    below 2**63, all an image can hold).
    """
    first = True
    for batch in batches:
        if len(batch):
            yield from _render_json(batch, first)
            first = False
    if first:
        # empty_start=None: a listing that may legitimately be empty (map --order=host).
        yield (b"[]\n" if empty_start is None
               else b"[" + _empty_map_entry(empty_start) + b"]\n")
    else:
        yield b"]\n"


# --- human -----------------------------------------------------------------

def _hex_len(v: int) -> int:
    """Length of printf("%#x", v): "0" for 0, else "0x" and the digits."""
    return len("%#x" % v) if v else 1


class _FileNames:
    """The file names by depth as void items padded to one width, with masks."""

    def __init__(self, filenames: Sequence[str]) -> None:
        raw = [c_bytes(f) for f in filenames]
        self.count = len(raw)
        self.text, self.keep, self.lengths, self.width = _text_table(raw or [b""])


def _human_layout(hex_fields: Sequence[tuple[int, int]], name_width: int) -> _Layout:
    lay = _Layout()
    for name, (digits, pad) in zip(("start", "length", "offset"), hex_fields):
        lay.field(name, 2 + digits, fill=b"0")   # "0x" and the digits, right-aligned
        lay.field(name + "_pad", pad)            # spaces up to 16 cells
    lay.field("file", name_width)
    lay.const(b"\n")
    return lay


def _render_human(batch: np.ndarray, names: _FileNames) -> Iterator[bytes]:
    """The human lines of ``batch`` (not empty; every extent printed), in
    chunks of at most :data:`_CHUNK` lines."""
    n = len(batch)
    depth_all = np.ascontiguousarray(batch["depth"], dtype=np.intp)
    if int(depth_all.max()) >= names.count:
        raise IndexError("no file name for depth %d" % int(depth_all.max()))
    cols = ("start", "length", "offset")
    tops = [_top(batch[c]) for c in cols]
    digits = [len("%x" % t) for t in tops]
    pads = [max(0, 16 - _hex_len(int(batch[c].min()))) for c in cols]
    # every name is stored at full width; the names this batch uses decide the field
    name_width = int(names.lengths[depth_all].max())
    lay = _human_layout(list(zip(digits, pads)), names.width if name_width else 0)
    mat, mask = lay.scratch(n)
    rows = len(mat)
    width = mat.shape[1]
    row_base = np.arange(rows, dtype=np.intp) * width
    fields = {name: (_cells(mat, *lay.fields[name]), _cells(mask, *lay.fields[name]))
              for name in ("file", *cols) if lay.fields[name][1]}
    pad_keep = {name: _cells(mask, *lay.fields[name + "_pad"])
                for name, pad in zip(cols, pads) if pad}
    for c in range(0, n, _CHUNK):
        out = _Output(b"", min(n - c, _CHUNK), width)
        end = min(n, c + _CHUNK)
        for a in range(c, end, rows):
            b = min(end, a + rows)
            m, k = mat[:b - a], mask[:b - a]
            for name, top, h, pad in zip(cols, tops, digits, pads):
                col, w = lay.fields[name]
                v = _u64(batch[name][a:b])
                nd = _ndigits(v, top, _POW16)
                nbytes = (h + 1) // 2
                big = v.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - nbytes:]
                m[:, col + 2:col + 2 + h] = _HEX2[big].view(np.uint8)[:, 2 * nbytes - h:]
                m[:, col + 1] = ord("0")
                # "0x" ends where the digits start; for 0 only its last digit is kept
                m.reshape(-1)[row_base[:b - a] + (col + 1 + h) - nd] = ord("x")
                shown = np.where(v == 0, 1, nd + 2)
                fields[name][1][:b - a] = _right_keep(w)[shown]
                if pad:
                    pad_keep[name][:b - a] = _left_keep(pad)[np.maximum(16 - shown, 0)]
            if name_width:
                d = depth_all[a:b]
                fields["file"][0][:b - a] = names.text[d]
                fields["file"][1][:b - a] = names.keep[d]
            out.add(m, k)
        yield out.bytes()


def map_human_chunks(batches: Iterable[np.ndarray],
                     filenames: Sequence[str]) -> Iterator[bytes]:
    """The bytes of ``qemu-img map`` (human form): the header, then a chunk
    per batch that has lines to print (one per :data:`_CHUNK` lines of more).

    ``filenames[depth]`` is the file an extent's offset refers to.  A line is
    printed for every extent with data that does not read as zeroes:
    ``printf("%#-16x%#-16x%#-16x%s\\n", start, length, offset, file)``.  Where
    qemu-img fails, at an extent with data but no valid offset (compressed,
    encrypted or external clusters), the lines before it are yielded and then
    :class:`MapRenderError` (a ``ValueError`` whose text is qemu-img's message)
    is raised.  Like qemu-img, a zero extent with data is only refused when it
    is the very first extent: ``dump_map_entry`` turns every later one into a
    plain zero entry before it gets to check it.
    """
    yield MAP_HUMAN_HEADER.encode()
    names = _FileNames(filenames)
    index = 0                       # extents seen before this batch
    for batch in batches:
        n = len(batch)
        if n == 0:
            continue
        flags = np.ascontiguousarray(batch["flags"], dtype=np.uint8)
        data = (flags & _F_DATA) != 0
        bad = data & ((flags & (_F_OFFSET | _F_ZERO)) == 0)
        if index == 0 and data[0] and not flags[0] & _F_OFFSET:
            bad[0] = True
        stop = int(np.argmax(bad)) if bad.any() else n
        shown = np.flatnonzero((flags[:stop] & (_F_DATA | _F_ZERO)) == _F_DATA)
        if shown.size:
            yield from _render_human(batch if shown.size == n else batch[shown], names)
        if stop < n:
            raise MapRenderError(index + stop, int(batch["start"][stop]),
                                 int(batch["length"][stop]))
        index += n
