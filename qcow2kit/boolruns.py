"""Runs of True in a numpy bool array: the one place the builder's zero detection, the
sparse-output detection of the copy engine and the copy bitmap find them."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def true_runs(flags: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays ``(starts, ends)``: each run of True in ``flags`` is ``[start, end)``."""
    padded = np.concatenate(([False], np.asarray(flags, dtype=bool), [False]))
    return (np.flatnonzero(~padded[:-1] & padded[1:]),     # False -> True
            np.flatnonzero(padded[:-1] & ~padded[1:]))     # True -> False
