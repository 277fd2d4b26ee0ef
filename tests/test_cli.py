"""The command line as a user meets it: exit codes, messages, help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tree_checksums

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


@pytest.mark.parametrize("command", [[], ["run"], ["demo"], ["validate"], ["stages"], ["config"]])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: immuneage" in capsys.readouterr().out


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "immuneage"
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("immuneage ")


def test_stages_lists_only_what_exists(capsys):
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    assert "1. ingest:" in out


def test_run_and_validate(cohort, tmp_path):
    before = tree_checksums(cohort.parent)
    config = str(cohort.parent / "config.yaml")
    r = _cli("validate", "--samplesheet", str(cohort), "--config", config)
    assert r.returncode == 0, r.stderr
    assert "OK: 9 samples, 3 donors" in r.stdout
    out = tmp_path / "out"
    r = _cli("run", "--samplesheet", str(cohort), "--config", config, "--outdir", str(out))
    assert r.returncode == 0, r.stderr
    assert f"outputs in {out}" in r.stdout
    assert "ingest (merge): done in" in r.stderr  # per-stage timing
    r = _cli(
        "run", "--samplesheet", str(cohort), "--config", config, "--outdir", str(out), "--quiet"
    )
    assert r.returncode == 0
    assert "up to date" in r.stdout and r.stderr == ""
    assert tree_checksums(cohort.parent) == before
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["command"][:2] == ["immuneage", "run"]


def test_bad_input_exit_code_2_and_no_output(cohort, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("device: tpu\n")
    out = tmp_path / "out"
    r = _cli("run", "--samplesheet", str(cohort), "--config", str(bad), "--outdir", str(out))
    assert r.returncode == 2
    assert "device" in r.stderr and str(bad) in r.stderr
    assert not out.exists()
    r = _cli("validate", "--samplesheet", str(tmp_path / "missing.csv"))
    assert r.returncode == 2 and "missing.csv" in r.stderr


def test_argument_errors_exit_2(tmp_path):
    r = _cli("run", "--samplesheet", "x.csv")
    assert r.returncode == 2 and "--outdir" in r.stderr
    r = _cli("run", "--samplesheet", "x.csv", "--outdir", str(tmp_path), "--stage", "nope")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_config_command_prints_schema_and_defaults():
    r = _cli("config", "--schema")
    assert r.returncode == 0 and json.loads(r.stdout)["title"] == "immuneage configuration"
    r = _cli("config")
    assert r.returncode == 0 and "gene_policy: inner" in r.stdout
    r = _cli("config", "--config", str(ROOT / "configs" / "demo.yaml"))
    assert r.returncode == 0
