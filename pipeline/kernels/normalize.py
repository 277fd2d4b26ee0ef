"""Library-size normalisation and log1p of sparse counts, equal to scanpy's.

``normalize_total`` scales every cell to the same total (``scanpy.pp.normalize_total``
without ``exclude_highly_expressed``), ``log1p`` is ``scanpy.pp.log1p``, and
``normalize_log1p`` does both in one pass over the values. The output keeps the
input's sparsity structure (``indptr``/``indices`` are shared copies); values are
computed on the device in ``dtype`` (float32 by default: within 1e-6 relative of
scanpy's float32 results), per-cell totals in float64.

:func:`cell_totals` also takes a row source (an on-disk matrix read in blocks of
rows, :func:`~pipeline.kernels.sparse.is_row_source`). The other three return a whole
in-memory CSR matrix and so take in-memory input only; for a row source, compute the
totals with :func:`cell_totals` and scale / log-transform each block of
:func:`~pipeline.kernels.sparse.iter_row_blocks`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import sparse

from pipeline.errors import ImmuneageWarning
from pipeline.kernels._device import as_device, to_numpy
from pipeline.kernels.sparse import (
    DEFAULT_CHUNK_SIZE,
    as_csr,
    is_row_source,
    iter_row_chunks,
    log1p_values,
    row_sums,
    scale_rows,
)

if TYPE_CHECKING:
    from anndata.abc import CSRDataset
    from numpy.typing import NDArray

__all__ = ["cell_totals", "log1p", "normalize_log1p", "normalize_total"]


def cell_totals(
    x: sparse.spmatrix | sparse.sparray | CSRDataset,
    *,
    device: torch.device | str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> NDArray[np.float64]:
    """Total counts of each cell (row sums), accumulated in float64 on ``device``.

    Parameters
    ----------
    x
        Cells x genes counts: a scipy sparse matrix or a row source
        (:func:`~pipeline.kernels.sparse.is_row_source`, e.g. an on-disk h5ad matrix,
        read ``chunk_size`` rows at a time and never loaded whole).
    device
        Device the sums run on.
    chunk_size
        Rows copied to the device (and, for a row source, read) at a time.

    Returns
    -------
    numpy.ndarray
        ``float64`` array of length ``n_cells``.
    """
    src = x if is_row_source(x) else as_csr(x)
    dev = as_device(device)
    out = torch.empty(int(src.shape[0]), dtype=torch.float64, device=dev)
    for start, stop, block in iter_row_chunks(
        src, device=dev, dtype=torch.float64, chunk_size=chunk_size
    ):
        out[start:stop] = row_sums(block)
    return to_numpy(out)


def _in_memory_csr(x: object, func: str) -> sparse.csr_matrix:
    """``as_csr(x)``, refusing a row source: ``func`` returns a whole in-memory matrix."""
    if is_row_source(x):
        msg = (
            f"{func} returns a whole in-memory matrix and takes only in-memory scipy "
            f"sparse input, got the row source {type(x).__name__}; compute "
            "cell_totals(x) (which reads a row source in blocks) and transform each "
            "block of iter_row_blocks(x) instead."
        )
        raise TypeError(msg)
    return as_csr(x)


def _scale_factors(totals: NDArray[np.float64], target_sum: float | None) -> NDArray:
    positive = totals > 0
    if not positive.all():
        warnings.warn(
            f"{int((~positive).sum())} cells have zero counts; they stay all-zero after "
            "normalisation (filter them in QC to silence this).",
            ImmuneageWarning,
            stacklevel=3,
        )
    if target_sum is None:
        target_sum = float(np.median(totals[positive])) if positive.any() else 1.0
    elif not target_sum > 0:
        msg = f"target_sum must be positive or None (median of cell totals), got {target_sum}"
        raise ValueError(msg)
    factors = np.zeros_like(totals)
    np.divide(target_sum, totals, out=factors, where=positive)
    return factors


def _map_values(
    csr: sparse.csr_matrix,
    *,
    factors: NDArray[np.float64] | None,
    take_log: bool,
    device: torch.device,
    dtype: torch.dtype,
    chunk_size: int,
) -> sparse.csr_matrix:
    """Apply row scaling and/or log1p block by block; returns a new host CSR matrix."""
    out_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    data = np.empty(csr.nnz, dtype=out_dtype)
    factors_d = None if factors is None else torch.from_numpy(factors).to(device)
    for start, stop, block in iter_row_chunks(
        csr, device=device, dtype=dtype, chunk_size=chunk_size
    ):
        t = block
        if factors_d is not None:
            t = scale_rows(t, factors_d[start:stop])
        if take_log:
            t = log1p_values(t)
        data[csr.indptr[start] : csr.indptr[stop]] = to_numpy(t.values())
    return sparse.csr_matrix(
        (data, csr.indices.copy(), csr.indptr.copy()), shape=csr.shape, copy=False
    )


def normalize_total(
    x: sparse.spmatrix | sparse.sparray,
    *,
    target_sum: float | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> sparse.csr_matrix:
    """Scale each cell to ``target_sum`` total counts (``scanpy.pp.normalize_total``).

    Parameters
    ----------
    x
        Cells x genes counts, in-memory scipy sparse (never densified; not modified).
    target_sum
        Total of every cell after scaling; ``None``: the median total over the cells
        with non-zero counts.
    device
        Device the arithmetic runs on.
    dtype
        Value dtype of the computation and of the result.
    chunk_size
        Rows copied to the device at a time.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``x[i] * target_sum / total_i``; cells with zero counts stay zero (with an
        :class:`~pipeline.errors.ImmuneageWarning`).

    Raises
    ------
    TypeError
        ``x`` is dense, or a row source (use :func:`cell_totals` and scale each block).
    """
    csr = _in_memory_csr(x, "normalize_total")
    dev = as_device(device)
    factors = _scale_factors(cell_totals(csr, device=dev, chunk_size=chunk_size), target_sum)
    return _map_values(
        csr, factors=factors, take_log=False, device=dev, dtype=dtype, chunk_size=chunk_size
    )


def log1p(
    x: sparse.spmatrix | sparse.sparray,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> sparse.csr_matrix:
    """Natural ``log(1 + x)`` of every value (``scanpy.pp.log1p``); zeros stay zeros.

    Parameters
    ----------
    x
        Cells x genes, in-memory scipy sparse, non-negative (not modified).
    device
        Device the arithmetic runs on.
    dtype
        Value dtype of the computation and of the result.
    chunk_size
        Rows copied to the device at a time.

    Returns
    -------
    scipy.sparse.csr_matrix
        Same structure as ``x`` with ``log1p`` applied to the stored values.

    Raises
    ------
    TypeError
        ``x`` is dense, or a row source (transform each block of
        :func:`~pipeline.kernels.sparse.iter_row_blocks` instead).
    """
    return _map_values(
        _in_memory_csr(x, "log1p"),
        factors=None,
        take_log=True,
        device=as_device(device),
        dtype=dtype,
        chunk_size=chunk_size,
    )


def normalize_log1p(
    x: sparse.spmatrix | sparse.sparray,
    *,
    target_sum: float | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> sparse.csr_matrix:
    """:func:`normalize_total` followed by :func:`log1p`, fused into one pass over values.

    Parameters
    ----------
    x
        Cells x genes counts, in-memory scipy sparse (not modified).
    target_sum
        As in :func:`normalize_total`.
    device
        Device the arithmetic runs on.
    dtype
        Value dtype of the computation and of the result.
    chunk_size
        Rows copied to the device at a time.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``log1p(x[i] * target_sum / total_i)``, same structure as ``x``.

    Raises
    ------
    TypeError
        ``x`` is dense, or a row source (use :func:`cell_totals` and transform each
        block).
    """
    csr = _in_memory_csr(x, "normalize_log1p")
    dev = as_device(device)
    factors = _scale_factors(cell_totals(csr, device=dev, chunk_size=chunk_size), target_sum)
    return _map_values(
        csr, factors=factors, take_log=True, device=dev, dtype=dtype, chunk_size=chunk_size
    )
