"""The entry points: :func:`inspect_counts` and :func:`read_counts`.

Both locate the matrix and plan the read from its structure (:func:`_plan`,
dispatching to the format modules); :func:`read_counts` then loads it and
hands it to :func:`._assemble._finish`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from anndata import AnnData

from ...errors import DataFileError
from ._assemble import _finish, _other_features
from ._checks import _value_problem
from ._common import (
    CountsFormat,
    _gex_mask,
    _looks_ensembl,
    _Plan,
    _unreadable_as_error,
    _where,
    make_unique,
)
from ._h5ad import _PEEK_BLOCK, _PEEK_BLOCKS, _load_h5ad, _plan_h5ad
from ._locate import _locate
from ._tenx import _load_10x_h5, _load_mtx, _peek_10x_h5, _peek_mtx, _plan_10x_h5, _plan_mtx

# under the 'immuneage' logger, whose handler the CLI sets (shown in runs, not via root)
logger = logging.getLogger("immuneage.io.readers")

#: Stored values :func:`inspect_counts` checks for being counts (as many as an h5ad's choice reads).
SAMPLED_VALUES = _PEEK_BLOCKS * _PEEK_BLOCK


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
    sample of its stored entries are whole numbers (how the counts matrix is
    chosen); 10x h5, the required datasets and their lengths; 10x mtx, the
    MatrixMarket header against the features and barcodes files. For both 10x
    formats a bounded sample of the stored values (:data:`SAMPLED_VALUES`:
    blocks spread over an ``.h5``'s ``data``, the first entries of a
    ``matrix.mtx``) must be finite, non-negative whole numbers. Refuses
    unfiltered droplets (10x h5 and CSR h5ad: from ``indptr``; mtx: from the
    header's entries per barcode) and Ensembl ids without a symbol column.

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
        unfiltered, or holds no usable counts (sampled values that are
        fractions, negative or not finite) or symbols.
    """
    path = Path(path)
    plan = _plan(path, sample, counts_layer, symbol_column)
    if plan.located.format != "h5ad":  # h5ad: _plan chose the matrix by the same check
        _check_sampled_values(plan, sample)
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


def _check_sampled_values(plan: _Plan, sample: str | None) -> None:
    """A sampled block of a 10x matrix's stored values must be counts (no matrix is loaded).

    Cell Ranger ``.h5``: :data:`SAMPLED_VALUES` entries in a few blocks spread
    over ``data``; matrix directory: the first :data:`SAMPLED_VALUES` entries of
    ``matrix.mtx``. :func:`read_counts` checks every value when ingest loads it.
    """
    file = plan.located.file
    where = _where(file, sample)
    with _unreadable_as_error(where):
        if plan.located.format == "10x_h5":
            values = _peek_10x_h5(file, where)
        else:
            values = _peek_mtx(file, SAMPLED_VALUES)
    problem = _value_problem(values, "sampled stored values")
    if problem is not None:
        raise DataFileError(
            f"{where}: {problem}. immuneage needs raw UMI counts, not normalised, scaled or "
            "log-transformed values: point the sample sheet at the matrix Cell Ranger wrote "
            "(filtered_feature_bc_matrix), or at an .h5ad holding the raw counts (in "
            "layers['counts'], raw.X or X, or named with counts_layer)."
        )


def _plan(
    path: Path, sample: str | None, counts_layer: str | None, symbol_column: str | None
) -> _Plan:
    located = _locate(path, sample)
    file = located.file
    where = _where(file, sample)
    with _unreadable_as_error(where):
        if located.format == "h5ad":
            plan = _plan_h5ad(located, sample, counts_layer, symbol_column)
        elif located.format == "10x_h5":
            plan = _plan_10x_h5(located, sample)
        else:
            plan = _plan_mtx(located, sample)
    gex = _gex_mask(plan.types, len(plan.symbols))
    if located.format != "h5ad" and _looks_ensembl(np.asarray(plan.symbols, dtype=str)[gex]):
        raise DataFileError(
            f"{where} lists Ensembl gene ids where gene symbols belong ({plan.symbols_from}); "
            "immuneage needs symbols: re-export the matrix with symbols in the features' name "
            "column, or convert it to an .h5ad with a symbol column in var and pass "
            "symbol_column in the config or sample sheet"
        )
    return plan


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
    with _unreadable_as_error(where):
        if fmt == "h5ad":
            x, barcodes = _load_h5ad(file, plan.element)
        elif fmt == "10x_h5":
            x, barcodes = _load_10x_h5(file, where)
        else:
            x, barcodes = _load_mtx(file, where)
    adata = _finish(x, barcodes, plan, where)
    logger.debug(  # ingest logs the same at INFO, per sample and library
        "%s: read %s (%s, counts from %s, symbols from %s)",
        where,
        file,
        fmt,
        plan.counts_source,
        plan.symbols_from,
    )
    return adata
