"""The cluster stage on the real pipeline's output for the ci demo cohort (PCA; scVI comes later)."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pipeline.artifacts import read_h5ad_artifact, write_h5ad_atomic
from pipeline.config import load_config
from pipeline.datasets import demo_cohort
from pipeline.errors import InputError
from pipeline.runner import Runner
from pipeline.stages.cluster import leiden_key, run_cluster

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory: pytest.TempPathFactory) -> ad.AnnData:
    """The ci demo run through ingest, qc and preprocess by the real runner."""
    root = tmp_path_factory.mktemp("cluster_demo")
    demo = demo_cohort(root / "demo", size="ci")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Runner(demo.samplesheet, load_config(None), root / "out").run(until="preprocess")
    return read_h5ad_artifact(root / "out" / "preprocess" / "preprocess.h5ad")


@pytest.fixture(scope="module")
def clustered(preprocessed: ad.AnnData) -> ad.AnnData:
    return run_cluster(preprocessed.copy(), load_config(None), device=CPU)


def test_writes_leiden_per_resolution_umap_and_graph(clustered: ad.AnnData) -> None:
    cfg = load_config(None)
    a = clustered
    for r in cfg.cluster.resolutions:
        col = a.obs[leiden_key(r)]
        assert col.dtype.name == "category"
        assert 5 <= col.nunique() < 60
    assert [leiden_key(r) for r in cfg.cluster.resolutions] == ["leiden_0.5", "leiden_1.0"]
    assert (a.obs["leiden"] == a.obs[leiden_key(cfg.cluster.resolution)]).all()
    # higher resolution, at least as many clusters
    assert a.obs["leiden_1.0"].nunique() >= a.obs["leiden_0.5"].nunique()
    assert a.obsm["X_umap"].shape == (a.n_obs, 2)
    assert np.isfinite(a.obsm["X_umap"]).all()
    for key in ("connectivities", "distances"):
        g = a.obsp[key]
        assert sp.issparse(g) and g.shape == (a.n_obs, a.n_obs)
    info = a.uns["immuneage"]["cluster"]
    assert info["use_rep"] == "X_pca"
    assert info["backend"] == "scanpy"
    assert info["n_clusters"] == {
        leiden_key(r): a.obs[leiden_key(r)].nunique() for r in cfg.cluster.resolutions
    }


def test_deterministic_for_a_seed(preprocessed: ad.AnnData, clustered: ad.AnnData) -> None:
    again = run_cluster(preprocessed.copy(), load_config(None), device=CPU)
    for col in ("leiden_0.5", "leiden_1.0", "leiden"):
        assert (again.obs[col] == clustered.obs[col]).all()
    np.testing.assert_allclose(again.obsm["X_umap"], clustered.obsm["X_umap"], rtol=1e-5)


def test_prefers_scvi_latent_and_round_trips(preprocessed: ad.AnnData, tmp_path: Path) -> None:
    a = preprocessed.copy()
    a.obsm["X_scVI"] = a.obsm["X_pca"][:, :10].copy()
    cfg = load_config(None, {"cluster": {"resolutions": [0.8], "resolution": 0.8}})
    out = run_cluster(a, cfg, device=CPU)
    assert out.uns["immuneage"]["cluster"]["use_rep"] == "X_scVI"
    assert list(out.obs.columns[-2:]) == ["leiden_0.8", "leiden"]
    write_h5ad_atomic(tmp_path / "c.h5ad", out)
    back = read_h5ad_artifact(tmp_path / "c.h5ad")
    assert (back.obs["leiden"] == out.obs["leiden"]).all()
    assert back.uns["immuneage"]["cluster"]["n_clusters"]["leiden_0.8"] >= 2
    assert "connectivities" in back.obsp


def test_no_representation_is_an_input_error(preprocessed: ad.AnnData) -> None:
    a = ad.AnnData(preprocessed.X[:50].copy())
    with pytest.raises(InputError, match="X_pca"):
        run_cluster(a, load_config(None), device=CPU)


@pytest.mark.slow  # ~25 s: pynndescent's numba compilation
def test_approximate_neighbours_path() -> None:
    """From 4,096 cells scanpy uses pynndescent, whose csr_array output scanpy 1.11 cannot read."""
    from pipeline.stages.cluster import _APPROXIMATE_FROM, _pynndescent_transformer

    rng = np.random.default_rng(0)
    n = _APPROXIMATE_FROM + 100
    centers = rng.normal(0, 6, size=(4, 8))
    x = (centers[rng.integers(0, 4, n)] + rng.normal(size=(n, 8))).astype(np.float32)
    import scanpy as sc

    a = ad.AnnData(np.zeros((n, 1), dtype=np.float32), obsm={"X_pca": x})
    sc.pp.neighbors(
        a, n_neighbors=10, use_rep="X_pca", transformer=_pynndescent_transformer(n, 10, 0)
    )
    assert sp.issparse(a.obsp["distances"]) and sp.issparse(a.obsp["connectivities"])
    assert (np.diff(a.obsp["distances"].indptr) >= 9).all()
    # the four blobs are recovered
    sc.tl.leiden(a, flavor="igraph", n_iterations=2, directed=False, random_state=0)
    assert a.obs["leiden"].nunique() >= 4


def test_context_reuses_graph_and_umap_when_only_resolutions_change(
    preprocessed: ad.AnnData, clustered: ad.AnnData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the runner's context: same graph key -> Leiden only, on the previous graph."""
    import scanpy as sc

    from pipeline.stages import StageContext, StageResult
    from pipeline.stages.cluster import graph_key, umap_key

    stage_dir = tmp_path / "cluster"
    stage_dir.mkdir()
    cfg = load_config(None)
    info = clustered.uns["immuneage"]["cluster"]
    assert info["graph_key"] == graph_key(preprocessed, cfg, rep="X_pca", backend="scanpy")
    assert info["umap_key"] == umap_key(info["graph_key"], cfg)
    previous = {"graph_key": info["graph_key"], "umap_key": info["umap_key"]}
    write_h5ad_atomic(stage_dir / "cluster.h5ad", clustered)

    def context() -> StageContext:
        return StageContext(tmp_path, {}, stage_dir=stage_dir, previous=previous)

    def fail(*args: object, **kwargs: object) -> None:
        pytest.fail("recomputed")

    monkeypatch.setattr(sc.pp, "neighbors", fail)
    monkeypatch.setattr(sc.tl, "umap", fail)
    more = load_config(None, {"cluster": {"resolutions": [0.5, 1.0, 2.0], "resolution": 2.0}})
    res = run_cluster(preprocessed.copy(), more, device=CPU, context=context())
    assert isinstance(res, StageResult)
    assert res.provenance == {**previous, "graph": "reused", "umap": "reused"}
    out = res.adata
    for key in ("connectivities", "distances"):
        assert (out.obsp[key] != clustered.obsp[key]).nnz == 0
    np.testing.assert_array_equal(out.obsm["X_umap"], clustered.obsm["X_umap"])
    for col in ("leiden_0.5", "leiden_1.0"):
        assert (out.obs[col] == clustered.obs[col]).all()
    assert (out.obs["leiden"] == out.obs["leiden_2.0"]).all()
    assert out.obs["leiden_2.0"].nunique() >= out.obs["leiden_1.0"].nunique()

    # another latent (or k, seed, backend) is another graph
    other = preprocessed.copy()
    other.obsm["X_pca"] = other.obsm["X_pca"] * 2
    assert graph_key(other, cfg, rep="X_pca", backend="scanpy") != info["graph_key"]
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        run_cluster(other, cfg, device=CPU, context=context())
    # an artifact another graph went into (a run killed before its stamp) is not reused
    tampered = clustered.copy()
    tampered.uns["immuneage"]["cluster"]["graph_key"] = "another"
    write_h5ad_atomic(stage_dir / "cluster.h5ad", tampered)
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        run_cluster(preprocessed.copy(), cfg, device=CPU, context=context())
