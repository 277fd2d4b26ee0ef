"""Parity of the torch kernels with scanpy, on every available device.

The ``device`` fixture always includes the CPU and adds CUDA when it is usable, so
the same tests check the GPU path on a GPU node. References are computed with real
scanpy on copies of the same matrix.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import torch
from scipy import sparse

from pipeline.errors import InputError
from pipeline.kernels import (
    hvg_seurat_v3,
    log1p,
    normalize_log1p,
    normalize_total,
    pca_sparse,
    qc_metrics,
    resolve_device,
    to_scipy_csr,
)
from pipeline.kernels import sparse as ksparse

N_CELLS, N_GENES, N_TOP = 1500, 800, 200

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
    ),
]


def make_counts(n_cells: int = N_CELLS, n_genes: int = N_GENES, seed: int = 0):
    """Negative-binomial counts with 4 cell groups, 3 batches and MT/RP/HB genes."""
    rng = np.random.default_rng(seed)
    names = (
        [f"MT-GENE{i}" for i in range(13)]
        + [f"RPL{i}" for i in range(20)]
        + [f"RPS{i}" for i in range(20)]
        + ["HBA1", "HBA2", "HBB"]
    )
    names += [f"GENE{i}" for i in range(n_genes - len(names))]
    base = rng.lognormal(mean=-2.0, sigma=1.5, size=n_genes)
    base[:13] *= 8  # mitochondrial
    base[13:53] *= 10  # ribosomal
    groups = rng.integers(0, 4, n_cells)
    batch = rng.integers(0, 3, n_cells)
    fold = np.ones((4, n_genes))
    de = rng.choice(n_genes, 150, replace=False)
    fold[:, de] = rng.lognormal(0.0, 1.2, size=(4, de.size))
    batch_effect = rng.lognormal(0.0, 0.25, size=(3, n_genes))
    size_factor = rng.lognormal(0.0, 0.5, n_cells)
    mu = size_factor[:, None] * base[None, :] * fold[groups] * batch_effect[batch]
    r = 2.0
    counts = rng.negative_binomial(r, r / (r + mu)).astype(np.float32)
    return sparse.csr_matrix(counts), np.array(names), np.array(["b0", "b1", "b2"])[batch]


@pytest.fixture(scope="module")
def data():
    x, names, batch = make_counts()
    masks = {
        "mt": np.char.startswith(names, "MT-"),
        "ribo": np.char.startswith(names, "RPL") | np.char.startswith(names, "RPS"),
        "hb": np.isin(names, ["HBA1", "HBA2", "HBB"]),
    }
    return x, names, batch, masks


@pytest.fixture(scope="module")
def adata(data):
    x, names, batch, masks = data
    a = ad.AnnData(x.copy())
    a.var_names = names
    a.obs["batch"] = batch
    for name, mask in masks.items():
        a.var[name] = mask
    return a


@pytest.fixture(scope="module")
def lognorm_hvg(data):
    """log1p(normalize_total(x, 1e4)) on 400 HVGs: the matrix PCA sees in the pipeline."""
    x = data[0]
    a = ad.AnnData(x.copy())
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    keep = sc.pp.highly_variable_genes(
        ad.AnnData(x.copy()), flavor="seurat_v3", n_top_genes=400, inplace=False
    )["highly_variable"].to_numpy()
    return sparse.csr_matrix(a.X[:, keep])


@pytest.fixture(scope="module")
def pca_ref(lognorm_hvg):
    a = ad.AnnData(lognorm_hvg.copy())
    sc.pp.pca(a, n_comps=30, svd_solver="arpack")
    return a


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


# --------------------------------------------------------------------------- device


def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_resolve_device_gpu_without_cuda_raises():
    with pytest.raises(InputError, match="no usable CUDA device"):
        resolve_device("gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_resolve_device_gpu_with_cuda():
    assert resolve_device("gpu").type == "cuda"


def test_resolve_device_rejects_unknown_choice():
    with pytest.raises(InputError, match="device must be one of"):
        resolve_device("tpu")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- sparse helpers


def test_sparse_helpers_match_scipy(data, device):
    x = data[0]
    t = ksparse.csr_to_torch(x, device=device)
    assert t.layout == torch.sparse_csr
    assert t.device.type == device.type
    back = to_scipy_csr(t)
    assert (back != x).nnz == 0
    np.testing.assert_allclose(ksparse.row_sums(t).cpu().numpy(), x.sum(1).A1, rtol=1e-12)
    np.testing.assert_allclose(ksparse.col_sums(t).cpu().numpy(), x.sum(0).A1, rtol=1e-12)
    np.testing.assert_array_equal(ksparse.row_nnz(t).cpu().numpy(), x.getnnz(axis=1))
    np.testing.assert_array_equal(ksparse.col_nnz(t).cpu().numpy(), x.getnnz(axis=0))
    factors = torch.linspace(0.5, 2.0, x.shape[0], device=device)
    scaled = to_scipy_csr(ksparse.scale_rows(t, factors))
    expected = sparse.diags(factors.cpu().numpy()) @ x
    np.testing.assert_allclose(scaled.toarray(), expected.toarray(), rtol=1e-6)
    dense = torch.randn(x.shape[1], 5, generator=torch.Generator().manual_seed(0))
    prod = ksparse.spmm(t, dense.to(device)).cpu().numpy()
    np.testing.assert_allclose(prod, x @ dense.numpy(), rtol=1e-4, atol=1e-3)
    blocks = list(ksparse.iter_row_chunks(x, device=device, chunk_size=400))
    assert [(a, b) for a, b, _ in blocks] == [(0, 400), (400, 800), (800, 1200), (1200, 1500)]
    stacked = sparse.vstack([to_scipy_csr(b) for _, _, b in blocks])
    assert (stacked != x).nnz == 0


def test_explicit_zeros_are_not_counted():
    x = sparse.csr_matrix(
        (np.array([1.0, 0.0, 2.0, 0.0], np.float32), np.array([0, 1, 1, 2]), np.array([0, 2, 4])),
        shape=(2, 3),
    )
    assert x.nnz == 4  # two explicit zeros
    t = ksparse.csr_to_torch(x, device="cpu")
    np.testing.assert_array_equal(ksparse.row_nnz(t).numpy(), [1, 1])
    np.testing.assert_array_equal(ksparse.col_nnz(t).numpy(), [1, 1, 0])
    got = qc_metrics(x, gene_masks={}, device="cpu")
    np.testing.assert_array_equal(got.obs["n_genes_by_counts"], [1, 1])
    np.testing.assert_array_equal(got.var["n_cells_by_counts"], [1, 1, 0])


def test_dense_input_is_refused(data):
    with pytest.raises(TypeError, match=r"scipy\.sparse"):
        normalize_total(data[0].toarray(), target_sum=1e4, device=torch.device("cpu"))


# --------------------------------------------------------------------------- QC


def test_qc_metrics_match_scanpy(data, adata, device):
    x, _, _, masks = data
    obs_ref, var_ref = sc.pp.calculate_qc_metrics(
        adata, qc_vars=list(masks), percent_top=None, log1p=False
    )
    got = qc_metrics(x, gene_masks=masks, device=device)
    for key in ["total_counts", "n_genes_by_counts"] + [
        f"{stem}_{m}" for m in masks for stem in ("pct_counts", "total_counts")
    ]:
        np.testing.assert_allclose(got.obs[key], obs_ref[key].to_numpy(), rtol=1e-5, err_msg=key)
    for key in ["n_cells_by_counts", "total_counts", "mean_counts", "pct_dropout_by_counts"]:
        np.testing.assert_allclose(got.var[key], var_ref[key].to_numpy(), rtol=1e-5, err_msg=key)


def test_qc_metrics_rejects_bad_mask(data):
    with pytest.raises(ValueError, match="boolean array of length 800"):
        qc_metrics(data[0], gene_masks={"mt": np.zeros(5, bool)}, device=torch.device("cpu"))


# --------------------------------------------------------------------------- normalise


@pytest.mark.parametrize("target_sum", [None, 1e4])
def test_normalize_total_and_log1p_match_scanpy(data, adata, device, target_sum):
    x = data[0]
    ref = adata.copy()
    sc.pp.normalize_total(ref, target_sum=target_sum)
    got = normalize_total(x, target_sum=target_sum, device=device)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.indptr, x.indptr)
    np.testing.assert_array_equal(got.indices, x.indices)
    np.testing.assert_allclose(got.data, ref.X.data, rtol=1e-5, atol=1e-6)

    sc.pp.log1p(ref)
    fused = normalize_log1p(x, target_sum=target_sum, device=device)
    np.testing.assert_allclose(fused.data, ref.X.data, rtol=1e-5, atol=1e-6)
    two_step = log1p(got, device=device)
    np.testing.assert_allclose(two_step.data, ref.X.data, rtol=1e-5, atol=1e-6)
    assert x.data.dtype == np.float32  # input untouched
    np.testing.assert_array_equal(x.data, adata.X.data)


def test_normalize_zero_count_cells_stay_zero():
    x = sparse.csr_matrix(np.array([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]], dtype=np.float32))
    with pytest.warns(UserWarning, match="1 cells have zero counts"):
        got = normalize_total(x, target_sum=None, device=torch.device("cpu"))
    # median over the non-zero totals (4, 4) = 4
    np.testing.assert_allclose(got.toarray(), [[1, 3], [0, 0], [2, 2]])


# --------------------------------------------------------------------------- HVG


@pytest.mark.parametrize("batched", [False, True], ids=["one-batch", "3-batches"])
def test_hvg_seurat_v3_matches_scanpy(data, adata, device, batched):
    x, names, batch, _ = data
    ref = sc.pp.highly_variable_genes(
        adata,
        flavor="seurat_v3",
        n_top_genes=N_TOP,
        batch_key="batch" if batched else None,
        inplace=False,
    )
    got = hvg_seurat_v3(
        x, n_top_genes=N_TOP, batch=batch if batched else None, device=device, gene_names=names
    )
    assert got["highly_variable"].sum() == N_TOP
    assert set(got.index[got["highly_variable"]]) == set(ref.index[ref["highly_variable"]])
    np.testing.assert_allclose(got["variances_norm"], ref["variances_norm"], rtol=1e-4)
    np.testing.assert_allclose(got["means"], ref["means"], rtol=1e-10)
    np.testing.assert_allclose(got["variances"], ref["variances"], rtol=1e-10)
    np.testing.assert_array_equal(got["highly_variable_rank"], ref["highly_variable_rank"])
    expected_cols = {"highly_variable", "highly_variable_rank", "means", "variances"}
    expected_cols |= {"variances_norm"} | ({"highly_variable_nbatches"} if batched else set())
    assert set(got.columns) == expected_cols
    if batched:
        np.testing.assert_array_equal(
            got["highly_variable_nbatches"], ref["highly_variable_nbatches"]
        )


def test_kernels_are_independent_of_chunk_size(data):
    x, _, batch, masks = data
    cpu = torch.device("cpu")
    a = qc_metrics(x, gene_masks=masks, device=cpu)
    b = qc_metrics(x, gene_masks=masks, device=cpu, chunk_size=97)
    for key in a.obs:
        np.testing.assert_allclose(a.obs[key], b.obs[key], rtol=1e-12)
    n1 = normalize_log1p(x, target_sum=None, device=cpu)
    n2 = normalize_log1p(x, target_sum=None, device=cpu, chunk_size=97)
    np.testing.assert_array_equal(n1.data, n2.data)
    h1 = hvg_seurat_v3(x, n_top_genes=N_TOP, batch=batch, device=cpu)
    h2 = hvg_seurat_v3(x, n_top_genes=N_TOP, batch=batch, device=cpu, chunk_size=97)
    np.testing.assert_array_equal(h1["highly_variable"], h2["highly_variable"])
    np.testing.assert_allclose(h1["variances_norm"], h2["variances_norm"], rtol=1e-12)


# --------------------------------------------------------------------------- PCA


@pytest.mark.parametrize("method", ["randomized", "lobpcg"])
def test_pca_matches_arpack(lognorm_hvg, pca_ref, device, method):
    res = pca_sparse(lognorm_hvg, n_comps=30, seed=0, device=device, method=method)
    assert res.x_pca.shape == (N_CELLS, 30)
    assert res.components.shape == (30, lognorm_hvg.shape[1])
    ref_ratio = pca_ref.uns["pca"]["variance_ratio"]
    ref_var = pca_ref.uns["pca"]["variance"]
    np.testing.assert_allclose(res.variance_ratio[:20], ref_ratio[:20], rtol=1e-3)
    np.testing.assert_allclose(res.variance[:20], ref_var[:20], rtol=1e-3)
    ref_comp = pca_ref.varm["PCs"].T
    cos = np.sum(res.components * ref_comp, axis=1)
    assert np.all(np.abs(cos[:10]) > 0.999), cos[:10]
    # Embedding equal up to the sign of each component.
    signs = np.sign(cos[:10])
    ref_x = pca_ref.obsm["X_pca"][:, :10]
    scale = np.abs(ref_x).max(axis=0)
    err = np.abs(res.x_pca[:, :10] * signs - ref_x).max(axis=0) / scale
    assert np.all(err < 1e-2), err
    # Deterministic signs: the largest-magnitude loading of every component is positive.
    top = res.components[np.arange(30), np.abs(res.components).argmax(axis=1)]
    assert np.all(top > 0)
    # Orthonormal loadings and x_pca = A V.
    np.testing.assert_allclose(res.components @ res.components.T, np.eye(30), atol=1e-4)
    centred_proj = lognorm_hvg @ res.components.T - (
        np.asarray(lognorm_hvg.mean(0)) @ res.components.T
    )
    np.testing.assert_allclose(res.x_pca, centred_proj, atol=1e-3 * np.abs(centred_proj).max())


def test_pca_uncentred_matches_truncated_svd(lognorm_hvg):
    a = ad.AnnData(lognorm_hvg.copy())
    sc.pp.pca(a, n_comps=20, svd_solver="arpack", zero_center=False)
    res = pca_sparse(lognorm_hvg, n_comps=20, seed=0, device=torch.device("cpu"), zero_center=False)
    np.testing.assert_allclose(
        res.variance_ratio[:15], a.uns["pca"]["variance_ratio"][:15], rtol=1e-3
    )
    cos = np.abs(np.sum(res.components * a.varm["PCs"].T, axis=1))
    assert np.all(cos[:10] > 0.999), cos[:10]


def test_pca_is_seeded(lognorm_hvg):
    cpu = torch.device("cpu")
    a = pca_sparse(lognorm_hvg, n_comps=10, seed=3, device=cpu)
    b = pca_sparse(lognorm_hvg, n_comps=10, seed=3, device=cpu)
    np.testing.assert_array_equal(a.x_pca, b.x_pca)
    np.testing.assert_array_equal(a.components, b.components)
    with pytest.raises(ValueError, match="n_comps"):
        pca_sparse(lognorm_hvg, n_comps=400, seed=0, device=cpu)


# --------------------------------------------------------------------------- devices


def test_explicit_torch_device_and_string_agree(data, lognorm_hvg):
    x, _, batch, masks = data
    explicit = torch.device("cpu")
    q1 = qc_metrics(x, gene_masks=masks, device=explicit)
    q2 = qc_metrics(x, gene_masks=masks, device="cpu")
    np.testing.assert_array_equal(q1.obs["pct_counts_mt"], q2.obs["pct_counts_mt"])
    n1 = normalize_log1p(x, target_sum=1e4, device=explicit)
    n2 = normalize_log1p(x, target_sum=1e4, device="cpu")
    np.testing.assert_array_equal(n1.data, n2.data)
    h = hvg_seurat_v3(x, n_top_genes=N_TOP, batch=batch, device=explicit)
    assert h["highly_variable"].sum() == N_TOP
    p = pca_sparse(lognorm_hvg, n_comps=5, seed=0, device=explicit)
    assert p.x_pca.dtype == np.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu(data, lognorm_hvg):
    x, _, batch, masks = data
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    np.testing.assert_allclose(
        normalize_log1p(x, target_sum=1e4, device=gpu).data,
        normalize_log1p(x, target_sum=1e4, device=cpu).data,
        rtol=1e-6,
        atol=1e-7,
    )
    hg = hvg_seurat_v3(x, n_top_genes=N_TOP, batch=batch, device=gpu)
    hc = hvg_seurat_v3(x, n_top_genes=N_TOP, batch=batch, device=cpu)
    np.testing.assert_array_equal(hg["highly_variable"], hc["highly_variable"])
    pg = pca_sparse(lognorm_hvg, n_comps=10, seed=0, device=gpu)
    pc = pca_sparse(lognorm_hvg, n_comps=10, seed=0, device=cpu)
    np.testing.assert_allclose(pg.variance_ratio, pc.variance_ratio, rtol=1e-3)
    q = qc_metrics(x, gene_masks=masks, device=gpu)
    assert q.obs["total_counts"].shape == (N_CELLS,)


# --------------------------------------------------------------------------- memory

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, warnings
    import numpy as np, torch
    from scipy import sparse
    from pipeline.kernels import hvg_seurat_v3, normalize_log1p, pca_sparse, qc_metrics

    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    n_cells, n_genes, density = 20_000, 30_000, 0.01
    rng = np.random.default_rng(0)
    nnz = int(n_cells * n_genes * density)
    rows = np.sort(rng.integers(0, n_cells, nnz))
    cols = rng.integers(0, n_genes, nnz)
    vals = rng.integers(1, 6, nnz).astype(np.float32)
    x = sparse.csr_matrix((vals, (rows, cols)), shape=(n_cells, n_genes))
    x.sum_duplicates()
    del rows, cols, vals
    batch = rng.integers(0, 2, n_cells)
    masks = {"mt": np.arange(n_genes) < 13}

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    from pipeline.provenance import ResourceMeter

    base = rss_mb()
    # sampled peak during the kernels only (the lifetime high-water mark would include
    # building x above)
    with ResourceMeter(interval=0.005) as meter:
        qc_metrics(x, gene_masks=masks, device="cpu", chunk_size=5_000)
        lx = normalize_log1p(x, target_sum=1e4, device="cpu", chunk_size=5_000)
        hvg_seurat_v3(x, n_top_genes=2_000, batch=batch, device="cpu", chunk_size=5_000)
        pca_sparse(lx, n_comps=20, seed=0, device="cpu", n_iter=5)
    peak = meter.peak_rss_mb
    print(f"{peak - base:.1f}")
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_kernels_do_not_densify():
    """On 20,000 x 30,000 at 1 % (dense float32: 2.4 GB) the peak RSS grows by under half of
    one dense copy (typically ~250 MB: the CSR input is 48 MB, its transforms a few copies)."""
    dense_mb = 20_000 * 30_000 * 4 / 2**20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
    growth_mb = float(out.stdout.strip().splitlines()[-1])
    assert growth_mb < dense_mb / 2, (
        f"peak RSS grew by {growth_mb:.0f} MB (dense: {dense_mb:.0f} MB)"
    )
