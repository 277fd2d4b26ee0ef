"""Composition: calibration under the nulls of issue 18, power, absolute abundance, moderation.

Simulated cohorts: 13 donors x 2 timepoints. Each donor has its own absolute
abundance (cells per uL) of each type (log-normal donor effect), each sample
adds log-normal noise; the sample's total is the sum (with 5% counting noise)
and its cells are a multinomial draw of the shares. Sample sizes differ 4x
between timepoints (4,000 vs 1,000 cells, times a random per-sample factor).
One type is rare (0.2%), one near-absent (1 cell in 2 of the 26 samples).

``python tests/test_composition.py`` prints the before/after figures of the
issue's scenarios (old CLR with a fixed 0.5-cell pseudocount vs the new tests).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, special, stats

from pipeline.config import Contrast
from pipeline.stages.differential.composition import (
    ABSOLUTE_COLUMNS,
    COMPOSITION_COLUMNS,
    FAMILY_ABSOLUTE,
    FAMILY_RATIO,
    FAMILY_RELATIVE,
    QUESTION_ABSOLUTE,
    QUESTION_RELATIVE,
    absolute_composition_tests,
    composition_tests,
)
from pipeline.stats.composition import (
    clr,
    fit_f_dist,
    moderated_paired_t,
    squeeze_var,
    trigamma_inverse,
)
from pipeline.stats.multitest import bh_adjust
from pipeline.stats.paired import paired_test

CONTRAST = [Contrast(test="post", reference="pre")]
TYPES = ("CD4 T", "CD8 T", "mono", "B", "NK", "DC", "MAIT", "plasma", "rare", "near_absent")
#: Mean shares (the near-absent type is planted separately).
BASE = np.array([0.30, 0.20, 0.15, 0.12, 0.10, 0.06, 0.04, 0.028, 0.002, 0.0])
N_DONORS = 13


def _samples(n_donors: int = N_DONORS) -> pd.DataFrame:
    d = [f"D{i:02d}" for i in range(n_donors)]
    return pd.DataFrame(
        {
            "sample": [f"{x}_{tp}" for tp in ("pre", "post") for x in d],
            "donor": d * 2,
            "timepoint": ["pre"] * n_donors + ["post"] * n_donors,
        }
    )


def simulate(
    rng: np.random.Generator,
    reps: int,
    *,
    sizes: tuple[int, int] = (4000, 1000),
    fold: dict[str, float] | None = None,
    n_donors: int = N_DONORS,
    sd_donor: float = 0.3,
    sd_sample: float = 0.1,
    size_sd: float = 0.3,
    total_per_ul: float = 2000.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Counts ``(reps, 2 * n_donors, types)`` (pre samples, then post) and totals per uL.

    ``fold``: type -> factor on its absolute abundance at ``post`` (the others'
    numbers per uL do not change; their shares do).
    """
    k = len(TYPES)
    base = np.where(BASE > 0, BASE, 1e-12)
    log_a = (
        np.log(base)[None, None, None, :]
        + rng.normal(0, sd_donor, (reps, 1, n_donors, k))
        + rng.normal(0, sd_sample, (reps, 2, n_donors, k))
    )
    for t, f in (fold or {}).items():
        log_a[:, 1, :, TYPES.index(t)] += math.log(f)
    a = np.exp(log_a)
    a[..., TYPES.index("near_absent")] = 0.0
    share = a / a.sum(-1, keepdims=True)
    totals = total_per_ul * a.sum(-1) * np.exp(rng.normal(0, 0.05, a.shape[:-1]))
    n = np.round(
        np.array(sizes)[None, :, None] * np.exp(rng.normal(0, size_sd, (reps, 2, n_donors)))
    ).astype(np.int64)
    counts = rng.multinomial(n, share)
    # near-absent: 1 cell in 2 of the 2 * n_donors samples (taken from the first type)
    flat = counts.reshape(reps, 2 * n_donors, k)
    for r in range(reps):
        for s in rng.choice(2 * n_donors, 2, replace=False):
            flat[r, s, TYPES.index("near_absent")] = 1
            flat[r, s, 0] -= 1
    return flat, totals.reshape(reps, 2 * n_donors)


def _frame(counts: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(counts, index=_samples()["sample"], columns=list(TYPES))


def _relative(counts: np.ndarray, **kw) -> pd.DataFrame:
    table, _ = composition_tests(
        None, CONTRAST, _samples(), counts=_frame(counts), log_ratios={}, **kw
    )
    return table.set_index("cell_type")


def _absolute(counts: np.ndarray, totals: np.ndarray, **kw) -> pd.DataFrame:
    s = _samples()
    table, _ = absolute_composition_tests(
        None, CONTRAST, s, pd.Series(totals, index=s["sample"]), counts=_frame(counts), **kw
    )
    return table.set_index("cell_type")


def old_clr_p(counts: np.ndarray) -> pd.Series:
    """The method before issue 18: CLR with 0.5 cells, paired t, no filter (p per type)."""
    z = clr(_frame(counts), 0.5).to_numpy()
    n = N_DONORS
    return pd.Series(
        [paired_test(z[:n, j], z[n:, j]).p_value for j in range(len(TYPES))], index=TYPES
    )


def _fpr_bound(p: float, n: int, z: float = 3.3) -> float:
    """Upper limit of an observed rate under Binomial(n, p) (z SDs, ~1e-3 one-sided)."""
    return p + z * math.sqrt(p * (1 - p) / n) + 0.5 / n


# --- (a) calibration under the nulls --------------------------------------------------


@pytest.mark.parametrize("method", ["propeller", "clr"])
def test_relative_calibrated_with_unequal_sizes_and_rare_types(method: str) -> None:
    rng = np.random.default_rng(11)
    reps = 300 if method == "propeller" else 150
    counts, _ = simulate(rng, reps, sizes=(4000, 1000))
    ps, near_absent_tested = [], 0
    for r in range(reps):
        t = _relative(counts[r], method=method)
        near_absent_tested += "near_absent" in t.index
        ps.append(t["p_value"].reindex(list(TYPES[:-1])).to_numpy())
    p = np.array(ps)
    assert near_absent_tested == 0  # filtered (prevalence), never tested
    assert np.isfinite(p).all()
    n = p.size
    assert (p < 0.05).mean() <= _fpr_bound(0.05, n)
    assert (p < 0.05).mean() >= 0.05 - 3.3 * math.sqrt(0.05 * 0.95 / n)  # not over-conservative
    # the rare type alone
    assert (p[:, TYPES.index("rare")] < 0.05).mean() <= _fpr_bound(0.05, reps)
    assert stats.kstest(p.ravel(), "uniform").pvalue > 1e-3


def test_old_clr_fails_the_same_null() -> None:
    # the test above can fail: the pre-issue CLR calls the near-absent type in most runs
    rng = np.random.default_rng(11)
    counts, _ = simulate(rng, 30, sizes=(4000, 1000))
    p = np.array([old_clr_p(counts[r])["near_absent"] for r in range(30)])
    assert (p < 0.05).mean() > _fpr_bound(0.05, 30)


def test_absolute_calibrated_with_unequal_sizes_and_rare_types() -> None:
    rng = np.random.default_rng(12)
    reps = 300
    counts, totals = simulate(rng, reps, sizes=(1000, 4000))
    p = np.array(
        [
            _absolute(counts[r], totals[r])["p_value"].reindex(list(TYPES[:-1])).to_numpy()
            for r in range(reps)
        ]
    )
    assert np.isfinite(p).all()
    assert (p < 0.05).mean() <= _fpr_bound(0.05, p.size)
    assert (p[:, TYPES.index("rare")] < 0.05).mean() <= _fpr_bound(0.05, reps)
    assert stats.kstest(p.ravel(), "uniform").pvalue > 1e-3


# --- (b) NK triples: relative vs absolute -----------------------------------------------------


def test_nk_triples_relative_says_shares_fall_absolute_calls_only_nk() -> None:
    rng = np.random.default_rng(13)
    reps = 20
    counts, totals = simulate(rng, reps, fold={"NK": 3.0})
    others = [t for t in TYPES[:-2] if t != "NK"]
    rel_down, abs_false, abs_tests = 0, 0, 0
    for r in range(reps):
        rel = _relative(counts[r])
        ab = _absolute(counts[r], totals[r])
        assert (rel["question"] == QUESTION_RELATIVE).all()
        assert (ab["question"] == QUESTION_ABSOLUTE).all()
        assert rel.loc["NK", "direction"] == "up" and rel.loc["NK", "q_value"] < 0.05
        assert ab.loc["NK", "direction"] == "up" and ab.loc["NK", "q_value"] < 0.05
        # every other share falls, and the table says so (direction from the shares)
        assert (rel.loc[others, "direction"] == "down").all()
        rel_down += int((rel.loc[others, "q_value"] < 0.1).sum())
        abs_false += int((ab.loc[others, "p_value"] < 0.05).sum())
        abs_tests += len(others)
    # the relative question: unchanged types' shares really fall and are called
    assert rel_down / abs_tests > 0.3
    # the absolute question: their numbers do not move, FPR ~ 0.05
    assert abs_false / abs_tests <= _fpr_bound(0.05, abs_tests)


# --- (c) power on a planted shift -------------------------------------------------------------


def test_power_on_planted_shift() -> None:
    rng = np.random.default_rng(14)
    reps = 20
    counts, totals = simulate(rng, reps, fold={"B": 1.5, "DC": 0.6})
    hit = {"rel": 0, "abs": 0}
    for r in range(reps):
        rel, ab = _relative(counts[r]), _absolute(counts[r], totals[r])
        hit["rel"] += (rel.loc[["B", "DC"], "q_value"] < 0.1).sum()
        hit["abs"] += (ab.loc[["B", "DC"], "q_value"] < 0.1).sum()
        assert list(rel.loc[["B", "DC"], "direction"]) == ["up", "down"]
    assert hit["rel"] / (2 * reps) >= 0.8 and hit["abs"] / (2 * reps) >= 0.8


# --- (d) empirical-Bayes moderation -----------------------------------------------------------


def test_fit_f_dist_equal_variances_give_infinite_prior_df() -> None:
    d0, s02 = fit_f_dist(np.full(20, 2.5), 12)
    assert math.isinf(d0) and s02 == pytest.approx(2.5)
    post, d0, _ = squeeze_var(np.full(20, 2.5), 12)
    assert np.allclose(post, 2.5)
    # sampled from one common variance: d0 large (sampling explains the spread)
    rng = np.random.default_rng(15)
    s2 = 3.0 * rng.chisquare(12, 4000) / 12
    d0, s02 = fit_f_dist(s2, 12)
    assert d0 > 100 and s02 == pytest.approx(3.0, rel=0.05)


def test_fit_f_dist_recovers_prior_and_matches_direct_computation() -> None:
    rng = np.random.default_rng(16)
    d, d0_true, s0_true = 12, 4.0, 0.5
    sigma2 = s0_true * d0_true / rng.chisquare(d0_true, 6000)  # scaled inverse chi-square
    s2 = sigma2 * rng.chisquare(d, sigma2.size) / d
    d0, s02 = fit_f_dist(s2, d)
    assert d0 == pytest.approx(d0_true, rel=0.25) and s02 == pytest.approx(s0_true, rel=0.15)
    # the moment equations solved directly (brentq instead of the Newton iteration)
    e = np.log(s2) - special.digamma(d / 2) + math.log(d / 2)
    evar = e.var(ddof=1) - special.polygamma(1, d / 2)
    d0_direct = 2 * optimize.brentq(lambda y: special.polygamma(1, y) - evar, 1e-6, 1e6)
    assert d0 == pytest.approx(d0_direct, rel=1e-6)
    assert s02 == pytest.approx(
        math.exp(e.mean() + special.digamma(d0 / 2) - math.log(d0 / 2)), rel=1e-9
    )
    post, _, _ = squeeze_var(s2, d)
    assert np.allclose(post, (d0 * s02 + d * s2) / (d0 + d))
    y = trigamma_inverse([1e-3, 0.3, 4.0, 1e3])
    assert np.allclose(special.polygamma(1, y), [1e-3, 0.3, 4.0, 1e3], rtol=1e-7)


def test_moderated_t_is_calibrated_and_equals_direct_formula() -> None:
    # null differences whose variances follow the prior (the model's assumption)
    rng = np.random.default_rng(17)
    n, g = 13, 3000
    sigma2 = 0.2 * 6 / rng.chisquare(6, g)
    x = rng.normal(0, np.sqrt(sigma2), (n, g))
    res = moderated_paired_t(x, moderate=True)
    assert 3 < res.d0 < 12
    assert stats.kstest(res.p_value, "uniform").pvalue > 1e-3
    s2 = x.var(axis=0, ddof=1)
    post = (res.d0 * res.s02 + (n - 1) * s2) / (res.d0 + n - 1)
    t = x.mean(0) / np.sqrt(post / n)
    assert np.allclose(res.p_value, 2 * stats.t.sf(np.abs(t), n - 1 + res.d0))
    # without moderation: the plain paired t
    plain = moderated_paired_t(x[:, :5], moderate=False)
    ref = [paired_test(np.zeros(n), x[:, j]).p_value for j in range(5)]
    assert np.allclose(plain.p_value, ref)


def test_propeller_moderated_option_calibrated_on_equal_sizes() -> None:
    rng = np.random.default_rng(18)
    reps = 60
    counts, _ = simulate(rng, reps, sizes=(3000, 3000), size_sd=0.2)
    p = np.array(
        [
            _relative(counts[r], moderate=True, transform="logit")["p_value"]
            .reindex(list(TYPES[:-2]))
            .to_numpy()
            for r in range(reps)
        ]
    )
    assert (p < 0.05).mean() <= _fpr_bound(0.05, p.size)


# --- table contract ---------------------------------------------------------------------------


def test_tables_columns_filter_rows_and_families() -> None:
    rng = np.random.default_rng(19)
    counts, totals = simulate(rng, 1)
    s = _samples()
    frame = _frame(counts[0])
    two = [Contrast(test="post", reference="pre"), Contrast(test="pre", reference="post")]
    ratios = {"T4/T8": {"numerator": ["CD4 T"], "denominator": ["CD8 T"]}}
    rel, dropped = composition_tests(None, two, s, counts=frame, log_ratios=ratios)
    assert tuple(rel.columns) == COMPOSITION_COLUMNS
    fam = rel.groupby("family")
    assert set(fam.groups) == {FAMILY_RELATIVE, FAMILY_RATIO}
    # one BH family per question across both contrasts
    for _, g in fam:
        assert g["contrast"].nunique() == 2
        assert np.allclose(g["q_value"], bh_adjust(g["p_value"].to_numpy()), equal_nan=True)
    ratio = rel[rel["kind"] == "log_ratio"]
    assert (ratio["scale"] == "log ratio").all() and len(ratio) == 2
    assert (rel.loc[rel["kind"] == "propeller", "scale"] == "logit proportion").all()
    # direction from the share change, never from an effect's sign
    sign = np.sign(rel["mean_prop_test"] - rel["mean_prop_reference"])
    assert (rel["direction"] == np.where(sign > 0, "up", "down")).all()
    # the near-absent type: a dropped row per contrast with the reason
    why = [r for r in dropped if r["cell_type"] == "near_absent"]
    assert len(why) == 2 and "composition_min_prevalence" in why[0]["reason"]
    # absolute: a sample without a total is a dropped row; its donor leaves the pairs
    tot = pd.Series(totals[0], index=s["sample"])
    tot.iloc[3] = np.nan
    ab, d_ab = absolute_composition_tests(None, two, s, tot, counts=frame, total_column="wbc")
    assert tuple(ab.columns) == ABSOLUTE_COLUMNS
    assert (ab["family"] == FAMILY_ABSOLUTE).all() and (ab["n_donors"] == N_DONORS - 1).all()
    assert any("'wbc' empty" in r["reason"] and r["donor"] == "D03" for r in d_ab)
    assert np.allclose(ab["q_value"], bh_adjust(ab["p_value"].to_numpy()))


def test_zero_maps_to_same_value_whatever_the_sample_size() -> None:
    # size-aware pseudocount: a type absent from a 4x larger sample of the same shares
    c = pd.DataFrame([[0, 100, 300], [0, 400, 1200]], columns=["a", "b", "c"])
    z = clr(c, 0.5, size_aware=True)
    assert z.iloc[0, 0] == pytest.approx(z.iloc[1, 0])
    # a fixed 0.5 cells: the zero of the 4x smaller sample sits (K - 1) / K * log 4 higher
    fixed = clr(c, 0.5)
    assert fixed.iloc[0, 0] - fixed.iloc[1, 0] == pytest.approx(2 / 3 * math.log(4), rel=0.01)


# --- before / after figures (python tests/test_composition.py) --------------------------------


def _measure(reps: int = 200) -> None:  # pragma: no cover - a report, not a test
    rng = np.random.default_rng(2026)
    scen = {
        "near-absent, 4000 vs 1000": dict(sizes=(4000, 1000)),
        "rare 0.2%, 5000 vs 500": dict(sizes=(5000, 500)),
    }
    for name, kw in scen.items():
        counts, _ = simulate(rng, reps, **kw)
        col = "near_absent" if name.startswith("near") else "rare"
        old = np.array([old_clr_p(counts[r])[col] for r in range(reps)])
        print(f"{name}: old CLR FPR({col}) = {(old < 0.05).mean():.3f}")
        for label, kwargs in [
            ("propeller logit", {}),
            ("propeller asin_sqrt", {"transform": "asin_sqrt"}),
            ("propeller logit, no depth matching", {"match_depth": False}),
            (
                "propeller asin_sqrt, no depth matching",
                {"match_depth": False, "transform": "asin_sqrt"},
            ),
            ("propeller logit moderated", {"moderate": True}),
            ("propeller logit, no prevalence filter", {"min_prevalence": 0.0, "min_prop": 0.0}),
            ("clr size-aware", {"method": "clr"}),
        ]:
            p = np.array(
                [
                    _relative(counts[r], **kwargs)["p_value"].reindex(list(TYPES)).to_numpy()
                    for r in range(reps)
                ]
            )
            print(
                f"  {label}: FPR({col}) = {np.nanmean(p[:, TYPES.index(col)] < 0.05):.3f} "
                f"(tested in {np.isfinite(p[:, TYPES.index(col)]).mean():.0%}), "
                f"all types {np.nanmean(p < 0.05):.3f}"
            )
    counts, totals = simulate(rng, reps, fold={"NK": 3.0})
    others = [TYPES.index(t) for t in TYPES[:-2] if t != "NK"]
    old_down = []
    for r in range(reps):
        q = bh_adjust(old_clr_p(counts[r]).to_numpy())
        old_down.append(np.mean(q[others] < 0.1))
    new = [_relative(counts[r]) for r in range(reps)]
    ab = [_absolute(counts[r], totals[r]) for r in range(reps)]
    names = [TYPES[i] for i in others]
    print(
        "NK x3: unchanged types called at q < 0.1: old CLR "
        f"{np.mean(old_down):.3f}; propeller (shares, question=relative) "
        f"{np.mean([(t.loc[names, 'q_value'] < 0.1).mean() for t in new]):.3f}; absolute "
        f"{np.mean([(t.loc[names, 'q_value'] < 0.1).mean() for t in ab]):.3f}; NK called "
        f"relative {np.mean([t.loc['NK', 'q_value'] < 0.1 for t in new]):.2f}, absolute "
        f"{np.mean([t.loc['NK', 'q_value'] < 0.1 for t in ab]):.2f}"
    )
    for fold in ({"B": 1.5, "DC": 0.6}, {"B": 1.25, "DC": 0.8}):
        counts, totals = simulate(rng, reps, fold=fold)
        for label, kwargs in [
            ("propeller logit", {}),
            ("propeller asin_sqrt", {"transform": "asin_sqrt"}),
            ("propeller logit moderated", {"moderate": True}),
            ("propeller asin_sqrt moderated", {"moderate": True, "transform": "asin_sqrt"}),
            ("propeller logit, no depth matching", {"match_depth": False}),
            ("clr size-aware", {"method": "clr"}),
        ]:
            p = np.array(
                [
                    _relative(counts[r], **kwargs)["p_value"].reindex(["B", "DC"]).to_numpy()
                    for r in range(reps)
                ]
            )
            print(
                f"power {fold} {label}: B {np.mean(p[:, 0] < 0.05):.2f} DC {np.mean(p[:, 1] < 0.05):.2f}"
            )
        p = np.array(
            [_absolute(counts[r], totals[r])["p_value"].reindex(["B", "DC"]) for r in range(reps)]
        )
        print(
            f"power {fold} absolute: B {np.mean(p[:, 0] < 0.05):.2f} DC {np.mean(p[:, 1] < 0.05):.2f}"
        )


if __name__ == "__main__":  # pragma: no cover
    _measure(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
