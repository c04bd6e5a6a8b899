"""Sizes and offsets written the way QEMU reads them (``qemu_strtosz``, util/cutils.c).

One parser for the whole package: ``qcow2kit create``'s SIZE and ``-o`` sizes,
and every size or offset option of the other commands.
"""

from __future__ import annotations


_SUFFIXES = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def strtoull_prefix(text: str, base: int) -> tuple[int | None, int, bool]:
    """Like C strtoull: (value or None when nothing converted, end index, overflowed)."""
    i = 0
    n = len(text)
    while i < n and text[i] in " \t\n\v\f\r":
        i += 1
    neg = False
    if i < n and text[i] in "+-":
        neg = text[i] == "-"
        i += 1
    # "0x" is a prefix only when a hex digit follows ("0x" alone converts the "0")
    if base == 16 and text[i:i + 2].lower() == "0x" and i + 2 < n and \
            text[i + 2].lower() in "0123456789abcdef":
        i += 2
    digits = "0123456789abcdef"[:base]
    j = i
    while j < n and text[j].lower() in digits:
        j += 1
    if j == i:
        return None, 0, False
    value = int(text[i:j], base)
    overflow = value >= 1 << 64
    if neg:
        value = (-value) % (1 << 64)
    return value, j, overflow


def qemu_strtosz(text: str) -> tuple[int, bool]:
    """Parse a size the way QEMU 7.2's ``qemu_strtosz`` does.

    Returns ``(value, hex_with_suffix)``; the flag means QEMU would print its
    deprecation warning for a multiplier on a hex number.  Raises
    :class:`OverflowError` for values of 2**64 and more and :class:`ValueError`
    for text QEMU rejects (a fraction without a multiplier, an exponent,
    trailing characters, a minus sign).
    """
    val, end, overflow = strtoull_prefix(text, 10)
    if val is None:
        raise ValueError(text)
    if "-" in text[:end]:
        raise ValueError(text)
    if overflow:
        raise OverflowError(text)
    frac = 0.0
    is_hex = False
    if val == 0 and text[end:end + 1] in ("x", "X"):
        val, end, overflow = strtoull_prefix(text, 16)
        assert val is not None
        if overflow:
            raise OverflowError(text)
        is_hex = True
        if text[end:end + 1] == ".":
            raise ValueError(text)
    elif text[end:end + 1] == ".":
        # strtod on ".digits"; a bare "." converts nothing and is skipped
        j = end + 1
        while j < len(text) and text[j].isdigit():
            j += 1
        if j == end + 1:
            end += 1
        else:
            if text[j:j + 1] in ("e", "E") and (text[j + 1:j + 2].isdigit() or (
                    text[j + 1:j + 2] in ("+", "-") and text[j + 2:j + 3].isdigit())):
                raise ValueError(text)
            frac = float("0" + text[end:j])
            end = j
    suffix = text[end:end + 1].lower()
    shift = 0
    if suffix and suffix in _SUFFIXES:
        shift = _SUFFIXES[suffix]
        end += 1
    if end != len(text):
        raise ValueError(text)
    # a 64-bit fixed-point fraction, as QEMU keeps it (1.0 after rounding converts to 0)
    valf = int(frac * 2.0 ** 64) if frac < 1.0 else 0
    if shift == 0:
        if valf:
            raise ValueError(text)
        return val, False
    mul = 1 << shift
    total = val * mul + ((valf * mul) >> 64) + (((valf * mul) >> 63) & 1)
    if total >= 1 << 64:
        raise OverflowError(text)
    return total, is_hex
