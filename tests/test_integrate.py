"""Integrate stage: real scVI training on the demo ``ci`` cohort (CPU, a few epochs).

One module-scoped fixture runs the real pipeline (ingest, qc, preprocess) on the
demo cohort and one trains scVI on it (20 epochs, ~15 s on 2 cores); the other
tests use tiny subsets.

What the demo gives (seed 0, 20 epochs, 2,843 cells after QC, 39 samples; true
cell types, doublets left out): iLISI on samples PCA 0.31 vs scVI 0.37 (a
perfect random mix of the 39 samples scores ~0.43 with k = 30, see
pipeline.stats.integration); cell-type ASW 0.65 vs 0.86; NMI 0.95 vs 0.94; ARI
0.88 vs 0.82. Batch ASW goes the other way (PCA 0.93, scVI 0.80): silhouettes
in the 50-d PCA are squeezed towards 0 (1 - |s| near 1) by its noisy
dimensions, and the demo's per-sample effects are mild, so PCA is already
fairly mixed. The bars below leave margin around these values.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import keys
from pipeline.config import Config, demo_config, load_config
from pipeline.errors import ImmuneageWarning, InputError
from pipeline.stages.integrate import check_integrate_inputs, run_integrate, scvi_accelerator
from pipeline.stats.integration import integration_metrics

pytestmark = pytest.mark.slow

EPOCHS = 20


def _cfg(**integrate: object) -> Config:
    base = demo_config().model_dump(mode="json")
    base["integrate"].update(integrate)
    return load_config(None, base)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The demo ci cohort through preprocess: (AnnData, true cell type per cell)."""
    from pipeline.artifacts import read_h5ad_artifact
    from pipeline.datasets import demo_cohort
    from pipeline.runner import Runner

    root = tmp_path_factory.mktemp("integrate_demo")
    cohort = demo_cohort(root / "demo", size="ci")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Runner(cohort.samplesheet, demo_config(), root / "out").run(until="preprocess")
    adata = read_h5ad_artifact(root / "out" / "preprocess" / "preprocess.h5ad")
    # a sheet column, as the runner joins it for integrate when the config names it
    sheet = pd.read_csv(cohort.samplesheet).set_index("sample")
    adata.obs["batch"] = pd.Categorical(adata.obs["sample"].astype(str).map(sheet["batch"]))
    truth = pd.read_csv(cohort.truth_cells, sep="\t")
    truth.index = truth["sample"] + ":" + truth["barcode"]
    truth = truth.loc[adata.obs_names]
    return adata, truth


@pytest.fixture(scope="module")
def trained(demo: tuple) -> object:
    adata, _ = demo
    return run_integrate(adata, _cfg(max_epochs=EPOCHS), device="cpu")


@pytest.fixture
def tiny(demo: tuple):
    adata, _ = demo
    idx = np.sort(np.random.default_rng(0).choice(adata.n_obs, 300, replace=False))
    return adata[idx].copy()


TINY = {"max_epochs": 2, "n_hidden": 16, "n_latent": 4, "n_layers": 1}


def test_outputs(demo: tuple, trained, tmp_path: Path) -> None:
    from pipeline.artifacts import read_h5ad_artifact, write_h5ad_atomic

    adata, _ = demo
    out = trained.adata
    assert keys.X_SCVI not in adata.obsm  # the input is not modified
    assert out.shape == adata.shape
    assert (out.X != adata.X).nnz == 0
    z = out.obsm[keys.X_SCVI]
    assert z.dtype == np.float32
    assert z.shape == (adata.n_obs, 30)
    assert np.isfinite(z).all()
    info = out.uns[keys.UNS]["integrate"]
    assert info["accelerator"] == "cpu"
    assert info["epochs_trained"] == EPOCHS
    assert info["n_hvg"] == int(adata.var["highly_variable"].sum())
    assert info["batch_key"] == "sample"
    assert info["n_batches"] == adata.obs["sample"].nunique()
    assert np.isfinite(info["elbo_train"]) and np.isfinite(info["elbo_validation"])

    hist = trained.tables["scvi_history"]
    assert list(hist["epoch"]) == list(range(EPOCHS))
    for col in ("elbo_train", "elbo_validation", "reconstruction_loss_train", "kl_local_train"):
        assert hist[col].notna().all(), col
    assert hist["elbo_train"].iloc[-1] < hist["elbo_train"].iloc[0]
    assert hist["elbo_validation"].iloc[-1] == pytest.approx(info["elbo_validation"])

    met = trained.tables["integration_metrics"]
    assert set(met.columns) >= {"representation", "metric", "value", "kind", "note"}
    assert set(met["metric"]) == {
        "ilisi",
        "batch_asw",
        "cluster_agreement_nmi",
        "cluster_agreement_ari",
    }
    assert met["value"].between(0, 1).all()
    assert set(met["kind"]) == {"batch_mixing", "bio_conservation"}

    # the h5ad round trip the runner does
    write_h5ad_atomic(tmp_path / "integrate.h5ad", out)
    back = read_h5ad_artifact(tmp_path / "integrate.h5ad")
    np.testing.assert_array_equal(back.obsm[keys.X_SCVI], z)
    assert back.uns[keys.UNS]["integrate"]["epochs_trained"] == EPOCHS


def test_saved_model_reloads(demo: tuple, trained, tmp_path: Path) -> None:
    import scvi

    adata, _ = demo
    target = tmp_path / "scvi_model"
    target.mkdir()  # the runner hands the writer an existing, empty directory
    trained.dirs["scvi_model"](target)
    assert (target / "model.pt").is_file()
    hv = adata.var["highly_variable"].to_numpy(bool)
    sub = adata[:, hv].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.SCVI.load(str(target), adata=sub, accelerator="cpu")
    z = model.get_latent_representation()
    np.testing.assert_allclose(z, trained.adata.obsm[keys.X_SCVI], rtol=1e-5, atol=1e-5)


def test_scvi_mixes_samples_and_keeps_cell_types(demo: tuple, trained) -> None:
    _, truth = demo
    out = trained.adata.copy()
    out.obs["true_cell_type"] = truth["cell_type"].to_numpy()
    singlets = out[~truth["is_doublet"].to_numpy(bool)].copy()
    met = integration_metrics(
        singlets, batch_key="sample", label_key="true_cell_type", max_cells=10_000, seed=0
    )
    v = met.pivot(index="metric", columns="representation", values="value")
    print(v.round(3))  # shown with -s; the values are quoted in the module docstring
    print(trained.tables["integration_metrics"][["representation", "metric", "value"]])
    # better sample mixing ...
    assert v.loc["ilisi", "X_scVI"] >= v.loc["ilisi", "X_pca"] + 0.02
    # ... without merging cell types
    assert v.loc["nmi", "X_scVI"] >= 0.9 * v.loc["nmi", "X_pca"]
    assert v.loc["nmi", "X_scVI"] >= 0.8
    assert v.loc["ari", "X_scVI"] >= 0.7
    assert v.loc["celltype_asw", "X_scVI"] >= v.loc["celltype_asw", "X_pca"] - 0.05


def test_same_seed_same_latent_on_cpu(tiny) -> None:
    cfg = _cfg(**TINY)
    a = run_integrate(tiny, cfg, device="cpu").adata.obsm[keys.X_SCVI]
    b = run_integrate(tiny, cfg, device="cpu").adata.obsm[keys.X_SCVI]
    np.testing.assert_array_equal(a, b)
    other = load_config(None, {**cfg.model_dump(mode="json"), "seed": 1})
    c = run_integrate(tiny, other, device="cpu").adata.obsm[keys.X_SCVI]
    assert not np.allclose(a, c)


def test_missing_batch_column_is_an_input_error(tiny) -> None:
    with pytest.raises(InputError, match=r"'sequencing_run'.*columns are: sample, donor"):
        run_integrate(tiny, _cfg(batch_key="sequencing_run", **TINY), device="cpu")
    with pytest.raises(InputError, match=r"categorical_covariates.*'lane'"):
        run_integrate(tiny, _cfg(categorical_covariates=["lane"], **TINY), device="cpu")


def test_bad_covariate_values(tiny) -> None:
    bad = tiny.copy()
    bad.obs["run_date"] = "2024-01-01"
    with pytest.raises(InputError, match="numeric and finite"):
        check_integrate_inputs(bad, _cfg(continuous_covariates=["run_date"]).integrate)
    bad.obs["lane"] = pd.Series(["L1"] * bad.n_obs, index=bad.obs_names, dtype=object)
    bad.obs.iloc[0, bad.obs.columns.get_loc("lane")] = None
    with pytest.raises(InputError, match="1 cells without a value"):
        check_integrate_inputs(bad, _cfg(categorical_covariates=["lane"]).integrate)


def test_donor_batch_key_warns_and_covariates_train(tiny) -> None:
    cfg = _cfg(
        batch_key="donor",
        categorical_covariates=["batch"],
        continuous_covariates=["pct_counts_mt"],
        **TINY,
    )
    with pytest.warns(ImmuneageWarning, match="donor-level biology"):
        res = run_integrate(tiny, cfg, device="cpu")
    info = res.adata.uns[keys.UNS]["integrate"]
    assert info["batch_key"] == "donor"
    assert info["categorical_covariates"] == "batch"
    assert info["continuous_covariates"] == "pct_counts_mt"
    assert res.adata.obsm[keys.X_SCVI].shape == (tiny.n_obs, 4)


def test_quiet_training(tiny, capfd: pytest.CaptureFixture[str]) -> None:
    run_integrate(tiny, _cfg(early_stopping_patience=1, **TINY), device="cpu")
    captured = capfd.readouterr()
    assert captured.out == ""
    assert "GPU available" not in captured.err
    assert "Epoch" not in captured.err


def test_accelerator_mapping() -> None:
    import torch

    assert scvi_accelerator(torch.device("cpu")) == ("cpu", 1)
    assert scvi_accelerator("cuda") == ("gpu", 1)
    assert scvi_accelerator(torch.device("cuda", 1)) == ("gpu", [1])


def test_context_reuses_the_model_when_only_metrics_keys_change(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the runner's context: same training key -> no training, same files and latent."""
    import shutil

    import pipeline.stages.integrate as stage
    from pipeline.artifacts import write_h5ad_atomic
    from pipeline.stages import StageContext

    stage_dir = tmp_path / "integrate"
    stage_dir.mkdir()

    def context(previous: dict) -> StageContext:
        return StageContext(
            tmp_path, {}, stage_dir=stage_dir, inputs={"preprocess": "d1"}, previous=previous
        )

    def write(res, target: Path = stage_dir / "scvi_model") -> dict[str, bytes]:
        """As the runner does: the artifact, then the model directory."""
        write_h5ad_atomic(stage_dir / "integrate.h5ad", res.adata)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        res.dirs["scvi_model"](target)
        return {p.name: p.read_bytes() for p in sorted(target.iterdir())}

    first = run_integrate(tiny, _cfg(**TINY), device="cpu", context=context({}))
    assert first.provenance["model"] == "trained"
    key = first.provenance["training_key"]
    assert first.adata.uns[keys.UNS]["integrate"]["training_key"] == key
    files = write(first)

    monkeypatch.setattr(stage, "train_scvi", lambda *a, **k: pytest.fail("trained again"))
    metrics_only = _cfg(metrics_max_cells=150, **TINY)
    second = run_integrate(tiny, metrics_only, device="cpu", context=context(first.provenance))
    assert second.provenance == {"model": "reused", "training_key": key}
    np.testing.assert_array_equal(second.adata.obsm[keys.X_SCVI], first.adata.obsm[keys.X_SCVI])
    assert second.adata.uns[keys.UNS]["integrate"] == first.adata.uns[keys.UNS]["integrate"]
    pd.testing.assert_frame_equal(second.tables["scvi_history"], first.tables["scvi_history"])
    assert write(second, tmp_path / "again") == files  # the model files, byte for byte

    # what training depends on: other upstream inputs, seed or a training key -> train
    assert stage.training_key(metrics_only, {"preprocess": "d1"}, accelerator="cpu") == key
    assert stage.training_key(metrics_only, {"preprocess": "d2"}, accelerator="cpu") != key
    assert stage.training_key(metrics_only, {"preprocess": "d1"}, accelerator="gpu") != key
    for changed in (_cfg(**{**TINY, "n_latent": 3}), _cfg(learning_rate=0.01, **TINY)):
        assert stage.training_key(changed, {"preprocess": "d1"}, accelerator="cpu") != key

    # an artifact another training wrote (a run killed before its stamp) is not reused
    tampered = first.adata.copy()
    tampered.uns[keys.UNS]["integrate"]["training_key"] = "another"
    write_h5ad_atomic(stage_dir / "integrate.h5ad", tampered)
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        run_integrate(tiny, metrics_only, device="cpu", context=context(first.provenance))
