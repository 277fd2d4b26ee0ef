"""Ambient RNA correction of one sample's counts (off by default).

Every droplet of a 10x library holds some free-floating ("ambient") RNA from
lysed cells; in blood, platelet (PPBP, PF4) and haemoglobin (HBB, HBA1/2)
transcripts and the markers of abundant cell types end up in every cell.
:func:`remove_ambient` estimates how much of each cell's counts is ambient and
removes it, on one sample (one library) at a time, before QC.

Methods
-------
``"decontx"``
    DecontX (Yang et al. 2020, Genome Biology), through the ``decontx-scanpy``
    package (MIT; imported as ``pydecontx``). A per-cell two-component
    multinomial mixture: each cell's counts are its cluster's native profile
    plus an ambient profile, fitted by variational EM. It needs only the
    filtered matrix (the ambient profile is then estimated as the blend of the
    other clusters); with a raw droplet matrix the ambient profile is instead
    fixed to the empty droplets' profile, which also removes ambient genes that
    no cluster expresses (platelet and red-cell transcripts). Per-cell
    contamination lands in ``obs["ambient_fraction"]``.
``"soupx"``
    SoupX (Young & Behjati 2020), through the optional ``soupx-python``
    package (GPL-2.0, so not a dependency of immuneage: install it yourself).
    One contamination fraction per sample (``autoEstCont``), soup profile from
    the raw matrix's empty droplets (needs the raw matrix), counts corrected by
    subtraction. Its pure-Python loops make it slow (see
    ``benchmarks/RESULTS.md``); use it to cross-check decontx.

Corrected counts are rounded to integers by the largest-remainder rule within
each cell (:func:`round_preserving_total`): every value is floored, then the
cell's remaining ``round(sum) - sum(floors)`` units go, one each, to the
entries with the largest fractional parts. The result is deterministic, keeps
each cell's corrected total (to the nearest integer), and never exceeds the
original count of an entry.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from . import keys
from .errors import DataFileError

if TYPE_CHECKING:
    from .config import AmbientConfig

__all__ = [
    "AMBIENT_FRACTION",
    "COUNTS_UNCORRECTED",
    "empty_droplets",
    "quick_clusters",
    "read_raw_droplets",
    "remove_ambient",
    "round_preserving_total",
    "run_ambient",
]

logger = logging.getLogger("immuneage.ambient")  # shown by the CLI's handler

#: layers key of the counts before correction.
COUNTS_UNCORRECTED = keys.COUNTS_UNCORRECTED
#: obs column of the per-cell ambient fraction.
AMBIENT_FRACTION = keys.AMBIENT_FRACTION
#: uns["immuneage"] key of the run record.
UNS_KEY = "ambient"
#: Fewer empty droplets than this in a raw matrix is an error (no usable profile).
MIN_EMPTY_DROPLETS = 50
#: Fewer cells than this cannot be clustered into an ambient model.
MIN_CELLS = 30

_DECONTX_DIST = "decontx-scanpy"
_SOUPX_DIST = "soupx-python"


# --------------------------------------------------------------------------- helpers


def round_preserving_total(x: sp.csr_matrix, upper: sp.csr_matrix | None = None) -> sp.csr_matrix:
    """Round non-negative real counts to integers, keeping each row's total.

    Largest-remainder rule per row: floor every entry, then add one to the
    ``round(row sum) - sum(floors)`` entries with the largest fractional parts
    (ties: the first entry in storage order).

    Parameters
    ----------
    x
        CSR matrix of non-negative real values (cells x genes).
    upper
        Optional entry-wise bound with the same sparsity as ``x`` (the
        original counts); the result is clipped to it (a no-op when every
        entry of ``x`` is at most its bound, as for ambient-corrected counts).

    Returns
    -------
    CSR float32 matrix of integers, zeros removed.
    """
    x = sp.csr_matrix(x, dtype=np.float64, copy=True)
    x.sort_indices()
    data = np.clip(x.data, 0.0, None)
    floor = np.floor(data)
    frac = data - floor
    n_rows = x.shape[0]
    rows = np.repeat(np.arange(n_rows), np.diff(x.indptr))
    row_sum = np.bincount(rows, weights=data, minlength=n_rows)
    row_floor = np.bincount(rows, weights=floor, minlength=n_rows)
    extra = np.rint(row_sum - row_floor).astype(np.int64)
    # rank of each entry's fractional part within its row, largest first
    order = np.lexsort((-frac, rows))
    rank = np.empty_like(order)
    starts = x.indptr[:-1]
    rank[order] = np.arange(order.size) - np.repeat(starts, np.diff(x.indptr))
    out = floor + ((rank < extra[rows]) & (frac > 0))
    if upper is not None:
        bound = sp.csr_matrix(upper, dtype=np.float64)
        bound.sort_indices()
        if bound.nnz != x.nnz or not np.array_equal(bound.indices, x.indices):
            raise ValueError("upper must have the sparsity of x")
        out = np.minimum(out, bound.data)
    res = sp.csr_matrix((out.astype(np.float32), x.indices, x.indptr), shape=x.shape)
    res.eliminate_zeros()
    return res


def _counts(adata: AnnData, layer: str | None) -> sp.csr_matrix:
    x = adata.layers[layer] if layer is not None else adata.X
    if x is None:
        raise ValueError(
            f"adata has no counts in {'layers[' + repr(layer) + ']' if layer else 'X'}"
        )
    x = sp.csr_matrix(x, dtype=np.float32, copy=True)
    x.sum_duplicates()
    x.eliminate_zeros()
    if x.nnz and (x.data.min() < 0 or not np.array_equal(x.data, np.rint(x.data))):
        raise DataFileError(
            "ambient correction needs raw integer UMI counts; "
            f"{'layers[' + repr(layer) + ']' if layer else 'X'} holds negative or non-integer values"
        )
    return x


def _align(raw: AnnData, var: pd.DataFrame, var_names: pd.Index, where: str) -> sp.csr_matrix:
    """Raw droplets x the filtered matrix's genes (genes absent from the raw file count 0)."""
    use_ids = keys.GENE_IDS in var and keys.GENE_IDS in raw.var
    ref = pd.Index(var[keys.GENE_IDS].astype(str)) if use_ids else var_names.astype(str)
    have = pd.Index(raw.var[keys.GENE_IDS].astype(str)) if use_ids else raw.var_names.astype(str)
    if have.has_duplicates:
        keep = ~have.duplicated()
        raw = raw[:, np.flatnonzero(keep)]
        have = have[keep]
    pos = have.get_indexer(ref)
    found = pos >= 0
    if found.mean() < 0.5:
        what = "gene ids" if use_ids else "gene names"
        raise DataFileError(
            f"{where}: only {int(found.sum())} of the sample's {len(ref)} {what} are in the raw "
            "droplet matrix; it belongs to another library or reference. Point the sample at the "
            "Cell Ranger outs/ folder whose raw_feature_bc_matrix matches its filtered matrix"
        )
    if not found.all():
        logger.info("%s: %d genes absent from the raw matrix count 0", where, int((~found).sum()))
    x = sp.csc_matrix(raw.X, dtype=np.float32)
    cols = np.where(found, pos, 0)
    out = x[:, cols].tocsr()
    if not found.all():
        out = out @ sp.diags(found.astype(np.float32))
        out = sp.csr_matrix(out)
    out.eliminate_zeros()
    return out


def read_raw_droplets(path: str | Path, adata: AnnData) -> AnnData:
    """Read a Cell Ranger raw droplet matrix, aligned to a sample's genes.

    Parameters
    ----------
    path
        ``raw_feature_bc_matrix.h5`` (Cell Ranger v3+; v2 h5 files too) or a
        matrix directory (``raw_feature_bc_matrix/`` or v2
        ``raw_gene_bc_matrices/<genome>/``).
    adata
        The sample's filtered cells x genes AnnData; its genes define the
        columns (matched on ``var["gene_ids"]`` when both files have ids, else
        on the unique gene names).

    Returns
    -------
    AnnData of the droplets with at least one count (all barcodes, cells
    included) x ``adata``'s genes, ``X`` CSR float32 counts. Only ``Gene
    Expression`` features are read; genes missing from the raw file count 0.

    Raises
    ------
    DataFileError
        The file is missing or unreadable, or shares fewer than half of the
        sample's genes.
    """
    import scanpy as sc

    path = Path(path)
    where = f"raw droplet matrix {path}"
    if not path.exists():
        raise DataFileError(
            f"{where} does not exist; point the sample at a Cell Ranger outs/ folder with "
            "raw_feature_bc_matrix.h5, or set ambient.method to decontx (no raw matrix needed)"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*names are not unique", category=UserWarning
            )
            if path.is_dir():
                raw = sc.read_10x_mtx(path, var_names="gene_symbols", make_unique=True)
            else:
                raw = sc.read_10x_h5(path, gex_only=True)
                raw.var_names_make_unique()
    except Exception as exc:
        raise DataFileError(
            f"{where} could not be read ({type(exc).__name__}: {exc}); pass the "
            "raw_feature_bc_matrix.h5 (or folder) Cell Ranger wrote beside the filtered one"
        ) from exc
    totals = np.asarray(raw.X.sum(axis=1)).ravel()
    raw = raw[totals > 0]
    x = _align(raw, adata.var, adata.var_names, where)
    return AnnData(X=x, obs=pd.DataFrame(index=raw.obs_names.astype(str)), var=adata.var[[]].copy())


def empty_droplets(
    raw: AnnData, cells: pd.Index | np.ndarray, *, max_counts: int = 100
) -> sp.csr_matrix:
    """The raw matrix's empty droplets: not cells, with 1 to ``max_counts`` counts.

    Parameters
    ----------
    raw
        Droplets x genes (from :func:`read_raw_droplets`).
    cells
        The sample's cell barcodes (as in the raw file, without a sample prefix).
    max_counts
        Largest total count of a droplet taken as empty (SoupX's default: 100).

    Returns
    -------
    CSR float32 counts of the empty droplets.
    """
    x = sp.csr_matrix(raw.X, dtype=np.float32)
    totals = np.asarray(x.sum(axis=1)).ravel()
    is_cell = pd.Index(raw.obs_names.astype(str)).isin(pd.Index(np.asarray(cells).astype(str)))
    keep = (~is_cell) & (totals > 0) & (totals <= max_counts)
    return x[np.flatnonzero(keep)]


def quick_clusters(counts: sp.csr_matrix, *, resolution: float = 0.5, seed: int = 0) -> np.ndarray:
    """Coarse per-sample clusters for the ambient model.

    normalize_total (1e4) + log1p, the 2,000 most variable genes (scanpy's
    ``seurat`` flavour), PCA (up to 30 components), exact 15-nearest-neighbour
    graph (scikit-learn, symmetrised), Leiden at ``resolution``. A single cluster is split in two by k-means on
    the PCA (DecontX needs two populations).

    Returns
    -------
    String labels, one per cell.
    """
    import scanpy as sc

    n_cells, n_genes = counts.shape
    tmp = AnnData(X=sp.csr_matrix(counts, dtype=np.float32, copy=True))
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    if n_genes > 2000:
        sc.pp.highly_variable_genes(tmp, n_top_genes=2000, flavor="seurat")
        tmp = tmp[:, tmp.var["highly_variable"].to_numpy()].copy()
    n_comps = int(max(2, min(30, tmp.n_obs - 1, tmp.n_vars - 1)))
    sc.pp.pca(tmp, n_comps=n_comps, random_state=seed)
    # exact kNN with scikit-learn: scanpy's neighbors compiles numba code for ~20-45 s
    # per process, which a per-sample job pays every time
    from sklearn.neighbors import kneighbors_graph

    knn = kneighbors_graph(tmp.obsm["X_pca"], n_neighbors=min(15, n_cells - 1), include_self=False)
    adjacency = knn.maximum(knn.T).tocsr()
    sc.tl.leiden(
        tmp,
        resolution=resolution,
        random_state=seed,
        flavor="igraph",
        n_iterations=2,
        adjacency=adjacency,
        directed=False,
    )
    labels = tmp.obs["leiden"].astype(str).to_numpy()
    if len(set(labels)) < 2:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(tmp.obsm["X_pca"])
        labels = km.labels_.astype(str)
    return labels


def _package_version(dist: str, module: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- methods


def _import_decontx() -> Any:
    owners = packages_distributions().get("pydecontx", [])
    if not owners:
        raise ImportError(
            "ambient.method 'decontx' needs the 'decontx-scanpy' package: pip install decontx-scanpy"
        )
    if _DECONTX_DIST not in owners:
        raise ImportError(
            f"the module 'pydecontx' installed here comes from {', '.join(owners)}, not "
            f"decontx-scanpy (both use that name); pip uninstall {' '.join(owners)} && "
            "pip install decontx-scanpy"
        )
    import pydecontx

    return pydecontx


def _decontx(
    counts: sp.csr_matrix,
    labels: np.ndarray,
    background: sp.csr_matrix | None,
    *,
    max_iter: int,
    seed: int,
) -> tuple[sp.csr_matrix, np.ndarray, dict[str, Any]]:
    pydecontx = _import_decontx()
    with warnings.catch_warnings():
        # our empty droplets exclude the cells' barcodes already
        warnings.filterwarnings("ignore", message="No barcode names available")
        res = pydecontx.decontx(
            counts.astype(np.float64),
            z=labels,
            background=background,
            max_iter=max_iter,
            seed=seed,
            compute_umap=False,
            verbose=False,
        )
    est = next(iter(res["estimates"].values()))
    info = {"iterations": int(est["iterations"]), "converged": int(est["iterations"]) < max_iter}
    return sp.csr_matrix(res["decontX_counts"]), np.asarray(res["contamination"], float), info


def _soupx(
    counts: sp.csr_matrix, labels: np.ndarray, raw: sp.csr_matrix
) -> tuple[sp.csr_matrix, float, dict[str, Any]]:
    try:
        import soupx
    except ImportError as exc:
        raise ImportError(
            "ambient.method 'soupx' needs the optional package 'soupx-python' (GPL-2.0, not "
            "installed with immuneage): pip install soupx-python; or use ambient.method decontx"
        ) from exc
    channel = soupx.SoupChannel(
        tod=sp.csr_matrix(raw.T), toc=sp.csr_matrix(counts.T, dtype=np.float64)
    )
    channel.setClusters(labels)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            soupx.autoEstCont(channel, verbose=False)
            corrected = soupx.adjustCounts(channel, clusters=False, method="subtraction", verbose=0)
    except ValueError as exc:
        raise DataFileError(
            f"SoupX could not estimate the contamination of this sample ({exc}); use "
            "ambient.method decontx"
        ) from exc
    finally:
        for line in printed.getvalue().splitlines():
            logger.info("soupx: %s", line)
    rho = float(channel.metaData["rho"].iloc[0])
    fit = channel.fit
    info = {
        "n_estimates": int(fit.get("n_estimates", 0)),
        "n_markers": len(fit.get("markersUsed", [])),
    }
    return sp.csr_matrix(corrected.T), rho, info


# --------------------------------------------------------------------------- API


def remove_ambient(
    adata: AnnData,
    *,
    method: Literal["decontx", "soupx"] = "decontx",
    raw: AnnData | str | Path | None = None,
    clusters: str | None = None,
    layer: str = keys.COUNTS,
    empty_max_counts: int = 100,
    resolution: float = 0.5,
    max_iter: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Remove ambient RNA from one sample's counts, in place.

    Parameters
    ----------
    adata
        One sample (one library): cells x genes integer counts in
        ``layers[layer]`` (CSR float32, as ingest makes them).
    method
        ``"decontx"`` (per-cell fractions; the raw matrix is optional) or
        ``"soupx"`` (one fraction per sample; needs the raw matrix and the
        optional ``soupx-python`` package).
    raw
        The sample's raw droplet matrix: an AnnData from
        :func:`read_raw_droplets` (droplets x the same genes) or a path to
        read with it; ``None`` when there is none.
    clusters
        obs column of cell clusters to use; ``None`` clusters the sample with
        :func:`quick_clusters`.
    layer
        Layer holding the counts.
    empty_max_counts
        Raw droplets that are not cells and hold 1 to this many counts are the
        empty droplets whose profile is the ambient profile.
    resolution
        Leiden resolution of :func:`quick_clusters` (used when ``clusters`` is None).
    max_iter
        Most EM iterations of DecontX.
    seed
        Seed of the clustering and of DecontX's initialisation.

    Returns
    -------
    The record also written to ``uns["immuneage"]["ambient"]``: ``method``,
    ``package``, ``version``, ``raw_matrix_used``, ``n_empty_droplets``,
    ``fraction_global`` (the estimated share of the sample's counts that is
    ambient: SoupX's rho, or DecontX's per-cell fractions weighted by counts),
    ``fraction_removed`` (share of counts removed after rounding), ``clusters``
    (the obs column or ``"quick_clusters"``), ``n_clusters``, ``rounding`` and
    the parameters. Also written:

    ``layers["counts_uncorrected"]``
        The counts before correction.
    ``layers[layer]`` and ``X``
        The corrected counts: CSR float32 integers, ``0 <= corrected <= original``.
    ``obs["ambient_fraction"]``
        Per-cell estimate (DecontX), or per-cell share of counts removed (SoupX).

    Raises
    ------
    DataFileError
        ``method="soupx"`` without a raw matrix, a raw matrix with fewer than
        50 empty droplets, non-integer counts, or fewer than 30 cells.
    ValueError
        An unknown method, or ``clusters`` not in ``obs``.
    """
    if method not in ("decontx", "soupx"):
        raise ValueError(f"method must be 'decontx' or 'soupx', not {method!r}")
    if clusters is not None and clusters not in adata.obs:
        raise ValueError(f"clusters: obs has no column {clusters!r}")
    sample = adata.uns.get(keys.UNS, {}).get("ingest", {}).get("sample", "")
    where = f"sample {sample!r}" if sample else "the sample"
    if method == "soupx" and raw is None:
        raise DataFileError(
            f"{where}: ambient.method 'soupx' needs the raw droplet matrix "
            "(raw_feature_bc_matrix.h5), and none was found. Point the sample sheet at the Cell "
            "Ranger outs/ folder (which holds raw_feature_bc_matrix.h5 beside the filtered one), "
            "or set ambient.method to decontx, which works from the filtered matrix alone"
        )
    if adata.n_obs < MIN_CELLS:
        raise DataFileError(
            f"{where} has {adata.n_obs} cells, too few (< {MIN_CELLS}) to model ambient RNA; "
            "set ambient.method to none or remove the sample"
        )
    counts = _counts(adata, layer)
    raw_path = ""
    if raw is not None and not isinstance(raw, AnnData):
        raw_path = str(raw)
        raw = read_raw_droplets(raw, adata)
    background = None
    if raw is not None:
        if raw.n_vars != adata.n_vars:
            raise ValueError("raw must have the sample's genes (use read_raw_droplets)")
        cells = adata.obs.get(keys.BARCODE, adata.obs_names)
        background = empty_droplets(raw, cells.astype(str).to_numpy(), max_counts=empty_max_counts)
        if background.shape[0] < MIN_EMPTY_DROPLETS:
            raise DataFileError(
                f"{where}: the raw droplet matrix has {background.shape[0]} empty droplets "
                f"(non-cell barcodes with 1 to {empty_max_counts} counts), fewer than "
                f"{MIN_EMPTY_DROPLETS}; is it the raw (not the filtered) matrix? Raise "
                "ambient.empty_max_counts, or set ambient.method to decontx without the raw matrix"
            )
    labels = (
        adata.obs[clusters].astype(str).to_numpy()
        if clusters is not None
        else quick_clusters(counts, resolution=resolution, seed=seed)
    )
    if method == "decontx":
        corrected, per_cell, info = _decontx(
            counts, labels, background, max_iter=max_iter, seed=seed
        )
        totals = np.asarray(counts.sum(axis=1)).ravel()
        global_fraction = float((per_cell * totals).sum() / max(totals.sum(), 1.0))
        dist = _DECONTX_DIST
    else:
        assert raw is not None
        corrected, global_fraction, info = _soupx(counts, labels, sp.csr_matrix(raw.X))
        per_cell = None
        dist = _SOUPX_DIST
    original = counts.copy()
    original.sort_indices()
    rows = np.repeat(np.arange(original.shape[0]), np.diff(original.indptr))
    # corrected values on the counts' sparsity (DecontX keeps it; SoupX's subtraction may not)
    on_pattern = np.asarray(sp.csr_matrix(corrected)[rows, original.indices], dtype=np.float64)
    corrected = sp.csr_matrix(
        (on_pattern.ravel(), original.indices, original.indptr), shape=original.shape
    )
    rounded = round_preserving_total(corrected, upper=original)
    totals = np.asarray(original.sum(axis=1)).ravel()
    after = np.asarray(rounded.sum(axis=1)).ravel()
    if per_cell is None:
        per_cell = np.where(totals > 0, 1.0 - after / np.maximum(totals, 1.0), 0.0)
    adata.layers[COUNTS_UNCORRECTED] = original
    adata.layers[layer] = rounded
    adata.X = rounded
    adata.obs[AMBIENT_FRACTION] = np.asarray(per_cell, dtype=np.float64)
    record: dict[str, Any] = {
        "method": method,
        "package": dist,
        "version": _package_version(dist, "pydecontx" if method == "decontx" else "soupx"),
        "raw_matrix_used": raw is not None,
        "raw_matrix": raw_path,
        "n_empty_droplets": 0 if background is None else int(background.shape[0]),
        "fraction_global": round(float(global_fraction), 6),
        "fraction_removed": round(float(1.0 - after.sum() / max(totals.sum(), 1.0)), 6),
        "clusters": clusters if clusters is not None else "quick_clusters",
        "n_clusters": len(set(labels)),
        "rounding": "largest remainder per cell (total kept, never above the original)",
        "params": {
            "empty_max_counts": empty_max_counts,
            "resolution": resolution,
            "max_iter": max_iter,
            "seed": seed,
        },
        **info,
    }
    adata.uns.setdefault(keys.UNS, {})[UNS_KEY] = record
    return record


def run_ambient(adata: AnnData, section: AmbientConfig) -> dict[str, Any] | None:
    """Apply the ``ambient`` config section to one ingested sample.

    Reads the raw matrix path the reader recorded in
    ``uns["immuneage"]["read"]["raw_matrix"]`` ("" when none) and, with
    ``section.use_raw``, passes it to :func:`remove_ambient`.

    Returns
    -------
    The record of :func:`remove_ambient`, or None when ``section.method`` is ``"none"``.
    """
    if section.method == "none":
        return None
    info = adata.uns.get(keys.UNS, {}).get("read", {})
    raw_path = str(info.get("raw_matrix", "") or "") if section.use_raw else ""
    return remove_ambient(
        adata,
        method=section.method,
        raw=raw_path or None,
        empty_max_counts=section.empty_max_counts,
        resolution=section.resolution,
        max_iter=section.max_iter,
        seed=section.seed,
    )
