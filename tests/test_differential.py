"""Stage ``differential``: tables, edge cases, covariates, and recovery of the demo's planted truth."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from pipeline.config import DEMO_OVERRIDES, load_config
from pipeline.errors import ImmuneageWarning, InputError
from pipeline.stages.differential import (
    COMPOSITION_COLUMNS,
    COVARIATE_COLUMNS,
    DROPPED_COLUMNS,
    ENRICHMENT_COLUMNS,
    MEANS_COLUMNS,
    SHIFT_COLUMNS,
    SUMMARY_COLUMNS,
    de_table_name,
    pseudobulk,
    read_covariates,
    run_differential,
)

TPS = ["baseline", "acute", "longterm"]
SIGS = {"up": [f"G{i}" for i in range(10)], "flat": [f"G{i}" for i in range(10, 20)]}


def _toy(
    seed: int = 0,
    *,
    n_donors: int = 6,
    cells: int = 30,
    drop: tuple[tuple[str, str], ...] = (),
    n_genes: int = 60,
) -> ad.AnnData:
    """Cells of 3 types in donors x timepoints; 'up' rises at acute in type 'A' (genes and score)."""
    rng = np.random.default_rng(seed)
    rows, blocks = [], []
    for d in range(n_donors):
        donor = f"D{d}"
        u = rng.normal(0, 0.5)
        for tp in TPS:
            if (donor, tp) in drop:
                continue
            for ct in ("A", "B", "C"):
                n = cells
                up = 1.0 if (ct == "A" and tp == "acute") else 0.0
                mu = np.full(n_genes, 3.0)
                mu[:10] *= 2.0**up
                blocks.append(rng.poisson(mu * np.exp(u), size=(n, n_genes)))
                for _ in range(n):
                    rows.append(
                        {
                            "sample": f"{donor}_{tp}",
                            "donor": donor,
                            "timepoint": tp,
                            "cell_type": ct,
                            "score_up": u + up + rng.normal(0, 0.3),
                            "score_flat": u + rng.normal(0, 0.3),
                        }
                    )
    obs = pd.DataFrame(rows)
    obs.index = [f"c{i}" for i in range(len(obs))]
    obs["timepoint"] = pd.Categorical(obs["timepoint"], categories=TPS, ordered=True)
    obs["cell_type"] = pd.Categorical(obs["cell_type"], categories=["A", "B", "C", "unassigned"])
    counts = sp.csr_matrix(np.vstack(blocks).astype(np.float32))
    a = ad.AnnData(
        X=counts.copy(), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)])
    )
    a.layers["counts"] = counts
    a.uns["immuneage"] = {"signatures": SIGS}
    a.obsm["signature_scores"] = obs[["score_up", "score_flat"]].set_axis(["up", "flat"], axis=1)
    return a


def _cfg(**diff):
    base = {"min_cells": 5, "pseudobulk_min_cells": 5, "gene_min_samples": 3}
    return load_config(None, {"differential": {**base, **diff}})


def _run(a: ad.AnnData, **diff):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run_differential(a, _cfg(**diff), device="cpu")
    msgs = [str(w.message) for w in caught if issubclass(w.category, ImmuneageWarning)]
    return res, msgs


def test_tables_schema_and_planted_shift(caplog, monkeypatch) -> None:
    monkeypatch.setenv("IMMUNEAGE_PROGRESS", "lines")  # plain lines, one per cell type
    monkeypatch.setenv("IMMUNEAGE_PROGRESS_INTERVAL", "0")
    with caplog.at_level(logging.INFO, logger="immuneage"):
        res, _ = _run(_toy())
    progress = [r.getMessage() for r in caplog.records if "pseudobulk DE" in r.getMessage()]
    assert progress[0].startswith("pseudobulk DE (PyDESeq2): cell type 1/3 (33%)"), progress
    assert progress[-1].startswith("pseudobulk DE (PyDESeq2): cell type 3/3 (100%)"), progress
    t = res.tables
    assert tuple(t["signature_shifts"].columns) == SHIFT_COLUMNS
    assert tuple(t["signature_means"].columns) == MEANS_COLUMNS
    assert tuple(t["pseudobulk_de_summary"].columns) == SUMMARY_COLUMNS
    assert tuple(t["signature_enrichment"].columns) == ENRICHMENT_COLUMNS
    assert tuple(t["composition"].columns) == COMPOSITION_COLUMNS
    assert tuple(t["differential_dropped"].columns) == DROPPED_COLUMNS
    assert "covariate_associations" not in t
    sh = t["signature_shifts"].set_index(["contrast", "cell_type", "signature"])
    hit = sh.loc[("acute_vs_baseline", "A", "up")]
    assert hit["n_donors"] == 6 and hit["q_value"] < 0.01 and hit["ci_low"] < 1.0 < hit["ci_high"]
    assert hit["effect"] == pytest.approx(1.0, abs=0.3) and hit["dz"] > 2
    others = sh.drop(("acute_vs_baseline", "A", "up"))
    assert (others["q_value"] >= 0.1).mean() >= 0.9
    # one signature_means row per donor x timepoint x type x signature
    assert len(t["signature_means"]) == 6 * 3 * 3 * 2
    # pseudobulk DE tables with safe names; planted genes rank first in A acute
    de = t[de_table_name("A", "acute_vs_baseline")]
    assert list(de.columns) == [
        "gene",
        "base_mean",
        "log2fc",
        "lfc_se",
        "stat",
        "p_value",
        "q_value",
    ]
    top = set(de.nsmallest(10, "p_value")["gene"])
    assert len(top & set(SIGS["up"])) >= 9
    enr = t["signature_enrichment"].set_index(["contrast", "cell_type", "signature"])
    assert enr.loc[("acute_vs_baseline", "A", "up"), "score"] > 0
    assert enr.loc[("acute_vs_baseline", "A", "up"), "q_value"] < 0.05
    # the pseudobulk artifact
    pb = res.adata
    assert sp.issparse(pb.X) and pb.n_obs == 6 * 3 * 3
    assert {"donor", "timepoint", "cell_type", "n_cells"} <= set(pb.obs.columns)
    # composition: every sample has equal counts of each type -> constant CLR
    # differences: NaN p with the reason; ratios need T-cell labels, absent here
    comp = t["composition"]
    assert comp["p_value"].isna().all() and comp["note"].str.contains("constant").all()
    assert t["differential_dropped"]["reason"].str.contains("log-ratio not computed").any()


def test_de_table_name_is_file_safe() -> None:
    assert de_table_name("CD14 monocyte", "acute_vs_baseline") == (
        "pseudobulk_de/CD14_monocyte__acute_vs_baseline"
    )
    assert de_table_name("naive/memory T", "x") == "pseudobulk_de/naive_memory_T__x"


def test_pseudobulk_matches_dense_and_skips_unassigned() -> None:
    a = _toy(n_donors=3, cells=8)
    a.obs.loc[a.obs_names[:5], "cell_type"] = "unassigned"
    pb = pseudobulk(a)
    dense = a.layers["counts"].toarray()
    keep = (a.obs["cell_type"] != "unassigned").to_numpy()
    assert pb.obs["n_cells"].sum() == keep.sum()
    for name, row in pb.obs.iterrows():
        m = (
            keep
            & (a.obs["sample"] == row["sample"]).to_numpy()
            & (a.obs["cell_type"].astype(str) == row["cell_type"]).to_numpy()
        )
        np.testing.assert_array_equal(pb[name].X.toarray().ravel(), dense[m].sum(axis=0))


def test_edge_cases_are_reported_not_crashes() -> None:
    # D5 has one timepoint only; D4 misses acute; type C absent at longterm; constant scores
    a = _toy(drop=(("D5", "acute"), ("D5", "longterm"), ("D4", "acute")))
    a = a[~((a.obs["cell_type"] == "C") & (a.obs["timepoint"] == "longterm")).to_numpy()].copy()
    a.obs["score_flat"] = 1.0
    res, msgs = _run(a)
    sh, dropped = res.tables["signature_shifts"], res.tables["differential_dropped"]
    assert any("one timepoint only" in m for m in msgs)
    assert any("not tested" in m or "no signature-shift" in m for m in msgs) or not sh.empty
    # D5 enters no test, D4 only longterm
    assert ((dropped["donor"] == "D5") & dropped["reason"].str.contains("one timepoint")).any()
    ac = sh[(sh["contrast"] == "acute_vs_baseline") & (sh["signature"] == "up")]
    assert (ac["n_donors"] == 4).all()
    assert ac["donors_dropped"].str.contains("D4 \\(donor has no acute sample\\)").all()
    lt = sh[sh["contrast"] == "longterm_vs_baseline"]
    assert (lt["n_donors"] == 5).all()
    # C absent at longterm: no C rows, a dropped row naming why
    assert "C" not in set(lt["cell_type"])
    assert (
        (dropped["cell_type"] == "C")
        & (dropped["contrast"] == "longterm_vs_baseline")
        & dropped["reason"].str.contains("no C cells at longterm")
    ).any()
    # constant scores: NaN p with a reason, never a fake p
    flat = sh[sh["signature"] == "flat"]
    assert flat["p_value"].isna().all() and flat["note"].str.contains("constant").all()
    summ = res.tables["pseudobulk_de_summary"]
    assert set(summ.loc[summ["cell_type"] == "C", "status"].str[:7]) >= {"skipped"}


def test_contrast_without_donors_yields_no_rows(tmp_path: Path) -> None:
    # longterm only for two donors: that contrast has < min_donors pairs
    drop = tuple((f"D{d}", "longterm") for d in range(2, 6))
    res, msgs = _run(_toy(drop=drop), deseq=False)
    sh = res.tables["signature_shifts"]
    assert set(sh["contrast"]) == {"acute_vs_baseline"}
    assert any("longterm_vs_baseline yields no" in m for m in msgs)


def test_no_test_possible_is_an_input_error() -> None:
    drop = tuple((f"D{d}", tp) for d in range(2, 6) for tp in ("acute", "longterm"))
    with pytest.raises(InputError, match=r"no test can run.*acute vs baseline: 2 donors"):
        run_differential(_toy(drop=drop), _cfg(), device="cpu")


def test_mixed_and_wilcoxon_options() -> None:
    a = _toy(drop=(("D4", "acute"),))
    mixed, _ = _run(a, test="mixed", deseq=False)
    sh = mixed.tables["signature_shifts"].set_index(["contrast", "cell_type", "signature"])
    row = sh.loc[("acute_vs_baseline", "A", "up")]
    assert row["test"] == "mixed" and row["method"].startswith("mixedlm:") and row["n_donors"] == 6
    assert row["q_value"] < 0.01
    wil, _ = _run(a, test="wilcoxon", deseq=False)
    w = wil.tables["signature_shifts"]
    np.testing.assert_allclose(w["p_value"], w["p_wilcoxon"])
    assert not any(k.startswith("pseudobulk_de/") for k in wil.tables)


def test_covariates(tmp_path: Path) -> None:
    a = _toy()
    samples = a.obs[["sample", "donor", "timepoint"]].drop_duplicates()
    rng = np.random.default_rng(1)
    cov = samples.copy()
    # the covariate tracks the 'up' score (donor level + acute rise) in type A
    means = a.obs[a.obs["cell_type"] == "A"].groupby("sample", observed=True)["score_up"].mean()
    cov["betaine"] = (
        10 * means.reindex(cov["sample"]).to_numpy() + rng.normal(0, 0.5, len(cov))
    ).round(3)
    cov["noise"] = rng.normal(size=len(cov)).round(3)
    path = tmp_path / "cov.csv"
    cov.to_csv(path, index=False)
    res, _ = _run(a, covariates=str(path), deseq=False)
    t = res.tables["covariate_associations"]
    assert tuple(t.columns) == COVARIATE_COLUMNS
    assert set(t["adjusted_for"]) == {"timepoint"}  # the default
    hits = t.set_index(["covariate", "cell_type", "signature", "component"])
    hit = hits.loc[("betaine", "A", "up", "within")]
    assert (
        hit["slope"] > 0 and hit["q_value"] < 0.01 and hit["n_donors"] == 6 and hit["n_obs"] == 18
    )
    assert hits.loc[("betaine", "A", "up", "between"), "slope"] > 0
    # columns can be chosen
    res2, _ = _run(a, covariates=str(path), covariate_columns=["noise"], deseq=False)
    assert set(res2.tables["covariate_associations"]["covariate"]) == {"noise"}


def test_composition_absolute_through_the_stage(tmp_path: Path) -> None:
    # equal shares at every sample, totals doubling at acute: relative untestable
    # (constant), absolute: every type up; a sample without a total is a dropped row
    a = _toy()
    cov = a.obs[["sample", "donor", "timepoint"]].drop_duplicates().reset_index(drop=True)
    rng = np.random.default_rng(2)
    cov["wbc"] = (
        np.where(cov["timepoint"] == "acute", 2000.0, 1000.0) * np.exp(rng.normal(0, 0.1, len(cov)))
    ).round(1)
    cov.loc[0, "wbc"] = np.nan
    path = tmp_path / "cov.csv"
    cov.to_csv(path, index=False)
    res, _ = _run(
        a, covariates=str(path), covariate_columns=["wbc"], absolute_total_column="wbc", deseq=False
    )
    ab = res.tables["composition_absolute"]
    acute = ab[ab["contrast"] == "acute_vs_baseline"]
    assert len(acute) == 3 and (acute["direction"] == "up").all()
    assert (acute["q_value"] < 0.01).all() and (acute["n_donors"] == 5).all()
    assert (ab["question"] == "absolute abundance (cells per uL)").all()
    drop = res.tables["differential_dropped"]
    assert drop["reason"].str.contains("'wbc' empty").sum() == 1
    assert res.adata.uns["immuneage"]["differential"]["absolute_total_column"] == "wbc"
    with pytest.raises(InputError, match="absolute_total_column"):
        _run(a, absolute_total_column="wbc", deseq=False)


def test_covariate_file_errors(tmp_path: Path) -> None:
    samples = pd.DataFrame({"sample": ["S1", "S2"], "donor": ["D1", "D1"], "timepoint": TPS[:2]})
    p = tmp_path / "c.csv"
    p.write_text("sample,donor,x\nS1,D1,1.5\nS2,D1,abc\n")
    with pytest.raises(InputError, match=r"c\.csv, row 3 \(sample 'S2'\), column 'x': 'abc'"):
        read_covariates(p, samples)
    p.write_text("sample,x\nS1,1.5\n")
    with pytest.raises(InputError, match=r"no row for 1 sample.*S2"):
        read_covariates(p, samples)
    p.write_text("sample,x\nS1,1\nS2,\n")
    got = read_covariates(p, samples)
    assert got.loc["S1", "x"] == 1.0 and np.isnan(got.loc["S2", "x"])
    with pytest.raises(InputError, match="no column"):
        read_covariates(p, samples, ["y"])
    p.write_text("id,x\nS1,1\n")
    with pytest.raises(InputError, match="no 'sample' column"):
        read_covariates(p, samples)
    with pytest.raises(InputError, match="does not exist"):
        read_covariates(tmp_path / "nope.csv", samples)


# --------------------------------------------------------------------------- recovery on the demo
def _demo_run(root: Path, size: str) -> tuple[Path, dict, float]:
    from pipeline.datasets import demo_cohort
    from pipeline.runner import Runner

    demo = demo_cohort(root / "cohort", size=size, seed=0)
    # ci: ~75 cells per sample, so groups of >= 3 cells (CD8 memory T, CD16 monocytes
    # have ~5 per sample); the default size keeps the shipped min_cells
    diff = {"covariates": str(root / "cohort" / "covariates.csv")}
    if size == "ci":
        diff |= {"min_cells": 3, "pseudobulk_min_cells": 3}
    cfg = load_config(
        None,
        {
            **DEMO_OVERRIDES,
            "device": "cpu",
            "integrate": {"max_epochs": 2, "early_stopping": False},
            "differential": diff,
        },
    )
    t0 = time.perf_counter()
    summary = Runner(demo.samplesheet, cfg, root / "run").run(until="differential")
    assert summary.stages["differential"] == "ran"
    return root / "run" / "tables", json.loads(demo.truth.read_text()), time.perf_counter() - t0


def recovery_metrics(tables: Path, truth: dict) -> dict[str, float]:
    """Sensitivity, false-call fraction and DE AUROC of a run against the demo truth.

    A planted (contrast, cell type, programme) is recovered when its shift has
    q < 0.1 in the planted direction (untested counts as missed). A call
    (q < 0.1, outside the ``control`` family, which the report never lists as a
    finding) is false when the programme has no planted gene in that cell type
    and contrast (truth status ``null``). DE AUROC pools every DE table of
    a (cell type, contrast) with planted genes, ranking genes by p-value.
    """
    sh = pd.read_csv(tables / "signature_shifts.tsv", sep="\t")
    key = ["contrast", "cell_type", "signature"]
    pe = pd.DataFrame(truth["programme_effects"]).rename(columns={"programme": "signature"})
    planted = pd.DataFrame(truth["planted_effects"]).rename(columns={"programme": "signature"})
    pp = planted.merge(sh, on=key, how="left")
    sign = np.where(pp["direction"] == "up", 1.0, -1.0)
    hit = (pp["q_value"] < 0.1) & (np.sign(pp["effect"]) == sign)
    # calls are the report's claims: the sample-handling control family is a QC readout
    claims = sh[sh["family"] != "control"] if "family" in sh else sh
    calls = claims[claims["q_value"] < 0.1].merge(pe[[*key, "status"]], on=key, how="left")
    false = calls["status"].fillna("null") == "null"
    summ = pd.read_csv(tables / "pseudobulk_de_summary.tsv", sep="\t")
    ys, ss = [], []
    for _, r in summ[summ["table"].notna()].iterrows():
        genes = truth["gene_effects"].get(r["contrast"], {}).get(r["cell_type"])
        if not genes:
            continue
        de = pd.read_csv(tables / f"{r['table']}.tsv", sep="\t")
        ys.append(de["gene"].isin([g for g, v in genes.items() if v != 0]).to_numpy())
        ss.append(-np.log10(de["p_value"].fillna(1.0).clip(lower=1e-300)).to_numpy())
    return {
        "sensitivity": float(hit.mean()),
        "n_calls": len(calls),
        "false_fraction": float(false.mean()) if len(calls) else 0.0,
        "de_auroc": float(roc_auc_score(np.concatenate(ys), np.concatenate(ss))),
        "n_de_tables_with_truth": len(ys),
    }


@pytest.fixture(scope="module")
def ci_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, float]:
    """One pipeline run (ingest .. differential) on the CI demo, shared by the module."""
    return _demo_run(tmp_path_factory.mktemp("diff_demo"), "ci")


def test_recovery_on_ci_demo(ci_demo) -> None:
    tables, truth, wall = ci_demo
    m = recovery_metrics(tables, truth)
    print(f"CI demo recovery: {m}, pipeline wall {wall:.0f} s")
    assert m["sensitivity"] >= 0.9, m
    assert m["n_calls"] >= 9 and m["false_fraction"] <= 0.1, m
    assert m["n_de_tables_with_truth"] >= 3 and m["de_auroc"] >= 0.9, m
    # every table of the contract was written; DE file names are file-safe
    for name in (
        "signature_means",
        "composition",
        "covariate_associations",
        "differential_dropped",
    ):
        assert (tables / f"{name}.tsv").is_file()
    assert (tables / "pseudobulk_de" / "CD14_monocyte__acute_vs_baseline.tsv").is_file()


def test_demo_composition_and_covariate(ci_demo) -> None:
    tables, _, _ = ci_demo
    comp = pd.read_csv(tables / "composition.tsv", sep="\t").set_index(["contrast", "cell_type"])
    # acute mobilisation of NK cells (planted 1.8x abundance): up, nominally significant
    nk = comp.loc[("acute_vs_baseline", "NK")]
    assert nk["direction"] == "up" and nk["effect"] > 0 and nk["p_value"] < 0.05
    assert ("longterm_vs_baseline", "naive/memory T ratio") in comp.index
    cov = pd.read_csv(tables / "covariate_associations.tsv", sep="\t")
    # betaine rises with the long-term drop of the TBK1 / IFN programmes in CD14 monocytes
    # (a donor's own rise tracks its own drop: the within-donor slope, adjusted for timepoint;
    # with 13 donors it is nominally significant, not at q < 0.1 over the whole family -- the
    # unadjusted association that reached q < 0.1 before was mostly the timepoint effect)
    within = cov[
        (cov["cell_type"] == "CD14 monocyte")
        & cov["signature"].isin(["tbk1_sting", "ifn_type1"])
        & (cov["component"] == "within")
    ]
    assert len(within) == 2 and (within["adjusted_for"] == "timepoint").all()
    assert (within["slope"] < 0).all() and (within["p_value"] < 0.05).all(), within


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, float]:
    """One pipeline run on the default-size demo (30,000 cells; ~4 min on 2 cores).

    Opt-in (``IMMUNEAGE_SLOW_TESTS=1``) to keep the README test command within
    CI's time budget; the CI-size recovery test above asserts the same criteria.
    """
    if not os.environ.get("IMMUNEAGE_SLOW_TESTS"):
        pytest.skip("default-size demo recovery: set IMMUNEAGE_SLOW_TESTS=1 to run it (~4 min)")
    return _demo_run(tmp_path_factory.mktemp("diff_demo_default"), "default")


@pytest.mark.slow
def test_recovery_on_default_demo(default_demo) -> None:
    tables, truth, _ = default_demo
    m = recovery_metrics(tables, truth)
    print(f"default demo recovery: {m}")
    assert m["sensitivity"] >= 0.9 and m["de_auroc"] >= 0.9, m
    # controls drawn outside the other programmes (score.controls_exclude_signatures): with
    # scanpy's all-gene pool, planted genes in other sets' controls gave 5 of 22 false calls
    assert m["n_calls"] >= 10 and m["false_fraction"] <= 0.1, m
