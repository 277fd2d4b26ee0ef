"""Precise resume of integrate and cluster, and their progress lines, through the CLI.

One quiet run of the tiny cohort (9 samples, ~300 cells, scVI 2 epochs) through
annotate is copied for each test, which changes one config key and runs
``immuneage run`` again in this process (so a stage function can be replaced by
one that fails, proving it was not called):

- ``integrate.metrics_max_cells`` (metrics only): integrate re-runs without
  training; the model files and ``X_scVI`` are the previous ones, byte for byte;
  cluster reuses its graph and UMAP; annotate gives the same cell types;
- ``cluster.resolutions`` / ``cluster.resolution``: Leiden only (no neighbours,
  no UMAP); ``umap_min_dist``: Leiden and UMAP, not the graph;
- ``integrate.max_epochs`` (training): scVI trains again, with one plain progress
  line per epoch on a non-terminal (``IMMUNEAGE_PROGRESS_INTERVAL=0``), and
  neighbours / Leiden / UMAP step lines; ``--quiet`` shows none of them;
- a missing model directory: trained again.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import yaml
from conftest import SMALL_OVERRIDES, write_cohort

import pipeline.stages.integrate as integrate_stage
from pipeline.cli import main

pytestmark = pytest.mark.slow

REUSED_MODEL = (
    "integrate: reusing the scVI model trained by the previous run (training inputs unchanged)"
)
REUSED_GRAPH = "cluster: reusing the neighbour graph of the previous run"
REUSED_UMAP = "cluster: reusing the UMAP of the previous run"
#: Lightning's informational chatter that must not reach the terminal.
LIGHTNING_NOISE = ("GPU available", "TPU available", "HPU available", "LOCAL_RANK", "num_workers")


def _config(path: Path, **sections: dict[str, Any]) -> Path:
    cfg = json.loads(json.dumps(SMALL_OVERRIDES))
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(sheet: Path, config: Path, outdir: Path, *extra: str) -> tuple[int, str]:
    """``immuneage run`` in this process; returns (exit code, what it wrote to stderr)."""
    err = io.StringIO()
    argv = ["run", "--samplesheet", str(sheet), "--config", str(config), "--outdir", str(outdir)]
    with contextlib.redirect_stderr(err):
        rc = main([*argv, *extra])
    return rc, err.getvalue()


def _details(outdir: Path, stage: str) -> dict[str, Any]:
    prov = json.loads((outdir / "provenance.json").read_text())
    return prov["stages"][stage]


def _model_files(outdir: Path) -> dict[str, bytes]:
    root = outdir / "integrate" / "scvi_model"
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _fail(what: str) -> Any:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{what} was called, but should have been reused")

    return boom


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny cohort run quietly through annotate (in this process; stderr kept)."""
    root = tmp_path_factory.mktemp("resume_precise")
    sheet = write_cohort(root / "in")
    config = _config(root / "base.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMMUNEAGE_PROGRESS_INTERVAL", "0")
        rc, err = _run(sheet, config, root / "out", "--until", "annotate", "--quiet")
    assert rc == 0, err
    return {"root": root, "sheet": sheet, "out": root / "out", "stderr": err}


@pytest.fixture
def outdir(base: dict[str, Any], tmp_path: Path) -> Path:
    """A copy of the base run's output directory."""
    out = tmp_path / "out"
    shutil.copytree(base["out"], out, symlinks=True)
    return out


def _read(path: Path) -> ad.AnnData:
    from pipeline.artifacts import read_h5ad_artifact

    return read_h5ad_artifact(path)


def test_quiet_run_shows_no_progress_and_no_lightning_chatter(base: dict[str, Any]) -> None:
    err = base["stderr"]
    assert "scVI: epoch" not in err
    assert "cluster: neighbours" not in err
    for noise in LIGHTNING_NOISE:
        assert noise not in err, noise
    # the base run recorded what later runs compare against
    assert _details(base["out"], "integrate")["details"]["model"] == "trained"
    assert _details(base["out"], "cluster")["details"]["graph"] == "computed"


def test_metrics_only_change_reuses_the_scvi_model(
    base: dict[str, Any], outdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMMUNEAGE_PROGRESS_INTERVAL", "0")
    monkeypatch.setattr(integrate_stage, "train_scvi", _fail("scVI training"))
    monkeypatch.setattr(sc.pp, "neighbors", _fail("sc.pp.neighbors"))
    monkeypatch.setattr(sc.tl, "umap", _fail("sc.tl.umap"))
    before_model = _model_files(outdir)
    before_int = _read(outdir / "integrate" / "integrate.h5ad")
    before_ann = _read(outdir / "annotate" / "annotate.h5ad")
    config = _config(tmp_path / "metrics.yaml", integrate={"metrics_max_cells": 150})

    rc, err = _run(base["sheet"], config, outdir, "--until", "annotate")
    assert rc == 0, err
    assert REUSED_MODEL in err
    assert "scVI: epoch" not in err
    # integrate re-ran (its stamp covers the metrics key) without training
    integrate = _details(outdir, "integrate")
    assert integrate["status"] == "ran"
    assert integrate["details"]["model"] == "reused"
    assert (
        integrate["details"]["training_key"]
        == _details(base["out"], "integrate")["details"]["training_key"]
    )
    assert _model_files(outdir) == before_model
    after_int = _read(outdir / "integrate" / "integrate.h5ad")
    assert after_int.obsm["X_scVI"].dtype == np.float32
    np.testing.assert_array_equal(after_int.obsm["X_scVI"], before_int.obsm["X_scVI"])
    assert after_int.uns["immuneage"]["integrate"] == before_int.uns["immuneage"]["integrate"]
    metrics = pd.read_csv(outdir / "tables" / "integration_metrics.tsv", sep="\t")
    assert set(metrics["representation"]) == {"X_pca", "X_scVI"}
    history = pd.read_csv(outdir / "tables" / "scvi_history.tsv", sep="\t")
    assert len(history) == SMALL_OVERRIDES["integrate"]["max_epochs"]
    # downstream: cluster re-runs on the same latent, reusing graph and UMAP; same labels
    assert REUSED_GRAPH in err and REUSED_UMAP in err
    cluster = _details(outdir, "cluster")
    assert cluster["status"] == "ran"
    assert cluster["details"]["graph"] == cluster["details"]["umap"] == "reused"
    after_ann = _read(outdir / "annotate" / "annotate.h5ad")
    assert (after_ann.obs["leiden"] == before_ann.obs["leiden"]).all()
    assert (after_ann.obs["cell_type"] == before_ann.obs["cell_type"]).all()
    np.testing.assert_array_equal(after_ann.obsm["X_umap"], before_ann.obsm["X_umap"])


def test_resolution_change_recomputes_only_leiden(
    base: dict[str, Any], outdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(integrate_stage, "train_scvi", _fail("scVI training"))
    monkeypatch.setattr(sc.pp, "neighbors", _fail("sc.pp.neighbors"))
    monkeypatch.setattr(sc.tl, "umap", _fail("sc.tl.umap"))
    before = _read(outdir / "cluster" / "cluster.h5ad")
    config = _config(tmp_path / "res.yaml", cluster={"resolutions": [0.5, 1.0], "resolution": 0.5})

    rc, err = _run(base["sheet"], config, outdir, "--until", "cluster")
    assert rc == 0, err
    assert _details(outdir, "integrate")["status"] == "up to date"
    cluster = _details(outdir, "cluster")
    assert cluster["status"] == "ran"
    assert cluster["details"]["graph"] == cluster["details"]["umap"] == "reused"
    assert REUSED_GRAPH in err and REUSED_UMAP in err
    assert "cluster: Leiden (resolution 0.5" in err
    after = _read(outdir / "cluster" / "cluster.h5ad")
    for key in ("connectivities", "distances"):
        assert (after.obsp[key] != before.obsp[key]).nnz == 0
    np.testing.assert_array_equal(after.obsm["X_umap"], before.obsm["X_umap"])
    assert after.uns["neighbors"]["params"]["use_rep"] == "X_scVI"
    assert "umap" in after.uns
    # Leiden recomputed on the reused graph: the old resolution gives the old clusters
    assert (after.obs["leiden_1.0"] == before.obs["leiden_1.0"]).all()
    assert after.obs["leiden_0.5"].nunique() >= 1
    assert (after.obs["leiden"] == after.obs["leiden_0.5"]).all()
    assert after.uns["immuneage"]["cluster"]["resolution"] == 0.5


def test_umap_min_dist_change_keeps_the_graph(
    base: dict[str, Any], outdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sc.pp, "neighbors", _fail("sc.pp.neighbors"))
    before = _read(outdir / "cluster" / "cluster.h5ad")
    config = _config(tmp_path / "umap.yaml", cluster={"umap_min_dist": 0.1})

    rc, err = _run(base["sheet"], config, outdir, "--until", "cluster")
    assert rc == 0, err
    cluster = _details(outdir, "cluster")["details"]
    assert (cluster["graph"], cluster["umap"]) == ("reused", "computed")
    assert REUSED_GRAPH in err and REUSED_UMAP not in err
    after = _read(outdir / "cluster" / "cluster.h5ad")
    assert (after.obsp["connectivities"] != before.obsp["connectivities"]).nnz == 0
    assert not np.array_equal(after.obsm["X_umap"], before.obsm["X_umap"])


def test_training_key_change_retrains_with_progress_lines(
    base: dict[str, Any], outdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMMUNEAGE_PROGRESS_INTERVAL", "0")
    before_model = _model_files(outdir)
    config = _config(tmp_path / "epochs.yaml", integrate={"max_epochs": 3})

    rc, err = _run(base["sheet"], config, outdir, "--until", "cluster")
    assert rc == 0, err
    assert REUSED_MODEL not in err
    integrate = _details(outdir, "integrate")["details"]
    assert integrate["model"] == "trained"
    assert (
        integrate["training_key"] != _details(base["out"], "integrate")["details"]["training_key"]
    )
    assert _model_files(outdir) != before_model
    info = _read(outdir / "integrate" / "integrate.h5ad").uns["immuneage"]["integrate"]
    assert info["epochs_trained"] == 3
    # one plain line per epoch on a non-terminal (interval 0), nothing from Lightning
    lines = [ln for ln in err.splitlines() if "scVI: epoch" in ln]
    assert [ln.split("scVI: ")[1].split(" (")[0] for ln in lines] == [
        "epoch 1/3",
        "epoch 2/3",
        "epoch 3/3",
    ]
    assert "loss" in lines[0] and "elapsed" in lines[0] and "left" in lines[0]
    for noise in LIGHTNING_NOISE:
        assert noise not in err, noise
    # a new latent: cluster computes everything, with a start and an end line per step
    cluster = _details(outdir, "cluster")["details"]
    assert (cluster["graph"], cluster["umap"]) == ("computed", "computed")
    for step in ("cluster: neighbours (k=15,", "cluster: Leiden (resolution 1,", "cluster: UMAP ("):
        started = [ln for ln in err.splitlines() if step in ln]
        assert len(started) == 2 and "done in" in started[1], (step, started)


def test_missing_model_is_trained_again(base: dict[str, Any], outdir: Path, tmp_path: Path) -> None:
    shutil.rmtree(outdir / "integrate" / "scvi_model")
    config = _config(tmp_path / "metrics.yaml", integrate={"metrics_max_cells": 150})

    rc, err = _run(base["sheet"], config, outdir, "--until", "integrate", "--quiet")
    assert rc == 0, err
    assert _details(outdir, "integrate")["details"]["model"] == "trained"
    assert (outdir / "integrate" / "scvi_model" / "model.pt").is_file()
