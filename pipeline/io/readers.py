"""Read one sample's counts file (``.h5ad``, 10x ``.h5`` or a 10x matrix directory).

Three entry points:

* :func:`detect_format` tells which of the accepted layouts a path is;
* :func:`inspect_counts` checks a file's structure without loading the matrix
  (what ``immuneage validate`` runs);
* :func:`read_counts` loads one sample and validates it: integer, finite,
  non-negative counts, unique barcodes, at least one cell, gene and count.

Files are only ever opened read-only, and the cells x genes matrix is never
made dense. Every problem is a :class:`~pipeline.errors.DataFileError` whose
message names the file and the sample and says what to do.
"""

from __future__ import annotations

import gzip
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .. import keys
from ..errors import DataFileError, ImmuneageWarning

__all__ = [
    "FORMATS",
    "CountsFormat",
    "CountsSummary",
    "detect_format",
    "inspect_counts",
    "make_unique",
    "read_counts",
]

logger = logging.getLogger(__name__)

CountsFormat = Literal["h5ad", "10x_h5", "10x_mtx"]
#: The accepted counts file formats, as :func:`detect_format` names them.
FORMATS: tuple[CountsFormat, ...] = ("h5ad", "10x_h5", "10x_mtx")

_GEX = "Gene Expression"
_ACCEPTED = (
    "an .h5ad file, a Cell Ranger .h5 file, or a 10x matrix directory holding "
    "matrix.mtx[.gz], features.tsv[.gz] (or genes.tsv[.gz]) and barcodes.tsv[.gz]"
)
_REEXPORT = "re-copy or re-export the file (it may be truncated or corrupt), then run again"
_N_SHOWN = 5  # how many culprits (barcodes, genes, files) a message lists
_DENSE_CHUNK = 1 << 24  # elements read at a time when converting a dense X to CSR


@dataclass(frozen=True)
class CountsSummary:
    """What :func:`inspect_counts` learns about a counts file without loading its matrix.

    Attributes
    ----------
    path
        The file or directory inspected.
    format
        One of :data:`FORMATS`.
    n_cells
        Number of barcodes (cells).
    n_genes
        Number of genes :func:`read_counts` keeps (``Gene Expression`` features only).
    genes
        Their symbols, made unique as :func:`read_counts` makes them.
    """

    path: Path
    format: CountsFormat
    n_cells: int
    n_genes: int
    genes: tuple[str, ...]


@dataclass(frozen=True)
class _MtxFiles:
    matrix: Path
    features: Path
    barcodes: Path


# --------------------------------------------------------------------------- helpers


def _where(path: Path, sample: str | None) -> str:
    """How messages name the file: ``counts file X (sample 'S')``."""
    return f"counts file {path}" + (f" (sample {sample!r})" if sample is not None else "")


def _shown(values: Sequence[Any], n: int = _N_SHOWN) -> str:
    """``'a', 'b', 'c' and 4 more``."""
    head = ", ".join(repr(str(v)) for v in values[:n])
    return head + (f" and {len(values) - n} more" if len(values) > n else "")


def _first_existing(directory: Path, *names: str) -> Path | None:
    for name in names:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _find_mtx_files(directory: Path) -> tuple[_MtxFiles | None, list[str]]:
    """The three files of a 10x matrix directory, or None and the names missing."""
    matrix = _first_existing(directory, "matrix.mtx.gz", "matrix.mtx")
    features = _first_existing(
        directory, "features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"
    )
    barcodes = _first_existing(directory, "barcodes.tsv.gz", "barcodes.tsv")
    missing = [
        name
        for name, found in (
            ("matrix.mtx[.gz]", matrix),
            ("features.tsv[.gz] or genes.tsv[.gz]", features),
            ("barcodes.tsv[.gz]", barcodes),
        )
        if found is None
    ]
    if matrix is None or features is None or barcodes is None:
        return None, missing
    return _MtxFiles(matrix, features, barcodes), []


def _listing(directory: Path) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    except OSError as exc:
        return f"(cannot list it: {exc.strerror or exc})"
    return _shown(names, 10) if names else "nothing (the directory is empty)"


def _detect(path: Path, sample: str | None) -> CountsFormat:
    where = _where(path, sample)
    if not path.exists():
        raise DataFileError(
            f"{where} does not exist; fix the 'path' column of the sample sheet "
            "(relative paths are relative to the sheet's directory)"
        )
    if path.is_dir():
        files, missing = _find_mtx_files(path)
        if files is not None:
            return "10x_mtx"
        hint = ""
        if (path / "filtered_feature_bc_matrix").is_dir() or (
            path / "filtered_feature_bc_matrix.h5"
        ).is_file():
            hint = (
                " It looks like a Cell Ranger 'outs' directory: point to its "
                "filtered_feature_bc_matrix directory or filtered_feature_bc_matrix.h5."
            )
        raise DataFileError(
            f"{where} is a directory but not a 10x matrix directory: it lacks "
            f"{', '.join(missing)}; found {_listing(path)}. Accepted: {_ACCEPTED}.{hint}"
        )
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        return "h5ad"
    if suffix == ".h5":
        return "10x_h5"
    raise DataFileError(
        f"{where} has an unrecognised format (a file ending in {path.suffix or 'no suffix'!r}). "
        f"Accepted: {_ACCEPTED}. Convert the file or point the sample sheet at one of these."
    )


@contextmanager
def _open_h5(path: Path, sample: str | None) -> Iterator[h5py.File]:
    """Open an HDF5 file read-only, turning an unreadable file into DataFileError."""
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataFileError(
            f"{_where(path, sample)} is not a readable HDF5 file ({exc}); {_REEXPORT}"
        ) from None
    try:
        yield f
    finally:
        f.close()


def make_unique(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Make names unique the way anndata's ``var_names_make_unique`` does.

    The first occurrence keeps its name; later ones get ``-1``, ``-2``, ...
    (skipping suffixes that would collide with another name). Deterministic.

    Parameters
    ----------
    names
        Names in file order.

    Returns
    -------
    The unique names, and the sorted list of names that were repeated.
    """
    names = [str(n) for n in names]
    counts = pd.Index(names).value_counts()
    repeated = sorted(counts.index[counts > 1])
    if not repeated:
        return names, []
    taken = set(names)
    seen: dict[str, int] = {}
    out: list[str] = []
    for name in names:
        k = seen.get(name)
        if k is None:
            seen[name] = 0
            out.append(name)
            continue
        while True:
            k += 1
            candidate = f"{name}-{k}"
            if candidate not in taken:
                break
        seen[name] = k
        taken.add(candidate)
        out.append(candidate)
    return out, repeated


def _gex_mask(feature_types: np.ndarray | None) -> np.ndarray | None:
    if feature_types is None:
        return None
    return np.asarray(feature_types, dtype=str) == _GEX


# --------------------------------------------------------------------------- detect / inspect


def detect_format(path: Path, *, sample: str | None = None) -> CountsFormat:
    """Tell which accepted counts layout ``path`` is.

    Parameters
    ----------
    path
        An ``.h5ad`` file, a Cell Ranger ``.h5`` file, or a directory holding
        ``matrix.mtx[.gz]``, ``features.tsv[.gz]`` (or ``genes.tsv[.gz]``) and
        ``barcodes.tsv[.gz]``.
    sample
        Sample id named in error messages, if known.

    Returns
    -------
    ``"h5ad"``, ``"10x_h5"`` or ``"10x_mtx"``.

    Raises
    ------
    DataFileError
        The path does not exist or is none of these; the message lists what was found.
    """
    return _detect(Path(path), sample)


def inspect_counts(path: Path, *, sample: str | None = None) -> CountsSummary:
    """Check a counts file's structure without loading its matrix.

    h5ad: the shape of ``layers["counts"]`` (else ``X``) against the obs and
    var indexes. 10x h5: the required datasets are present and ``shape``
    agrees with the lengths of ``indptr``, ``barcodes``, the features and
    ``data``/``indices``. 10x mtx: the MatrixMarket header's dimensions agree
    with the line counts of the features and barcodes files.

    Parameters
    ----------
    path
        A counts file or 10x matrix directory.
    sample
        Sample id named in error messages, if known.

    Returns
    -------
    A :class:`CountsSummary`.

    Raises
    ------
    DataFileError
        The path is missing, of an unknown format, unreadable or inconsistent.
    """
    path = Path(path)
    return _inspect(path, _detect(path, sample), sample)


def _inspect(path: Path, fmt: CountsFormat, sample: str | None) -> CountsSummary:
    where = _where(path, sample)
    try:
        if fmt == "h5ad":
            n_cells, symbols, feature_types = _inspect_h5ad(path, sample)
        elif fmt == "10x_h5":
            n_cells, symbols, feature_types = _inspect_10x_h5(path, sample)
        else:
            n_cells, symbols, feature_types = _inspect_mtx(path, sample)
    except DataFileError:
        raise
    except Exception as exc:
        raise DataFileError(
            f"{where} could not be read ({type(exc).__name__}: {exc}); {_REEXPORT}"
        ) from exc
    mask = _gex_mask(feature_types)
    if mask is not None:
        symbols = [s for s, keep in zip(symbols, mask, strict=True) if keep]
    genes, _ = make_unique(symbols)
    return CountsSummary(
        path=path, format=fmt, n_cells=n_cells, n_genes=len(genes), genes=tuple(genes)
    )


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


def _h5ad_column(group: h5py.Group | h5py.Dataset, name: str) -> np.ndarray | None:
    """A string var column (plain or categorical) of an h5ad dataframe element, if present."""
    if isinstance(group, h5py.Dataset):
        return np.asarray(group[name]).astype(str) if name in (group.dtype.names or ()) else None
    if name not in group:
        return None
    elem = group[name]
    if isinstance(elem, h5py.Group):
        if "categories" in elem and "codes" in elem:  # categorical
            cats = np.asarray(elem["categories"].asstr()[()], dtype=object).astype(str)
            codes = np.asarray(elem["codes"][()])
            return np.where(codes >= 0, cats[np.clip(codes, 0, None)], "")
        if "values" in elem:  # nullable string array
            return np.asarray(elem["values"].asstr()[()], dtype=object).astype(str)
        return None
    if elem.dtype.kind in "SO":
        return np.asarray(elem.asstr()[()], dtype=object).astype(str)
    return np.asarray(elem[()]).astype(str)


def _inspect_h5ad(path: Path, sample: str | None) -> tuple[int, list[str], np.ndarray | None]:
    where = _where(path, sample)
    with _open_h5(path, sample) as f:
        if "layers" in f and keys.COUNTS in f["layers"]:
            elem, name = f["layers"][keys.COUNTS], f"layers[{keys.COUNTS!r}]"
        elif "X" in f:
            elem, name = f["X"], "X"
        else:
            raise DataFileError(
                f"{where} holds no counts: it has neither layers['counts'] nor X. "
                "Save the raw counts in X or layers['counts']."
            )
        for required in ("obs", "var"):
            if required not in f:
                raise DataFileError(
                    f"{where} is not a valid .h5ad file: it has no {required!r} element; {_REEXPORT}"
                )
        shape = _h5ad_matrix_shape(elem)
        if len(shape) != 2:
            raise DataFileError(f"{where}: {name} is not a 2-D matrix (shape {shape}); {_REEXPORT}")
        obs_names = _h5ad_index(f["obs"])
        var_names = _h5ad_index(f["var"])
        feature_types = _h5ad_column(f["var"], keys.FEATURE_TYPES)
    if shape != (len(obs_names), len(var_names)):
        raise DataFileError(
            f"{where}: {name} has shape {shape} but the file lists {len(obs_names)} cells "
            f"and {len(var_names)} genes; {_REEXPORT}"
        )
    return len(obs_names), list(var_names), feature_types


def _h5_strings(ds: h5py.Dataset) -> np.ndarray:
    return np.asarray(ds.asstr()[()], dtype=object).astype(str)


def _inspect_10x_h5(path: Path, sample: str | None) -> tuple[int, list[str], np.ndarray | None]:
    where = _where(path, sample)
    with _open_h5(path, sample) as f:
        if "matrix" in f:  # Cell Ranger >= 3
            layout = {
                "barcodes": "matrix/barcodes",
                "data": "matrix/data",
                "indices": "matrix/indices",
                "indptr": "matrix/indptr",
                "shape": "matrix/shape",
                "id": "matrix/features/id",
                "name": "matrix/features/name",
                "feature_type": "matrix/features/feature_type",
            }
        else:  # Cell Ranger 2: one group per genome
            genomes = [k for k in f if isinstance(f[k], h5py.Group)]
            if len(genomes) != 1:
                found = _shown(list(f.keys())) or "nothing"
                raise DataFileError(
                    f"{where} is not a Cell Ranger .h5 file: expected a 'matrix' group "
                    f"(Cell Ranger >= 3) or a single genome group (Cell Ranger 2), found {found}. "
                    "Pass the filtered_feature_bc_matrix.h5 Cell Ranger wrote, with one genome."
                )
            g = genomes[0]
            layout = {
                "barcodes": f"{g}/barcodes",
                "data": f"{g}/data",
                "indices": f"{g}/indices",
                "indptr": f"{g}/indptr",
                "shape": f"{g}/shape",
                "id": f"{g}/genes",
                "name": f"{g}/gene_names",
            }
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
        if not bad and n_cells > 0:
            last = int(ds["indptr"][n_cells])
            if last != lengths["data"]:
                bad.append(f"indptr ends at {last} but data has {lengths['data']} entries")
        if bad:
            raise DataFileError(
                f"{where} is inconsistent with its shape {n_features} features x {n_cells} "
                f"barcodes: {'; '.join(bad)}; {_REEXPORT}"
            )
        symbols = list(_h5_strings(ds["name"]))
        feature_types = _h5_strings(ds["feature_type"]) if "feature_type" in ds else None
    return n_cells, symbols, feature_types


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


def _mtx_features(files: _MtxFiles) -> tuple[list[str], np.ndarray | None, np.ndarray | None]:
    """(symbols, ids, feature types) from features.tsv / genes.tsv."""
    try:
        table = _read_tsv(files.features)
    except pd.errors.EmptyDataError:
        return [], None, None
    ids = table[0].to_numpy(dtype=str)
    symbols = table[1].to_numpy(dtype=str) if table.shape[1] > 1 else ids
    types = table[2].to_numpy(dtype=str) if table.shape[1] > 2 else None
    return list(symbols), ids, types


def _mtx_barcodes(files: _MtxFiles) -> np.ndarray:
    try:
        return _read_tsv(files.barcodes)[0].to_numpy(dtype=str)
    except pd.errors.EmptyDataError:
        return np.array([], dtype=str)


def _inspect_mtx(path: Path, sample: str | None) -> tuple[int, list[str], np.ndarray | None]:
    where = _where(path, sample)
    files, _ = _find_mtx_files(path)
    assert files is not None  # _detect checked
    rows, cols, _nnz = _mtx_header(files.matrix, where)
    symbols, _ids, types = _mtx_features(files)
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
    return n_barcodes, symbols, types


# --------------------------------------------------------------------------- read


def read_counts(path: Path, *, sample: str) -> AnnData:
    """Load one sample's raw counts and validate them.

    Parameters
    ----------
    path
        An ``.h5ad`` file (counts from ``layers["counts"]`` when present, else
        ``X``), a Cell Ranger ``.h5`` file or a 10x matrix directory. Opened read-only.
    sample
        The sample id, used in messages.

    Returns
    -------
    AnnData with

    ``X``
        CSR float32 integer-valued counts, cells x genes.
    ``layers["counts"]``
        The same matrix object as ``X``.
    ``obs_names``, ``obs["barcode"]``
        The file's barcodes.
    ``var_names``
        Gene symbols, made unique (a repeated ``X`` becomes ``X-1``, ...).
    ``var["gene_ids"]``
        Gene ids, when the file has them.
    ``var["gene_symbol_original"]``
        The symbols as in the file.

    Only ``Gene Expression`` features are kept when the file has feature types.

    Raises
    ------
    DataFileError
        The file is missing, of an unknown format, unreadable or inconsistent;
        the counts are not finite non-negative integers; the matrix is empty;
        or barcodes repeat.

    Warns
    -----
    ImmuneageWarning
        Gene symbols repeat (they are made unique).
    """
    path = Path(path)
    where = _where(path, sample)
    fmt = _detect(path, sample)
    _inspect(path, fmt, sample)  # precise structural errors before the full read
    try:
        with warnings.catch_warnings():
            # duplicates are checked (and reported) below
            warnings.filterwarnings(
                "ignore", message=".*names are not unique", category=UserWarning
            )
            if fmt == "h5ad":
                x, barcodes, symbols, ids, types = _load_h5ad(path, where)
            elif fmt == "10x_h5":
                x, barcodes, symbols, ids, types = _load_10x_h5(path)
            else:
                x, barcodes, symbols, ids, types = _load_mtx(path, where)
    except DataFileError:
        raise
    except Exception as exc:
        raise DataFileError(
            f"{where} could not be read ({type(exc).__name__}: {exc}); {_REEXPORT}"
        ) from exc
    return _finish(x, barcodes, symbols, ids, types, path=path, where=where)


_Loaded = tuple[sp.csr_matrix, np.ndarray, list[str], np.ndarray | None, np.ndarray | None]


def _dense_to_csr(ds: h5py.Dataset) -> sp.csr_matrix:
    """Convert an on-disk dense matrix to CSR a block of rows at a time."""
    n_rows, n_cols = ds.shape
    step = max(1, _DENSE_CHUNK // max(1, n_cols))
    parts = [sp.csr_matrix(ds[i : i + step]) for i in range(0, n_rows, step)]
    return sp.vstack(parts, format="csr") if parts else sp.csr_matrix(ds.shape, dtype=ds.dtype)


def _to_csr(x: Any) -> sp.csr_matrix:
    if isinstance(x, h5py.Dataset):
        return _dense_to_csr(x)
    if hasattr(x, "to_memory") and not sp.issparse(x):  # anndata's backed sparse dataset
        x = x.to_memory()
    return sp.csr_matrix(x)


def _load_h5ad(path: Path, where: str) -> _Loaded:
    adata = anndata.read_h5ad(path, backed="r")
    try:
        if keys.COUNTS in adata.layers:
            x = adata.layers[keys.COUNTS]
        elif adata.X is not None:
            x = adata.X
        else:
            raise DataFileError(
                f"{where} holds no counts: it has neither layers['counts'] nor X. "
                "Save the raw counts in X or layers['counts']."
            )
        x = _to_csr(x)
        barcodes = adata.obs_names.to_numpy(dtype=str)
        symbols = list(adata.var_names.astype(str))
        var = adata.var
        ids = var[keys.GENE_IDS].astype(str).to_numpy() if keys.GENE_IDS in var else None
        types = (
            var[keys.FEATURE_TYPES].astype(str).to_numpy() if keys.FEATURE_TYPES in var else None
        )
    finally:
        if adata.file.is_open:
            adata.file.close()
    return x, barcodes, symbols, ids, types


def _load_10x_h5(path: Path) -> _Loaded:
    import scanpy as sc

    adata = sc.read_10x_h5(path, gex_only=False)
    var = adata.var
    ids = var[keys.GENE_IDS].astype(str).to_numpy() if keys.GENE_IDS in var else None
    types = var[keys.FEATURE_TYPES].astype(str).to_numpy() if keys.FEATURE_TYPES in var else None
    return (
        _to_csr(adata.X),
        adata.obs_names.to_numpy(dtype=str),
        list(adata.var_names.astype(str)),
        ids,
        types,
    )


def _load_mtx(path: Path, where: str) -> _Loaded:
    # scanpy's read_10x_mtx only knows gzipped features.tsv or plain genes.tsv;
    # reading the three files here accepts every layout detect_format accepts.
    from scipy.io import mmread

    files, _ = _find_mtx_files(path)
    assert files is not None
    rows, cols, _ = _mtx_header(files.matrix, where)
    try:
        m = mmread(str(files.matrix))
    except ValueError as exc:
        raise DataFileError(
            f"{where}: {files.matrix.name} has an entry outside its declared {rows} x {cols} "
            f"dimensions or a malformed line ({exc}); {_REEXPORT}"
        ) from None
    symbols, ids, types = _mtx_features(files)
    x = sp.csr_matrix(sp.coo_matrix(m).T)  # genes x cells -> cells x genes
    return x, _mtx_barcodes(files), symbols, ids, types


def _check_values(x: sp.csr_matrix, where: str) -> None:
    """Counts must be finite, non-negative whole numbers (checked on stored entries only)."""
    data = x.data
    advice = (
        "immuneage needs raw UMI counts, not normalised, scaled or log-transformed data; "
        "pass the raw counts (in an .h5ad: layers['counts'] or X)."
    )
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raise DataFileError(
                f"{where}: {int(bad.sum())} of {data.size} stored counts are NaN or infinite "
                f"(e.g. {data[bad][0].item()}). {advice}"
            )
    elif data.dtype.kind not in "iub":
        raise DataFileError(f"{where}: counts have the non-numeric type {data.dtype}. {advice}")
    neg = data < 0
    if neg.any():
        raise DataFileError(
            f"{where}: {int(neg.sum())} of {data.size} stored counts are negative "
            f"(e.g. {data[neg][0].item()}). {advice}"
        )
    if data.dtype.kind == "f":
        frac = data != np.rint(data)
        if frac.any():
            raise DataFileError(
                f"{where}: {int(frac.sum())} of {data.size} stored counts are not whole numbers "
                f"(e.g. {float(data[frac][0]):.6g}). {advice}"
            )


def _finish(
    x: sp.csr_matrix,
    barcodes: np.ndarray,
    symbols: list[str],
    ids: np.ndarray | None,
    types: np.ndarray | None,
    *,
    path: Path,
    where: str,
) -> AnnData:
    if len(barcodes) != x.shape[0] or len(symbols) != x.shape[1]:
        raise DataFileError(
            f"{where}: the matrix is {x.shape[0]} x {x.shape[1]} but the file lists "
            f"{len(barcodes)} barcodes and {len(symbols)} genes; {_REEXPORT}"
        )
    try:
        x.check_format(full_check=True)  # entries inside the shape, indptr monotonic
    except ValueError as exc:
        raise DataFileError(
            f"{where}: the sparse matrix is malformed ({exc}), e.g. an entry lies outside "
            f"its {x.shape[1]} genes; {_REEXPORT}"
        ) from None
    mask = _gex_mask(types)
    if mask is not None and not mask.all():
        n_other = int((~mask).sum())
        other = sorted(set(np.asarray(types)[~mask]))
        logger.info(
            "%s: dropped %d non-'Gene Expression' features (%s)", where, n_other, ", ".join(other)
        )
        x = x[:, np.flatnonzero(mask)]
        symbols = [s for s, keep in zip(symbols, mask, strict=True) if keep]
        ids = ids[mask] if ids is not None else None
        if not symbols:
            raise DataFileError(
                f"{where} has no 'Gene Expression' features (only {', '.join(other)}); "
                "pass a gene expression counts file"
            )
    n_cells, n_genes = x.shape
    if n_cells == 0 or n_genes == 0:
        raise DataFileError(
            f"{where} is empty ({n_cells} cells x {n_genes} genes); "
            "remove the sample from the sheet or pass the right file"
        )
    _check_values(x, where)
    x = sp.csr_matrix((x.data.astype(np.float32), x.indices, x.indptr), shape=x.shape)
    x.sum_duplicates()
    x.eliminate_zeros()
    if x.nnz == 0:
        raise DataFileError(
            f"{where} holds no counts ({n_cells} cells x {n_genes} genes, every entry zero); "
            "remove the sample from the sheet or pass the right file"
        )

    bc = pd.Index(barcodes.astype(str))
    if bc.has_duplicates:
        dup = bc[bc.duplicated()].unique().tolist()
        raise DataFileError(
            f"{where} has {len(dup)} repeated barcode(s): {_shown(dup)}. Each barcode must "
            "appear once per sample; if the file merges several libraries, split it into "
            "one sample per library or make the barcodes unique."
        )
    names, repeated = make_unique(symbols)
    if repeated:
        warnings.warn(
            f"{where}: {len(repeated)} gene symbol(s) repeat and were made unique by "
            f"appending -1, -2, ...: {_shown(repeated)}",
            ImmuneageWarning,
            stacklevel=3,
        )
    obs = pd.DataFrame({keys.BARCODE: bc.to_numpy()}, index=bc)
    obs.index.name = None
    var = pd.DataFrame(index=pd.Index(names))
    if ids is not None:
        var[keys.GENE_IDS] = np.asarray(ids, dtype=str)
    var[keys.GENE_SYMBOL_ORIGINAL] = np.asarray(symbols, dtype=str)
    adata = AnnData(X=x, obs=obs, var=var)
    adata.layers[keys.COUNTS] = adata.X
    return adata
