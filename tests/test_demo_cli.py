"""`immuneage demo`: the README's main command, at the ci size."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import anndata as ad
import pandas as pd

from pipeline.stages import stage_names


def test_demo_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "pipeline.cli", "demo", "--size", "ci", "--outdir", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"outputs in {out / 'results'}" in r.stdout
    assert str(out / "cohort" / "samplesheet.csv") in r.stdout
    res = out / "results"
    a = ad.read_h5ad(res / "preprocess" / "preprocess.h5ad")
    truth = json.loads((out / "cohort" / "truth.json").read_text())
    sheet = pd.read_csv(out / "cohort" / "samplesheet.csv")
    assert set(a.obs["sample"]) == set(sheet["sample"])
    assert list(a.obs["timepoint"].cat.categories) == ["baseline", "acute", "longterm"]
    assert a.n_obs > 0.7 * truth["n_cells"]
    assert "X_pca" in a.obsm and "counts" in a.layers
    qc = pd.read_csv(res / "tables" / "qc_per_sample.tsv", sep="\t")
    assert len(qc) == 39 and (qc["cells_out"] <= qc["cells_in"]).all()
    prov = json.loads((res / "provenance.json").read_text())
    assert set(prov["stages"]) == set(stage_names())
    # the final AnnData follows scverse conventions
    final = ad.read_h5ad(res / "immuneage.h5ad")
    assert {"X_scVI", "X_umap", "signature_scores"} <= set(final.obsm)
    assert "counts" in final.layers
    assert final.obs["cell_type"].nunique() >= 10
    assert {"score_tbk1_sting", "score_ifn_type1", "score_nfkb_inflammation"} <= set(final.obs)
    assert "signatures" in final.uns["immuneage"]
    assert prov["device"]["resolved"] == "cpu"
    # the covariate analysis ran on the demo's plasma betaine
    cov = pd.read_csv(res / "tables" / "covariate_associations.tsv", sep="\t")
    assert set(cov["covariate"]) == {"plasma_betaine_um"}
    # the run ends by printing the report's path
    report = res / "report.html"
    assert r.stdout.strip().splitlines()[-1] == f"report: {report}"
    assert report.stat().st_size > 100_000
    if shutil.which("chromium"):
        from test_report_browser import check_report_in_browser

        record = check_report_in_browser(report, tmp_path)
        assert record
    # second call reuses the cohort and skips every stage
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr
    assert "reusing the demo cohort" in r2.stderr
    assert r2.stdout.count("up to date") == len(stage_names())
