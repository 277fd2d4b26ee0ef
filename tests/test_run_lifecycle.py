"""A run's life through the CLI: late failures keep finished work, the run log and trace,
pilot runs, thread caps, stage-selection errors, warnings shown once, and sheet columns
that re-run only the stages that read them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import SMALL_OVERRIDES, run_argv, write_cohort

from pipeline import cli
from pipeline.artifacts import read_stamp, stamp_path
from pipeline.errors import InputError
from pipeline.stages import stage_names

STAGES = stage_names()


def _config(path: Path, **sections: dict) -> Path:
    cfg = {k: dict(v) for k, v in SMALL_OVERRIDES.items()}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _status(stdout: str) -> dict[str, str]:
    """Stage -> 'ran' / 'up to date' from the summary `immuneage run` prints."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] in STAGES:
            out[parts[0]] = parts[1].strip()
    return out


def _sh(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a command line, capturing its text output."""
    return subprocess.run(argv, capture_output=True, text=True)


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _argv(sheet: Path, out: Path, config: Path, *extra: str) -> list[str]:
    """``immuneage run`` arguments for :func:`pipeline.cli.main` (in-process)."""
    return run_argv(sheet, out, *extra, config=config)[3:]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("lifecycle") / "in")


def test_failure_at_qc_keeps_ingest_and_the_fixed_rerun_resumes(cohort, tmp_path):
    """A data problem found mid-run (a sample failing QC) keeps the finished ingest."""
    out = tmp_path / "out"
    bad = _config(tmp_path / "bad.yaml", qc={"min_cells_after": 31})  # D1_baseline has 30
    r = _sh(run_argv(cohort, out, "--until", "qc", config=bad))
    assert r.returncode == 2, r.stderr
    assert "sample 'D1_baseline' fails QC" in r.stderr
    assert "Completed stages are kept (ingest)" in r.stderr
    assert "resumes at 'qc'" in r.stderr
    # everything ingest wrote is there and stamped; nothing of qc's merge
    st = read_stamp(stamp_path(out / "ingest" / "ingest.h5ad"))
    assert st is not None and st.outputs_present(out)
    assert not (out / "qc" / "qc.h5ad").exists()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["failed"]["stage"] == "qc" and "D1_baseline" in prov["failed"]["error"]
    assert prov["stages"]["ingest"]["status"] == "ran"
    logs = list((out / "logs").glob("*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert "fails QC" in text and "ingest (merge): done" in text
    ingest_mtime = (out / "ingest" / "ingest.h5ad").stat().st_mtime_ns

    good = _config(tmp_path / "good.yaml")
    r = _sh(run_argv(cohort, out, "--until", "qc", config=good))
    assert r.returncode == 0, r.stderr
    assert _status(r.stdout) == {"ingest": "up to date", "qc": "ran"}
    assert (out / "ingest" / "ingest.h5ad").stat().st_mtime_ns == ingest_mtime
    assert len(list((out / "logs").glob("*.log"))) == 2  # one log per invocation
    assert "failed" not in json.loads((out / "provenance.json").read_text())
    assert (out / "qc_report.html").is_file()


def test_failure_at_score_keeps_everything_before_it(cohort, tmp_path, capsys, monkeypatch):
    """The issue's case: a run that stops in `score` keeps ingest..annotate, scVI model included.

    Pre-flight now catches every bad input known to stop `score`, so the stage's failure
    is injected: the real stage function is replaced by one that raises an InputError,
    as a gene set that cannot be scored would.
    """
    import pipeline.stages.score as score_stage

    out = tmp_path / "out"
    config = _config(tmp_path / "config.yaml")

    def broken(*args, **kwargs):
        raise InputError("score: gene set 'prog_x' has 1 of its 12 genes in the data")

    monkeypatch.setattr(score_stage, "run_score", broken)
    code, stdout, stderr = _main(_argv(cohort, out, config), capsys)
    assert code == 2
    kept = STAGES[: STAGES.index("score")]
    assert f"Completed stages are kept ({', '.join(kept)})" in stderr
    assert "resumes at 'score'" in stderr
    for name in kept:
        artifact = out / name / f"{name}.h5ad"
        assert read_stamp(stamp_path(artifact)).outputs_present(out), name
    model = out / "integrate" / "scvi_model" / "model.pt"
    assert model.is_file()
    model_mtime = model.stat().st_mtime_ns

    monkeypatch.undo()
    code, stdout, stderr = _main(_argv(cohort, out, config), capsys)
    assert code == 0, stderr
    status = _status(stdout)
    assert {s for s, v in status.items() if v == "up to date"} == set(kept)
    assert {s for s, v in status.items() if v == "ran"} == set(STAGES[len(kept) :])
    assert model.stat().st_mtime_ns == model_mtime
    # one prefix per message, warnings without Python source lines
    for name in STAGES:
        assert f"{name}: {name}:" not in stderr
    assert "warnings.warn(" not in stderr and ".py:" not in stderr.replace("from ", "")
    prov = json.loads((out / "provenance.json").read_text())
    trace = pd.DataFrame(prov["trace"])
    assert set(trace["stage"]) == set(STAGES)
    assert {"started", "finished", "wall_s", "cpu_s", "peak_rss_mb", "device", "host"} <= set(
        trace.columns
    )
    assert (trace["wall_s"] >= 0).all() and (trace["peak_rss_mb"] > 0).all()
    assert (trace.loc[trace["sample"].notna(), "stage"].unique() == ["ingest", "qc"]).all()


def test_quiet_run_logs_to_its_file_only(cohort, tmp_path):
    out = tmp_path / "out"
    config = _config(tmp_path / "config.yaml")
    r = _sh(run_argv(cohort, out, "--until", "ingest", "--quiet", config=config))
    assert r.returncode == 0, r.stderr
    assert "[immuneage" not in r.stderr  # nothing on the terminal but warnings
    (log,) = (out / "logs").glob("*.log")
    text = log.read_text()
    assert "ingest [9/9] D3_longterm: done" in text and "--quiet" in text


def test_from_after_until_is_an_error(cohort, tmp_path):
    out = tmp_path / "out"
    config = _config(tmp_path / "config.yaml")
    r = _sh(run_argv(cohort, out, "--from", "cluster", "--until", "integrate", config=config))
    assert r.returncode == 2
    assert "--from cluster comes after --until integrate" in r.stderr
    assert not out.exists()


def test_pilot_run_needs_no_design(tmp_path):
    """One sample at a timepoint the config does not know: `--qc-only` runs ingest and QC."""
    sheet = write_cohort(tmp_path / "in")
    one = pd.read_csv(sheet).iloc[[0]].assign(timepoint="day0")
    pilot = sheet.with_name("pilot.csv")
    one.to_csv(pilot, index=False)
    config = _config(tmp_path / "config.yaml")
    out = tmp_path / "out"
    full = _sh(run_argv(pilot, out, config=config))
    assert full.returncode == 2 and not out.exists()  # a full run needs the design
    r = _sh(run_argv(pilot, out, "--qc-only", config=config))
    assert r.returncode == 0, r.stderr
    assert _status(r.stdout) == {"ingest": "ran", "qc": "ran"}
    (log,) = (out / "logs").glob("*.log")
    assert "timepoints taken from the sample sheet (day0)" in log.read_text()
    report = out / "qc_report.html"
    assert report.is_file() and f"QC report: {report}" in r.stdout
    html = report.read_text()
    assert "D1_baseline" in html and html.count("data:image/png;base64,") == 2
    assert not (out / "preprocess").exists()
    v = _sh(
        [
            *run_argv(pilot, out, config=config)[:3],
            *("validate", "--qc-only", "--samplesheet", str(pilot), "--config", str(config)),
        ]
    )
    assert v.returncode == 0, v.stderr
    bad = _sh(run_argv(pilot, out, "--qc-only", "--until", "cluster", config=config))
    assert bad.returncode == 2 and "--qc-only runs ingest and qc" in bad.stderr


def test_threads_caps_the_pools_and_restores_them():
    import torch
    from threadpoolctl import threadpool_info

    from pipeline.threads import limit_threads

    before = torch.get_num_threads()
    with limit_threads(1):
        assert torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info())
    assert torch.get_num_threads() == before
    with limit_threads(None):
        assert torch.get_num_threads() == before


def test_threads_option_reaches_the_run(cohort, tmp_path):
    out = tmp_path / "out"
    config = _config(tmp_path / "config.yaml")
    r = _sh(run_argv(cohort, out, "--until", "ingest", "--threads", "1", config=config))
    assert r.returncode == 0, r.stderr
    (log,) = (out / "logs").glob("*.log")
    assert "threads: at most 1" in log.read_text()
    bad = _sh(run_argv(cohort, tmp_path / "o2", "--threads", "0", config=config))
    assert bad.returncode == 2 and "--threads 0" in bad.stderr


def test_sheet_column_reruns_only_the_stages_that_read_it(tmp_path):
    sheet = write_cohort(tmp_path / "in")
    config = _config(tmp_path / "config.yaml")
    out = tmp_path / "out"
    argv = run_argv(sheet, out, "--until", "integrate", config=config)
    r = _sh(argv)
    assert r.returncode == 0, r.stderr
    # a new column nobody reads: everything stays
    table = pd.read_csv(sheet)
    table["sex"] = ["M", "M", "M", "F", "F", "F", "M", "M", "M"]
    table.to_csv(sheet, index=False)
    r = _sh(argv)
    assert r.returncode == 0, r.stderr
    assert set(_status(r.stdout).values()) == {"up to date"}
    # scVI now conditions on it: only integrate re-runs, and sees it typed
    config = _config(tmp_path / "config.yaml", integrate={"categorical_covariates": ["sex"]})
    r = _sh(argv)
    assert r.returncode == 0, r.stderr
    status = _status(r.stdout)
    assert status.pop("integrate") == "ran"
    assert set(status.values()) == {"up to date"}
    import anndata as ad

    a = ad.read_h5ad(out / "integrate" / "integrate.h5ad", backed="r")
    assert list(a.obs["sex"].cat.categories) == ["M", "F"]
    assert "age" not in a.obs  # not read by any stage so far
    a.file.close()


def test_warnings_are_shown_once_without_source_lines(tmp_path):
    sheet = write_cohort(tmp_path / "in")
    table = pd.read_csv(sheet)
    nobase = sheet.with_name("nobase.csv")
    table[table["sample"] != "D3_baseline"].to_csv(nobase, index=False)
    config = _config(tmp_path / "config.yaml", ingest={"missing_baseline": "warn"})
    text = "1 donor(s) have no 'baseline' sample: 'D3'"
    base = run_argv(nobase, tmp_path / "out", "--until", "ingest", config=config)
    v = _sh(
        [
            *base[:3],
            "validate",
            "--samplesheet",
            str(nobase),
            "--config",
            str(config),
            "--until",
            "ingest",
        ]
    )
    assert v.returncode == 0, v.stderr
    assert (v.stdout + v.stderr).count(text) == 1
    r = _sh(base)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(text) == 1
    assert ".py:" not in r.stderr and "warnings.warn" not in r.stderr
