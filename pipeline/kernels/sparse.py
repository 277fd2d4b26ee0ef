"""Torch sparse CSR helpers shared by the kernels: transfers, reductions, products.

Every helper works on a :data:`torch.sparse_csr` tensor on any device (CPU here, CUDA
on a GPU node) with the same code. Matrices arrive as host
:class:`scipy.sparse.csr_matrix` and are moved to the device whole
(:func:`csr_to_torch`) or in blocks of rows (:func:`iter_row_chunks`), so the device
never holds more than ``chunk_size`` rows of a single-pass computation. No helper
densifies a cells x genes matrix: reductions go through the stored values only
(``index_add_`` / ``bincount`` over the row or column index of each value).

Index tensors are ``int64`` (valid for more than 2**31 stored values; accepted by MKL
on the CPU and cuSPARSE on CUDA). Sums default to ``float64`` accumulation.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import sparse

from pipeline.kernels._device import as_device

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "as_csr",
    "col_nnz",
    "col_sums",
    "csr_to_torch",
    "expand_rows",
    "is_row_source",
    "iter_row_blocks",
    "iter_row_chunks",
    "log1p_values",
    "make_csr",
    "row_block",
    "row_ids",
    "row_nnz",
    "row_sums",
    "scale_rows",
    "spmm",
    "with_values",
]

#: Rows per block in single-pass kernels. With ~3,000 stored values per cell a block
#: holds ~30 M values, i.e. a few hundred MB of int64/float64 temporaries.
DEFAULT_CHUNK_SIZE = 10_000


def as_csr(x: object, *, canonical: bool = False) -> sparse.csr_matrix:
    """Return ``x`` as a scipy CSR matrix (no copy when it already is one).

    Parameters
    ----------
    x
        Any scipy sparse matrix or array (CSR is used as is; others are converted).
    canonical
        Also make the indices sorted and free of duplicates (on a copy if needed),
        as sparse-dense products on CUDA expect.

    Returns
    -------
    scipy.sparse.csr_matrix
        The matrix in CSR format.

    Raises
    ------
    TypeError
        ``x`` is not a scipy sparse matrix (the kernels never take dense cells x genes
        input).
    """
    if not sparse.issparse(x):
        msg = (
            f"expected a scipy.sparse matrix (cells x genes), got {type(x).__name__}; "
            "convert it with scipy.sparse.csr_matrix(x)."
        )
        raise TypeError(msg)
    csr = x if x.format == "csr" else x.tocsr()
    if csr.ndim != 2:
        msg = f"expected a 2-D matrix, got shape {csr.shape}"
        raise ValueError(msg)
    if canonical and not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    return csr


def make_csr(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """Build a :data:`torch.sparse_csr` tensor from its three arrays (no copy, no checks)."""
    with warnings.catch_warnings():
        # "Sparse CSR tensor support is in beta state": we use only stable entry points.
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow, col, values, size=shape, dtype=values.dtype, check_invariants=False
        )


def _block_to_torch(
    x: sparse.csr_matrix,
    start: int,
    stop: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    index_dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    lo, hi = int(x.indptr[start]), int(x.indptr[stop])
    # Indices travel in their host width (int32 for most matrices: half the bytes over
    # PCIe) and are widened on the device.
    crow = torch.from_numpy(np.ascontiguousarray(x.indptr[start : stop + 1]))
    col = torch.from_numpy(np.ascontiguousarray(x.indices[lo:hi]))
    values = torch.from_numpy(np.ascontiguousarray(x.data[lo:hi]))
    return make_csr(
        crow.to(device=device).to(index_dtype) - lo,
        col.to(device=device).to(index_dtype),
        values.to(device=device, dtype=dtype),
        (stop - start, x.shape[1]),
    )


def csr_to_torch(
    x: sparse.spmatrix | sparse.sparray,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    compact_indices: bool = False,
) -> torch.Tensor:
    """Copy a whole scipy sparse matrix to a :data:`torch.sparse_csr` tensor on ``device``.

    Parameters
    ----------
    x
        Host sparse matrix (converted to CSR if needed).
    device
        Target device.
    dtype
        Value dtype on the device.
    compact_indices
        Store the indices as ``int32`` when they fit (half the memory; fine for
        :func:`spmm`, which MKL and cuSPARSE run with either width). The reductions
        here (``row_ids`` ...) expect the default ``int64``.

    Returns
    -------
    torch.Tensor
        Sparse CSR tensor with the same structure as ``x``.
    """
    csr = as_csr(x)
    small = max(csr.nnz, *csr.shape) < np.iinfo(np.int32).max
    index_dtype = torch.int32 if compact_indices and small else torch.int64
    return _block_to_torch(
        csr, 0, csr.shape[0], device=as_device(device), dtype=dtype, index_dtype=index_dtype
    )


def is_row_source(x: object) -> bool:
    """Whether ``x`` is a cells x genes matrix read in blocks of rows, not held in memory.

    A *row source* is any object with a 2-D ``shape`` whose ``x[start:stop]`` returns
    those rows as a scipy CSR matrix: an on-disk
    :class:`anndata.abc.CSRDataset` (``anndata.io.sparse_dataset`` of an h5ad
    group; what the runner hands stages in ``backed`` mode) or a lazy matrix of
    :mod:`pipeline.io.ondisk`. In-memory scipy matrices are not row sources.
    """
    return (
        not sparse.issparse(x)
        and not isinstance(x, np.ndarray)
        and hasattr(x, "shape")
        and len(getattr(x, "shape", ())) == 2
        and hasattr(x, "__getitem__")
    )


def row_block(x: object, start: int, stop: int) -> sparse.csr_matrix:
    """Rows ``start:stop`` of an in-memory sparse matrix or a row source, as host CSR."""
    if sparse.issparse(x):
        csr = x if x.format == "csr" else sparse.csr_matrix(x)
        return csr[start:stop]
    if is_row_source(x):
        return as_csr(x[start:stop])
    return as_csr(x)  # raises the TypeError of a dense or unknown input


def iter_row_blocks(
    x: object, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[tuple[int, int, sparse.csr_matrix]]:
    """Yield ``(start, stop, block)``: consecutive host CSR blocks of at most ``chunk_size`` rows.

    Works the same on an in-memory scipy sparse matrix and on a row source
    (:func:`is_row_source`, e.g. an on-disk h5ad matrix), so a computation written
    over blocks never needs the whole matrix in memory.
    """
    if chunk_size < 1:
        msg = f"chunk_size must be a positive number of rows, got {chunk_size}"
        raise ValueError(msg)
    if sparse.issparse(x):
        x = as_csr(x)
    n_rows = int(x.shape[0])
    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        yield start, stop, row_block(x, start, stop)


def iter_row_chunks(
    x: sparse.spmatrix | sparse.sparray,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, block)`` for consecutive blocks of at most ``chunk_size`` rows.

    Parameters
    ----------
    x
        Host sparse matrix (converted to CSR if needed), or a row source
        (:func:`is_row_source`: an on-disk matrix read one block at a time).
    device
        Device each block is copied to.
    dtype
        Value dtype of the blocks.
    chunk_size
        Maximum number of rows per block.

    Yields
    ------
    start, stop
        The block's row range ``[start, stop)`` in ``x``.
    block
        Rows ``start:stop`` of ``x`` as a :data:`torch.sparse_csr` tensor on ``device``.
    """
    if chunk_size < 1:
        msg = f"chunk_size must be a positive number of rows, got {chunk_size}"
        raise ValueError(msg)
    dev = as_device(device)
    if is_row_source(x):
        for start, stop, block in iter_row_blocks(x, chunk_size=chunk_size):
            yield start, stop, _block_to_torch(block, 0, stop - start, device=dev, dtype=dtype)
        return
    csr = as_csr(x)
    n_rows = csr.shape[0]
    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        yield start, stop, _block_to_torch(csr, start, stop, device=dev, dtype=dtype)


def _row_counts(t: torch.Tensor) -> torch.Tensor:
    crow = t.crow_indices()
    return crow[1:] - crow[:-1]


def expand_rows(t: torch.Tensor, per_row: torch.Tensor) -> torch.Tensor:
    """Repeat a per-row vector once per stored value of its row (storage order)."""
    return torch.repeat_interleave(per_row, _row_counts(t), output_size=t.values().numel())


def row_ids(t: torch.Tensor) -> torch.Tensor:
    """Row index (``int64``) of every stored value of a CSR tensor, in storage order."""
    return expand_rows(t, torch.arange(t.shape[0], device=t.device))


def with_values(t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A CSR tensor with ``t``'s structure (shared index arrays) and new ``values``."""
    return make_csr(t.crow_indices(), t.col_indices(), values, tuple(t.shape))


def row_sums(
    t: torch.Tensor, *, weights: torch.Tensor | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Row sums of a CSR tensor, accumulated in ``dtype``, as one sparse @ dense product.

    Parameters
    ----------
    t
        Sparse CSR tensor, ``n_rows x n_cols``.
    weights
        Optional column weights, shape ``(n_cols,)`` or ``(n_cols, m)`` (e.g. gene
        masks as 0/1): the result is then ``t @ weights``.
    dtype
        Accumulation and result dtype.

    Returns
    -------
    torch.Tensor
        ``(n_rows,)`` (or ``(n_rows, m)`` for 2-D ``weights``).
    """
    if weights is None:
        weights = torch.ones(t.shape[1], dtype=dtype, device=t.device)
    w = weights.to(dtype)
    t64 = t if t.values().dtype == dtype else with_values(t, t.values().to(dtype))
    out = torch.sparse.mm(t64, w[:, None] if w.ndim == 1 else w)
    return out[:, 0] if w.ndim == 1 else out


def col_sums(t: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sum of each column of a CSR tensor, accumulated in ``dtype``."""
    out = torch.zeros(t.shape[1], dtype=dtype, device=t.device)
    return out.index_add_(0, t.col_indices(), t.values().to(dtype))


def row_nnz(t: torch.Tensor) -> torch.Tensor:
    """Number of non-zero values (explicit zeros excluded) in each row, ``int64``."""
    counts = _row_counts(t).to(torch.int64)
    zero = t.values() == 0
    if bool(zero.any()):
        counts = counts - torch.bincount(row_ids(t)[zero], minlength=t.shape[0])
    return counts


def col_nnz(t: torch.Tensor) -> torch.Tensor:
    """Number of non-zero values (explicit zeros excluded) in each column, ``int64``."""
    cols = t.col_indices()
    counts = torch.bincount(cols, minlength=t.shape[1])
    zero = t.values() == 0
    if bool(zero.any()):
        counts = counts - torch.bincount(cols[zero], minlength=t.shape[1])
    return counts


def scale_rows(t: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Return a CSR tensor with row ``i`` multiplied by ``factors[i]``.

    The result shares the index arrays of ``t``; values keep ``t``'s dtype.
    """
    values = t.values()
    return with_values(t, values * expand_rows(t, factors.to(values.dtype)))


def log1p_values(t: torch.Tensor) -> torch.Tensor:
    """Return ``log(1 + t)`` elementwise; zeros stay zeros, so only values change."""
    return with_values(t, torch.log1p(t.values()))


def spmm(t: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Sparse CSR @ dense product, ``(n x m) @ (m x k) -> (n x k)`` dense.

    ``dense`` is cast to ``t``'s dtype. For ``t.T @ y`` build the transposed matrix
    once with ``csr_to_torch(x.T.tocsr(), ...)``: CSR @ dense is the fast path of MKL
    and cuSPARSE, whereas ``t.t()`` (CSC) @ dense is an order of magnitude slower on
    the CPU.
    """
    return torch.sparse.mm(t, dense.to(t.values().dtype))
