"""Stage ``annotate``: immune cell types from a cited marker panel (or a CellTypist model).

Marker scoring (the default, :func:`score_cell_types`)
    Each marker gene ``g`` is z-scored across cells on the log-normalised
    ``X``: ``z_g = (x_g - mean_g) / sd_g``. A type's score is the mean ``z`` of
    its positive markers present in the data minus the mean ``z`` of its
    negative markers. All types are scored with one sparse product,
    ``X[:, markers] @ (W / sd) - (mean / sd) @ W`` for a genes x types weight
    matrix ``W``; no cells x genes matrix is densified. An on-disk ``X`` (backed
    mode) is read once in blocks of rows, keeping only the marker columns.

Per-cell label and confidence
    The label is the best-scoring type. The per-cell confidence is the softmax
    probability of that type, ``p_i(t) = exp(s_it / T) / sum_u exp(s_iu / T)``
    over the annotatable types, with temperature :data:`TEMPERATURE` (in units
    of marker z-score): a lead of one z-unit over a single runner-up gives
    ``p ~ 0.88``, a tie gives ``1 / (number of tied types)``.

Majority voting (``annotate.majority_voting``)
    Within each Leiden cluster (``obs["leiden"]``) the most frequent per-cell
    label is the cluster label (ties go to the type with the larger summed
    probability, then to panel order) and becomes every member's label. A
    cluster whose majority holds less than :data:`REFINE_BELOW` of its cells
    (at least :data:`REFINE_MIN_CELLS` cells) is first split once by Leiden
    restricted to it (same graph, ``cluster.resolution``, ``seed``) and votes
    per sub-cluster, so a small population Leiden merged into a neighbour
    (pDC into cDC on the 3,000-cell demo) is not out-voted. The cluster's
    ``agreement`` is the share of its cells whose own label is the cluster
    label. A cell's confidence is the geometric mean
    ``sqrt(agreement * p_i(cluster label))``: high only when the cluster is
    homogeneous *and* the cell's own markers support the label, so a cell
    pulled into a cluster of another type loses its label rather than
    inheriting a wrong one. Without voting the confidence is ``p_i(label)``.

Cells whose confidence is below ``annotate.min_confidence`` are ``unassigned``,
and so are the cells of a type that ends up with fewer than
:data:`MIN_TYPE_CELLS` cells in the cohort (their confidence is kept; the
type is listed in ``uns["immuneage"]["annotate"]["too_few_cells"]``). The
label columns hold only the categories some cell has (scanpy's group-wise
functions take them as they are); ``tables/cell_type_counts.tsv`` lists
every annotatable type, zeros included.

Missing markers
    Panel genes absent from ``var_names`` (aliases are tried) are listed in the
    ``marker_coverage`` table and in one :class:`~pipeline.errors.ImmuneageWarning`.
    A type with fewer present positive markers than the panel's
    ``min_present_fraction`` requires (at least one) is *not annotatable*:
    it is not scored, never assigned, and listed in
    ``uns["immuneage"]["annotate"]["not_annotatable"]``.

CellTypist (``annotate.celltypist_model``)
    A local ``.pkl`` model replaces the marker panel: ``celltypist.annotate``
    (``majority_voting=False``) predicts the per-cell labels, its probability
    matrix becomes ``obsm["cell_type_scores"]`` and the label's probability the
    per-cell confidence; voting, refinement and the confidence after voting
    are the ones above, so both methods' outputs mean the same. Coarse
    lineages come from the marker panel where a label is a panel type (or a
    ``parent`` such as ``cDC``), else ``unknown``. CellTypist expects ``X`` =
    log1p of counts per 10,000 (``preprocess.target_sum: 10000``, the default).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import keys
from ..errors import ImmuneageWarning, InputError
from ..kernels.sparse import DEFAULT_CHUNK_SIZE, is_row_source, iter_row_blocks
from ..markers import MarkerPanel, load_marker_panel
from ._base import StageResult

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

    from ..config import AnnotateConfig, Config

__all__ = [
    "CELL_TYPE",
    "CELL_TYPE_CELL_LEVEL",
    "CELL_TYPE_COARSE",
    "CELL_TYPE_CONFIDENCE",
    "CELL_TYPE_SCORES",
    "MIN_TYPE_CELLS",
    "TEMPERATURE",
    "UNASSIGNED",
    "MarkerScores",
    "cell_type_counts",
    "majority_vote",
    "marker_coverage",
    "run_annotate",
    "score_cell_types",
    "softmax_confidence",
]

log = logging.getLogger("immuneage")

CELL_TYPE = keys.CELL_TYPE
CELL_TYPE_COARSE = keys.CELL_TYPE_COARSE
CELL_TYPE_CONFIDENCE = keys.CELL_TYPE_CONFIDENCE
CELL_TYPE_CELL_LEVEL = keys.CELL_TYPE_CELL_LEVEL
CELL_TYPE_SCORES = keys.CELL_TYPE_SCORES
#: Label of cells no type fits confidently (also their coarse lineage).
UNASSIGNED = keys.UNASSIGNED
#: Softmax temperature of the per-cell confidence, in marker z-score units.
TEMPERATURE = 0.5
#: obs column of the clustering majority voting runs over (written by ``cluster``).
CLUSTER_KEY = keys.LEIDEN
#: A cluster whose majority per-cell label holds less than this share of its
#: cells is split once by Leiden before voting (:func:`refine_heterogeneous_clusters`).
REFINE_BELOW = 0.8
#: Clusters smaller than this are never split.
REFINE_MIN_CELLS = 10
#: A final type given to fewer cells than this in the whole cohort is ``unassigned``:
#: one cell is no population (no spread, never testable downstream) and scanpy's
#: group statistics (``rank_genes_groups``) refuse a group of one cell.
MIN_TYPE_CELLS = 2


# --------------------------------------------------------------------------- coverage
def marker_coverage(panel: MarkerPanel, var_names: pd.Index | list[str]) -> pd.DataFrame:
    """Which of each type's markers the data has.

    Parameters
    ----------
    panel
        The marker panel.
    var_names
        Gene symbols of the data.

    Returns
    -------
    One row per panel type: ``cell_type``, ``lineage``, ``n_markers``
    (positive + negative), ``n_present``, ``n_positive``,
    ``n_positive_present``, ``n_positive_required``, ``annotatable`` and
    ``missing`` (comma-separated absent symbols, empty when none).
    """
    present = set(map(str, var_names))
    rows = []
    for ct in panel.cell_types:
        missing = [m.gene for m in ct.markers if m.match(present) is None]
        n_pos = sum(m.match(present) is not None for m in ct.positive)
        need = panel.n_required(ct.name)
        rows.append(
            {
                "cell_type": ct.name,
                "lineage": ct.lineage,
                "n_markers": len(ct.markers),
                "n_present": len(ct.markers) - len(missing),
                "n_positive": len(ct.positive),
                "n_positive_present": n_pos,
                "n_positive_required": need,
                "annotatable": n_pos >= need,
                "missing": ",".join(missing),
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- scoring
@dataclass
class MarkerScores:
    """Result of :func:`score_cell_types`.

    Attributes
    ----------
    scores
        Cells x annotatable types (marker z-score means), panel order.
    coverage
        :func:`marker_coverage` of the panel on the data.
    not_annotatable
        Types with too few markers present (not scored).
    genes_used
        Symbols in the data used per type (aliases resolved).
    """

    scores: pd.DataFrame
    coverage: pd.DataFrame
    not_annotatable: list[str]
    genes_used: dict[str, list[str]]


def _column_stats(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population) standard deviation of a sparse matrix."""
    n = x.shape[0]
    mean = np.asarray(x.sum(axis=0), dtype=np.float64).ravel() / n
    sq = x.copy()
    sq.data = np.asarray(sq.data, dtype=np.float64) ** 2
    mean_sq = np.asarray(sq.sum(axis=0), dtype=np.float64).ravel() / n
    var = np.maximum(mean_sq - mean**2, 0.0)
    return mean, np.sqrt(var)


def _marker_columns(x: object, idx: np.ndarray, *, chunk_size: int) -> sp.csr_matrix:
    """Columns ``idx`` of ``x`` for every cell, as CSR.

    An in-memory ``x`` (sparse or dense) is indexed directly; a row source
    (:func:`~pipeline.kernels.sparse.is_row_source`, an on-disk ``X``) is read in
    blocks of ``chunk_size`` rows, each reduced to the ``idx`` columns, so only the
    cells x markers slice is ever held in memory.
    """
    if not is_row_source(x):
        sub = x[:, idx]
        return sp.csr_matrix(sub) if not sp.issparse(sub) else sub.tocsr()
    blocks = [block[:, idx] for _, _, block in iter_row_blocks(x, chunk_size=chunk_size)]
    if not blocks:
        return sp.csr_matrix((int(x.shape[0]), len(idx)), dtype=getattr(x, "dtype", np.float32))
    return sp.csr_matrix(sp.vstack(blocks, format="csr"))


def score_cell_types(
    adata: AnnData, panel: MarkerPanel, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> MarkerScores:
    """Score every annotatable type of ``panel`` in every cell (one sparse product).

    Parameters
    ----------
    adata
        Cells with log-normalised expression in ``X`` (sparse or dense in memory,
        or an on-disk row source in backed mode).
    panel
        The marker panel.
    chunk_size
        Rows per block when ``X`` is read from disk (only the marker columns of
        each block are kept).

    Returns
    -------
    :class:`MarkerScores`. A marker gene without variance in the data
    contributes 0 to its types' scores.
    """
    coverage = marker_coverage(panel, adata.var_names)
    ok = coverage.set_index("cell_type")["annotatable"]
    present = set(map(str, adata.var_names))
    types = [ct for ct in panel.cell_types if ok[ct.name]]
    not_annotatable = [ct.name for ct in panel.cell_types if not ok[ct.name]]
    genes: list[str] = []
    col: dict[str, int] = {}
    used: dict[str, list[str]] = {}
    w_entries: list[tuple[int, int, float]] = []
    for t, ct in enumerate(types):
        used[ct.name] = []
        for sign, group in ((1.0, ct.positive), (-1.0, ct.negative)):
            syms = [s for s in (m.match(present) for m in group) if s is not None]
            for s in syms:
                if s not in col:
                    col[s] = len(genes)
                    genes.append(s)
                w_entries.append((col[s], t, sign / len(syms)))
                used[ct.name].append(s)
    names = [ct.name for ct in types]
    if not types:
        return MarkerScores(
            pd.DataFrame(index=adata.obs_names, columns=[], dtype=np.float32),
            coverage,
            not_annotatable,
            used,
        )
    idx = adata.var_names.get_indexer(genes)
    x = _marker_columns(adata.X, idx, chunk_size=chunk_size)
    mean, sd = _column_stats(x)
    inv = np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 0)
    w = np.zeros((len(genes), len(types)))
    for g, t, v in w_entries:
        w[g, t] += v
    w_scaled = w * inv[:, None]
    offset = mean @ w_scaled
    scores = np.asarray(x @ w_scaled) - offset[None, :]
    return MarkerScores(
        pd.DataFrame(scores.astype(np.float32), index=adata.obs_names.copy(), columns=names),
        coverage,
        not_annotatable,
        used,
    )


def softmax_confidence(scores: np.ndarray, temperature: float = TEMPERATURE) -> np.ndarray:
    """Row-wise softmax of ``scores / temperature`` (cells x types probabilities)."""
    s = np.asarray(scores, dtype=np.float64) / temperature
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- voting
def majority_vote(
    labels: np.ndarray, prob: np.ndarray, types: list[str], clusters: pd.Series
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Majority label per cluster and the combined confidence per cell.

    Parameters
    ----------
    labels
        Per-cell labels (best type, before any threshold), each in ``types``.
    prob
        Cells x types per-cell probabilities (columns in ``types`` order).
    types
        Type names of ``prob``'s columns.
    clusters
        Cluster of each cell (``obs["leiden"]``).

    Returns
    -------
    The cluster label of each cell, its confidence
    ``sqrt(agreement * prob[cell, cluster label])``, and a per-cluster table
    (``cluster``, ``cell_type``, ``n_cells``, ``agreement``,
    ``second_cell_type``, ``second_fraction``).
    """
    cl = pd.Series(np.asarray(clusters, dtype=object)).astype(str)
    cats = list(dict.fromkeys(_natural_order(cl.unique())))
    codes = pd.Categorical(cl, categories=cats).codes.astype(np.int64)
    uniques = cats
    t_index = {t: i for i, t in enumerate(types)}
    lab_codes = np.array([t_index[lab] for lab in labels], dtype=np.int64)
    n_cl, n_t = len(uniques), len(types)
    counts = np.zeros((n_cl, n_t))
    np.add.at(counts, (codes, lab_codes), 1.0)
    psum = np.zeros((n_cl, n_t))
    np.add.at(psum, codes, prob)
    # most cells; ties -> larger summed probability; then panel order
    order = np.lexsort((-np.arange(n_t)[None, :].repeat(n_cl, 0), psum, counts), axis=1)
    best = order[:, -1]
    second = order[:, -2] if n_t > 1 else best
    size = counts.sum(axis=1)
    agreement = counts[np.arange(n_cl), best] / size
    cell_best = best[codes]
    conf = np.sqrt(agreement[codes] * prob[np.arange(len(codes)), cell_best])
    table = pd.DataFrame(
        {
            "cluster": [str(u) for u in uniques],
            "cell_type": [types[b] for b in best],
            "n_cells": size.astype(int),
            "agreement": agreement,
            "second_cell_type": [
                types[s] if n_t > 1 and counts[k, s] > 0 else "" for k, s in enumerate(second)
            ],
            "second_fraction": (counts[np.arange(n_cl), second] / size) if n_t > 1 else 0.0,
        }
    )
    return np.asarray(types, dtype=object)[cell_best], conf, table


def _natural_order(values: Any) -> list[str]:
    """Cluster ids in natural order: ``2`` before ``10``, ``3,1`` after ``3``."""

    def key(v: str) -> list[tuple[int, Any]]:
        return [(0, int(p)) if p.isdigit() else (1, p) for p in str(v).replace(",", " , ").split()]

    return sorted(map(str, values), key=key)


def refine_heterogeneous_clusters(
    adata: AnnData,
    clusters: pd.Series,
    labels: np.ndarray,
    *,
    resolution: float,
    seed: int,
    min_agreement: float = REFINE_BELOW,
    min_cells: int = REFINE_MIN_CELLS,
) -> tuple[pd.Series, list[str]]:
    """Split clusters whose per-cell labels disagree, once, before voting.

    A cluster of at least ``min_cells`` cells whose most frequent per-cell
    label holds less than ``min_agreement`` of them is re-clustered with
    Leiden restricted to it (same graph, ``resolution``, seed); its cells then
    vote within the sub-clusters (ids ``<cluster>,<k>``). This keeps a small
    population that Leiden merged into a neighbour (e.g. pDC into cDC) from
    being out-voted, as CellTypist's over-clustering does, but only where the
    labels say the cluster is mixed. Without ``obsp["connectivities"]`` the
    clusters are returned unchanged.

    Returns
    -------
    The voting clusters (strings) and the ids of the clusters that were split.
    """
    cl = pd.Series(np.asarray(clusters, dtype=object).astype(str), index=adata.obs_names)
    if "connectivities" not in adata.obsp:
        return cl, []
    tab = pd.crosstab(cl.to_numpy(), np.asarray(labels, dtype=object))
    size = tab.sum(axis=1)
    agree = tab.max(axis=1) / size
    mixed = [
        str(c) for c in _natural_order(tab.index[(agree < min_agreement) & (size >= min_cells)])
    ]
    if not mixed:
        return cl, []
    import scanpy as sc

    tmp_key, tmp_in = "_immuneage_vote_cluster", "_immuneage_vote_base"
    out = cl.copy()
    try:
        for c in mixed:
            adata.obs[tmp_in] = pd.Categorical(cl.to_numpy())
            sc.tl.leiden(
                adata,
                resolution=resolution,
                restrict_to=(tmp_in, [c]),
                key_added=tmp_key,
                obsp="connectivities",
                flavor="igraph",
                n_iterations=2,
                directed=False,
                random_state=seed,
            )
            sub = adata.obs[tmp_key].astype(str).to_numpy()
            inside = (cl == c).to_numpy()
            out[inside] = sub[inside]
    finally:
        for k in (tmp_key, tmp_in):
            if k in adata.obs:
                del adata.obs[k]
        adata.uns.pop(tmp_key, None)
    return out, mixed


# --------------------------------------------------------------------------- tables
def cell_type_counts(
    adata: AnnData, column: str = CELL_TYPE, *, types: list[str] | None = None
) -> pd.DataFrame:
    """Cells per sample and cell type, long format, zeros included.

    Parameters
    ----------
    adata
        Annotated cells (``obs[column]``; ``sample``, ``donor``, ``timepoint`` when present).
    column
        The label column.
    types
        Every type to list, in order (default: the column's categories, else its
        sorted values); a type no cell has gets zero rows.

    Returns
    -------
    Columns ``sample``, ``donor``, ``timepoint``, ``cell_type``, ``n_cells``
    (sample-level columns missing from ``obs`` are left out).
    """
    obs = adata.obs
    sample = obs[keys.SAMPLE] if keys.SAMPLE in obs else pd.Series("all", index=obs.index)
    labels = obs[column]
    samples = list(sample.cat.categories) if hasattr(sample, "cat") else sorted(set(sample))
    if types is None:
        types = list(labels.cat.categories) if hasattr(labels, "cat") else sorted(set(labels))
    tab = pd.crosstab(
        pd.Categorical(sample.astype(str), categories=[str(s) for s in samples]),
        pd.Categorical(labels.astype(str), categories=types),
        dropna=False,
    )
    long = tab.stack().rename("n_cells").reset_index()
    long.columns = [keys.SAMPLE, "cell_type", "n_cells"]
    meta_cols = [c for c in (keys.DONOR, keys.TIMEPOINT) if c in obs]
    if meta_cols:
        meta = (
            obs.assign(**{keys.SAMPLE: sample.astype(str)})
            .groupby(keys.SAMPLE, observed=True)[meta_cols]
            .first()
            .astype(str)
        )
        long = long.merge(meta, left_on=keys.SAMPLE, right_index=True, how="left")
    cols = [keys.SAMPLE, *meta_cols, "cell_type", "n_cells"]
    long["n_cells"] = long["n_cells"].astype(int)
    return long[cols].reset_index(drop=True)


# --------------------------------------------------------------------------- helpers
def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _clusters(adata: AnnData, cfg: AnnotateConfig) -> pd.Series | None:
    if not cfg.majority_voting:
        return None
    if CLUSTER_KEY not in adata.obs:
        raise InputError(
            f"annotate.majority_voting needs obs['{CLUSTER_KEY}'] from the cluster stage; run "
            "`immuneage run ... --stage cluster` first or set annotate.majority_voting: false"
        )
    return adata.obs[CLUSTER_KEY]


def _finalise(
    adata: AnnData,
    panel: MarkerPanel,
    types: list[str],
    cell_labels: np.ndarray,
    cell_conf: np.ndarray,
    prob: np.ndarray,
    clusters: pd.Series | None,
    min_confidence: float,
) -> tuple[pd.DataFrame | None, dict[str, int]]:
    """Write the label columns; return the per-cluster vote table (or None) and the rare types.

    The categories are the panel's order (``types``, then ``unassigned``)
    restricted to the labels some cell has. A type left with fewer than
    :data:`MIN_TYPE_CELLS` cells is ``unassigned`` (returned: type -> its cells).
    """
    cell_level = np.where(cell_conf >= min_confidence, cell_labels, UNASSIGNED)
    vote_table = None
    if clusters is not None and len(types):
        final, conf, vote_table = majority_vote(cell_labels, prob, types, clusters)
    else:
        final, conf = cell_labels, cell_conf
    final = np.where(conf >= min_confidence, final, UNASSIGNED)
    labels, n = np.unique(final.astype(str), return_counts=True)
    rare = {
        str(t): int(k)
        for t, k in zip(labels, n, strict=True)
        if t != UNASSIGNED and k < MIN_TYPE_CELLS
    }
    if rare:
        final = np.where(np.isin(final, list(rare)), UNASSIGNED, final)
    cats = [*types, UNASSIGNED]
    coarse_of = {t: panel.lineage_of(t) or "unknown" for t in types} | {UNASSIGNED: UNASSIGNED}
    coarse_cats = list(dict.fromkeys(coarse_of[t] for t in cats))

    def categorical(values: Any, categories: list[str]) -> pd.Categorical:
        return pd.Categorical(values, categories=categories).remove_unused_categories()

    adata.obs[CELL_TYPE_CELL_LEVEL] = categorical(cell_level, cats)
    adata.obs[CELL_TYPE] = categorical(final, cats)
    adata.obs[CELL_TYPE_COARSE] = categorical([coarse_of[t] for t in final], coarse_cats)
    adata.obs[CELL_TYPE_CONFIDENCE] = np.asarray(conf, dtype=np.float32)
    return vote_table, rare


def _empty_labels(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(n, UNASSIGNED, dtype=object), np.zeros(n)


# --------------------------------------------------------------------------- celltypist
def _celltypist(
    adata: AnnData, cfg: AnnotateConfig, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[pd.DataFrame, np.ndarray, str]:
    """Run a local CellTypist model; return (probabilities, cell-level labels, model name).

    Without CellTypist's majority voting the prediction is cell-wise (each cell is
    scaled by the model's own gene means and sds, then classified), so an on-disk
    ``X`` (backed mode) is predicted in blocks of ``chunk_size`` rows and the
    blocks' labels and probabilities are concatenated: the same result as one call.
    """
    path = Path(str(cfg.celltypist_model))
    if not path.is_file():
        raise InputError(
            f"annotate.celltypist_model {path} does not exist; give the path of a CellTypist "
            "model file (.pkl) on this machine (models are never downloaded at run time)"
        )
    try:
        import celltypist
    except ImportError:
        raise InputError(
            f"annotate.celltypist_model is set ({path}) but celltypist is not installed; "
            "install it (pip install celltypist) or set annotate.celltypist_model: null"
        ) from None
    try:
        model = celltypist.models.Model.load(str(path))
    except Exception as exc:
        raise InputError(
            f"annotate.celltypist_model {path} is not a CellTypist model: {exc}"
        ) from None
    import anndata as ad

    if is_row_source(adata.X) and adata.n_obs > 0:
        parts = (
            (adata.obs_names[start:stop], block)
            for start, stop, block in iter_row_blocks(adata.X, chunk_size=chunk_size)
        )
    else:
        x_all = adata.X if not is_row_source(adata.X) else sp.csr_matrix(adata.X.shape)
        parts = iter([(adata.obs_names, x_all)])
    probs: list[pd.DataFrame] = []
    labs: list[pd.Series] = []
    ct_log = logging.getLogger("celltypist.logger")
    level = ct_log.level
    ct_log.setLevel(logging.WARNING)  # its per-step progress lines
    try:
        for names, x in parts:
            tmp = ad.AnnData(X=x, obs=pd.DataFrame(index=names.copy()), var=adata.var[[]])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                # per-cell prediction only: the vote is immuneage's, shared with the marker path
                pred = celltypist.annotate(tmp, model=model, majority_voting=False)
            probs.append(pred.probability_matrix.loc[names])
            labs.append(pred.predicted_labels.loc[names, "predicted_labels"].astype(str))
    except ValueError as exc:
        raise InputError(
            f"CellTypist could not annotate with {path}: {exc} (CellTypist expects X = "
            "log1p of counts normalised to 10,000 per cell: preprocess.target_sum: 10000)"
        ) from None
    finally:
        ct_log.setLevel(level)
    prob = (probs[0] if len(probs) == 1 else pd.concat(probs)).astype(np.float32)
    labels = labs[0] if len(labs) == 1 else pd.concat(labs)
    return prob, labels.to_numpy(dtype=object), str(path.name)


# --------------------------------------------------------------------------- stage
def run_annotate(adata: AnnData, cfg: Config, *, device: torch.device | str = "cpu") -> StageResult:
    """Label every cell with an immune cell type.

    Parameters
    ----------
    adata
        Clustered cells: log-normalised ``X``, ``obs["leiden"]`` (needed
        when ``annotate.majority_voting``), ``obs["sample"]``, ``obs["donor"]``,
        ``obs["timepoint"]``.
    cfg
        Run configuration (reads ``annotate``; ``chunk_size`` for an on-disk ``X``).
    device
        The run's device (scoring is one sparse product on the host).

    Returns
    -------
    StageResult with the AnnData (modified in place) holding

    - ``obs["cell_type"]``: final fine label (categorical, in panel order, then
      ``unassigned``; only the labels some cell has);
    - ``obs["cell_type_coarse"]``: its lineage (``T_CD4``, ``NK``, ``mono``, ...);
    - ``obs["cell_type_confidence"]``: confidence in [0, 1] (module docstring);
    - ``obs["cell_type_cell_level"]``: the per-cell label before voting
      (``unassigned`` below ``min_confidence``);
    - ``obsm["cell_type_scores"]``: cells x types DataFrame of marker scores
      (CellTypist: its probability matrix);
    - ``uns["immuneage"]["annotate"]``: method, panel name/version/path/sha256,
      parameters, ``not_annotatable``, ``missing_genes``, counts of cells per
      annotatable type (zeros included), ``too_few_cells`` (types unassigned
      for having fewer than :data:`MIN_TYPE_CELLS` cells: type -> cells) and
      the unassigned fraction;

    and the tables ``marker_coverage`` (marker panel only), ``cell_type_counts``
    (sample, donor, timepoint, cell_type, n_cells; zeros included) and, with
    majority voting, ``cell_type_clusters`` (the vote per Leiden cluster).

    Raises
    ------
    InputError
        Bad marker file, missing CellTypist model or package, or
        ``majority_voting`` without ``obs["leiden"]``.
    """
    a = cfg.annotate
    panel = load_marker_panel(a.markers)
    clusters = _clusters(adata, a)
    tables: dict[str, pd.DataFrame] = {}
    info: dict[str, Any] = {
        "majority_voting": a.majority_voting,
        "min_confidence": a.min_confidence,
        "cluster_key": CLUSTER_KEY if clusters is not None else None,
        "panel": panel.name,
        "panel_version": panel.version,
        "panel_path": str(panel.path),
        "panel_sha256": _file_sha256(panel.path),
    }
    if a.celltypist_model is not None:
        prob_df, cell_labels, model_name = _celltypist(adata, a, chunk_size=cfg.chunk_size)
        types = list(prob_df.columns.astype(str))
        prob = prob_df.to_numpy(dtype=np.float64)
        col = {t: i for i, t in enumerate(types)}
        cell_conf = prob[np.arange(adata.n_obs), [col[lab] for lab in cell_labels]]
        scores = prob_df
        info |= {
            "method": "celltypist",
            "celltypist_model": str(a.celltypist_model),
            "celltypist_model_sha256": _file_sha256(Path(a.celltypist_model)),
            "model_name": model_name,
            "not_annotatable": [],
            "missing_genes": [],
            "confidence": "CellTypist probability of the label"
            + (
                " combined with cluster agreement: sqrt(agreement * p)"
                if clusters is not None
                else ""
            ),
        }
    else:
        res = score_cell_types(adata, panel, chunk_size=cfg.chunk_size)
        types = list(res.scores.columns)
        missing = sorted({g for m in res.coverage["missing"] if m for g in m.split(",")})
        if missing or res.not_annotatable:
            msg = (
                f"annotate: {len(missing)} of {len(panel.genes())} marker genes of panel "
                f"{panel.path.name} are not in the data ({', '.join(missing[:15])}"
                f"{' ...' if len(missing) > 15 else ''})"
            )
            if res.not_annotatable:
                msg += (
                    "; cell types not annotatable (too few markers present, never assigned): "
                    + ", ".join(res.not_annotatable)
                )
            warnings.warn(msg + "; see tables/marker_coverage.tsv", ImmuneageWarning, stacklevel=2)
        if types:
            prob = softmax_confidence(res.scores.to_numpy())
            best = prob.argmax(axis=1)
            cell_labels = np.asarray(types, dtype=object)[best]
            cell_conf = prob[np.arange(adata.n_obs), best]
        else:
            warnings.warn(
                "annotate: no cell type of the panel can be annotated on this data; every cell "
                "is 'unassigned'",
                ImmuneageWarning,
                stacklevel=2,
            )
            prob = np.zeros((adata.n_obs, 0))
            cell_labels, cell_conf = _empty_labels(adata.n_obs)
        scores = res.scores
        tables["marker_coverage"] = res.coverage
        info |= {
            "method": "markers",
            "temperature": TEMPERATURE,
            "not_annotatable": list(res.not_annotatable),
            "missing_genes": missing,
            "genes_used": {k: list(v) for k, v in res.genes_used.items()},
            "confidence": "softmax(score / temperature) of the label"
            + (
                "; after voting sqrt(cluster agreement * softmax of the cluster label)"
                if clusters is not None
                else ""
            ),
        }
    vote_clusters, split = None, []
    if clusters is not None and types:
        vote_clusters, split = refine_heterogeneous_clusters(
            adata, clusters, cell_labels, resolution=cfg.cluster.resolution, seed=cfg.seed
        )
    info["split_clusters"] = split
    vote_table, rare = _finalise(
        adata, panel, types, cell_labels, cell_conf, prob, vote_clusters, a.min_confidence
    )
    if rare:
        log.info(
            "annotate: %s: fewer than %d cells in the cohort, unassigned",
            ", ".join(f"{t} ({k} cell{'s' if k > 1 else ''})" for t, k in rare.items()),
            MIN_TYPE_CELLS,
        )
    adata.obsm[CELL_TYPE_SCORES] = scores
    all_types = [*types, UNASSIGNED]
    counts = pd.Series(
        pd.Categorical(adata.obs[CELL_TYPE].astype(str), categories=all_types)
    ).value_counts(sort=False)
    info["n_cells"] = {str(k): int(v) for k, v in counts.items()}
    info["too_few_cells"] = rare
    info["unassigned_fraction"] = float((adata.obs[CELL_TYPE] == UNASSIGNED).mean())
    adata.uns.setdefault(keys.UNS, {})["annotate"] = info
    tables["cell_type_counts"] = cell_type_counts(adata, types=all_types)
    if vote_table is not None:
        tables["cell_type_clusters"] = vote_table
    log.info(
        "annotate: %d types, %.1f%% unassigned",
        int((counts > 0).sum()) - int(counts.get(UNASSIGNED, 0) > 0),
        100 * info["unassigned_fraction"],
    )
    return StageResult(adata, tables)
