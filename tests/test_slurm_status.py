"""Status from real `scontrol show job -o` / `squeue` output of the localhost cluster (Slurm 22.05).

The samples under tests/data/slurm/scontrol/ were captured from a 3-task array with one
failing task, its dependent (DependencyNeverSatisfied), that one's dependent (Dependency),
a cancelled job, a 4-task array at two moments, and the completed 9-task array of a run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.slurm.status import (
    EXIT_FAILED,
    aggregate,
    failed_stage,
    parse_scontrol,
    parse_squeue,
)

DATA = Path(__file__).resolve().parent / "data" / "slurm" / "scontrol"


def _records(name: str):
    return parse_scontrol((DATA / f"{name}.txt").read_text())


def test_array_with_a_failed_task():
    recs = _records("array_one_task_failed")
    assert [(r.array_task, r.state) for r in recs] == [
        ("2", "COMPLETED"),
        ("1", "FAILED"),
        ("0", "COMPLETED"),
    ]
    assert {r.array_job_id for r in recs} == {"1"}
    assert recs[1].exit_code == "1:0" and recs[1].reason == "NonZeroExitCode"
    assert recs[1].stdout == "/tmp/sx/a_1_1.log"
    state, reason, code, tasks = aggregate(recs, array=True)
    assert (state, reason, code) == ("FAILED", "NonZeroExitCode", "1:0")
    assert tasks == {0: "COMPLETED", 1: "FAILED", 2: "COMPLETED"}


def test_dependents_of_a_failed_job():
    (direct,) = _records("pending_never_satisfied")
    assert (direct.state, direct.reason) == ("PENDING", "DependencyNeverSatisfied")
    assert direct.dependency == "afterok:1_*(failed)"
    (grandchild,) = _records("pending_dependency")
    # below the first level Slurm only says "Dependency": status must walk the graph
    assert (grandchild.state, grandchild.reason) == ("PENDING", "Dependency")
    assert aggregate([grandchild], array=False)[:2] == ("PENDING", "Dependency")
    (gone,) = _records("cancelled")
    assert aggregate([gone], array=False)[0] == "CANCELLED"


def test_array_running_and_pending_tasks():
    recs = _records("array_running_and_pending")
    state, _, _, tasks = aggregate(recs, array=True)
    assert state == "RUNNING"
    assert tasks == {0: "RUNNING", 1: "RUNNING", 2: "PENDING", 3: "PENDING"}
    later = _records("array_half_done")
    state, _, _, tasks = aggregate(later, array=True)
    assert state == "RUNNING"
    assert tasks == {0: "COMPLETED", 1: "COMPLETED", 2: "RUNNING", 3: "RUNNING"}
    done = _records("array_completed")  # the 9-sample array of a localhost run
    state, _, code, tasks = aggregate(done, array=True)
    assert state == "COMPLETED" and code == "0:0" and set(tasks.values()) == {"COMPLETED"}
    assert sorted(tasks) == list(range(9))


def test_values_with_spaces_are_kept():
    line = "JobId=7 JobName=x JobState=COMPLETED Comment=immune age WorkDir=/tmp/q d StdOut=/tmp/q d/x $1/o.log Power="
    (rec,) = parse_scontrol(line)
    assert rec.stdout == "/tmp/q d/x $1/o.log"
    assert parse_scontrol("slurm_load_jobs error: Invalid job id specified\n") == []


def test_failure_wins_over_cancelled_and_nothing_is_unknown():
    recs = parse_squeue("9_0|CANCELLED|None|\n9_1|TIMEOUT|None|\n9_[2-3]|PENDING|None|\n")
    state, _, _, tasks = aggregate(recs, array=True)
    assert state == "TIMEOUT"
    assert tasks == {0: "CANCELLED", 1: "TIMEOUT", 2: "PENDING", 3: "PENDING"}
    assert aggregate([], array=False)[0] == "UNKNOWN"


@pytest.mark.parametrize(
    ("log", "stage"),
    [
        (
            "[immuneage-slurm] stage ingest: start x\n[immuneage-slurm] stage ingest: done x\n"
            "[immuneage-slurm] stage qc: start x\nimmuneage: error: boom\n",
            "qc",
        ),
        ("[immuneage-slurm] stage ingest: start x\n[immuneage-slurm] stage ingest: done x\n", None),
        ("bash: immuneage: command not found\n", None),
    ],
)
def test_failed_stage_from_the_log(tmp_path, log, stage):
    p = tmp_path / "job.log"
    p.write_text(log)
    assert failed_stage(p) == stage
    assert failed_stage(tmp_path / "missing.log") is None


def test_exit_code_is_documented_in_cli():
    from pipeline import cli

    assert cli._SLURM_EXIT_FAILED == EXIT_FAILED
