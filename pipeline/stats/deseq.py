"""Paired pseudobulk differential expression with PyDESeq2.

One negative-binomial GLM per cell type, design ``~ donor + timepoint`` (the
donor term makes the comparison paired), a Wald test per contrast and
Benjamini-Hochberg q-values over the genes tested in that cell type and
contrast. PyDESeq2's own independent filtering is off (the gene filter is
explicit, see :func:`pipeline.stats.pseudobulk.filter_genes`); genes whose p is
NaN (Cook's outlier filtering, all-zero) get a NaN q. Optional apeGLM-style LFC
shrinkage (``DeseqStats.lfc_shrink``) adds ``log2fc_shrunk``; it needs the
contrast's reference to be the model's reference level, so the model is fitted
once per distinct reference level.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .multitest import bh_adjust

__all__ = ["DE_COLUMNS", "deseq2_contrasts"]

#: Columns of each per-contrast result table (plus ``log2fc_shrunk`` with shrinkage).
DE_COLUMNS = ("gene", "base_mean", "log2fc", "lfc_se", "stat", "p_value", "q_value")


def deseq2_contrasts(
    counts: pd.DataFrame,
    metadata: pd.DataFrame,
    contrasts: Sequence[tuple[str, str]],
    *,
    shrink: bool = False,
    n_cpus: int = 1,
) -> tuple[dict[tuple[str, str], pd.DataFrame], list[str]]:
    """Fit ``~ donor + timepoint`` and Wald-test each ``(test, reference)`` contrast.

    Parameters
    ----------
    counts
        Pseudobulks x genes integer counts (index = pseudobulk ids).
    metadata
        Same index; columns ``donor`` and ``timepoint``.
    contrasts
        ``(test, reference)`` timepoint pairs; both must be in ``metadata``.
    shrink
        Also compute shrunken log2 fold changes (slow: one optimisation per gene).
    n_cpus
        Processes PyDESeq2 may use (1 keeps results bit-identical across machines).

    Returns
    -------
    A table per contrast with :data:`DE_COLUMNS` (sorted by p-value), and the
    warnings PyDESeq2 raised (e.g. a dispersion trend that fell back to the mean).

    Raises
    ------
    ValueError
        A count is negative, not finite or not a whole number (to 1e-6): counts
        are never rounded silently.
    """
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    if not counts.index.equals(metadata.index):
        raise ValueError("counts and metadata must share their index")
    out: dict[tuple[str, str], pd.DataFrame] = {}
    notes: list[str] = []
    levels = list(dict.fromkeys(metadata["timepoint"].astype(str)))
    by_ref: dict[str, list[str]] = {}
    for test, ref in contrasts:
        by_ref.setdefault(ref, []).append(test)
    values = counts.to_numpy(dtype=np.float64)
    if values.size and (np.any(values < 0) or not np.all(np.isfinite(values))):
        raise ValueError("DESeq2 needs non-negative finite counts")
    off = np.abs(values - np.rint(values))
    if values.size and off.max() > 1e-6:
        where = np.unravel_index(int(off.argmax()), values.shape)
        raise ValueError(
            "DESeq2 needs integer counts (summed raw UMI counts); "
            f"{int((off > 1e-6).sum())} value(s) are not whole numbers, e.g. "
            f"{values[where]:.6g} (pseudobulk {counts.index[where[0]]!r}, gene "
            f"{counts.columns[where[1]]!r}). Normalised or corrected-and-unrounded values are "
            "not counts; they are never rounded silently"
        )
    cnt = pd.DataFrame(np.rint(values).astype(np.int64), index=counts.index, columns=counts.columns)
    logger = logging.getLogger("pydeseq2")
    old_level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        for ref, tests in by_ref.items():
            meta = pd.DataFrame(index=metadata.index)
            meta["donor"] = pd.Categorical(metadata["donor"].astype(str))
            cats = [ref] + [lv for lv in levels if lv != ref]
            meta["timepoint"] = pd.Categorical(metadata["timepoint"].astype(str), categories=cats)
            inference = DefaultInference(n_cpus=n_cpus)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                dds = DeseqDataSet(
                    counts=cnt,
                    metadata=meta,
                    design="~donor + timepoint",
                    refit_cooks=True,
                    n_cpus=n_cpus,
                    inference=inference,
                    quiet=True,
                )
                dds.deseq2()
                for test in tests:
                    st = DeseqStats(
                        dds,
                        contrast=["timepoint", test, ref],
                        independent_filter=False,
                        cooks_filter=True,
                        inference=inference,
                        n_cpus=n_cpus,
                        quiet=True,
                    )
                    st.summary()
                    res = st.results_df.copy()
                    table = pd.DataFrame(
                        {
                            "gene": res.index.astype(str),
                            "base_mean": res["baseMean"].to_numpy(),
                            "log2fc": res["log2FoldChange"].to_numpy(),
                            "lfc_se": res["lfcSE"].to_numpy(),
                            "stat": res["stat"].to_numpy(),
                            "p_value": res["pvalue"].to_numpy(),
                        }
                    )
                    table["q_value"] = bh_adjust(table["p_value"].to_numpy())
                    if shrink:
                        coeff = _coefficient(dds, test)
                        st.lfc_shrink(coeff=coeff)
                        table["log2fc_shrunk"] = st.results_df["log2FoldChange"].to_numpy()
                    out[(test, ref)] = table.sort_values(
                        ["p_value", "gene"], na_position="last", kind="mergesort"
                    ).reset_index(drop=True)
            for w in caught:
                msg = str(w.message).splitlines()[0]
                if msg not in notes:
                    notes.append(msg)
    finally:
        logger.setLevel(old_level)
    return out, notes


def _coefficient(dds: object, test: str) -> str:
    """Name of the design column of timepoint level ``test`` (formulaic naming)."""
    cols = list(dds.obsm["design_matrix"].columns)  # type: ignore[attr-defined]
    for c in cols:
        if c.startswith("timepoint") and c.endswith(f"[T.{test}]"):
            return c
    raise KeyError(f"no design column for timepoint {test!r} among {cols}")
