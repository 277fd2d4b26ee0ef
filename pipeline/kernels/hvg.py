"""Seurat v3 highly variable genes on raw counts, replicating scanpy's ``seurat_v3`` flavour.

Algorithm (Stuart et al. 2019; ``scanpy.pp.highly_variable_genes(flavor="seurat_v3")``):

1. Per batch ``b`` with ``n_b`` cells, gene means ``m`` and unbiased variances ``v``
   from sparse sums of ``x`` and ``x**2`` (device, float64; all batches in one pass by
   scattering into a ``(n_batches * n_genes)`` vector).
2. Loess (``skmisc.loess``, degree 2, ``span``) of ``log10 v`` on ``log10 m`` over the
   genes with ``v > 0`` (host: per-gene vectors only); ``sigma = sqrt(10**fit)``,
   ``sigma = 1`` for constant genes. With ``on_fit_error="fallback"`` a batch whose
   fit fails is refitted with wider spans, then with a global quadratic (not scanpy:
   scanpy raises).
3. Values clipped at ``c = m + sigma * sqrt(n_b)``; standardised variance
   ``(n_b m**2 + sum min(x, c)**2 - 2 m sum min(x, c)) / ((n_b - 1) sigma**2)``
   (device: sparse sums over the stored values; zeros contribute ``m**2`` each,
   which the ``n_b m**2`` term accounts for).
4. Per batch, genes ranked by decreasing standardised variance; ranks at or beyond
   ``n_top_genes`` dropped; a gene's rank is the median of its remaining ranks and
   ``highly_variable_nbatches`` the number of batches where it ranks within
   ``n_top_genes``. Genes are sorted by (median rank ascending, nbatches descending,
   gene order) and the first ``n_top_genes`` are highly variable.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch

from pipeline.errors import ImmuneageWarning
from pipeline.kernels._device import as_device, to_numpy
from pipeline.kernels.sparse import (
    DEFAULT_CHUNK_SIZE,
    as_csr,
    expand_rows,
    is_row_source,
    iter_row_chunks,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata.abc import CSRDataset
    from numpy.typing import NDArray
    from scipy import sparse

__all__ = ["FALLBACK_SPANS", "LOESS_ERRORS", "hvg_seurat_v3", "is_loess_error"]


def _batch_codes(batch: NDArray | None, n_cells: int) -> tuple[NDArray[np.int64], list[str]]:
    if batch is None:
        return np.zeros(n_cells, dtype=np.int64), ["all cells"]
    labels = np.asarray(batch)
    if labels.shape != (n_cells,):
        msg = f"batch must hold one label per cell ({n_cells}), got shape {labels.shape}"
        raise ValueError(msg)
    if pd.isna(labels).any():
        msg = "batch labels must not be missing (NaN/None); label every cell's batch"
        raise ValueError(msg)
    # np.unique sorts the labels, as scanpy iterates batches in np.unique order.
    uniques, codes = np.unique(labels, return_inverse=True)
    return codes.astype(np.int64), [str(u) for u in uniques]


def _loess_log_fit(mean: NDArray, var: NDArray, span: float) -> NDArray[np.float64]:
    """Return ``sigma`` per gene: sqrt of the loess-fitted variance (1 for constant genes)."""
    from skmisc.loess import loess

    fitted = np.zeros(mean.shape, dtype=np.float64)
    not_const = var > 0
    model = loess(np.log10(mean[not_const]), np.log10(var[not_const]), span=span, degree=2)
    model.fit()
    fitted[not_const] = model.outputs.fitted_values
    return np.sqrt(10.0**fitted)


#: Fragments of the messages skmisc's LOESS raises (as ``ValueError(b'...')``) when a
#: fit fails: near-singular local fits on small batches, spans too small for the data.
LOESS_ERRORS = (
    "singular",
    "condition number",
    "span",
    "neighborhood",
    "pseudoinverse",
    "extrapolation",
    "workspace",
    "k-d tree",
    "vertices",
)

#: Spans tried, in order, after ``span`` when ``on_fit_error="fallback"`` (those above it).
FALLBACK_SPANS = (0.5, 0.7, 0.9)


def is_loess_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a LOESS fit failure from skmisc (as raised through scanpy too)."""
    msg = str(exc).lower()
    return isinstance(exc, ValueError) and any(m in msg for m in LOESS_ERRORS)


def _quadratic_log_fit(mean: NDArray, var: NDArray) -> NDArray[np.float64]:
    """``sigma`` per gene from one least-squares quadratic of ``log10 v`` on ``log10 m``.

    The global counterpart of the degree-2 LOESS, used where every LOESS span fails;
    with fewer than three non-constant genes the trend is their mean log variance.
    """
    fitted = np.zeros(mean.shape, dtype=np.float64)
    nc = var > 0
    x, y = np.log10(mean[nc]), np.log10(var[nc])
    if nc.sum() >= 3 and np.ptp(x) > 0:
        fitted[nc] = np.polyval(np.polyfit(x, y, 2), x)
    elif nc.any():
        fitted[nc] = y.mean()
    return np.sqrt(10.0**fitted)


def _trend(
    mean: NDArray, var: NDArray, span: float, fallback: bool
) -> tuple[NDArray[np.float64], str]:
    """``sigma`` of one batch and how it was fitted (``loess span S`` or ``quadratic``)."""
    spans = [span, *(s for s in FALLBACK_SPANS if s > span)] if fallback else [span]
    for s in spans:
        try:
            return _loess_log_fit(mean, var, s), f"loess span {s:g}"
        except ValueError:  # skmisc: the LOESS fit failed (singular, span too small, ...)
            if not fallback:
                raise
    return _quadratic_log_fit(mean, var), "quadratic"


def _rank_genes(
    norm_vars: NDArray[np.float64], n_top_genes: int
) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.bool_]]:
    """Median rank, number of batches in the top, and the selection (host, per gene)."""
    # Rank 0 = most variable. argsort twice with numpy's default kind, like scanpy, so
    # exact ties between genes break identically.
    ranks = np.argsort(np.argsort(-norm_vars, axis=1), axis=1).astype(np.float32)
    in_top = ranks < n_top_genes
    nbatches = in_top.sum(axis=0).astype(np.int64)
    ranks[~in_top] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns -> NaN
        median_rank = np.nanmedian(ranks, axis=0).astype(np.float32)
    # Stable sort by (rank ascending, NaN last; nbatches descending; gene order).
    order = np.lexsort((-nbatches, np.where(np.isnan(median_rank), np.inf, median_rank)))
    selected = np.zeros(norm_vars.shape[1], dtype=bool)
    selected[order[:n_top_genes]] = True
    return median_rank, nbatches, selected


def hvg_seurat_v3(
    counts: sparse.spmatrix | sparse.sparray | CSRDataset,
    *,
    n_top_genes: int,
    batch: NDArray | None = None,
    span: float = 0.3,
    on_fit_error: Literal["raise", "fallback"] = "raise",
    device: torch.device | str,
    gene_names: Sequence[str] | pd.Index | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> pd.DataFrame:
    """Select highly variable genes as ``scanpy.pp.highly_variable_genes(flavor="seurat_v3")``.

    Parameters
    ----------
    counts
        Cells x genes raw counts: a scipy sparse matrix or a row source
        (:func:`~pipeline.kernels.sparse.is_row_source`, e.g. an on-disk h5ad matrix,
        read in two passes of ``chunk_size`` rows). Never densified.
    n_top_genes
        Number of genes to select.
    batch
        Batch label of each cell (length ``n_cells``), or ``None`` for one batch.
        Genes are ranked within each batch and the ranks combined as scanpy does.
    span
        Loess span (fraction of genes in each local fit).
    on_fit_error
        A batch whose LOESS fit fails (skmisc's ``reciprocal condition number``,
        ``near singularities``, ``span too small``, ...: small batches whose gene
        means take few distinct values): ``"raise"`` the ``ValueError``, as scanpy
        does; ``"fallback"`` refits that batch alone with the spans of
        :data:`FALLBACK_SPANS` above ``span``, then, when they all fail, with one
        global quadratic of ``log10 v`` on ``log10 m`` (no LOESS). The other
        batches keep their fit. ``df.attrs["trend_fits"]`` says what each batch got.
    device
        Device the sums run on.
    gene_names
        Index of the returned frame (default: ``0..n_genes-1``).
    chunk_size
        Rows copied to the device (and, for a row source, read) at a time.

    Returns
    -------
    pandas.DataFrame
        One row per gene, scanpy's columns: ``highly_variable`` (bool),
        ``highly_variable_rank`` (float32; median rank over batches, NaN when never in
        the top), ``means``, ``variances`` (float64, over all cells, ddof 1),
        ``variances_norm`` (float64; mean over batches of the clipped standardised
        variance) and, when ``batch`` is given, ``highly_variable_nbatches`` (int64).
        ``attrs["trend_fits"]``: batch label (``"all cells"`` without batches) ->
        ``"loess span S"`` or ``"quadratic"``.

    Raises
    ------
    ValueError
        ``n_top_genes`` is not positive, ``batch`` has the wrong length or missing
        labels, or (``on_fit_error="raise"``) a LOESS fit fails.
    """
    # A row source is read block by block in each pass; never loaded whole.
    src = counts if is_row_source(counts) else as_csr(counts)
    n_cells, n_genes = int(src.shape[0]), int(src.shape[1])
    if n_top_genes < 1:
        msg = f"n_top_genes must be a positive number of genes, got {n_top_genes}"
        raise ValueError(msg)
    dev = as_device(device)
    codes, labels = _batch_codes(batch, n_cells)
    n_batches = len(labels)
    codes_d = torch.from_numpy(codes).to(dev)
    f64 = torch.float64
    size = n_batches * n_genes

    # Pass 1: per-batch sums of x and x**2 (float64: exact for counts).
    sum_x = torch.zeros(size, dtype=f64, device=dev)
    sum_x2 = torch.zeros(size, dtype=f64, device=dev)
    non_integer = False
    for start, stop, block in iter_row_chunks(src, device=dev, dtype=f64, chunk_size=chunk_size):
        values = block.values()
        slot = expand_rows(block, codes_d[start:stop] * n_genes) + block.col_indices()
        sum_x.index_add_(0, slot, values)
        sum_x2.index_add_(0, slot, values * values)
        non_integer = non_integer or bool((values != torch.round(values)).any())
    if non_integer:
        warnings.warn(
            "hvg_seurat_v3 expects raw counts, but non-integer values were found.",
            ImmuneageWarning,
            stacklevel=2,
        )
    n_b = torch.from_numpy(np.bincount(codes, minlength=n_batches).astype(np.float64)).to(dev)
    sum_x = sum_x.view(n_batches, n_genes)
    sum_x2 = sum_x2.view(n_batches, n_genes)
    mean_b = sum_x / n_b[:, None]
    # Unbiased variance, as scanpy (E[x^2] - E[x]^2) * n / (n - 1); a batch of one
    # cell keeps the biased value, as scanpy does.
    ddof_scale = torch.where(n_b > 1, n_b / (n_b - 1), torch.ones_like(n_b))
    var_b = (sum_x2 / n_b[:, None] - mean_b**2) * ddof_scale[:, None]

    n_all = float(n_cells)
    mean_all = sum_x.sum(0) / n_all
    var_all = (sum_x2.sum(0) / n_all - mean_all**2) * (n_all / (n_all - 1) if n_cells > 1 else 1.0)

    # Loess of log variance on log mean, per batch, on the host.
    mean_h, var_h = to_numpy(mean_b), to_numpy(var_b)
    fits = [_trend(mean_h[b], var_h[b], span, on_fit_error == "fallback") for b in range(n_batches)]
    sigma = np.stack([f[0] for f in fits])
    sigma_d = torch.from_numpy(sigma).to(dev)
    clip = (mean_b + sigma_d * torch.sqrt(n_b)[:, None]).reshape(-1)

    # Pass 2: sums of clipped values and their squares over the stored values.
    sum_c = torch.zeros(size, dtype=f64, device=dev)
    sum_c2 = torch.zeros(size, dtype=f64, device=dev)
    for start, stop, block in iter_row_chunks(src, device=dev, dtype=f64, chunk_size=chunk_size):
        slot = expand_rows(block, codes_d[start:stop] * n_genes) + block.col_indices()
        clipped = torch.minimum(block.values(), clip[slot])
        sum_c.index_add_(0, slot, clipped)
        sum_c2.index_add_(0, slot, clipped * clipped)
    sum_c = sum_c.view(n_batches, n_genes)
    sum_c2 = sum_c2.view(n_batches, n_genes)
    nb = n_b[:, None]
    norm_vars = (nb * mean_b**2 + sum_c2 - 2 * sum_c * mean_b) / ((nb - 1) * sigma_d**2)

    norm_h = to_numpy(norm_vars)
    median_rank, nbatches, selected = _rank_genes(norm_h, n_top_genes)
    index = pd.RangeIndex(n_genes) if gene_names is None else pd.Index(gene_names)
    df = pd.DataFrame(
        {
            "highly_variable": selected,
            "highly_variable_rank": median_rank,
            "means": to_numpy(mean_all),
            "variances": to_numpy(var_all),
            "variances_norm": norm_h.mean(axis=0),
        },
        index=index,
    )
    if batch is not None:
        df["highly_variable_nbatches"] = nbatches
    df.attrs["trend_fits"] = {label: f[1] for label, f in zip(labels, fits, strict=True)}
    return df
