"""Calibration under the null, through the stage's own aggregation and tests.

Null cohorts: 13 donors x 3 timepoints, per-cell scores = donor effect + donor
x cell type effect + sample (donor x timepoint) effect + cell noise, no
timepoint effect; timepoint labels are then permuted within each donor. The
donor-level tests must give uniform p-values and ~no q < 0.1 calls, while a
test that treats cells as replicates must not (so these tests can fail).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from pipeline.config import Contrast
from pipeline.stages.differential import (
    composition_tests,
    signature_means,
    signature_shift_tests,
)

TPS = ("baseline", "acute", "longterm")
CONTRASTS = [
    Contrast(test="acute", reference="baseline"),
    Contrast(test="longterm", reference="baseline"),
]
CELL_TYPES = ("T", "B", "NK", "Mono")
SIGS = ("s1", "s2", "s3", "s4", "s5")


def _null_cells(seed: int, *, n_donors: int = 13, cells: int = 25) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    parts = []
    for d in range(n_donors):
        perm = rng.permutation(TPS)  # timepoint labels permuted within the donor
        u_d = rng.normal(0, 1.0, len(SIGS))
        for k, _tp in enumerate(TPS):
            for ct in CELL_TYPES:
                n = rng.poisson(cells) + 3
                u_s = rng.normal(
                    0, 0.3, len(SIGS)
                )  # sample-level effect: cells are not independent
                x = u_d + u_s + rng.normal(0, 1.0, (n, len(SIGS)))
                f = pd.DataFrame(x, columns=[f"score_{s}" for s in SIGS])
                f["donor"] = f"D{d:02d}"
                f["timepoint"] = perm[k]
                f["sample"] = f"D{d:02d}_{perm[k]}"
                f["cell_type"] = ct
                parts.append(f)
    return pd.concat(parts, ignore_index=True)


def _samples(obs: pd.DataFrame) -> pd.DataFrame:
    return obs[["sample", "donor", "timepoint"]].drop_duplicates().reset_index(drop=True)


def _cells_as_replicates(obs: pd.DataFrame) -> list[float]:
    out = []
    for c in CONTRASTS:
        for ct in CELL_TYPES:
            for s in SIGS:
                sub = obs[obs["cell_type"] == ct]
                a = sub.loc[sub["timepoint"] == c.reference, f"score_{s}"]
                b = sub.loc[sub["timepoint"] == c.test, f"score_{s}"]
                out.append(float(stats.ttest_ind(b, a).pvalue))
    return out


def test_signature_shifts_are_calibrated_and_cells_as_replicates_are_not() -> None:
    cols = {s: f"score_{s}" for s in SIGS}
    p_donor, p_wil, p_cells, calls = [], [], [], 0
    for seed in range(15):
        obs = _null_cells(seed)
        means = signature_means(obs, cols, min_cells=3)
        table, _ = signature_shift_tests(means, CONTRASTS, _samples(obs), min_cells=3)
        assert (table["n_donors"] == 13).all()
        p_donor += table["p_value"].tolist()
        p_wil += table["p_wilcoxon"].tolist()
        calls += int((table["q_value"] < 0.1).sum())
        p_cells += _cells_as_replicates(obs)
    assert len(p_donor) == 15 * 2 * len(CELL_TYPES) * len(SIGS)
    ks = stats.kstest(p_donor, "uniform").pvalue
    assert ks > 0.01, ks
    assert calls / len(p_donor) <= 0.01, calls
    # Wilcoxon's exact p-values are discrete: check it is not anti-conservative
    assert np.mean(np.asarray(p_wil) < 0.05) <= 0.07
    # the wrong analysis on the same data: far from uniform, many false positives
    assert stats.kstest(p_cells, "uniform").pvalue < 1e-6
    assert np.mean(np.asarray(p_cells) < 0.05) > 0.1  # > twice the nominal 5%


def test_mixed_model_is_calibrated_with_missing_timepoints() -> None:
    cols = {s: f"score_{s}" for s in SIGS[:3]}
    ps = []
    for seed in range(100, 108):
        obs = _null_cells(seed, cells=15)
        obs = obs[obs["cell_type"].isin(CELL_TYPES[:2])]
        # three donors lose their acute sample, two their longterm one
        gone = ((obs["donor"].isin(["D00", "D01", "D02"])) & (obs["timepoint"] == "acute")) | (
            (obs["donor"].isin(["D03", "D04"])) & (obs["timepoint"] == "longterm")
        )
        obs = obs[~gone]
        means = signature_means(obs, cols, min_cells=3)
        table, dropped = signature_shift_tests(
            means, CONTRASTS, _samples(obs), test="mixed", min_cells=3
        )
        assert {r["donor"] for r in dropped} >= {"D00", "D03"}
        # optimisers one by one: no fit falls back to OLS (a different estimator)
        assert table["method"].str.startswith("mixedlm:").all(), table["note"].tolist()
        ps += table["p_value"].tolist()
    assert len(ps) == 8 * 2 * 2 * 3
    assert stats.kstest(ps, "uniform").pvalue > 0.01


def _null_composition(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    types = [f"T{i}" for i in range(8)]
    base = rng.dirichlet(np.full(len(types), 2.0))
    rows = []
    for d in range(13):
        donor_p = rng.dirichlet(base * 30)  # donor-specific composition
        for tp in rng.permutation(TPS):
            p = rng.dirichlet(donor_p * 200)  # sample-level overdispersion
            n = rng.multinomial(rng.poisson(400), p)
            for t, k in zip(types, n, strict=True):
                rows += [
                    {
                        "sample": f"D{d:02d}_{tp}",
                        "donor": f"D{d:02d}",
                        "timepoint": tp,
                        "cell_type": t,
                    }
                ] * int(k)
    return pd.DataFrame(rows)


def test_composition_is_calibrated() -> None:
    ps, calls, filtered = [], 0, 0
    for seed in range(40):
        obs = _null_composition(seed)
        table, dropped = composition_tests(obs, CONTRASTS, _samples(obs), log_ratios={})
        ps += table["p_value"].tolist()
        calls += int((table["q_value"] < 0.1).sum())
        # types below the prevalence / abundance filter are a dropped row, not a test
        filtered += sum(
            1 for r in dropped if r["cell_type"] and r["reason"].startswith("not tested")
        )
    assert len(ps) + filtered == 40 * 2 * 8 and filtered < 0.05 * len(ps)
    assert stats.kstest(ps, "uniform").pvalue > 0.01
    assert calls / len(ps) <= 0.02
