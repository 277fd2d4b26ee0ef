"""Integration metrics: how well an embedding mixes batches and keeps cell types apart.

Pure numpy / scipy / scikit-learn re-implementations of the scib metrics
(Luecken et al., *Nat Methods* 2022) that immuneage reports. ``scib-metrics``
itself is not used because it needs jax.

Batch mixing (higher = better mixed, all in [0, 1])
    :func:`ilisi`
        Graph iLISI: for each cell, the inverse Simpson's index of the batch
        labels among its ``k`` nearest neighbours (uniform weights; scib weights
        neighbours with a perplexity-calibrated Gaussian kernel over ``3 *
        perplexity`` neighbours, so values differ somewhat from scib's). The median over cells is scaled as in scib,
        ``(median - 1) / (n_batches - 1)``: 0 = every neighbourhood holds one
        batch. Note the ceiling: with ``k`` neighbours and many batches the
        index cannot exceed ``k``, and even a perfect random mix of ``B`` equal
        batches gives an expected index below ``B``, so with 39 samples and
        ``k = 30`` a perfect mix scores about 0.4, not 1. Compare
        representations on the same data, not values across studies.
    :func:`batch_asw`
        scib's batch ASW: within each cell-type (label) group holding at least
        two batches, the silhouette of the batch labels; ``1 - |s|`` per cell,
        averaged within each group, then over groups.

Biological conservation (higher = better, in [0, 1])
    :func:`celltype_asw`
        Silhouette of the labels, rescaled ``(s + 1) / 2``.
    :func:`nmi_ari`
        NMI and ARI between the labels and K-means clusters of the embedding
        with as many clusters as labels (as ``scib-metrics`` does; scib instead
        scans Leiden resolutions for the best NMI).

Without labels (what the integrate stage reports)
    Right after integration there are no cell-type labels yet, and a
    clustering of either embedding is not a neutral stand-in: clusters of the
    corrected space are compact there by construction, clusters of the
    uncorrected PCA can be batch-specific. :func:`integration_metrics` then
    reports, with the choice spelled out in the table's ``note`` column:

    - ``ilisi`` for every representation (needs no labels);
    - ``batch_asw`` for every representation, grouped by the Leiden clusters
      of the first representation (``X_pca``; k = 15, resolution 1) as
      stand-in cell types. The same grouping is used for every representation,
      so the values are comparable; a batch-specific PCA cluster holds a single
      batch and is skipped, which flatters ``X_pca`` a little;
    - ``cluster_agreement_nmi`` / ``cluster_agreement_ari`` for the other
      representations: agreement of their Leiden clusters with those of
      ``X_pca``. A *proxy* for conservation: near 1 = the integration kept the
      PCA structure; lower = it merged or reshaped clusters, which is wanted
      where the PCA clusters were batch-driven and unwanted where they were
      cell types.

    With a label column (after annotation, or the demo's true cell types),
    ``batch_asw`` is grouped by the labels, and ``celltype_asw``, ``nmi`` and
    ``ari`` replace the cluster agreement.

Caveat on ASW across representations
    Silhouettes shrink towards 0 as the number of noisy dimensions grows, so a
    50-component PCA gets a higher batch ASW (``1 - |s|``) and a lower cell-type
    ASW than a 30-dimensional scVI latent space for reasons unrelated to
    mixing. scib shares this; read the ASWs together with iLISI and NMI/ARI.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData
    from numpy.typing import ArrayLike, NDArray

__all__ = [
    "batch_asw",
    "celltype_asw",
    "ilisi",
    "integration_metrics",
    "knn_indices",
    "leiden_clusters",
    "nmi_ari",
]

MetricKind = Literal["batch_mixing", "bio_conservation"]


def _codes(values: ArrayLike) -> tuple[NDArray[np.intp], int]:
    """Integer codes of a label vector and the number of distinct labels (NaN is an error)."""
    s = pd.Series(np.asarray(values, dtype=object))
    if s.isna().any():
        raise ValueError(f"labels hold {int(s.isna().sum())} missing values")
    codes, uniques = pd.factorize(s, sort=True)
    return codes.astype(np.intp), len(uniques)


def _emb(emb: ArrayLike) -> NDArray[np.float64]:
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embedding must be 2-D (cells x dimensions), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embedding holds NaN or infinite values")
    return x


def knn_indices(emb: ArrayLike, k: int) -> NDArray[np.intp]:
    """Indices of each cell's ``k`` nearest neighbours (Euclidean, exact, self excluded).

    Parameters
    ----------
    emb
        Cells x dimensions.
    k
        Neighbours per cell; lowered to ``n_cells - 1`` when larger.

    Returns
    -------
    Array of shape ``(n_cells, k)``, nearest first.
    """
    from sklearn.neighbors import NearestNeighbors

    x = _emb(emb)
    k = min(int(k), x.shape[0] - 1)
    if k < 1:
        raise ValueError("need at least 2 cells for a neighbour graph")
    nn = NearestNeighbors(n_neighbors=k).fit(x)
    # kneighbors() without X leaves each point out of its own neighbours
    return nn.kneighbors(return_distance=False).astype(np.intp)


def _lisi_per_cell(nbrs: NDArray[np.intp], codes: NDArray[np.intp], n_labels: int) -> NDArray:
    """Inverse Simpson's index of ``codes`` over each row of the neighbour table."""
    n, k = nbrs.shape
    lab = codes[nbrs]
    counts = np.zeros((n, n_labels), dtype=np.float64)
    np.add.at(counts, (np.repeat(np.arange(n), k), lab.ravel()), 1.0)
    p = counts / k
    return 1.0 / (p**2).sum(axis=1)


def ilisi(emb: ArrayLike, batch: ArrayLike, *, k: int = 30) -> float:
    """Graph iLISI scaled to [0, 1] (scib's ``ilisi_graph`` scaling).

    Parameters
    ----------
    emb
        Cells x dimensions.
    batch
        Batch label per cell (at least two distinct labels).
    k
        Neighbours per cell.

    Returns
    -------
    ``(median_c LISI_c - 1) / (n_batches - 1)``; 0 when each cell's neighbours
    all share its batch, higher when batches are mixed.

    Raises
    ------
    ValueError
        Fewer than two batches, lengths differ, or the embedding is not finite.
    """
    x = _emb(emb)
    codes, n_b = _codes(batch)
    if len(codes) != x.shape[0]:
        raise ValueError(f"{len(codes)} batch labels for {x.shape[0]} cells")
    if n_b < 2:
        raise ValueError("iLISI needs at least two batches")
    lisi = _lisi_per_cell(knn_indices(x, k), codes, n_b)
    return float((np.median(lisi) - 1.0) / (n_b - 1.0))


def batch_asw(emb: ArrayLike, batch: ArrayLike, labels: ArrayLike) -> float:
    """scib's batch ASW: per label group, the mean of ``1 - |silhouette(batch)|``; mean over groups.

    Groups with a single batch, or with as many batches as cells (silhouette
    undefined), are skipped, as in scib.

    Parameters
    ----------
    emb
        Cells x dimensions.
    batch
        Batch label per cell.
    labels
        Cell-type (or other grouping) label per cell.

    Returns
    -------
    A value in [0, 1]; 1 = batches perfectly mixed within every cell type.
    NaN when no group qualifies.
    """
    from sklearn.metrics import silhouette_samples

    x = _emb(emb)
    b_codes, _ = _codes(batch)
    l_codes, n_l = _codes(labels)
    if not (len(b_codes) == len(l_codes) == x.shape[0]):
        raise ValueError("emb, batch and labels must describe the same cells")
    means = []
    for lab in range(n_l):
        idx = np.flatnonzero(l_codes == lab)
        n_batches = len(np.unique(b_codes[idx]))
        if n_batches < 2 or n_batches >= len(idx):
            continue
        s = silhouette_samples(x[idx], b_codes[idx])
        means.append(float(np.mean(1.0 - np.abs(s))))
    return float(np.mean(means)) if means else float("nan")


def celltype_asw(emb: ArrayLike, labels: ArrayLike) -> float:
    """Silhouette of the labels, rescaled to [0, 1] as ``(s + 1) / 2``.

    Raises
    ------
    ValueError
        Fewer than two labels, or as many labels as cells.
    """
    from sklearn.metrics import silhouette_score

    x = _emb(emb)
    codes, n_l = _codes(labels)
    if len(codes) != x.shape[0]:
        raise ValueError(f"{len(codes)} labels for {x.shape[0]} cells")
    if not 2 <= n_l < x.shape[0]:
        raise ValueError(f"cell-type ASW needs 2 to n_cells - 1 labels, got {n_l}")
    return float((silhouette_score(x, codes) + 1.0) / 2.0)


def nmi_ari(emb: ArrayLike, labels: ArrayLike, *, seed: int = 0) -> tuple[float, float]:
    """NMI and ARI between the labels and K-means clusters of the embedding.

    K-means runs with as many clusters as distinct labels (10 seeded restarts).

    Returns
    -------
    ``(nmi, ari)``; NMI with arithmetic normalisation (scib's default).
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    x = _emb(emb)
    codes, n_l = _codes(labels)
    if len(codes) != x.shape[0]:
        raise ValueError(f"{len(codes)} labels for {x.shape[0]} cells")
    if n_l < 2:
        raise ValueError("NMI/ARI need at least two labels")
    km = KMeans(n_clusters=n_l, n_init=10, random_state=seed).fit(x)
    return (
        float(normalized_mutual_info_score(codes, km.labels_)),
        float(adjusted_rand_score(codes, km.labels_)),
    )


def _nmi(a: ArrayLike, b: ArrayLike) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(a, b))


def _ari(a: ArrayLike, b: ArrayLike) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(a, b))


def leiden_clusters(
    emb: ArrayLike, *, k: int = 15, resolution: float = 1.0, seed: int = 0
) -> NDArray[np.intp]:
    """Leiden clusters (leidenalg, RB configuration = modularity) of an unweighted kNN graph.

    The graph joins each cell to its ``k`` nearest neighbours, made undirected
    (an edge present in both directions counts once).

    Returns
    -------
    Cluster id per cell (0 = largest cluster).
    """
    import igraph as ig
    import leidenalg

    nbrs = knn_indices(emb, k)
    n = nbrs.shape[0]
    src = np.repeat(np.arange(n), nbrs.shape[1])
    dst = nbrs.ravel()
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    edges = np.unique(np.stack([lo, hi], axis=1), axis=0)
    g = ig.Graph(n=n, edges=edges.tolist(), directed=False)
    part = leidenalg.find_partition(
        g,
        leidenalg.RBConfigurationVertexPartition,
        resolution_parameter=resolution,
        n_iterations=-1,
        seed=seed,
    )
    return np.asarray(part.membership, dtype=np.intp)


def integration_metrics(
    adata: AnnData,
    *,
    batch_key: str,
    label_key: str | None = None,
    reps: Sequence[str] = ("X_pca", "X_scVI"),
    max_cells: int = 20_000,
    seed: int = 0,
    k: int = 30,
) -> pd.DataFrame:
    """Batch-mixing and conservation metrics of several embeddings of the same cells.

    Parameters
    ----------
    adata
        Cells with the embeddings in ``obsm``.
    batch_key
        obs column of the batches to mix (e.g. ``sample``).
    label_key
        obs column of cell-type labels; ``None`` computes only the label-free
        metrics (see the module docstring).
    reps
        ``obsm`` keys to compare; the first one is the reference for the
        label-free cluster agreement (normally ``X_pca``).
    max_cells
        Cells used, a seeded random subset when there are more (silhouettes are
        quadratic in the cells per group).
    seed
        Seed of the subset, K-means and Leiden.
    k
        Neighbours for iLISI.

    Returns
    -------
    Tidy table, one row per representation x metric, columns
    ``representation, metric, value, kind`` (``batch_mixing`` or
    ``bio_conservation``), ``n_cells`` and ``note``.

    Raises
    ------
    KeyError
        A representation or obs column is missing.
    """
    for rep in reps:
        if rep not in adata.obsm:
            raise KeyError(f"obsm[{rep!r}] is missing; present: {', '.join(adata.obsm)}")
    for col in (batch_key, label_key):
        if col is not None and col not in adata.obs:
            raise KeyError(f"obs column {col!r} is missing; columns: {', '.join(adata.obs)}")
    rng = np.random.default_rng(seed)
    n = adata.n_obs
    idx = np.sort(rng.choice(n, max_cells, replace=False)) if n > max_cells else np.arange(n)
    batch = adata.obs[batch_key].to_numpy()[idx]
    labels = adata.obs[label_key].to_numpy()[idx] if label_key is not None else None
    n_batches = len(pd.unique(batch))
    rows: list[dict[str, object]] = []

    def add(rep: str, metric: str, value: float, kind: MetricKind, note: str) -> None:
        rows.append(
            {
                "representation": rep,
                "metric": metric,
                "value": float(value),
                "kind": kind,
                "n_cells": len(idx),
                "note": note,
            }
        )

    embs = {rep: np.asarray(adata.obsm[rep])[idx] for rep in reps}
    ref = reps[0] if reps else None
    ref_clusters = leiden_clusters(embs[ref], seed=seed) if labels is None and ref else None
    for rep, x in embs.items():
        if n_batches >= 2:
            add(rep, "ilisi", ilisi(x, batch, k=k), "batch_mixing", f"batch: {batch_key}; k={k}")
        if labels is not None:
            note = f"labels: {label_key}; batch: {batch_key}"
            if n_batches >= 2:
                add(rep, "batch_asw", batch_asw(x, batch, labels), "batch_mixing", note)
            add(rep, "celltype_asw", celltype_asw(x, labels), "bio_conservation", note)
            nmi, ari = nmi_ari(x, labels, seed=seed)
            add(rep, "nmi", nmi, "bio_conservation", f"K-means clusters vs {label_key}")
            add(rep, "ari", ari, "bio_conservation", f"K-means clusters vs {label_key}")
            continue
        assert ref_clusters is not None
        if n_batches >= 2:
            note = (
                f"no labels: grouped by Leiden clusters of {ref} (k=15, resolution 1) as "
                f"stand-in cell types; batch: {batch_key}"
            )
            add(rep, "batch_asw", batch_asw(x, batch, ref_clusters), "batch_mixing", note)
        if rep == ref:
            continue
        own = leiden_clusters(x, seed=seed)
        note = (
            f"proxy without labels: Leiden clusters of {rep} vs of {ref} (k=15, resolution 1); "
            f"1 = same structure as {ref}, including any batch-driven clusters it had"
        )
        add(rep, "cluster_agreement_nmi", _nmi(ref_clusters, own), "bio_conservation", note)
        add(rep, "cluster_agreement_ari", _ari(ref_clusters, own), "bio_conservation", note)
    return pd.DataFrame(
        rows, columns=["representation", "metric", "value", "kind", "n_cells", "note"]
    )
