"""Cells x genes matrices that stay on disk: lazy row sources and streamed h5ad writes.

In ``backed`` mode (config ``backed: true``) no stage holds a whole cells x genes
matrix in memory. Matrices are *row sources* (:func:`pipeline.kernels.sparse.is_row_source`):
objects with a 2-D ``shape`` whose ``x[start:stop]`` returns those rows as a scipy
CSR matrix. Two kinds exist:

- an h5ad matrix opened in place, ``anndata.io.sparse_dataset(h5py_group)``
  (:func:`open_csr`), what the runner hands a stage for ``X`` and ``layers``;
- a lazy matrix defined here, computed one block of rows at a time from other
  row sources: :class:`StackedRows` (samples stacked into a cohort, genes mapped
  to the cohort's gene order), :class:`SubsetRows` (kept cells and genes) and
  :class:`MappedRows` (a per-row transformation such as normalisation).

:func:`write_csr` writes any row source into an h5ad group block by block (an
anndata ``csr_matrix`` element, readable by ``anndata.read_h5ad``), so memory is
one block whatever the number of cells.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from anndata.abc import CSRDataset

from ..kernels.sparse import DEFAULT_CHUNK_SIZE, iter_row_blocks, row_block

if TYPE_CHECKING:
    import h5py

__all__ = [
    "MappedRows",
    "StackedRows",
    "SubsetRows",
    "open_csr",
    "scratch_columns",
    "source_location",
    "write_csr",
]

#: HDF5 chunk (in stored values) of matrices written by :func:`write_csr`.
_H5_CHUNK = 1 << 18


def open_csr(group: h5py.Group) -> Any:
    """An h5ad sparse matrix element opened in place (rows read on demand).

    Raises
    ------
    ValueError
        The element is not a CSR matrix (a dense or CSC element).
    """
    import anndata as ad

    enc = group.attrs.get("encoding-type", "") if hasattr(group, "attrs") else ""
    if enc != "csr_matrix":
        msg = f"{group.file.filename}:{group.name} is not a CSR matrix (encoding {enc!r})"
        raise ValueError(msg)
    return ad.io.sparse_dataset(group)


def source_location(x: Any) -> tuple[str, str] | None:
    """``(file, element path)`` of an h5ad matrix opened in place; ``None`` for anything else."""
    group = getattr(x, "group", None)
    if group is None or not hasattr(group, "file"):
        return None
    return str(group.file.filename), str(group.name)


class _RowSource(CSRDataset):
    """Common surface of the lazy matrices: ``shape``, ``dtype``, ``ndim``, ``x[a:b]``.

    They implement anndata's :class:`anndata.abc.CSRDataset` interface, so an
    AnnData can carry one in ``X`` or a layer (as it carries an on-disk matrix);
    the runner writes them block by block (:func:`write_csr`).
    """

    backend = "hdf5"  # computed from h5ad matrices
    shape: tuple[int, int]
    dtype: np.dtype

    def to_memory(self) -> sp.csr_matrix:
        """The whole matrix in memory (for small data and tests only)."""
        blocks = [b for _, _, b in iter_row_blocks(self, chunk_size=DEFAULT_CHUNK_SIZE)]
        if not blocks:
            return sp.csr_matrix(self.shape, dtype=self.dtype)
        return sp.csr_matrix(sp.vstack(blocks, format="csr"), dtype=self.dtype)

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.shape[0]

    @abstractmethod
    def _rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` (``0 <= start < stop <= n_rows``) as CSR."""

    def __getitem__(self, key: Any) -> sp.csr_matrix:
        if not isinstance(key, slice) or key.step not in (None, 1):
            msg = f"{type(self).__name__} supports contiguous row slices x[a:b] only, got {key!r}"
            raise TypeError(msg)
        start, stop, _ = key.indices(self.shape[0])
        if stop <= start:
            return sp.csr_matrix((0, self.shape[1]), dtype=self.dtype)
        return self._rows(start, stop)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.shape[0]} x {self.shape[1]} {self.dtype}>"


class StackedRows(_RowSource):
    """Row sources stacked vertically, each part's columns mapped into one gene order.

    Parameters
    ----------
    parts
        Row sources or in-memory sparse matrices (e.g. one per sample).
    col_maps
        Per part: for each of its columns the output column, ``-1`` to drop it;
        ``None`` keeps the part's columns as they are.
    n_cols
        Number of output columns.
    dtype
        Value dtype of the returned blocks.
    """

    def __init__(
        self,
        parts: Sequence[Any],
        col_maps: Sequence[np.ndarray | None],
        n_cols: int,
        dtype: Any = np.float32,
    ) -> None:
        if len(parts) != len(col_maps):
            msg = f"{len(parts)} parts but {len(col_maps)} column maps"
            raise ValueError(msg)
        self.parts = list(parts)
        self.col_maps = [None if m is None else np.asarray(m, dtype=np.int64) for m in col_maps]
        self.offsets = np.concatenate([[0], np.cumsum([p.shape[0] for p in self.parts])])
        self.shape = (int(self.offsets[-1]), int(n_cols))
        self.dtype = np.dtype(dtype)

    def _part_rows(self, i: int, start: int, stop: int) -> sp.csr_matrix:
        block = row_block(self.parts[i], start, stop)
        cmap = self.col_maps[i]
        if cmap is None:
            return sp.csr_matrix(block, dtype=self.dtype)
        block = sp.csr_matrix(block)
        block.sort_indices()
        new_cols = cmap[block.indices]
        keep = new_cols >= 0
        row_of = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
        out = sp.csr_matrix(
            (block.data[keep].astype(self.dtype), (row_of[keep], new_cols[keep])),
            shape=(block.shape[0], self.shape[1]),
        )
        out.sort_indices()
        return out

    def _rows(self, start: int, stop: int) -> sp.csr_matrix:
        blocks = []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for i in range(first, len(self.parts)):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if lo >= stop:
                break
            a, b = max(start, lo) - lo, min(stop, hi) - lo
            if b > a:
                blocks.append(self._part_rows(i, a, b))
        return sp.csr_matrix(sp.vstack(blocks, format="csr"), dtype=self.dtype)


class SubsetRows(_RowSource):
    """The rows ``rows`` (increasing) and columns ``cols`` of a row source.

    A block of output rows is read from the source as one contiguous range (from
    its first to its last kept row), then subset in memory.
    """

    def __init__(
        self,
        source: Any,
        rows: np.ndarray | None = None,
        cols: np.ndarray | None = None,
        dtype: Any = None,
    ) -> None:
        self.source = source
        n, p = source.shape
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows is not None and self.rows.size > 1 and (np.diff(self.rows) <= 0).any():
            msg = "SubsetRows needs strictly increasing row indices"
            raise ValueError(msg)
        self.cols = None if cols is None else np.asarray(cols, dtype=np.int64)
        self.shape = (
            n if self.rows is None else int(self.rows.size),
            p if self.cols is None else int(self.cols.size),
        )
        self.dtype = np.dtype(dtype if dtype is not None else getattr(source, "dtype", np.float32))

    def _rows(self, start: int, stop: int) -> sp.csr_matrix:
        if self.rows is None:
            block = row_block(self.source, start, stop)
        else:
            want = self.rows[start:stop]
            lo, hi = int(want[0]), int(want[-1]) + 1
            block = row_block(self.source, lo, hi)
            if hi - lo != want.size:
                block = block[want - lo]
        if self.cols is not None:
            block = block[:, self.cols]
        return sp.csr_matrix(block, dtype=self.dtype)


class MappedRows(_RowSource):
    """``fn(block, start, stop)`` applied to each block of rows of a source (same shape).

    ``fn`` receives rows ``start:stop`` of the source as CSR and returns a CSR
    matrix of the same shape (e.g. scaled by per-cell factors ``f[start:stop]``).
    """

    def __init__(
        self,
        source: Any,
        fn: Callable[[sp.csr_matrix, int, int], sp.csr_matrix],
        dtype: Any = np.float32,
    ) -> None:
        self.source = source
        self.fn = fn
        self.shape = tuple(int(s) for s in source.shape)  # type: ignore[assignment]
        self.dtype = np.dtype(dtype)

    def _rows(self, start: int, stop: int) -> sp.csr_matrix:
        return sp.csr_matrix(self.fn(row_block(self.source, start, stop), start, stop))


def write_csr(
    group: h5py.Group,
    name: str,
    source: Any,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    dtype: Any = None,
) -> None:
    """Write a row source (or an in-memory sparse matrix) as ``group[name]``, block by block.

    The element is an anndata ``csr_matrix`` (``data``, ``indices``,
    ``indptr``), written with resizable datasets and extended one block at a time;
    at most one block of rows is in memory.
    """
    import anndata as ad

    dtype = np.dtype(dtype if dtype is not None else getattr(source, "dtype", np.float32))
    n_rows, n_cols = (int(s) for s in source.shape)
    kwargs = {"chunks": (_H5_CHUNK,)}  # anndata adds maxshape=(None,): the datasets can grow
    blocks = iter_row_blocks(source, chunk_size=chunk_size)
    first = next(blocks, None)
    if first is None:
        ad.io.write_elem(group, name, sp.csr_matrix((0, n_cols), dtype=dtype))
        return
    block = sp.csr_matrix(first[2], dtype=dtype)
    block.sort_indices()
    ad.io.write_elem(group, name, block, dataset_kwargs=kwargs)
    ds = ad.io.sparse_dataset(group[name])
    for _, _, block in blocks:
        block = sp.csr_matrix(block, dtype=dtype)
        block.sort_indices()
        ds.append(block)
    if tuple(ds.shape) != (n_rows, n_cols):
        msg = f"write_csr wrote {ds.shape}, expected {(n_rows, n_cols)}"
        raise RuntimeError(msg)


def scratch_columns(
    x: Any,
    cols: np.ndarray,
    stack: contextlib.ExitStack,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prefix: str = "immuneage-",
) -> Any:
    """Copy columns ``cols`` of a row source to a scratch h5ad and return them opened in place.

    For a slice read many times (PCA power iterations, scVI epochs): it is written
    once, block by block, under ``$TMPDIR`` (node-local disk on most clusters).
    ``stack`` owns the file: it is closed and deleted when the stack closes.
    """
    import tempfile

    import h5py

    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix))
    path = f"{tmp}/columns.h5"
    with h5py.File(path, "w") as f:
        write_csr(f, "X", SubsetRows(x, cols=cols, dtype=np.float32), chunk_size=chunk_size)
    return open_csr(stack.enter_context(h5py.File(path, "r"))["X"])
