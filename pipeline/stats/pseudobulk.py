"""Pseudobulk aggregation: summed raw counts per group of cells, and gene filters.

The sums are one sparse product ``G @ X`` with a groups x cells indicator
matrix ``G`` (``G[g, c] = 1`` when cell ``c`` is in group ``g``): its cost is
proportional to the stored entries of ``X`` and the cells x genes matrix is
never densified. The product runs in scipy on the host: it is memory-bound,
one pass over the data, and the counts live in host memory (the h5ad
artifact), so a GPU transfer would cost more than the product. Counts read
from disk (a row source, backed mode) are summed block by block,
``sum_b G[:, b] @ X[b]`` over blocks ``b`` of rows, so only one block of cells
is in memory at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..kernels.sparse import DEFAULT_CHUNK_SIZE, is_row_source, iter_row_blocks

__all__ = ["filter_genes", "group_indicator", "pseudobulk_sum"]


def group_indicator(codes: np.ndarray, n_groups: int) -> sp.csr_matrix:
    """Groups x cells 0/1 matrix of integer group codes (``-1``: cell in no group)."""
    codes = np.asarray(codes, dtype=np.int64)
    cells = np.flatnonzero(codes >= 0)
    data = np.ones(cells.size, dtype=np.float64)
    return sp.csr_matrix((data, (codes[cells], cells)), shape=(n_groups, codes.size))


def _indicator_product(ind: sp.csr_matrix, counts: Any, *, chunk_size: int) -> sp.csr_matrix:
    """``ind @ counts`` in ``float64``; a row source is read in blocks of ``chunk_size`` rows."""
    if not is_row_source(counts):
        x = counts if sp.issparse(counts) else sp.csr_matrix(counts)
        return sp.csr_matrix(ind @ x.astype(np.float64, copy=False))
    ind_cols = ind.tocsc()  # cheap column (cell) slices
    total = sp.csr_matrix((ind.shape[0], int(counts.shape[1])), dtype=np.float64)
    for start, stop, block in iter_row_blocks(counts, chunk_size=chunk_size):
        total = total + sp.csr_matrix(
            ind_cols[:, start:stop] @ block.astype(np.float64, copy=False)
        )
    return sp.csr_matrix(total)


def pseudobulk_sum(
    counts: sp.spmatrix | np.ndarray | Any,
    groups: pd.DataFrame,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """Sum ``counts`` over the cells of each distinct row of ``groups``.

    Parameters
    ----------
    counts
        Cells x genes raw counts (sparse CSR/CSC or dense), or a row source
        (:func:`~pipeline.kernels.sparse.is_row_source`: counts on disk, read in
        blocks of rows).
    groups
        One row per cell; the grouping columns (e.g. ``donor``, ``timepoint``,
        ``cell_type``). A cell with a missing value in any column is left out.
    chunk_size
        Rows per block read from a row source.

    Returns
    -------
    The groups x genes sums (CSR, float64; integers when the counts are) and
    the groups' table: the grouping columns plus ``n_cells``, in the order of
    first appearance sorted by the columns' (categorical) order.
    """
    if groups.shape[0] != counts.shape[0]:
        raise ValueError(f"groups has {groups.shape[0]} rows, counts {counts.shape[0]} cells")
    cols = list(groups.columns)
    valid = groups.notna().all(axis=1).to_numpy()
    g = groups.loc[valid]
    keys = g.drop_duplicates().sort_values(cols).reset_index(drop=True)
    keys_idx = (
        pd.MultiIndex.from_frame(keys.astype(object))
        if len(cols) > 1
        else pd.Index(keys[cols[0]].astype(object))
    )
    cell_keys = (
        pd.MultiIndex.from_frame(g.astype(object))
        if len(cols) > 1
        else pd.Index(g[cols[0]].astype(object))
    )
    codes = np.full(groups.shape[0], -1, dtype=np.int64)
    codes[valid] = keys_idx.get_indexer(cell_keys)
    ind = group_indicator(codes, len(keys))
    sums = _indicator_product(ind, counts, chunk_size=chunk_size)
    sums.sort_indices()
    table = keys.copy()
    for c in cols:
        if isinstance(groups[c].dtype, pd.CategoricalDtype):
            table[c] = pd.Categorical(
                table[c], categories=groups[c].cat.categories, ordered=groups[c].cat.ordered
            )
    table["n_cells"] = np.bincount(codes[codes >= 0], minlength=len(keys)).astype(np.int64)
    return sums, table


def filter_genes(
    counts: np.ndarray,
    *,
    min_count: int = 10,
    min_samples: int = 3,
    min_total: int = 0,
) -> np.ndarray:
    """Genes expressed enough for a count model (edgeR ``filterByExpr``-like).

    Parameters
    ----------
    counts
        Pseudobulks x genes summed counts.
    min_count
        A pseudobulk "expresses" a gene with at least this many counts.
    min_samples
        Keep a gene expressed in at least this many pseudobulks.
    min_total
        And with at least this many counts over all pseudobulks.

    Returns
    -------
    Boolean mask over genes.
    """
    c = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    return ((c >= min_count).sum(axis=0) >= min_samples) & (c.sum(axis=0) >= min_total)
