"""Paired tests across donors: paired t (effect, Cohen's dz, CI), Wilcoxon signed-rank,
and a global test of no change across three or more timepoints (Hotelling's T^2).

Each donor contributes one value per timepoint (e.g. the mean signature score
of its cells of one type); the tests are on the donors' within-donor
differences (``d_i = test_i - reference_i``), so the donor, never the cell, is
the unit of replication.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

__all__ = ["PairedResult", "RepeatedMeasuresResult", "paired_test", "repeated_measures_test"]

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


@dataclass(frozen=True)
class RepeatedMeasuresResult:
    """Outcome of :func:`repeated_measures_test` (NaN where a value is undefined).

    Attributes
    ----------
    n
        Donors with a finite value at every timepoint (the donors used).
    k
        Timepoints.
    t2
        Hotelling's T^2 of the ``k - 1`` within-donor differences.
    statistic
        The exact F transform ``(n - k + 1) / ((k - 1) (n - 1)) * T^2``.
    df1, df2
        Its degrees of freedom, ``k - 1`` and ``n - k + 1``.
    p_value
        ``P(F(df1, df2) >= statistic)``.
    method
        ``hotelling_t2``.
    note
        Why the test values are NaN (empty when they are defined).
    """

    n: int
    k: int
    t2: float
    statistic: float
    df1: float
    df2: float
    p_value: float
    method: str = "hotelling_t2"
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (one table row)."""
        return asdict(self)


def repeated_measures_test(values: ArrayLike) -> RepeatedMeasuresResult:
    """Global test of "no change across all timepoints" on donor-level values.

    Hotelling's one-sample T^2 on each donor's ``k - 1`` differences from the
    first timepoint, ``d_i = (y_i2 - y_i1, ..., y_ik - y_i1)``: under
    ``H0: E[d_i] = 0``, ``F = (n - k + 1) / ((k - 1)(n - 1)) T^2`` follows
    ``F(k - 1, n - k + 1)`` exactly when the differences are multivariate
    normal, whatever their covariance.

    Why this test: the repeated-measures ANOVA F (and a mixed model with a
    random donor intercept, whose implied covariance is compound symmetric)
    assumes sphericity, equal variances of all pairwise differences. Donors
    respond unequally to an intervention (a post-exercise sample varies more
    between donors than a baseline), and then that F rejects too often; the
    Greenhouse-Geisser correction is approximate. T^2 leaves the k x k
    covariance free, so its level is exact without sphericity; it is invariant
    to the reference timepoint (any full-rank set of within-donor contrasts
    gives the same T^2). Its cost: only donors with every timepoint enter,
    ``n >= k`` of them are needed (``df2 = n - k + 1 >= 1``), and with few
    donors it has less power than the spherical F when sphericity holds.

    Parameters
    ----------
    values
        Array of shape ``(n_donors, k)``: one row per donor, one column per
        timepoint (the first column is the reference of the differences; the
        result does not depend on which). Donors with a non-finite value are
        left out.

    Returns
    -------
    :class:`RepeatedMeasuresResult`. With ``k < 2`` timepoints, fewer than
    ``k`` complete donors, or differences whose covariance is singular (e.g.
    constant differences), the test values are NaN and ``note`` says why.
    """
    y = np.asarray(values, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"values must be 2-D (donors x timepoints), got shape {y.shape}")
    k = int(y.shape[1])
    y = y[np.isfinite(y).all(axis=1)]
    n = int(y.shape[0])
    nan = math.nan
    p = k - 1
    if k < 2:
        return RepeatedMeasuresResult(n, k, nan, nan, nan, nan, nan, note="fewer than 2 timepoints")
    if n < k:
        return RepeatedMeasuresResult(
            n,
            k,
            nan,
            nan,
            float(p),
            nan,
            nan,
            note=f"{n} donor(s) with all {k} timepoints: Hotelling's T^2 needs at least {k}",
        )
    d = y[:, 1:] - y[:, :1]
    dbar = d.mean(axis=0)
    cov = np.atleast_2d(np.cov(d, rowvar=False, ddof=1))
    eig = np.linalg.eigvalsh(cov)
    scale = max(float(np.abs(y).max()), 1.0) ** 2
    if not eig.min() > _CONSTANT_RTOL * max(float(eig.max()), scale):
        return RepeatedMeasuresResult(
            n,
            k,
            nan,
            nan,
            float(p),
            float(n - p),
            nan,
            note="within-donor differences have a singular covariance (constant or collinear): no test",
        )
    t2 = float(n * dbar @ np.linalg.solve(cov, dbar))
    f = t2 * (n - p) / (p * (n - 1))
    pval = float(stats.f.sf(f, p, n - p))
    return RepeatedMeasuresResult(n, k, t2, float(f), float(p), float(n - p), pval)
