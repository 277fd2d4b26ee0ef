"""Integration metrics against hand-computed small cases and scikit-learn."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import silhouette_samples, silhouette_score

from pipeline.stats.integration import (
    batch_asw,
    celltype_asw,
    ilisi,
    integration_metrics,
    knn_indices,
    leiden_clusters,
    nmi_ari,
)

# four cells on a line: 0, 1, 4, 6
LINE = np.array([[0.0], [1.0], [4.0], [6.0]])
# silhouettes of the split {0, 1} | {4, 6}, by hand (s = (b - a) / max(a, b)):
#   x=0: a=1, b=(4+6)/2=5   -> 4/5      x=4: a=2, b=(4+3)/2=3.5 -> 3/7
#   x=1: a=1, b=(3+5)/2=4   -> 3/4      x=6: a=2, b=(6+5)/2=5.5 -> 7/11
LINE_S = np.array([4 / 5, 3 / 4, 3 / 7, 7 / 11])


def _blobs(n: int, centers: np.ndarray, sd: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lab = np.repeat(np.arange(len(centers)), n)
    return centers[lab] + rng.normal(0, sd, (len(lab), centers.shape[1])), lab


def test_knn_excludes_self() -> None:
    nbrs = knn_indices(LINE, 2)
    np.testing.assert_array_equal(nbrs, [[1, 2], [0, 2], [3, 1], [2, 1]])
    assert knn_indices(LINE, 10).shape == (4, 3)  # k capped at n - 1


def test_ilisi_hand_case() -> None:
    # k = 3 on 4 cells: every cell sees the 3 others, 1 of its batch and 2 of the other.
    # Simpson = (1/3)^2 + (2/3)^2 = 5/9 -> LISI 9/5 -> (9/5 - 1) / (2 - 1) = 0.8
    assert ilisi(LINE, ["a", "b", "a", "b"], k=3) == pytest.approx(0.8)
    # k = 1: each cell's single neighbour -> LISI 1 for all -> 0
    assert ilisi(LINE, ["a", "a", "b", "b"], k=1) == pytest.approx(0.0)


def test_ilisi_separated_and_mixed() -> None:
    x, lab = _blobs(150, np.array([[0.0, 0.0], [50.0, 0.0]]), 1.0, seed=0)
    assert ilisi(x, lab, k=30) == 0.0  # each batch its own blob
    rng = np.random.default_rng(1)
    mixed = rng.integers(0, 2, len(x))  # batches assigned at random within the blobs
    assert ilisi(x, mixed, k=30) > 0.85
    # three batches, mixed: scaled by n_batches - 1, still near 1
    assert ilisi(x, rng.integers(0, 3, len(x)), k=30) > 0.8


def test_ilisi_needs_two_batches() -> None:
    with pytest.raises(ValueError, match="two batches"):
        ilisi(LINE, ["a"] * 4)
    with pytest.raises(ValueError, match="missing"):
        ilisi(LINE, ["a", None, "b", "b"])


def test_celltype_asw_hand_case() -> None:
    expected = (LINE_S.mean() + 1) / 2
    assert celltype_asw(LINE, ["t1", "t1", "t2", "t2"]) == pytest.approx(expected)
    np.testing.assert_allclose(silhouette_samples(LINE, [0, 0, 1, 1]), LINE_S)
    x, lab = _blobs(40, np.array([[0.0, 0.0], [3.0, 1.0], [0.0, 4.0]]), 1.0, seed=2)
    assert celltype_asw(x, lab) == pytest.approx((silhouette_score(x, lab) + 1) / 2)


def test_batch_asw_hand_case() -> None:
    # one cell type, batches split as {0, 1} | {4, 6}: 1 - |s| averaged
    one_type = ["T"] * 4
    assert batch_asw(LINE, [0, 0, 1, 1], one_type) == pytest.approx(1 - LINE_S.mean())
    # a second type holding a single batch is skipped (scib); a mirrored copy of the
    # first type averages to the same value
    x = np.vstack([LINE, LINE + 100, [[200.0], [201.0]]])
    batch = [0, 0, 1, 1, 1, 1, 0, 0, 0, 0]
    types = ["T"] * 4 + ["B"] * 4 + ["M"] * 2
    assert batch_asw(x, batch, types) == pytest.approx(1 - LINE_S.mean())


def test_batch_asw_separated_vs_mixed() -> None:
    # two cell types far apart; within each, batches either offset or interleaved
    rng = np.random.default_rng(3)
    types = np.repeat([0, 1], 200)
    base = np.where(types[:, None] == 0, 0.0, 100.0) + rng.normal(0, 1, (400, 5))
    batch = np.tile(np.repeat([0, 1], 100), 2)
    split = base + np.where(batch[:, None] == 1, 20.0, 0.0)
    assert batch_asw(split, batch, types) < 0.15
    assert batch_asw(base, batch, types) > 0.9


def test_nmi_ari() -> None:
    x, lab = _blobs(50, np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]]), 1.0, seed=4)
    assert nmi_ari(x, lab, seed=0) == pytest.approx((1.0, 1.0))
    shuffled = np.random.default_rng(5).permutation(lab)
    nmi, ari = nmi_ari(x, shuffled, seed=0)
    assert nmi < 0.1 and abs(ari) < 0.1


def test_leiden_clusters_separated_blobs() -> None:
    x, lab = _blobs(60, np.array([[0.0, 0.0], [30.0, 0.0]]), 1.0, seed=6)
    cl = leiden_clusters(x, k=10, resolution=0.1, seed=0)
    assert len(np.unique(cl)) == 2
    assert pd.crosstab(cl, lab).to_numpy().max(axis=0).tolist() == [60, 60]
    np.testing.assert_array_equal(cl, leiden_clusters(x, k=10, resolution=0.1, seed=0))


def _adata(n_per: int = 100, seed: int = 0) -> ad.AnnData:
    """Three cell types x two batches; PCA-like space has a batch shift, the 'corrected' has none."""
    rng = np.random.default_rng(seed)
    types = np.repeat(np.arange(3), 2 * n_per)
    batch = np.tile(np.repeat([0, 1], n_per), 3)
    centers = np.array([[0.0, 0, 0, 0], [10, 0, 0, 0], [0, 10, 0, 0]])
    corrected = centers[types] + rng.normal(0, 1, (len(types), 4))
    shifted = corrected + np.where(batch[:, None] == 1, [0, 0, 4.0, 0], 0.0)
    obs = pd.DataFrame(
        {"sample": [f"s{b}" for b in batch], "cell_type": [f"t{t}" for t in types]},
        index=[f"c{i}" for i in range(len(types))],
    )
    a = ad.AnnData(obs=obs)
    a.obsm["X_pca"] = shifted.astype(np.float32)
    a.obsm["X_scVI"] = corrected.astype(np.float32)
    return a


def test_integration_metrics_with_labels() -> None:
    a = _adata()
    df = integration_metrics(a, batch_key="sample", label_key="cell_type", seed=0)
    assert list(df.columns) == ["representation", "metric", "value", "kind", "n_cells", "note"]
    v = df.pivot(index="metric", columns="representation", values="value")
    assert set(v.index) == {"ilisi", "batch_asw", "celltype_asw", "nmi", "ari"}
    assert v.loc["ilisi", "X_scVI"] > v.loc["ilisi", "X_pca"] + 0.3
    assert v.loc["batch_asw", "X_scVI"] > v.loc["batch_asw", "X_pca"]
    assert v.loc["nmi", "X_scVI"] == pytest.approx(1.0)
    kinds = df.drop_duplicates("metric").set_index("metric")["kind"]
    assert kinds["ilisi"] == kinds["batch_asw"] == "batch_mixing"
    assert kinds["nmi"] == kinds["celltype_asw"] == "bio_conservation"
    assert df["value"].between(0, 1).all()


def test_integration_metrics_without_labels() -> None:
    a = _adata()
    df = integration_metrics(a, batch_key="sample", seed=0)
    rows = set(zip(df["representation"], df["metric"], strict=True))
    assert rows == {
        ("X_pca", "ilisi"),
        ("X_pca", "batch_asw"),
        ("X_scVI", "ilisi"),
        ("X_scVI", "batch_asw"),
        ("X_scVI", "cluster_agreement_nmi"),
        ("X_scVI", "cluster_agreement_ari"),
    }
    assert df["note"].str.len().gt(0).all()
    assert (
        df.loc[df["metric"] == "batch_asw", "note"].str.contains("Leiden clusters of X_pca").all()
    )


def test_integration_metrics_subsample_and_errors() -> None:
    a = _adata()
    df = integration_metrics(a, batch_key="sample", label_key="cell_type", max_cells=150, seed=1)
    assert (df["n_cells"] == 150).all()
    again = integration_metrics(a, batch_key="sample", label_key="cell_type", max_cells=150, seed=1)
    pd.testing.assert_frame_equal(df, again)
    one_batch = a.copy()
    one_batch.obs["sample"] = "s0"
    df1 = integration_metrics(one_batch, batch_key="sample", label_key="cell_type")
    assert not df1["kind"].eq("batch_mixing").any()
    with pytest.raises(KeyError, match="X_umap"):
        integration_metrics(a, batch_key="sample", reps=("X_umap",))
    with pytest.raises(KeyError, match="'lane'"):
        integration_metrics(a, batch_key="lane")
