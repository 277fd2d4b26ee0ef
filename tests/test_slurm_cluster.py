"""The job graph on a real Slurm cluster (the localhost one of `slurm/localhost.sh up`).

Skipped, saying why, only when `sinfo` does not answer. One module-scoped run
of the tiny 9-sample cohort serves both tests: (1) every group completes and the
tables equal, byte for byte, those of a local `immuneage run` with the same
thread count (the jobs cap threads to their one CPU); (2) a stage made to fail
by a real bad input (a marker panel with a citation deleted) leaves its
dependents unrun, `status` names the group, stage and log and cancels them, and
after the fix a resubmission sends only the missing groups and completes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import run_argv, write_cohort

from pipeline.slurm.graph import job_groups
from pipeline.slurm.jobs import read_jobs
from pipeline.slurm.status import FAILED_STATES, parse_scontrol, refresh

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 600
THREADS = {
    v: "1"
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
}


def _slurm_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "`sinfo` is not installed"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "`sinfo` did not answer within 15 s"
    if r.returncode != 0:
        return f"`sinfo` failed: {r.stderr.strip()}"
    return None


_problem = _slurm_problem()
if _problem is not None:
    pytest.skip(
        f"no Slurm cluster reachable ({_problem}); start the localhost one with "
        "`slurm/localhost.sh up` (as root)",
        allow_module_level=True,
    )


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env={**os.environ, **(env or {})},
    )


def _wait(outdir: Path, until_failed: str | None = None) -> None:
    """Poll until no job is queued or running (or the group ``until_failed`` has failed)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        report = refresh(outdir, cancel=False)
        states = {g.group: g.state for g in report.groups}
        if until_failed is not None and states.get(until_failed) in FAILED_STATES:
            return
        if until_failed is None and not report.active:
            return
        time.sleep(2)
    pytest.fail(f"the jobs of {outdir} did not finish in {WAIT_S} s:\n{report.text()}")


def _timings(outdir: Path) -> str:
    """Start/end/elapsed of every job (for the record; `pytest -s` shows it)."""
    record = read_jobs(outdir)
    assert record is not None
    lines = []
    for group, entry in record["groups"].items():
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", entry["job_id"]], capture_output=True, text=True
        ).stdout
        starts, ends = [], []
        for line in out.splitlines():
            fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
            starts.append(fields.get("StartTime", "?"))
            ends.append(fields.get("EndTime", "?"))
        lines.append(f"{group:<12} job {entry['job_id']:>5}  {min(starts)} -> {max(ends)}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    """The tiny cohort run through `immuneage slurm submit` and, alongside, locally."""
    root = tmp_path_factory.mktemp("slurm")
    sheet = write_cohort(root / "in")
    config = root / "in" / "config.yaml"
    out = root / "slurm_out"
    t0 = time.monotonic()
    r = _cli(
        "slurm",
        "submit",
        "--samplesheet",
        str(sheet),
        "--config",
        str(config),
        "--outdir",
        str(out),
        "--profile",
        "localhost",
    )
    assert r.returncode == 0, r.stderr
    local = subprocess.Popen(  # same input, same thread count as the 1-CPU jobs
        run_argv(sheet, root / "local_out", config=config),
        env={**os.environ, **THREADS},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait(out)
    wall = time.monotonic() - t0
    _, local_err = local.communicate(timeout=WAIT_S)
    assert local.returncode == 0, local_err
    print(f"\nSlurm graph of the tiny cohort: {wall:.0f} s wall\n{r.stdout}{_timings(out)}")
    return {
        "root": root,
        "sheet": sheet,
        "config": config,
        "out": out,
        "local": root / "local_out",
        "submit": r.stdout,
    }


def test_graph_completes_and_matches_a_local_run(slurm_run):
    out = slurm_run["out"]
    report = refresh(out)
    assert [g.group for g in report.groups] == [g.name for g in job_groups()]
    assert {g.group: g.state for g in report.groups} == {g.name: "COMPLETED" for g in job_groups()}
    array = report.groups[0]
    assert array.group == "samples" and sorted(array.tasks) == list(range(9))
    record = read_jobs(out)
    assert record is not None
    # integrate really went through the gpu partition with a GPU allocated
    integrate_line = subprocess.run(
        ["scontrol", "show", "job", "-o", record["groups"]["integrate"]["job_id"]],
        capture_output=True,
        text=True,
    ).stdout
    (rec,) = parse_scontrol(integrate_line)
    assert rec.state == "COMPLETED"
    assert "Partition=gpu" in integrate_line and "gres:gpu:1" in integrate_line
    for group, entry in record["groups"].items():
        assert Path(entry["script"]).is_file(), group
    # each array task processed its own sample alone
    for task, sample in record["groups"]["samples"]["array_samples"].items():
        log = out / "slurm" / "logs" / f"samples-{record['groups']['samples']['job_id']}_{task}.log"
        text = log.read_text()
        assert f"sample {sample} (array task {task})" in text
        assert "stage qc: done" in text

    slurm_tables = sorted(p.name for p in (out / "tables").glob("*.tsv"))
    local_tables = sorted(p.name for p in (slurm_run["local"] / "tables").glob("*.tsv"))
    assert slurm_tables == local_tables and "qc_per_sample.tsv" in slurm_tables
    for name in slurm_tables:
        a = (out / "tables" / name).read_bytes()
        b = (slurm_run["local"] / "tables" / name).read_bytes()
        assert a == b, f"tables/{name} differs between the Slurm and the local run"

    r = _cli("slurm", "status", str(out))
    assert r.returncode == 0 and "all done" in r.stdout, r.stdout + r.stderr
    r = _cli(
        "slurm",
        "submit",
        "--samplesheet",
        str(slurm_run["sheet"]),
        "--config",
        str(slurm_run["config"]),
        "--outdir",
        str(out),
        "--profile",
        "localhost",
    )
    assert r.returncode == 0 and "nothing to submit" in r.stdout, r.stdout + r.stderr


def test_failed_stage_is_reported_dependents_cancelled_and_resubmit_completes(slurm_run):
    root = slurm_run["root"]
    out = root / "fail_out"
    shutil.copytree(slurm_run["out"], out, ignore=shutil.ignore_patterns("slurm"))
    panel = (ROOT / "pipeline" / "markers" / "data" / "pbmc.yaml").read_text()
    markers = root / "in" / "markers.yaml"
    broken = panel.replace("{gene: CD3E, source: zheng2017}", "{gene: CD3E, source: ''}", 1)
    assert broken != panel
    markers.write_text(panel)  # valid when submitted: `slurm submit` checks it up front
    cfg = yaml.safe_load(slurm_run["config"].read_text())
    cfg.setdefault("annotate", {})["markers"] = str(markers)
    config = root / "in" / "config_markers.yaml"
    config.write_text(yaml.safe_dump(cfg))
    args = [
        "--samplesheet",
        str(slurm_run["sheet"]),
        "--config",
        str(config),
        "--outdir",
        str(out),
        "--profile",
        "localhost",
    ]

    r = _cli("slurm", "submit", *args)
    assert r.returncode == 0, r.stderr
    # ... then hand-edited while the jobs wait or run (one citation deleted): the annotate
    # step's own pre-flight, or the stage, fails inside the job
    markers.write_text(broken)
    record = read_jobs(out)
    assert record is not None
    order = [g.name for g in job_groups()]
    below = order[order.index("cluster") :]
    assert sorted(record["groups"]) == sorted(below)  # samples..integrate are up to date
    assert record["up_to_date"] == order[: order.index("cluster")]
    dependents = below[1:]
    assert dependents, "the graph has no group below cluster: nothing to cancel"

    _wait(out, until_failed="cluster")
    time.sleep(2)  # let Slurm mark the direct dependent DependencyNeverSatisfied
    r = _cli("slurm", "status", str(out))
    assert r.returncode == 3, r.stdout + r.stderr
    cluster_id = record["groups"]["cluster"]["job_id"]
    log = out / "slurm" / "logs" / f"cluster-{cluster_id}.log"
    assert f"FAILED: group 'cluster' (job {cluster_id}): stage 'annotate' failed" in r.stdout
    assert f"log: {log}" in r.stdout and "non-empty source" in r.stdout
    assert "cancelled the jobs that could never run" in r.stdout
    for g in dependents:
        job_id = record["groups"][g]["job_id"]
        assert f"{g} ({job_id})" in r.stdout
        line = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True
        ).stdout
        assert "JobState=CANCELLED" in line and "RunTime=00:00:00" in line, line
        assert not (out / "slurm" / "logs" / f"{g}-{job_id}.log").exists()  # never ran

    markers.write_text(panel)  # the fix
    r = _cli("slurm", "submit", *args)
    assert r.returncode == 0, r.stderr
    again = read_jobs(out)
    assert again is not None
    assert sorted(again["groups"]) == sorted(below)  # only what is missing
    assert again["previous"][-1]["groups"]["cluster"] == cluster_id
    _wait(out)
    report = refresh(out)
    assert {g.group: g.state for g in report.groups if g.group in below} == dict.fromkeys(
        below, "COMPLETED"
    )
    assert (out / "annotate" / "annotate.h5ad.stamp.json").is_file()
