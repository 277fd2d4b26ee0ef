"""sbatch scripts: a pure function of (group, resources, paths), compared with stored references.

Regenerate the references with `python -m pipeline.slurm` (then review the diff).
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from pipeline.slurm.__main__ import REFERENCE_PATHS, reference_scripts
from pipeline.slurm.graph import JobGroup
from pipeline.slurm.profile import Resources
from pipeline.slurm.script import immuneage_command, log_pattern, render_script

ROOT = Path(__file__).resolve().parents[1]
REFS = ROOT / "tests" / "data" / "slurm" / "scripts"
CASES = reference_scripts(ROOT)


def test_reference_set_is_complete():
    assert sorted(p.name for p in REFS.glob("*.sbatch")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_script_matches_reference(name):
    expected = (REFS / name).read_text()
    assert CASES[name] == expected, f"{name} changed: review, then `python -m pipeline.slurm`"


@pytest.mark.parametrize("name", sorted(CASES))
def test_script_is_valid_bash(name):
    r = subprocess.run(["bash", "-n"], input=CASES[name], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_script_is_pure_and_sorted():
    group = JobGroup("integrate", ("integrate",), False, ())
    res = Resources(partition="gpu", gres="gpu:1", extra=["--exclusive", "--constraint=x"])
    paths = REFERENCE_PATHS["plain"]
    a = render_script(group, res, paths)
    assert a == render_script(group, res, paths)
    directives = [line for line in a.splitlines() if line.startswith("#SBATCH")]
    managed = directives[: len(directives) - 2]
    assert managed == sorted(managed)
    assert directives[-2:] == ["#SBATCH --constraint=x", "#SBATCH --exclusive"]
    assert "#SBATCH --gres=gpu:1" in directives
    assert "--dependency" not in a  # job ids go on the sbatch command line


def test_every_stage_runs_the_cli_on_the_shared_outdir():
    group = JobGroup("cluster", ("cluster", "annotate"), False, ())
    text = render_script(group, Resources(), REFERENCE_PATHS["plain"])
    assert "immuneage=(/opt/immuneage/.venv/bin/immuneage)" in text
    assert (
        "common=(--samplesheet /data/cohort/samplesheet.csv --config /data/cohort/config.yaml "
        "--outdir /scratch/run1 --quiet)"
    ) in text
    assert text.rstrip().splitlines()[-2:] == ["stage cluster", "stage annotate"]


def test_quoted_paths_reach_the_command_intact(tmp_path):
    """Run the rendered stage function with a fake immuneage that prints its argv."""
    fake = tmp_path / "fake immuneage"
    fake.write_text('#!/bin/bash\nfor a in "$@"; do echo "<$a>"; done\n')
    fake.chmod(0o755)
    quoted = REFERENCE_PATHS["quoted"]
    paths = type(quoted)(
        quoted.samplesheet, quoted.config, tmp_path / "out $1", tmp_path, (str(fake),)
    )
    group = JobGroup("samples", ("ingest", "qc"), True, ())
    text = render_script(group, Resources(), paths, array="0-1")
    (tmp_path / "out $1" / "slurm").mkdir(parents=True)
    (tmp_path / "out $1" / "slurm" / "samples.txt").write_text("S0\nS'1 x\n")
    r = subprocess.run(
        ["bash", "-c", text],
        capture_output=True,
        text=True,
        env={"SLURM_ARRAY_TASK_ID": "1", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    args = [line[1:-1] for line in r.stdout.splitlines() if line.startswith("<")]
    assert args[:6] == [
        "run",
        "--samplesheet",
        "/data/my cohort/sheet's.csv",
        "--outdir",
        str(tmp_path / "out $1"),
        "--quiet",
    ]
    assert args[6:9] == ["--stage", "ingest", "--sample"]
    assert args[9] == "S'1 x"
    assert "[immuneage-slurm] stage qc: done" in r.stdout
    r = subprocess.run(
        ["bash", "-c", text], capture_output=True, text=True, env={"SLURM_ARRAY_TASK_ID": "5"}
    )
    assert r.returncode == 2 and "array task 5 has no line" in r.stderr


def test_array_only_for_the_per_sample_group():
    with pytest.raises(ValueError, match="job array"):
        render_script(
            JobGroup("samples", ("ingest",), True, ()), Resources(), REFERENCE_PATHS["plain"]
        )
    with pytest.raises(ValueError, match="not a job array"):
        render_script(
            JobGroup("integrate", ("integrate",), False, ()),
            Resources(),
            REFERENCE_PATHS["plain"],
            array="0-3",
        )


def test_log_pattern_and_command():
    out = Path("/o")
    assert (
        str(log_pattern(out, JobGroup("samples", (), True, ())))
        == "/o/slurm/logs/samples-%A_%a.log"
    )
    assert (
        str(log_pattern(out, JobGroup("integrate", (), False, ())))
        == "/o/slurm/logs/integrate-%j.log"
    )
    cmd = immuneage_command()
    r = subprocess.run([*cmd, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("immuneage"), shlex.join(cmd)
