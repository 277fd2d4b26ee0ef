"""Per-sample QC: metrics, adaptive thresholds, doublets, failing samples."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from pipeline.config import load_config
from pipeline.errors import ImmuneageWarning, InputError
from pipeline.stages.qc import gene_masks, merge_qc, qc_sample, qc_thresholds

GENES = (
    [f"MT-{g}" for g in ("ND1", "ND2", "CO1", "CO2", "ATP6", "CO3", "ND4", "CYB")]
    + ["RPS3", "RPS6", "RPL7", "RPL13", "HBA1", "HBB", "HBEGF", "HBP1"]
    + [f"GENE{i}" for i in range(584)]
)


def _sample(
    seed: int = 0,
    *,
    n_good: int = 400,
    n_dying: int = 20,
    n_empty: int = 15,
    n_doublets: int = 0,
    sample: str = "S1",
) -> tuple[ad.AnnData, np.ndarray]:
    """Two cell types plus dying (high-mito), near-empty and doublet cells; returns (adata, kind)."""
    rng = np.random.default_rng(seed)
    n_genes = len(GENES)
    base = rng.lognormal(-0.5, 1.0, n_genes)
    base[:8] *= 4  # mitochondrial
    type_a, type_b = base.copy(), base.copy()
    type_a[16:80] *= 12
    type_b[80:144] *= 12

    def cells(profile: np.ndarray, n: int, depth: float) -> np.ndarray:
        p = profile / profile.sum()
        return rng.poisson(p[None, :] * depth * rng.lognormal(0, 0.25, (n, 1)))

    good = np.vstack([cells(type_a, n_good // 2, 3000), cells(type_b, n_good - n_good // 2, 3000)])
    dying_profile = base.copy()
    dying_profile[:8] *= 40
    parts = [good, cells(dying_profile, n_dying, 3000), cells(base, n_empty, 120)]
    kind = ["good"] * n_good + ["dying"] * n_dying + ["empty"] * n_empty
    if n_doublets:
        da, db = cells(type_a, n_doublets, 3000), cells(type_b, n_doublets, 3000)
        parts.append(da + db)
        kind += ["doublet"] * n_doublets
    x = sp.csr_matrix(np.vstack(parts).astype(np.float32))
    n = x.shape[0]
    obs = pd.DataFrame(
        {
            "sample": pd.Categorical([sample] * n),
            "donor": pd.Categorical(["D1"] * n),
            "timepoint": pd.Categorical(
                ["baseline"] * n, categories=["baseline", "acute", "longterm"], ordered=True
            ),
        },
        index=[f"{sample}:c{i}" for i in range(n)],
    )
    a = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=GENES))
    a.layers["counts"] = a.X
    return a, np.array(kind)


def test_gene_masks_follow_naming_rules():
    m = gene_masks(GENES, load_config(None).qc)
    assert m["mt"].sum() == 8
    assert [g for g, hit in zip(GENES, m["ribo"], strict=True) if hit] == [
        "RPS3",
        "RPS6",
        "RPL7",
        "RPL13",
    ]
    assert [g for g, hit in zip(GENES, m["hb"], strict=True) if hit] == ["HBA1", "HBB"]


def test_metrics_equal_scanpy_and_outliers_are_flagged():
    a, kind = _sample()
    cfg = load_config(None, {"qc": {"doublets": "none"}})
    out = qc_sample(a, cfg)
    ref = a.copy()
    masks = gene_masks(ref.var_names, cfg.qc)
    for k, v in masks.items():
        ref.var[k] = v
    sc.pp.calculate_qc_metrics(ref, qc_vars=list(masks), percent_top=None, inplace=True)
    for col in (
        "total_counts",
        "n_genes_by_counts",
        "pct_counts_mt",
        "pct_counts_ribo",
        "pct_counts_hb",
    ):
        np.testing.assert_allclose(out.obs[col].to_numpy(), ref.obs[col].to_numpy(), rtol=1e-6)
    # dying cells fail on mitochondria, near-empty cells on counts/genes, good cells pass
    assert out.obs.loc[kind == "dying", "qc_fail_mt"].all()
    empty = out.obs.loc[kind == "empty"]
    assert (empty["qc_fail_counts"] | empty["qc_fail_genes"]).all()
    assert out.obs.loc[kind == "good", "qc_pass"].mean() > 0.97
    assert not out.obs.loc[kind != "good", "qc_pass"].any()
    assert out.n_vars == 0


def test_adaptive_thresholds_are_median_plus_minus_k_mads():
    a, _ = _sample()
    cfg = load_config(
        None, {"qc": {"doublets": "none", "min_genes": None, "max_pct_mt": None, "nmads": 3}}
    )
    out = qc_sample(a, cfg)
    logc = np.log1p(out.obs["total_counts"].to_numpy())
    med = np.median(logc)
    mad = np.median(np.abs(logc - med))
    t = qc_thresholds(out.obs, cfg.qc)
    assert t["min_counts"] == pytest.approx(np.expm1(med - 3 * mad))
    assert t["max_counts"] == pytest.approx(np.expm1(med + 3 * mad))
    mt = out.obs["pct_counts_mt"].to_numpy()
    assert t["max_pct_mt"] == pytest.approx(
        np.median(mt) + 3 * np.median(np.abs(mt - np.median(mt)))
    )
    # a fixed bound tighter than the adaptive one wins
    cfg2 = load_config(None, {"qc": {"doublets": "none", "min_genes": None, "max_pct_mt": 1.0}})
    assert qc_thresholds(out.obs, cfg2.qc)["max_pct_mt"] == 1.0


def test_fixed_mode_uses_only_the_bounds():
    a, _ = _sample()
    cfg = load_config(
        None,
        {
            "qc": {
                "mode": "fixed",
                "doublets": "none",
                "min_genes": None,
                "max_pct_mt": None,
                "min_counts": 1000,
            }
        },
    )
    out = qc_sample(a, cfg)
    t = out.uns["immuneage"]["qc"]["thresholds"]
    assert t["min_counts"] == 1000 and t["max_counts"] == "none"
    np.testing.assert_array_equal(out.obs["qc_fail_counts"], out.obs["total_counts"] < 1000)


# 5,000 cells: a typical 10x sample; scanpy 1.11 switched scrublet to pynndescent there
# and crashed on its csr_array (no attribute getnnz)
@pytest.mark.parametrize("n_good", [600, 5000])
def test_scrublet_finds_planted_doublets(n_good):
    a, kind = _sample(seed=3, n_good=n_good, n_dying=0, n_empty=0, n_doublets=n_good // 15)
    # fixed mode without bounds: every cell is scored (adaptive bounds would catch the
    # doublets' doubled depth before scrublet sees them)
    cfg = load_config(None, {"qc": {"mode": "fixed", "min_genes": None, "max_pct_mt": None}})
    out = qc_sample(a, cfg)
    score = out.obs["doublet_score"].to_numpy()
    is_d = kind == "doublet"
    # rank-based AUC of doublet scores for planted doublets vs singlets
    ranks = pd.Series(score).rank().to_numpy()
    auc = (ranks[is_d].sum() - is_d.sum() * (is_d.sum() + 1) / 2) / (is_d.sum() * (~is_d).sum())
    assert auc > 0.9
    assert out.obs.loc[out.obs["predicted_doublet"], "qc_pass"].sum() == 0


def test_failing_sample_errors_or_is_dropped():
    a, _ = _sample(n_good=10, n_dying=30, n_empty=30, sample="BAD1")
    cfg = load_config(None, {"qc": {"doublets": "none"}})
    with pytest.raises(InputError) as err:
        qc_sample(a, cfg)
    msg = str(err.value)
    assert "'BAD1'" in msg and "70 cells before" in msg and "min_cells_after" in msg
    cfg_drop = load_config(None, {"qc": {"doublets": "none", "on_failed_sample": "drop"}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = qc_sample(a, cfg_drop)
    assert any(
        issubclass(w.category, ImmuneageWarning) and "BAD1" in str(w.message) for w in caught
    )
    assert not out.obs["qc_pass"].any()
    assert out.uns["immuneage"]["qc"]["dropped"]


def test_merge_tabulates_reasons_per_sample():
    cfg = load_config(None, {"qc": {"doublets": "none"}})
    units = [qc_sample(_sample(seed=i, sample=f"S{i}")[0], cfg) for i in range(3)]
    res = merge_qc(units, cfg)
    table = res.tables["qc_per_sample"]
    assert list(table["sample"]) == ["S0", "S1", "S2"]
    assert (table["cells_in"] == 435).all()
    assert (table["cells_out"] == [int(u.obs["qc_pass"].sum()) for u in units]).all()
    assert (table["removed_mt"] >= 20).all()
    assert res.adata.n_obs == 3 * 435
    assert res.adata.uns["immuneage"]["qc"]["dropped_samples"] == []
