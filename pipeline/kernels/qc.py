"""Per-cell and per-gene quality-control sums, equal to ``scanpy.pp.calculate_qc_metrics``.

One pass over blocks of rows: each block is copied to the device with ``float64``
values (counts are exact there); per-cell totals (all genes and each gene mask) come
from one sparse @ dense product with a genes x (1 + n_masks) 0/1 weight matrix,
per-gene sums from ``index_add_``/``bincount``. Only per-cell and per-gene vectors
come back to the host. The input may be a row source (an on-disk matrix,
:func:`~pipeline.kernels.sparse.is_row_source`): it is then read one block at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from pipeline.kernels._device import as_device, to_numpy
from pipeline.kernels.sparse import (
    DEFAULT_CHUNK_SIZE,
    as_csr,
    col_nnz,
    col_sums,
    is_row_source,
    iter_row_chunks,
    row_nnz,
    row_sums,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from anndata.abc import CSRDataset
    from numpy.typing import NDArray
    from scipy import sparse

__all__ = ["QCMetrics", "qc_metrics"]


class QCMetrics(NamedTuple):
    """Result of :func:`qc_metrics`: per-cell (``obs``) and per-gene (``var``) columns.

    Both map scanpy's column names to 1-D arrays, so
    ``adata.obs[list(m.obs)] = pd.DataFrame(m.obs, index=adata.obs_names)`` writes
    them. (Two mappings, as scanpy returns two frames: ``total_counts`` is a column of
    both.)
    """

    obs: dict[str, NDArray]
    var: dict[str, NDArray]


def qc_metrics(
    x: sparse.spmatrix | sparse.sparray | CSRDataset,
    *,
    gene_masks: Mapping[str, NDArray[np.bool_]],
    device: torch.device | str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> QCMetrics:
    """Quality-control sums of a counts matrix, as ``scanpy.pp.calculate_qc_metrics``.

    Parameters
    ----------
    x
        Cells x genes counts: a scipy sparse matrix (CSR preferred) or a row source
        (:func:`~pipeline.kernels.sparse.is_row_source`, e.g. an on-disk h5ad matrix,
        read ``chunk_size`` rows at a time and never loaded whole). Never densified.
    gene_masks
        Gene sets to report the share of counts of, e.g. ``{"mt": ..., "ribo": ...,
        "hb": ...}``: name -> boolean array of length ``n_genes``.
    device
        Device the sums run on (from :func:`~pipeline.kernels.resolve_device`).
    chunk_size
        Rows copied to the device (and, for a row source, read) at a time.

    Returns
    -------
    QCMetrics
        ``obs`` (length ``n_cells``): ``total_counts`` (float64),
        ``n_genes_by_counts`` (int64, values != 0), and for each mask ``<name>``:
        ``total_counts_<name>`` and ``pct_counts_<name>`` (percent of
        ``total_counts``; NaN for cells with no counts, as scanpy).
        ``var`` (length ``n_genes``): ``n_cells_by_counts`` (int64),
        ``total_counts``, ``mean_counts``, ``pct_dropout_by_counts`` (float64).

    Notes
    -----
    Sums are accumulated in float64 from float64 values, so they are exact for counts
    below 2**53; scanpy sums float32 data in float32, so the two agree to ~1e-7
    relative.
    """
    src = x if is_row_source(x) else as_csr(x)
    n_cells, n_genes = int(src.shape[0]), int(src.shape[1])
    dev = as_device(device)
    names = list(gene_masks)
    masks = []
    for name in names:
        mask = np.asarray(gene_masks[name])
        if mask.dtype != np.bool_ or mask.shape != (n_genes,):
            msg = (
                f"gene mask {name!r} must be a boolean array of length {n_genes} "
                f"(one entry per gene), got dtype {mask.dtype} and shape {mask.shape}"
            )
            raise ValueError(msg)
        masks.append(torch.from_numpy(mask).to(dev))

    f64 = torch.float64
    # Column weights: all genes, then one 0/1 column per mask -> one product per block.
    weights = torch.ones((n_genes, 1 + len(masks)), dtype=f64, device=dev)
    for i, mask in enumerate(masks):
        weights[:, 1 + i] = mask.to(f64)
    row_totals = torch.zeros((n_cells, 1 + len(masks)), dtype=f64, device=dev)
    n_genes_by = torch.zeros(n_cells, dtype=torch.int64, device=dev)
    gene_total = torch.zeros(n_genes, dtype=f64, device=dev)
    n_cells_by = torch.zeros(n_genes, dtype=torch.int64, device=dev)
    for start, stop, block in iter_row_chunks(src, device=dev, dtype=f64, chunk_size=chunk_size):
        row_totals[start:stop] = row_sums(block, weights=weights)
        n_genes_by[start:stop] = row_nnz(block)
        gene_total += col_sums(block)
        n_cells_by += col_nnz(block)

    totals_h = to_numpy(row_totals)
    total_h = totals_h[:, 0].copy()
    obs: dict[str, NDArray] = {
        "total_counts": total_h,
        "n_genes_by_counts": to_numpy(n_genes_by),
    }
    with np.errstate(divide="ignore", invalid="ignore"):
        for i, name in enumerate(names):
            obs[f"total_counts_{name}"] = totals_h[:, 1 + i].copy()
            obs[f"pct_counts_{name}"] = totals_h[:, 1 + i] / total_h * 100
    n_cells_h = to_numpy(n_cells_by)
    gene_total_h = to_numpy(gene_total)
    var: dict[str, NDArray] = {
        "n_cells_by_counts": n_cells_h,
        "total_counts": gene_total_h,
        "mean_counts": gene_total_h / max(n_cells, 1),
        "pct_dropout_by_counts": (1 - n_cells_h / max(n_cells, 1)) * 100,
    }
    return QCMetrics(obs=obs, var=var)
