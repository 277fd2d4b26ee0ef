"""Pre-flight (``immuneage validate`` and a run's own checks): what would stop a run mid-way
is refused before any stage runs, through the real CLI: exit 2, the culprit named, nothing
created. Each check here once let ``validate`` say OK and the run fail later."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import run_argv, write_cohort

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.datasets.real import write_real_cohort
from pipeline.errors import InputError
from pipeline.preflight import validate_inputs

UP_TO_QC = ("ingest", "qc")


def _validate(sheet: Path, config: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pipeline.cli", "validate", "--samplesheet", str(sheet)]
    return subprocess.run(
        [*argv, "--config", str(config)], capture_output=True, text=True, check=False
    )


def _refused(sheet: Path, *culprits: str, run: bool = False, tmp: Path | None = None) -> str:
    """``validate`` in a subprocess exits 2 naming every culprit; with ``run``, so does
    ``run``, and it creates nothing (the output directory does not exist afterwards)."""
    config = sheet.parent / "config.yaml"
    res = _validate(sheet, config)
    assert res.returncode == 2, res.stdout + res.stderr
    for c in culprits:
        assert c in res.stderr, res.stderr
    if run:
        assert tmp is not None
        out = tmp / "out"
        ran = subprocess.run(
            run_argv(sheet, out, config=config), capture_output=True, text=True, check=False
        )
        assert ran.returncode == 2, ran.stderr
        assert culprits[0] in ran.stderr, ran.stderr
        assert not out.exists()
    return res.stderr


def _validate_here(sheet: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """``pipeline.cli.main(["validate", ...])`` must pass; returns its stdout."""
    argv = ["validate", "--samplesheet", str(sheet), "--config", str(sheet.parent / "config.yaml")]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def _refused_here(sheet: Path, capsys: pytest.CaptureFixture[str], *culprits: str) -> str:
    """As :func:`_refused` without ``run``, through ``pipeline.cli.main`` in this process (faster)."""
    argv = ["validate", "--samplesheet", str(sheet), "--config", str(sheet.parent / "config.yaml")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    for c in culprits:
        assert c in err, err
    return err


def _config(root: Path, section: str, values: dict) -> None:
    p = root / "config.yaml"
    cfg = yaml.safe_load(p.read_text()) or {}
    cfg.setdefault(section, {}).update(values)
    p.write_text(yaml.safe_dump(cfg))


def _sheet(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "samplesheet.csv", dtype=str, keep_default_na=False)


def _save(root: Path, df: pd.DataFrame) -> None:
    df.to_csv(root / "samplesheet.csv", index=False)


# --------------------------------------------------------------------------- passes
def test_real_cohort_passes_validate(tmp_path):
    sheet = write_real_cohort(tmp_path / "in", cells_per_sample=60)
    (tmp_path / "in" / "config.yaml").write_text("{}\n")
    res = _validate(sheet, tmp_path / "in" / "config.yaml")
    assert res.returncode == 0, res.stderr
    assert "OK: 9 samples" in res.stdout


# --------------------------------------------------------------------------- design
def test_single_sample_refused_for_a_whole_run_passes_a_pilot(tmp_path):
    root = tmp_path / "in"
    sheet = write_cohort(root, n_cells=25)
    _save(root, _sheet(root).iloc[:1])
    err = _refused(
        sheet,
        "differential.min_donors is 3",
        "acute vs baseline: 0 donors",
        "--until score",
        "--qc-only",
        run=True,
        tmp=tmp_path,
    )
    assert "1 sample(s), 1 donor(s)" in err
    # a pilot that stops before the donor-level tests checks nothing about donors
    cfg = load_config(root / "config.yaml")
    report = validate_inputs(sheet, cfg, stages=UP_TO_QC)
    assert report.sheet.samples == ("D1_baseline",)
    with pytest.raises(InputError, match="min_donors"):
        validate_inputs(sheet, cfg, stages=("ingest", "qc", "differential"))


def test_short_contrast_is_a_warning_when_another_is_tested(tmp_path, capsys):
    root = tmp_path / "in"
    sheet = write_cohort(root, n_cells=25)
    _save(root, _sheet(root).query("sample != 'D3_longterm'"))
    out = _validate_here(sheet, capsys)
    assert "contrast longterm vs baseline has 2 donor(s)" in out
    assert "differential.min_donors = 3" in out


def test_covariate_columns_without_covariates_file(tmp_path, capsys):
    root = tmp_path / "in"
    sheet = write_cohort(root, n_cells=25)
    _config(root, "differential", {"covariate_columns": ["age"]})
    _refused_here(
        sheet, capsys, "differential.covariate_columns names 'age'", "differential.covariates"
    )


@pytest.mark.parametrize(
    ("covariates", "culprits"),
    [
        (None, ("absolute_total_column is 'pbmc_per_ul'", "differential.covariates")),
        ({"betaine": 1.0}, ("'pbmc_per_ul' is not a column", "betaine")),
        ({"pbmc_per_ul": 0.0}, ("pbmc_per_ul = 0 is not a positive number",)),
    ],
)
def test_absolute_totals_are_checked_before_compute(tmp_path, capsys, covariates, culprits):
    """Absolute abundance needs a positive total per sample from the covariates file: no
    file, no such column, or a total <= 0 stops validate (and a run) before anything runs."""
    root = tmp_path / "in"
    sheet = write_cohort(root, n_cells=25)
    values: dict = {"absolute_total_column": "pbmc_per_ul"}
    if covariates is not None:
        cov = _sheet(root)[["sample"]].assign(**covariates)
        cov.to_csv(root / "cov.csv", index=False)
        values["covariates"] = str(root / "cov.csv")
    _config(root, "differential", values)
    _refused_here(sheet, capsys, *culprits)


def test_absolute_totals_alone_are_not_covariates(tmp_path, capsys):
    """A covariates file holding only the totals passes: the totals column is not tested as
    a covariate, so no covariate association is attempted."""
    root = tmp_path / "in"
    sheet = write_cohort(root, n_cells=25)
    cov = _sheet(root)[["sample"]].assign(pbmc_per_ul=2500.0)
    cov.loc[0, "pbmc_per_ul"] = np.nan  # unknown: that sample leaves the absolute test only
    cov.to_csv(root / "cov.csv", index=False)
    _config(
        root,
        "differential",
        {"absolute_total_column": "pbmc_per_ul", "covariates": str(root / "cov.csv")},
    )
    _validate_here(sheet, capsys)
    cfg = load_config(root / "config.yaml")
    from pipeline.stages.differential.design import covariate_columns

    assert covariate_columns(cfg, root / "cov.csv") == []


# --------------------------------------------------------------------------- obs columns
def test_continuous_covariate_with_blanks(tmp_path):
    root = tmp_path / "in"
    sheet = write_cohort(root, n_cells=25)
    df = _sheet(root)
    df["bmi"] = [str(21.5 + i) for i in range(len(df))]
    df.loc[4, "bmi"] = ""
    _save(root, df)
    _config(root, "integrate", {"continuous_covariates": ["bmi"]})
    _refused(
        sheet,
        "integrate.continuous_covariates: column 'bmi'",
        "'D2_acute' (line 6)",
        run=True,
        tmp=tmp_path,
    )
    # a pilot run does not reach integrate
    validate_inputs(sheet, load_config(root / "config.yaml"), stages=UP_TO_QC)


@pytest.mark.parametrize(
    ("key", "value", "culprits"),
    [
        ("continuous_covariates", "obese", ("column 'bmi'", "must be numeric", "'obese'")),
        ("continuous_covariates", "inf", ("column 'bmi'", "must be finite", "'inf'")),
        ("categorical_covariates", "", ("categorical_covariates: column 'bmi'", "is blank")),
    ],
)
def test_covariate_values(tmp_path, capsys, key, value, culprits):
    root = tmp_path / "in"
    sheet = write_cohort(root, n_cells=25)
    df = _sheet(root)
    df["bmi"] = ["22"] * len(df)
    df.loc[2, "bmi"] = value
    _save(root, df)
    _config(root, "integrate", {key: ["bmi"]})
    _refused_here(sheet, capsys, *culprits, "'D1_longterm' (line 4)" if not value else "line 4")


def test_covariate_column_that_does_not_exist(tmp_path):
    root = tmp_path / "in"
    sheet = write_cohort(root, n_cells=25)
    _config(root, "integrate", {"categorical_covariates": ["chemistry"]})
    _refused(
        sheet,
        "integrate.categorical_covariates names column 'chemistry'",
        "extra columns are: age",
        run=True,
        tmp=tmp_path,
    )


def test_hvg_batch_key_that_does_not_exist(tmp_path, capsys):
    root = tmp_path / "in"
    sheet = write_cohort(root, n_cells=25)
    _config(root, "preprocess", {"hvg_batch_key": "lane"})
    _refused_here(sheet, capsys, "preprocess.hvg_batch_key names column 'lane'")


# --------------------------------------------------------------------------- genes
def test_custom_gene_set_too_small(tmp_path):
    root = tmp_path / "in"
    sheet = write_cohort(root, n_cells=25)
    small = {"custom": {"tiny": ["G1", "G2", "NOTAGENE"]}, "on_small_set": "error"}
    _config(root, "score", small)
    _refused(
        sheet,
        "score: gene set 'tiny' has 2 of its 3 genes in the counts files",
        "score.min_genes = 5",
        "NOTAGENE",
        run=True,
        tmp=tmp_path,
    )


def test_gene_sets_with_aliases_against_the_cohort_genes(tmp_path):
    """A built-in set matched through HGNC aliases, a set skipped (a warning), none left (an error)."""
    root = tmp_path / "in"
    sheet = write_real_cohort(root, cells_per_sample=40, donors=3, formats=("10x_h5",))
    cfg = load_config(None)
    cfg.score.genesets = []
    # BEX3 is NGFRAP1 in pbmc68k (an older reference): the fifth gene, found through the alias
    cfg.score.custom = {"aliased": ["BEX3", "CD3E", "CD74", "LYZ", "MS4A1"]}
    report = validate_inputs(sheet, cfg)
    assert not [w for w in report.warnings if w.startswith("score:")], report.warnings
    fine = ["CD3E", "CD74", "LYZ", "MS4A1", "NKG7"]
    cfg.score.custom = {"odd": ["CD3E", "NOPE1", "NOPE2"], "fine": fine}
    with pytest.warns(UserWarning, match="gene set 'odd' has 1 of its 3 genes"):
        validate_inputs(sheet, cfg)
    cfg.score.custom = {"odd": ["CD3E", "NOPE1", "NOPE2"]}
    with pytest.raises(InputError, match=r"score: no gene set has at least score\.min_genes"):
        validate_inputs(sheet, cfg)


def test_marker_panel_coverage_warned(tmp_path, capsys):
    root = tmp_path / "in"
    sheet = write_cohort(root, n_cells=25)
    out = _validate_here(sheet, capsys)
    assert "annotate: no cell type of the marker panel" in out
    assert "0 of its" in out and "annotate.markers" in out
    # a run leaves it to the annotate stage (no duplicate), and a pilot does not check it
    cfg = load_config(root / "config.yaml")
    assert not any("annotate" in w for w in validate_inputs(sheet, cfg, stages=UP_TO_QC).warnings)


def test_marker_panel_file_refused_before_compute(tmp_path, capsys):
    root = tmp_path / "in"
    sheet = write_cohort(root, n_cells=25)
    (root / "markers.yaml").write_text("cell_types: nope\n")
    _config(root, "annotate", {"markers": str(root / "markers.yaml")})
    _refused_here(sheet, capsys, "markers.yaml")


# --------------------------------------------------------------------------- counts values
def test_non_integer_counts_in_a_10x_h5(tmp_path, capsys):
    root = tmp_path / "in"
    sheet = write_cohort(root, n_cells=25)
    p = root / "data" / "D2_acute.h5"
    with h5py.File(p, "r+") as f:
        data = f["matrix/data"][()].astype(np.float32)
        data[::7] = np.log1p(data[::7] + 0.5)
        del f["matrix/data"]
        f.create_dataset("matrix/data", data=data)
    _refused_here(sheet, capsys, "D2_acute.h5", "'D2_acute'", "not whole numbers", "raw UMI counts")


def test_negative_counts_in_a_10x_mtx(tmp_path, capsys):
    root = tmp_path / "in"
    sheet = write_cohort(root, n_cells=25)
    p = root / "data" / "D3_longterm_mtx" / "matrix.mtx.gz"
    lines = gzip.decompress(p.read_bytes()).decode().splitlines()
    i = next(k for k, line in enumerate(lines) if not line.startswith("%")) + 1
    g, c, v = lines[i].split()
    lines[i] = f"{g} {c} -{v}"
    p.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    _refused_here(sheet, capsys, "D3_longterm_mtx", "negative")


def test_unknown_stage_name():
    with pytest.raises(InputError, match=r"unknown stage.*'integration'"):
        validate_inputs(Path("x.csv"), load_config(None), stages=["integration"])
