"""What the reader modules share: formats, message texts, records and small helpers.

:class:`_Located` (the matrix a path leads to) and :class:`_Plan` (what a file's
structure says) are handed from :mod:`._locate` and the format modules
(:mod:`._h5ad`, :mod:`._tenx`) to :mod:`._read`. The helpers name the file in
messages, list culprits, make names unique and open HDF5 files read-only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import pandas as pd

from ...errors import DataFileError

CountsFormat = Literal["h5ad", "10x_h5", "10x_mtx"]
#: The accepted counts file formats, as :func:`detect_format` names them.
FORMATS: tuple[CountsFormat, ...] = ("h5ad", "10x_h5", "10x_mtx")

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")

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


def _where(path: Path, sample: str | None) -> str:
    """How messages name the file: ``counts file X (sample 'S')``."""
    return f"counts file {path}" + (f" (sample {sample!r})" if sample is not None else "")


def _shown(values: Sequence[Any], n: int = _N_SHOWN) -> str:
    """``'a', 'b', 'c' and 4 more``."""
    head = ", ".join(repr(str(v)) for v in values[:n])
    return head + (f" and {len(values) - n} more" if len(values) > n else "")


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


def _h5_strings(ds: h5py.Dataset) -> np.ndarray:
    return np.asarray(ds.asstr()[()], dtype=object).astype(str)


@contextmanager
def _unreadable_as_error(where: str) -> Iterator[None]:
    """Turn any unexpected error while reading into a DataFileError naming the file."""
    try:
        yield
    except DataFileError:
        raise
    except Exception as exc:
        raise DataFileError(
            f"{where} could not be read ({type(exc).__name__}: {exc}); {_REEXPORT}"
        ) from exc


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
