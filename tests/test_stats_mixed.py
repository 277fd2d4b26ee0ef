"""Mixed models: equal to the paired t-test on complete data; missing timepoints; covariates."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.stats.mixed import covariate_association, mixed_timepoint_test
from pipeline.stats.paired import paired_test


def _long(seed: int, n: int = 13, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n):
        u = rng.normal()
        for tp in ("baseline", "acute", "longterm"):
            y = u + rng.normal(0, 0.5) + (shift if tp == "acute" else 0.0)
            rows.append({"donor": f"D{d:02d}", "timepoint": tp, "y": y, "c": rng.normal()})
    return pd.DataFrame(rows)


def test_mixed_equals_paired_t_on_complete_pairs() -> None:
    df = _long(1, shift=0.4)
    m = mixed_timepoint_test(df, "baseline", "acute")
    w = df.pivot(index="donor", columns="timepoint", values="y")
    p = paired_test(w["baseline"], w["acute"])
    assert m.method == "mixedlm" and m.n_donors == 13 and m.n_paired == 13
    assert m.effect == pytest.approx(p.effect, rel=1e-6)
    assert m.p_value == pytest.approx(p.p_value, rel=1e-4)
    assert m.ci_low == pytest.approx(p.ci_low, rel=1e-4)


def test_mixed_uses_donors_missing_a_timepoint() -> None:
    df = _long(2, shift=1.0)
    drop = (df["donor"].isin(["D00", "D01", "D02"])) & (df["timepoint"] == "acute")
    m = mixed_timepoint_test(df[~drop], "baseline", "acute")
    assert (m.n_donors, m.n_paired, m.n_obs) == (13, 10, 23)
    assert m.p_value < 0.01 and m.ci_low < m.effect < m.ci_high


def test_mixed_constant_and_unpaired() -> None:
    df = _long(3)
    df["y"] = 2.0
    r = mixed_timepoint_test(df, "baseline", "acute")
    assert math.isnan(r.p_value) and "constant" in r.note
    one = _long(4)
    one = one[(one["timepoint"] == "baseline") | (one["donor"] == "D00")]
    r = mixed_timepoint_test(one, "baseline", "acute")
    assert math.isnan(r.p_value) and "within-donor" in r.note


def test_covariate_association_recovers_slope() -> None:
    df = _long(5)
    rng = np.random.default_rng(0)
    df["c"] = rng.normal(35, 5, len(df))
    df["y"] = df["y"] + 0.2 * df["c"]
    r = covariate_association(df, value="y", covariate="c")
    assert r.method == "mixedlm" and r.n_donors == 13 and r.n_obs == 39
    assert r.ci_low < 0.2 < r.ci_high and r.p_value < 1e-3


def test_covariate_fallback_is_labelled() -> None:
    # one observation per donor: no donor variance can be estimated -> OLS, said so
    df = _long(6)
    df = df[df["timepoint"] == "baseline"]
    r = covariate_association(df, value="y", covariate="c")
    assert r.method == "ols_cluster" and "MixedLM could not be fitted" in r.note
    assert 0 <= r.p_value <= 1
    df["c"] = 1.0
    assert math.isnan(covariate_association(df, value="y", covariate="c").p_value)
