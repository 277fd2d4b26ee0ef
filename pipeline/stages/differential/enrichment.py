"""Signature enrichment of each pseudobulk DE result."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import pandas as pd

from ...stats.enrichment import ulm

if TYPE_CHECKING:
    pass
from ._common import (
    _bh_within,
)

ENRICHMENT_COLUMNS = (
    "contrast",
    "cell_type",
    "signature",
    "n_genes",
    "score",
    "p_value",
    "q_value",
)


def signature_enrichment(
    de_tables: Mapping[str, pd.DataFrame],
    gene_sets: Mapping[str, list[str]],
    *,
    min_genes: int = 5,
) -> pd.DataFrame:
    """ULM enrichment of each signature in each DE result (Wald statistics).

    Parameters
    ----------
    de_tables
        :func:`pseudobulk_de` tables (with ``attrs`` cell type and contrast).
    gene_sets
        Signature name -> genes.
    min_genes
        Minimum set members among a result's tested genes.

    Returns
    -------
    :data:`ENRICHMENT_COLUMNS`, BH q-values over all cell types x signatures within a contrast.
    """
    parts = []
    for tab in de_tables.values():
        stat = pd.Series(tab["stat"].to_numpy(dtype=float), index=tab["gene"].astype(str))
        r = ulm(stat, gene_sets, min_genes=min_genes)
        r.insert(0, "cell_type", tab.attrs["cell_type"])
        r.insert(0, "contrast", tab.attrs["contrast"])
        parts.append(r)
    if not parts:
        return pd.DataFrame(columns=list(ENRICHMENT_COLUMNS))
    return _bh_within(pd.concat(parts, ignore_index=True), "contrast", ENRICHMENT_COLUMNS)
