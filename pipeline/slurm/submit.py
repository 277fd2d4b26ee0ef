"""Plan and submit the job graph: only the groups (and samples) that are not up to date.

:func:`plan_submission` validates everything first (config, profile, sample
sheet, counts files, files named in the config: a bad input raises an
:class:`~pipeline.errors.InputError` before anything is created), asks the
runner which stages and per-sample units are current
(:meth:`pipeline.runner.Runner.stage_status`) and renders one sbatch script per
group that has work left. :func:`submit` writes the scripts, the sample list
and ``jobs.json`` under ``<outdir>/slurm/`` and queues the jobs in graph order
with ``sbatch --parsable --dependency=afterok:<ids>``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import write_text_atomic
from ..config import load_config
from ..errors import InputError
from .graph import JobGroup, job_groups, reduce_dependencies
from .jobs import JOBS_SCHEMA, SlurmError, read_jobs, run_slurm, write_jobs
from .profile import Profile, Resources, load_profile
from .script import (
    ScriptPaths,
    immuneage_command,
    log_pattern,
    render_script,
    samples_file,
    slurm_dir,
)

__all__ = ["PlannedJob", "SubmitPlan", "array_spec", "plan_submission", "submit"]


def array_spec(indices: list[int], limit: int | None = None) -> str:
    """Compress task ids into an ``--array`` spec: ``[0, 1, 2, 5]`` -> ``0-2,5`` (``%limit``)."""
    if not indices:
        raise ValueError("an array needs at least one task")
    parts: list[str] = []
    ids = sorted(set(indices))
    start = prev = ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts) + (f"%{limit}" if limit else "")


@dataclass
class PlannedJob:
    """One job to submit."""

    group: JobGroup
    resources: Resources
    script: str
    script_path: Path
    log: Path
    dependencies: list[str]
    array: str | None = None
    array_samples: dict[int, str] = field(default_factory=dict)


@dataclass
class SubmitPlan:
    """What a submission will queue, and what it leaves out as up to date."""

    paths: ScriptPaths
    profile: Profile
    profile_path: Path | None
    samples: list[str]
    groups: list[JobGroup]
    jobs: list[PlannedJob]
    up_to_date: list[str]

    def graph_text(self, job_ids: dict[str, str] | None = None) -> str:
        """The graph as a table: group, job id, stages, resources, what it waits for."""
        ids = job_ids or {}
        rows = [("group", "job", "stages", "resources", "after")]
        for job in self.jobs:
            r = job.resources
            res = ", ".join(
                x
                for x in (
                    r.partition or "(default partition)",
                    f"{r.cpus} cpu",
                    r.mem,
                    r.time,
                    r.gres,
                )
                if x
            )
            stages = ", ".join(job.group.stages)
            if job.array is not None:
                stages += (
                    f" [array {job.array}: {len(job.array_samples)} of {len(self.samples)} samples]"
                )
            rows.append(
                (
                    job.group.name,
                    ids.get(job.group.name, "-"),
                    stages,
                    res,
                    ", ".join(job.dependencies) or "-",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [
            "  "
            + "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True))
            + "  "
            + row[4]
            for row in rows
        ]
        if self.up_to_date:
            lines.append(f"  up to date, not submitted: {', '.join(self.up_to_date)}")
        return "\n".join(lines)


def plan_submission(
    samplesheet: Path,
    config: Path | None,
    outdir: Path,
    profile: str | Path | None = None,
    *,
    workdir: Path | None = None,
    command: tuple[str, ...] | None = None,
) -> SubmitPlan:
    """Validate the inputs and work out which jobs to submit; creates nothing.

    Parameters
    ----------
    samplesheet, config, outdir
        As for ``immuneage run``.
    profile
        Profile file or shipped profile name (``None``: the generic profile).
    workdir
        The jobs' working directory (default: the current one).
    command
        The immuneage command the jobs run (default: this installation's).

    Raises
    ------
    InputError
        A bad config, profile, sample sheet, counts file or output directory.
    """
    from ..runner import Runner

    cfg = load_config(config)
    prof, prof_path = load_profile(profile)
    outdir = Path(outdir).absolute()
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"--outdir {outdir} exists and is not a directory")
    runner = Runner(Path(samplesheet), cfg, outdir, config_path=config)
    status = runner.stage_status()  # validates the sheet, every counts file, config files
    samples = [row.sample for row in runner._report.sheet.rows]  # type: ignore[union-attr]
    paths = ScriptPaths(
        samplesheet=Path(samplesheet).resolve(),
        config=Path(config).resolve() if config is not None else None,
        outdir=outdir.resolve(),
        workdir=(workdir or Path.cwd()).resolve(),
        command=command or immuneage_command(),
    )
    groups = job_groups()
    submitted: dict[str, JobGroup] = {}
    jobs: list[PlannedJob] = []
    up_to_date: list[str] = []
    for group in groups:
        array_samples: dict[int, str] = {}
        if group.per_sample:
            array_samples = {
                i: s
                for i, s in enumerate(samples)
                if not all(status[st].units[s] for st in group.stages)
            }
            todo = bool(array_samples)
        else:
            todo = not all(status[st].up_to_date for st in group.stages)
        if not todo:
            up_to_date.append(group.name)
            continue
        deps = reduce_dependencies(group, submitted)
        submitted[group.name] = group
        array = array_spec(list(array_samples), prof.max_array_tasks) if group.per_sample else None
        resources = prof.resources(group.name)
        jobs.append(
            PlannedJob(
                group=group,
                resources=resources,
                script=render_script(group, resources, paths, array=array, setup=prof.setup),
                script_path=slurm_dir(paths.outdir) / f"{group.name}.sbatch",
                log=log_pattern(paths.outdir, group),
                dependencies=deps,
                array=array,
                array_samples=array_samples,
            )
        )
    return SubmitPlan(paths, prof, prof_path, samples, groups, jobs, up_to_date)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _check_previous(outdir: Path) -> dict[str, Any] | None:
    """Refuse while an earlier submission still runs; cancel its jobs that can never run."""
    from .status import refresh

    previous = read_jobs(outdir)
    if previous is None:
        return None
    report = refresh(outdir, cancel=True)
    if report.active:
        busy = ", ".join(f"{g.group} (job {g.job_id}, {g.state})" for g in report.active)
        raise SlurmError(
            f"jobs of the earlier submission to {outdir} are still queued or running: {busy}. "
            f"Wait for them (`immuneage slurm status {outdir}`) or cancel them "
            f"(`immuneage slurm cancel {outdir}`), then submit again"
        )
    return previous


def submit(plan: SubmitPlan, *, argv: list[str] | None = None) -> dict[str, Any]:
    """Write the scripts and queue the planned jobs in graph order; return ``jobs.json``'s content.

    A job Slurm refuses cancels the jobs this call already queued and raises
    :class:`~pipeline.slurm.jobs.SlurmError` quoting sbatch's message.
    """
    outdir = plan.paths.outdir
    run_slurm(["sbatch", "--version"])  # Slurm reachable before anything is written
    previous = _check_previous(outdir)
    history = list(previous.get("previous", [])) if previous else []
    if previous:
        history.append(
            {
                "submitted": previous["submitted"],
                "groups": {g: e["job_id"] for g, e in previous["groups"].items()},
            }
        )
    sdir = slurm_dir(outdir)
    (sdir / "logs").mkdir(parents=True, exist_ok=True)
    write_text_atomic(samples_file(outdir), "".join(f"{s}\n" for s in plan.samples))
    record: dict[str, Any] = {
        "schema": JOBS_SCHEMA,
        "submitted": _now(),
        "samplesheet": str(plan.paths.samplesheet),
        "config": str(plan.paths.config) if plan.paths.config else None,
        "outdir": str(outdir),
        "workdir": str(plan.paths.workdir),
        "profile": str(plan.profile_path) if plan.profile_path else None,
        "command": list(argv) if argv is not None else None,
        "immuneage": list(plan.paths.command),
        "samples": plan.samples,
        "order": [g.name for g in plan.groups],
        "groups": {},
        "up_to_date": plan.up_to_date,
        "previous": history,
    }
    for job in plan.jobs:
        write_text_atomic(job.script_path, job.script)
        os.chmod(job.script_path, 0o755)
    ids: dict[str, str] = {}
    try:
        for job in plan.jobs:
            dep_ids = [ids[d] for d in job.dependencies]
            cmd = ["sbatch", "--parsable"]
            if dep_ids:
                cmd.append(f"--dependency=afterok:{':'.join(dep_ids)}")
            proc = run_slurm([*cmd, str(job.script_path)])
            job_id = proc.stdout.strip().split(";")[0]
            if not job_id.isdigit():
                raise SlurmError(f"sbatch printed {proc.stdout.strip()!r} instead of a job id")
            ids[job.group.name] = job_id
            record["groups"][job.group.name] = {
                "job_id": job_id,
                "stages": list(job.group.stages),
                "script": str(job.script_path),
                "log": str(job.log),
                "dependencies": job.dependencies,
                "dependency_ids": dep_ids,
                "submitted": _now(),
                "array": job.array,
                "array_samples": {str(i): s for i, s in job.array_samples.items()},
                "resources": job.resources.model_dump(),
            }
            write_jobs(outdir, record)
    except SlurmError:
        for job_id in ids.values():
            run_slurm(["scancel", job_id], check=False)
        if ids:
            record["cancelled_on_error"] = list(ids.values())
            write_jobs(outdir, record)
        raise
    return record
