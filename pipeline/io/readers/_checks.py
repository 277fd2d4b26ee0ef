"""Value checks: counts are finite, non-negative whole numbers, and cells are not droplets.

:func:`_value_problem` says why stored values are not counts (also used to
choose an h5ad's counts matrix); :func:`_check_filtered` refuses unfiltered
droplets (see :data:`UNFILTERED_MIN_BARCODES`).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ...errors import DataFileError
from ._common import _COUNTS_ADVICE, _RAW_ADVICE

#: A matrix with at least this many barcodes ...
UNFILTERED_MIN_BARCODES = 20_000
#: ... whose median barcode holds fewer than this many detected features (stored
#: entries) is unfiltered droplets, not cells. Cell Ranger's raw matrices have a
#: median of 1-3; filtered scRNA-seq cells have hundreds.
UNFILTERED_MAX_MEDIAN_FEATURES = 20


def _check_filtered(
    n_barcodes: int, typical: float, where: str, *, statistic: str = "median"
) -> None:
    """Refuse unfiltered droplets: many barcodes, most holding a handful of features.

    ``typical`` is the median (or, from an mtx header, the mean) number of
    detected features (stored entries) per barcode.
    """
    if n_barcodes < UNFILTERED_MIN_BARCODES or typical >= UNFILTERED_MAX_MEDIAN_FEATURES:
        return
    raise DataFileError(
        f"{where} looks like unfiltered droplets, not cells: {n_barcodes:,} barcodes holding "
        f"a {statistic} of {typical:.1f} detected features each (cells hold hundreds; a matrix "
        f"of {UNFILTERED_MIN_BARCODES:,} barcodes or more with a {statistic} under "
        f"{UNFILTERED_MAX_MEDIAN_FEATURES} is unfiltered); {_RAW_ADVICE}"
    )


def _median_per_barcode(indptr: np.ndarray) -> float:
    return float(np.median(np.diff(indptr))) if len(indptr) > 1 else 0.0


def _value_problem(data: np.ndarray, what: str = "stored counts") -> str | None:
    """Why ``data`` are not counts (finite, non-negative whole numbers), or None."""
    if data.dtype.kind not in "iubf":
        return f"values of the non-numeric type {data.dtype}"
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            return (
                f"{int(bad.sum())} of {data.size} {what} are NaN or infinite "
                f"(e.g. {data[bad][0].item()})"
            )
    neg = data < 0
    if neg.any():
        return (
            f"{int(neg.sum())} of {data.size} {what} are negative (e.g. {data[neg][0].item()}): "
            "looks scaled"
        )
    if data.dtype.kind == "f":
        frac = data != np.rint(data)
        if frac.any():
            top = float(data.max())
            kind = "log-normalised" if top < 30 else "normalised (e.g. counts per 10,000)"
            return (
                f"{int(frac.sum())} of {data.size} {what} are not whole numbers "
                f"(e.g. {float(data[frac][0]):.6g}; max {top:.4g}): looks {kind}"
            )
    return None


def _check_values(x: sp.csr_matrix, where: str) -> None:
    """Counts must be finite, non-negative whole numbers (checked on stored entries only)."""
    problem = _value_problem(x.data)
    if problem is not None:
        raise DataFileError(f"{where}: {problem}. {_COUNTS_ADVICE}")
