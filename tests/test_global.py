"""Global test across timepoints (Hotelling's T^2 on within-donor differences).

Parity with statsmodels' MANOVA, calibration under a non-spherical null with
donor effects (where the sphericity-assuming repeated-measures ANOVA F is
anti-conservative, so the calibration check can fail), power against the
noncentral F, and the ``signature_global`` table through the stage's helpers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.multivariate.manova import MANOVA
from statsmodels.stats.anova import AnovaRM
from statsmodels.stats.multitest import multipletests

from pipeline.stages.differential.shifts import (
    GLOBAL_COLUMNS,
    signature_global_tests,
    signature_means,
)
from pipeline.stats.paired import repeated_measures_test

TPS = ("baseline", "acute", "longterm")


def _rm_anova_p(y: np.ndarray) -> np.ndarray:
    """Repeated-measures ANOVA F p-values (sphericity assumed) of ``y`` (reps, n, k)."""
    _, n, k = y.shape
    grand = y.mean(axis=(1, 2), keepdims=True)
    tp = y.mean(axis=1, keepdims=True)
    donor = y.mean(axis=2, keepdims=True)
    ss_time = n * ((tp - grand) ** 2).sum(axis=(1, 2))
    ss_err = ((y - tp - donor + grand) ** 2).sum(axis=(1, 2))
    f = (ss_time / (k - 1)) / (ss_err / ((k - 1) * (n - 1)))
    return stats.f.sf(f, k - 1, (k - 1) * (n - 1))


def _donor_values(
    rng: np.random.Generator, reps: int, n: int, sds: tuple[float, ...], shift=None
) -> np.ndarray:
    """(reps, n, k) donor-level values: donor effect (sd 1) + timepoint noise of sd ``sds``."""
    y = rng.normal(0, 1.0, (reps, n, 1)) + rng.normal(0, 1.0, (reps, n, len(sds))) * np.asarray(sds)
    return y if shift is None else y + np.asarray(shift)


def _fpr_bound(alpha: float, reps: int) -> float:
    return alpha + 3.5 * np.sqrt(alpha * (1 - alpha) / reps)


def test_hotelling_equals_statsmodels_manova_and_ignores_the_reference() -> None:
    rng = np.random.default_rng(3)
    y = rng.normal(size=(9, 4)) + np.array([0.0, 0.6, 0.2, -0.3])
    r = repeated_measures_test(y)
    d = pd.DataFrame(y[:, 1:] - y[:, :1], columns=["a", "b", "c"])
    ref = MANOVA.from_formula("a + b + c ~ 1", data=d).mv_test().results["Intercept"]["stat"]
    hl = ref.loc["Hotelling-Lawley trace"]
    assert r.statistic == pytest.approx(float(hl["F Value"]), rel=1e-10)
    assert r.p_value == pytest.approx(float(hl["Pr > F"]), rel=1e-8)
    assert (r.df1, r.df2, r.n, r.k, r.method) == (3.0, 6.0, 9, 4, "hotelling_t2")
    # T^2 = (n - 1) x Hotelling-Lawley trace of the intercept-only model
    assert r.t2 == pytest.approx(8 * float(hl["Value"]), rel=1e-10)
    for order in ([2, 0, 1, 3], [3, 2, 1, 0]):
        assert repeated_measures_test(y[:, order]).p_value == pytest.approx(r.p_value, rel=1e-9)
    # a donor with a missing timepoint is left out
    y_nan = np.vstack([y, [np.nan, 1.0, 2.0, 3.0]])
    assert repeated_measures_test(y_nan).p_value == pytest.approx(r.p_value, rel=1e-12)


def test_hotelling_degenerate_inputs_give_nan_with_a_note() -> None:
    rng = np.random.default_rng(0)
    few = repeated_measures_test(rng.normal(size=(2, 3)))
    assert few.n == 2 and np.isnan(few.p_value) and "needs at least 3" in few.note
    const = np.column_stack([np.arange(5.0), np.arange(5.0) + 1, np.arange(5.0) + 2])
    flat = repeated_measures_test(const)
    assert np.isnan(flat.p_value) and "singular" in flat.note
    with pytest.raises(ValueError, match="2-D"):
        repeated_measures_test(np.arange(4.0))


def test_rm_anova_helper_equals_statsmodels() -> None:
    """The vectorised comparator below is the textbook RM-ANOVA F (statsmodels AnovaRM)."""
    y = _donor_values(np.random.default_rng(1), 1, 7, (1.0, 1.0, 2.0))[0]
    long = pd.DataFrame(
        {
            "donor": np.repeat(np.arange(7), 3),
            "tp": np.tile(np.arange(3), 7),
            "y": y.ravel(),
        }
    )
    ref = AnovaRM(long, "y", "donor", within=["tp"]).fit().anova_table
    assert _rm_anova_p(y[None])[0] == pytest.approx(float(ref["Pr > F"].iloc[0]), rel=1e-9)


@pytest.mark.parametrize("sds", [(1.0, 1.0, 2.0), (1.0, 1.0, 1.0, 2.0)])
def test_global_test_is_calibrated_without_sphericity_and_rm_anova_is_not(sds) -> None:
    """Null: donor effects (sd 1) and the last timepoint with 4x the variance
    (sphericity violated), 8 donors. Hotelling's p is uniform. The same null breaks
    the RM-ANOVA F (sphericity assumed), so it is non-spherical enough for this check
    to fail a test that assumes sphericity (measured with 50,000 replicates: FPR
    0.060 / 0.017 at alpha 0.05 / 0.01 with 3 timepoints, 0.067 / 0.019 with 4)."""
    rng = np.random.default_rng(11)
    reps, n = 4000, 8
    y = _donor_values(rng, reps, n, sds)
    p = np.array([repeated_measures_test(v).p_value for v in y])
    assert np.isfinite(p).all()
    assert stats.kstest(p, "uniform").pvalue > 1e-3
    for alpha in (0.05, 0.01):
        fpr = np.mean(p < alpha)
        assert 2 * alpha - _fpr_bound(alpha, reps) <= fpr <= _fpr_bound(alpha, reps), (alpha, fpr)
    big = 40_000  # the comparator is vectorised: many replicates for a sharp bound
    p_rm = _rm_anova_p(_donor_values(rng, big, n, sds))
    for alpha in (0.05, 0.01):
        assert np.mean(p_rm < alpha) > _fpr_bound(alpha, big), (alpha, np.mean(p_rm < alpha))


def test_global_test_power_matches_the_noncentral_f() -> None:
    """A planted change at one timepoint (+1 sd at acute, unequal variances): the
    rejection rate equals the noncentral F power with lambda = n delta' S^-1 delta."""
    reps, n, sds, shift = 3000, 10, (1.0, 1.0, 2.0), (0.0, 1.5, 0.0)
    y = _donor_values(np.random.default_rng(5), reps, n, sds, shift)
    p = np.array([repeated_measures_test(v).p_value for v in y])
    var = np.asarray(sds) ** 2  # donor effect cancels in the differences
    cov = np.diag(var[1:]) + var[0]
    delta = np.asarray(shift)[1:] - shift[0]
    lam = n * delta @ np.linalg.solve(cov, delta)
    power = stats.ncf.sf(stats.f.isf(0.05, 2, n - 2), 2, n - 2, lam)
    se = np.sqrt(power * (1 - power) / reps)
    assert power > 0.5
    assert abs(np.mean(p < 0.05) - power) < 4 * se, (np.mean(p < 0.05), power)


def _cells(seed: int, *, n_donors: int = 7, drop=(), planted=0.0) -> pd.DataFrame:
    """Per-cell scores: donor effect + sample effect + cell noise; ``s1`` in type A
    rises by ``planted`` at acute; unequal cells per sample."""
    rng = np.random.default_rng(seed)
    parts = []
    for d in range(n_donors):
        u = rng.normal(0, 1.0, 2)
        for tp in TPS:
            if (f"D{d}", tp) in drop:
                continue
            for ct, lin in (("A", "mono"), ("B", "NK")):
                m = int(rng.integers(8, 60))
                x = u + rng.normal(0, 0.3, 2) + rng.normal(0, 1.0, (m, 2))
                x[:, 0] += planted * (ct == "A" and tp == "acute")
                f = pd.DataFrame(x, columns=["score_s1", "score_s2"])
                f["donor"], f["timepoint"], f["sample"] = f"D{d}", tp, f"D{d}_{tp}"
                f["cell_type"], f["cell_type_coarse"] = ct, lin
                parts.append(f)
    return pd.concat(parts, ignore_index=True)


def _global(obs: pd.DataFrame, **kw):
    means = signature_means(obs, {"s1": "score_s1", "s2": "score_s2"}, min_cells=5)
    samples = obs[["sample", "donor", "timepoint"]].drop_duplicates().reset_index(drop=True)
    return signature_global_tests(means, samples, timepoints=TPS, min_cells=5, **kw)


def test_signature_global_table_families_and_dropped_donors() -> None:
    obs = _cells(0, drop=(("D6", "longterm"),), planted=2.0)
    table, dropped = _global(obs, primary={"mono": ["s1"]})
    assert tuple(table.columns) == GLOBAL_COLUMNS and len(table) == 4
    t = table.set_index(["cell_type", "signature"])
    assert (t["n_donors"] == 6).all() and (t["timepoints"] == "baseline,acute,longterm").all()
    assert (t["df1"] == 2).all() and (t["df2"] == 4).all()
    assert t.loc[("A", "s1"), "family"] == "primary" and t.loc[("A", "s1"), "p_value"] < 0.05
    assert (t.drop(("A", "s1"))["family"] == "exploratory").all()
    for fam, rows in table.groupby("family"):
        ref = multipletests(rows["p_value"], method="fdr_bh")[1]
        np.testing.assert_allclose(rows["q_value"], ref, rtol=1e-12, err_msg=fam)
    gone = [r for r in dropped if r["donor"] == "D6"]
    assert len(gone) == 2 and all("no longterm sample" in r["reason"] for r in gone)
    # too few complete donors for 3 timepoints: not tested, said why
    small, d_small = _global(_cells(1, n_donors=3, drop=(("D2", "acute"),)), min_donors=2)
    assert small.empty
    why = [r["reason"] for r in d_small if r["donor"] == ""]
    assert len(why) == 2 and all(w.startswith("not tested: 2 donor(s)") for w in why)
    assert all("needs >= 3" in w for w in why)
    # two timepoints only: the contrasts are the tests, no global rows
    two = _cells(2)
    two = two[two["timepoint"] != "longterm"]
    empty, none = _global(two)
    assert empty.empty and tuple(empty.columns) == GLOBAL_COLUMNS and none == []


def test_signature_global_is_calibrated_through_the_stage_means() -> None:
    """Null through signature_means: donor and sample effects, 8-60 cells per sample;
    the global p-values of 40 cohorts x 4 pairs are uniform."""
    p = np.concatenate([_global(_cells(seed, n_donors=8))[0]["p_value"] for seed in range(40)])
    assert p.size == 160 and np.isfinite(p).all()
    assert stats.kstest(p, "uniform").pvalue > 1e-3
    assert np.mean(p < 0.05) <= _fpr_bound(0.05, p.size)
