"""The default config on real PBMC counts: qc, preprocess and score complete (issue 16).

Pseudo-samples of scanpy's pbmc68k_reduced counts (700 real PBMCs, 765 genes: one
MT- gene, most signature genes absent), built with
:func:`pipeline.datasets.real.pseudo_cohort`, in the two designs that broke the
defaults: one donor x 3 timepoints x ~80 cells, and 3 donors x 3 timepoints. In the
second, the SASP genes missing from pbmc68k are planted in two cells each (below
``preprocess.min_cells_per_gene``), as IL6, TNF or MMP1 show up in real blood.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipeline.config import load_config
from pipeline.datasets.real import pbmc68k_counts, pseudo_cohort
from pipeline.genesets import builtin_sets
from pipeline.stages.preprocess import run_preprocess
from pipeline.stages.qc import merge_qc, qc_sample
from pipeline.stages.score import run_score

TIMEPOINTS = ["baseline", "acute", "longterm"]
SASP = list(builtin_sets()["sasp"].genes)


def _merged(donors: int, cells: int, plant: list[str], seed: int = 0) -> ad.AnnData:
    """An ingest-like merged AnnData of pbmc68k pseudo-samples; ``plant`` genes in 2 cells each."""
    parts = []
    for p in pseudo_cohort(pbmc68k_counts(), donors=donors, cells_per_sample=cells, seed=seed):
        a = p.adata
        a.obs_names = [f"{p.sample}:{bc}" for bc in a.obs_names]
        a.obs = a.obs.assign(sample=p.sample, donor=p.donor, timepoint=p.timepoint)
        parts.append(a)
    a = ad.concat(parts)
    if plant:
        rng = np.random.default_rng(seed)
        extra = sp.lil_matrix((a.n_obs, len(plant)), dtype=np.float32)
        for j in range(len(plant)):
            extra[rng.choice(a.n_obs, 2, replace=False), j] = 2
        a = ad.AnnData(
            sp.hstack([a.X, extra.tocsr()]).tocsr(),
            obs=a.obs,
            var=pd.DataFrame(index=[*a.var_names, *plant]),
        )
    for col in ("sample", "donor"):
        a.obs[col] = pd.Categorical(a.obs[col])
    a.obs["timepoint"] = pd.Categorical(a.obs["timepoint"], categories=TIMEPOINTS, ordered=True)
    a.layers["counts"] = a.X
    return a


def _run_defaults(a: ad.AnnData) -> dict:
    cfg = load_config(None)  # the defaults, as a user gets them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        units = [
            qc_sample(a[a.obs["sample"] == s].copy(), cfg) for s in a.obs["sample"].cat.categories
        ]
        qc = merge_qc(units, cfg)
        pre = run_preprocess(a, qc.adata, cfg)
        scored = run_score(pre.adata.copy(), cfg)
    return {"ingest": a, "qc": qc, "pre": pre, "score": scored, "warnings": caught}


@pytest.fixture(scope="module")
def one_donor() -> dict:
    return _run_defaults(_merged(1, 80, plant=[]))


@pytest.fixture(scope="module")
def three_donors() -> dict:
    missing = [g for g in SASP if g not in pbmc68k_counts().var_names]
    return _run_defaults(_merged(3, 150, plant=missing))


@pytest.mark.parametrize("design", ["one_donor", "three_donors"])
def test_qc_keeps_healthy_cells(design: str, request: pytest.FixtureRequest) -> None:
    res = request.getfixturevalue(design)
    table = res["qc"].tables["qc_per_sample"]
    assert not table["dropped"].any()
    assert (table["cells_out"] / table["cells_in"] >= 0.85).all(), table
    # one MT- gene (MT-ND3, in a quarter of the cells): its bound never collapses to 0 %
    assert (table["max_pct_mt"] >= 2.5).all()
    assert (table["removed_mt"] == 0).all()
    assert set(table["rule_max_pct_mt"]) <= {"adaptive (MAD floor)", "fixed"}
    for col in ("rule_min_counts", "rule_max_counts", "rule_min_genes", "rule_max_genes"):
        assert table[col].str.len().gt(0).all()


@pytest.mark.parametrize("design", ["one_donor", "three_donors"])
def test_preprocess_completes_and_keeps_detected_genes(
    design: str, request: pytest.FixtureRequest
) -> None:
    res = request.getfixturevalue(design)
    out, ingest = res["pre"].adata, res["ingest"]
    kept = ingest[out.obs_names].layers["counts"]
    detected = ingest.var_names[np.asarray((kept > 0).sum(0)).ravel() > 0]
    assert list(out.var_names) == list(detected)  # every detected gene stays
    assert out.var["highly_variable"].sum() == min(2000, int(out.var["hvg_candidate"].sum()))
    assert not (out.var["highly_variable"] & ~out.var["hvg_candidate"]).any()
    assert out.obsm["X_pca"].shape[0] == out.n_obs
    hvg = out.uns["immuneage"]["hvg"]
    assert set(hvg["trend_fits"]) == set(out.obs["sample"].astype(str))
    # no quadratic fallback needed here, so no HVG warning at all
    assert not [w for w in res["warnings"] if "LOESS" in str(w.message)]


def test_sasp_is_skipped_with_the_reason_when_its_genes_are_absent(one_donor: dict) -> None:
    cov = one_donor["score"].tables["signature_coverage"].set_index("signature")
    assert cov.loc["sasp", "status"].startswith("skipped")
    assert "IL6" in cov.loc["sasp", "genes_missing"].split(",")
    assert "score_sasp" not in one_donor["score"].adata.obs
    scored = cov.index[cov["status"] == "scored"]
    assert len(scored) >= 2  # ifn_type1, nfkb_inflammation, senescence ... still scored
    for name in scored:
        assert one_donor["score"].adata.obs[f"score_{name}"].notna().all()
    assert any(
        "skipped" in str(w.message) and "'sasp'" in str(w.message) for w in one_donor["warnings"]
    )


def test_rare_sasp_genes_survive_the_gene_filter_and_sasp_is_scored(three_donors: dict) -> None:
    out = three_donors["pre"].adata
    planted = [g for g in SASP if g not in pbmc68k_counts().var_names]
    assert planted and set(planted) <= set(out.var_names)
    assert (out.var.loc[planted, "n_cells_by_counts"] <= 2).all()
    assert not out.var.loc[planted, "hvg_candidate"].any()
    cov = three_donors["score"].tables["signature_coverage"].set_index("signature")
    assert cov.loc["sasp", "status"] == "scored"
    assert cov.loc["sasp", "n_found"] == len(SASP)
    assert three_donors["score"].adata.obs["score_sasp"].notna().all()
