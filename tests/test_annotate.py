"""The annotate stage on the real pipeline's output for the ci demo, judged against planted truth."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import balanced_accuracy_score, recall_score

from pipeline.artifacts import read_h5ad_artifact, write_h5ad_atomic
from pipeline.config import load_config
from pipeline.datasets import demo_cohort
from pipeline.errors import ImmuneageWarning, InputError
from pipeline.markers import load_marker_panel
from pipeline.runner import Runner
from pipeline.stages.annotate import (
    MIN_TYPE_CELLS,
    UNASSIGNED,
    _finalise,
    cell_type_counts,
    majority_vote,
    run_annotate,
    score_cell_types,
)
from pipeline.stages.cluster import run_cluster

pytestmark = pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")

CPU = torch.device("cpu")
#: Minimum balanced accuracy against the planted truth on the ci demo.
MIN_BALANCED_ACCURACY = 0.9


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ad.AnnData, pd.DataFrame]:
    """The ci demo through ingest..preprocess (real runner), then clustered on the PCA."""
    root = tmp_path_factory.mktemp("annotate_demo")
    demo = demo_cohort(root / "demo", size="ci")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Runner(demo.samplesheet, load_config(None), root / "out").run(until="preprocess")
    a = read_h5ad_artifact(root / "out" / "preprocess" / "preprocess.h5ad")
    a = run_cluster(a, load_config(None), device=CPU)
    truth = pd.read_csv(demo.truth_cells, sep="\t")
    truth.index = truth["sample"] + ":" + truth["barcode"]
    return a, truth


def _annotate(a: ad.AnnData, **annotate) -> tuple[ad.AnnData, object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run_annotate(a.copy(), load_config(None, {"annotate": annotate}), device=CPU)
    msgs = [str(w.message) for w in caught if issubclass(w.category, ImmuneageWarning)]
    return res.adata, res, msgs


def _truth_and_pred(out: ad.AnnData, truth: pd.DataFrame, column: str = "cell_type"):
    """Singlet, good-quality cells: demo truth vs prediction collapsed to the demo's names."""
    tr = truth.loc[out.obs_names]
    keep = ~(tr["is_doublet"].astype(bool) | tr["is_low_quality"].astype(bool)).to_numpy()
    panel = load_marker_panel()
    pred = np.asarray(panel.collapse(out.obs[column].astype(str)))[keep]
    return tr["cell_type"].to_numpy()[keep], pred


@pytest.fixture(scope="module")
def annotated(demo_run):
    a, _ = demo_run
    return _annotate(a)


def test_balanced_accuracy_against_planted_truth(demo_run, annotated) -> None:
    _, truth = demo_run
    out, _, _ = annotated
    y, pred = _truth_and_pred(out, truth)
    bacc = balanced_accuracy_score(y, pred)
    labels = sorted(set(y))
    recall = dict(zip(labels, recall_score(y, pred, labels=labels, average=None), strict=True))
    print(f"balanced accuracy {bacc:.4f}; recall {recall}")
    assert bacc >= MIN_BALANCED_ACCURACY
    assert min(recall.values()) >= 0.9, recall
    assert np.mean(pred == UNASSIGNED) < 0.05
    # rare types survive the vote (pDC ~0.6%, Platelet ~1% of cells)
    assert recall["pDC"] >= 0.9 and recall["Platelet"] >= 0.9


def test_output_keys_and_tables(annotated, tmp_path: Path) -> None:
    out, res, msgs = annotated
    panel = load_marker_panel()
    info = out.uns["immuneage"]["annotate"]
    # the demo does not simulate MAIT, gdT, plasmablasts or cDC1: reported, never assigned
    assert set(info["not_annotatable"]) == {"MAIT", "gdT", "Plasmablast", "cDC1"}
    assert len(msgs) == 1 and "MAIT" in msgs[0] and "marker_coverage" in msgs[0]
    ct = out.obs["cell_type"]
    assert ct.dtype.name == "category" and UNASSIGNED in ct.cat.categories
    assert not set(ct.cat.categories) & set(info["not_annotatable"])
    assert out.obs["cell_type_cell_level"].dtype.name == "category"
    conf = out.obs["cell_type_confidence"].to_numpy()
    assert ((conf >= 0) & (conf <= 1)).all()
    assert (conf[(ct == UNASSIGNED).to_numpy()] < 0.5).all()
    assert (conf[(ct != UNASSIGNED).to_numpy()] >= 0.5).all()
    coarse = out.obs["cell_type_coarse"].astype(str)
    expect = [panel.lineage_of(t) or UNASSIGNED for t in ct.astype(str)]
    assert (coarse.to_numpy() == np.asarray(expect)).all()
    scores = out.obsm["cell_type_scores"]
    assert isinstance(scores, pd.DataFrame) and scores.shape == (out.n_obs, 14)
    assert list(scores.index) == list(out.obs_names)

    cov = res.tables["marker_coverage"]
    assert list(cov.columns[:5]) == ["cell_type", "lineage", "n_markers", "n_present", "n_positive"]
    assert "missing" in cov.columns and len(cov) == len(panel.names)
    mait = cov.set_index("cell_type").loc["MAIT"]
    assert "SLC4A10" in mait["missing"] and not mait["annotatable"]

    counts = res.tables["cell_type_counts"]
    assert list(counts.columns) == ["sample", "donor", "timepoint", "cell_type", "n_cells"]
    assert counts["n_cells"].sum() == out.n_obs
    # every annotatable type is listed, zeros kept, also a type no cell has
    assert len(counts) == out.obs["sample"].nunique() * (scores.shape[1] + 1)
    assert set(counts["cell_type"]) == {*scores.columns, UNASSIGNED}
    assert set(info["n_cells"]) == {*scores.columns, UNASSIGNED}
    # the label columns hold only the categories some cell has, each of >= MIN_TYPE_CELLS
    for col in ("cell_type", "cell_type_coarse", "cell_type_cell_level"):
        assert (out.obs[col].value_counts() > 0).all(), col
    sizes = ct.value_counts()
    assert (sizes.drop(UNASSIGNED, errors="ignore") >= MIN_TYPE_CELLS).all()
    assert isinstance(info["too_few_cells"], dict)
    per_sample = counts.groupby("sample")["n_cells"].sum()
    assert (per_sample == out.obs["sample"].value_counts().reindex(per_sample.index)).all()
    votes = res.tables["cell_type_clusters"]
    assert votes["n_cells"].sum() == out.n_obs
    assert ((votes["agreement"] > 0) & (votes["agreement"] <= 1)).all()

    # the artifact round-trips through the runner's writer
    write_h5ad_atomic(tmp_path / "a.h5ad", out)
    back = read_h5ad_artifact(tmp_path / "a.h5ad")
    assert (back.obs["cell_type"] == out.obs["cell_type"]).all()
    assert back.uns["immuneage"]["annotate"]["panel_version"] == panel.version
    pd.testing.assert_frame_equal(back.obsm["cell_type_scores"], scores)


def test_scores_equal_dense_z_score_means(demo_run) -> None:
    """The one sparse product equals mean(z of positives) - mean(z of negatives)."""
    a, _ = demo_run
    panel = load_marker_panel()
    res = score_cell_types(a, panel)
    sub = a[:300]
    for name in ("CD4 naive T", "Treg", "NK CD56bright", "Platelet"):
        want = np.zeros(sub.n_obs)
        for sign, group in ((1, panel[name].positive), (-1, panel[name].negative)):
            genes = [m.gene for m in group if m.gene in a.var_names]
            if not genes:
                continue
            x = a[:, genes].X.toarray().astype(np.float64)
            z = (x - x.mean(0)) / x.std(0)
            want += sign * z[:300].mean(1)
        np.testing.assert_allclose(res.scores[name].to_numpy()[:300], want, rtol=1e-4, atol=1e-4)


def test_without_voting_the_cell_level_labels_are_final(demo_run) -> None:
    a, truth = demo_run
    out, res, _ = _annotate(a, majority_voting=False)
    final = out.obs["cell_type"].astype(str)
    cell_level = out.obs["cell_type_cell_level"].astype(str)
    rare = out.uns["immuneage"]["annotate"]["too_few_cells"]
    # the same labels, but for types too rare to keep (fewer than MIN_TYPE_CELLS cells)
    same = final == cell_level
    assert (same | ((final == UNASSIGNED) & cell_level.isin(list(rare)))).all()
    assert {t: int((cell_level == t).sum()) for t in rare} == rare
    assert "cell_type_clusters" not in res.tables
    y, pred = _truth_and_pred(out, truth)
    assert balanced_accuracy_score(y, pred) >= 0.85
    assert out.uns["immuneage"]["annotate"]["cluster_key"] is None


def test_missing_markers_make_a_type_not_annotatable(demo_run) -> None:
    a, _ = demo_run
    treg = {m.gene for m in load_marker_panel()["Treg"].positive} - {"CD4"}
    kept = a[:, ~a.var_names.isin(treg)].copy()
    out, res, msgs = _annotate(kept)
    info = out.uns["immuneage"]["annotate"]
    assert "Treg" in info["not_annotatable"]
    assert "Treg" not in out.obs["cell_type"].cat.categories
    assert "Treg" not in out.obsm["cell_type_scores"].columns
    assert len(msgs) == 1 and "Treg" in msgs[0] and "FOXP3" in msgs[0]
    row = res.tables["marker_coverage"].set_index("cell_type").loc["Treg"]
    assert row["n_positive_present"] == 1 and "FOXP3" in row["missing"]
    assert not row["annotatable"]
    # Tregs fall to the closest annotatable type, CD4 memory T
    assert out.obs["cell_type"].isin(["CD4 memory T", "CD4 naive T", UNASSIGNED]).any()


def test_panel_with_nothing_annotatable_assigns_nobody(demo_run, tmp_path: Path) -> None:
    a, _ = demo_run
    p = tmp_path / "absent.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "cell_types": [
                    {
                        "name": "ghost",
                        "lineage": "x",
                        "positive": [{"gene": "NOTAGENE1", "source": "test"}],
                    }
                ],
            }
        )
    )
    out, _, msgs = _annotate(a[:200], markers=str(p))
    assert (out.obs["cell_type"] == UNASSIGNED).all()
    assert out.uns["immuneage"]["annotate"]["not_annotatable"] == ["ghost"]
    assert any("no cell type" in m for m in msgs)


def test_user_marker_file(demo_run, tmp_path: Path) -> None:
    a, truth = demo_run
    panel = {
        "version": "lab-2",
        "name": "coarse lab panel",
        "cell_types": [
            {
                "name": "T cell",
                "lineage": "T",
                "positive": [
                    {"gene": g, "source": "lab flow panel"} for g in ("CD3E", "CD3D", "CD2")
                ],
            },
            {
                "name": "B cell",
                "lineage": "B",
                "positive": [{"gene": g, "source": "lab flow panel"} for g in ("MS4A1", "CD79A")],
            },
            {
                "name": "Monocyte",
                "lineage": "myeloid",
                "positive": [{"gene": g, "source": "lab flow panel"} for g in ("LYZ", "CD14")],
            },
        ],
    }
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(panel))
    out, _, msgs = _annotate(a, markers=str(path))
    info = out.uns["immuneage"]["annotate"]
    assert info["panel"] == "coarse lab panel" and info["panel_version"] == "lab-2"
    assert info["panel_path"] == str(path) and not msgs
    assert set(out.obs["cell_type"].cat.categories) == {"T cell", "B cell", "Monocyte", UNASSIGNED}
    assert set(out.obs["cell_type_coarse"].cat.categories) == {"T", "B", "myeloid", UNASSIGNED}
    tr = truth.loc[out.obs_names, "cell_type"]
    b = out.obs["cell_type"][tr.isin(["B naive", "B memory"]).to_numpy()]
    assert (b == "B cell").mean() > 0.9


def test_bad_marker_file_is_an_input_error_naming_file_and_entry(demo_run, tmp_path: Path) -> None:
    a, _ = demo_run
    path = tmp_path / "bad.yaml"
    path.write_text(
        "version: 1\ncell_types:\n  - name: T\n    lineage: T\n    positive:\n      - {gene: CD3E}\n"
    )
    with pytest.raises(InputError, match=r"bad\.yaml.*cell type 'T'.*gene CD3E.*source"):
        run_annotate(a[:50].copy(), load_config(None, {"annotate": {"markers": str(path)}}))


def test_voting_needs_leiden(demo_run) -> None:
    a, _ = demo_run
    b = a[:50].copy()
    del b.obs["leiden"]
    with pytest.raises(InputError, match="leiden"):
        run_annotate(b, load_config(None))


def test_majority_vote_definition() -> None:
    types = ["A", "B", "C"]
    labels = np.array(["A", "A", "B", "C", "C", "B"])
    prob = np.array(
        [
            [0.9, 0.1, 0.0],
            [0.6, 0.4, 0.0],
            [0.2, 0.8, 0.0],
            [0.0, 0.1, 0.9],
            [0.1, 0.2, 0.7],
            [0.0, 0.6, 0.4],  # tie in cluster "1": C has 2 votes, B 1 ...
        ]
    )
    clusters = pd.Series(["0", "0", "0", "1", "1", "10"])
    final, conf, table = majority_vote(labels, prob, types, clusters)
    assert list(final) == ["A", "A", "A", "C", "C", "B"]
    np.testing.assert_allclose(conf[:3], np.sqrt(2 / 3 * prob[:3, 0]))
    np.testing.assert_allclose(conf[3:5], np.sqrt(prob[3:5, 2]))
    assert list(table["cluster"]) == ["0", "1", "10"]  # natural order
    assert table.loc[0, "second_cell_type"] == "B"
    assert table.loc[1, "second_cell_type"] == ""
    # a tie in votes goes to the larger summed probability
    final, _, _ = majority_vote(
        np.array(["A", "B"]), np.array([[0.6, 0.4, 0], [0.1, 0.9, 0]]), types, pd.Series(["x", "x"])
    )
    assert list(final) == ["B", "B"]


def test_a_type_of_one_cell_is_unassigned_and_unused_categories_dropped() -> None:
    panel = load_marker_panel()
    types = ["CD14 monocyte", "NK", "NK CD56bright", "B naive"]
    labels = np.array(["CD14 monocyte"] * 3 + ["NK"] * 2 + ["NK CD56bright"], dtype=object)
    conf = np.array([0.9, 0.9, 0.2, 0.8, 0.9, 0.95])
    a = ad.AnnData(
        np.zeros((6, 1), np.float32),
        obs=pd.DataFrame({"sample": pd.Categorical(["s1"] * 3 + ["s2"] * 3)}, index=list("abcdef")),
    )
    vote, rare = _finalise(a, panel, types, labels, conf, np.zeros((6, 4)), None, 0.5)
    assert vote is None and rare == {"NK CD56bright": 1}
    ct = a.obs["cell_type"]
    assert list(ct.astype(str)) == [*["CD14 monocyte"] * 2, UNASSIGNED, "NK", "NK", UNASSIGNED]
    # panel order, only the labels some cell has ('B naive' and the singleton dropped)
    assert list(ct.cat.categories) == ["CD14 monocyte", "NK", UNASSIGNED]
    assert list(a.obs["cell_type_coarse"].cat.categories) == [
        panel.lineage_of("CD14 monocyte"),
        panel.lineage_of("NK"),
        UNASSIGNED,
    ]
    # the per-cell label is the diagnostic before the vote: the singleton stays there
    assert list(a.obs["cell_type_cell_level"].cat.categories) == [
        "CD14 monocyte",
        "NK",
        "NK CD56bright",
        UNASSIGNED,
    ]
    assert a.obs["cell_type_confidence"].iloc[5] == pytest.approx(0.95)  # kept
    # the counts table still lists every type of the panel, zeros included
    counts = cell_type_counts(a, types=[*types, UNASSIGNED])
    assert len(counts) == 2 * 5
    assert counts.groupby("cell_type", observed=False)["n_cells"].sum().to_dict() == {
        "B naive": 0,
        "CD14 monocyte": 2,
        "NK": 2,
        "NK CD56bright": 0,
        UNASSIGNED: 2,
    }


def test_cell_type_counts_without_metadata() -> None:
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(["A", "A"], categories=["A", "B"])}, index=["c1", "c2"]
    )
    a = ad.AnnData(np.zeros((2, 1), dtype=np.float32), obs=obs)
    out = cell_type_counts(a)
    assert list(out.columns) == ["sample", "cell_type", "n_cells"]
    assert out["n_cells"].tolist() == [2, 0]


def test_celltypist_errors(demo_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = demo_run
    missing = tmp_path / "model.pkl"
    cfg = load_config(None, {"annotate": {"celltypist_model": str(missing)}})
    with pytest.raises(InputError, match=r"model\.pkl does not exist"):
        run_annotate(a[:50].copy(), cfg)
    missing.write_bytes(b"not a model")
    monkeypatch.setitem(sys.modules, "celltypist", None)
    with pytest.raises(InputError, match=r"celltypist is not installed.*pip install celltypist"):
        run_annotate(a[:50].copy(), cfg)


def test_celltypist_model(demo_run, tmp_path: Path) -> None:
    celltypist = pytest.importorskip("celltypist")
    a, truth = demo_run
    # a tiny model trained offline on the demo's truth labels (300 HVGs): this tests the
    # plumbing (model file in, labels, voting, confidence out), not CellTypist's accuracy
    hv = a.var_names[a.var["highly_variable"].to_numpy(bool)][:300]
    train = a[:, hv].copy()
    labels = truth.loc[train.obs_names, "cell_type"].to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = celltypist.train(
            train,
            labels=labels,
            use_SGD=True,
            max_iter=20,
            feature_selection=False,
            check_expression=False,  # 300 of the genes: rows do not sum to 10,000
            n_jobs=1,
        )
    path = tmp_path / "tiny.pkl"
    model.write(str(path))
    out, res, _ = _annotate(a, celltypist_model=str(path))
    info = out.uns["immuneage"]["annotate"]
    assert info["method"] == "celltypist" and info["celltypist_model"] == str(path)
    assert "marker_coverage" not in res.tables and "cell_type_counts" in res.tables
    assert out.obsm["cell_type_scores"].shape[0] == out.n_obs
    coarse = dict(zip(out.obs["cell_type"], out.obs["cell_type_coarse"], strict=True))
    assert coarse.get("cDC") == "DC" and coarse.get("CD8 naive T") == "T_CD8"
    y, pred = _truth_and_pred(out, truth)
    assert np.mean(pred == UNASSIGNED) < 0.1
    assert balanced_accuracy_score(y, pred) >= MIN_BALANCED_ACCURACY
