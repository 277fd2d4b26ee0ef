"""Resume planning: submit only the groups and samples whose stamps are not current.

Also the `immuneage slurm` commands that need no cluster: dry run, bad input.
"""

from __future__ import annotations

from pathlib import Path

from conftest import tree_checksums

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.runner import Runner
from pipeline.slurm.graph import job_groups
from pipeline.slurm.submit import plan_submission


def _args(cohort: Path, out: Path) -> list[str]:
    return [
        "--samplesheet",
        str(cohort),
        "--config",
        str(cohort.parent / "config.yaml"),
        "--outdir",
        str(out),
    ]


def test_plan_follows_the_stamps(cohort, tmp_path):
    config = cohort.parent / "config.yaml"
    out = tmp_path / "out"
    plan = plan_submission(cohort, config, out, "localhost")
    assert not out.exists()  # planning creates nothing
    assert [j.group.name for j in plan.jobs] == [g.name for g in job_groups()]
    assert plan.jobs[0].array == "0-8" and plan.up_to_date == []
    assert [j.dependencies for j in plan.jobs[:3]] == [[], ["samples"], ["preprocess"]]

    assert main(["run", *_args(cohort, out), "--until", "qc", "--quiet"]) == 0
    runner = Runner(cohort, load_config(config), out)
    before = tree_checksums(out)
    st = runner.stage_status()
    assert tree_checksums(out) == before  # read-only
    assert st["ingest"].up_to_date and st["qc"].up_to_date
    assert all(st["ingest"].units.values()) and len(st["qc"].units) == 9
    assert not any(st[s].up_to_date for s in ("preprocess", "integrate", "cluster", "annotate"))
    plan = plan_submission(cohort, config, out, "localhost")
    assert plan.up_to_date == ["samples"]
    assert plan.jobs[0].group.name == "preprocess" and plan.jobs[0].dependencies == []

    # one sample's qc unit lost: only that array task, and the merges after it
    (out / "qc" / "samples" / "D2_acute.h5ad.stamp.json").unlink()
    st = runner.stage_status()
    assert [s for s, ok in st["qc"].units.items() if not ok] == ["D2_acute"]
    assert st["ingest"].up_to_date and not st["qc"].up_to_date
    plan = plan_submission(cohort, config, out, "localhost")
    samples = plan.jobs[0]
    assert samples.group.name == "samples" and samples.array == "4"
    assert samples.array_samples == {4: "D2_acute"}
    assert plan.jobs[1].group.name == "preprocess" and plan.jobs[1].dependencies == ["samples"]
    assert "#SBATCH --array=4\n" in samples.script

    # a changed config section makes the stage and everything below it stale
    changed = tmp_path / "changed.yaml"
    changed.write_text(config.read_text().replace("n_top_genes: 100", "n_top_genes: 90"))
    st = Runner(cohort, load_config(changed), out).stage_status()
    assert st["ingest"].up_to_date and not st["preprocess"].up_to_date


def test_dry_run_prints_scripts_and_creates_nothing(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["slurm", "submit", *_args(cohort, out), "--profile", "localhost", "--dry-run"])
    text = capsys.readouterr().out
    assert rc == 0
    assert not out.exists()
    assert f"==> {out}/slurm/samples.sbatch <==" in text
    assert "#SBATCH --gres=gpu:1" in text and "stage integrate" in text
    for g in job_groups():
        assert f"  {g.name} " in text


def test_bad_inputs_exit_2_and_create_nothing(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    bad_profile = tmp_path / "p.yaml"
    bad_profile.write_text("groups: {integrate: {gpus: 1}}\n")
    rc = main(["slurm", "submit", *_args(cohort, out), "--profile", str(bad_profile)])
    err = capsys.readouterr().err
    assert rc == 2 and "groups.integrate.gpus: unknown key" in err and not out.exists()

    sheet = cohort.parent / "bad_sheet.csv"
    sheet.write_text(cohort.read_text().replace("data/D1_acute.h5", "data/nope.h5"))
    rc = main(["slurm", "submit", *_args(sheet, out), "--profile", "localhost"])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.h5" in err and not out.exists()

    rc = main(["slurm", "status", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "no Slurm submission is recorded" in err
