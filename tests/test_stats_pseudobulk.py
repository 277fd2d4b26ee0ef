"""Pseudobulk sums, the PyDESeq2 wrapper on a planted NB cohort, ULM vs decoupler, CLR."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from pipeline.stats.composition import clr, group_log_ratio
from pipeline.stats.deseq import DE_COLUMNS, deseq2_contrasts
from pipeline.stats.enrichment import ulm
from pipeline.stats.pseudobulk import filter_genes, pseudobulk_sum


def test_pseudobulk_sum_equals_dense_groupby() -> None:
    rng = np.random.default_rng(0)
    n, g = 500, 40
    x = sp.random(
        n, g, density=0.2, format="csr", random_state=1, data_rvs=lambda k: rng.integers(1, 20, k)
    )
    groups = pd.DataFrame(
        {
            "donor": rng.choice(["D1", "D2", "D3"], n),
            "cell_type": pd.Categorical(
                rng.choice(["T", "B", None], n, p=[0.5, 0.4, 0.1]), categories=["T", "B"]
            ),
        }
    )
    sums, table = pseudobulk_sum(x, groups)
    assert sp.issparse(sums) and sums.shape == (len(table), g)
    dense = (
        pd.DataFrame(x.toarray())
        .groupby([groups["donor"], groups["cell_type"].astype(object)])
        .sum()
    )
    for i, row in table.iterrows():
        np.testing.assert_array_equal(
            sums[i].toarray().ravel(), dense.loc[(row["donor"], row["cell_type"])].to_numpy()
        )
    assert table["n_cells"].sum() == groups["cell_type"].notna().sum()
    # categorical order is kept: T before B within a donor
    assert list(table.loc[table["donor"] == "D1", "cell_type"]) == ["T", "B"]


def test_filter_genes() -> None:
    c = np.array([[10, 0, 50], [12, 9, 50], [30, 0, 0]])
    np.testing.assert_array_equal(filter_genes(c, min_count=10, min_samples=2), [True, False, True])


def _nb_cohort(seed: int, n_donors: int = 8, n_genes: int = 400, n_de: int = 40):
    rng = np.random.default_rng(seed)
    tps = ["baseline", "acute"]
    meta = pd.DataFrame(
        [(f"D{d}", tp) for d in range(n_donors) for tp in tps], columns=["donor", "timepoint"]
    )
    meta.index = [f"{d}_{t}" for d, t in zip(meta["donor"], meta["timepoint"], strict=True)]
    mu = rng.lognormal(4, 1.2, n_genes)
    lfc = np.zeros(n_genes)
    lfc[:n_de] = rng.choice([-1.0, 1.0], n_de)
    donor = rng.normal(0, 0.4, (n_donors, n_genes))[meta["donor"].str[1:].astype(int)]
    m = mu * 2 ** (lfc * (meta["timepoint"].to_numpy() == "acute")[:, None]) * np.exp(donor)
    m *= rng.lognormal(0, 0.2, (len(meta), 1))  # library sizes
    disp = 0.05
    counts = rng.negative_binomial(1 / disp, 1 / (1 + m * disp))
    cdf = pd.DataFrame(counts, index=meta.index, columns=[f"g{i}" for i in range(n_genes)])
    return cdf, meta, lfc


def test_deseq2_wrapper_ranks_planted_genes() -> None:
    cdf, meta, lfc = _nb_cohort(0)
    truth = lfc != 0
    res, _notes = deseq2_contrasts(cdf, meta, [("acute", "baseline")], n_cpus=1)
    tab = res[("acute", "baseline")].set_index("gene").loc[cdf.columns]
    assert list(res[("acute", "baseline")].columns) == list(DE_COLUMNS)
    auc = roc_auc_score(truth, -np.log10(tab["p_value"].fillna(1.0)))
    assert auc >= 0.9, auc
    called = tab["q_value"] < 0.1
    assert (called & ~truth).sum() / max(called.sum(), 1) <= 0.1
    # log2fc is test - reference, on the planted scale
    assert (np.sign(tab.loc[truth, "log2fc"]) == np.sign(lfc[truth])).mean() >= 0.95
    assert np.median(np.abs(tab.loc[truth, "log2fc"])) == pytest.approx(1.0, abs=0.25)


def test_ulm_matches_decoupler() -> None:
    dc = pytest.importorskip("decoupler")
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(300)]
    s = pd.Series(rng.normal(size=300), index=genes)
    s.iloc[:12] += 2.0
    sets = {"A": genes[:15], "B": genes[50:58], "tiny": genes[100:102]}
    mine = ulm(s, sets, min_genes=5).set_index("signature")
    assert mine.loc["A", "p_value"] < 1e-3 and np.isnan(mine.loc["tiny", "score"])
    net = pd.DataFrame(
        [(k, g, 1.0) for k in ("A", "B") for g in sets[k]], columns=["source", "target", "weight"]
    )
    es, pv = dc.mt.ulm(s.to_frame().T, net, tmin=5)
    np.testing.assert_allclose(mine.loc[["A", "B"], "score"], es.iloc[0][["A", "B"]], rtol=1e-6)
    # decoupler returns BH-adjusted p-values across sources
    from pipeline.stats.multitest import bh_adjust

    np.testing.assert_allclose(
        bh_adjust(mine.loc[["A", "B"], "p_value"]), pv.iloc[0][["A", "B"]], rtol=1e-6
    )


def test_clr_and_log_ratio() -> None:
    counts = pd.DataFrame({"a": [10, 0], "b": [30, 5], "c": [60, 95]}, index=["s1", "s2"])
    z = clr(counts, 0.5)
    np.testing.assert_allclose(z.sum(axis=1), 0.0, atol=1e-12)
    lg = np.log(np.array([10.5, 30.5, 60.5]))
    np.testing.assert_allclose(z.loc["s1"], lg - lg.mean())
    ratio, share = group_log_ratio(counts, ["a"], ["b", "missing"], 0.5)
    assert ratio["s1"] == pytest.approx(np.log(10.5 / 30.5))
    assert share["s2"] == 0.0
    with pytest.raises(ValueError):
        clr(counts, 0.0)


def test_deseq2_refuses_non_integer_counts() -> None:
    """Counts are never rounded silently before PyDESeq2: a normalised value is an error
    naming it; whole numbers stored as floats (pseudobulk sums) pass."""
    cdf, meta, _ = _nb_cohort(1)
    as_float = cdf.astype(np.float64)
    res, _ = deseq2_contrasts(as_float, meta, [("acute", "baseline")], n_cpus=1)
    assert len(res[("acute", "baseline")]) == cdf.shape[1]
    bad = as_float.copy()
    bad.iloc[3, 5] += 0.4
    with pytest.raises(ValueError, match=r"integer counts.*1 value\(s\).*g5"):
        deseq2_contrasts(bad, meta, [("acute", "baseline")], n_cpus=1)
    with pytest.raises(ValueError, match="non-negative"):
        deseq2_contrasts(-as_float, meta, [("acute", "baseline")], n_cpus=1)


def test_pseudobulk_de_stops_on_non_integer_counts() -> None:
    """The stage's DE refuses pseudobulks of non-integer values (e.g. layers['counts']
    replaced by normalised values) before any fit, with what to do."""
    from anndata import AnnData

    from pipeline.config import Config
    from pipeline.errors import InputError
    from pipeline.stages.differential import pseudobulk_de

    cfg = Config()
    cdf, meta, _ = _nb_cohort(2)
    obs = meta.assign(cell_type="NK", n_cells=50)
    x = cdf.to_numpy(dtype=np.float64) / 3.0
    pb = AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=cdf.columns))
    with pytest.raises(InputError, match=r"non-integer value.*never rounded silently"):
        pseudobulk_de(pb, cfg.design.contrasts, cfg.differential)
