"""Stage ``preprocess``: filter, normalise, select highly variable genes, PCA.

Reads the merged ingest AnnData and the per-cell QC results, then

1. keeps the cells that passed QC (``obs["qc_pass"]``) and copies the QC
   columns into ``obs``; keeps every gene detected in at least one of them
   (scoring and annotation need rare genes such as IL6 or TNF) and marks the
   genes seen in at least ``min_cells_per_gene`` cells as HVG candidates
   (``var["hvg_candidate"]``);
2. ``X`` = ``log1p(normalize_total(counts, target_sum))`` (sparse); the raw
   counts stay in ``layers["counts"]``;
3. highly variable genes among the candidates, ``seurat_v3`` on the counts,
   batch-aware (``hvg_batch_key``, default ``sample``); a batch whose LOESS
   fit fails gets wider spans, then a quadratic trend (:func:`highly_variable`);
   ``hvg_include`` genes are forced in and marked in ``var["hvg_forced"]``;
4. PCA on the HVGs of ``X`` (implicitly centred, never densified):
   ``obsm["X_pca"]``, ``varm["PCs"]``, ``uns["pca"]``.

Three interchangeable implementations give the same result within the
tolerances stated in ``tests/test_preprocess.py``: scanpy (CPU),
immuneage's torch kernels (CPU or CUDA, the code CI tests), rapids-singlecell
(CUDA, when it imports).
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import keys
from ..errors import ImmuneageWarning, InputError
from ._backend import choose_backend, rapids
from ._base import StageResult
from .qc import QC_COLUMNS

log = logging.getLogger("immuneage")

if TYPE_CHECKING:
    import torch

    from ..config import Config, PreprocessConfig

#: var column marking the genes that may be highly variable (seen in min_cells_per_gene cells).
HVG_CANDIDATE = "hvg_candidate"
#: uns key scanpy's ``pp.log1p`` writes (``{"base": None}``: natural log) and its functions read.
LOG1P = "log1p"

__all__ = [
    "HVG_CANDIDATE",
    "LOG1P",
    "filter_cells_genes",
    "highly_variable",
    "normalize",
    "pca",
    "run_preprocess",
]


def _qc_cells(adata: ad.AnnData, qc: ad.AnnData) -> tuple[pd.DataFrame, np.ndarray]:
    """The QC obs of ``adata``'s cells and the mask of those that passed."""
    missing = adata.obs_names.difference(qc.obs_names)
    if len(missing):
        raise InputError(
            f"{len(missing)} cells of the ingest output have no QC result (e.g. {missing[0]}); "
            "re-run the qc stage (`immuneage run ... --from qc`)"
        )
    qobs = qc.obs.loc[adata.obs_names]
    cells = qobs["qc_pass"].to_numpy(bool)
    if not cells.any():
        raise InputError("no cell passed QC in any sample; see tables/qc_per_sample.tsv")
    return qobs, cells


def _filtered(
    adata: ad.AnnData,
    qobs: pd.DataFrame,
    cells: np.ndarray,
    genes: np.ndarray,
    n_cells: np.ndarray,
    counts: Any,
    min_cells_per_gene: int,
) -> ad.AnnData:
    """The filtered AnnData: QC columns in ``obs``, ``X`` and ``layers["counts"]`` = ``counts``."""
    obs = adata.obs.iloc[np.flatnonzero(cells)].copy()
    for col in QC_COLUMNS:
        obs[col] = qobs[col].to_numpy()[cells]
    for col in (keys.SAMPLE, keys.DONOR):
        if hasattr(obs[col], "cat"):
            obs[col] = obs[col].cat.remove_unused_categories()
    var = adata.var.iloc[genes].copy()
    var["n_cells_by_counts"] = n_cells[genes]
    var[HVG_CANDIDATE] = n_cells[genes] >= min_cells_per_gene
    out = ad.AnnData(X=counts, obs=obs, var=var, uns=dict(adata.uns))
    out.layers[keys.COUNTS] = counts
    return out


def _drop_zeros(block: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
    block.eliminate_zeros()
    return block


def filter_cells_genes(
    adata: ad.AnnData, qc: ad.AnnData, cfg: PreprocessConfig, *, chunk_size: int | None = None
) -> ad.AnnData:
    """Attach QC columns, keep the cells that passed QC and the genes detected in them.

    Every gene detected in at least one kept cell stays in the matrix, so that
    scoring and annotation see rarely detected genes (IL6, TNF, IL1A, MMP1 of
    the SASP set are seen in a handful of blood cells); genes detected in no
    kept cell are removed. ``var["n_cells_by_counts"]`` holds the cells each
    gene is detected in, and ``var["hvg_candidate"]`` marks the genes seen in at
    least ``cfg.min_cells_per_gene`` cells: only those are candidates for the
    highly variable genes (and so for PCA and scVI).

    With on-disk counts (a row source, ``backed`` mode) the result's counts are a
    lazy view of the kept cells and genes (:class:`pipeline.io.ondisk.SubsetRows`),
    and the per-gene cell counts come from one pass of ``chunk_size`` cells at a time.
    """
    from ..kernels.sparse import DEFAULT_CHUNK_SIZE, is_row_source

    qobs, cells = _qc_cells(adata, qc)
    source = adata.layers[keys.COUNTS]
    if is_row_source(source):
        from ..io.ondisk import MappedRows, SubsetRows
        from ..kernels.sparse import iter_row_blocks

        kept = SubsetRows(source, np.flatnonzero(cells), dtype=np.float32)
        n_cells = np.zeros(kept.shape[1], dtype=np.int64)
        for _, _, block in iter_row_blocks(kept, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE):
            n_cells += np.bincount(block.indices[block.data != 0], minlength=kept.shape[1])
        genes = np.flatnonzero(n_cells > 0)
        counts = SubsetRows(
            source,
            np.flatnonzero(cells),
            genes if len(genes) < kept.shape[1] else None,
            dtype=np.float32,
        )
        counts = MappedRows(counts, _drop_zeros, dtype=np.float32)
        return _filtered(adata, qobs, cells, genes, n_cells, counts, cfg.min_cells_per_gene)
    # slice the counts once (rows, then genes); X and layers["counts"] share that one copy
    counts = sp.csr_matrix(source)[np.flatnonzero(cells)]
    counts.eliminate_zeros()
    n_cells = np.bincount(counts.indices, minlength=counts.shape[1])
    genes = np.flatnonzero(n_cells > 0)
    if len(genes) < counts.shape[1]:
        counts = counts[:, genes]
    counts = sp.csr_matrix(counts, dtype=np.float32)
    return _filtered(adata, qobs, cells, genes, n_cells, counts, cfg.min_cells_per_gene)


def normalize(
    adata: ad.AnnData,
    cfg: PreprocessConfig,
    backend: str,
    device: Any,
    *,
    chunk_size: int | None = None,
) -> None:
    """Set ``X`` to log1p of the library-size-normalised counts (in place).

    Every backend, in memory or on disk, records ``uns["log1p"] = {"base": None}``
    (natural log) as ``scanpy.pp.log1p`` does: scanpy's functions read it
    (``rank_genes_groups`` un-logs means with it; ``log1p`` and
    ``highly_variable_genes`` use it to tell log data from counts).

    With on-disk counts (``backed`` mode) ``X`` becomes a lazy matrix computed a
    block of cells at a time when it is read (by HVG/PCA here, then by the
    runner writing the artifact): ``log1p(counts * target_sum / total)``, each
    cell on its own, so blocks give the same values as the whole matrix.
    """
    from ..kernels.sparse import is_row_source

    counts = adata.layers[keys.COUNTS]
    if is_row_source(counts):
        from ..io.ondisk import MappedRows
        from ..kernels import normalize_log1p
        from ..kernels.normalize import cell_totals

        target = cfg.target_sum
        if target is None:  # the median total, over all cells, fixed before the blocks
            totals = cell_totals(counts, device=device, chunk_size=chunk_size)
            target = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0

        def lognorm(block: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
            return normalize_log1p(block, target_sum=target, device=device)

        adata.X = MappedRows(counts, lognorm, dtype=np.float32)
        adata.uns[LOG1P] = {"base": None}
        return
    if backend == "kernels":
        from ..kernels import normalize_log1p

        adata.X = normalize_log1p(counts, target_sum=cfg.target_sum, device=device)
    elif backend == "rapids":  # pragma: no cover - needs a GPU and rapids-singlecell
        rsc = rapids()
        tmp = ad.AnnData(counts.copy())
        rsc.get.anndata_to_GPU(tmp)
        rsc.pp.normalize_total(tmp, target_sum=cfg.target_sum)
        rsc.pp.log1p(tmp)
        rsc.get.anndata_to_CPU(tmp)
        adata.X = sp.csr_matrix(tmp.X, dtype=np.float32)
    else:
        import scanpy as sc

        adata.X = counts.astype(np.float32, copy=True)
        sc.pp.normalize_total(adata, target_sum=cfg.target_sum)
        sc.pp.log1p(adata)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.uns[LOG1P] = {"base": None}


def highly_variable(
    adata: ad.AnnData,
    cfg: PreprocessConfig,
    backend: str,
    device: Any,
    *,
    chunk_size: int | None = None,
) -> None:
    """Seurat v3 HVGs on the counts of the candidate genes, batch-aware; writes ``var`` in place.

    Candidates are the genes of ``var["hvg_candidate"]`` (all genes when the
    column is absent). ``var`` gets scanpy's columns (``highly_variable``,
    ``highly_variable_rank``, ``means``, ``variances``, ``variances_norm``,
    ``highly_variable_nbatches``; NaN / 0 / ``False`` for non-candidates) and
    ``hvg_forced``.

    LOESS failures never stop the stage. skmisc's LOESS can fail on small
    batches (``reciprocal condition number``, ``near singularities``: the gene
    means of a few dozen cells take few distinct values). A failing batch is
    refitted alone with wider spans (0.5, 0.7, 0.9), then with a global
    quadratic mean-variance trend; the other batches keep their fit. The scanpy
    backend runs scanpy first and, when its LOESS fails, the torch kernel
    (:func:`pipeline.kernels.hvg_seurat_v3`, scanpy's algorithm, on the CPU)
    with that per-batch fallback, so both backends give the same result.
    The batches whose fit failed at ``span`` are summarised once (one INFO
    line: widening the span is routine on small batches); a warning is issued
    only when the quadratic trend took over for at least half of the batches
    (:func:`_report_fits`). ``uns["immuneage"]["hvg"]``
    records the flavour, batch key, span, candidates and each batch's fit
    (``trend_fits``: batch -> ``loess span S`` or ``quadratic``).
    """
    batch_key = cfg.hvg_batch_key
    if batch_key is not None and batch_key not in adata.obs:
        raise InputError(
            f"preprocess.hvg_batch_key {batch_key!r} is not an obs column; columns are: "
            f"{', '.join(map(str, adata.obs.columns))}"
        )
    cand = (
        adata.var[HVG_CANDIDATE].to_numpy(bool)
        if HVG_CANDIDATE in adata.var
        else np.ones(adata.n_vars, bool)
    )
    n_top = min(cfg.n_top_genes, int(cand.sum()))
    if n_top < 1:
        raise InputError(
            f"no gene is detected in preprocess.min_cells_per_gene = {cfg.min_cells_per_gene} "
            "cells: nothing to select highly variable genes from; lower min_cells_per_gene"
        )
    df, fits = _hvg_candidates(
        adata, cand, n_top, batch_key, cfg.hvg_span, backend, device, chunk_size
    )
    _report_fits(fits, cfg.hvg_span, batch_key)
    idx = np.flatnonzero(cand)
    columns = {
        "highly_variable": np.zeros(adata.n_vars, bool),
        "highly_variable_rank": np.full(adata.n_vars, np.nan, np.float32),
        "means": np.full(adata.n_vars, np.nan),
        "variances": np.full(adata.n_vars, np.nan),
        "variances_norm": np.full(adata.n_vars, np.nan),
    }
    if batch_key is not None:
        columns["highly_variable_nbatches"] = np.zeros(adata.n_vars, np.int64)
    for col, values in columns.items():
        values[idx] = df[col].to_numpy()
        adata.var[col] = values
    adata.uns.setdefault(keys.UNS, {})["hvg"] = {
        "flavor": "seurat_v3",
        "batch_key": "none" if batch_key is None else batch_key,
        "span": cfg.hvg_span,
        "min_cells_per_gene": cfg.min_cells_per_gene,
        "n_candidates": int(cand.sum()),
        "trend_fits": fits,
        "fallback": any(f != f"loess span {cfg.hvg_span:g}" for f in fits.values()),
    }
    forced = adata.var_names.isin(cfg.hvg_include)
    absent = sorted(set(cfg.hvg_include) - set(adata.var_names))
    if absent:
        warnings.warn(
            f"preprocess.hvg_include: {len(absent)} genes are not in the data after filtering "
            f"and are not forced in: {', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}",
            ImmuneageWarning,
            stacklevel=2,
        )
    adata.var["hvg_forced"] = forced & ~adata.var["highly_variable"].to_numpy(bool)
    adata.var["highly_variable"] = adata.var["highly_variable"].to_numpy(bool) | forced


#: Batches named in the HVG fallback summary (all of them are in ``uns["immuneage"]["hvg"]``).
_NAMED_BATCHES = 6


def _fit_order(fit: str) -> tuple[int, float]:
    """Sort key of a trend fit: LOESS by span, then the quadratic."""
    if fit == "quadratic":
        return (1, 0.0)
    return (0, float(fit.rsplit(" ", 1)[-1]))


def _report_fits(fits: dict[str, str], span: float, batch_key: str | None) -> None:
    """Summarise, once per run, the batches whose seurat_v3 LOESS fit at ``span`` failed.

    A wider span is the routine case on small batches (gene means of a few
    dozen cells take few distinct values and skmisc's local fits turn
    singular; on real PBMCs even 10-cell samples fit at span 0.7): one INFO
    line. A quadratic trend (every span failed) for a minority of the batches
    changes little, since a gene's rank is its median over batches: said in
    the same line. Only when at least half of the batches (or the only one)
    got the quadratic trend do the highly variable genes rest mostly on it
    rather than on seurat_v3's local fit: then one :class:`ImmuneageWarning`.
    """
    from ..kernels.hvg import FALLBACK_SPANS

    default = f"loess span {span:g}"
    failed = {b: f for b, f in fits.items() if f != default}
    if not failed:
        return
    n = len(fits)
    where = (
        f"{len(failed)} of {n} batches of {batch_key!r}"
        if batch_key is not None
        else "the single batch (all cells)"
    )
    counts: dict[str, int] = {}
    for f in sorted(failed.values(), key=_fit_order):
        counts[f] = counts.get(f, 0) + 1
    quad = counts.pop("quadratic", 0)
    how = []
    if counts:
        spans = ", ".join(
            f"{f.removeprefix('loess span ')}: {k} batch{'es' if k > 1 else ''}"
            for f, k in counts.items()
        )
        how.append(f"refitted with a wider span ({spans})")
    if quad:
        how.append(f"a quadratic trend for {quad} (every span failed)")

    def named(batches: list[str]) -> str:
        if batch_key is None:
            return ""
        more = " ..." if len(batches) > _NAMED_BATCHES else ""
        return f" ({', '.join(sorted(batches)[:_NAMED_BATCHES])}{more})"

    if 2 * quad < n:
        log.info(
            "preprocess: HVG: the seurat_v3 LOESS fit at span %g failed for %s%s, routine on "
            "small batches; %s; each batch's fit: uns['immuneage']['hvg']['trend_fits']",
            span,
            where,
            named(list(failed)),
            "; ".join(how),
        )
        return
    quads = [b for b, f in failed.items() if f == "quadratic"]
    pool = (
        ""
        if batch_key is None
        else "; pooling small batches (preprocess.hvg_batch_key: a coarser column, or null for "
        "one fit over all cells) gives LOESS more cells per fit"
    )
    warnings.warn(
        f"HVG: the seurat_v3 LOESS fit failed at every span (up to {FALLBACK_SPANS[-1]:g}) for "
        f"{where if batch_key is None else f'{quad} of {n} batches of {batch_key!r}'}"
        f"{named(quads)}: too few cells or genes for a local fit, so the highly variable genes "
        f"rest {'' if quad == n else 'mostly '}on one quadratic of log variance on log mean instead "
        f"(uns['immuneage']['hvg']['trend_fits']){pool}",
        ImmuneageWarning,
        stacklevel=3,
    )


def _hvg_candidates(
    adata: ad.AnnData,
    cand: np.ndarray,
    n_top: int,
    batch_key: str | None,
    span: float,
    backend: str,
    device: Any,
    chunk_size: int | None,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Seurat v3 on the candidate genes' counts: scanpy's columns and each batch's trend fit."""
    from ..kernels import hvg_seurat_v3
    from ..kernels.hvg import is_loess_error
    from ..kernels.sparse import is_row_source

    counts = adata.layers[keys.COUNTS]
    every = bool(cand.all())
    genes = np.flatnonzero(cand)
    if is_row_source(counts):
        from ..io.ondisk import SubsetRows

        sub = counts if every else SubsetRows(counts, None, genes, dtype=np.float32)
    else:
        sub = sp.csr_matrix(counts) if every else sp.csr_matrix(counts)[:, genes]
    batch = adata.obs[batch_key].astype(str).to_numpy() if batch_key else None
    if backend != "kernels" and not is_row_source(sub):
        # rapids-singlecell's seurat_v3 follows scanpy's; the counts -> host fit is the same.
        import scanpy as sc

        tmp = ad.AnnData(sub, var=pd.DataFrame(index=adata.var_names[genes]))
        if batch is not None:
            tmp.obs["batch"] = pd.Categorical(batch)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                sc.pp.highly_variable_genes(
                    tmp,
                    flavor="seurat_v3",
                    n_top_genes=n_top,
                    batch_key=None if batch is None else "batch",
                    span=span,
                )
            labels = ["all cells"] if batch is None else sorted(set(batch))
            return tmp.var, dict.fromkeys(labels, f"loess span {span:g}")
        except ValueError as exc:
            if not is_loess_error(exc):
                raise
            log.debug(
                "preprocess: scanpy's seurat_v3 LOESS failed (%s); fitting each batch with the "
                "kernels' seurat_v3 and its span fallback",
                str(exc).strip("b'\""),
            )
        device = "cpu"
    df = hvg_seurat_v3(
        sub,
        n_top_genes=n_top,
        batch=batch,
        span=span,
        on_fit_error="fallback",
        device=device,
        gene_names=adata.var_names[genes],
        **({"chunk_size": chunk_size} if chunk_size else {}),
    )
    return df, dict(df.attrs["trend_fits"])


def pca(
    adata: ad.AnnData,
    cfg: PreprocessConfig,
    seed: int,
    backend: str,
    device: Any,
    *,
    chunk_size: int | None = None,
) -> None:
    """PCA of the HVG columns of ``X``; writes ``obsm["X_pca"]``, ``varm["PCs"]``, ``uns["pca"]``."""
    hv = adata.var["highly_variable"].to_numpy(bool)
    n_comps = min(cfg.n_comps, int(hv.sum()) - 1, adata.n_obs - 1)
    if n_comps < 2:
        raise InputError(
            f"PCA needs at least 3 highly variable genes and cells; have {int(hv.sum())} genes "
            f"and {adata.n_obs} cells"
        )
    from ..kernels.sparse import is_row_source

    if is_row_source(adata.X):
        emb, comps, var, ratio = _pca_row_source(
            adata.X, np.flatnonzero(hv), n_comps, seed, device, chunk_size
        )
    elif backend == "kernels":
        from ..kernels import pca_sparse

        x = sp.csr_matrix(adata.X)[:, hv]
        res = pca_sparse(x, n_comps=n_comps, seed=seed, device=device)
        emb, comps, var, ratio = res
    else:
        import scanpy as sc

        tmp = ad.AnnData(sp.csr_matrix(adata.X)[:, hv])
        if backend == "rapids":  # pragma: no cover - needs a GPU and rapids-singlecell
            rsc = rapids()
            rsc.get.anndata_to_GPU(tmp)
            rsc.pp.pca(tmp, n_comps=n_comps, random_state=seed)
            rsc.get.anndata_to_CPU(tmp)
        else:
            sc.pp.pca(tmp, n_comps=n_comps, svd_solver="arpack", random_state=seed)
        emb = tmp.obsm["X_pca"]
        comps = tmp.varm["PCs"].T
        var = tmp.uns["pca"]["variance"]
        ratio = tmp.uns["pca"]["variance_ratio"]
    emb = np.asarray(emb, dtype=np.float32)
    comps = np.asarray(comps, dtype=np.float32)
    # one deterministic sign per component: the largest |loading| is positive
    signs = np.sign(comps[np.arange(comps.shape[0]), np.abs(comps).argmax(axis=1)])
    signs[signs == 0] = 1
    emb, comps = emb * signs, comps * signs[:, None]
    pcs = np.zeros((adata.n_vars, n_comps), dtype=np.float32)
    pcs[hv] = comps.T
    adata.obsm[keys.X_PCA] = emb
    adata.varm["PCs"] = pcs
    adata.uns["pca"] = {
        "variance": np.asarray(var, dtype=np.float64),
        "variance_ratio": np.asarray(ratio, dtype=np.float64),
        "params": {"zero_center": True, "n_comps": n_comps, "mask_var": "highly_variable"},
    }


def _pca_row_source(
    x: Any, hv: np.ndarray, n_comps: int, seed: int, device: Any, chunk_size: int | None
) -> tuple[Any, Any, Any, Any]:
    """PCA of the HVG columns of an on-disk ``X``, read block by block.

    The HVG slice is first written once to a scratch h5ad
    (:func:`pipeline.io.ondisk.scratch_columns`): the power iterations read it
    about forty times, and it is a fraction of the whole matrix.
    """
    import contextlib

    from ..io.ondisk import scratch_columns
    from ..kernels import pca_sparse
    from ..kernels.sparse import DEFAULT_CHUNK_SIZE

    chunk = chunk_size or DEFAULT_CHUNK_SIZE
    with contextlib.ExitStack() as stack:
        hvg = scratch_columns(x, hv, stack, chunk_size=chunk, prefix="immuneage-pca-")
        return tuple(pca_sparse(hvg, n_comps=n_comps, seed=seed, device=device, chunk_size=chunk))


def run_preprocess(
    adata: ad.AnnData, qc: ad.AnnData, cfg: Config, *, device: torch.device | str = "cpu"
) -> StageResult:
    """Filter, normalise, pick HVGs and run PCA.

    Parameters
    ----------
    adata
        Merged ingest output (counts in ``layers["counts"]``).
    qc
        Merged QC output (per-cell ``obs`` with ``qc_pass``).
    cfg
        Run configuration (reads ``preprocess``, ``backend``, ``seed``).
    device
        The run's device.

    Returns
    -------
    StageResult with the AnnData: ``X`` log-normalised (CSR float32),
    ``layers["counts"]``, QC columns in ``obs``, ``var["highly_variable"]``,
    ``var["highly_variable_rank"]``, ``var["means"]``, ``var["variances"]``,
    ``var["variances_norm"]``, ``var["highly_variable_nbatches"]`` (with a
    batch key), ``var["hvg_forced"]``, ``var["n_cells_by_counts"]``,
    ``var["hvg_candidate"]``, ``obsm["X_pca"]``, ``varm["PCs"]``,
    ``uns["pca"]``, ``uns["log1p"]``, ``uns["immuneage"]["hvg"]`` (flavour, span, each batch's
    trend fit, see :func:`highly_variable`) and ``uns["immuneage"]["preprocess"]``
    (backend, cell and gene counts, HVG candidates).
    """
    p = cfg.preprocess
    backend = "kernels" if cfg.backed else choose_backend(cfg.backend, device)
    chunk = cfg.chunk_size if cfg.backed else None
    log.info(
        "preprocess: backend %s on %s%s",
        backend,
        getattr(device, "type", device),
        f", matrices on disk ({chunk} cells a block)" if cfg.backed else "",
    )
    n_cells_in, n_genes_in = adata.n_obs, adata.n_vars
    out = filter_cells_genes(adata, qc, p, chunk_size=chunk)
    normalize(out, p, backend, device, chunk_size=chunk)
    highly_variable(out, p, backend, device, chunk_size=chunk)
    pca(out, p, cfg.seed, backend, device, chunk_size=chunk)
    info = out.uns.setdefault(keys.UNS, {})
    info["preprocess"] = {
        "backend": backend,
        "backed": bool(cfg.backed),
        "device": str(getattr(device, "type", device)),
        "n_cells_in": n_cells_in,
        "n_cells_out": out.n_obs,
        "n_genes_in": n_genes_in,
        "n_genes_out": out.n_vars,
        "n_hvg_candidates": int(out.var[HVG_CANDIDATE].sum()),
        "n_hvg": int(out.var["highly_variable"].sum()),
    }
    hvg = out.var.loc[
        out.var["highly_variable"],
        ["highly_variable_rank", "means", "variances_norm", "hvg_forced"],
    ]
    hvg = (
        hvg.sort_values("highly_variable_rank", na_position="last")
        .rename_axis("gene")
        .reset_index()
    )
    return StageResult(out, {"hvg": hvg})
