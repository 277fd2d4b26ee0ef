"""Shared helpers of the differential stage: table shapes, dropped rows, BH within groups,
testing families."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData
from numpy.typing import NDArray

from ... import keys
from ...errors import InputError
from ...stats.multitest import bh_adjust, bh_by_family

if TYPE_CHECKING:
    from ...config import Contrast


SCORE_PREFIX = "score_"
#: ``uns["immuneage"]`` key of the signatures (name -> genes used) written by ``score``.
SIGNATURES_KEY = "signatures"
#: ``uns["immuneage"]`` key of the signature roles (name -> ``programme`` | ``control``) of ``score``.
ROLES_KEY = "signature_roles"
#: Role of a signature scored as a sample-handling control (e.g. ``ieg_dissociation``).
ROLE_CONTROL = "control"
#: FDR families of the signature tables (``family`` column).
FAMILY_PRIMARY, FAMILY_EXPLORATORY, FAMILY_CONTROL, FAMILY_ALL = (
    "primary",
    "exploratory",
    "control",
    "all",
)
#: Columns that key the covariates CSV and are never covariates themselves.
COVARIATE_KEYS = (keys.SAMPLE, keys.DONOR, keys.TIMEPOINT)


DROPPED_COLUMNS = ("analysis", "contrast", "cell_type", "donor", "timepoint", "reason")


def de_table_name(cell_type: str, contrast: str) -> str:
    """Table name (``pseudobulk_de/<cell_type>__<contrast>``) with a file-safe cell type.

    Spaces, slashes and any character other than letters, digits, ``.``, ``-``,
    ``+`` and ``_`` become ``_``.
    """
    safe = re.sub(r"[^A-Za-z0-9.+_-]", "_", str(cell_type))
    return f"pseudobulk_de/{safe}__{contrast}"


def _contrast_pairs(contrasts: Iterable[Contrast]) -> list[tuple[str, str, str]]:
    return [(c.name, c.test, c.reference) for c in contrasts]


def _dropped(
    analysis: str, contrast: str, cell_type: str, donor: str, timepoint: str, reason: str
) -> dict[str, str]:
    return {
        "analysis": analysis,
        "contrast": contrast,
        "cell_type": cell_type,
        "donor": donor,
        "timepoint": timepoint,
        "reason": reason,
    }


def _frame(rows: list[dict[str, Any]], columns: Iterable[str]) -> pd.DataFrame:
    cols = list(columns)
    return pd.DataFrame(rows, columns=cols) if rows else pd.DataFrame(columns=cols)


def _bh_within(table: pd.DataFrame, by: str, columns: Iterable[str]) -> pd.DataFrame:
    """Add ``q_value``: BH over the rows of each ``by`` group (e.g. within a contrast)."""
    table["q_value"] = np.nan
    for group in table[by].unique():
        m = (table[by] == group).to_numpy()
        table.loc[m, "q_value"] = bh_adjust(table.loc[m, "p_value"].to_numpy(dtype=float))
    return table[list(columns)]


def signature_roles(adata: AnnData) -> dict[str, str]:
    """Signature name -> role (``programme`` or ``control``) as written by ``score``.

    Read from ``uns["immuneage"]["signature_roles"]``; empty when absent (every
    signature is then a programme).
    """
    info = adata.uns.get(keys.UNS, {})
    roles = info.get(ROLES_KEY, {}) if isinstance(info, Mapping) else {}
    return {str(k): str(v) for k, v in dict(roles).items()}


def pair_families(
    pairs: pd.DataFrame,
    primary: Mapping[str, Iterable[str]] | None,
    roles: Mapping[str, str] | None = None,
) -> NDArray[np.object_]:
    """The FDR family of each cell type x signature pair.

    Parameters
    ----------
    pairs
        Columns ``cell_type``, ``signature`` and optionally ``lineage`` (the
        cell type's ``obs["cell_type_coarse"]``; blank or absent: unknown).
    primary
        ``differential.primary``: lineage or cell type name -> signatures.
        ``None``: one family ``all``.
    roles
        Signature -> role (:func:`signature_roles`); a ``control`` signature
        is in family ``control`` whatever ``primary`` says (a sample-handling
        control is not a hypothesis, and with ``primary`` null too).

    Returns
    -------
    ``control`` for control signatures; else ``all`` when ``primary`` is
    ``None``; else ``primary`` when the cell type or its lineage lists the
    signature, ``exploratory`` otherwise.
    """
    roles = roles or {}
    n = len(pairs)
    cts = pairs[keys.CELL_TYPE].astype(str).to_numpy()
    sigs = pairs["signature"].astype(str).to_numpy()
    lin = (
        pairs["lineage"].fillna("").astype(str).to_numpy()
        if "lineage" in pairs.columns
        else np.full(n, "", dtype=object)
    )
    listed = {str(k): {str(s) for s in v} for k, v in (primary or {}).items()}
    out = np.empty(n, dtype=object)
    for i in range(n):
        if roles.get(sigs[i]) == ROLE_CONTROL:
            out[i] = FAMILY_CONTROL
        elif primary is None:
            out[i] = FAMILY_ALL
        elif sigs[i] in listed.get(cts[i], ()) or (lin[i] and sigs[i] in listed.get(lin[i], ())):
            out[i] = FAMILY_PRIMARY
        else:
            out[i] = FAMILY_EXPLORATORY
    return out


def _bh_by_family(table: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Add ``q_value``: BH over all rows of each ``family`` (across contrasts)."""
    table["q_value"] = (
        bh_by_family(table["p_value"].to_numpy(dtype=float), table["family"].to_numpy())
        if len(table)
        else np.array([], dtype=float)
    )
    return table[list(columns)]


def _signature_columns(adata: AnnData) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Signature name -> obs score column, and name -> genes (empty when unknown)."""
    info = adata.uns.get(keys.UNS, {})
    sets = info.get(SIGNATURES_KEY, {}) if isinstance(info, Mapping) else {}
    genes = {str(k): [str(g) for g in np.atleast_1d(v)] for k, v in dict(sets).items()}
    cols = {
        c[len(SCORE_PREFIX) :]: c
        for c in map(str, adata.obs.columns)
        if c.startswith(SCORE_PREFIX)
        and pd.api.types.is_numeric_dtype(adata.obs[c])
        and (not genes or c[len(SCORE_PREFIX) :] in genes)
    }
    return cols, genes


def _check_obs(obs: pd.DataFrame) -> None:
    need = [keys.SAMPLE, keys.DONOR, keys.TIMEPOINT, keys.CELL_TYPE]
    missing = [c for c in need if c not in obs.columns]
    if missing:
        raise InputError(
            f"differential: obs lacks column(s) {', '.join(missing)}; run the stages up to "
            "'score' first (immuneage run ... --until score)"
        )


def _sample_table(obs: pd.DataFrame) -> pd.DataFrame:
    """One row per sample: sample, donor, timepoint (strings)."""
    s = obs[[keys.SAMPLE, keys.DONOR, keys.TIMEPOINT]].astype(str).drop_duplicates()
    dup = s[keys.SAMPLE].duplicated(keep=False)
    if dup.any():
        raise InputError(
            f"differential: sample {s.loc[dup, keys.SAMPLE].iloc[0]!r} has several donors or "
            "timepoints in obs; each sample must be one donor at one timepoint"
        )
    twice = s.duplicated([keys.DONOR, keys.TIMEPOINT], keep=False)
    if twice.any():
        row = s.loc[twice].iloc[0]
        raise InputError(
            f"differential: donor {row[keys.DONOR]!r} has several samples at timepoint "
            f"{row[keys.TIMEPOINT]!r}; paired tests need one sample per donor x timepoint"
        )
    return s.reset_index(drop=True)


def _why_missing(
    donor: str,
    tp: str,
    cell_type: str,
    sampled: set[tuple[str, str]],
    counts: Mapping,
    min_cells: int,
) -> str:
    if (donor, tp) not in sampled:
        return f"donor has no {tp} sample"
    n = int(counts.get((donor, tp, cell_type), 0))
    if n == 0:
        return f"no {cell_type} cells at {tp}"
    return f"{n} {cell_type} cells at {tp} < min_cells {min_cells}"


def _categories(col: pd.Series) -> list[str]:
    if isinstance(col.dtype, pd.CategoricalDtype):
        present = set(col.astype(str))
        return [str(c) for c in col.cat.categories if str(c) in present]
    return sorted(set(col.astype(str)))
