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
from pipeline.stages.qc import (
    AUTO_CALL_FLOOR,
    call_doublets,
    doublet_rate,
    gene_masks,
    merge_qc,
    qc_sample,
    qc_thresholds,
    threshold_rules,
)

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
        None,
        {
            "qc": {
                "doublets": "none",
                "min_genes": None,
                "max_pct_mt": None,
                "nmads": 3,
                "mad_floor_log": 0,
                "mad_floor_pct_mt": 0,
            }
        },
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


# --- real counts ------------------------------------------------------------------------


def _as_sample(x: sp.csr_matrix, genes: list[str], sample: str = "R1") -> ad.AnnData:
    n = x.shape[0]
    obs = pd.DataFrame(
        {
            "sample": pd.Categorical([sample] * n),
            "donor": pd.Categorical(["D1"] * n),
            "timepoint": pd.Categorical(["baseline"] * n, categories=["baseline"], ordered=True),
        },
        index=[f"{sample}:c{i}" for i in range(n)],
    )
    a = ad.AnnData(sp.csr_matrix(x, dtype=np.float32), obs=obs, var=pd.DataFrame(index=genes))
    a.layers["counts"] = a.X
    return a


def test_one_sparse_mt_gene_does_not_collapse_the_mt_bound():
    """pbmc68k's 765 genes hold one MT- gene (MT-ND3), detected in a quarter of the cells."""
    from pipeline.datasets.real import pbmc68k_counts

    src = pbmc68k_counts()
    a = _as_sample(src.X, list(src.var_names))
    has_mt = np.asarray((a[:, "MT-ND3"].X > 0).todense()).ravel()
    assert 0.15 < has_mt.mean() < 0.35
    # the bug: MAD 0 -> bound 0% -> every cell with one MT-ND3 count removed
    collapsed = load_config(None, {"qc": {"doublets": "none", "mad_floor_pct_mt": 0}})
    assert qc_sample(a, collapsed).obs.loc[has_mt, "qc_fail_mt"].all()
    cfg = load_config(None, {"qc": {"doublets": "none"}})
    out = qc_sample(a, cfg)
    info = out.uns["immuneage"]["qc"]
    assert info["mads"]["pct_counts_mt"] == 0
    assert info["rules"]["max_pct_mt"] == "adaptive (MAD floor)"
    assert info["thresholds"]["max_pct_mt"] == pytest.approx(5 * 0.5)
    assert not out.obs["qc_fail_mt"].any()
    assert out.obs.loc[has_mt, "qc_pass"].mean() > 0.9
    assert out.obs["qc_pass"].mean() > 0.9
    table = merge_qc([out], cfg).tables["qc_per_sample"]
    assert table.loc[0, "rule_max_pct_mt"] == "adaptive (MAD floor)"
    assert {"rule_min_counts", "rule_max_counts", "rule_min_genes", "rule_max_genes"} <= set(table)


def test_adaptive_rule_still_removes_real_outliers():
    """CellTypist's sample (real counts, 30 MT- genes) plus planted dying and empty cells."""
    from pipeline.datasets.real import celltypist_sample_counts

    src = celltypist_sample_counts()
    genes = list(src.var_names)
    x = sp.csr_matrix(src.X, dtype=np.float32)
    rng = np.random.default_rng(0)
    mt = np.flatnonzero(pd.Index(genes).str.startswith("MT-"))
    pick = rng.choice(x.shape[0], 40, replace=False)
    dying = x[pick[:20]].tolil()
    dying[:, mt] = dying[:, mt].multiply(15)  # mitochondrial share up ~ 5x
    empty = x[pick[20:]].copy()  # ambient-like droplets: ~60 UMIs each
    keep = np.repeat(60 / np.asarray(empty.sum(1)).ravel(), np.diff(empty.indptr))
    empty.data = rng.binomial(empty.data.astype(np.int64), keep).astype(np.float32)
    a = _as_sample(sp.vstack([x, dying.tocsr(), empty]).tocsr(), genes)
    kind = np.array(["real"] * x.shape[0] + ["dying"] * 20 + ["empty"] * 20)
    out = qc_sample(a, load_config(None, {"qc": {"doublets": "none"}}))
    assert out.obs.loc[kind == "real", "qc_pass"].mean() > 0.9
    # the adaptive bounds alone (no fixed ones) catch them too
    alone = load_config(None, {"qc": {"doublets": "none", "min_genes": None, "max_pct_mt": None}})
    out_alone = qc_sample(a, alone)
    assert not out_alone.obs.loc[kind != "real", "qc_pass"].any()
    assert out_alone.obs.loc[kind == "real", "qc_pass"].mean() > 0.9
    assert not out.obs.loc[kind == "dying", "qc_pass"].any()
    assert not out.obs.loc[kind == "empty", "qc_pass"].any()
    rules = out.uns["immuneage"]["qc"]["rules"]
    assert rules["max_pct_mt"] in ("adaptive", "fixed")  # real spread: no floor needed


def test_min_genes_is_scaled_to_a_narrow_matrix_and_warned():
    from pipeline.datasets.real import pbmc68k_counts

    src = pbmc68k_counts()  # 765 genes: a cell detects ~240 of them
    a = _as_sample(src.X, list(src.var_names))
    cfg = load_config(None, {"qc": {"doublets": "none"}})
    t, rules, _ = threshold_rules(qc_sample(a, cfg).obs, cfg.qc, a.n_vars)
    out = qc_sample(a, cfg)
    assert out.uns["immuneage"]["qc"]["min_genes_fixed"] == pytest.approx(200 * 765 / 20000)
    assert out.obs["qc_pass"].mean() > 0.95  # unscaled, 200 genes would remove ~10 %
    assert t["min_genes"] >= 200 * 765 / 20000
    with pytest.warns(ImmuneageWarning, match=r"qc.min_genes = 200 .* scaled to 7.65 genes"):
        merge_qc([out], cfg)
    # a matrix as wide as the reference keeps the bound as given
    wide = load_config(None, {"qc": {"doublets": "none", "min_genes_reference": 700}})
    assert threshold_rules(out.obs, wide.qc, 765)[1]["min_genes"] in ("fixed", "adaptive")
    fixed = load_config(None, {"qc": {"doublets": "none", "mode": "fixed"}})
    t, rules, _ = threshold_rules(out.obs, fixed.qc, 765)
    assert t["min_genes"] == pytest.approx(7.65)
    assert rules["min_genes"] == "fixed (scaled to 765 of 20000 genes)"
    assert qc_thresholds(out.obs, fixed.qc)["min_genes"] == 200  # no matrix size: as given


# --------------------------------------------------------------------------- doublets per library
def _two_libraries(
    n_a: int = 260, n_b: int = 230, n_planted: int = 12, seed: int = 0, seed_b: int | None = None
) -> tuple[ad.AnnData, np.ndarray]:
    """One sample of two libraries (A, B) of real pbmc68k cells; A also holds planted doublets,
    each the sum of a monocyte and a lymphocyte of A. Returns (adata, planted mask)."""
    from pipeline.datasets.real import pbmc68k_counts, pseudo_cohort

    src = pbmc68k_counts()
    lib_a, lib_b = (
        s.adata
        for s in pseudo_cohort(
            src, donors=1, timepoints=("baseline", "acute"), cells_per_sample=[n_a, n_b], seed=seed
        )
    )
    if seed_b is not None:  # another draw of library B
        lib_b = pseudo_cohort(
            src, donors=1, timepoints=("acute",), cells_per_sample=n_b, seed=seed_b
        )[0].adata
    rng = np.random.default_rng(seed)
    labels = lib_a.obs["bulk_labels"].to_numpy()
    mono = np.flatnonzero(labels == "CD14+ Monocyte")
    lymph = np.flatnonzero(
        np.isin(labels, ["CD19+ B", "CD56+ NK", "CD8+ Cytotoxic T", "CD4+/CD25 T Reg"])
    )
    xa = sp.csr_matrix(lib_a.X)
    planted = xa[rng.choice(mono, n_planted, replace=False)] + xa[rng.choice(lymph, n_planted)]
    a = _as_sample(sp.vstack([xa, planted, sp.csr_matrix(lib_b.X)]).tocsr(), list(src.var_names))
    a.obs["library"] = pd.Categorical(["A"] * (n_a + n_planted) + ["B"] * n_b)
    is_planted = np.zeros(a.n_obs, bool)
    is_planted[n_a : n_a + n_planted] = True
    return a, is_planted


def _passed(out: ad.AnnData) -> np.ndarray:
    return ~out.obs[["qc_fail_counts", "qc_fail_genes", "qc_fail_mt"]].any(axis=1).to_numpy()


def test_doublets_are_called_per_library_on_real_counts():
    """scrublet runs on each library's QC-passing cells on its own: a doublet planted in
    library A is scored exactly as when A's cells are scored alone, not against B's."""
    a, planted = _two_libraries()
    in_a = (a.obs["library"] == "A").to_numpy()
    cfg = load_config(None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImmuneageWarning)  # both libraries are large enough
        out = qc_sample(a, cfg)
    thr = out.uns["immuneage"]["qc"]["doublet_threshold"]
    assert list(thr) == ["A", "B"]
    assert all(0 < v < 1 for v in thr.values())

    passed = _passed(out)
    score = out.obs["doublet_score"].to_numpy()
    assert (passed & planted).sum() >= 8  # most planted doublets pass the outlier filters
    for name, cells in (("A", in_a), ("B", ~in_a)):
        alone, called, t = call_doublets(
            sp.csr_matrix(a.X),
            passed & cells,
            cfg.qc,
            sample="R1",
            seed=cfg.seed,
            n_recovered=int(cells.sum()),  # the library's own loading sets its rate
        )
        np.testing.assert_array_equal(score[cells], alone[cells])
        np.testing.assert_array_equal(out.obs["predicted_doublet"].to_numpy()[cells], called[cells])
        assert thr[name] == t
    # pooled, the planted doublets would be compared against B's cells too: other scores
    pooled, _, pooled_thr = call_doublets(
        sp.csr_matrix(a.X), passed, cfg.qc, sample="R1", seed=cfg.seed
    )
    scored = passed & planted
    assert not np.allclose(pooled[scored], score[scored])
    assert pooled_thr not in thr.values()
    # and scrublet sees them: they score above 90 % of library A's real cells
    real_a = in_a & ~planted & passed
    assert np.median(score[scored]) > np.percentile(score[real_a], 90)

    # a cohort mixing samples with and without libraries: the column is text throughout
    other = qc_sample(_sample(sample="S2")[0], cfg)
    other_thr = other.uns["immuneage"]["qc"]["doublet_threshold"]
    with pytest.warns(ImmuneageWarning, match="qc.min_genes = 200"):
        table = merge_qc([out, other], cfg).tables["qc_per_sample"]
    assert table["doublet_threshold"].tolist() == [
        f"A={thr['A']:.6g}; B={thr['B']:.6g}",
        f"{other_thr:.6g}",
    ]
    assert table.loc[0, "doublets"] == int(out.obs["predicted_doublet"].sum())


def test_another_library_does_not_change_a_librarys_doublet_scores():
    """With fixed QC bounds (the passing cells do not depend on B), replacing library B by
    other cells leaves every score of library A, planted doublets included, unchanged."""
    cfg = load_config(None, {"qc": {"mode": "fixed"}})
    a1, planted = _two_libraries()
    a2, _ = _two_libraries(seed_b=7)
    in_a = (a1.obs["library"] == "A").to_numpy()
    assert (a1.X[~in_a] != a2.X[~in_a]).nnz > 0
    out1, out2 = qc_sample(a1, cfg), qc_sample(a2, cfg)
    s1, s2 = out1.obs["doublet_score"].to_numpy(), out2.obs["doublet_score"].to_numpy()
    assert np.isfinite(s1[planted]).all()
    np.testing.assert_array_equal(s1[in_a], s2[in_a])
    t1 = out1.uns["immuneage"]["qc"]["doublet_threshold"]
    t2 = out2.uns["immuneage"]["qc"]["doublet_threshold"]
    assert t1["A"] == t2["A"] and t1["B"] != t2["B"]


def test_min_cells_for_doublets_applies_per_library():
    """Library B (230 cells) is below qc.min_cells_for_doublets = 240 though the sample
    (500 cells) is not: B gets no calls and a warning naming it; A is still scored."""
    a, _ = _two_libraries()
    in_a = (a.obs["library"] == "A").to_numpy()
    cfg = load_config(None, {"qc": {"min_cells_for_doublets": 240}})
    with pytest.warns(ImmuneageWarning, match=r"sample 'R1', library 'B': only \d+ cells pass QC"):
        out = qc_sample(a, cfg)
    score = out.obs["doublet_score"].to_numpy()
    assert np.isnan(score[~in_a]).all()
    assert not out.obs["predicted_doublet"].to_numpy()[~in_a].any()
    assert np.isfinite(score[in_a & _passed(out)]).all()
    thr = out.uns["immuneage"]["qc"]["doublet_threshold"]
    assert thr["B"] == "none" and 0 < thr["A"] < 1
    with pytest.warns(ImmuneageWarning, match="qc.min_genes = 200"):
        table = merge_qc([out], cfg).tables["qc_per_sample"]
    assert table.loc[0, "doublet_threshold"] == f"A={thr['A']:.6g}; B=none"


def test_one_library_behaves_as_no_library():
    """A library column with one value, or none: the sample is scored as a whole, as before."""
    from pipeline.datasets.real import pbmc68k_counts

    src = pbmc68k_counts()
    plain = _as_sample(src.X[:300], list(src.var_names))
    named = plain.copy()
    named.obs["library"] = pd.Categorical(["L1"] * named.n_obs)
    cfg = load_config(None)
    out_plain, out_named = qc_sample(plain, cfg), qc_sample(named, cfg)
    thr = out_plain.uns["immuneage"]["qc"]["doublet_threshold"]
    assert isinstance(thr, float)
    assert out_named.uns["immuneage"]["qc"]["doublet_threshold"] == thr
    pd.testing.assert_frame_equal(out_plain.obs, out_named.obs)
    with pytest.warns(ImmuneageWarning, match="qc.min_genes = 200"):
        table = merge_qc([out_plain], cfg).tables["qc_per_sample"]
    assert table["doublet_threshold"].dtype == np.float64


def test_unimodal_doublet_scores_fall_back_to_the_expected_rate(tmp_path):
    """Real PBMCs (pbmc68k, 230 cells): with a fixed 6% expected rate, scrublet's automatic
    threshold fell inside the singlets (49% called, mostly lymphocytes); the expected share
    is called instead. With the rate derived from the loading (0.8% per 1,000 cells, the
    default) the automatic threshold calls a plausible share and nothing is overridden."""
    from pipeline.config import Config
    from pipeline.datasets.real import write_real_cohort
    from pipeline.io.samplesheet import read_samplesheet
    from pipeline.stages.ingest import ingest_sample

    cfg = Config()
    sheet = write_real_cohort(tmp_path, cells_per_sample=230, seed=0)
    rows = read_samplesheet(sheet, cfg.design, cfg.ingest).rows
    adata = ingest_sample(next(r for r in rows if r.sample == "103_baseline"), cfg)
    fixed = load_config(None, {"qc": {"expected_doublet_rate": 0.06}})
    trusting = load_config(
        None, {"qc": {"expected_doublet_rate": 0.06, "doublet_auto_max_factor": 100}}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImmuneageWarning)
        auto = qc_sample(adata, trusting).obs["predicted_doublet"].mean()
    assert auto > 0.3  # the failure this guards against
    with pytest.warns(ImmuneageWarning, match="not bimodal"):
        out = qc_sample(adata, fixed)
    called = out.obs["predicted_doublet"].to_numpy()
    assert out.uns["immuneage"]["qc"]["doublet_rate"] == 0.06
    assert called.mean() <= 0.06 + 1 / adata.n_obs
    threshold = out.uns["immuneage"]["qc"]["doublet_threshold"]
    scores = out.obs["doublet_score"].to_numpy()
    assert (scores[called] > threshold).all() and (scores[~called] <= threshold).all()

    assert doublet_rate(None, adata.n_obs) == pytest.approx(0.008 * adata.n_obs / 1000)
    assert doublet_rate(None, 100) == 0.001 and doublet_rate(None, 10**6) == 0.3
    assert doublet_rate(0.04, 10**6) == 0.04
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImmuneageWarning)  # no override
        derived = qc_sample(adata, cfg)
    info = derived.uns["immuneage"]["qc"]
    assert info["doublet_rate"] == doublet_rate(None, adata.n_obs)
    assert derived.obs["predicted_doublet"].mean() < AUTO_CALL_FLOOR
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImmuneageWarning)  # min_genes scaled to the panel
        table = merge_qc([derived], cfg).tables["qc_per_sample"]
    assert table.loc[0, "doublet_rate"] == pytest.approx(info["doublet_rate"])
