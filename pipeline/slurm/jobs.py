"""The submission record ``<outdir>/slurm/jobs.json`` and calls to Slurm's commands.

``jobs.json`` (written atomically after every ``sbatch``, so a submission
killed halfway still records the jobs it queued)::

    {"schema": "immuneage.slurm/1", "submitted": "...", "samplesheet": "...",
     "config": "...", "outdir": "...", "profile": "...", "workdir": "...",
     "command": [...], "samples": [...],
     "groups": {"<group>": {"job_id": "41", "stages": [...], "script": "...",
                            "log": ".../logs/<group>-%j.log", "dependencies": ["<group>", ...],
                            "dependency_ids": ["40"], "submitted": "...",
                            "array": "0-8" | null, "array_samples": {"0": "<sample>", ...}}},
     "up_to_date": ["<group>", ...],
     "previous": [{"submitted": "...", "groups": {"<group>": "<job id>"}}, ...]}
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..artifacts import write_json_atomic
from ..errors import InputError
from .script import slurm_dir

__all__ = ["JOBS_SCHEMA", "SlurmError", "jobs_path", "read_jobs", "run_slurm", "write_jobs"]

JOBS_SCHEMA = "immuneage.slurm/1"


class SlurmError(InputError):
    """Slurm is unreachable, refused a job, or the output directory has no submission (exit 2)."""


def jobs_path(outdir: Path) -> Path:
    """``<outdir>/slurm/jobs.json``."""
    return slurm_dir(outdir) / "jobs.json"


def read_jobs(outdir: Path) -> dict[str, Any] | None:
    """The recorded submission of ``outdir``, or ``None`` when there is none.

    Raises
    ------
    SlurmError
        The file exists but is not a submission record.
    """
    path = jobs_path(outdir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlurmError(
            f"{path} is not a submission record ({exc}); delete it and submit again"
        ) from None
    if not isinstance(data, dict) or data.get("schema") != JOBS_SCHEMA:
        raise SlurmError(
            f"{path} is not a submission record of this immuneage version "
            f"(schema {JOBS_SCHEMA}); delete it and submit again"
        )
    return data


def write_jobs(outdir: Path, record: dict[str, Any]) -> Path:
    """Write ``jobs.json`` atomically."""
    return write_json_atomic(jobs_path(outdir), record)


def run_slurm(
    args: Sequence[str], *, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a Slurm client command (``sbatch``, ``scontrol``, ``squeue``, ``scancel``, ``sacct``).

    Raises
    ------
    SlurmError
        The command is not installed, times out, or (with ``check``) fails; the
        message quotes its error output.
    """
    if shutil.which(args[0]) is None:
        raise SlurmError(
            f"`{args[0]}` is not on PATH: run immuneage's Slurm commands on a machine of the "
            "cluster (a login node), or start the localhost test cluster with "
            "`slurm/localhost.sh up`"
        )
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(
            f"`{' '.join(args)}` did not answer within {timeout:.0f} s; is slurmctld up (`sinfo`)?"
        ) from None
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip()
        raise SlurmError(f"`{' '.join(args)}` failed (exit code {proc.returncode}): {msg}")
    return proc
