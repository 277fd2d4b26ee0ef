"""Paired tests across donors: paired t (effect, Cohen's dz, CI) and Wilcoxon signed-rank.

Each donor contributes one value per timepoint (e.g. the mean signature score
of its cells of one type); the test is on the donors' differences
``d_i = test_i - reference_i``, so the donor, never the cell, is the unit of
replication.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

__all__ = ["PairedResult", "paired_test"]

#: Differences whose spread is below this (relative to their scale) count as constant.
_CONSTANT_RTOL = 1e-12


@dataclass(frozen=True)
class PairedResult:
    """Outcome of :func:`paired_test` (NaN where a value is undefined).

    Attributes
    ----------
    n
        Donors (pairs) used.
    mean_reference, mean_test
        Means over the donors at each timepoint.
    effect
        Mean paired difference ``mean(test - reference)``.
    sd_diff
        Sample standard deviation of the differences (``ddof=1``).
    dz
        Cohen's dz = ``effect / sd_diff``.
    ci_low, ci_high
        ``1 - alpha`` confidence interval of ``effect`` (t distribution, ``n - 1`` df).
    statistic
        Paired t statistic.
    p_value
        Two-sided paired t-test p-value.
    p_wilcoxon
        Two-sided Wilcoxon signed-rank p-value (exact for small n without ties
        or zeros, normal approximation otherwise; scipy's ``method="auto"``).
    note
        Why a value is NaN (empty when all are defined).
    """

    n: int
    mean_reference: float
    mean_test: float
    effect: float
    sd_diff: float
    dz: float
    ci_low: float
    ci_high: float
    statistic: float
    p_value: float
    p_wilcoxon: float
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (one table row)."""
        return asdict(self)


def paired_test(reference: ArrayLike, test: ArrayLike, *, alpha: float = 0.05) -> PairedResult:
    """Paired t-test and Wilcoxon signed-rank test of ``test - reference``.

    Parameters
    ----------
    reference, test
        One value per donor, aligned (donor ``i`` at both timepoints). Pairs
        with a non-finite value are left out.
    alpha
        The confidence interval is ``1 - alpha``.

    Returns
    -------
    :class:`PairedResult`. With fewer than 2 pairs, or differences that are all
    equal (zero spread: the t statistic is undefined), the test values are NaN
    and ``note`` says why; a p-value is never invented.
    """
    r = np.asarray(reference, dtype=np.float64).ravel()
    t = np.asarray(test, dtype=np.float64).ravel()
    if r.shape != t.shape:
        raise ValueError(f"reference and test differ in length ({r.size} vs {t.size})")
    ok = np.isfinite(r) & np.isfinite(t)
    r, t = r[ok], t[ok]
    n = int(r.size)
    nan = math.nan
    if n == 0:
        return PairedResult(0, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, "no donor pairs")
    d = t - r
    effect = float(d.mean())
    mr, mt = float(r.mean()), float(t.mean())
    if n < 2:
        return PairedResult(
            n, mr, mt, effect, nan, nan, nan, nan, nan, nan, nan, "one donor pair: no test"
        )
    sd = float(d.std(ddof=1))
    scale = max(float(np.abs(d).max()), float(np.abs(r).max()), float(np.abs(t).max()), 1.0)
    if not sd > _CONSTANT_RTOL * scale:
        return PairedResult(
            n,
            mr,
            mt,
            effect,
            0.0,
            nan,
            nan,
            nan,
            nan,
            nan,
            nan,
            "paired differences are constant (zero variance): no test",
        )
    se = sd / math.sqrt(n)
    tstat = effect / se
    df = n - 1
    p = float(2.0 * stats.t.sf(abs(tstat), df))
    half = float(stats.t.ppf(1.0 - alpha / 2.0, df)) * se
    nonzero = d[np.abs(d) > _CONSTANT_RTOL * scale]
    p_w = nan
    if nonzero.size >= 1:
        p_w = float(stats.wilcoxon(nonzero, zero_method="wilcox", method="auto").pvalue)
    return PairedResult(
        n=n,
        mean_reference=mr,
        mean_test=mt,
        effect=effect,
        sd_diff=sd,
        dz=effect / sd,
        ci_low=effect - half,
        ci_high=effect + half,
        statistic=float(tstat),
        p_value=p,
        p_wilcoxon=p_w,
    )
