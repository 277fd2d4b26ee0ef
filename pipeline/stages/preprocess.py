"""Stage ``preprocess``: filter, normalise, select highly variable genes, PCA.

Reads the merged ingest AnnData and the per-cell QC results, then

1. keeps the cells that passed QC (``obs["qc_pass"]``) and copies the QC
   columns into ``obs``; removes genes seen in fewer than
   ``min_cells_per_gene`` cells;
2. ``X`` = ``log1p(normalize_total(counts, target_sum))`` (sparse); the raw
   counts stay in ``layers["counts"]``;
3. highly variable genes, ``seurat_v3`` on the counts, batch-aware
   (``hvg_batch_key``, default ``sample``); ``hvg_include`` genes are forced in
   and marked in ``var["hvg_forced"]``;
4. PCA on the HVGs of ``X`` (implicitly centred, never densified):
   ``obsm["X_pca"]``, ``varm["PCs"]``, ``uns["pca"]``.

Three interchangeable implementations give the same result within the
tolerances stated in ``tests/test_preprocess.py``: scanpy (CPU),
immuneage's torch kernels (CPU or CUDA, the code CI tests), rapids-singlecell
(CUDA, when it imports).
"""

from __future__ import annotations

import logging
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

__all__ = ["filter_cells_genes", "highly_variable", "normalize", "pca", "run_preprocess"]


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
    out = ad.AnnData(X=counts, obs=obs, var=var, uns=dict(adata.uns))
    out.layers[keys.COUNTS] = counts
    return out


def _drop_zeros(block: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
    block.eliminate_zeros()
    return block


def filter_cells_genes(
    adata: ad.AnnData, qc: ad.AnnData, cfg: PreprocessConfig, *, chunk_size: int | None = None
) -> ad.AnnData:
    """Attach QC columns, keep cells that passed QC and genes seen in enough cells.

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
        genes = np.flatnonzero(n_cells >= cfg.min_cells_per_gene)
        counts = SubsetRows(
            source,
            np.flatnonzero(cells),
            genes if len(genes) < kept.shape[1] else None,
            dtype=np.float32,
        )
        counts = MappedRows(counts, _drop_zeros, dtype=np.float32)
        return _filtered(adata, qobs, cells, genes, n_cells, counts)
    # slice the counts once (rows, then genes); X and layers["counts"] share that one copy
    counts = sp.csr_matrix(source)[np.flatnonzero(cells)]
    counts.eliminate_zeros()
    n_cells = np.bincount(counts.indices, minlength=counts.shape[1])
    genes = np.flatnonzero(n_cells >= cfg.min_cells_per_gene)
    if len(genes) < counts.shape[1]:
        counts = counts[:, genes]
    counts = sp.csr_matrix(counts, dtype=np.float32)
    return _filtered(adata, qobs, cells, genes, n_cells, counts)


def normalize(
    adata: ad.AnnData,
    cfg: PreprocessConfig,
    backend: str,
    device: Any,
    *,
    chunk_size: int | None = None,
) -> None:
    """Set ``X`` to log1p of the library-size-normalised counts (in place).

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
        adata.uns.pop("log1p", None)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)


def highly_variable(
    adata: ad.AnnData,
    cfg: PreprocessConfig,
    backend: str,
    device: Any,
    *,
    chunk_size: int | None = None,
) -> None:
    """Seurat v3 HVGs on the counts, batch-aware; writes scanpy's ``var`` columns in place."""
    n_top = min(cfg.n_top_genes, adata.n_vars)
    batch_key = cfg.hvg_batch_key
    if batch_key is not None and batch_key not in adata.obs:
        raise InputError(
            f"preprocess.hvg_batch_key {batch_key!r} is not an obs column; columns are: "
            f"{', '.join(map(str, adata.obs.columns))}"
        )
    spans = [cfg.hvg_span] + [x for x in (0.5, 0.7, 0.9) if x > cfg.hvg_span]
    for i, span in enumerate(spans):
        try:
            _hvg_once(adata, n_top, batch_key, span, backend, device, chunk_size)
        except ValueError as exc:  # skmisc's LOESS: "near singularities" on tiny batches
            if i == len(spans) - 1 or "singular" not in str(exc):
                raise
            import warnings

            warnings.warn(
                f"seurat_v3 LOESS fit failed at span {span} ({exc!s}); this happens with small "
                f"batches of '{batch_key}'. Retrying with span {spans[i + 1]}",
                ImmuneageWarning,
                stacklevel=2,
            )
            continue
        adata.uns.setdefault(keys.UNS, {})["hvg_span_used"] = span
        break
    forced = adata.var_names.isin(cfg.hvg_include)
    absent = sorted(set(cfg.hvg_include) - set(adata.var_names))
    if absent:
        import warnings

        warnings.warn(
            f"preprocess.hvg_include: {len(absent)} genes are not in the data after filtering "
            f"and are not forced in: {', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}",
            ImmuneageWarning,
            stacklevel=2,
        )
    adata.var["hvg_forced"] = forced & ~adata.var["highly_variable"].to_numpy(bool)
    adata.var["highly_variable"] = adata.var["highly_variable"].to_numpy(bool) | forced


def _hvg_once(
    adata: ad.AnnData,
    n_top: int,
    batch_key: str | None,
    span: float,
    backend: str,
    device: Any,
    chunk_size: int | None = None,
) -> None:
    if backend == "kernels":
        from ..kernels import hvg_seurat_v3

        batch = adata.obs[batch_key].astype(str).to_numpy() if batch_key else None
        df = hvg_seurat_v3(
            adata.layers[keys.COUNTS],
            n_top_genes=n_top,
            batch=batch,
            span=span,
            device=device,
            gene_names=adata.var_names,
            **({"chunk_size": chunk_size} if chunk_size else {}),
        )
        for col in df.columns:
            adata.var[col] = df[col].to_numpy()
    else:
        # rapids-singlecell's seurat_v3 follows scanpy's; the counts -> host fit is the same.
        import scanpy as sc

        sc.pp.highly_variable_genes(
            adata,
            flavor="seurat_v3",
            layer=keys.COUNTS,
            n_top_genes=n_top,
            batch_key=batch_key,
            span=span,
        )
        adata.uns.pop("hvg", None)


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
    ``obsm["X_pca"]``, ``varm["PCs"]``, ``uns["pca"]`` and
    ``uns["immuneage"]["preprocess"]`` (backend, cell and gene counts).
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
