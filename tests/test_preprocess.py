"""Preprocess stage: outputs, and the scanpy path vs the torch-kernel path (CPU here, CUDA when present).

Tolerances (the contract between backends):
QC metrics equal (rtol 1e-6); normalised values within 1e-5 relative; HVG sets
Jaccard >= 0.95; top-10 PCs matched with |correlation| >= 0.99.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from pipeline.config import load_config
from pipeline.errors import ImmuneageWarning
from pipeline.stages.preprocess import run_preprocess
from pipeline.stages.qc import merge_qc, qc_sample

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ],
    ),
]


def _cohort(
    seed: int = 0, n_samples: int = 4, n_cells: int = 350, n_genes: int = 1200
) -> ad.AnnData:
    """Merged-ingest-like AnnData: 6 cell types, per-sample depth, MT genes."""
    rng = np.random.default_rng(seed)
    genes = (
        [f"MT-G{i}" for i in range(6)]
        + [f"RPL{i}" for i in range(10)]
        + [f"G{i}" for i in range(n_genes - 16)]
    )
    base = rng.lognormal(-1.0, 1.3, n_genes)
    types = []
    for _ in range(6):
        prof = base.copy()
        up = rng.choice(np.arange(16, n_genes), 40, replace=False)
        prof[up] *= rng.uniform(4, 15, 40)
        types.append(prof / prof.sum())
    blocks, obs = [], []
    for s in range(n_samples):
        depth = 2500 * rng.uniform(0.7, 1.4)
        lab = rng.integers(0, 6, n_cells)
        p = np.array(types)[lab]
        lib = depth * rng.lognormal(0, 0.3, (n_cells, 1))
        mu = p * lib
        blocks.append(sp.csr_matrix(rng.negative_binomial(5, 5 / (5 + mu)).astype(np.float32)))
        obs.append(
            pd.DataFrame(
                {
                    "sample": f"S{s}",
                    "donor": f"D{s // 2}",
                    "timepoint": ["baseline", "acute"][s % 2],
                    "cell_type": lab,
                },
                index=[f"S{s}:c{i}" for i in range(n_cells)],
            )
        )
    x = sp.vstack(blocks).tocsr()
    o = pd.concat(obs)
    o["sample"] = pd.Categorical(o["sample"])
    o["donor"] = pd.Categorical(o["donor"])
    o["timepoint"] = pd.Categorical(
        o["timepoint"], categories=["baseline", "acute", "longterm"], ordered=True
    )
    a = ad.AnnData(x, obs=o, var=pd.DataFrame(index=genes))
    a.layers["counts"] = a.X
    return a


@pytest.fixture(scope="module")
def data():
    return _cohort()


def _cfg(backend: str, **pp):
    return load_config(
        None,
        {
            "backend": backend,
            "qc": {"doublets": "none", "min_genes": None},
            "preprocess": {"n_top_genes": 300, "n_comps": 20, **pp},
        },
    )


def _run(a: ad.AnnData, backend: str, device: str = "cpu", **pp):
    cfg = _cfg(backend, **pp)
    dev = torch.device(device)
    units = [
        qc_sample(a[a.obs["sample"] == s].copy(), cfg, device=dev)
        for s in a.obs["sample"].cat.categories
    ]
    qc = merge_qc(units, cfg).adata
    return run_preprocess(a, qc, cfg, device=dev), qc


@pytest.fixture(scope="module")
def scanpy_result(data):
    return _run(data, "scanpy")


def test_outputs_follow_scverse_conventions(data, scanpy_result):
    res, qc = scanpy_result
    out = res.adata
    assert sp.issparse(out.X) and out.X.dtype == np.float32
    assert sp.issparse(out.layers["counts"])
    assert out.n_obs == int(qc.obs["qc_pass"].sum())
    # counts unchanged for kept cells and genes
    src = data[out.obs_names, out.var_names].layers["counts"]
    assert (sp.csr_matrix(src) != out.layers["counts"]).nnz == 0
    # X = log1p(counts / total * 1e4)
    c = out.layers["counts"][:5].toarray()
    np.testing.assert_allclose(
        out.X[:5].toarray(), np.log1p(c / c.sum(1, keepdims=True) * 1e4), rtol=1e-5
    )
    assert out.var["highly_variable"].sum() == 300
    assert {
        "highly_variable_rank",
        "means",
        "variances",
        "variances_norm",
        "highly_variable_nbatches",
    } <= set(out.var)
    assert out.obsm["X_pca"].shape == (out.n_obs, 20)
    assert out.varm["PCs"].shape == (out.n_vars, 20)
    assert np.all(out.varm["PCs"][~out.var["highly_variable"].to_numpy()] == 0)
    assert np.all(np.diff(out.uns["pca"]["variance_ratio"]) <= 1e-9)
    assert {"total_counts", "pct_counts_mt", "qc_pass"} <= set(out.obs)
    assert out.uns["log1p"] == {"base": None}  # as scanpy's log1p writes it: natural log
    info = out.uns["immuneage"]["preprocess"]
    assert info["backend"] == "scanpy" and info["n_cells_out"] == out.n_obs
    assert list(res.tables["hvg"]["gene"][:3]) == list(
        out.var.sort_values("highly_variable_rank").index[:3]
    )


def test_forced_genes_join_the_hvgs(data):
    with pytest.warns(ImmuneageWarning, match="NOT_A_GENE"):
        res, _ = _run(data, "scanpy", hvg_include=["G5", "G7", "NOT_A_GENE"])
    var = res.adata.var
    assert var.loc[["G5", "G7"], "highly_variable"].all()
    assert var["hvg_forced"].sum() == len(
        {"G5", "G7"} - set(var.index[var["highly_variable_rank"].notna()])
    )


def _match_pcs(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    return np.array([abs(np.corrcoef(a[:, i], b[:, i])[0, 1]) for i in range(k)])


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_match_scanpy(data, scanpy_result, device):
    ref = scanpy_result[0].adata
    got_res, _ = _run(data, "kernels", device)
    got = got_res.adata
    assert got.uns["immuneage"]["preprocess"]["backend"] == "kernels"
    assert got.uns["log1p"] == ref.uns["log1p"] == {"base": None}
    # same cells and genes, QC metrics equal
    assert list(got.obs_names) == list(ref.obs_names)
    assert list(got.var_names) == list(ref.var_names)
    for col in ("total_counts", "n_genes_by_counts", "pct_counts_mt", "pct_counts_ribo"):
        np.testing.assert_allclose(got.obs[col], ref.obs[col], rtol=1e-6)
    # normalised values within 1e-5 relative
    assert (got.X.indptr == ref.X.indptr).all() and (got.X.indices == ref.X.indices).all()
    np.testing.assert_allclose(got.X.data, ref.X.data, rtol=1e-5, atol=1e-6)
    # HVG sets
    a = set(got.var_names[got.var["highly_variable"]])
    b = set(ref.var_names[ref.var["highly_variable"]])
    assert len(a & b) / len(a | b) >= 0.95
    # top-10 PCs
    if a == b:
        corr = _match_pcs(got.obsm["X_pca"], ref.obsm["X_pca"], 10)
        assert corr.min() >= 0.99, corr
        np.testing.assert_allclose(
            got.uns["pca"]["variance_ratio"][:10], ref.uns["pca"]["variance_ratio"][:10], rtol=1e-3
        )


def test_kernels_pca_matches_scanpy_on_the_same_genes(data, scanpy_result):
    """PCA alone, on exactly scanpy's HVGs (so differences are the solver's only)."""
    from pipeline.stages.preprocess import pca

    ref = scanpy_result[0].adata
    got = ref.copy()
    pca(got, _cfg("kernels").preprocess, 0, "kernels", torch.device("cpu"))
    corr = _match_pcs(got.obsm["X_pca"], ref.obsm["X_pca"], 10)
    assert corr.min() >= 0.99, corr


def test_pca_is_deterministic_for_a_seed(data):
    a, _ = _run(data, "kernels")
    b, _ = _run(data, "kernels")
    np.testing.assert_array_equal(a.adata.obsm["X_pca"], b.adata.obsm["X_pca"])


# --- rare genes stay in the matrix; HVG candidates only ---------------------------------


def _backed_counts(a: ad.AnnData, path) -> ad.AnnData:
    """``a`` with ``layers["counts"]`` opened in place from an h5ad (what backed mode gets)."""
    import h5py

    a.write_h5ad(path)
    f = h5py.File(path, "r")
    on_disk = ad.AnnData(obs=a.obs.copy(), var=a.var.copy())
    on_disk.layers["counts"] = ad.io.sparse_dataset(f["layers"]["counts"])
    return on_disk


@pytest.mark.parametrize("backed", [False, True])
def test_rare_genes_stay_for_scoring_but_are_not_hvg_candidates(data, backed, tmp_path):
    a = data.copy()
    x = a.layers["counts"].tolil()
    x[:, [20, 21, 22]] = 0
    x[5, 20] = 7  # G4: one cell
    x[[5, 400], 21] = 3  # G5: two cells
    a.layers["counts"] = x.tocsr()
    a.X = a.layers["counts"]
    cfg = load_config(
        None,
        {
            "backend": "kernels",
            "backed": backed,
            "chunk_size": 100,
            "qc": {"doublets": "none", "min_genes": None},
            "preprocess": {"n_top_genes": 300, "n_comps": 10},
        },
    )
    units = [qc_sample(a[a.obs["sample"] == s].copy(), cfg) for s in a.obs["sample"].cat.categories]
    qc = merge_qc(units, cfg).adata
    src = _backed_counts(a, tmp_path / "in.h5ad") if backed else a
    out = run_preprocess(src, qc, cfg).adata
    var = out.var
    assert "G4" in var.index and "G5" in var.index  # detected in 1 and 2 kept cells
    assert "G6" not in var.index  # detected in none: removed
    assert var.loc["G4", "n_cells_by_counts"] == 1 and var.loc["G5", "n_cells_by_counts"] == 2
    assert not var.loc[["G4", "G5"], ["hvg_candidate", "highly_variable"]].to_numpy().any()
    assert var.loc[["G4", "G5"], "highly_variable_rank"].isna().all()
    assert (var["hvg_candidate"] == (var["n_cells_by_counts"] >= 3)).all()
    assert not (var["highly_variable"] & ~var["hvg_candidate"]).any()
    assert var["highly_variable"].sum() == 300
    assert out.uns["log1p"] == {"base": None}  # on disk too (X is a lazy log1p)
    info = out.uns["immuneage"]
    assert info["preprocess"]["n_genes_out"] == out.n_vars == a.n_vars - 1
    assert info["preprocess"]["n_hvg_candidates"] == int(var["hvg_candidate"].sum())
    assert info["hvg"]["n_candidates"] == info["preprocess"]["n_hvg_candidates"]
    if backed:  # the same genes and HVGs as in memory
        mem_cfg = cfg.model_copy(update={"backed": False})
        ref = run_preprocess(a, qc, mem_cfg).adata
        assert list(ref.var_names) == list(out.var_names)
        assert (ref.var["highly_variable"] == var["highly_variable"]).all()


# --- LOESS failures never stop HVG selection -----------------------------------------------


def _small_real_design() -> ad.AnnData:
    """CellTypist's real counts, 1 donor x 3 timepoints x 40 cells: skmisc's LOESS fails."""
    from pipeline.datasets.real import celltypist_sample_counts, pseudo_cohort

    ps = pseudo_cohort(celltypist_sample_counts(), donors=1, cells_per_sample=40, seed=0)
    a = ad.concat([p.adata for p in ps], label="sample", keys=[p.sample for p in ps])
    a.obs_names_make_unique()
    n_cells = np.asarray((a.X > 0).sum(0)).ravel()
    a = a[:, n_cells > 0].copy()
    a.layers["counts"] = a.X
    a.var["hvg_candidate"] = n_cells[n_cells > 0] >= 3
    return a


@contextlib.contextmanager
def _log_lines(level: int = logging.INFO) -> Iterator[list[str]]:
    """Messages the ``immuneage`` logger emits at ``level`` or above (whatever its propagation)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    log = logging.getLogger("immuneage")
    handler, old = Keep(level), log.level
    log.addHandler(handler)
    log.setLevel(min(level, old) if old else level)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(old)


def _hvg(a: ad.AnnData, backend: str, lines: list[str] | None = None) -> tuple[ad.AnnData, list]:
    from pipeline.stages.preprocess import highly_variable

    b = a.copy()
    with warnings.catch_warnings(record=True) as caught, _log_lines() as logged:
        warnings.simplefilter("always")
        highly_variable(b, load_config(None).preprocess, backend, torch.device("cpu"))
    if lines is not None:
        lines.extend(logged)
    return b, [w for w in caught if issubclass(w.category, ImmuneageWarning)]


def test_loess_failure_on_a_small_real_design_widens_the_span_quietly():
    import scanpy as sc

    a = _small_real_design()
    with pytest.raises(ValueError, match=r"reciprocal condition number|singularities"):
        sc.pp.highly_variable_genes(
            a.copy(), flavor="seurat_v3", layer="counts", n_top_genes=2000, batch_key="sample"
        )
    got = {}
    for backend in ("scanpy", "kernels"):
        lines: list[str] = []
        b, warned = _hvg(a, backend, lines)
        assert warned == []  # a wider span is routine: logged, not warned
        # one summary line for the run, whichever backend (scanpy's own failure is DEBUG)
        said = [m for m in lines if "LOESS" in m]
        assert len(said) == 1, lines
        assert "failed for 3 of 3 batches of 'sample'" in said[0] and "wider span" in said[0]
        assert "trend_fits" in said[0]
        hvg = b.uns["immuneage"]["hvg"]
        assert hvg["fallback"] and set(hvg["trend_fits"]) == set(a.obs["sample"])
        assert all(f.startswith("loess span") for f in hvg["trend_fits"].values())
        assert b.var["highly_variable"].sum() == 2000
        got[backend] = b.var
    assert (got["scanpy"]["highly_variable"] == got["kernels"]["highly_variable"]).all()
    np.testing.assert_allclose(
        got["scanpy"]["variances_norm"], got["kernels"]["variances_norm"], rtol=1e-6
    )


def test_loess_failing_at_every_span_gets_a_quadratic_trend_warned_once(data, monkeypatch):
    import skmisc.loess

    from pipeline.kernels import hvg_seurat_v3
    from pipeline.kernels.hvg import is_loess_error

    class Failing:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            raise ValueError(b"reciprocal condition number  6.1579e-15")

    monkeypatch.setattr(skmisc.loess, "loess", Failing)
    a = data[data.obs["sample"].isin(["S0", "S1"])].copy()
    got = {}
    for backend in ("scanpy", "kernels"):
        b, warned = _hvg(a, backend)
        assert len(warned) == 1 and "quadratic" in str(warned[0].message)
        assert b.uns["immuneage"]["hvg"]["trend_fits"] == {"S0": "quadratic", "S1": "quadratic"}
        got[backend] = b.var
    assert (got["scanpy"]["highly_variable"] == got["kernels"]["highly_variable"]).all()
    # the kernel alone keeps scanpy's behaviour unless asked to fall back
    with pytest.raises(ValueError, match="reciprocal") as err:
        hvg_seurat_v3(a.layers["counts"], n_top_genes=100, device="cpu")
    assert is_loess_error(err.value)
    assert not is_loess_error(ValueError("n_top_genes must be a positive number of genes"))


def test_hvg_fallback_is_one_summary_warned_only_when_the_quadratic_dominates():
    from pipeline.stages.preprocess import _report_fits

    def report(fits: dict[str, str], batch_key: str | None = "sample"):
        with warnings.catch_warnings(record=True) as caught, _log_lines() as lines:
            warnings.simplefilter("always")
            _report_fits(fits, 0.3, batch_key)
        return [str(w.message) for w in caught], [m for m in lines if "LOESS" in m]

    ok = {f"S{i:02d}": "loess span 0.3" for i in range(20)}
    assert report(ok) == ([], [])
    # 12 of 20 batches widened, 2 quadratic: one INFO line, counts per span, a few names
    fits = ok | {f"S{i:02d}": "loess span 0.5" for i in range(10)}
    fits |= {
        "S10": "loess span 0.9",
        "S11": "loess span 0.9",
        "S12": "quadratic",
        "S13": "quadratic",
    }
    warned, lines = report(fits)
    assert warned == [] and len(lines) == 1
    line = lines[0]
    assert "failed for 14 of 20 batches of 'sample'" in line
    assert "0.5: 10 batches, 0.9: 2 batches" in line and "quadratic trend for 2" in line
    assert "S00, S01" in line and "S13" not in line and "..." in line  # names capped
    # the quadratic for half of the batches or more: one warning naming them, no INFO line
    fits = ok | {f"S{i:02d}": "quadratic" for i in range(10)}
    warned, lines = report(fits)
    assert lines == [] and len(warned) == 1
    assert "10 of 20 batches of 'sample'" in warned[0] and "hvg_batch_key" in warned[0]
    warned, _ = report({"all cells": "quadratic"}, None)
    assert len(warned) == 1 and "single batch" in warned[0] and "hvg_batch_key" not in warned[0]
    warned, lines = report({"all cells": "loess span 0.7"}, None)
    assert warned == [] and len(lines) == 1 and "0.7: 1 batch)" in lines[0]
