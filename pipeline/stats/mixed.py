"""Linear mixed models with a random intercept per donor (statsmodels ``MixedLM``).

Two uses:

- :func:`mixed_timepoint_test`: ``y ~ timepoint + (1 | donor)`` for one
  contrast, using every donor with at least one of the two timepoints (the
  alternative to the paired t-test when donors miss timepoints);
- :func:`covariate_association`: ``y ~ covariate [+ timepoint] + (1 | donor)``,
  the association of a per-donor-timepoint value with a sample covariate.

Degrees of freedom. statsmodels reports Wald z tests, which are anti-conservative
with the ~13 donors of a typical study. The timepoint effect is estimated within
donors, so its t reference has the "between-within" df
``n_obs - n_donors - 1`` (with complete pairs this reproduces the paired t-test:
``n - 1`` df). A covariate may vary mostly between donors, so its t reference
has the conservative ``n_donors - n_fixed`` df.

Fits are REML. When ``MixedLM`` fails (an exception or non-finite estimates)
the timepoint test falls back to OLS with donor fixed effects (the same within-
donor comparison) and the covariate test to OLS with donor-clustered (CR1)
standard errors and ``n_donors - 1`` df (valid whatever the within-donor
correlation; a donor variance at the boundary, the usual cause of a failed
fit, makes the mixed model and OLS coincide); ``method`` and ``note`` say so.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["CovariateResult", "MixedResult", "covariate_association", "mixed_timepoint_test"]


@dataclass(frozen=True)
class MixedResult:
    """Outcome of :func:`mixed_timepoint_test` (NaN where undefined).

    Attributes
    ----------
    n_donors
        Donors with at least one observation at the two timepoints.
    n_paired
        Donors observed at both.
    n_obs
        Observations used.
    mean_reference, mean_test
        Means of the observations at each timepoint.
    effect
        Estimated ``test - reference`` difference (fixed effect).
    ci_low, ci_high
        Its ``1 - alpha`` CI (t, between-within df).
    statistic
        ``effect / se``.
    p_value
        Two-sided p-value (t, between-within df).
    method
        ``mixedlm`` or ``ols_donor_fixed`` (fallback).
    note
        Fallback reason, boundary fit, or why values are NaN.
    """

    n_donors: int
    n_paired: int
    n_obs: int
    mean_reference: float
    mean_test: float
    effect: float
    ci_low: float
    ci_high: float
    statistic: float
    p_value: float
    method: str
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


@dataclass(frozen=True)
class CovariateResult:
    """Outcome of :func:`covariate_association` (NaN where undefined).

    Attributes
    ----------
    n_donors, n_obs
        Donors and observations used.
    slope
        Change of ``y`` per unit of the covariate.
    ci_low, ci_high
        Its ``1 - alpha`` CI.
    p_value
        Two-sided p-value of the slope.
    method
        ``mixedlm`` or ``ols_cluster`` (fallback: OLS, donor-clustered standard errors).
    note
        Fallback reason or why values are NaN.
    """

    n_donors: int
    n_obs: int
    slope: float
    ci_low: float
    ci_high: float
    p_value: float
    method: str
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


def _is_constant(y: np.ndarray) -> bool:
    scale = max(float(np.abs(y).max()), 1.0) if y.size else 1.0
    return y.size == 0 or float(np.ptp(y)) <= 1e-12 * scale


def _fit_mixedlm(formula: str, data: pd.DataFrame) -> tuple[Any, str]:
    """REML MixedLM fit with a donor random intercept; returns (result, note)."""
    import statsmodels.formula.api as smf
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    note = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = smf.mixedlm(formula, data, groups=data["donor"])
        res = model.fit(reml=True, method=["lbfgs", "powell"])
    msgs = [str(w.message) for w in caught]
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        if any("boundary" in m or "singular" in m for m in msgs):
            note = "donor variance estimated at 0 (boundary fit)"
        else:
            note = "MixedLM convergence warning: " + msgs[0].splitlines()[0]
    if not np.all(np.isfinite(np.asarray(res.params))):
        raise FloatingPointError("non-finite MixedLM estimates")
    # the fixed effects' variances, checked before statsmodels takes their square roots
    # (res.bse_fe): a degenerate fit has negative ones, whose sqrt is NaN with a RuntimeWarning
    var_fe = np.diag(np.asarray(res.cov_params()))[: len(res.fe_params)]
    if not np.all(np.isfinite(var_fe) & (var_fe > 0)):
        raise FloatingPointError(
            "MixedLM fixed-effect variances are not positive (a degenerate fit)"
        )
    return res, note


def mixed_timepoint_test(
    data: pd.DataFrame,
    reference: str,
    test: str,
    *,
    value: str = "y",
    alpha: float = 0.05,
) -> MixedResult:
    """Test ``test - reference`` with ``value ~ timepoint + (1 | donor)``.

    Parameters
    ----------
    data
        One row per donor x timepoint with columns ``donor``, ``timepoint`` and
        ``value``; rows at other timepoints are ignored.
    reference, test
        The two timepoint levels compared.
    value
        Column holding the response.
    alpha
        The CI is ``1 - alpha``.

    Returns
    -------
    :class:`MixedResult`. NaN p-value (with ``note``) when the response is
    constant or there are no within-donor degrees of freedom.
    """
    d = data.loc[
        data["timepoint"].astype(str).isin([reference, test]), ["donor", "timepoint", value]
    ]
    d = d[np.isfinite(d[value].to_numpy(dtype=float))].copy()
    d["donor"] = d["donor"].astype(str)
    d["x"] = (d["timepoint"].astype(str) == test).astype(float)
    d["y"] = d[value].astype(float)
    n_obs = len(d)
    n_donors = int(d["donor"].nunique())
    n_paired = int((d.groupby("donor")["x"].nunique() == 2).sum())
    mr = float(d.loc[d["x"] == 0, "y"].mean()) if (d["x"] == 0).any() else math.nan
    mt = float(d.loc[d["x"] == 1, "y"].mean()) if (d["x"] == 1).any() else math.nan
    nan = math.nan
    df_t = n_obs - n_donors - 1

    def empty(note: str) -> MixedResult:
        return MixedResult(n_donors, n_paired, n_obs, mr, mt, nan, nan, nan, nan, nan, "none", note)

    if n_paired < 2 or df_t < 1:
        return empty(f"{n_paired} donor(s) observed at both timepoints: no within-donor test")
    if _is_constant(d["y"].to_numpy()):
        return empty("values are constant (zero variance): no test")
    method, note = "mixedlm", ""
    y_mean, y_sd = float(d["y"].mean()), float(d["y"].std())
    d["y"] = (d["y"] - y_mean) / y_sd  # well-conditioned fit; rescaled below
    try:
        res, note = _fit_mixedlm("y ~ x", d)
        est, se = float(res.fe_params["x"]), float(res.bse_fe["x"])
    except Exception as exc:
        import statsmodels.formula.api as smf

        method = "ols_donor_fixed"
        note = f"MixedLM failed ({type(exc).__name__}: {exc}); OLS with donor fixed effects"
        ols = smf.ols("y ~ x + C(donor)", d).fit()
        est, se = float(ols.params["x"]), float(ols.bse["x"])
    est, se = est * y_sd, se * y_sd
    if not se > 0 or not math.isfinite(se):
        return MixedResult(
            n_donors,
            n_paired,
            n_obs,
            mr,
            mt,
            est,
            nan,
            nan,
            nan,
            nan,
            method,
            (note + "; " if note else "")
            + "zero standard error (within-donor differences constant): no test",
        )
    tstat = est / se
    p = float(2.0 * stats.t.sf(abs(tstat), df_t))
    half = float(stats.t.ppf(1 - alpha / 2, df_t)) * se
    return MixedResult(
        n_donors, n_paired, n_obs, mr, mt, est, est - half, est + half, tstat, p, method, note
    )


def covariate_association(
    data: pd.DataFrame,
    *,
    value: str = "y",
    covariate: str = "covariate",
    adjust_timepoint: bool = False,
    alpha: float = 0.05,
) -> CovariateResult:
    """Association of ``value`` with ``covariate``: ``value ~ covariate + (1 | donor)``.

    Parameters
    ----------
    data
        One row per donor x timepoint with ``donor``, ``value``, ``covariate``
        (and ``timepoint`` when ``adjust_timepoint``); rows with a missing
        value or covariate are left out.
    value, covariate
        Column names of the response and the covariate.
    adjust_timepoint
        Add timepoint as a fixed effect (the association then comes from
        variation at equal timepoints only).
    alpha
        The CI is ``1 - alpha``.

    Returns
    -------
    :class:`CovariateResult`; the slope's t reference has ``n_donors - n_fixed``
    df (conservative). Falls back to OLS with donor-clustered standard errors
    (``method="ols_cluster"``, with ``note``) when the mixed model cannot be
    fitted or fewer than 3 donors have repeated observations.
    """
    cols = ["donor", value, covariate] + (["timepoint"] if adjust_timepoint else [])
    d = data[cols].copy()
    d = d[
        np.isfinite(d[value].to_numpy(dtype=float))
        & np.isfinite(d[covariate].to_numpy(dtype=float))
    ]
    d = d.rename(columns={value: "y", covariate: "c"})
    d["donor"] = d["donor"].astype(str)
    n_obs, n_donors = len(d), int(d["donor"].nunique())
    nan = math.nan
    formula = "y ~ c" + (" + C(timepoint)" if adjust_timepoint else "")
    n_fixed = 2 + (int(d["timepoint"].nunique()) - 1 if adjust_timepoint else 0)
    if n_obs < n_fixed + 2 or n_donors < 3:
        return CovariateResult(n_donors, n_obs, nan, nan, nan, nan, "none", "too few observations")
    if _is_constant(d["y"].to_numpy()):
        return CovariateResult(
            n_donors,
            n_obs,
            nan,
            nan,
            nan,
            nan,
            "none",
            "values are constant (zero variance): no test",
        )
    if _is_constant(d["c"].to_numpy()):
        return CovariateResult(
            n_donors, n_obs, nan, nan, nan, nan, "none", "covariate is constant: no test"
        )
    # centre and scale both variables for a well-conditioned fit; slope rescaled after
    y_sd, c_sd = float(d["y"].std()), float(d["c"].std())
    d["y"] = (d["y"] - d["y"].mean()) / y_sd
    d["c"] = (d["c"] - d["c"].mean()) / c_sd
    repeated = int((d.groupby("donor").size() >= 2).sum())
    try:
        if repeated < 3:
            raise ValueError(
                f"{repeated} donor(s) with repeated observations: donor variance not estimable"
            )
        res, note = _fit_mixedlm(formula, d)
        est, se = float(res.fe_params["c"]), float(res.bse_fe["c"])
        method, df_t = "mixedlm", max(n_donors - n_fixed, 1)
    except Exception as exc:
        import statsmodels.formula.api as smf

        groups = pd.factorize(d["donor"])[0]
        ols = smf.ols(formula, d).fit(cov_type="cluster", cov_kwds={"groups": groups}, use_t=True)
        est, se = float(ols.params["c"]), float(ols.bse["c"])
        method, df_t = "ols_cluster", max(n_donors - 1, 1)
        note = (
            f"MixedLM could not be fitted ({type(exc).__name__}: {exc}); OLS with "
            "donor-clustered standard errors"
        )
    est, se = est * y_sd / c_sd, se * y_sd / c_sd
    if not se > 0 or not math.isfinite(se):
        return CovariateResult(
            n_donors, n_obs, est, nan, nan, nan, method, note + "; zero standard error"
        )
    p = float(2.0 * stats.t.sf(abs(est / se), df_t))
    half = float(stats.t.ppf(1 - alpha / 2, df_t)) * se
    return CovariateResult(n_donors, n_obs, est, est - half, est + half, p, method, note)
