"""Covariate associations: timepoint-adjusted, split into within- and between-donor slopes.

Calibration under the confounding of issue 18 (a covariate and a score that both change
with time but are unrelated at equal timepoints; donor effects in both; donors missing a
sample), the unadjusted model's confounding as a check that the calibration test has power,
and power on planted within- and between-donor associations. Bounds are binomial (0.1%
tails) around the nominal rate, so a calibrated test fails them about 1 run in 1,000.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from pipeline.stages.differential.covariates import COVARIATE_COLUMNS, covariate_associations
from pipeline.stats.mixed import covariate_association
from pipeline.stats.multitest import bh_adjust

TPS = ("baseline", "acute", "longterm")
N_DONORS = 13
#: training moves both the score (in units of its residual SD) and the covariate
BETA = np.array([0.0, 1.5, 0.8])
GAMMA = np.array([0.0, 10.0, 6.0])
ALPHA = 0.05


def _cohort(
    seed: int, *, within: float = 0.0, between: float = 0.0, missing: bool = True
) -> pd.DataFrame:
    """Score y = u_d + beta_tp + e (ICC 0.5); covariate c = 35 + 5 v_d + gamma_tp + 2.5 f.

    ``within`` adds ``within * (f - mean_d f)`` to y (a within-donor association at equal
    timepoints, slope ``within / 2.5`` per covariate unit, none between donors); ``between``
    adds ``between * v_d`` (donors with more of the covariate score higher, slope
    ``between / 5``, none within donors). With both 0 the score
    and the covariate are unrelated at equal timepoints, within and between donors. With
    ``missing``, three donors lose a sample (unequal observations per donor).
    """
    rng = np.random.default_rng(seed)
    n, t = N_DONORS, len(TPS)
    u, v = rng.normal(size=(n, 1)), rng.normal(size=(n, 1))
    e, f = rng.normal(size=(n, t)), rng.normal(size=(n, t))
    y = u + BETA + e + within * (f - f.mean(axis=1, keepdims=True)) + between * v
    c = 35.0 + 5.0 * v + GAMMA + 2.5 * f
    df = pd.DataFrame(
        {
            "donor": np.repeat([f"D{d:02d}" for d in range(n)], t),
            "timepoint": np.tile(TPS, n),
            "y": y.ravel(),
            "covariate": c.ravel(),
        }
    )
    if missing:
        gone = (df["donor"].isin(["D00", "D01"]) & (df["timepoint"] == "acute")) | (
            (df["donor"] == "D02") & (df["timepoint"] == "longterm")
        )
        df = df[~gone]
    return df


def _p_values(reps: range, **kwargs: object) -> np.ndarray:
    """(replicates x 2) p-values of the within and between slopes."""
    adjust = bool(kwargs.pop("adjust_timepoint", True))
    out = []
    for s in reps:
        w, b = covariate_association(_cohort(s, **kwargs), adjust_timepoint=adjust)
        out.append((w.p_value, b.p_value))
    return np.asarray(out)


def test_covariate_that_tracks_only_timepoint_gives_uniform_p() -> None:
    """Issue 18: unadjusted, p < 0.05 in 66% of such runs; adjusted, both components hold alpha."""
    reps = 100
    p = _p_values(range(reps))
    assert np.isfinite(p).all()
    hi = stats.binom.ppf(0.999, reps, ALPHA)
    lo = stats.binom.ppf(0.001, reps, ALPHA)
    for k, name in enumerate(("within", "between")):
        n_sig = int((p[:, k] < ALPHA).sum())
        assert lo <= n_sig <= hi, (name, n_sig, lo, hi)
        assert stats.kstest(p[:, k], "uniform").pvalue > 0.001, name


def test_without_timepoint_adjustment_the_confounding_is_detected() -> None:
    """The same null without the timepoint term: the calibration test above has power to
    see the old defect (the within-donor slope then picks up the shared time trend)."""
    reps = 30
    p = _p_values(range(500, 500 + reps), adjust_timepoint=False)
    n_sig = int((p[:, 0] < ALPHA).sum())
    assert n_sig > stats.binom.ppf(0.999, reps, ALPHA), n_sig
    # and the table says which model it used
    table, _ = covariate_associations(_means(_cohort(0)), _covs(_cohort(0)), adjust_timepoint=False)
    assert set(table["adjusted_for"]) == {"none"}


def test_power_on_planted_within_donor_association() -> None:
    reps = 30
    within = 1.0  # y gains 1 residual SD per SD of the covariate's sample-level deviation
    p = _p_values(range(1000, 1000 + reps), within=within)
    # planted within only: the between component stays null
    assert (p[:, 0] < ALPHA).mean() >= 0.8
    assert int((p[:, 1] < ALPHA).sum()) <= stats.binom.ppf(0.999, reps, ALPHA)  # stays null
    # the CI covers the planted slope per covariate unit
    covered = []
    for s in range(1000, 1010):
        w, _ = covariate_association(_cohort(s, within=within))
        covered.append(w.ci_low < within / 2.5 < w.ci_high)
    assert sum(covered) >= stats.binom.ppf(0.001, 10, 0.95)


def test_power_on_planted_between_donor_association() -> None:
    reps = 30
    p = _p_values(range(2000, 2000 + reps), between=2.0)
    assert (p[:, 1] < ALPHA).mean() >= 0.8
    assert int((p[:, 0] < ALPHA).sum()) <= stats.binom.ppf(0.999, reps, ALPHA)


def _means(df: pd.DataFrame, cell_types: tuple[str, ...] = ("A", "B")) -> pd.DataFrame:
    """A signature_means-shaped table: the cohort's y as one signature's mean per type."""
    rows = []
    for k, ct in enumerate(cell_types):
        for sig, shift in (("s1", 0.0), ("s2", 1.0)):
            m = df.assign(
                cell_type=ct,
                signature=sig,
                mean_score=df["y"] + shift + 0.1 * k,
                sample=df["donor"] + "_" + df["timepoint"],
                n_cells=50,
                passes_min_cells=True,
            )
            rows.append(m)
    return pd.concat(rows, ignore_index=True)


def _covs(df: pd.DataFrame) -> pd.DataFrame:
    idx = pd.Index(df["donor"] + "_" + df["timepoint"], name="sample")
    rng = np.random.default_rng(3)
    return pd.DataFrame(
        {"betaine": df["covariate"].to_numpy(), "noise": rng.normal(size=len(df))}, index=idx
    )


def test_table_has_both_components_and_bh_families() -> None:
    df = _cohort(7, within=1.0)
    table, dropped = covariate_associations(_means(df), _covs(df))
    assert tuple(table.columns) == COVARIATE_COLUMNS
    # 2 covariates x 2 types x 2 signatures x 2 components
    assert len(table) == 16 and not dropped
    assert set(table["adjusted_for"]) == {"timepoint"}
    key = ["covariate", "cell_type", "signature"]
    pairs = table.groupby(key)["component"].apply(sorted)
    assert all(c == ["between", "within"] for c in pairs)
    assert (table["family"] == table["covariate"] + ":" + table["component"]).all()
    for _, g in table.groupby("family"):
        assert len(g) == 4
        np.testing.assert_allclose(g["q_value"], bh_adjust(g["p_value"].to_numpy()))
    assert (table["method"].str.startswith("mixedlm:")).all()
    row = table.set_index([*key, "component"]).loc[("betaine", "A", "s1", "within")]
    assert row["slope"] > 0 and row["q_value"] < 0.05 and row["df"] == 39 - 3 - 13 - 3
    assert row["ci_low"] < 1.0 / 2.5 < row["ci_high"]


def test_too_few_donors_is_a_dropped_row() -> None:
    df = _cohort(8, missing=False)
    df = df[df["donor"].isin(["D00", "D01"])]
    table, dropped = covariate_associations(_means(df, ("A",)), _covs(df)[["betaine"]])
    assert table.empty and tuple(table.columns) == COVARIATE_COLUMNS
    assert len(dropped) == 2 and all("min_donors" in d["reason"] for d in dropped)


def test_read_covariates_reads_tsv_like_csv(tmp_path) -> None:
    """A .tsv covariates file (e.g. the score stage's sample_handling.tsv) reads as the
    same table as its CSV twin; a CSV-parsed TSV would be one unusable column."""
    from pipeline.stages.differential import read_covariates

    samples = pd.DataFrame(
        {"sample": ["a", "b", "c"], "donor": ["D1", "D2", "D3"], "timepoint": ["t0"] * 3}
    )
    table = pd.DataFrame(
        {"sample": ["c", "a", "b"], "donor": ["D3", "D1", "D2"], "ieg": [0.5, -0.25, ""]}
    )
    table.to_csv(tmp_path / "cov.tsv", sep="\t", index=False)
    table.to_csv(tmp_path / "cov.csv", index=False)
    tsv = read_covariates(tmp_path / "cov.tsv", samples)
    pd.testing.assert_frame_equal(tsv, read_covariates(tmp_path / "cov.csv", samples))
    assert np.isnan(tsv.loc["b", "ieg"])  # an empty cell is a missing value
    assert tsv.loc["c", "ieg"] == 0.5 and tsv.loc["a", "ieg"] == -0.25
