"""Ingest: read each sample's counts, annotate its cells, merge the samples.

Pure functions: they read the users' counts files (read-only) but write
nothing; the runner saves the result and records provenance.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .. import keys
from ..config import Config
from ..errors import DataFileError, ImmuneageWarning, SampleSheetError
from ..io.readers import detect_format, read_counts
from ..io.samplesheet import SampleRow
from ._base import StageResult

__all__ = ["ingest_sample", "ingest_table", "merge_samples", "run_ingest_merge"]

_OBS_WRITTEN = (keys.SAMPLE, keys.DONOR, keys.TIMEPOINT, keys.BARCODE)


def _timepoint_categorical(values: Sequence[str] | pd.Series, cfg: Config) -> pd.Categorical:
    return pd.Categorical(values, categories=list(cfg.design.timepoints), ordered=True)


def ingest_sample(row: SampleRow, cfg: Config) -> AnnData:
    """Read one sample and annotate its cells with the sheet's metadata.

    Parameters
    ----------
    row
        The sample's sheet line.
    cfg
        Run configuration (``design.timepoints``, ``ingest.min_cells_per_sample``).

    Returns
    -------
    AnnData as :func:`~pipeline.io.readers.read_counts` returns it (``X`` and
    ``layers["counts"]`` the same CSR float32 counts), plus

    ``obs_names``
        ``"<sample>:<barcode>"``.
    ``obs["sample"]``, ``obs["donor"]``
        Categoricals of the sheet values.
    ``obs["timepoint"]``
        Ordered categorical with the categories ``design.timepoints``.
    ``obs["barcode"]``
        The file's barcode.
    ``obs[<extra column>]``
        Each extra sheet column, categorical of strings.
    ``uns["immuneage"]["ingest"]``
        ``{"sample", "source", "format"}``.

    Raises
    ------
    DataFileError
        The file cannot be used (see :func:`~pipeline.io.readers.read_counts`)
        or has fewer than ``ingest.min_cells_per_sample`` cells.
    SampleSheetError
        The row's timepoint is not a ``design.timepoints`` level, or an extra
        column would overwrite a column ingest writes.
    """
    if row.timepoint not in cfg.design.timepoints:
        raise SampleSheetError(
            f"sample {row.sample!r} (sheet line {row.row}): timepoint {row.timepoint!r} is not "
            f"one of design.timepoints ({', '.join(cfg.design.timepoints)})"
        )
    clash = [c for c in row.extra if c in _OBS_WRITTEN]
    if clash:
        raise SampleSheetError(
            f"sample {row.sample!r} (sheet line {row.row}): the extra column(s) "
            f"{', '.join(map(repr, clash))} would overwrite obs columns ingest writes; rename them"
        )
    adata = read_counts(row.path, sample=row.sample)
    fmt = detect_format(row.path, sample=row.sample)
    minimum = cfg.ingest.min_cells_per_sample
    if adata.n_obs < minimum:
        raise DataFileError(
            f"counts file {row.path} (sample {row.sample!r}) has {adata.n_obs} cells, fewer than "
            f"ingest.min_cells_per_sample ({minimum}); drop the sample from the sheet or lower "
            "ingest.min_cells_per_sample"
        )
    n = adata.n_obs
    barcodes = adata.obs[keys.BARCODE].astype(str).to_numpy()
    obs = pd.DataFrame(
        {
            keys.SAMPLE: pd.Categorical([row.sample] * n),
            keys.DONOR: pd.Categorical([row.donor] * n),
            keys.TIMEPOINT: _timepoint_categorical([row.timepoint] * n, cfg),
            keys.BARCODE: barcodes,
        },
        index=pd.Index([f"{row.sample}:{b}" for b in barcodes]),
    )
    for column, value in row.extra.items():
        obs[column] = pd.Categorical([str(value)] * n)
    adata.obs = obs
    adata.uns[keys.UNS] = {
        "ingest": {"sample": row.sample, "source": str(row.path), "format": fmt},
    }
    return adata


def _sample_name(adata: AnnData, i: int) -> str:
    info = adata.uns.get(keys.UNS, {}).get("ingest", {})
    if "sample" in info:
        return str(info["sample"])
    if keys.SAMPLE in adata.obs and adata.n_obs:
        return str(adata.obs[keys.SAMPLE].iloc[0])
    return f"#{i + 1}"


def _counts(adata: AnnData) -> sp.csr_matrix:
    x = adata.layers.get(keys.COUNTS, adata.X)
    if isinstance(x, sp.csr_matrix) and x.dtype == np.float32:
        return x
    return sp.csr_matrix(x, dtype=np.float32)


def _check_overlap(
    gene_sets: list[pd.Index], names: list[str], n_shared: int, minimum: int
) -> None:
    """Error naming the two samples with the smallest overlap when too few genes are shared."""
    if len(gene_sets) < 2 or n_shared >= minimum:
        return
    union = pd.Index(np.unique(np.concatenate([g.to_numpy(dtype=str) for g in gene_sets])))
    rows = np.concatenate([union.get_indexer(g) for g in gene_sets])
    cols = np.concatenate([np.full(len(g), j) for j, g in enumerate(gene_sets)])
    member = sp.csc_matrix(
        (np.ones(len(rows), dtype=np.int64), (rows, cols)), shape=(len(union), len(gene_sets))
    )
    overlap = (member.T @ member).toarray()
    overlap[np.tril_indices_from(overlap)] = np.iinfo(np.int64).max
    a, b = np.unravel_index(np.argmin(overlap), overlap.shape)
    raise DataFileError(
        f"only {n_shared} genes are shared by all {len(gene_sets)} samples, fewer than "
        f"ingest.min_shared_genes ({minimum}). The smallest overlap is between samples "
        f"{names[a]!r} ({len(gene_sets[a])} genes) and {names[b]!r} ({len(gene_sets[b])} genes): "
        f"{int(overlap[a, b])} genes in common. Quantify all samples against the same reference "
        "(genome and annotation, gene symbols in var_names), or set ingest.gene_policy: outer "
        "to keep the union of genes (absent genes count 0)."
    )


def merge_samples(adatas: Sequence[AnnData], cfg: Config) -> AnnData:
    """Concatenate ingested samples (cells stacked in the given order).

    Parameters
    ----------
    adatas
        Samples from :func:`ingest_sample`, in sheet order.
    cfg
        Run configuration (``ingest.gene_policy``, ``ingest.min_shared_genes``,
        ``design.timepoints``).

    Returns
    -------
    One AnnData with

    ``X``, ``layers["counts"]``
        The same CSR float32 counts matrix. Genes: with ``gene_policy: inner``
        those every sample has, in the first sample's order; with ``outer``
        the union in order of first appearance (0 where a sample lacks a gene).
    ``obs``
        The samples' obs: ``sample`` categorical in the given order,
        ``timepoint`` ordered with ``design.timepoints``, ``donor`` and extra
        columns categorical in order of first appearance, ``barcode``.
    ``var["gene_ids"]``, ``var["gene_symbol_original"]``
        From the first sample that has the gene.
    ``uns["immuneage"]["ingest"]``
        ``{"gene_policy", "n_samples", "n_cells_per_sample", "n_genes", "genes_dropped"}``.

    Raises
    ------
    DataFileError
        With ``gene_policy: inner``, fewer than ``ingest.min_shared_genes`` genes
        are shared by all samples.
    ValueError
        No samples, or two samples with the same cell names.

    Warns
    -----
    ImmuneageWarning
        ``gene_policy: inner`` drops genes some samples lack.
    """
    from ..io.ondisk import StackedRows  # imports torch: not for the per-sample tasks
    from ..kernels.sparse import is_row_source

    if not adatas:
        raise ValueError("merge_samples needs at least one sample")
    policy = cfg.ingest.gene_policy
    names = [_sample_name(a, i) for i, a in enumerate(adatas)]
    gene_sets = [a.var_names for a in adatas]

    first_seen = pd.concat([a.var for a in adatas], axis=0)
    first_seen = first_seen[~first_seen.index.duplicated(keep="first")]
    shared = gene_sets[0]
    for genes in gene_sets[1:]:
        shared = shared[shared.isin(genes)]  # keeps the first sample's order
    if policy == "inner":
        _check_overlap(list(gene_sets), names, len(shared), cfg.ingest.min_shared_genes)
        order = shared
        dropped = len(first_seen) - len(shared)
        if dropped:
            warnings.warn(
                f"gene_policy 'inner' drops {dropped} gene(s) that not every sample has, keeping "
                f"the {len(shared)} shared by all {len(adatas)} samples; set "
                "ingest.gene_policy: outer to keep the union",
                ImmuneageWarning,
                stacklevel=2,
            )
    else:
        order = first_seen.index
        dropped = 0

    obs = pd.concat([a.obs for a in adatas], axis=0)
    if obs.index.has_duplicates:
        dup = obs.index[obs.index.duplicated()][:5].tolist()
        raise ValueError(f"samples share cell names (e.g. {dup}); is a sample given twice?")
    if any(is_row_source(a.layers.get(keys.COUNTS, a.X)) for a in adatas):
        # backed mode: the samples stay on disk; the cohort matrix is a lazy stack
        # of them in the cohort's gene order, written block by block by the runner
        x = StackedRows(
            [a.layers.get(keys.COUNTS, a.X) for a in adatas],
            [order.get_indexer(a.var_names) for a in adatas],
            len(order),
            dtype=np.float32,
        )
    else:
        parts = [
            AnnData(
                X=_counts(a),
                obs=pd.DataFrame(index=a.obs_names),
                var=pd.DataFrame(index=a.var_names),
            )
            for a in adatas
        ]
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*names are not unique", category=UserWarning
            )
            merged = anndata.concat(parts, join=policy)
        x = merged.X
        if not merged.var_names.equals(order):
            x = x[:, merged.var_names.get_indexer(order)]
        x = sp.csr_matrix(x, dtype=np.float32)

    for column in obs.columns:
        values = obs[column]
        if column == keys.TIMEPOINT:
            obs[column] = _timepoint_categorical(values.astype(str), cfg)
        elif column == keys.SAMPLE:
            obs[column] = pd.Categorical(values.astype(str), categories=list(dict.fromkeys(names)))
        elif column == keys.BARCODE:
            obs[column] = values.astype(str)
        elif isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object:
            filled = values.astype(object).where(values.notna(), None)
            cats = list(dict.fromkeys(str(v) for v in filled if v is not None))
            obs[column] = pd.Categorical(
                [None if v is None else str(v) for v in filled], categories=cats
            )
    var = first_seen.reindex(order)

    result = AnnData(X=x, obs=obs, var=var)
    result.layers[keys.COUNTS] = result.X
    result.uns[keys.UNS] = {
        "ingest": {
            "gene_policy": policy,
            "n_samples": len(adatas),
            "n_cells_per_sample": {n: int(a.n_obs) for n, a in zip(names, adatas, strict=True)},
            "n_genes": int(result.n_vars),
            "genes_dropped": int(dropped),
        }
    }
    return result


def ingest_table(adatas: Sequence[AnnData]) -> pd.DataFrame:
    """One row per sample: sample, donor, timepoint, format, cells, genes and source path."""
    rows = []
    for a in adatas:
        info = a.uns[keys.UNS]["ingest"]
        rows.append(
            {
                keys.SAMPLE: info["sample"],
                keys.DONOR: str(a.obs[keys.DONOR].iloc[0]),
                keys.TIMEPOINT: str(a.obs[keys.TIMEPOINT].iloc[0]),
                "format": info["format"],
                "n_cells": int(a.n_obs),
                "n_genes": int(a.n_vars),
                "source": info["source"],
            }
        )
    return pd.DataFrame(rows)


def run_ingest_merge(adatas: Sequence[AnnData], cfg: Config) -> StageResult:
    """The ingest stage's merge step: :func:`merge_samples` plus ``tables/ingest_samples.tsv``."""
    return StageResult(merge_samples(adatas, cfg), {"ingest_samples": ingest_table(adatas)})
