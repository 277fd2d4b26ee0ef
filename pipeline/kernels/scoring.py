"""Many gene signatures scored in one sparse product.

A signature score in the ``scanpy.tl.score_genes`` sense is the mean expression of
the set's genes minus the mean of its control genes: a linear function of a cell's
row. Stacking one weight column per signature (``+1/|set|`` on its genes,
``-1/|controls|`` on its controls) turns every score of every cell into a single
``(cells x genes) @ (genes x signatures)`` product. The matrix stays sparse; it is
streamed to the device in blocks of rows, so memory is one block plus the
``cells x signatures`` result. The same code runs on CPU and CUDA tensors. The
matrix may also be a row source (an on-disk matrix,
:func:`~pipeline.kernels.sparse.is_row_source`), read one block of rows at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.kernels._device import as_device, to_numpy
from pipeline.kernels.sparse import (
    DEFAULT_CHUNK_SIZE,
    as_csr,
    col_sums,
    is_row_source,
    iter_row_chunks,
    spmm,
)

if TYPE_CHECKING:
    from anndata.abc import CSRDataset
    from numpy.typing import NDArray
    from scipy import sparse

__all__ = ["gene_means", "weighted_scores"]


def gene_means(
    x: sparse.spmatrix | sparse.sparray | CSRDataset,
    *,
    device: torch.device | str = "cpu",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> NDArray[np.float64]:
    """Mean of each column (gene) over all rows (cells), accumulated in ``float64``.

    Parameters
    ----------
    x
        Cells x genes: a scipy sparse matrix or a row source
        (:func:`~pipeline.kernels.sparse.is_row_source`, e.g. an on-disk h5ad matrix,
        read ``chunk_size`` rows at a time and never loaded whole). No NaN.
    device
        Where the sums run.
    chunk_size
        In memory: the stored values are sent to the device in slices of
        ``1024 * chunk_size``. Row source: rows read and sent per block.

    Returns
    -------
    ``float64`` array of length ``n_genes``.
    """
    dev = as_device(device)
    if is_row_source(x):
        # No slicing by stored values here: column sums over blocks of rows.
        n_cells, n_genes = int(x.shape[0]), int(x.shape[1])
        total = torch.zeros(n_genes, dtype=torch.float64, device=dev)
        for _, _, block in iter_row_chunks(
            x, device=dev, dtype=torch.float64, chunk_size=chunk_size
        ):
            total += col_sums(block)
        return to_numpy(total) / max(n_cells, 1)
    csr = as_csr(x)
    n_genes = csr.shape[1]
    total = torch.zeros(n_genes, dtype=torch.float64, device=dev)
    # a weighted bincount over the stored (column, value) pairs, in slices of nnz:
    # no row structure is needed for column sums
    step = max(int(chunk_size), 1) * 1024
    for start in range(0, csr.nnz, step):
        cols = torch.as_tensor(csr.indices[start : start + step], device=dev).long()
        vals = torch.as_tensor(csr.data[start : start + step], device=dev).to(torch.float64)
        total += torch.bincount(cols, weights=vals, minlength=n_genes)
    return to_numpy(total) / max(csr.shape[0], 1)


def weighted_scores(
    x: sparse.spmatrix | sparse.sparray | CSRDataset,
    weights: NDArray,
    *,
    device: torch.device | str = "cpu",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    dtype: torch.dtype = torch.float64,
) -> NDArray[np.float64]:
    """``x @ weights`` for a sparse ``x`` and a small dense ``weights``, block by block.

    Parameters
    ----------
    x
        Cells x genes (e.g. log-normalised expression): a scipy sparse matrix or a
        row source (:func:`~pipeline.kernels.sparse.is_row_source`, e.g. an on-disk
        h5ad matrix or a lazy transform of one, read ``chunk_size`` rows at a time).
    weights
        Genes x signatures dense weights.
    device
        Where the product runs (``cpu`` or ``cuda``): one code path for both.
    chunk_size
        Rows per block sent to the device (and, for a row source, read).
    dtype
        Arithmetic precision; ``float64`` (default) reproduces scanpy's
        ``float64`` means to rounding.

    Returns
    -------
    Cells x signatures ``float64`` array.
    """
    src = x if is_row_source(x) else as_csr(x)
    n_cells, n_genes = int(src.shape[0]), int(src.shape[1])
    w = np.asarray(weights)
    if w.ndim != 2 or w.shape[0] != n_genes:
        msg = f"weights must be genes x signatures ({n_genes} rows), got shape {w.shape}"
        raise ValueError(msg)
    dev = as_device(device)
    w_t = torch.as_tensor(w, dtype=dtype, device=dev)
    out = np.empty((n_cells, w.shape[1]), dtype=np.float64)
    if n_cells == 0 or w.shape[1] == 0:
        return out
    for start, stop, block in iter_row_chunks(src, device=dev, dtype=dtype, chunk_size=chunk_size):
        out[start:stop] = to_numpy(spmm(block, w_t))
    return out
