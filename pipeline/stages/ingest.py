"""Ingest: read each sample's counts, annotate its cells, merge the samples.

Pure functions: they read the users' counts files (read-only) but write
nothing; the runner saves the result and records provenance.

A sample made of several libraries (sheet lines sharing a ``sample`` id with
distinct ``library`` values: 10x lanes or GEM wells of one donor x timepoint)
is read library by library and concatenated into one sample; its cell ids are
``<sample>:<library>:<barcode>`` because barcodes repeat across libraries.
Every other sample keeps ``<sample>:<barcode>``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .. import keys
from ..ambient import run_ambient
from ..config import Config
from ..errors import DataFileError, ImmuneageWarning, SampleSheetError
from ..io.readers import detect_format, read_counts
from ..io.samplesheet import LibraryRow, SampleRow
from ._base import StageResult

__all__ = [
    "READ_FIELDS",
    "ingest_sample",
    "ingest_table",
    "merge_obsm",
    "merge_samples",
    "merge_var",
    "run_ingest_merge",
]

log = logging.getLogger("immuneage")

_OBS_WRITTEN = (keys.SAMPLE, keys.DONOR, keys.TIMEPOINT, keys.BARCODE, keys.LIBRARY)
#: Fields of the readers' ``uns["immuneage"]["read"]`` record kept per sample
#: (in ``uns["immuneage"]["ingest"]["read"]`` and ``tables/ingest_samples.tsv``).
READ_FIELDS = ("file", "counts_source", "symbols_from", "raw_matrix", "other_features")
_JOIN = "; "  # joins the values of a sample's libraries


def _timepoint_categorical(values: Sequence[str] | pd.Series, cfg: Config) -> pd.Categorical:
    return pd.Categorical(values, categories=list(cfg.design.timepoints), ordered=True)


def _text(value: Any) -> str:
    """A read-record value as one string (lists comma-joined, missing as "")."""
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple | np.ndarray | pd.Index):
        return ", ".join(_text(v) for v in value)
    return str(value)


def _joined(values: Sequence[str]) -> str:
    """One value for a sample's libraries: theirs when all agree, else all joined with "; "."""
    return values[0] if len(set(values)) == 1 else _JOIN.join(values)


def _ambient_summary(record: Mapping[str, Any] | None) -> str:
    """One line for ``tables/ingest_samples.tsv``: method, fraction removed, raw matrix used."""
    if record is None:
        return "none"
    raw = "raw matrix" if record["raw_matrix_used"] else "filtered matrix only"
    return f"{record['method']}: {record['fraction_removed']:.2%} of counts removed ({raw})"


def _read_library(row: SampleRow, lib: LibraryRow, cfg: Config) -> AnnData:
    """Read one library of ``row`` and give its cells the sheet's metadata."""
    adata = read_counts(lib.path, sample=row.sample, **lib.reader_options(cfg.ingest))
    ambient = run_ambient(adata, cfg.ambient)  # per library: ambient RNA is a droplet property
    record = dict(adata.uns.get(keys.UNS, {}).get("read", {}))
    fmt = str(record.get("format") or detect_format(lib.path, sample=row.sample))
    several = len(row.libraries) > 1
    named = any(x.library for x in row.libraries)
    n = adata.n_obs
    barcodes = adata.obs[keys.BARCODE].astype(str).to_numpy()
    prefix = f"{row.sample}:{lib.library}:" if several else f"{row.sample}:"
    obs = pd.DataFrame(
        {
            keys.SAMPLE: pd.Categorical([row.sample] * n),
            keys.DONOR: pd.Categorical([row.donor] * n),
            keys.TIMEPOINT: _timepoint_categorical([row.timepoint] * n, cfg),
            keys.BARCODE: barcodes,
        },
        index=pd.Index([prefix + b for b in barcodes]),
    )
    if named:
        obs[keys.LIBRARY] = pd.Categorical([lib.library] * n)
    for column, value in row.extra.items():
        obs[column] = pd.Categorical([str(value)] * n)
    obsm = {
        k: (v.set_axis(obs.index) if isinstance(v, pd.DataFrame) else v)
        for k, v in adata.obsm.items()
    }
    counts = adata.layers.get(keys.COUNTS, adata.X)
    if ambient is not None:
        obs[keys.AMBIENT_FRACTION] = adata.obs[keys.AMBIENT_FRACTION].to_numpy()
    out = AnnData(X=counts, obs=obs, var=adata.var.copy(), obsm=obsm)
    out.layers[keys.COUNTS] = out.X
    if ambient is not None:
        out.layers[keys.COUNTS_UNCORRECTED] = adata.layers[keys.COUNTS_UNCORRECTED]
    record.setdefault("file", str(lib.path))
    read = {f: _text(record.get(f)) for f in READ_FIELDS}
    out.uns[keys.UNS] = {
        "library": {
            "source": str(lib.path),
            "format": fmt,
            "read": read,
            "ambient": _ambient_summary(ambient),
        }
    }
    log.info(
        "sample %s%s: read %s (%s; counts from %s; symbols from %s%s)",
        row.sample,
        f", library {lib.library}" if lib.library else "",
        read["file"],
        fmt,
        read["counts_source"] or "the reader's default",
        read["symbols_from"] or "the reader's default",
        f"; other features: {read['other_features']}" if read["other_features"] else "",
    )
    return out


def ingest_sample(row: SampleRow, cfg: Config) -> AnnData:
    """Read one sample (every library of it) and annotate its cells with the sheet's metadata.

    Parameters
    ----------
    row
        The sample's sheet line(s): one library, or several (``row.libraries``)
        that are read one by one and concatenated.
    cfg
        Run configuration (``design.timepoints``, ``ingest.min_cells_per_sample``,
        ``ingest.counts_layer``, ``ingest.symbol_column``, ``ingest.gene_policy``
        for libraries whose genes differ).

    Returns
    -------
    AnnData as :func:`~pipeline.io.readers.read_counts` returns it (``X`` and
    ``layers["counts"]`` the same CSR float32 counts), plus

    ``obs_names``
        ``"<sample>:<barcode>"``; ``"<sample>:<library>:<barcode>"`` when the
        sample has several libraries.
    ``obs["sample"]``, ``obs["donor"]``
        Categoricals of the sheet values.
    ``obs["timepoint"]``
        Ordered categorical with the categories ``design.timepoints``.
    ``obs["barcode"]``
        The file's barcode.
    ``obs["library"]``
        The sheet's ``library`` value, when the sample's line(s) name one.
    ``obs[<extra column>]``
        Each extra sheet column, categorical of strings.
    ``obsm[<feature type>]``
        What the reader put there (e.g. ``obsm["antibody_capture"]``), the
        libraries' tables merged as in :func:`merge_obsm`.
    ``uns["immuneage"]["ingest"]``
        ``{"sample", "source", "format", "libraries", "read"}``: ``read`` holds
        :data:`READ_FIELDS` from the reader's ``uns["immuneage"]["read"]`` as
        strings; for a sample of several libraries, a value they share once,
        else theirs joined with ``"; "`` in sheet order (``libraries``: their
        names, ``""`` when unnamed).

    Raises
    ------
    DataFileError
        A file cannot be used (see :func:`~pipeline.io.readers.read_counts`),
        or the sample has fewer than ``ingest.min_cells_per_sample`` cells.
    SampleSheetError
        The row's timepoint is not a ``design.timepoints`` level, or an extra
        column would overwrite a column ingest writes.

    Warns
    -----
    ImmuneageWarning
        The libraries of the sample have different genes.
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
    parts = [_read_library(row, lib, cfg) for lib in row.libraries]
    adata = parts[0] if len(parts) == 1 else _concat_libraries(row, parts, cfg)
    minimum = cfg.ingest.min_cells_per_sample
    if adata.n_obs < minimum:
        files = ", ".join(map(str, row.paths))
        raise DataFileError(
            f"counts file {files} (sample {row.sample!r}) has {adata.n_obs} cells, fewer than "
            f"ingest.min_cells_per_sample ({minimum}); drop the sample from the sheet or lower "
            "ingest.min_cells_per_sample"
        )
    infos = [p.uns[keys.UNS]["library"] for p in parts]
    adata.uns[keys.UNS] = {
        "ingest": {
            "sample": row.sample,
            "source": _joined([i["source"] for i in infos]),
            "format": _joined([i["format"] for i in infos]),
            "libraries": _joined([lib.library for lib in row.libraries]),
            "read": {f: _joined([i["read"][f] for i in infos]) for f in READ_FIELDS},
            "ambient": _joined([i["ambient"] for i in infos]),
        },
    }
    return adata


def _concat_libraries(row: SampleRow, parts: list[AnnData], cfg: Config) -> AnnData:
    """One AnnData of a sample's libraries, cells stacked in sheet order."""
    policy = cfg.ingest.gene_policy
    order, _ = _gene_order([p.var_names for p in parts], policy)
    if any(not p.var_names.equals(parts[0].var_names) for p in parts[1:]):
        libs = ", ".join(repr(lib.library) for lib in row.libraries)
        warnings.warn(
            f"sample {row.sample!r}: its libraries ({libs}) do not have the same genes "
            f"(quantified against different references?); gene_policy {policy!r} keeps "
            f"{len(order)} genes for the sample",
            ImmuneageWarning,
            stacklevel=3,
        )

    def stacked(layer: str | None) -> sp.csr_matrix:
        """The parts' ``X`` (or ``layer``) stacked, each in the sample's gene order."""
        return sp.vstack(
            [
                _remap_columns(
                    p.X if layer is None else p.layers[layer],
                    order.get_indexer(p.var_names),
                    len(order),
                )
                for p in parts
            ],
            format="csr",
        )

    x = stacked(None)
    obs = pd.concat([p.obs for p in parts], axis=0)
    for column in obs.columns:
        if column == keys.TIMEPOINT:
            obs[column] = _timepoint_categorical(obs[column].astype(str), cfg)
        elif column != keys.BARCODE and not pd.api.types.is_numeric_dtype(obs[column]):
            values = obs[column].astype(str)
            obs[column] = pd.Categorical(values, categories=list(dict.fromkeys(values)))
    out = AnnData(
        X=x,
        obs=obs,
        var=merge_var([p.var for p in parts], order),
        obsm=merge_obsm(parts, obs.index),
    )
    out.layers[keys.COUNTS] = out.X
    if all(keys.COUNTS_UNCORRECTED in p.layers for p in parts):
        out.layers[keys.COUNTS_UNCORRECTED] = stacked(keys.COUNTS_UNCORRECTED)
    return out


def _sample_name(adata: AnnData, i: int) -> str:
    info = adata.uns.get(keys.UNS, {}).get("ingest", {})
    if "sample" in info:
        return str(info["sample"])
    if keys.SAMPLE in adata.obs and adata.n_obs:
        return str(adata.obs[keys.SAMPLE].iloc[0])
    return f"#{i + 1}"


def _remap_columns(x: Any, col_map: np.ndarray, n_cols: int) -> sp.csr_matrix:
    """CSR float32 ``x`` with column ``j`` moved to ``col_map[j]`` (dropped where -1)."""
    x = sp.csr_matrix(x, dtype=np.float32)
    new = np.asarray(col_map, dtype=np.int64)[x.indices]
    keep = new >= 0
    indptr = np.concatenate([[0], np.cumsum(keep)])[x.indptr]
    out = sp.csr_matrix((x.data[keep], new[keep], indptr), shape=(x.shape[0], n_cols))
    out.sort_indices()
    return out


def _gene_order(gene_sets: Sequence[pd.Index], policy: str) -> tuple[pd.Index, int]:
    """Genes kept (inner: shared, first set's order; outer: union by first appearance)
    and how many of the union are dropped."""
    union = pd.Index(list(dict.fromkeys(g for genes in gene_sets for g in genes)))
    if policy == "outer":
        return union, 0
    shared = gene_sets[0]
    for genes in gene_sets[1:]:
        shared = shared[shared.isin(genes)]  # keeps the first set's order
    return shared, len(union) - len(shared)


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


def _is_text(values: pd.Series) -> bool:
    dtype = values.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        dtype = dtype.categories.dtype
    return pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype)


def merge_var(frames: Sequence[pd.DataFrame], order: pd.Index) -> pd.DataFrame:
    """Merge the var tables of several samples into one, over the genes ``order``.

    A column some samples have and others lack (gene ids, feature types,
    genome, ...) is kept; for each gene its value comes from the first sample
    that has a non-missing one (``""`` counts as missing in text columns).

    Parameters
    ----------
    frames
        The samples' ``var``, in sample order.
    order
        The merged genes.

    Returns
    -------
    A DataFrame indexed by ``order`` with the union of the columns in order of
    first appearance: text (object, string or categorical) columns as plain
    ``str`` objects with ``""`` where no sample has a value; boolean columns
    as ``bool`` (pandas ``boolean`` when a value is missing); integer columns
    as their dtype (``Int64`` when missing); other numbers as ``float64`` with NaN.
    Every column is one anndata writes and reads back.
    """
    out = pd.DataFrame(index=order)
    columns = list(dict.fromkeys(c for f in frames for c in f.columns))
    for column in columns:
        having = [f[column] for f in frames if column in f.columns]
        text = any(_is_text(s) for s in having)
        parts = []
        for s in having:
            s = s.astype(object) if text or isinstance(s.dtype, pd.CategoricalDtype) else s
            missing = s.isna() | (s.astype(str) == "") if text else s.isna()
            parts.append(s[~missing])
        stacked = pd.concat(parts) if parts else pd.Series(dtype=object)
        stacked = stacked[~stacked.index.duplicated(keep="first")]
        values = stacked.reindex(order)
        complete = bool(values.notna().all())
        if text:
            out[column] = np.asarray([str(v) if pd.notna(v) else "" for v in values], dtype=object)
        elif all(pd.api.types.is_bool_dtype(s.dtype) for s in having):
            out[column] = values.astype(bool if complete else "boolean")
        elif all(pd.api.types.is_integer_dtype(s.dtype) for s in having):
            out[column] = values.astype(having[0].dtype if complete else "Int64")
        else:
            out[column] = pd.to_numeric(values, errors="coerce").astype(np.float64)
    return out


def merge_obsm(adatas: Sequence[AnnData], obs_names: pd.Index) -> dict[str, Any]:
    """Merge per-cell tables of other modalities (e.g. ``obsm["antibody_capture"]``).

    Each ``obsm`` entry becomes one DataFrame over all cells: its columns the
    union of the samples' columns (feature names, order of first appearance),
    0 where a sample lacks a column, and rows of 0 for samples without the
    entry. Arrays are taken as tables with columns ``"0"``, ``"1"``, ...

    Parameters
    ----------
    adatas
        The samples, in the order their cells are stacked.
    obs_names
        The stacked cell ids (the merged table's index).

    Returns
    -------
    ``{key: DataFrame}``; numeric tables are ``float32``.
    """
    out: dict[str, Any] = {}
    entries = list(dict.fromkeys(k for a in adatas for k in a.obsm))
    for key in entries:
        frames = []
        for a in adatas:
            value = a.obsm.get(key)
            if value is None:
                frame = pd.DataFrame(index=a.obs_names)
            elif isinstance(value, pd.DataFrame):
                frame = value.copy()
            else:
                dense = value.toarray() if sp.issparse(value) else np.asarray(value)
                frame = pd.DataFrame(dense.reshape(a.n_obs, -1))
            frame.columns = frame.columns.astype(str)
            frame.index = a.obs_names
            frames.append(frame)
        columns = list(dict.fromkeys(c for f in frames for c in f.columns))
        table = pd.concat([f.reindex(columns=columns, fill_value=0) for f in frames], axis=0)
        table.index = obs_names
        if all(pd.api.types.is_numeric_dtype(t) for t in table.dtypes):
            table = table.astype(np.float32)
        out[key] = table
    return out


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
        The same CSR float32 counts matrix (with ``backed: true`` and on-disk
        samples, a lazy stack of them). Genes: with ``gene_policy: inner``
        those every sample has, in the first sample's order; with ``outer``
        the union in order of first appearance (0 where a sample lacks a gene).
    ``obs``
        The samples' obs: ``sample`` categorical in the given order,
        ``timepoint`` ordered with ``design.timepoints``, ``donor``,
        ``library`` and extra columns categorical in order of first appearance
        (missing for samples without them), ``barcode``.
    ``var``
        Every var column any sample has (``gene_ids``,
        ``gene_symbol_original``, feature types, genome, ...), per gene from
        the first sample with a value; see :func:`merge_var`.
    ``obsm``
        Other modalities' per-cell tables, see :func:`merge_obsm`.
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
    order, dropped = _gene_order(gene_sets, policy)
    if policy == "inner":
        _check_overlap(list(gene_sets), names, len(order), cfg.ingest.min_shared_genes)
        if dropped:
            warnings.warn(
                f"gene_policy 'inner' drops {dropped} gene(s) that not every sample has, keeping "
                f"the {len(order)} shared by all {len(adatas)} samples; set "
                "ingest.gene_policy: outer to keep the union",
                ImmuneageWarning,
                stacklevel=2,
            )

    obs = pd.concat([a.obs for a in adatas], axis=0)
    if obs.index.has_duplicates:
        dup = obs.index[obs.index.duplicated()][:5].tolist()
        raise ValueError(f"samples share cell names (e.g. {dup}); is a sample given twice?")
    col_maps = [order.get_indexer(a.var_names) for a in adatas]
    if any(is_row_source(a.layers.get(keys.COUNTS, a.X)) for a in adatas):
        # backed mode: the samples stay on disk; the cohort matrix is a lazy stack
        # of them in the cohort's gene order, written block by block by the runner
        x = StackedRows(
            [a.layers.get(keys.COUNTS, a.X) for a in adatas], col_maps, len(order), np.float32
        )
    else:
        x = sp.vstack(
            [
                _remap_columns(a.layers.get(keys.COUNTS, a.X), m, len(order))
                for a, m in zip(adatas, col_maps, strict=True)
            ],
            format="csr",
        )

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

    result = AnnData(
        X=x,
        obs=obs,
        var=merge_var([a.var for a in adatas], order),
        obsm=merge_obsm(adatas, obs.index),
    )
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
    """One row per sample: what was read and how (``tables/ingest_samples.tsv``).

    Columns: ``sample, donor, timepoint, format, n_cells, n_genes, source``,
    the reader's record (:data:`READ_FIELDS`: ``file, counts_source,
    symbols_from, raw_matrix, other_features``) and ``libraries``; for a
    sample of several libraries, a value they share once, else theirs joined
    with ``"; "`` in sheet order.
    """
    rows = []
    for a in adatas:
        info = a.uns[keys.UNS]["ingest"]
        read = info.get("read", {})
        rows.append(
            {
                keys.SAMPLE: info["sample"],
                keys.DONOR: str(a.obs[keys.DONOR].iloc[0]),
                keys.TIMEPOINT: str(a.obs[keys.TIMEPOINT].iloc[0]),
                "format": info["format"],
                "n_cells": int(a.n_obs),
                "n_genes": int(a.n_vars),
                "source": info["source"],
                **{f: _text(read.get(f, "")) for f in READ_FIELDS},
                "libraries": _text(info.get("libraries", "")),
                "ambient": _text(info.get("ambient", "none")),
            }
        )
    return pd.DataFrame(rows)


def run_ingest_merge(adatas: Sequence[AnnData], cfg: Config) -> StageResult:
    """The ingest stage's merge step: :func:`merge_samples` plus ``tables/ingest_samples.tsv``."""
    return StageResult(merge_samples(adatas, cfg), {"ingest_samples": ingest_table(adatas)})
