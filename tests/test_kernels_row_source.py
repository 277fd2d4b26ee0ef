"""The kernels on row sources (on-disk h5ad matrices read in blocks) equal the in-memory kernels.

A seeded count matrix is written to a real h5ad file and opened in place with
``anndata.io.sparse_dataset`` (what stages receive in ``backed`` mode). Every kernel
that takes a row source is run on it with a ``chunk_size`` much smaller than the
number of cells, and compared with the same kernel on the in-memory matrix. A
recording wrapper checks that no kernel ever asks the source for more than
``chunk_size`` rows at once.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import numpy as np
import pytest
import torch
from scipy import sparse

from pipeline.kernels import hvg_seurat_v3, log1p, normalize_log1p, normalize_total, pca_sparse
from pipeline.kernels import qc_metrics as qc_kernel
from pipeline.kernels.normalize import cell_totals
from pipeline.kernels.scoring import gene_means, weighted_scores
from pipeline.kernels.sparse import is_row_source

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

N_CELLS, N_GENES, N_TOP = 2000, 300, 60
#: Rows per block on the row source: three blocks, the last one partial.
CHUNK = 750
CPU = torch.device("cpu")
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
    ),
]


def _counts(seed: int = 0) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Negative-binomial counts (3 cell groups, 2 batches, some empty genes) and batches."""
    rng = np.random.default_rng(seed)
    base = rng.lognormal(mean=-1.5, sigma=1.3, size=N_GENES)
    base[:5] = 0.0  # genes with no counts
    groups = rng.integers(0, 3, N_CELLS)
    fold = np.ones((3, N_GENES))
    de = rng.choice(N_GENES, 60, replace=False)
    fold[:, de] = rng.lognormal(0.0, 1.0, size=(3, de.size))
    size_factor = rng.lognormal(0.0, 0.4, N_CELLS)
    mu = size_factor[:, None] * base[None, :] * fold[groups]
    counts = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(np.float32)
    batch = np.array(["b0", "b1"])[rng.integers(0, 2, N_CELLS)]
    return sparse.csr_matrix(counts), batch


class _Recording:
    """Row source forwarding ``x[a:b]`` to ``source`` and recording each ``(a, b)`` asked."""

    def __init__(self, source: object, *, scramble: bool = False) -> None:
        self.source = source
        self.shape = source.shape
        self.scramble = scramble
        self.requests: list[tuple[int, int]] = []

    def __getitem__(self, rows: slice) -> sparse.csr_matrix:
        start, stop, _ = rows.indices(self.shape[0])
        self.requests.append((start, stop))
        block = sparse.csr_matrix(self.source[rows])
        return _non_canonical(block) if self.scramble else block


def _non_canonical(block: sparse.csr_matrix) -> sparse.csr_matrix:
    """The same matrix with every value split into two duplicates, columns descending per row."""
    coo = block.tocoo()
    rows = np.concatenate([coo.row, coo.row])
    cols = np.concatenate([coo.col, coo.col])
    vals = np.concatenate([coo.data / 2, coo.data / 2]).astype(block.dtype)
    order = np.lexsort((-cols, rows))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=block.shape[0]))])
    out = sparse.csr_matrix((vals[order], cols[order], indptr), shape=block.shape)
    assert not out.has_canonical_format
    return out


@pytest.fixture(scope="module")
def matrices(tmp_path_factory) -> Iterator[dict]:
    """In-memory counts / log-normalised matrices and the same matrices opened on disk."""
    counts, batch = _counts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-count cells, if any
        lognorm = normalize_log1p(counts, target_sum=1e4, device=CPU)
    path = tmp_path_factory.mktemp("backed") / "x.h5ad"
    adata = ad.AnnData(counts.copy(), layers={"lognorm": lognorm.copy()})
    adata.write_h5ad(path)
    with h5py.File(path, "r") as f:
        disk_counts = ad.io.sparse_dataset(f["X"])
        disk_lognorm = ad.io.sparse_dataset(f["layers/lognorm"])
        assert is_row_source(disk_counts)
        assert is_row_source(disk_lognorm)
        yield {
            "counts": counts,
            "lognorm": lognorm,
            "batch": batch,
            "disk_counts": disk_counts,
            "disk_lognorm": disk_lognorm,
        }


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """One CPU thread for these small matrices (restored after the module).

    The kernels' many small block products gain nothing from intra-op threads here,
    and on a busy machine OpenMP threads waiting for a shared core make the file
    several times slower.
    """
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def _masks() -> dict[str, np.ndarray]:
    genes = np.arange(N_GENES)
    return {"mt": genes < 13, "ribo": (genes >= 13) & (genes < 53)}


# --------------------------------------------------------------------------- sums


def test_cell_totals_row_source(matrices, device):
    ref = cell_totals(matrices["counts"], device=device)
    got = cell_totals(matrices["disk_counts"], device=device, chunk_size=CHUNK)
    np.testing.assert_array_equal(got, ref)


def test_qc_metrics_row_source(matrices, device):
    ref = qc_kernel(matrices["counts"], gene_masks=_masks(), device=device)
    got = qc_kernel(matrices["disk_counts"], gene_masks=_masks(), device=device, chunk_size=CHUNK)
    assert set(got.obs) == set(ref.obs)
    assert set(got.var) == set(ref.var)
    for key in ref.obs:
        np.testing.assert_array_equal(got.obs[key], ref.obs[key], err_msg=key)
    for key in ref.var:
        np.testing.assert_array_equal(got.var[key], ref.var[key], err_msg=key)


@pytest.mark.parametrize("batched", [False, True])
def test_hvg_seurat_v3_row_source(matrices, device, batched):
    batch = matrices["batch"] if batched else None
    ref = hvg_seurat_v3(matrices["counts"], n_top_genes=N_TOP, batch=batch, device=device)
    got = hvg_seurat_v3(
        matrices["disk_counts"], n_top_genes=N_TOP, batch=batch, device=device, chunk_size=CHUNK
    )
    assert list(got.columns) == list(ref.columns)
    np.testing.assert_array_equal(got["highly_variable"], ref["highly_variable"])
    np.testing.assert_array_equal(got["highly_variable_rank"], ref["highly_variable_rank"])
    np.testing.assert_array_equal(got["means"], ref["means"])
    np.testing.assert_allclose(got["variances"], ref["variances"], rtol=1e-12)
    np.testing.assert_allclose(got["variances_norm"], ref["variances_norm"], rtol=1e-12)
    if batched:
        np.testing.assert_array_equal(
            got["highly_variable_nbatches"], ref["highly_variable_nbatches"]
        )


def test_gene_means_and_weighted_scores_row_source(matrices, device):
    counts, disk = matrices["counts"], matrices["disk_counts"]
    np.testing.assert_array_equal(
        gene_means(disk, device=device, chunk_size=CHUNK), gene_means(counts, device=device)
    )
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(N_GENES, 4))
    np.testing.assert_allclose(
        weighted_scores(disk, weights, device=device, chunk_size=CHUNK),
        weighted_scores(counts, weights, device=device),
        rtol=1e-12,
        atol=1e-12,
    )
    # log-normalised values (not integers): equal to float64 rounding
    lognorm, disk_lognorm = matrices["lognorm"], matrices["disk_lognorm"]
    np.testing.assert_allclose(
        gene_means(disk_lognorm, device=device, chunk_size=CHUNK),
        gene_means(lognorm, device=device),
        rtol=1e-12,
    )
    with pytest.raises(ValueError, match="genes x signatures"):
        weighted_scores(disk, weights[:-1], device=device, chunk_size=CHUNK)


@pytest.mark.parametrize("func", [normalize_total, normalize_log1p, log1p])
def test_whole_matrix_kernels_refuse_row_source(matrices, func):
    kwargs = {} if func is log1p else {"target_sum": 1e4}
    with pytest.raises(TypeError, match="cell_totals"):
        func(matrices["disk_counts"], device=CPU, **kwargs)


# --------------------------------------------------------------------------- PCA


def _assert_same_pca(got, ref, *, n_comps: int) -> None:
    np.testing.assert_allclose(got.variance, ref.variance, rtol=1e-5)
    np.testing.assert_allclose(got.variance_ratio, ref.variance_ratio, rtol=1e-5)
    for j in range(n_comps):
        corr = np.corrcoef(got.x_pca[:, j], ref.x_pca[:, j])[0, 1]
        assert abs(corr) >= 0.9999, (j, corr)
        cos = float(got.components[j] @ ref.components[j])
        assert abs(cos) >= 0.9999, (j, cos)


@pytest.mark.parametrize(
    ("method", "zero_center", "n_iter", "tol"),
    [
        ("randomized", True, 50, 1e-4),  # defaults: stops on convergence
        ("lobpcg", True, 50, 1e-4),
        ("randomized", False, 6, 0.0),  # fixed number of power iterations
    ],
)
def test_pca_row_source_matches_in_memory(matrices, device, method, zero_center, n_iter, tol):
    kwargs = {
        "n_comps": 20,
        "seed": 0,
        "device": device,
        "method": method,
        "zero_center": zero_center,
        "n_iter": n_iter,
        "tol": tol,
    }
    ref = pca_sparse(matrices["lognorm"], **kwargs)
    got = pca_sparse(matrices["disk_lognorm"], chunk_size=CHUNK, **kwargs)
    assert got.x_pca.shape == (N_CELLS, 20)
    assert got.x_pca.dtype == ref.x_pca.dtype
    _assert_same_pca(got, ref, n_comps=20)


def test_pca_row_source_canonicalises_blocks(matrices, device):
    """Blocks with unsorted and duplicate column indices give the canonical matrix's PCA."""
    scrambled = _Recording(matrices["disk_lognorm"], scramble=True)
    kwargs = {"n_comps": 10, "seed": 0, "device": device, "n_iter": 6, "tol": 0.0}
    ref = pca_sparse(matrices["lognorm"], **kwargs)
    got = pca_sparse(scrambled, chunk_size=CHUNK, **kwargs)
    _assert_same_pca(got, ref, n_comps=10)


# --------------------------------------------------------------------------- blocks only


_KERNELS: dict[str, Callable[[object, int], object]] = {
    "cell_totals": lambda x, c: cell_totals(x, device=CPU, chunk_size=c),
    "qc_metrics": lambda x, c: qc_kernel(x, gene_masks=_masks(), device=CPU, chunk_size=c),
    "hvg_seurat_v3": lambda x, c: hvg_seurat_v3(x, n_top_genes=N_TOP, device=CPU, chunk_size=c),
    "gene_means": lambda x, c: gene_means(x, device=CPU, chunk_size=c),
    "weighted_scores": lambda x, c: weighted_scores(
        x, np.ones((N_GENES, 2)), device=CPU, chunk_size=c
    ),
    "pca_randomized": lambda x, c: pca_sparse(
        x, n_comps=10, seed=0, device=CPU, n_iter=3, chunk_size=c
    ),
    "pca_lobpcg": lambda x, c: pca_sparse(
        x, n_comps=10, seed=0, device=CPU, method="lobpcg", chunk_size=c
    ),
}


@pytest.mark.parametrize("name", list(_KERNELS))
def test_kernels_read_row_source_in_blocks(matrices, name):
    source = _Recording(matrices["disk_counts"])
    _KERNELS[name](source, CHUNK)
    assert source.requests, "the row source was never read"
    spans = [stop - start for start, stop in source.requests]
    assert max(spans) <= CHUNK, f"a request spans {max(spans)} rows (chunk_size {CHUNK})"
    # every pass reads consecutive blocks covering all rows exactly once
    starts = [start for start, _ in source.requests]
    n_passes = starts.count(0)
    assert sum(spans) == n_passes * N_CELLS
    if name.startswith("pca"):
        # moments + products (randomized) or moments + Gram + embedding (lobpcg)
        assert n_passes >= 3
