"""h5ad files: which matrix holds the counts, and gene symbols for Ensembl var_names.

Read straight from the HDF5 file (obs/var indexes and columns, the counts
matrix's shape and a sample of its values) so that :func:`_plan_h5ad` never
loads the matrix; :func:`_load_h5ad` then loads the chosen one as CSR.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ... import keys
from ...errors import DataFileError
from ._checks import _check_filtered, _median_per_barcode, _value_problem
from ._common import (
    _COUNTS_ADVICE,
    _REEXPORT,
    _h5_strings,
    _Located,
    _looks_ensembl,
    _open_h5,
    _Plan,
    _shown,
    _where,
)

#: var columns searched, in this order, for symbols when var_names are Ensembl ids.
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_name", "gene_symbol", "symbol", "gene")
_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id")
_PEEK_BLOCKS, _PEEK_BLOCK = 8, 4096  # stored entries sampled to choose an h5ad counts matrix
_DENSE_CHUNK = 1 << 24  # elements read at a time when converting a dense X to CSR


def _h5ad_matrix_shape(elem: h5py.Dataset | h5py.Group) -> tuple[int, ...]:
    if isinstance(elem, h5py.Dataset):
        return tuple(int(n) for n in elem.shape)
    for attr in ("shape", "h5sparse_shape"):
        if attr in elem.attrs:
            return tuple(int(n) for n in elem.attrs[attr])
    raise ValueError(f"the sparse matrix group {elem.name} has no 'shape' attribute")


def _h5ad_index(group: h5py.Group | h5py.Dataset) -> np.ndarray:
    """The index (obs_names / var_names) of an h5ad dataframe element."""
    if isinstance(group, h5py.Dataset):  # anndata < 0.7: a compound dataset
        return np.asarray(group["index"]).astype(str)
    ds = group[group.attrs.get("_index", "_index")]
    if ds.dtype.kind in "SO":
        return np.asarray(ds.asstr()[()], dtype=object).astype(str)
    return np.asarray(ds[()]).astype(str)


def _h5ad_columns(group: h5py.Group | h5py.Dataset) -> list[str]:
    if isinstance(group, h5py.Dataset):
        return [n for n in (group.dtype.names or ()) if n != "index"]
    order = group.attrs.get("column-order")
    if order is not None:
        return [str(c) for c in np.atleast_1d(order)]
    index = group.attrs.get("_index", "_index")
    return [k for k in group if k not in (index, "__categories")]


def _h5ad_column(group: h5py.Group | h5py.Dataset, name: str) -> np.ndarray | None:
    """A var column (plain, categorical or nullable string) as strings, if present."""
    if isinstance(group, h5py.Dataset):
        return np.asarray(group[name]).astype(str) if name in (group.dtype.names or ()) else None
    if name not in group:
        return None
    elem = group[name]
    if isinstance(elem, h5py.Group):
        if "categories" in elem and "codes" in elem:  # categorical
            cats = elem["categories"]
            cats = _h5_strings(cats) if cats.dtype.kind in "SO" else np.asarray(cats[()])
            codes = np.asarray(elem["codes"][()])
            return np.where(codes >= 0, np.asarray(cats).astype(str)[np.clip(codes, 0, None)], "")
        if "values" in elem:  # nullable string array
            values = _h5_strings(elem["values"])
            if "mask" in elem:
                values = np.where(np.asarray(elem["mask"][()], dtype=bool), "", values)
            return values
        return None
    if elem.dtype.kind in "SO":
        return _h5_strings(elem)
    return np.asarray(elem[()]).astype(str)


def _peek(elem: h5py.Dataset | h5py.Group) -> np.ndarray:
    """A sample of a matrix's stored values: a few blocks spread over the file."""
    if isinstance(elem, h5py.Group):
        ds = elem["data"]
        n, block = int(ds.shape[0]), _PEEK_BLOCK
    else:
        ds = elem
        n = int(ds.shape[0]) if ds.ndim else 0
        block = max(1, _PEEK_BLOCK // max(1, int(ds.shape[1]) if ds.ndim > 1 else 1))
    if n == 0:
        return np.zeros(0)
    starts = np.unique(np.linspace(0, max(0, n - block), _PEEK_BLOCKS).astype(int))
    parts = [np.asarray(ds[s : s + block]).ravel() for s in starts]
    values = np.concatenate(parts)
    return values[values != 0] if not isinstance(elem, h5py.Group) else values


def _h5ad_counts(
    f: h5py.File, where: str, counts_layer: str | None
) -> tuple[str, str, h5py.Dataset | h5py.Group]:
    """(label, HDF5 path, element) of the h5ad matrix holding the counts."""
    layers = list(f["layers"]) if isinstance(f.get("layers"), h5py.Group) else []
    named = {f"layers[{name!r}]": f"layers/{name}" for name in layers}
    named |= {"raw.X": "raw/X", "X": "X"}
    if counts_layer is not None:
        label = {"X": "X", "raw.X": "raw.X", "raw": "raw.X"}.get(
            counts_layer, f"layers[{counts_layer!r}]"
        )
        if label not in named or named[label] not in f:
            raise DataFileError(
                f"{where} has no matrix {counts_layer!r} (counts_layer); its layers are "
                f"{_shown(layers, 20) or 'none'}, and it has "
                f"{'X' if 'X' in f else 'no X'} and {'raw.X' if 'raw/X' in f else 'no raw.X'}. "
                "Set counts_layer to one of these (a layer name, 'X' or 'raw.X')."
            )
        candidates = [label]
    else:
        candidates = [c for c in (f"layers[{keys.COUNTS!r}]", "raw.X", "X") if c in named]
        candidates = [c for c in candidates if named[c] in f]
        if not candidates:
            raise DataFileError(
                f"{where} holds no counts: it has neither layers['counts'], raw.X nor X. "
                "Save the raw counts in X or layers['counts']."
            )
    tried = []
    for label in candidates:
        elem = f[named[label]]
        problem = _value_problem(_peek(elem), "sampled stored values")
        if problem is None:
            return label, named[label], elem
        tried.append(f"{label}: {problem}")
    others = [n for n in layers if f"layers[{n!r}]" not in candidates]
    hint = (
        f" It also has the layer(s) {_shown(others, 20)}: if one holds the counts, pass its "
        "name as counts_layer (config or sample sheet)."
        if others and counts_layer is None
        else ""
    )
    raise DataFileError(
        f"{where} holds no raw counts: tried {'; '.join(tried)}. {_COUNTS_ADVICE}{hint}"
    )


def _h5ad_symbols(
    f: h5py.File, var_path: str, where: str, symbol_column: str | None
) -> tuple[list[str], np.ndarray | None, str]:
    """(symbols, ids, where the symbols came from) of an h5ad's var (or raw.var)."""
    group = f[var_path]
    names = _h5ad_index(group)
    prefix = "raw.var" if var_path == "raw/var" else "var"
    columns = _h5ad_columns(group)
    ids = next((_h5ad_column(group, c) for c in _ID_COLUMNS if c in columns), None)
    ensembl = _looks_ensembl(names)
    if ensembl and ids is None:
        ids = names
    if symbol_column is None and not ensembl:
        return list(names), ids, f"{prefix}_names"
    # raw.var often lacks the symbol column that var has (ids in both indexes)
    outer = [c for c in _h5ad_columns(f["var"]) if c not in columns] if prefix == "raw.var" else []
    if symbol_column is not None:
        if symbol_column not in columns + outer:
            raise DataFileError(
                f"{where} has no {prefix}{' or var' if outer else ''} column "
                f"{symbol_column!r} (symbol_column); its columns are "
                f"{_shown(columns + outer, 30) or 'none'}. Set "
                "symbol_column to the column holding gene symbols."
            )
        column = symbol_column
    else:
        column = next((c for c in SYMBOL_COLUMNS if c in columns + outer), None)
        if column is None:
            raise DataFileError(
                f"{where}: the gene names ({prefix}_names, e.g. {_shown(list(names[:3]))}) are "
                f"Ensembl ids and {prefix} has no symbol column (looked for "
                f"{', '.join(SYMBOL_COLUMNS)}; found {_shown(columns, 30) or 'no columns'}). "
                "Add a column of gene symbols to var, or pass symbol_column (config or sample "
                "sheet) naming the column that holds them."
            )
    if column in columns:
        values = _h5ad_column(group, column)
        source = f"{prefix}[{column!r}]"
    else:
        table = pd.Series(_h5ad_column(f["var"], column), index=_h5ad_index(f["var"]))
        table = table[~table.index.duplicated()]
        values = table.reindex(names).fillna("").to_numpy(dtype=str)
        source = f"var[{column!r}]"
    values = np.asarray(values, dtype=str)
    blank = np.isin(values, ["", "nan", "None"])
    return list(np.where(blank, names, values)), ids, source


def _plan_h5ad(
    located: _Located, sample: str | None, counts_layer: str | None, symbol_column: str | None
) -> _Plan:
    file = located.file
    where = _where(file, sample)
    with _open_h5(file, sample) as f:
        for required in ("obs", "var"):
            if required not in f:
                raise DataFileError(
                    f"{where} is not a valid .h5ad file: it has no {required!r} element; {_REEXPORT}"
                )
        label, element, elem = _h5ad_counts(f, where, counts_layer)
        shape = _h5ad_matrix_shape(elem)
        if len(shape) != 2:
            raise DataFileError(
                f"{where}: {label} is not a 2-D matrix (shape {shape}); {_REEXPORT}"
            )
        var_path = "raw/var" if label == "raw.X" else "var"
        n_obs = len(_h5ad_index(f["obs"]))
        symbols, ids, symbols_from = _h5ad_symbols(f, var_path, where, symbol_column)
        types = _h5ad_column(f[var_path], keys.FEATURE_TYPES)
        if shape != (n_obs, len(symbols)):
            raise DataFileError(
                f"{where}: {label} has shape {shape} but the file lists {n_obs} cells "
                f"and {len(symbols)} genes; {_REEXPORT}"
            )
        if isinstance(elem, h5py.Group) and elem.attrs.get("encoding-type") == "csr_matrix":
            _check_filtered(n_obs, _median_per_barcode(elem["indptr"][()]), where)
    return _Plan(located, n_obs, symbols, ids, types, label, symbols_from, element)


def _dense_to_csr(ds: h5py.Dataset) -> sp.csr_matrix:
    """Convert an on-disk dense matrix to CSR a block of rows at a time."""
    n_rows, n_cols = ds.shape
    step = max(1, _DENSE_CHUNK // max(1, n_cols))
    parts = [sp.csr_matrix(ds[i : i + step]) for i in range(0, n_rows, step)]
    return sp.vstack(parts, format="csr") if parts else sp.csr_matrix(ds.shape, dtype=ds.dtype)


def _load_h5ad(file: Path, element: str) -> tuple[sp.csr_matrix, np.ndarray]:
    from anndata.io import read_elem

    with h5py.File(file, "r") as f:
        elem = f[element]
        x = _dense_to_csr(elem) if isinstance(elem, h5py.Dataset) else read_elem(elem)
        barcodes = _h5ad_index(f["obs"])
    return sp.csr_matrix(x), barcodes
