"""Turn a loaded matrix into the validated AnnData :func:`~pipeline.io.readers.read_counts` returns.

Checks the matrix against the plan and its values, sets non-``Gene Expression``
features aside in ``obsm``, makes symbols unique and records where everything
came from in ``uns["immuneage"]["read"]``.
"""

from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ... import keys
from ...errors import DataFileError, ImmuneageWarning
from ._checks import _check_filtered, _check_values, _median_per_barcode
from ._common import _GEX, _REEXPORT, _gex_mask, _Plan, _shown, make_unique

# under the 'immuneage' logger, whose handler the CLI sets (shown in runs, not via root)
logger = logging.getLogger("immuneage.io.readers")


def _other_features(types: np.ndarray | None) -> dict[str, int]:
    if types is None:
        return {}
    values, counts = np.unique(np.asarray(types, dtype=str), return_counts=True)
    return {str(t): int(n) for t, n in zip(values, counts, strict=True) if t != _GEX}


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
