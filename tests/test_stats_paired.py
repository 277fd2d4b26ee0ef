"""Paired tests and BH: hand-checked values and agreement with scipy / statsmodels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from pipeline.stats.multitest import bh_adjust
from pipeline.stats.paired import paired_test

REF = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
TEST = np.array([1.5, 2.0, 4.0, 4.5, 6.5])


def test_paired_t_hand_checked() -> None:
    # differences 0.5, 0, 1, 0.5, 1.5: mean 0.7, sd sqrt(0.325)
    r = paired_test(REF, TEST)
    sd = math.sqrt(((np.array([0.5, 0, 1, 0.5, 1.5]) - 0.7) ** 2).sum() / 4)
    assert r.n == 5
    assert r.effect == pytest.approx(0.7)
    assert r.sd_diff == pytest.approx(sd)
    assert r.dz == pytest.approx(0.7 / sd)
    assert r.statistic == pytest.approx(0.7 / (sd / math.sqrt(5)))
    half = stats.t.ppf(0.975, 4) * sd / math.sqrt(5)
    assert (r.ci_low, r.ci_high) == pytest.approx((0.7 - half, 0.7 + half))
    assert r.mean_reference == pytest.approx(3.0)
    assert r.mean_test == pytest.approx(3.7)


def test_paired_t_matches_scipy() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=13)
    b = a + rng.normal(0.4, 1.0, size=13)
    r = paired_test(a, b)
    ref = stats.ttest_rel(b, a)
    ci = ref.confidence_interval(0.95)
    assert r.statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    assert (r.ci_low, r.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert r.p_wilcoxon == pytest.approx(stats.wilcoxon(b - a).pvalue, rel=1e-12)


def test_paired_drops_nonfinite_pairs() -> None:
    a = np.array([1.0, 2.0, np.nan, 4.0])
    b = np.array([1.5, 2.7, 3.0, 4.1])
    assert paired_test(a, b).n == 3


def test_constant_differences_give_nan_not_a_fake_p() -> None:
    r = paired_test(REF, REF + 0.25)
    assert r.n == 5 and r.effect == pytest.approx(0.25)
    assert math.isnan(r.p_value) and math.isnan(r.p_wilcoxon) and math.isnan(r.dz)
    assert "constant" in r.note
    r0 = paired_test(REF, REF)
    assert math.isnan(r0.p_value) and "constant" in r0.note


def test_too_few_pairs() -> None:
    assert math.isnan(paired_test([1.0], [2.0]).p_value)
    assert paired_test([], []).note == "no donor pairs"
    with pytest.raises(ValueError, match="differ in length"):
        paired_test([1.0, 2.0], [1.0])


def test_bh_hand_checked() -> None:
    q = bh_adjust([0.01, 0.04, 0.03, 0.2])
    np.testing.assert_allclose(q, [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])


def test_bh_matches_statsmodels_and_keeps_nan() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(size=200) ** 2
    p[[3, 50]] = np.nan
    q = bh_adjust(p)
    ok = ~np.isnan(p)
    np.testing.assert_allclose(q[ok], multipletests(p[ok], method="fdr_bh")[1], rtol=1e-12)
    assert np.isnan(q[[3, 50]]).all()
    assert np.isnan(bh_adjust([np.nan])).all()
    with pytest.raises(ValueError):
        bh_adjust([1.5])
