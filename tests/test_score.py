"""Stage ``score``: scanpy equivalence, aliases, missing genes, GMT/custom sets, devices."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from scipy import sparse

from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.genesets import (
    builtin_sets,
    collection_version,
    load_aliases,
    read_gmt,
    resolve_sets,
)
from pipeline.kernels.scoring import gene_means, weighted_scores
from pipeline.report.render import skipped_signatures_note
from pipeline.stages.differential.covariates import read_covariates
from pipeline.stages.score import (
    SAMPLE_HANDLING_TABLE,
    SCORES_KEY,
    control_genes,
    expression_bins,
    run_score,
    sample_handling_table,
    score_matrix,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _lognorm(n_cells: int = 400, n_genes: int = 600, seed: int = 0, names=None) -> ad.AnnData:
    """Log-normalised sparse data with gene-specific means (so binning matters)."""
    rng = np.random.default_rng(seed)
    mu = np.exp(rng.normal(-1.0, 1.5, n_genes))
    counts = rng.poisson(mu[None, :] * rng.gamma(4, 0.25, (n_cells, 1)))
    a = ad.AnnData(sparse.csr_matrix(counts.astype(np.float32)))
    a.var_names = names if names is not None else [f"G{i}" for i in range(n_genes)]
    a.obs_names = [f"c{i}" for i in range(n_cells)]
    a.layers["counts"] = a.X.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return a


def _cfg(**score):
    return load_config(None, {"score": score} if score else None)


@pytest.mark.parametrize("device", DEVICES)
def test_all_sets_in_one_product_equal_scanpy_score_genes(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    a = _lognorm(400, 2000)  # 83 genes per bin > ctrl_size: the draw matters
    rng = np.random.default_rng(1)
    sets = {
        f"s{k}": list(a.var_names[rng.choice(a.n_vars, size, replace=False)])
        for k, size in enumerate([5, 12, 30, 60, 7])
    }
    for seed in (0, 3):
        scores, controls = score_matrix(a.X, a.var_names, sets, seed=seed, device=device)
        for name, genes in sets.items():
            ref = a.copy()
            sc.tl.score_genes(ref, genes, score_name="ref", random_state=seed)
            np.testing.assert_allclose(scores[name], ref.obs["ref"], rtol=0, atol=1e-5)
            # the control genes are scanpy's: the score from them is the same to rounding
            direct = (
                np.asarray(a[:, genes].X.mean(1)).ravel()
                - np.asarray(a[:, controls[name]].X.mean(1)).ravel()
            )
            np.testing.assert_allclose(scores[name], direct, atol=1e-5)
            assert not set(controls[name]) & set(genes)
    # pools without the other sets' genes: scanpy with the same gene_pool
    others = {g for genes in sets.values() for g in genes}
    scores, controls = score_matrix(
        a.X, a.var_names, sets, seed=0, exclude_from_controls=others, device=device
    )
    for name, genes in sets.items():
        pool = [g for g in a.var_names if g not in others or g in genes]
        ref = a.copy()
        sc.tl.score_genes(ref, genes, score_name="ref", gene_pool=pool, random_state=0)
        np.testing.assert_allclose(scores[name], ref.obs["ref"], rtol=0, atol=1e-5)
        assert not set(controls[name]) & others


def test_control_genes_follow_the_seed_and_bins():
    means = pd.Series(np.linspace(0, 1, 500), index=[f"g{i}" for i in range(500)])
    genes = ["g10", "g250", "g490"]
    bins = expression_bins(means, 25)
    a = control_genes(bins, genes, ctrl_size=5, seed=0)
    b = control_genes(bins, genes, ctrl_size=5, seed=0)
    c = control_genes(bins, genes, ctrl_size=5, seed=1)
    assert a == b
    assert a != c
    assert len(a) <= 15  # 5 drawn per bin (three bins), minus any set gene drawn
    bins = {int(g[1:]) // 21 for g in a}  # 500 / 24 ~ 21 ranks per bin
    assert bins == {0, 11, 23}


def test_weighted_scores_chunks_and_dense_reference():
    x = sparse.random(257, 40, density=0.3, format="csr", random_state=2, dtype=np.float32)
    w = np.random.default_rng(3).normal(size=(40, 4))
    ref = x.toarray().astype(np.float64) @ w
    np.testing.assert_allclose(weighted_scores(x, w, chunk_size=50), ref, atol=1e-12)
    dense_means = x.toarray().astype(np.float64).mean(0)
    np.testing.assert_allclose(gene_means(x, chunk_size=31), dense_means, atol=1e-12)
    with pytest.raises(ValueError, match="genes x signatures"):
        weighted_scores(x, w[:5])


def test_aliases_match_old_symbols_both_ways():
    sets = builtin_sets()
    old = ["TMEM173", "MB21D1", "TBK1", "IRF3", "IKBKE", "IRF7", "IL8"]
    res = resolve_sets({"tbk1_sting": sets["tbk1_sting"], "sasp": sets["sasp"]}, old)
    assert res["tbk1_sting"].aliases_used == {"STING1": "TMEM173", "CGAS": "MB21D1"}
    assert {"TMEM173", "MB21D1", "TBK1"} <= set(res["tbk1_sting"].found)
    assert "STING1" not in res["tbk1_sting"].missing
    assert res["sasp"].aliases_used == {"CXCL8": "IL8"}
    # a set written with an old symbol finds the current gene
    gs = read_gmt_from_text("old\tlegacy\tIL8\tTMEM173\tNOPE\n")
    r = resolve_sets(gs, ["CXCL8", "STING1"])["old"]
    assert r.found == ["CXCL8", "STING1"]
    assert r.missing == ["NOPE"]
    assert load_aliases()["TMEM173"] == "STING1"


def read_gmt_from_text(text: str):
    """Parse GMT text through a real file."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "sets.gmt"
        p.write_text(text)
        return read_gmt(p)


def _with_symbols(symbols: list[str], n_cells: int = 300, seed: int = 0) -> ad.AnnData:
    """Data whose genes are ``symbols`` plus 400 fillers ``F0..F399``."""
    fillers = [f"F{i}" for i in range(400)]
    return _lognorm(n_cells, len(symbols) + len(fillers), seed, names=symbols + fillers)


def test_stage_scores_coverage_and_outputs_with_old_symbols():
    sets = builtin_sets()
    genes = list(sets["tbk1_sting"].genes) + list(sets["t_naive"].genes)
    genes = ["TMEM173" if g == "STING1" else "MB21D1" if g == "CGAS" else g for g in genes]
    a = _with_symbols(genes)
    cfg = _cfg(
        genesets=["tbk1_sting", "t_naive"],
        custom={"mine": genes[:6]},
        controls_exclude_signatures=False,  # scanpy's default pool, compared below
    )
    res = run_score(a, cfg)
    out = res.adata
    assert list(out.obsm[SCORES_KEY].columns) == ["tbk1_sting", "t_naive", "mine"]
    for name in ("tbk1_sting", "t_naive", "mine"):
        np.testing.assert_array_equal(out.obs[f"score_{name}"], out.obsm[SCORES_KEY][name])
    cov = res.tables["signature_coverage"].set_index("signature")
    assert cov.loc["tbk1_sting", "n_missing"] == 0
    assert "STING1=TMEM173" in cov.loc["tbk1_sting", "aliases_used"]
    assert cov.loc["tbk1_sting", "status"] == "scored"
    assert out.uns["immuneage"]["signatures"]["tbk1_sting"][0] == "MB21D1"
    assert res.provenance["sets"]["tbk1_sting"]["aliases_used"]["CGAS"] == "MB21D1"
    # roles and the collection version are recorded; no sample column: no handling table
    assert out.uns["immuneage"]["signature_roles"] == dict.fromkeys(
        ["tbk1_sting", "t_naive", "mine"], "programme"
    )
    assert out.uns["immuneage"]["signature_versions"]["t_naive"] == collection_version()
    assert out.uns["immuneage"]["signature_versions"]["mine"] == "config"
    assert res.provenance["collection"] == collection_version()
    assert cov.loc["t_naive", "version"] == collection_version()
    assert "sample_handling" not in res.tables
    # scanpy on the alias-mapped genes gives the same score
    ref = a.copy()
    sc.tl.score_genes(ref, out.uns["immuneage"]["signatures"]["tbk1_sting"], score_name="r")
    np.testing.assert_allclose(out.obs["score_tbk1_sting"], ref.obs["r"], atol=1e-5)


def test_small_set_is_an_error_naming_missing_genes_or_skipped():
    naive = list(builtin_sets()["t_naive"].genes)
    a = _with_symbols(naive[:3])
    msg = rf"'t_naive' has 3 of its {len(naive)} genes.*{', '.join(naive[3:])}"
    with pytest.raises(InputError, match=msg):
        run_score(a, _cfg(genesets=["t_naive"], on_small_set="error"))
    with pytest.warns(UserWarning, match="skipped"):
        res = run_score(
            a,
            _cfg(
                genesets=["t_naive"],
                custom={"ok": ["F1", "F2", "F3", "F4", "F5"]},
                on_small_set="skip",
            ),
        )
    assert "score_t_naive" not in res.adata.obs
    assert "score_ok" in res.adata.obs
    assert (
        res.tables["signature_coverage"]
        .set_index("signature")
        .loc["t_naive", "status"]
        .startswith("skipped")
    )
    with (
        pytest.raises(InputError, match=r"no gene set has at least score\.min_genes = 5"),
        pytest.warns(UserWarning, match="skipped"),
    ):
        run_score(a, _cfg(genesets=["t_naive"], on_small_set="skip"))


def test_small_sets_are_skipped_by_default_with_one_warning():
    naive = list(builtin_sets()["t_naive"].genes)
    a = _with_symbols([*naive[:3], "IL1A", "CXCL8", "CCL2"])
    assert load_config(None).score.on_small_set == "skip"
    with pytest.warns(UserWarning, match="skipped") as caught:
        res = run_score(
            a, _cfg(genesets=["t_naive", "sasp"], custom={"ok": ["F1", "F2", "F3", "F4", "F5"]})
        )
    msgs = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(msgs) == 1
    assert f"'t_naive' has 3 of its {len(naive)}" in msgs[0] and "'sasp' has 3 of its 8" in msgs[0]
    assert "IL6" in msgs[0] and "TNF" in msgs[0]
    cov = res.tables["signature_coverage"].set_index("signature")
    assert cov.loc["sasp", "status"] == "skipped: < 5 genes"
    assert set(cov.loc["sasp", "genes_missing"].split(",")) == {
        "IL6",
        "TNF",
        "MMP1",
        "MMP3",
        "IGFBP7",
    }
    assert cov.loc["ok", "status"] == "scored"
    assert list(res.adata.uns["immuneage"]["signatures"]) == ["ok"]
    # the report's signatures section names them and their missing genes
    note = skipped_signatures_note(res.tables["signature_coverage"])
    assert "2 gene set(s)" in note and "sasp (3 of 8 genes found; missing IL6, TNF" in note
    assert skipped_signatures_note(res.tables["signature_coverage"].iloc[2:]) is None
    # nothing scorable stays an error with the default
    with (
        pytest.raises(InputError, match="nothing can be scored"),
        pytest.warns(UserWarning, match="skipped"),
    ):
        run_score(a, _cfg(genesets=["sasp"]))


def test_unknown_builtin_and_bad_gmt_are_input_errors(tmp_path):
    a = _with_symbols(["CCR7"])
    with pytest.raises(InputError, match=r"no built-in gene set 'nope'.*tbk1_sting"):
        run_score(a, _cfg(genesets=["nope"]))
    bad = tmp_path / "bad.gmt"
    bad.write_text("ok\tdesc\tF1\tF2\nbroken line without tabs\n")
    with pytest.raises(InputError, match=r"bad.gmt, line 2"):
        run_score(a, _cfg(genesets=[], gmt=str(bad)))
    dup = tmp_path / "dup.gmt"
    dup.write_text("t_naive\tdesc\tF1\tF2\n")
    with pytest.raises(InputError, match="name of a built-in set"):
        run_score(a, _cfg(genesets=["t_naive"], gmt=str(dup)))


def test_gmt_sets_are_scored(tmp_path):
    a = _with_symbols([])
    gmt = tmp_path / "x.gmt"
    gmt.write_text("A\tfirst\t" + "\t".join(f"F{i}" for i in range(10)) + "\n")
    res = run_score(a, _cfg(genesets=[], gmt=str(gmt)))
    cov = res.tables["signature_coverage"].iloc[0]
    assert cov["signature"] == "A"
    assert cov["source"].endswith("x.gmt:1")
    assert cov["n_found"] == 10


@pytest.mark.parametrize("method", ["aucell", "ulm"])
def test_decoupler_methods_agree_in_direction(method):
    a = _lognorm(300, 500, 4)
    genes = list(a.var_names[:20])
    # plant: the first 100 cells express the set higher
    x = a.X.tolil()
    for j in range(20):
        x[:100, j] = x[:100, j].toarray() + 2.0
    a.X = x.tocsr()
    res = run_score(a, _cfg(genesets=[], custom={"planted": genes}, method=method))
    s = res.adata.obs["score_planted"].to_numpy()
    assert s[:100].mean() > s[100:].mean()


def test_genesets_command_lists_prints_and_exports(capsys, tmp_path):
    from pipeline.cli import main

    assert main(["genesets"]) == 0
    out = capsys.readouterr().out
    assert "tbk1_sting" in out and "senescence" in out
    assert main(["genesets", "--gmt", "tbk1_sting", "t_naive"]) == 0
    gmt = tmp_path / "export.gmt"
    gmt.write_text(capsys.readouterr().out)
    back = read_gmt(gmt)
    assert list(back) == ["tbk1_sting", "t_naive"]
    assert back["tbk1_sting"].genes == builtin_sets()["tbk1_sting"].genes
    assert main(["genesets", "nope"]) == 2
    assert "no built-in gene set 'nope'" in capsys.readouterr().err


def _cohort_cells(symbols: list[str], *, seed: int = 0) -> ad.AnnData:
    """2 donors x 2 timepoints, unequal cells per sample, two lineages (mono absent in one)."""
    sizes = {"D1_baseline": 150, "D1_acute": 60, "D2_baseline": 90, "D2_acute": 120}
    a = _with_symbols(symbols, n_cells=sum(sizes.values()), seed=seed)
    rng = np.random.default_rng(seed)
    sample = np.repeat(list(sizes), list(sizes.values()))
    a.obs["sample"] = pd.Categorical(sample)
    a.obs["donor"] = [s.split("_")[0] for s in sample]
    a.obs["timepoint"] = [s.split("_")[1] for s in sample]
    lineage = rng.choice(["T_CD4", "mono", "unassigned"], a.n_obs, p=[0.6, 0.3, 0.1])
    lineage[(sample == "D2_baseline") & (lineage == "mono")] = "T_CD4"
    a.obs["cell_type_coarse"] = pd.Categorical(lineage, categories=["T_CD4", "mono", "unassigned"])
    return a


def test_sample_handling_table_and_ieg_control_kept_out_of_nfkb(tmp_path):
    sets = builtin_sets()
    nfkb, ieg = list(sets["nfkb_inflammation"].genes), list(sets["ieg_dissociation"].genes)
    moved = [g for g in ieg if g in {"FOS", "JUNB", "EGR1", "IER2", "IER3", "DUSP1", "NR4A1",
                                     "ZFP36", "KLF6", "PPP1R15A", "CD69", "GADD45B"}]  # fmt: skip
    a = _cohort_cells(nfkb + ieg)
    cfg = _cfg(genesets=["nfkb_inflammation", "ieg_dissociation"], custom={"nfkb_v1": nfkb + moved})
    before = run_score(a.copy(), cfg)
    # a handling difference: immediate-early genes up by 1 (log scale) in every acute cell
    acute = np.flatnonzero(a.obs["timepoint"].to_numpy() == "acute")
    cols = [a.var_names.get_loc(g) for g in ieg]
    x = a.X.toarray()
    x[np.ix_(acute, cols)] += 1.0
    a.X = sparse.csr_matrix(x)
    res = run_score(a, cfg)
    out = res.adata
    assert out.uns["immuneage"]["signature_roles"] == {
        "nfkb_inflammation": "programme",
        "ieg_dissociation": "control",
        "nfkb_v1": "programme",
    }
    assert (
        res.tables["signature_coverage"].set_index("signature").loc["ieg_dissociation", "role"]
        == "control"
    )
    assert res.provenance["sets"]["ieg_dissociation"]["role"] == "control"
    # the NF-kB programme does not see handling (its controls exclude the IEG genes too);
    # the version-1 list, with the moved genes, reads it as inflammation
    np.testing.assert_allclose(
        out.obs["score_nfkb_inflammation"], before.adata.obs["score_nfkb_inflammation"], atol=1e-12
    )

    def acute_minus_baseline(r) -> float:
        s = r.adata.obs.groupby("timepoint", observed=True)["score_nfkb_v1"].mean()
        return float(s["acute"] - s["baseline"])

    # +1 on the moved genes, averaged over the set (the controls move both timepoints alike)
    expected = len(moved) / len(nfkb + moved)
    assert acute_minus_baseline(res) - acute_minus_baseline(before) > 0.5 * expected

    table = res.tables[SAMPLE_HANDLING_TABLE]
    assert list(table.columns) == [
        "sample", "donor", "timepoint", "n_cells",
        "ieg_dissociation", "ieg_dissociation_T_CD4", "ieg_dissociation_mono",
    ]  # fmt: skip
    obs = out.obs.assign(s=out.obs["score_ieg_dissociation"])
    ref = obs.groupby("sample", observed=True)["s"].agg(["mean", "size"])
    t = table.set_index("sample")
    np.testing.assert_allclose(t["ieg_dissociation"], ref.loc[t.index, "mean"], rtol=1e-12)
    np.testing.assert_array_equal(t["n_cells"], ref.loc[t.index, "size"])
    by_lin = obs.groupby(["sample", "cell_type_coarse"], observed=True)["s"].mean()
    np.testing.assert_allclose(
        t.loc["D1_acute", "ieg_dissociation_mono"], by_lin["D1_acute", "mono"]
    )
    assert np.isnan(t.loc["D2_baseline", "ieg_dissociation_mono"])  # no monocytes there
    assert (t["donor"] + "_" + t["timepoint"] == t.index).all()
    # the planted handling shift shows per timepoint in the table, within each donor
    for donor in ("D1", "D2"):
        d = (
            t.loc[f"{donor}_acute", "ieg_dissociation"]
            - t.loc[f"{donor}_baseline", "ieg_dissociation"]
        )
        assert 0.5 < d < 1.5, (donor, d)
    # the table is a covariates file for differential once written comma-separated
    path = tmp_path / "handling.csv"
    table.to_csv(path, index=False)
    cov = read_covariates(path, table[["sample"]], ["ieg_dissociation"])
    np.testing.assert_allclose(cov["ieg_dissociation"], table["ieg_dissociation"])
    with pytest.raises(ValueError, match="several donors"):
        bad = out.obs.copy()
        bad.loc[bad.index[0], "donor"] = "D2"
        sample_handling_table(bad, out.obsm[SCORES_KEY], controls=["ieg_dissociation"])
