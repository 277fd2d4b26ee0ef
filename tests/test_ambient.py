"""Ambient RNA correction on real PBMC counts with planted contamination.

The cells are scanpy's 700 pbmc68k PBMCs (real integer counts, 765 genes) plus
five ambient-only genes (PPBP, PF4, HBB, HBA1, HBA2: no native counts). Each
cell gets contamination drawn from a known ambient profile (80% the cells'
mean profile, as lysed cells give; 20% platelet and red-cell transcripts) at a
per-cell fraction around 15%. The raw droplet matrix is those cells plus 3,000
empty droplets drawn from the same profile (median 30 counts), written as a
Cell Ranger v3 ``raw_feature_bc_matrix.h5``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from pipeline import keys
from pipeline.ambient import (
    AMBIENT_FRACTION,
    COUNTS_UNCORRECTED,
    quick_clusters,
    read_raw_droplets,
    remove_ambient,
    round_preserving_total,
    run_ambient,
)
from pipeline.config import AmbientConfig, load_config
from pipeline.datasets.real import gene_ids, pbmc68k_counts
from pipeline.errors import ConfigError, DataFileError
from pipeline.io.write10x import write_10x_h5

AMBIENT_ONLY = ["PPBP", "PF4", "HBB", "HBA1", "HBA2"]
MYELOID = ["LYZ", "S100A8", "S100A9", "FCER1G", "CST3"]
PLANTED = 0.15


def _planted(seed: int = 0, n_empty: int = 3000) -> tuple[AnnData, AnnData, np.ndarray]:
    rng = np.random.default_rng(seed)
    src = pbmc68k_counts()
    n = src.n_obs
    genes = [*src.var_names.astype(str), *AMBIENT_ONLY]
    native = sp.hstack([src.X, sp.csr_matrix((n, len(AMBIENT_ONLY)))]).tocsr().astype(np.float64)
    profile = np.asarray(native.sum(axis=0)).ravel()
    profile /= profile.sum()
    blood = np.zeros(len(genes))
    blood[-5:] = [0.4, 0.2, 0.25, 0.1, 0.05]
    soup = 0.8 * profile + 0.2 * blood
    n_native = np.asarray(native.sum(axis=1)).ravel()
    rho = np.clip(rng.beta(8, 8 * (1 - PLANTED) / PLANTED, size=n), 0.01, 0.6)
    n_soup = np.rint(n_native * rho / (1 - rho)).astype(np.int64)
    soup_counts = sp.csr_matrix(np.vstack([rng.multinomial(k, soup) for k in n_soup]))
    observed = (native + soup_counts).tocsr().astype(np.float32)
    totals = np.clip(np.rint(np.exp(rng.normal(np.log(30), 0.8, n_empty))), 1, 300)
    empties = sp.csr_matrix(np.vstack([rng.multinomial(int(k), soup) for k in totals]))
    barcodes = [f"CELL{i:05d}-1" for i in range(n)]
    var = pd.DataFrame({keys.GENE_IDS: gene_ids(genes)}, index=pd.Index(genes))
    obs = pd.DataFrame(
        {
            keys.BARCODE: barcodes,
            "bulk_labels": src.obs["bulk_labels"].to_numpy(),
            "true_fraction": n_soup / (n_native + n_soup),
        },
        index=pd.Index([f"S1:{b}" for b in barcodes]),
    )
    cells = AnnData(X=observed, obs=obs, var=var)
    cells.layers[keys.COUNTS] = cells.X
    cells.uns[keys.UNS] = {"ingest": {"sample": "S1"}}
    raw = AnnData(
        X=sp.vstack([observed, empties.astype(np.float32)]).tocsr(),
        obs=pd.DataFrame(index=[*barcodes, *(f"EMPTY{i:05d}-1" for i in range(n_empty))]),
        var=var.copy(),
    )
    return cells, raw, native.astype(np.float32)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[AnnData, str, np.ndarray]:
    cells, raw, native = _planted()
    path = tmp_path_factory.mktemp("outs") / "raw_feature_bc_matrix.h5"
    write_10x_h5(raw, path)
    cells.obs["cluster"] = quick_clusters(cells.layers[keys.COUNTS], seed=0)
    return cells, str(path), native


def _weighted_truth(adata: AnnData) -> float:
    totals = np.asarray(adata.layers[COUNTS_UNCORRECTED].sum(axis=1)).ravel()
    return float((adata.obs["true_fraction"] * totals).sum() / totals.sum())


def _check_counts(adata: AnnData, original: sp.csr_matrix) -> None:
    corrected = adata.layers[keys.COUNTS]
    assert sp.issparse(corrected) and corrected.dtype == np.float32
    assert adata.X is corrected
    assert np.array_equal(corrected.data, np.rint(corrected.data))
    assert corrected.data.min() >= 0
    diff = (original - corrected).tocsr()
    assert diff.nnz == 0 or diff.data.min() >= 0  # never above the original
    kept = adata.layers[COUNTS_UNCORRECTED]
    assert (kept != original).nnz == 0


def _myeloid_in_lymphocytes(adata: AnnData, x: sp.csr_matrix) -> float:
    lymph = adata.obs["bulk_labels"].str.startswith(("CD4+", "CD8+", "CD56+")).to_numpy()
    cols = adata.var_names.get_indexer(MYELOID)
    return float(x[lymph][:, cols].sum())


def test_decontx_with_raw_matrix(planted: tuple[AnnData, str, np.ndarray]) -> None:
    cells, path, native = planted
    adata = cells.copy()
    original = adata.layers[keys.COUNTS].copy()
    record = remove_ambient(adata, method="decontx", raw=path, clusters="cluster", seed=0)

    truth = _weighted_truth(adata)
    assert record["raw_matrix_used"] and record["raw_matrix"] == path
    assert 2700 < record["n_empty_droplets"] < 3000  # droplets of 1-100 counts
    assert abs(record["fraction_global"] - truth) < 0.04
    assert abs(record["fraction_removed"] - record["fraction_global"]) < 0.01
    per_cell = adata.obs[AMBIENT_FRACTION].to_numpy()
    assert np.corrcoef(per_cell, adata.obs["true_fraction"])[0, 1] > 0.5
    _check_counts(adata, original)
    # ambient-only genes: nearly all planted counts removed
    cols = adata.var_names.get_indexer(AMBIENT_ONLY)
    assert adata.layers[keys.COUNTS][:, cols].sum() < 0.05 * original[:, cols].sum()
    # myeloid markers in lymphocytes: most of the planted excess removed
    before = _myeloid_in_lymphocytes(adata, original)
    clean = _myeloid_in_lymphocytes(adata, sp.csr_matrix(native))
    after = _myeloid_in_lymphocytes(adata, adata.layers[keys.COUNTS])
    assert after < clean + 0.3 * (before - clean)
    assert adata.uns[keys.UNS]["ambient"] is record
    assert adata.uns[keys.UNS]["ingest"] == {"sample": "S1"}
    assert record["package"] == "decontx-scanpy" and record["version"] != "unknown"


def test_decontx_filtered_matrix_only(planted: tuple[AnnData, str, np.ndarray]) -> None:
    cells, _, native = planted
    adata = cells.copy()
    original = adata.layers[keys.COUNTS].copy()
    record = remove_ambient(adata, method="decontx", seed=0)  # clusters computed here

    assert not record["raw_matrix_used"] and record["n_empty_droplets"] == 0
    assert record["clusters"] == "quick_clusters" and record["n_clusters"] >= 2
    truth = _weighted_truth(adata)
    # without empty droplets DecontX also counts shared genes as ambient: it errs high
    assert truth - 0.03 < record["fraction_global"] < truth + 0.08
    _check_counts(adata, original)
    before = _myeloid_in_lymphocytes(adata, original)
    clean = _myeloid_in_lymphocytes(adata, sp.csr_matrix(native))
    assert _myeloid_in_lymphocytes(adata, adata.layers[keys.COUNTS]) < clean + 0.3 * (
        before - clean
    )


def test_soupx_without_raw_matrix_names_the_fix(planted: tuple[AnnData, str, np.ndarray]) -> None:
    adata = planted[0].copy()
    with pytest.raises(DataFileError, match=r"outs/.*decontx"):
        remove_ambient(adata, method="soupx", raw=None)
    assert COUNTS_UNCORRECTED not in adata.layers


def test_soupx_with_raw_matrix(planted: tuple[AnnData, str, np.ndarray]) -> None:
    pytest.importorskip("soupx", reason="soupx-python (GPL-2.0) is an optional extra")
    cells, path, _ = planted
    adata = cells.copy()
    original = adata.layers[keys.COUNTS].copy()
    record = remove_ambient(adata, method="soupx", raw=path, clusters="cluster", seed=0)
    assert record["package"] == "soupx-python"
    # SoupX's marker-based estimate is coarse on 765 genes: same order as the truth
    assert 0.05 < record["fraction_global"] < 0.3
    _check_counts(adata, original)


def test_raw_matrix_of_another_library(
    planted: tuple[AnnData, str, np.ndarray], tmp_path: pytest.TempPathFactory
) -> None:
    cells, _, _ = planted
    other = AnnData(
        X=sp.csr_matrix(np.ones((200, 50), dtype=np.float32)),
        obs=pd.DataFrame(index=[f"B{i}-1" for i in range(200)]),
        var=pd.DataFrame(index=[f"OTHER{i}" for i in range(50)]),
    )
    path = write_10x_h5(other, tmp_path / "raw.h5")
    with pytest.raises(DataFileError, match="another library"):
        read_raw_droplets(path, cells)
    with pytest.raises(DataFileError, match="does not exist"):
        read_raw_droplets(tmp_path / "missing.h5", cells)


def test_read_raw_droplets_aligns_genes(planted: tuple[AnnData, str, np.ndarray]) -> None:
    cells, path, _ = planted
    shuffled = cells[:, ::-1].copy()
    raw = read_raw_droplets(path, shuffled)
    assert list(raw.var_names) == list(shuffled.var_names)
    assert raw.n_obs == cells.n_obs + 3000
    first = raw[cells.obs[keys.BARCODE].iloc[0]].X.toarray().ravel()
    assert np.array_equal(first, shuffled.layers[keys.COUNTS][0].toarray().ravel())


def test_round_preserving_total() -> None:
    rng = np.random.default_rng(1)
    upper = sp.random(300, 80, density=0.2, format="csr", random_state=2)
    upper.data = rng.integers(1, 20, upper.nnz).astype(np.float64)
    x = upper.copy()
    x.data = x.data * rng.uniform(0, 1, x.nnz)
    out = round_preserving_total(x, upper=upper)
    assert np.array_equal(out.data, np.rint(out.data)) and out.data.min() > 0
    assert ((upper - out).tocsr().data >= 0).all()
    rows_x = np.asarray(x.sum(axis=1)).ravel()
    rows_out = np.asarray(out.sum(axis=1)).ravel()
    assert np.abs(rows_out - rows_x).max() <= 0.5 + 1e-9


def test_run_ambient_reads_the_recorded_raw_path(
    planted: tuple[AnnData, str, np.ndarray],
) -> None:
    cells, path, _ = planted
    assert run_ambient(cells.copy(), AmbientConfig()) is None  # method none: untouched
    adata = cells.copy()
    adata.uns[keys.UNS]["read"] = {"raw_matrix": path}
    with pytest.raises(DataFileError, match="too few"):
        run_ambient(adata[:10].copy(), AmbientConfig(method="decontx"))
    no_raw = AmbientConfig(method="soupx", use_raw=False)
    with pytest.raises(DataFileError, match="needs the raw droplet matrix"):
        run_ambient(adata, no_raw)


def test_config_section() -> None:
    cfg = load_config(None, {"ambient": {"method": "decontx", "empty_max_counts": 50}})
    assert cfg.ambient.method == "decontx" and cfg.ambient.empty_max_counts == 50
    assert load_config().ambient.method == "none"
    with pytest.raises(ConfigError, match=r"ambient\.method"):
        load_config(None, {"ambient": {"method": "cellbender"}})
    with pytest.raises(ConfigError, match="allowed keys here"):
        load_config(None, {"ambient": {"rho": 0.1}})
