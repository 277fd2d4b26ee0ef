"""Multiple-testing correction."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["bh_adjust", "bh_by_family"]


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


def bh_by_family(p_values: ArrayLike, families: ArrayLike) -> NDArray[np.float64]:
    """BH q-values computed separately within each family of tests.

    The FDR is controlled within each family: the number of tests ``m`` of a
    p-value's adjustment is the number of finite p-values with the same family
    label, whatever else (contrast, cell type) the rows differ in.

    Parameters
    ----------
    p_values
        Raw p-values in [0, 1]; NaN stays NaN and is not counted.
    families
        One label per p-value (e.g. ``primary``, ``exploratory``, ``control``).

    Returns
    -------
    :func:`bh_adjust` of each family's p-values, in the input order.
    """
    p = np.asarray(p_values, dtype=np.float64).ravel()
    fam = np.asarray(families, dtype=object).ravel()
    if fam.shape != p.shape:
        raise ValueError(f"p_values and families differ in length ({p.size} vs {fam.size})")
    out = np.full(p.shape, np.nan)
    for label in dict.fromkeys(fam.tolist()):
        m = fam == label
        out[m] = bh_adjust(p[m])
    return out
