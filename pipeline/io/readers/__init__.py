"""Read one sample's counts, in every shape sequencing cores and portals deliver them.

Three entry points:

* :func:`detect_format` tells which of the accepted layouts a path is;
* :func:`inspect_counts` checks a file's structure without loading the matrix
  (what ``immuneage validate`` runs);
* :func:`read_counts` loads one sample and validates it: integer, finite,
  non-negative counts, unique barcodes, at least one cell, gene and count.

Accepted inputs (``path``):

* an ``.h5ad`` file: counts from ``layers["counts"]``, else ``raw.X``, else
  ``X``: the first whose stored entries (a sample of them) are non-negative
  whole numbers, or the matrix named by ``counts_layer``;
* a Cell Ranger ``.h5`` file (v3+ ``matrix`` group, or v2 ``/<genome>/`` group);
* a 10x matrix directory (``matrix.mtx[.gz]``, ``features.tsv[.gz]`` or
  ``genes.tsv[.gz]``, ``barcodes.tsv[.gz]``);
* a Cell Ranger folder: ``count``'s ``outs/`` or the sample folder above it
  (the filtered matrix is read, ``.h5`` preferred), ``multi``'s ``outs/``
  (``per_sample_outs/<sample>/count/sample_filtered_feature_bc_matrix.h5``,
  when it holds one sample), a v2 ``filtered_gene_bc_matrices/`` with one
  genome, or a file inside such a folder.

Cell Ranger's raw matrices (all droplets) are never read as cells: a path named
like one, or any matrix that looks unfiltered (see :data:`UNFILTERED_MIN_BARCODES`),
is refused. Only ``Gene Expression`` features become genes; other feature types
(antibody, CRISPR guide, multiplexing capture) are kept in ``obsm``. Ensembl ids
as gene names are mapped to symbols from a var column.

Files are only ever opened read-only, and the cells x genes matrix is never
made dense. Every problem is a :class:`~pipeline.errors.DataFileError` whose
message names the file and the sample and says what to do.
"""

from __future__ import annotations

import gzip
import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ... import keys
from ...errors import DataFileError, ImmuneageWarning

__all__ = [
    "FORMATS",
    "SYMBOL_COLUMNS",
    "UNFILTERED_MAX_MEDIAN_FEATURES",
    "UNFILTERED_MIN_BARCODES",
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

#: var columns searched, in this order, for symbols when var_names are Ensembl ids.
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_name", "gene_symbol", "symbol", "gene")
_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id")
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")

#: A matrix with at least this many barcodes ...
UNFILTERED_MIN_BARCODES = 20_000
#: ... whose median barcode holds fewer than this many detected features (stored
#: entries) is unfiltered droplets, not cells. Cell Ranger's raw matrices have a
#: median of 1-3; filtered scRNA-seq cells have hundreds.
UNFILTERED_MAX_MEDIAN_FEATURES = 20

_GEX = "Gene Expression"
_ACCEPTED = (
    "an .h5ad file, a Cell Ranger .h5 file, a 10x matrix directory holding "
    "matrix.mtx[.gz], features.tsv[.gz] (or genes.tsv[.gz]) and barcodes.tsv[.gz], "
    "or a Cell Ranger outs/ folder (or the sample folder above it)"
)
_REEXPORT = "re-copy or re-export the file (it may be truncated or corrupt), then run again"
_RAW_ADVICE = (
    "point the sample sheet at the filtered matrix (outs/filtered_feature_bc_matrix.h5 or "
    "outs/filtered_feature_bc_matrix/, or the Cell Ranger outs/ folder), or run cell calling "
    "(e.g. Cell Ranger, EmptyDrops or CellBender) first"
)
_COUNTS_ADVICE = (
    "immuneage needs raw UMI counts, not normalised, scaled or log-transformed data; "
    "pass the raw counts (in an .h5ad: layers['counts'], raw.X or X, or name the layer "
    "with counts_layer)."
)
_N_SHOWN = 5  # how many culprits (barcodes, genes, files) a message lists
_DENSE_CHUNK = 1 << 24  # elements read at a time when converting a dense X to CSR
_PEEK_BLOCKS, _PEEK_BLOCK = 8, 4096  # stored entries sampled to choose an h5ad counts matrix

# Cell Ranger file names, filtered (read) and raw (never read as cells)
_FILTERED_H5 = (
    "filtered_feature_bc_matrix.h5",
    "sample_filtered_feature_bc_matrix.h5",
    "filtered_gene_bc_matrices_h5.h5",
)
_FILTERED_DIRS = ("filtered_feature_bc_matrix", "sample_filtered_feature_bc_matrix")
_RAW_NAMES = (
    "raw_feature_bc_matrix",
    "raw_feature_bc_matrix.h5",
    "sample_raw_feature_bc_matrix",
    "raw_gene_bc_matrices",
    "raw_gene_bc_matrices_h5.h5",
)


@dataclass(frozen=True)
class CountsSummary:
    """What :func:`inspect_counts` learns about a counts file without loading its matrix.

    Attributes
    ----------
    path
        The path given (file, matrix directory or Cell Ranger folder).
    format
        One of :data:`FORMATS`: the format of ``file``.
    n_cells
        Number of barcodes (cells).
    n_genes
        Number of genes :func:`read_counts` keeps (``Gene Expression`` features only).
    genes
        Their symbols, made unique as :func:`read_counts` makes them.
    file
        The matrix file or directory actually read.
    counts_source
        Where the counts are: ``"matrix"`` (10x), ``"layers['counts']"``,
        ``"raw.X"`` or ``"X"`` (h5ad).
    symbols_from
        Where the symbols come from, e.g. ``"var_names"``, ``"var['feature_name']"``,
        ``"features.tsv column 2"``.
    raw_matrix
        A Cell Ranger raw matrix (all droplets) found beside the filtered one, or ``""``.
    other_features
        Number of features of each non-``Gene Expression`` type (kept in ``obsm``).
    """

    path: Path
    format: CountsFormat
    n_cells: int
    n_genes: int
    genes: tuple[str, ...]
    file: Path | None = None
    counts_source: str = ""
    symbols_from: str = ""
    raw_matrix: str = ""
    other_features: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _MtxFiles:
    matrix: Path
    features: Path
    barcodes: Path


@dataclass(frozen=True)
class _Located:
    """The matrix a path leads to."""

    file: Path
    format: CountsFormat
    raw_matrix: str


@dataclass(frozen=True)
class _Plan:
    """What :func:`_plan` learns from a file's structure; :func:`read_counts` follows it."""

    located: _Located
    n_cells: int
    symbols: list[str]  # every feature, file order (symbols after any id -> symbol mapping)
    ids: np.ndarray | None
    types: np.ndarray | None
    counts_source: str
    symbols_from: str
    element: str = ""  # h5ad: the HDF5 path of the counts matrix


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


def _subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir())


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


def _gex_mask(feature_types: np.ndarray | None, n: int) -> np.ndarray:
    if feature_types is None:
        return np.ones(n, dtype=bool)
    return np.asarray(feature_types, dtype=str) == _GEX


def _looks_ensembl(names: Sequence[str]) -> bool:
    """Most names (a majority) are Ensembl gene ids (ENSG..., ENSMUSG..., ...)."""
    if len(names) == 0:
        return False
    hits = pd.Series(np.asarray(names, dtype=str)).str.match(_ENSEMBL)
    return bool(hits.mean() > 0.5)


# --------------------------------------------------------------------------- locate


def _refuse_raw(path: Path, where: str) -> None:
    """A path Cell Ranger names as a raw matrix (all droplets) is never read as cells."""
    names = {path.name, path.parent.name}  # v2: raw_gene_bc_matrices/<genome>/
    if path.name in ("matrix.mtx", "matrix.mtx.gz"):
        names |= {path.parent.parent.name, path.parent.name}
    hit = sorted(names & set(_RAW_NAMES))
    if hit:
        raise DataFileError(
            f"{where} is Cell Ranger's {hit[0]}: unfiltered droplets (every barcode, mostly "
            f"empty), not cells; {_RAW_ADVICE}. The raw matrix is only used for ambient RNA "
            "estimation, found beside the filtered one."
        )


def _one_of(options: list[Path], what: str, where: str, fix: str) -> Path:
    if len(options) == 1:
        return options[0]
    raise DataFileError(
        f"{where} holds {len(options)} {what}: {_shown([p.name for p in options], 20)}; {fix}"
    )


def _cellranger_matrix(d: Path, where: str) -> Path | None:
    """The filtered matrix of a Cell Ranger folder ``d`` (or a folder inside / above it)."""
    for name in _FILTERED_H5:
        if (d / name).is_file():
            return d / name
    for name in _FILTERED_DIRS:
        if (d / name).is_dir():
            return d / name
    if d.name == "filtered_gene_bc_matrices" or (d / "filtered_gene_bc_matrices").is_dir():
        top = d if d.name == "filtered_gene_bc_matrices" else d / "filtered_gene_bc_matrices"
        genomes = _subdirs(top)
        if not genomes:
            return None
        fix = (
            "immuneage reads one genome per sample: point the sample sheet at "
            f"{top}/<genome> for the genome you want"
        )
        return _one_of(genomes, "genomes (Cell Ranger 2 filtered_gene_bc_matrices)", where, fix)
    if (d / "count").is_dir():  # multi: per_sample_outs/<sample>/
        return _cellranger_matrix(d / "count", where)
    if d.name == "per_sample_outs" or (d / "per_sample_outs").is_dir():
        top = d if d.name == "per_sample_outs" else d / "per_sample_outs"
        samples = _subdirs(top)
        if not samples:
            return None
        fix = (
            f"point the sample sheet at one sample per row: {top}/<sample> "
            "(each becomes its own sample sheet row)"
        )
        return _cellranger_matrix(
            _one_of(samples, "samples (Cell Ranger multi per_sample_outs)", where, fix), where
        )
    if (d / "outs").is_dir():
        return _cellranger_matrix(d / "outs", where)
    return None


def _raw_beside(file: Path) -> str:
    """The Cell Ranger raw matrix (all droplets) beside a filtered one, or ``""``."""
    if file.parent.name == "filtered_gene_bc_matrices":  # v2 <outs>/filtered.../<genome>
        outs, genome = file.parent.parent, file.name
        options = [outs / "raw_gene_bc_matrices_h5.h5", outs / "raw_gene_bc_matrices" / genome]
    elif file.name.startswith("sample_filtered_feature_bc_matrix"):  # multi
        outs = file.parent.parent.parent.parent  # outs/per_sample_outs/<s>/count/<file>
        count = outs / "multi" / "count"
        options = [count / "raw_feature_bc_matrix.h5", count / "raw_feature_bc_matrix"]
    elif file.name.startswith("filtered_feature_bc_matrix"):
        options = [file.parent / "raw_feature_bc_matrix.h5", file.parent / "raw_feature_bc_matrix"]
    elif file.name == "filtered_gene_bc_matrices_h5.h5":
        options = [file.parent / "raw_gene_bc_matrices_h5.h5"]
    else:
        return ""
    return next((str(p) for p in options if p.exists()), "")


def _locate(path: Path, sample: str | None) -> _Located:
    """Resolve ``path`` to the matrix to read and its format."""
    where = _where(path, sample)
    if not path.exists():
        raise DataFileError(
            f"{where} does not exist; fix the 'path' column of the sample sheet "
            "(relative paths are relative to the sheet's directory)"
        )
    _refuse_raw(path, where)
    if path.is_file() and path.name in ("matrix.mtx", "matrix.mtx.gz"):
        path = path.parent  # a file inside a matrix directory
    elif path.is_file() and path.name in ("metrics_summary.csv", "web_summary.html"):
        path = path.parent  # a file inside a Cell Ranger outs/ folder
    if path.is_dir():
        files, missing = _find_mtx_files(path)
        if files is None:
            found = _cellranger_matrix(path, where)
            if found is None:
                raise DataFileError(
                    f"{where} is a directory but neither a 10x matrix directory (it lacks "
                    f"{', '.join(missing)}) nor a Cell Ranger outs/ folder; found "
                    f"{_listing(path)}. Accepted: {_ACCEPTED}."
                )
            if found.is_dir():
                files, missing = _find_mtx_files(found)
                if files is None:
                    raise DataFileError(
                        f"{_where(found, sample)} is an incomplete 10x matrix directory: it "
                        f"lacks {', '.join(missing)}; found {_listing(found)}. {_REEXPORT}"
                    )
                return _Located(found, "10x_mtx", _raw_beside(found))
            path = found
        else:
            return _Located(path, "10x_mtx", _raw_beside(path))
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        return _Located(path, "h5ad", "")
    if suffix == ".h5":
        return _Located(path, "10x_h5", _raw_beside(path))
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


# --------------------------------------------------------------------------- detect / inspect


def detect_format(path: Path, *, sample: str | None = None) -> CountsFormat:
    """Tell which accepted counts layout ``path`` is (or leads to).

    Parameters
    ----------
    path
        An ``.h5ad`` file, a Cell Ranger ``.h5`` file, a 10x matrix directory,
        or a Cell Ranger folder (see the module docstring).
    sample
        Sample id named in error messages, if known.

    Returns
    -------
    ``"h5ad"``, ``"10x_h5"`` or ``"10x_mtx"``: the format of the matrix that
    :func:`read_counts` reads (for a Cell Ranger folder, its filtered matrix).

    Raises
    ------
    DataFileError
        The path does not exist, is a raw (unfiltered) Cell Ranger matrix, or
        is none of these; the message lists what was found.
    """
    return _locate(Path(path), sample).format


def inspect_counts(
    path: Path,
    *,
    sample: str | None = None,
    counts_layer: str | None = None,
    symbol_column: str | None = None,
) -> CountsSummary:
    """Check a counts file's structure without loading its matrix.

    Finds the matrix (see :func:`read_counts`) and checks it: h5ad, the shape
    of the chosen counts matrix against the obs and var indexes, and whether a
    sample of its stored entries are whole numbers; 10x h5, the required
    datasets and their lengths; 10x mtx, the MatrixMarket header against the
    features and barcodes files. Refuses unfiltered droplets (10x h5 and CSR
    h5ad: from ``indptr``; mtx: from the header's entries per barcode) and
    Ensembl ids without a symbol column.

    Parameters
    ----------
    path
        A counts file, a 10x matrix directory or a Cell Ranger folder.
    sample
        Sample id named in error messages, if known.
    counts_layer
        h5ad only: the matrix holding the counts (a layer name, ``"X"`` or ``"raw.X"``).
    symbol_column
        h5ad only: the var column holding gene symbols.

    Returns
    -------
    A :class:`CountsSummary`.

    Raises
    ------
    DataFileError
        The path is missing, of an unknown format, unreadable, inconsistent,
        unfiltered, or holds no usable counts or symbols.
    """
    path = Path(path)
    plan = _plan(path, sample, counts_layer, symbol_column)
    gex = _gex_mask(plan.types, len(plan.symbols))
    genes, _ = make_unique([s for s, keep in zip(plan.symbols, gex, strict=True) if keep])
    return CountsSummary(
        path=path,
        format=plan.located.format,
        n_cells=plan.n_cells,
        n_genes=len(genes),
        genes=tuple(genes),
        file=plan.located.file,
        counts_source=plan.counts_source,
        symbols_from=plan.symbols_from,
        raw_matrix=plan.located.raw_matrix,
        other_features=_other_features(plan.types),
    )


def _other_features(types: np.ndarray | None) -> dict[str, int]:
    if types is None:
        return {}
    values, counts = np.unique(np.asarray(types, dtype=str), return_counts=True)
    return {str(t): int(n) for t, n in zip(values, counts, strict=True) if t != _GEX}


def _plan(
    path: Path, sample: str | None, counts_layer: str | None, symbol_column: str | None
) -> _Plan:
    located = _locate(path, sample)
    file = located.file
    where = _where(file, sample)
    try:
        if located.format == "h5ad":
            plan = _plan_h5ad(located, sample, counts_layer, symbol_column)
        elif located.format == "10x_h5":
            plan = _plan_10x_h5(located, sample)
        else:
            plan = _plan_mtx(located, sample)
    except DataFileError:
        raise
    except Exception as exc:
        raise DataFileError(
            f"{where} could not be read ({type(exc).__name__}: {exc}); {_REEXPORT}"
        ) from exc
    gex = _gex_mask(plan.types, len(plan.symbols))
    if located.format != "h5ad" and _looks_ensembl(np.asarray(plan.symbols, dtype=str)[gex]):
        raise DataFileError(
            f"{where} lists Ensembl gene ids where gene symbols belong ({plan.symbols_from}); "
            "immuneage needs symbols: re-export the matrix with symbols in the features' name "
            "column, or convert it to an .h5ad with a symbol column in var and pass "
            "symbol_column in the config or sample sheet"
        )
    return plan


def _check_filtered(
    n_barcodes: int, typical: float, where: str, *, statistic: str = "median"
) -> None:
    """Refuse unfiltered droplets: many barcodes, most holding a handful of features.

    ``typical`` is the median (or, from an mtx header, the mean) number of
    detected features (stored entries) per barcode.
    """
    if n_barcodes < UNFILTERED_MIN_BARCODES or typical >= UNFILTERED_MAX_MEDIAN_FEATURES:
        return
    raise DataFileError(
        f"{where} looks like unfiltered droplets, not cells: {n_barcodes:,} barcodes holding "
        f"a {statistic} of {typical:.1f} detected features each (cells hold hundreds; a matrix "
        f"of {UNFILTERED_MIN_BARCODES:,} barcodes or more with a {statistic} under "
        f"{UNFILTERED_MAX_MEDIAN_FEATURES} is unfiltered); {_RAW_ADVICE}"
    )


def _median_per_barcode(indptr: np.ndarray) -> float:
    return float(np.median(np.diff(indptr))) if len(indptr) > 1 else 0.0


# ---- h5ad


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


def _value_problem(data: np.ndarray, what: str = "stored counts") -> str | None:
    """Why ``data`` are not counts (finite, non-negative whole numbers), or None."""
    if data.dtype.kind not in "iubf":
        return f"values of the non-numeric type {data.dtype}"
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            return (
                f"{int(bad.sum())} of {data.size} {what} are NaN or infinite "
                f"(e.g. {data[bad][0].item()})"
            )
    neg = data < 0
    if neg.any():
        return (
            f"{int(neg.sum())} of {data.size} {what} are negative (e.g. {data[neg][0].item()}): "
            "looks scaled"
        )
    if data.dtype.kind == "f":
        frac = data != np.rint(data)
        if frac.any():
            top = float(data.max())
            kind = "log-normalised" if top < 30 else "normalised (e.g. counts per 10,000)"
            return (
                f"{int(frac.sum())} of {data.size} {what} are not whole numbers "
                f"(e.g. {float(data[frac][0]):.6g}; max {top:.4g}): looks {kind}"
            )
    return None


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


# ---- 10x h5


def _h5_strings(ds: h5py.Dataset) -> np.ndarray:
    return np.asarray(ds.asstr()[()], dtype=object).astype(str)


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


# ---- 10x mtx


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


# --------------------------------------------------------------------------- read


def read_counts(
    path: Path,
    *,
    sample: str,
    counts_layer: str | None = None,
    symbol_column: str | None = None,
) -> AnnData:
    """Load one sample's raw counts and validate them.

    Parameters
    ----------
    path
        An ``.h5ad`` file, a Cell Ranger ``.h5`` file, a 10x matrix directory
        or a Cell Ranger folder (``outs/``, the sample folder above it, a
        ``multi`` ``outs/`` with one sample, a v2 ``filtered_gene_bc_matrices/``);
        see the module docstring. Opened read-only. A Cell Ranger folder's
        filtered matrix is read (``.h5`` preferred), never the raw one.
    sample
        The sample id, used in messages.
    counts_layer
        h5ad only: the matrix holding the counts, a layer name, ``"X"`` or
        ``"raw.X"``. By default the first of ``layers["counts"]``, ``raw.X``
        and ``X`` whose sampled stored entries are non-negative whole numbers.
    symbol_column
        h5ad only: the var (or raw.var) column holding gene symbols. By default,
        when most var_names are Ensembl ids, the first present of
        :data:`SYMBOL_COLUMNS`.

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
        Gene ids, when known (10x features; h5ad columns ``gene_ids``,
        ``gene_id`` or ``ensembl_id``; Ensembl var_names).
    ``var["gene_symbol_original"]``
        The symbols as in the file (or its symbol column).
    ``obsm[<feature type>]``
        One per non-``Gene Expression`` feature type, keyed by its snake_case
        name (``antibody_capture``, ``crispr_guide_capture``,
        ``multiplexing_capture``): a DataFrame of float32 counts, columns the
        feature names made unique, index the barcodes.
    ``uns["immuneage"]["read"]``
        ``{"file", "format", "counts_source", "symbols_from", "raw_matrix",
        "other_features"}``: the matrix read, its format (one of :data:`FORMATS`),
        where the counts and symbols came from, the Cell Ranger raw matrix
        beside it (or ``""``), and the number of features of each other type.

    Raises
    ------
    DataFileError
        The file is missing, of an unknown format, unreadable or inconsistent;
        it is a raw (unfiltered) matrix; the counts are not finite non-negative
        integers; the gene names are Ensembl ids without symbols; the matrix is
        empty; or barcodes repeat.

    Warns
    -----
    ImmuneageWarning
        Gene symbols repeat (they are made unique).
    """
    plan = _plan(Path(path), sample, counts_layer, symbol_column)
    file, fmt = plan.located.file, plan.located.format
    where = _where(file, sample)
    try:
        if fmt == "h5ad":
            x, barcodes = _load_h5ad(file, plan.element)
        elif fmt == "10x_h5":
            x, barcodes = _load_10x_h5(file, where)
        else:
            x, barcodes = _load_mtx(file, where)
    except DataFileError:
        raise
    except Exception as exc:
        raise DataFileError(
            f"{where} could not be read ({type(exc).__name__}: {exc}); {_REEXPORT}"
        ) from exc
    adata = _finish(x, barcodes, plan, where)
    logger.info(
        "%s: read %s (%s, counts from %s, symbols from %s)",
        where,
        file,
        fmt,
        plan.counts_source,
        plan.symbols_from,
    )
    return adata


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


def _check_values(x: sp.csr_matrix, where: str) -> None:
    """Counts must be finite, non-negative whole numbers (checked on stored entries only)."""
    problem = _value_problem(x.data)
    if problem is not None:
        raise DataFileError(f"{where}: {problem}. {_COUNTS_ADVICE}")


def _snake(name: str) -> str:
    """``'Antibody Capture'`` -> ``'antibody_capture'``."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_") or "other"


def _set_aside(
    x: sp.csr_matrix, symbols: list[str], types: np.ndarray, gex: np.ndarray, barcodes: pd.Index
) -> dict[str, pd.DataFrame]:
    """One DataFrame of float32 counts per non-``Gene Expression`` feature type."""
    out: dict[str, pd.DataFrame] = {}
    for kind in sorted(set(types[~gex])):
        cols = np.flatnonzero(types == kind)
        names, _ = make_unique([symbols[i] for i in cols])
        block = x[:, cols].toarray().astype(np.float32)
        out[_snake(kind)] = pd.DataFrame(block, index=barcodes.copy(), columns=names)
    return out


def _finish(x: sp.csr_matrix, barcodes: np.ndarray, plan: _Plan, where: str) -> AnnData:
    symbols, ids, types = plan.symbols, plan.ids, plan.types
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
    _check_filtered(x.shape[0], _median_per_barcode(x.indptr), where)
    label = where if plan.counts_source == "matrix" else f"{where}, {plan.counts_source}"
    _check_values(x, label)
    bc = pd.Index(np.asarray(barcodes, dtype=str))
    gex = _gex_mask(types, len(symbols))
    other: dict[str, pd.DataFrame] = {}
    if not gex.all():
        assert types is not None
        kinds = sorted({str(t) for t in np.asarray(types)[~gex]})
        if not gex.any():
            raise DataFileError(
                f"{where} has no 'Gene Expression' features (only {', '.join(kinds)}); "
                "pass a gene expression counts file"
            )
        other = _set_aside(x, symbols, np.asarray(types, dtype=str), gex, bc)
        logger.info(
            "%s: kept %d non-gene features in obsm (%s)", where, (~gex).sum(), ", ".join(kinds)
        )
        x = x[:, np.flatnonzero(gex)]
        symbols = [s for s, keep in zip(symbols, gex, strict=True) if keep]
        ids = ids[gex] if ids is not None else None
    n_cells, n_genes = x.shape
    if n_cells == 0 or n_genes == 0:
        raise DataFileError(
            f"{where} is empty ({n_cells} cells x {n_genes} genes); "
            "remove the sample from the sheet or pass the right file"
        )
    x = sp.csr_matrix((x.data.astype(np.float32), x.indices, x.indptr), shape=x.shape)
    x.sum_duplicates()
    x.eliminate_zeros()
    if x.nnz == 0:
        raise DataFileError(
            f"{where} holds no counts ({n_cells} cells x {n_genes} genes, every entry zero); "
            "remove the sample from the sheet or pass the right file"
        )
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
    for key, table in other.items():
        adata.obsm[key] = table
    adata.uns[keys.UNS] = {
        "read": {
            "file": str(plan.located.file),
            "format": plan.located.format,
            "counts_source": plan.counts_source,
            "symbols_from": plan.symbols_from,
            "raw_matrix": plan.located.raw_matrix,
            "other_features": _other_features(types),
        }
    }
    return adata
