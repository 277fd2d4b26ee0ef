"""10x matrices: Cell Ranger ``.h5`` files (v3+ and v2) and MatrixMarket directories.

:func:`_plan_10x_h5` and :func:`_plan_mtx` check a matrix's structure without
loading it; :func:`_load_10x_h5` and :func:`_load_mtx` load it as cells x genes CSR.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import IO

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...errors import DataFileError
from ._checks import _check_filtered, _median_per_barcode
from ._common import (
    _ACCEPTED,
    _REEXPORT,
    _h5_strings,
    _Located,
    _open_h5,
    _Plan,
    _shown,
    _where,
)
from ._locate import _find_mtx_files, _MtxFiles


def _10x_h5_layout(f: h5py.File, where: str) -> dict[str, str]:
    if "matrix" in f:  # Cell Ranger >= 3
        return {
            "barcodes": "matrix/barcodes",
            "data": "matrix/data",
            "indices": "matrix/indices",
            "indptr": "matrix/indptr",
            "shape": "matrix/shape",
            "id": "matrix/features/id",
            "name": "matrix/features/name",
            "feature_type": "matrix/features/feature_type",
        }
    genomes = [k for k in f if isinstance(f[k], h5py.Group)]  # Cell Ranger 2
    if len(genomes) != 1:
        found = _shown(list(f.keys())) or "nothing"
        raise DataFileError(
            f"{where} is not a Cell Ranger .h5 file: expected a 'matrix' group "
            f"(Cell Ranger >= 3) or a single genome group (Cell Ranger 2), found {found}. "
            f"Accepted: {_ACCEPTED}."
        )
    g = genomes[0]
    return {
        "barcodes": f"{g}/barcodes",
        "data": f"{g}/data",
        "indices": f"{g}/indices",
        "indptr": f"{g}/indptr",
        "shape": f"{g}/shape",
        "id": f"{g}/genes",
        "name": f"{g}/gene_names",
    }


def _plan_10x_h5(located: _Located, sample: str | None) -> _Plan:
    file = located.file
    where = _where(file, sample)
    with _open_h5(file, sample) as f:
        layout = _10x_h5_layout(f, where)
        missing = [p for p in layout.values() if not isinstance(f.get(p), h5py.Dataset)]
        if missing:
            raise DataFileError(
                f"{where} is missing the required dataset(s) {', '.join(missing)}; "
                f"it is not a complete Cell Ranger .h5 file; {_REEXPORT}"
            )
        ds = {k: f[p] for k, p in layout.items()}
        shape = tuple(int(n) for n in ds["shape"][()])
        if len(shape) != 2:
            raise DataFileError(f"{where}: 'shape' is {shape}, not two numbers; {_REEXPORT}")
        n_features, n_cells = shape
        lengths = {k: int(d.shape[0]) if d.shape else 0 for k, d in ds.items() if k != "shape"}
        expect = {
            "barcodes": n_cells,
            "indptr": n_cells + 1,
            "id": n_features,
            "name": n_features,
            "feature_type": n_features,
            "indices": lengths["data"],
        }
        bad = [
            f"{layout[k]} has {lengths[k]} entries, expected {n}"
            for k, n in expect.items()
            if k in lengths and lengths[k] != n
        ]
        indptr = np.asarray(ds["indptr"][()]) if not bad else None
        if indptr is not None and n_cells > 0 and int(indptr[n_cells]) != lengths["data"]:
            bad.append(
                f"indptr ends at {int(indptr[n_cells])} but data has {lengths['data']} entries"
            )
        if bad:
            raise DataFileError(
                f"{where} is inconsistent with its shape {n_features} features x {n_cells} "
                f"barcodes: {'; '.join(bad)}; {_REEXPORT}"
            )
        assert indptr is not None
        _check_filtered(n_cells, _median_per_barcode(indptr), where)
        symbols = list(_h5_strings(ds["name"]))
        ids = _h5_strings(ds["id"])
        types = _h5_strings(ds["feature_type"]) if "feature_type" in ds else None
    return _Plan(located, n_cells, symbols, ids, types, "matrix", layout["name"])


def _peek_10x_h5(file: Path, where: str) -> np.ndarray:
    """A sample of a Cell Ranger ``.h5``'s stored counts: a few blocks spread over ``data``."""
    from ._h5ad import _peek

    with h5py.File(file, "r") as f:
        return _peek(f[_10x_h5_layout(f, where)["data"]])


def _peek_mtx(directory: Path, n: int) -> np.ndarray:
    """The values of the first ``n`` entries of a 10x matrix directory's ``matrix.mtx[.gz]``.

    Empty for a ``pattern`` matrix (no values stored). A value that is not a
    number becomes NaN (so the counts check names it).
    """
    files, _ = _find_mtx_files(directory)
    assert files is not None
    values: list[float] = []
    with _open_text(files.matrix) as fh:
        fields = fh.readline().split()
        if len(fields) > 3 and fields[3].lower() == "pattern":
            return np.zeros(0)
        size_seen = False
        for line in fh:
            if not line.strip() or line.startswith("%"):
                continue
            if not size_seen:
                size_seen = True
                continue
            parts = line.split()
            try:
                values.append(float(parts[2]))
            except (IndexError, ValueError):
                values.append(float("nan"))
            if len(values) >= n:
                break
    return np.asarray(values, dtype=np.float64)


def _load_10x_h5(file: Path, where: str) -> tuple[sp.csr_matrix, np.ndarray]:
    with h5py.File(file, "r") as f:
        layout = _10x_h5_layout(f, where)
        n_features, n_cells = (int(n) for n in f[layout["shape"]][()])
        # a features x barcodes CSC matrix is, read row-wise, a cells x genes CSR one
        x = sp.csr_matrix(
            (f[layout["data"]][()], f[layout["indices"]][()], f[layout["indptr"]][()]),
            shape=(n_cells, n_features),
        )
        barcodes = _h5_strings(f[layout["barcodes"]])
    return x, barcodes


def _open_text(path: Path) -> IO[str]:
    return gzip.open(path, "rt") if path.name.endswith(".gz") else open(path)


def _mtx_header(path: Path, where: str) -> tuple[int, int, int]:
    """(rows, columns, entries) from a MatrixMarket file's banner and size line."""
    with _open_text(path) as fh:
        banner = fh.readline()
        if not banner.lower().startswith("%%matrixmarket"):
            raise DataFileError(
                f"{where}: {path.name} is not a MatrixMarket file (first line {banner[:60]!r}); "
                f"{_REEXPORT}"
            )
        fields = banner.split()
        if len(fields) < 3 or fields[2].lower() != "coordinate":
            raise DataFileError(
                f"{where}: {path.name} is a MatrixMarket {' '.join(fields[1:3])!r} file; "
                "only the sparse 'coordinate' layout Cell Ranger writes is supported"
            )
        for line in fh:
            if line.strip() and not line.startswith("%"):
                size = line.split()
                break
        else:
            raise DataFileError(f"{where}: {path.name} has no size line; {_REEXPORT}")
    if len(size) != 3 or not all(s.isdigit() for s in size):
        raise DataFileError(
            f"{where}: {path.name} has a malformed size line {' '.join(size)!r} "
            f"(expected 'rows columns entries'); {_REEXPORT}"
        )
    rows, cols, nnz = (int(s) for s in size)
    return rows, cols, nnz


def _read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(
        path,
        sep="\t",
        header=None,
        dtype=str,
        keep_default_na=False,
        quoting=3,  # csv.QUOTE_NONE
        compression="gzip" if path.name.endswith(".gz") else None,
    )


def _mtx_features(files: _MtxFiles) -> tuple[list[str], np.ndarray | None, np.ndarray | None, str]:
    """(symbols, ids, feature types, where the symbols are) from features.tsv / genes.tsv."""
    name = files.features.name.removesuffix(".gz")
    try:
        table = _read_tsv(files.features)
    except pd.errors.EmptyDataError:
        return [], None, None, f"{name} column 2"
    ids = table[0].to_numpy(dtype=str)
    if table.shape[1] == 1:
        return list(ids), None, None, f"{name} column 1"
    types = table[2].to_numpy(dtype=str) if table.shape[1] > 2 else None
    return list(table[1].to_numpy(dtype=str)), ids, types, f"{name} column 2"


def _mtx_barcodes(files: _MtxFiles) -> np.ndarray:
    try:
        return _read_tsv(files.barcodes)[0].to_numpy(dtype=str)
    except pd.errors.EmptyDataError:
        return np.array([], dtype=str)


def _plan_mtx(located: _Located, sample: str | None) -> _Plan:
    where = _where(located.file, sample)
    files, _ = _find_mtx_files(located.file)
    assert files is not None  # _locate checked
    rows, cols, nnz = _mtx_header(files.matrix, where)
    symbols, ids, types, symbols_from = _mtx_features(files)
    n_barcodes = len(_mtx_barcodes(files))
    if (rows, cols) != (len(symbols), n_barcodes):
        hint = ""
        if (rows, cols) == (n_barcodes, len(symbols)):
            hint = " The matrix looks transposed: 10x matrices are genes x cells."
        raise DataFileError(
            f"{where}: {files.matrix.name} declares {rows} genes x {cols} cells but "
            f"{files.features.name} lists {len(symbols)} features and {files.barcodes.name} "
            f"lists {n_barcodes} barcodes.{hint} The three files must come from the same run; "
            "re-export them together."
        )
    # the header only tells the mean entries per barcode; read_counts checks the median
    _check_filtered(cols, nnz / max(1, cols), where, statistic="mean")
    return _Plan(located, n_barcodes, symbols, ids, types, "matrix", symbols_from)


def _load_mtx(directory: Path, where: str) -> tuple[sp.csr_matrix, np.ndarray]:
    # scanpy's read_10x_mtx only knows gzipped features.tsv or plain genes.tsv;
    # reading the three files here accepts every layout detect_format accepts.
    from scipy.io import mmread

    files, _ = _find_mtx_files(directory)
    assert files is not None
    rows, cols, _ = _mtx_header(files.matrix, where)
    try:
        m = mmread(str(files.matrix))
    except ValueError as exc:
        raise DataFileError(
            f"{where}: {files.matrix.name} has an entry outside its declared {rows} x {cols} "
            f"dimensions or a malformed line ({exc}); {_REEXPORT}"
        ) from None
    x = sp.csr_matrix(sp.coo_matrix(m).T)  # genes x cells -> cells x genes
    return x, _mtx_barcodes(files)
