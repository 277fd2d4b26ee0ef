"""Stage ``cluster``: kNN graph, Leiden clustering at several resolutions, UMAP.

The graph is built on the scVI latent space (``obsm["X_scVI"]``) when the
integrate stage produced one, else on the PCA (``obsm["X_pca"]``). Leiden runs
once per ``cluster.resolutions`` (igraph implementation, two iterations,
seeded); ``obs["leiden"]`` is a copy of the ``cluster.resolution`` clustering,
the one annotation votes over. On a GPU with rapids-singlecell the same three
steps run with ``rapids_singlecell`` (same keys, same parameters); otherwise
scanpy does them (the torch ``kernels`` backend has no graph code, so it uses
scanpy too).

Progress: one start and one end line (with the wall time) for the neighbour
graph, each Leiden resolution and the UMAP (:func:`pipeline.progress.step`).

Resume (with a :class:`~pipeline.stages.StageContext` from the runner): the
neighbour graph is keyed by :func:`graph_key` (the content of the
representation, the cells, ``n_neighbors``, the seed and the backend) and the
UMAP by :func:`umap_key` (the graph key and ``umap_min_dist``). When a key
equals the one the previous completed run in the same output directory
recorded, and its ``cluster.h5ad`` holds that graph (or UMAP), they are read
from it instead of being computed again; Leiden always runs. So a change of
``cluster.resolutions`` / ``cluster.resolution`` recomputes only Leiden, and a
change of ``umap_min_dist`` only Leiden and the UMAP.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__, keys
from ..errors import InputError
from ..progress import step
from ._backend import choose_backend, rapids
from ._base import StageContext, StageResult

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

    from ..config import Config

__all__ = ["graph_key", "leiden_key", "run_cluster", "umap_key"]

log = logging.getLogger("immuneage")

#: obs column of the clustering annotation votes over.
LEIDEN = keys.LEIDEN


def leiden_key(resolution: float) -> str:
    """obs column of one resolution's clustering, e.g. ``leiden_0.5`` or ``leiden_1.0``."""
    return f"leiden_{float(resolution)}"


#: The stage's artifact in its directory (read for the previous graph and UMAP).
ARTIFACT = "cluster.h5ad"


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def graph_key(adata: AnnData, cfg: Config, *, rep: str, backend: str) -> str:
    """Key of everything the neighbour graph depends on.

    Parameters
    ----------
    adata
        The cells; the content of ``obsm[rep]`` and the cell names are hashed
        (so a re-run of integrate that reproduced the same latent keeps the key).
    cfg
        Run configuration (``cluster.n_neighbors``, ``seed``).
    rep
        The representation the graph is built on.
    backend
        ``"scanpy"`` or ``"rapids"``.

    Returns
    -------
    A sha256 hex digest (also covering the immuneage version).
    """
    x = np.ascontiguousarray(adata.obsm[rep])
    h = hashlib.sha256()
    h.update(f"{x.dtype.str}{x.shape}".encode())
    h.update(memoryview(x).cast("B"))
    h.update("\0".join(map(str, adata.obs_names)).encode())
    return _sha(
        {
            "rep": rep,
            "rep_sha256": h.hexdigest(),
            "n_neighbors": cfg.cluster.n_neighbors,
            "seed": cfg.seed,
            "backend": backend,
            "immuneage": __version__,
        }
    )


def umap_key(graph: str, cfg: Config) -> str:
    """Key of the UMAP: the :func:`graph_key` and ``cluster.umap_min_dist`` (sha256 hex)."""
    return _sha({"graph": graph, "umap_min_dist": cfg.cluster.umap_min_dist})


@dataclass
class _Previous:
    """Parts of the previous run's artifact, read into memory (it is replaced after the stage)."""

    obsp: dict[str, Any] = field(default_factory=dict)
    neighbors: dict[str, Any] | None = None
    umap: np.ndarray | None = None
    umap_uns: dict[str, Any] | None = None


def _previous_parts(
    context: StageContext | None, adata: AnnData, graph: str, umap: str
) -> _Previous:
    """The previous run's graph and UMAP when their keys are ``graph`` and ``umap``.

    Each part is taken only when the key recorded in the previous provenance and
    in the previous artifact (which a run killed before its stamp may have
    replaced) both match and the artifact holds the same cells; empty otherwise.
    """
    import anndata as ad
    import h5py

    prev = _Previous()
    if context is None or context.stage_dir is None:
        return prev
    want_graph = context.previous.get("graph_key") == graph
    want_umap = want_graph and context.previous.get("umap_key") == umap
    path = context.stage_dir / ARTIFACT
    if not want_graph or not path.is_file():
        return prev
    try:
        # h5py follows the external links of backed-mode artifacts; only small parts are read
        with h5py.File(path, "r") as f:
            info = ad.io.read_elem(f["uns"][keys.UNS]["cluster"])
            obs = f["obs"]
            names = np.asarray(ad.io.read_elem(obs[obs.attrs["_index"]]), dtype=str)
            if (
                info.get("graph_key") != graph
                or len(names) != adata.n_obs
                or not np.array_equal(names, adata.obs_names.to_numpy(dtype=str))
            ):
                log.info("cluster: the previous artifact holds another graph; computing it")
                return prev
            neighbors = ad.io.read_elem(f["uns"]["neighbors"])
            obsp = {
                k: ad.io.read_elem(f["obsp"][neighbors[k]])
                for k in ("connectivities_key", "distances_key")
            }
            if want_umap and info.get("umap_key") == umap and keys.X_UMAP in f["obsm"]:
                prev.umap = np.asarray(ad.io.read_elem(f["obsm"][keys.X_UMAP]))
                prev.umap_uns = ad.io.read_elem(f["uns"]["umap"]) if "umap" in f["uns"] else {}
    except (OSError, KeyError) as exc:
        log.info("cluster: cannot read the previous graph (%s); computing it", exc)
        return _Previous()
    prev.neighbors = dict(neighbors)
    prev.obsp = {str(neighbors[k]): m for k, m in obsp.items()}
    return prev


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


def _leiden_label(r: float, adata: AnnData) -> str:
    return f"Leiden (resolution {r:g}, {adata.n_obs:,} cells)"


def _scanpy(adata: AnnData, cfg: Config, rep: str, prev: _Previous) -> None:
    import scanpy as sc

    c = cfg.cluster
    if prev.neighbors is None:
        transformer = None
        if adata.n_obs >= _APPROXIMATE_FROM:
            transformer = _pynndescent_transformer(adata.n_obs, c.n_neighbors, cfg.seed)
        with step(f"cluster: neighbours (k={c.n_neighbors}, {adata.n_obs:,} cells)"):
            sc.pp.neighbors(
                adata,
                n_neighbors=c.n_neighbors,
                use_rep=rep,
                random_state=cfg.seed,
                transformer=transformer,
            )
    for r in c.resolutions:
        with step(f"cluster: {_leiden_label(r, adata)}") as s:
            sc.tl.leiden(
                adata,
                resolution=r,
                key_added=leiden_key(r),
                flavor="igraph",
                n_iterations=2,
                directed=False,
                random_state=cfg.seed,
            )
            s["detail"] = f"{adata.obs[leiden_key(r)].nunique()} clusters"
    if prev.umap is None:
        with step(f"cluster: UMAP ({adata.n_obs:,} cells)"):
            sc.tl.umap(adata, min_dist=c.umap_min_dist, random_state=cfg.seed)


def _rapids(
    adata: AnnData, cfg: Config, rep: str, prev: _Previous
) -> None:  # pragma: no cover - needs a GPU
    rsc = rapids()
    c = cfg.cluster
    if prev.neighbors is None:
        with step(f"cluster: neighbours (k={c.n_neighbors}, {adata.n_obs:,} cells, GPU)"):
            rsc.pp.neighbors(adata, n_neighbors=c.n_neighbors, use_rep=rep, random_state=cfg.seed)
    for r in c.resolutions:
        with step(f"cluster: {_leiden_label(r, adata)}, GPU") as s:
            rsc.tl.leiden(
                adata, resolution=r, key_added=leiden_key(r), n_iterations=2, random_state=cfg.seed
            )
            s["detail"] = f"{adata.obs[leiden_key(r)].nunique()} clusters"
    if prev.umap is None:
        with step(f"cluster: UMAP ({adata.n_obs:,} cells, GPU)"):
            rsc.tl.umap(adata, min_dist=c.umap_min_dist, random_state=cfg.seed)
        adata.obsm[keys.X_UMAP] = np.asarray(
            adata.obsm[keys.X_UMAP].get()
            if hasattr(adata.obsm[keys.X_UMAP], "get")
            else adata.obsm[keys.X_UMAP]
        )


def run_cluster(
    adata: AnnData,
    cfg: Config,
    *,
    device: torch.device | str = "cpu",
    context: StageContext | None = None,
) -> AnnData | StageResult:
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
    context
        From the runner: the stage directory and what the previous run
        recorded; the previous graph and UMAP are reused when their keys are
        unchanged (see the module docstring). ``None`` (e.g. in a notebook):
        compute everything.

    Returns
    -------
    The same AnnData with ``obsp["connectivities"]``, ``obsp["distances"]``,
    ``uns["neighbors"]``, ``obs["leiden_<resolution>"]`` for each resolution
    (categorical, clusters numbered by decreasing size), ``obs["leiden"]``
    (the ``cluster.resolution`` one), ``obsm["X_umap"]``, ``uns["umap"]`` and
    ``uns["immuneage"]["cluster"]`` (representation used, backend, device,
    parameters, number of clusters per resolution, ``graph_key`` and
    ``umap_key``). With a ``context``, a :class:`StageResult` holding that
    AnnData and the provenance ``graph_key``, ``umap_key``, ``graph`` and
    ``umap`` (``"computed"`` or ``"reused"``).

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
    gkey = graph_key(adata, cfg, rep=rep, backend=used)
    ukey = umap_key(gkey, cfg)
    prev = _previous_parts(context, adata, gkey, ukey)
    log.info("cluster: %s on obsm['%s'] (%d cells)", used, rep, adata.n_obs)
    if prev.neighbors is not None:
        adata.uns["neighbors"] = prev.neighbors
        for name, matrix in prev.obsp.items():
            adata.obsp[name] = matrix
        log.info(
            "cluster: reusing the neighbour graph of the previous run (%s and k unchanged)", rep
        )
    if prev.umap is not None:
        adata.obsm[keys.X_UMAP] = prev.umap
        adata.uns["umap"] = prev.umap_uns or {}
        log.info("cluster: reusing the UMAP of the previous run (graph and min_dist unchanged)")
    if used == "rapids":  # pragma: no cover - needs a GPU and rapids-singlecell
        _rapids(adata, cfg, rep, prev)
    else:
        _scanpy(adata, cfg, rep, prev)
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
        "graph_key": gkey,
        "umap_key": ukey,
    }
    if context is None:
        return adata
    return StageResult(
        adata,
        provenance={
            "graph_key": gkey,
            "umap_key": ukey,
            "graph": "reused" if prev.neighbors is not None else "computed",
            "umap": "reused" if prev.umap is not None else "computed",
        },
    )
