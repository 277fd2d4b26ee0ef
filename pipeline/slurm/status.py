"""State of a submitted job graph, with or without Slurm accounting.

``sacct`` needs slurmdbd, which many small clusters (and the localhost test
cluster) do not run. So each job is looked up with ``scontrol show job -o``
(every job Slurm still holds, array tasks one record each), then ``squeue -t
all``, then ``sacct``; a job none of them knows is ``UNKNOWN`` (Slurm forgets
finished jobs after ``MinJobAge``). Array tasks are aggregated into one state
per group.

A failed job leaves its dependents pending forever: Slurm's default
(``--kill-on-invalid-dep=no``, kept on purpose) marks the direct dependents
``DependencyNeverSatisfied`` and the ones below only ``Dependency``.
:func:`refresh` walks the graph, says which stage of which job failed (from
the ``[immuneage-slurm] stage X: start|done`` lines of its log) and cancels
every dependent that can never run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .jobs import SlurmError, read_jobs, run_slurm
from .script import MARKER

__all__ = [
    "ACTIVE_STATES",
    "EXIT_FAILED",
    "FAILED_STATES",
    "GroupState",
    "JobRecord",
    "aggregate",
    "expand_array",
    "failed_stage",
    "parse_scontrol",
    "parse_squeue",
    "refresh",
]

#: States of a job that ended without success (submitit's list plus Slurm's rarer ones).
FAILED_STATES = (
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "REVOKED",
    "SPECIAL_EXIT",
)
#: States of a job that may still complete.
ACTIVE_STATES = (
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
)
#: Exit code of ``immuneage slurm status`` when a job of the graph failed.
EXIT_FAILED = 3

_STAGE_LINE = re.compile(re.escape(MARKER) + r" stage (\S+): (start|done)\b")


@dataclass
class JobRecord:
    """One job (or array task, or pending block of array tasks) as Slurm reports it."""

    job_id: str
    state: str
    reason: str = ""
    exit_code: str = ""
    dependency: str = ""
    array_job_id: str | None = None
    array_task: str | None = None
    stdout: str | None = None


@dataclass
class GroupState:
    """The state of one job group of a submission.

    Attributes
    ----------
    state
        ``COMPLETED``, ``RUNNING``, ``PENDING``, one of :data:`FAILED_STATES`,
        ``UNKNOWN`` (Slurm no longer knows the job) or ``UP_TO_DATE`` (not submitted).
    tasks
        Array groups: task id -> state.
    """

    group: str
    job_id: str | None
    state: str
    reason: str = ""
    exit_code: str = ""
    tasks: dict[int, str] = field(default_factory=dict)
    source: str = ""


def _fields(line: str) -> dict[str, str]:
    """``Key=Value Key=Value`` -> dict; a token without ``=`` continues the previous value."""
    out: dict[str, str] = {}
    last = None
    for token in line.split(" "):
        key, sep, value = token.partition("=")
        if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9_/:]*", key):
            out[key] = value
            last = key
        elif last is not None and token:
            out[last] += " " + token
    return out


def parse_scontrol(text: str) -> list[JobRecord]:
    """Records of ``scontrol show job -o <id>`` output (one line per job or array task)."""
    records = []
    for line in text.splitlines():
        f = _fields(line.strip())
        if "JobId" not in f or "JobState" not in f:
            continue
        records.append(
            JobRecord(
                job_id=f["JobId"],
                state=f["JobState"],
                reason=f.get("Reason", ""),
                exit_code=f.get("ExitCode", ""),
                dependency=f.get("Dependency", ""),
                array_job_id=f.get("ArrayJobId"),
                array_task=f.get("ArrayTaskId"),
                stdout=f.get("StdOut"),
            )
        )
    return records


#: ``squeue`` output format used by :func:`parse_squeue`.
SQUEUE_FORMAT = "%i|%T|%r|%E"


def parse_squeue(text: str) -> list[JobRecord]:
    """Records of ``squeue -h -t all -o '%i|%T|%r|%E'`` (``%i``: ``41`` or ``41_3`` or ``41_[4-8]``)."""
    records = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        jid, state, reason, dep = parts
        array_job, sep, task = jid.partition("_")
        records.append(
            JobRecord(
                job_id=jid,
                state=state,
                reason=reason,
                dependency=dep,
                array_job_id=array_job if sep else None,
                array_task=task.strip("[]") if sep else None,
            )
        )
    return records


def _parse_sacct(text: str) -> list[JobRecord]:
    """Records of ``sacct -n -P -X -o JobID,State,ExitCode -j <id>``."""
    records = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 3:
            continue
        jid, state, code = parts
        array_job, sep, task = jid.partition("_")
        records.append(
            JobRecord(
                job_id=jid,
                state=state.split()[0],  # "CANCELLED by 0"
                exit_code=code,
                array_job_id=array_job if sep else None,
                array_task=task.strip("[]") if sep else None,
            )
        )
    return records


def expand_array(spec: str) -> list[int]:
    """Array task ids of an ``--array``/``ArrayTaskId`` spec: ``0-3,7`` (``%N`` and ``:step`` honoured)."""
    spec = spec.split("%", 1)[0]
    out: list[int] = []
    for part in filter(None, spec.split(",")):
        rng, _, step = part.partition(":")
        lo, _, hi = rng.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1, int(step or 1)))
    return out


def aggregate(records: list[JobRecord], *, array: bool) -> tuple[str, str, str, dict[int, str]]:
    """One state for a job from its records: ``(state, reason, exit code, tasks)``.

    Any failed task makes the group failed (a non-cancelled failure wins over
    ``CANCELLED``); otherwise any running task makes it ``RUNNING``, any pending
    one ``PENDING``; all completed is ``COMPLETED``.
    """
    if not records:
        return "UNKNOWN", "", "", {}
    tasks: dict[int, str] = {}
    if array:
        for r in records:
            if r.array_task:
                for t in expand_array(r.array_task):
                    tasks[t] = r.state
    states = [r.state for r in records]
    failed = [r for r in records if r.state in FAILED_STATES]
    if failed:
        worst = next((r for r in failed if r.state != "CANCELLED"), failed[0])
        return worst.state, worst.reason, worst.exit_code, tasks
    for wanted in ("RUNNING", "COMPLETING", "CONFIGURING"):
        if wanted in states:
            return "RUNNING", "", "", tasks
    pending = [r for r in records if r.state not in ("COMPLETED",)]
    if pending:
        return pending[0].state, pending[0].reason, "", tasks
    return "COMPLETED", "", records[0].exit_code, tasks


def _query(job_id: str) -> tuple[list[JobRecord], str]:
    proc = run_slurm(["scontrol", "show", "job", "-o", job_id], check=False)
    records = parse_scontrol(proc.stdout) if proc.returncode == 0 else []
    if records:
        return records, "scontrol"
    proc = run_slurm(["squeue", "-h", "-t", "all", "-j", job_id, "-o", SQUEUE_FORMAT], check=False)
    records = parse_squeue(proc.stdout) if proc.returncode == 0 else []
    if records:
        return records, "squeue"
    try:
        proc = run_slurm(
            ["sacct", "-n", "-P", "-X", "-o", "JobID,State,ExitCode", "-j", job_id], check=False
        )
    except SlurmError:  # sacct not installed
        return [], ""
    records = _parse_sacct(proc.stdout) if proc.returncode == 0 else []
    return records, "sacct" if records else ""


def failed_stage(log: Path) -> str | None:
    """The stage a job's log shows started but not done (``None``: none, or no log)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    running: str | None = None
    for m in _STAGE_LINE.finditer(text):
        running = m.group(1) if m.group(2) == "start" else None
    return running


def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _log_of(entry: dict[str, Any], job_id: str, task: int | None = None) -> Path:
    pattern = entry["log"]
    if task is None:
        return Path(pattern.replace("%j", job_id))
    return Path(pattern.replace("%A", job_id).replace("%a", str(task)))


@dataclass
class StatusReport:
    """What :func:`refresh` found: group states, failures explained, jobs cancelled."""

    record: dict[str, Any]
    groups: list[GroupState]
    failures: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Whether a job of the graph failed (or was cancelled, or timed out)."""
        return any(g.state in FAILED_STATES for g in self.groups)

    @property
    def active(self) -> list[GroupState]:
        """Groups still queued or running."""
        return [g for g in self.groups if g.state in ACTIVE_STATES]

    def text(self) -> str:
        """The status as printed by ``immuneage slurm status``."""
        rec = self.record
        lines = [
            f"immuneage slurm status: {rec['outdir']} (submitted {rec['submitted']}, "
            f"profile {rec.get('profile') or 'generic (built-in)'})"
        ]
        width = max([len(g.group) for g in self.groups] + [5])
        lines.append(f"  {'group':<{width}}  {'job':>8}  {'state':<24}  stages")
        for g in self.groups:
            entry = rec["groups"].get(g.group, {})
            stages = ", ".join(entry.get("stages", []))
            state = g.state if g.state != "UP_TO_DATE" else "up to date (not submitted)"
            if g.state == "PENDING" and g.reason:
                state = f"PENDING ({g.reason})"
            note = ""
            if g.tasks:
                done = sum(s == "COMPLETED" for s in g.tasks.values())
                bad = sorted(t for t, s in g.tasks.items() if s in FAILED_STATES)
                note = f"  [{done}/{len(g.tasks)} tasks completed"
                note += f"; failed: {', '.join(map(str, bad))}]" if bad else "]"
            lines.append(f"  {g.group:<{width}}  {g.job_id or '-':>8}  {state:<24}  {stages}{note}")
        lines += self.failures
        if self.cancelled:
            lines.append(
                "cancelled the jobs that could never run (a job they depend on failed): "
                + ", ".join(self.cancelled)
            )
        if self.failed:
            lines.append(
                "Fix the cause, then run the same `immuneage slurm submit` again: only the "
                "missing stages are submitted."
            )
        elif not self.active and all(g.state in ("COMPLETED", "UP_TO_DATE") for g in self.groups):
            lines.append(f"all done: outputs in {rec['outdir']}")
        return "\n".join(lines)


def _explain(entry: dict[str, Any], g: GroupState, record: dict[str, Any], n_lines: int) -> str:
    out: list[str] = []
    assert g.job_id is not None
    if g.tasks:
        samples = record.get("samples", [])
        for task in sorted(t for t, s in g.tasks.items() if s in FAILED_STATES):
            log = _log_of(entry, g.job_id, task)
            sample = samples[task] if task < len(samples) else "?"
            stage = failed_stage(log)
            where = f"stage {stage!r}" if stage else "before its first stage"
            out.append(
                f"FAILED: group {g.group!r} (job {g.job_id}), array task {task} = sample "
                f"{sample!r}: {where} failed ({g.tasks[task]})"
            )
            out.append(f"  log: {log}")
            out += [f"  | {line}" for line in _tail(log, n_lines)]
    else:
        log = _log_of(entry, g.job_id)
        stage = failed_stage(log)
        where = f"stage {stage!r}" if stage else "before its first stage"
        code = f", exit code {g.exit_code}" if g.exit_code else ""
        out.append(f"FAILED: group {g.group!r} (job {g.job_id}): {where} failed ({g.state}{code})")
        out.append(f"  log: {log}")
        out += [f"  | {line}" for line in _tail(log, n_lines)]
    return "\n".join(out)


def refresh(outdir: Path, *, cancel: bool = True, n_lines: int = 15) -> StatusReport:
    """Look up every job of ``outdir``'s submission; explain failures; cancel doomed dependents.

    Parameters
    ----------
    outdir
        The output directory a graph was submitted for.
    cancel
        ``scancel`` the pending jobs that depend (directly or not) on a failed one.
    n_lines
        Lines of each failed job's log to quote.

    Raises
    ------
    SlurmError
        No submission is recorded in ``outdir``, or Slurm's commands are missing.
    """
    record = read_jobs(Path(outdir))
    if record is None:
        raise SlurmError(
            f"no Slurm submission is recorded in {Path(outdir) / 'slurm' / 'jobs.json'}; "
            "submit first with `immuneage slurm submit`"
        )
    report = StatusReport(record, [])
    doomed: set[str] = set()
    for name in record["order"]:
        entry = record["groups"].get(name)
        if entry is None:
            report.groups.append(GroupState(name, None, "UP_TO_DATE"))
            continue
        records, source = _query(entry["job_id"])
        is_array = entry.get("array") is not None
        state, reason, code, tasks = aggregate(records, array=is_array)
        g = GroupState(name, entry["job_id"], state, reason, code, tasks, source)
        upstream_bad = [d for d in entry.get("dependencies", []) if d in doomed]
        if state in FAILED_STATES:
            doomed.add(name)
            if not upstream_bad:  # the root cause, not a dependent cancelled for it
                report.failures.append(_explain(entry, g, record, n_lines))
        elif upstream_bad and state == "PENDING":
            doomed.add(name)
            if cancel:
                run_slurm(["scancel", entry["job_id"]])
                g.state, g.reason = "CANCELLED", f"dependency {', '.join(upstream_bad)} failed"
                report.cancelled.append(f"{name} ({entry['job_id']})")
            else:
                g.reason = f"can never run: {', '.join(upstream_bad)} failed"
        report.groups.append(g)
    return report


def cancel_all(outdir: Path) -> list[str]:
    """``scancel`` every job of ``outdir``'s submission still queued or running; return them."""
    report = refresh(outdir, cancel=False)
    ids = [f"{g.group} ({g.job_id})" for g in report.active if g.job_id]
    for g in report.active:
        assert g.job_id is not None
        run_slurm(["scancel", g.job_id])
    return ids
