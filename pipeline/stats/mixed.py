"""Linear mixed models with a random intercept per donor (statsmodels ``MixedLM``).

Two uses:

- :func:`mixed_timepoint_test`: ``y ~ timepoint + (1 | donor)`` for one
  contrast, using every donor with at least one of the two timepoints (the
  alternative to the paired t-test when donors miss timepoints);
- :func:`covariate_association`: ``y ~ c_within + c_between [+ timepoint] +
  (1 | donor)``, the association of a per-donor-timepoint value with a sample
  covariate, split into a within-donor part (the covariate centred on each
  donor's mean: do a donor's samples with more of the covariate score higher?)
  and a between-donor part (the donor means: do donors with more of it score
  higher?). Timepoint is a fixed effect by default, so a covariate and a score
  that both merely change with time are not associated.

Degrees of freedom. statsmodels reports Wald z tests, which are anti-conservative
with the ~13 donors of a typical study; here every slope has a t reference with
"between-within" df (SAS ``DDFM=BW``). An effect estimated within donors (the
timepoint effect, the within-donor covariate slope) has ``n_obs - n_donors -
k_within`` df, ``k_within`` the number of within-donor fixed parameters (with
complete pairs the timepoint test reproduces the paired t-test: ``n - 1`` df).
The between-donor slope has ``n_donors - 2`` df (intercept and slope: a
regression of donor means; conservative when donors contribute unequal numbers
of observations).

Fits are REML. Each optimiser of ``optimizers`` (default
:data:`DEFAULT_OPTIMIZERS`, config ``differential.mixed_optimizers``) is tried
in its own ``fit`` call, from statsmodels' default start, until one converges:
no exception, the converged flag set, no convergence warning other than the
donor variance at its boundary (0), finite estimates and positive fixed-effect
variances. ``method`` names the optimiser that converged (``mixedlm:lbfgs``)
and ``note`` the ones that failed and why. Only when all fail does the
timepoint test fall back to OLS with donor fixed effects (the same within-donor
comparison) and the covariate test to OLS with donor-clustered (CR1) standard
errors and ``n_donors - 1`` df (valid whatever the within-donor correlation);
``method`` and ``note`` say so.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "OPTIMIZERS",
    "CovariateResult",
    "MixedResult",
    "covariate_association",
    "mixed_timepoint_test",
]

#: statsmodels ``MixedLM.fit`` methods that may be tried (gradient-based and derivative-free).
OPTIMIZERS = ("lbfgs", "bfgs", "powell", "nm", "cg")
#: The optimisers tried, in order, when none are given (= ``differential.mixed_optimizers``).
DEFAULT_OPTIMIZERS = ("lbfgs", "bfgs", "powell", "nm")

Component = Literal["within", "between"]


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
        ``mixedlm:<optimiser>`` (the optimiser that converged) or
        ``ols_donor_fixed`` (every optimiser failed).
    note
        Optimisers that failed and why, the fallback reason, a boundary fit,
        or why values are NaN.
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
    """One component of :func:`covariate_association` (NaN where undefined).

    Attributes
    ----------
    component
        ``within`` (slope on the donor-centred covariate: change of the value
        with the covariate inside a donor) or ``between`` (slope on the donor
        mean of the covariate: difference between donors).
    n_donors, n_obs
        Donors and observations used.
    slope
        Change of ``y`` per unit of the covariate (component).
    ci_low, ci_high
        Its ``1 - alpha`` CI.
    df
        Degrees of freedom of the slope's t reference.
    p_value
        Two-sided p-value of the slope.
    method
        ``mixedlm:<optimiser>``, ``ols_cluster`` (fallback: OLS, donor-clustered
        standard errors) or ``none``.
    note
        Optimisers that failed, fallback reason, or why values are NaN.
    """

    component: Component
    n_donors: int
    n_obs: int
    slope: float
    ci_low: float
    ci_high: float
    df: float
    p_value: float
    method: str
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


def _is_constant(y: np.ndarray) -> bool:
    scale = max(float(np.abs(y).max()), 1.0) if y.size else 1.0
    return y.size == 0 or float(np.ptp(y)) <= 1e-12 * scale


def _optimizers(optimizers: Sequence[str] | None) -> tuple[str, ...]:
    opts = DEFAULT_OPTIMIZERS if optimizers is None else tuple(optimizers)
    bad = [o for o in opts if o not in OPTIMIZERS]
    if not opts or bad:
        raise ValueError(
            f"optimizers must be a non-empty list of {', '.join(OPTIMIZERS)}; got {list(opts)}"
        )
    return opts


def _check_fit(res: Any, caught: list[warnings.WarningMessage]) -> str:
    """Why a MixedLM fit is not usable ('' when it is); raises nothing."""
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    conv = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    boundary = any("boundary" in m for m in conv)
    # at the boundary the Hessian of the donor variance is not negative definite: expected
    other = [m for m in conv if "boundary" not in m and not (boundary and "Hessian" in m)]
    if not res.converged:
        return "did not converge"
    if other:
        return other[0].splitlines()[0]
    if not np.all(np.isfinite(np.asarray(res.params))):
        return "non-finite estimates"
    # the fixed effects' variances, checked before statsmodels takes their square roots
    # (res.bse_fe): a degenerate fit has negative ones, whose sqrt is NaN with a RuntimeWarning
    var_fe = np.diag(np.asarray(res.cov_params()))[: len(res.fe_params)]
    if not np.all(np.isfinite(var_fe) & (var_fe > 0)):
        return "fixed-effect variances are not positive (a degenerate fit)"
    return ""


def _fit_mixedlm(
    y: np.ndarray, exog: pd.DataFrame, groups: np.ndarray, optimizers: Sequence[str]
) -> tuple[Any, str, str]:
    """REML MixedLM with a random intercept per group, each optimiser in its own attempt.

    Parameters
    ----------
    y
        Response.
    exog
        Fixed-effect design (with the intercept column); its column names name
        the estimates.
    groups
        Donor of each row.
    optimizers
        ``MixedLM.fit`` methods, tried in order.

    Returns
    -------
    The result, the optimiser that converged, and a note (optimisers that
    failed before it; a boundary fit).

    Raises
    ------
    RuntimeError
        Every optimiser failed (the message lists each one's reason).
    """
    from statsmodels.regression.mixed_linear_model import MixedLM

    model = MixedLM(y, exog, groups=groups)
    failed: list[str] = []
    for opt in optimizers:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                res = model.fit(reml=True, method=opt)
                why = _check_fit(res, caught)
            except Exception as exc:  # any failure of this optimiser: try the next
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if why:
            failed.append(f"{opt} failed ({why})")
            continue
        notes = []
        if failed:
            notes.append("; ".join(failed) + f"; {opt} converged")
        if any("boundary" in str(w.message) for w in caught):
            notes.append("donor variance estimated at 0 (boundary fit)")
        return res, opt, "; ".join(notes)
    raise RuntimeError("every MixedLM optimiser failed: " + "; ".join(failed))


def mixed_timepoint_test(
    data: pd.DataFrame,
    reference: str,
    test: str,
    *,
    value: str = "y",
    alpha: float = 0.05,
    optimizers: Sequence[str] | None = None,
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
    optimizers
        statsmodels ``MixedLM.fit`` methods tried one by one until one
        converges (:data:`OPTIMIZERS`); ``None``: :data:`DEFAULT_OPTIMIZERS`.

    Returns
    -------
    :class:`MixedResult`. NaN p-value (with ``note``) when the response is
    constant or there are no within-donor degrees of freedom.

    Raises
    ------
    ValueError
        An unknown optimiser name.
    """
    opts = _optimizers(optimizers)
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
    y_mean, y_sd = float(d["y"].mean()), float(d["y"].std())
    d["y"] = (d["y"] - y_mean) / y_sd  # well-conditioned fit; rescaled below
    exog = pd.DataFrame({"Intercept": 1.0, "x": d["x"]}, index=d.index)
    try:
        res, opt, note = _fit_mixedlm(d["y"].to_numpy(), exog, d["donor"].to_numpy(), opts)
        est, se = float(res.fe_params["x"]), float(res.bse_fe["x"])
        method = f"mixedlm:{opt}"
    except RuntimeError as exc:
        import statsmodels.api as sm

        method = "ols_donor_fixed"
        note = f"{exc}; OLS with donor fixed effects"
        donors = pd.get_dummies(d["donor"], drop_first=True, dtype=float)
        ols = sm.OLS(d["y"], pd.concat([exog, donors], axis=1)).fit()
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


def _residual_share(x: np.ndarray, basis: np.ndarray) -> float:
    """Norm of ``x`` left after least-squares projection on ``basis``, relative to ``x``'s."""
    norm = float(np.linalg.norm(x))
    if norm == 0.0:
        return 0.0
    coef, *_ = np.linalg.lstsq(basis, x, rcond=None)
    return float(np.linalg.norm(x - basis @ coef)) / norm


def covariate_association(
    data: pd.DataFrame,
    *,
    value: str = "y",
    covariate: str = "covariate",
    adjust_timepoint: bool = True,
    alpha: float = 0.05,
    optimizers: Sequence[str] | None = None,
) -> tuple[CovariateResult, CovariateResult]:
    """Within- and between-donor association of ``value`` with ``covariate``.

    The model is ``value ~ c_within + c_between [+ C(timepoint)] + (1 | donor)``
    with ``c_between`` the donor's mean of the covariate (over the rows used)
    and ``c_within = covariate - c_between``.

    Parameters
    ----------
    data
        One row per donor x timepoint with ``donor``, ``value``, ``covariate``
        (and ``timepoint`` when ``adjust_timepoint``); rows with a missing
        value or covariate are left out.
    value, covariate
        Column names of the response and the covariate.
    adjust_timepoint
        Add timepoint as a fixed effect: the association then comes from
        variation at equal timepoints only (without it, a covariate and a
        value that both change with time are associated although unrelated).
    alpha
        The CI is ``1 - alpha``.
    optimizers
        statsmodels ``MixedLM.fit`` methods tried one by one until one
        converges (:data:`OPTIMIZERS`); ``None``: :data:`DEFAULT_OPTIMIZERS`.

    Returns
    -------
    The ``within`` and the ``between`` :class:`CovariateResult`. The within
    slope's t reference has ``n_obs - n_donors - k_within`` df (``k_within``:
    1, plus ``n_timepoints - 1`` when adjusting), the between slope's
    ``n_donors - 2``. A component is NaN (with ``note``) when the covariate
    does not vary that way: no within-donor variation left after timepoint
    (e.g. a donor-level covariate such as age, or one that only tracks time),
    or equal donor means. Falls back to OLS with donor-clustered standard
    errors (``method="ols_cluster"``, ``n_donors - 1`` df, with ``note``) when
    every optimiser fails or fewer than 3 donors have repeated observations.

    Raises
    ------
    ValueError
        A missing column or an unknown optimiser name.
    """
    opts = _optimizers(optimizers)
    cols = ["donor", value, covariate] + (["timepoint"] if adjust_timepoint else [])
    absent = [c for c in cols if c not in data.columns]
    if absent:
        raise ValueError(
            f"covariate_association: data lacks column(s) {', '.join(absent)}"
            + (" (adjust_timepoint=True needs 'timepoint')" if "timepoint" in absent else "")
        )
    d = data[cols].copy()
    d = d[
        np.isfinite(d[value].to_numpy(dtype=float))
        & np.isfinite(d[covariate].to_numpy(dtype=float))
    ]
    d = d.rename(columns={value: "y", covariate: "c"})
    d["donor"] = d["donor"].astype(str)
    if adjust_timepoint:
        d["timepoint"] = d["timepoint"].astype(str)
    n_obs, n_donors = len(d), int(d["donor"].nunique())
    n_tp = int(d["timepoint"].nunique()) if adjust_timepoint else 1
    k_within = 1 + (n_tp - 1)
    df_within, df_between = n_obs - n_donors - k_within, n_donors - 2
    nan = math.nan

    def both(note: str) -> tuple[CovariateResult, CovariateResult]:
        w = CovariateResult("within", n_donors, n_obs, nan, nan, nan, nan, nan, "none", note)
        b = CovariateResult("between", n_donors, n_obs, nan, nan, nan, nan, nan, "none", note)
        return w, b

    if n_obs < k_within + 3 or n_donors < 3:
        return both("too few observations")
    if _is_constant(d["y"].to_numpy()):
        return both("values are constant (zero variance): no test")
    if _is_constant(d["c"].to_numpy()):
        return both("covariate is constant: no test")
    # centre and scale both variables for a well-conditioned fit; slopes rescaled after
    y_sd, c_sd = float(d["y"].std()), float(d["c"].std())
    d["y"] = (d["y"] - d["y"].mean()) / y_sd
    d["c"] = (d["c"] - d["c"].mean()) / c_sd
    d["c_between"] = d.groupby("donor")["c"].transform("mean")
    d["c_within"] = d["c"] - d["c_between"]
    donors = pd.get_dummies(d["donor"], dtype=float).to_numpy()
    tps = pd.get_dummies(d["timepoint"], dtype=float).to_numpy() if adjust_timepoint else None
    within_basis = donors if tps is None else np.column_stack([donors, tps])
    why_not: dict[str, str] = {}
    if _residual_share(d["c_within"].to_numpy(), within_basis) < 1e-6:
        why_not["within"] = (
            "the covariate does not vary within donors"
            + (" beyond timepoint" if adjust_timepoint else "")
            + ": no within-donor slope"
        )
    if _is_constant(d.groupby("donor")["c_between"].first().to_numpy()):
        why_not["between"] = "donors' mean covariate values are equal: no between-donor slope"
    terms = [t for t in ("within", "between") if t not in why_not]
    if not terms:
        return both("; ".join(why_not.values()))
    exog = pd.concat(
        [
            pd.DataFrame({"Intercept": 1.0}, index=d.index),
            d[[f"c_{t}" for t in terms]],
            pd.get_dummies(d["timepoint"], prefix="tp", drop_first=True, dtype=float)
            if adjust_timepoint
            else None,
        ],
        axis=1,
    )
    repeated = int((d.groupby("donor").size() >= 2).sum())
    fits: dict[str, tuple[float, float]] = {}
    try:
        if repeated < 3:
            raise RuntimeError(
                f"{repeated} donor(s) with repeated observations: donor variance not estimable"
            )
        res, opt, note = _fit_mixedlm(d["y"].to_numpy(), exog, d["donor"].to_numpy(), opts)
        method = f"mixedlm:{opt}"
        dfs = {"within": float(df_within), "between": float(df_between)}
        for t in terms:
            fits[t] = (float(res.fe_params[f"c_{t}"]), float(res.bse_fe[f"c_{t}"]))
    except RuntimeError as exc:
        import statsmodels.api as sm

        groups = pd.factorize(d["donor"])[0]
        ols = sm.OLS(d["y"], exog).fit(cov_type="cluster", cov_kwds={"groups": groups}, use_t=True)
        method = "ols_cluster"
        dfs = {"within": float(n_donors - 1), "between": float(n_donors - 1)}
        for t in terms:
            fits[t] = (float(ols.params[f"c_{t}"]), float(ols.bse[f"c_{t}"]))
        note = f"MixedLM could not be fitted ({exc}); OLS with donor-clustered standard errors"

    out: dict[str, CovariateResult] = {}
    for t in ("within", "between"):
        if t not in fits:
            out[t] = CovariateResult(
                t, n_donors, n_obs, nan, nan, nan, nan, nan, "none", why_not[t]
            )
            continue
        est, se = (v * y_sd / c_sd for v in fits[t])
        df_t = dfs[t]
        if df_t < 1 or not se > 0 or not math.isfinite(se):
            why = "no degrees of freedom" if df_t < 1 else "zero standard error"
            out[t] = CovariateResult(
                t,
                n_donors,
                n_obs,
                est,
                nan,
                nan,
                df_t,
                nan,
                method,
                (note + "; " if note else "") + why,
            )
            continue
        p = float(2.0 * stats.t.sf(abs(est / se), df_t))
        half = float(stats.t.ppf(1 - alpha / 2, df_t)) * se
        out[t] = CovariateResult(
            t, n_donors, n_obs, est, est - half, est + half, df_t, p, method, note
        )
    return out["within"], out["between"]
