"""Gene-set enrichment: camera's calibration with correlated genes, power, parity, end to end.

Null model of the calibration tests: per-gene donor-paired log-expression
differences (test - reference; donor baselines cancel in the difference) for
13 donors, multivariate normal with inter-gene correlation ``rho`` inside the
set, independent outside, gene-specific scales, no effect. The per-gene
statistic is the paired t (a proxy for the DESeq2 Wald statistic of
``~ donor + timepoint``, which on a paired design is the same standardised mean
difference); the residuals are the differences centred across donors, as
:func:`pipeline.stats.enrichment.paired_residuals` returns them.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from pipeline.config import load_config
from pipeline.errors import ImmuneageWarning
from pipeline.stages.differential import ENRICHMENT_COLUMNS, pseudobulk_de, signature_enrichment
from pipeline.stats.enrichment import camera, paired_residuals, set_correlation, ulm
from pipeline.stats.multitest import bh_adjust

ALPHA = 0.05
N_DONORS, N_GENES, SET_SIZE = 13, 400, 30
GENES = [f"g{i}" for i in range(N_GENES)]
SETS = {"set": GENES[:SET_SIZE]}


def _paired_null(
    seed: int, reps: int, rho: float, *, shift: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Differences (reps x donors x genes) and paired t statistics (reps x genes)."""
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((reps, N_DONORS, N_GENES))
    shared = rng.standard_normal((reps, N_DONORS, 1))
    d[:, :, :SET_SIZE] = np.sqrt(rho) * shared + np.sqrt(1.0 - rho) * d[:, :, :SET_SIZE]
    d[:, :, :SET_SIZE] += shift
    d *= rng.uniform(0.2, 2.0, N_GENES)  # gene-specific spread
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / np.sqrt(N_DONORS))
    return d, t


def _p_values(d: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ULM p, camera p and camera's estimated correlation of each replicate."""
    p_ulm, p_cam, rho = [], [], []
    for r in range(t.shape[0]):
        stat = pd.Series(t[r], index=GENES)
        res = pd.DataFrame(d[r] - d[r].mean(axis=0), columns=GENES)
        p_ulm.append(ulm(stat, SETS)["p_value"].iloc[0])
        c = camera(stat, SETS, residuals=res).iloc[0]
        p_cam.append(c["p_value"])
        rho.append(c["inter_gene_cor"])
    return np.array(p_ulm), np.array(p_cam), np.array(rho)


@pytest.mark.parametrize("rho", [0.1, 0.3])
def test_camera_calibrated_with_correlated_genes_where_ulm_is_not(rho: float) -> None:
    reps = 400
    d, t = _paired_null(int(rho * 10), reps, rho)
    p_ulm, p_cam, rho_hat = _p_values(d, t)
    lo, hi = stats.binom.interval(0.998, reps, ALPHA)
    fpr_ulm, fpr_cam = (p_ulm < ALPHA).mean(), (p_cam < ALPHA).mean()
    # camera: within the binomial 99.8% interval of alpha
    assert lo / reps <= fpr_cam <= hi / reps, (fpr_cam, lo / reps, hi / reps)
    # ULM ignores the VIF; the test has the power to show it
    assert fpr_ulm > hi / reps, fpr_ulm
    # and the correlation is estimated without a large bias (sd of one estimate ~ 0.1)
    assert abs(rho_hat.mean() - rho) < 3 * rho_hat.std() / np.sqrt(reps) + 0.02


def test_camera_power_on_a_planted_shift() -> None:
    reps = 100
    for shift, word in ((0.4, "up"), (-0.4, "down")):
        d, t = _paired_null(7, reps, 0.1, shift=shift)
        hits = []
        for r in range(reps):
            stat = pd.Series(t[r], index=GENES)
            res = pd.DataFrame(d[r] - d[r].mean(axis=0), columns=GENES)
            c = camera(stat, SETS, residuals=res).iloc[0]
            hits.append(c["p_value"] < ALPHA and c["direction"] == word)
        # a shift of 0.4 sd per gene: per-gene t ~ 0.4 sqrt(13) = 1.4, camera z ~ 1.4 / sqrt(VIF / m)
        # with VIF = 3.9, m = 30: ~3.9, i.e. expected power > 0.9 on t(12)
        assert np.mean(hits) >= 0.8, (shift, np.mean(hits))


def test_camera_equals_direct_evaluation_of_its_definition() -> None:
    rng = np.random.default_rng(3)
    n, g, m = 6, 40, 8
    genes = [f"x{i}" for i in range(g)]
    resid = rng.standard_normal((n, g))
    resid[:, :m] += rng.standard_normal((n, 1))  # correlated members
    resid -= resid.mean(axis=0)
    stat = pd.Series(rng.standard_normal(g) + np.r_[np.full(m, 0.8), np.zeros(g - m)], index=genes)
    sets = {"s": genes[:m], "tiny": genes[:2], "none": ["absent"]}
    got = camera(stat, sets, residuals=pd.DataFrame(resid, columns=genes)).set_index("signature")
    # direct: full correlation matrix, pooled two-group variance, t on min(n - 1, g - 2) df
    c = np.corrcoef(resid[:, :m], rowvar=False)
    rho = c[~np.eye(m, dtype=bool)].mean()
    y_in, y_out = stat.to_numpy()[:m], stat.to_numpy()[m:]
    s2 = ((m - 1) * y_in.var(ddof=1) + (g - m - 1) * y_out.var(ddof=1)) / (g - 2)
    t = (y_in.mean() - y_out.mean()) / np.sqrt(s2 * ((1 + (m - 1) * rho) / m + 1 / (g - m)))
    assert got.loc["s", "inter_gene_cor"] == pytest.approx(rho, rel=1e-10)
    assert got.loc["s", "score"] == pytest.approx(t, rel=1e-10)
    assert got.loc["s", "p_value"] == pytest.approx(2 * stats.t.sf(abs(t), n - 1), rel=1e-10)
    assert set_correlation(resid[:, :m]) == pytest.approx(rho, rel=1e-10)
    assert got.loc[["tiny", "none"], "p_value"].isna().all()
    # with the correlation fixed at 0, camera is the pooled two-sample t-test (G - 2 df),
    # which is also ULM's slope t
    zero = camera(
        stat, {"s": genes[:m]}, residuals=pd.DataFrame(resid, columns=genes), inter_gene_cor=0.0
    ).iloc[0]
    ref = stats.ttest_ind(y_in, y_out)
    assert zero["score"] == pytest.approx(ref.statistic, rel=1e-10)
    assert zero["p_value"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert ulm(stat, {"s": genes[:m]})["p_value"].iloc[0] == pytest.approx(ref.pvalue, rel=1e-10)


def test_camera_invariant_to_rotation_and_scale_of_residuals() -> None:
    rng = np.random.default_rng(4)
    n, g, m = 9, 50, 12
    genes = [f"x{i}" for i in range(g)]
    resid = rng.standard_normal((n, g))
    resid[:, :m] += 0.8 * rng.standard_normal((n, 1))
    resid -= resid.mean(axis=0)
    stat = pd.Series(rng.standard_normal(g), index=genes)
    base = camera(stat, {"s": genes[:m]}, residuals=pd.DataFrame(resid, columns=genes))
    # a random rotation of the residual space (orthogonal, fixing the constant vector)
    # and any positive scale per gene leave every correlation, hence camera, unchanged
    h = np.linalg.qr(np.c_[np.ones(n), rng.standard_normal((n, n - 1))])[0][:, 1:]
    r = np.linalg.qr(rng.standard_normal((n - 1, n - 1)))[0]
    q = np.full((n, n), 1.0 / n) + h @ r @ h.T
    assert np.allclose(q @ q.T, np.eye(n)) and not np.allclose(q, np.eye(n))
    rotated = q @ resid * rng.uniform(0.1, 10, g)
    assert np.allclose(rotated.mean(axis=0), 0)
    got = camera(stat, {"s": genes[:m]}, residuals=pd.DataFrame(rotated, columns=genes))
    pd.testing.assert_frame_equal(got, base, rtol=1e-9)
    # shuffling the genes outside the set (statistics with them) changes nothing either
    perm = rng.permutation(np.arange(m, g))
    order = np.r_[np.arange(m), perm]
    shuffled = camera(
        pd.Series(stat.to_numpy()[order], index=np.array(genes)[order]),
        {"s": genes[:m]},
        residuals=pd.DataFrame(resid, columns=genes),
    )
    pd.testing.assert_frame_equal(shuffled, base, rtol=1e-9)


def test_paired_residuals_recover_the_correlation_from_counts() -> None:
    """Counts with 4x different depths: log-CPM residuals recover the latent correlation."""
    rng = np.random.default_rng(5)
    n, g, m, rho = 12, 200, 20, 0.4
    latent = rng.standard_normal((n, g))
    latent[:, :m] = np.sqrt(rho) * rng.standard_normal((n, 1)) + np.sqrt(1 - rho) * latent[:, :m]
    latent *= 0.3  # log-scale sd of the paired change
    base = np.exp(rng.normal(0, 0.5, (n, 1)) + rng.normal(0, 1, g))  # donor and gene levels
    mean_count = 2000.0 / base.mean()
    depth = rng.choice([1.0, 4.0], size=(2 * n, 1))
    mu = np.vstack([base, base * np.exp(latent)]) * mean_count * depth
    counts = pd.DataFrame(rng.poisson(mu), columns=[f"x{i}" for i in range(g)])
    donors = np.r_[np.arange(n), np.arange(n)].astype(str)
    tps = np.r_[np.repeat("ref", n), np.repeat("test", n)]
    # one donor lacks its test sample: left out
    res = paired_residuals(counts.iloc[:-1], donors[:-1], tps[:-1], test="test", reference="ref")
    assert res.shape == (n - 1, g) and np.allclose(res.mean(axis=0), 0)
    # the truth: the latent changes normalised as DESeq2's size factors do (median log change
    # per pair removed; this also removes part of the shared factor, in the Wald statistics too)
    truth = latent[: n - 1] - np.median(latent[: n - 1], axis=1, keepdims=True)
    truth -= truth.mean(axis=0)
    # Poisson noise at >= ~100 counts adds < 0.01 to a log-scale variance of 0.09, so the
    # estimates differ by ~ 10% of rho at most
    for cols in (slice(0, m), slice(m, 2 * m)):
        got, want = set_correlation(res.iloc[:, cols]), set_correlation(truth[:, cols])
        assert got == pytest.approx(want, abs=0.1 * rho)
    assert set_correlation(res.iloc[:, :m]) > 0.2 > abs(set_correlation(res.iloc[:, m : 2 * m]))
    with pytest.raises(ValueError, match="inter_gene_cor"):
        camera(pd.Series([0.0, 1.0, 2.0]), {}, residuals=res, inter_gene_cor=1.0)


def _pseudobulks(seed: int = 0, *, n_donors: int = 8, n_genes: int = 60) -> ad.AnnData:
    """One cell type, 8 donors x 3 timepoints; 'up' (correlated genes) rises at acute."""
    rng = np.random.default_rng(seed)
    tps = ("baseline", "acute", "longterm")
    gene_level = rng.uniform(50, 400, n_genes)
    rows, x = [], []
    for d in range(n_donors):
        donor_eff = rng.normal(0, 0.3)
        for tp in tps:
            lf = rng.normal(0, 0.15, n_genes)
            lf[:12] += rng.normal(0, 0.3)  # co-regulated programme
            if tp == "acute":
                lf[:12] += 0.7
            x.append(rng.poisson(gene_level * np.exp(donor_eff + lf)))
            rows.append({"donor": f"D{d}", "timepoint": tp, "cell_type": "T", "n_cells": 50})
    obs = pd.DataFrame(rows)
    obs["sample"] = obs["donor"] + "_" + obs["timepoint"]
    obs.index = obs["sample"] + "|T"
    obs["timepoint"] = pd.Categorical(obs["timepoint"], categories=tps)
    var = pd.DataFrame(index=[f"G{i}" for i in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(np.array(x, dtype=float)), obs=obs, var=var)


def test_signature_enrichment_end_to_end_with_pydeseq2() -> None:
    pb = _pseudobulks()
    cfg = load_config(None, {"differential": {"pseudobulk_min_cells": 5, "gene_min_samples": 3}})
    contrasts = cfg.design.contrasts
    tables, _, _ = pseudobulk_de(pb, contrasts, cfg.differential)
    assert len(tables) == 2
    sets = {"up": [f"G{i}" for i in range(12)], "flat": [f"G{i}" for i in range(12, 30)]}
    enr = signature_enrichment(tables, sets, min_genes=5, method=("camera", "ulm"), pseudobulks=pb)
    assert tuple(enr.columns) == ENRICHMENT_COLUMNS
    assert len(enr) == 2 * 2 * 2  # contrasts x signatures x methods
    cam = enr[enr["method"] == "camera"].set_index(["contrast", "signature"])
    assert cam["calibrated"].all() and not enr.loc[enr["method"] == "ulm", "calibrated"].any()
    assert (enr["family"] == "enrichment_" + enr["method"]).all()
    # the planted programme: up at acute, correlated (shared donor factor, sd 0.3 vs 0.15)
    hit = cam.loc[("acute_vs_baseline", "up")]
    assert hit["direction"] == "up" and hit["q_value"] < 0.05
    assert cam.loc[("acute_vs_baseline", "up"), "inter_gene_cor"] > 0.3
    assert cam.loc[("acute_vs_baseline", "flat"), "inter_gene_cor"] < 0.3
    # q-values: BH over each method's rows across both contrasts
    for _, part in enr.groupby("method"):
        np.testing.assert_allclose(part["q_value"], bh_adjust(part["p_value"]))
    # without pseudobulks camera cannot run: ULM, with a warning, rows marked uncalibrated
    with pytest.warns(ImmuneageWarning, match="camera needs the pseudobulks"):
        old = signature_enrichment(tables, sets, min_genes=5)
    assert (old["method"] == "ulm").all() and not old["calibrated"].any()
