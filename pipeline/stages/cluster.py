"""Stage ``cluster``: kNN graph, Leiden clustering at several resolutions, UMAP.

The graph is built on the scVI latent space (``obsm["X_scVI"]``) when the
integrate stage produced one, else on the PCA (``obsm["X_pca"]``). Leiden runs
once per ``cluster.resolutions`` (igraph implementation, two iterations,
seeded); ``obs["leiden"]`` is a copy of the ``cluster.resolution`` clustering,
the one annotation votes over. On a GPU with rapids-singlecell the same three
steps run with ``rapids_singlecell`` (same keys, same parameters); otherwise
scanpy does them (the torch ``kernels`` backend has no graph code, so it uses
scanpy too).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import keys
from ..errors import InputError
from ._backend import choose_backend, rapids

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

    from ..config import Config

__all__ = ["leiden_key", "run_cluster"]

log = logging.getLogger("immuneage")

#: obs column of the clustering annotation votes over.
LEIDEN = keys.LEIDEN


def leiden_key(resolution: float) -> str:
    """obs column of one resolution's clustering, e.g. ``leiden_0.5`` or ``leiden_1.0``."""
    return f"leiden_{float(resolution)}"


def _representation(adata: AnnData) -> str:
    for rep in (keys.X_SCVI, keys.X_PCA):
        if rep in adata.obsm:
            return rep
    raise InputError(
        f"cluster needs obsm['{keys.X_SCVI}'] (integrate stage) or obsm['{keys.X_PCA}'] "
        f"(preprocess stage); this AnnData has obsm keys {sorted(adata.obsm)}"
    )


#: From this many cells scanpy switches from exact (brute force) neighbours to pynndescent.
_APPROXIMATE_FROM = 4096


def _pynndescent_transformer(n_obs: int, n_neighbors: int, seed: int) -> Any:
    """scanpy's default pynndescent kNN transformer, returning a ``csr_matrix``.

    pynndescent >= 0.7 returns a ``scipy.sparse.csr_array``, which scanpy 1.11
    cannot read (``AttributeError: 'csr_array' object has no attribute
    'getnnz'`` from ``sc.pp.neighbors`` on 4,096 cells or more). The wrapper
    converts the result; the parameters are scanpy's own defaults.
    """
    import scanpy as sc
    import scipy.sparse as sp
    from pynndescent import PyNNDescentTransformer

    class _CSRTransformer(PyNNDescentTransformer):  # type: ignore[misc]
        def fit_transform(self, X: Any, y: Any = None, **fit_params: Any) -> sp.csr_matrix:
            return sp.csr_matrix(super().fit_transform(X, y, **fit_params))

    return _CSRTransformer(
        n_neighbors=n_neighbors,
        metric="euclidean",
        random_state=seed,
        n_jobs=sc.settings.n_jobs,
        n_trees=min(64, 5 + round(n_obs**0.5 / 20.0)),
        n_iters=max(5, round(np.log2(n_obs))),
    )


def _scanpy(adata: AnnData, cfg: Config, rep: str) -> None:
    import scanpy as sc

    c = cfg.cluster
    transformer = None
    if adata.n_obs >= _APPROXIMATE_FROM:
        transformer = _pynndescent_transformer(adata.n_obs, c.n_neighbors, cfg.seed)
    sc.pp.neighbors(
        adata,
        n_neighbors=c.n_neighbors,
        use_rep=rep,
        random_state=cfg.seed,
        transformer=transformer,
    )
    for r in c.resolutions:
        sc.tl.leiden(
            adata,
            resolution=r,
            key_added=leiden_key(r),
            flavor="igraph",
            n_iterations=2,
            directed=False,
            random_state=cfg.seed,
        )
    sc.tl.umap(adata, min_dist=c.umap_min_dist, random_state=cfg.seed)


def _rapids(adata: AnnData, cfg: Config, rep: str) -> None:  # pragma: no cover - needs a GPU
    rsc = rapids()
    c = cfg.cluster
    rsc.pp.neighbors(adata, n_neighbors=c.n_neighbors, use_rep=rep, random_state=cfg.seed)
    for r in c.resolutions:
        rsc.tl.leiden(
            adata, resolution=r, key_added=leiden_key(r), n_iterations=2, random_state=cfg.seed
        )
    rsc.tl.umap(adata, min_dist=c.umap_min_dist, random_state=cfg.seed)
    adata.obsm[keys.X_UMAP] = np.asarray(
        adata.obsm[keys.X_UMAP].get()
        if hasattr(adata.obsm[keys.X_UMAP], "get")
        else adata.obsm[keys.X_UMAP]
    )


def run_cluster(adata: AnnData, cfg: Config, *, device: torch.device | str = "cpu") -> AnnData:
    """Neighbour graph, Leiden at each resolution and UMAP (in place).

    Parameters
    ----------
    adata
        Cells with ``obsm["X_scVI"]`` (preferred) or ``obsm["X_pca"]``.
    cfg
        Run configuration (reads ``cluster``, ``backend``, ``seed``).
    device
        The run's device; with ``backend`` resolving to ``rapids`` the graph,
        Leiden and UMAP run on the GPU with rapids-singlecell.

    Returns
    -------
    The same AnnData with ``obsp["connectivities"]``, ``obsp["distances"]``,
    ``uns["neighbors"]``, ``obs["leiden_<resolution>"]`` for each resolution
    (categorical, clusters numbered by decreasing size), ``obs["leiden"]``
    (the ``cluster.resolution`` one), ``obsm["X_umap"]``, ``uns["umap"]`` and
    ``uns["immuneage"]["cluster"]`` (representation used, backend, device,
    parameters and number of clusters per resolution).

    Raises
    ------
    InputError
        Neither ``X_scVI`` nor ``X_pca`` is present, or there are too few cells
        for ``n_neighbors``.
    """
    c = cfg.cluster
    rep = _representation(adata)
    if adata.n_obs <= c.n_neighbors:
        raise InputError(
            f"cluster: {adata.n_obs} cells are too few for cluster.n_neighbors={c.n_neighbors}"
        )
    backend = choose_backend(cfg.backend, device)
    used = "rapids" if backend == "rapids" else "scanpy"
    log.info("cluster: %s on obsm['%s'] (%d cells)", used, rep, adata.n_obs)
    if used == "rapids":  # pragma: no cover - needs a GPU and rapids-singlecell
        _rapids(adata, cfg, rep)
    else:
        _scanpy(adata, cfg, rep)
    adata.obs[LEIDEN] = adata.obs[leiden_key(c.resolution)].copy()
    n_clusters: dict[str, Any] = {
        leiden_key(r): int(adata.obs[leiden_key(r)].nunique()) for r in c.resolutions
    }
    adata.uns.setdefault(keys.UNS, {})["cluster"] = {
        "use_rep": rep,
        "backend": used,
        "device": str(getattr(device, "type", device)),
        "n_neighbors": c.n_neighbors,
        "resolutions": [float(r) for r in c.resolutions],
        "resolution": float(c.resolution),
        "leiden_flavor": "igraph",
        "leiden_n_iterations": 2,
        "umap_min_dist": c.umap_min_dist,
        "n_clusters": n_clusters,
    }
    return adata
