"""Runs of True in a numpy bool array: the one place the builder's zero detection, the
sparse-output detection of the copy engine and the copy bitmap find them; and the one
merge of sorted byte spans into ranges (data ranges, bitmap dirty ranges)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import numpy.typing as npt


def true_runs(flags: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays ``(starts, ends)``: each run of True in ``flags`` is ``[start, end)``."""
    padded = np.concatenate(([False], np.asarray(flags, dtype=bool), [False]))
    return (np.flatnonzero(~padded[:-1] & padded[1:]),     # False -> True
            np.flatnonzero(padded[:-1] & ~padded[1:]))     # True -> False


def runs_mask(starts: np.ndarray, ends: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """A bool array for ``[lo, hi)``: True inside the runs ``[starts[k], ends[k])`` (int
    arrays; the runs may overlap and reach outside ``[lo, hi)``)."""
    s = np.clip(np.asarray(starts, dtype=np.int64), lo, hi) - lo
    e = np.clip(np.asarray(ends, dtype=np.int64), lo, hi) - lo
    keep = s < e
    delta = np.zeros(hi - lo + 1, dtype=np.int64)
    np.add.at(delta, s[keep], 1)
    np.add.at(delta, e[keep], -1)
    return np.cumsum(delta[:-1]) > 0


def merge_spans(spans: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """``(start, end)`` spans sorted by start, those that touch or overlap merged, as
    ``(offset, length)`` ranges."""
    cur_a = cur_e = -1
    for a, e in spans:
        if cur_e >= 0 and a <= cur_e:
            cur_e = max(cur_e, e)
            continue
        if cur_e > cur_a:
            yield cur_a, cur_e - cur_a
        cur_a, cur_e = a, e
    if cur_e > cur_a:
        yield cur_a, cur_e - cur_a
