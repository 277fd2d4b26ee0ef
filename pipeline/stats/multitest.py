"""Multiple-testing correction."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["bh_adjust"]


def bh_adjust(p_values: ArrayLike) -> NDArray[np.float64]:
    """Benjamini-Hochberg adjusted p-values (q-values); NaN stays NaN.

    Parameters
    ----------
    p_values
        Raw p-values in [0, 1]; NaN marks a test that could not be done and is
        not counted in the number of tests ``m``.

    Returns
    -------
    The adjusted values ``q_(i) = min_{j >= i} min(1, m p_(j) / j)`` in the
    input order (identical to ``statsmodels.stats.multitest.multipletests(...,
    method="fdr_bh")`` on the finite values).
    """
    p = np.asarray(p_values, dtype=np.float64).ravel()
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return out
    if np.any((p[ok] < 0) | (p[ok] > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    pv = p[ok]
    order = np.argsort(pv, kind="mergesort")
    ranked = pv[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(q_sorted, 1.0)
    out[ok] = q
    return out
