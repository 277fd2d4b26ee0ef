"""Signature enrichment of each pseudobulk DE result (camera, or ULM for comparison)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ... import keys
from ...errors import ImmuneageWarning
from ...stats.enrichment import camera, paired_residuals, ulm
from ._common import _bh_within

ENRICHMENT_COLUMNS = (
    "contrast",
    "cell_type",
    "signature",
    "n_genes",
    "score",
    "p_value",
    "q_value",
    "method",
    "inter_gene_cor",
    "direction",
    "family",
    "calibrated",
)

EnrichmentMethod = Literal["camera", "ulm"]

#: Methods whose p-values a calibration test with correlated genes checks
#: (tests/test_enrichment.py); ULM's are anti-conservative, never starred.
CALIBRATED_METHODS = frozenset({"camera"})


def _family(method: str) -> str:
    return f"enrichment_{method}"


def _timepoint_pair(contrast: str, levels: Sequence[str]) -> tuple[str, str] | None:
    """The ``(test, reference)`` levels whose contrast name is ``contrast``."""
    for t in levels:
        for r in levels:
            if t != r and f"{t}_vs_{r}" == contrast:
                return t, r
    return None


def _residuals(
    pb: AnnData, cell_type: str, contrast: str, genes: pd.Index, *, min_cells: int
) -> pd.DataFrame | None:
    obs = pb.obs
    keep = (obs[keys.CELL_TYPE].astype(str) == cell_type).to_numpy()
    keep &= obs["n_cells"].to_numpy() >= min_cells
    tps = sorted(set(obs.loc[keep, keys.TIMEPOINT].astype(str)))
    pair = _timepoint_pair(contrast, tps)
    cols = pd.Index(pb.var_names.astype(str)).get_indexer(genes)
    if pair is None or (cols < 0).any():
        return None
    x = pb.X[np.flatnonzero(keep)][:, cols]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    sub = obs.loc[keep]
    res = paired_residuals(
        pd.DataFrame(x, columns=genes),
        sub[keys.DONOR].astype(str).to_numpy(),
        sub[keys.TIMEPOINT].astype(str).to_numpy(),
        test=pair[0],
        reference=pair[1],
    )
    return res if len(res) >= 3 else None


def signature_enrichment(
    de_tables: Mapping[str, pd.DataFrame],
    gene_sets: Mapping[str, list[str]],
    *,
    min_genes: int = 5,
    method: EnrichmentMethod | Sequence[EnrichmentMethod] = "camera",
    pseudobulks: AnnData | None = None,
    pseudobulk_min_cells: int = 0,
) -> pd.DataFrame:
    """Competitive enrichment of each signature in each DE result (Wald statistics).

    ``camera`` (:func:`pipeline.stats.enrichment.camera`) inflates the variance
    of a signature's mean Wald statistic by its inter-gene correlation,
    estimated from the same cell type's pseudobulks: log-CPM differences
    ``test - reference`` of the donors with both timepoints, centred across
    donors (the paired model's residuals). ``ulm`` assumes independent genes
    and is anti-conservative for co-regulated signatures: its rows are marked
    ``calibrated = False``.

    Parameters
    ----------
    de_tables
        :func:`pseudobulk_de` tables (with ``attrs`` cell type and contrast).
    gene_sets
        Signature name -> genes.
    min_genes
        Minimum set members among a result's tested genes.
    method
        ``camera``, ``ulm``, or several (each its own FDR family). Without
        ``pseudobulks`` camera cannot estimate correlations: ULM is run instead,
        with a warning.
    pseudobulks
        :func:`pseudobulk` output the DE tables were fitted on.
    pseudobulk_min_cells
        Pseudobulks of fewer cells are left out of the residuals, as in the DE fit.

    Returns
    -------
    :data:`ENRICHMENT_COLUMNS`: ``score`` (camera's t, or ULM's slope t),
    ``p_value`` (two-sided), ``q_value`` (BH over every row of one method:
    all cell types x signatures x contrasts), ``method``, ``inter_gene_cor``
    (camera's estimated mean correlation of the signature's genes; NaN for
    ULM), ``direction`` (``up``/``down``: sign of the score), ``family``
    (``enrichment_<method>``), ``calibrated`` (p-values checked by a
    calibration test with correlated genes; False for ULM).
    """
    methods = [method] if isinstance(method, str) else list(dict.fromkeys(method))
    unknown = sorted(set(methods) - {"camera", "ulm"})
    if unknown:
        raise ValueError(f"unknown enrichment method(s) {unknown}; use 'camera' or 'ulm'")
    if "camera" in methods and pseudobulks is None:
        warnings.warn(
            "signature enrichment: camera needs the pseudobulks to estimate inter-gene "
            "correlations; none given, ULM (not calibrated for correlated genes) is run instead",
            ImmuneageWarning,
            stacklevel=2,
        )
        methods = list(dict.fromkeys("ulm" if m == "camera" else m for m in methods))
    parts = []
    for tab in de_tables.values():
        ct, contrast = str(tab.attrs["cell_type"]), str(tab.attrs["contrast"])
        stat = pd.Series(tab["stat"].to_numpy(dtype=float), index=tab["gene"].astype(str))
        stat = stat[np.isfinite(stat.to_numpy())]
        for m in methods:
            if m == "ulm":
                r = ulm(stat, gene_sets, min_genes=min_genes)
                r["inter_gene_cor"] = np.nan
                r["direction"] = np.where(
                    r["score"] > 0, "up", np.where(r["score"] < 0, "down", "")
                )
            else:
                assert pseudobulks is not None
                res = _residuals(
                    pseudobulks, ct, contrast, stat.index, min_cells=pseudobulk_min_cells
                )
                if res is None:
                    warnings.warn(
                        f"signature enrichment: {ct} {contrast}: fewer than 3 donors with "
                        "pseudobulks at both timepoints (or genes missing from the pseudobulks); "
                        "camera not computed",
                        ImmuneageWarning,
                        stacklevel=2,
                    )
                    res = pd.DataFrame(columns=stat.index, dtype=float)  # no df: NaN rows
                r = camera(stat, gene_sets, residuals=res, min_genes=min_genes)
            r["method"] = m
            r["family"] = _family(m)
            r["calibrated"] = m in CALIBRATED_METHODS
            r.insert(0, "cell_type", ct)
            r.insert(0, "contrast", contrast)
            parts.append(r)
    if not parts:
        return pd.DataFrame(columns=list(ENRICHMENT_COLUMNS))
    table = pd.concat(parts, ignore_index=True)
    return _bh_within(table, "method", ENRICHMENT_COLUMNS).reset_index(drop=True)
