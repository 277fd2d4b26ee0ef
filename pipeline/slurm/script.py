"""sbatch script text: a pure function of (job group, resources, paths).

Every job runs the same command line as a local run, ``immuneage run
--samplesheet S --config C --outdir O --stage X --quiet``, once per stage of its
group, on the shared output directory, so stamps, atomic artifacts and resume
are those of a local run. The ``samples`` array task maps ``SLURM_ARRAY_TASK_ID``
to its sample through ``<outdir>/slurm/samples.txt`` (line N+1 = task N) and
runs each per-sample stage with ``--sample`` for that sample only.

Each stage is bracketed by ``[immuneage-slurm] stage X: start`` / ``... done``
lines in the job's log, which is how ``immuneage slurm status`` tells which
stage of a failed job failed. Dependencies are not in the script: they are job
ids, known only at submission, and go on the ``sbatch`` command line.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..threads import THREAD_ENV
from .graph import JobGroup
from .profile import Resources

__all__ = [
    "MARKER",
    "ScriptPaths",
    "immuneage_command",
    "log_pattern",
    "render_script",
    "samples_file",
    "slurm_dir",
]

#: Prefix of the lines the scripts write around each stage.
MARKER = "[immuneage-slurm]"

#: Thread pools capped to the task's CPUs (so a job never oversubscribes its node).
THREAD_VARS = THREAD_ENV


@dataclass(frozen=True)
class ScriptPaths:
    """Where a job graph reads and writes (all absolute).

    Attributes
    ----------
    samplesheet, config, outdir
        The ``immuneage run`` arguments (``config`` ``None``: the built-in defaults).
    workdir
        The job's working directory (``--chdir``): where ``submit`` was run, so
        relative paths inside the config resolve as in a local run.
    command
        The immuneage executable, e.g. ``("/venv/bin/immuneage",)`` or
        ``("/venv/bin/python", "-m", "pipeline.cli")``.
    """

    samplesheet: Path
    config: Path | None
    outdir: Path
    workdir: Path
    command: tuple[str, ...]


def immuneage_command() -> tuple[str, ...]:
    """The command that runs this very installation of immuneage (same venv on the nodes)."""
    exe = Path(sys.executable).absolute()
    script = exe.parent / "immuneage"
    if script.is_file():
        return (str(script),)
    return (str(exe), "-m", "pipeline.cli")


def slurm_dir(outdir: Path) -> Path:
    """``<outdir>/slurm``: jobs.json, the scripts, samples.txt and logs/."""
    return Path(outdir) / "slurm"


def samples_file(outdir: Path) -> Path:
    """The array's sample list: line N+1 is the sample of array task N."""
    return slurm_dir(outdir) / "samples.txt"


def log_pattern(outdir: Path, group: JobGroup) -> Path:
    """The job's ``--output`` (Slurm fills in ``%j`` = job id, ``%A_%a`` = array job_task)."""
    suffix = "%A_%a" if group.per_sample else "%j"
    return slurm_dir(outdir) / "logs" / f"{group.name}-{suffix}.log"


def _option(flag: str, value: str) -> str:
    return f"#SBATCH {flag}={shlex.quote(value)}"


def _extra(flag: str) -> tuple[str, str]:
    key, sep, value = flag.partition("=")
    return key, (f"#SBATCH {key}={shlex.quote(value)}" if sep else f"#SBATCH {key}")


def render_script(
    group: JobGroup,
    resources: Resources,
    paths: ScriptPaths,
    *,
    array: str | None = None,
    setup: Sequence[str] = (),
) -> str:
    """The sbatch script of one job group.

    Parameters
    ----------
    group
        The job group (its stages, whether it is the per-sample array).
    resources
        Its resolved resources (:meth:`pipeline.slurm.profile.Profile.resources`).
    paths
        Inputs, output directory, working directory and the immuneage command.
    array
        For the per-sample group: the ``--array`` indices (e.g. ``0-8`` or ``2,5%4``).
    setup
        Shell lines run before immuneage (the profile's ``setup``), verbatim.

    Returns
    -------
    The script: ``#SBATCH`` lines sorted by option, values shell-quoted, then
    one ``immuneage run --stage X`` per stage.
    """
    if group.per_sample and not array:
        raise ValueError(f"job group {group.name!r} is a job array: give its array indices")
    if array and not group.per_sample:
        raise ValueError(f"job group {group.name!r} is not a job array")
    options: dict[str, str] = {
        "--job-name": _option("--job-name", f"immuneage-{group.name}"),
        "--chdir": _option("--chdir", str(paths.workdir)),
        "--output": _option("--output", str(log_pattern(paths.outdir, group))),
        "--cpus-per-task": _option("--cpus-per-task", str(resources.cpus)),
        "--mem": _option("--mem", resources.mem),
        "--time": _option("--time", resources.time),
    }
    if array:
        options["--array"] = _option("--array", array)
    for flag, value in (
        ("--partition", resources.partition),
        ("--gres", resources.gres),
        ("--account", resources.account),
        ("--qos", resources.qos),
    ):
        if value is not None:
            options[flag] = _option(flag, value)
    lines = sorted(options.values()) + sorted(_extra(f)[1] for f in resources.extra)

    common = ["--samplesheet", str(paths.samplesheet)]
    if paths.config is not None:
        common += ["--config", str(paths.config)]
    common += ["--outdir", str(paths.outdir), "--quiet"]
    what = (
        f"stages {', '.join(group.stages)} for one sample per array task "
        f"(task N: line N+1 of {samples_file(paths.outdir).name})"
        if group.per_sample
        else f"stage{'s' if len(group.stages) > 1 else ''} {', '.join(group.stages)}"
    )
    out = [
        "#!/bin/bash",
        f"# immuneage Slurm job {group.name!r}: {what}.",
        "# Written by `immuneage slurm submit`; its dependencies are on the sbatch command line",
        "# (see jobs.json). Resubmit with `immuneage slurm submit`, not by hand.",
        *lines,
        "set -euo pipefail",
        *setup,
        " ".join(f'{v}="${{SLURM_CPUS_PER_TASK:-1}}"' for v in THREAD_VARS),
        f"export {' '.join(THREAD_VARS)}",
        f"immuneage=({shlex.join(paths.command)})",
        f"common=({shlex.join(common)})",
        "stage() {",
        f'    echo "{MARKER} stage $1: start $(date -u +%FT%TZ) on $(hostname)"',
        '    "${immuneage[@]}" run "${common[@]}" --stage "$@"',
        f'    echo "{MARKER} stage $1: done $(date -u +%FT%TZ)"',
        "}",
    ]
    if group.per_sample:
        listing = shlex.quote(str(samples_file(paths.outdir)))
        out += [
            f'sample=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {listing})',
            'if [[ -z "$sample" ]]; then',
            f'    echo "{MARKER} array task $SLURM_ARRAY_TASK_ID has no line in" {listing} >&2',
            "    exit 2",
            "fi",
            f'echo "{MARKER} sample $sample (array task $SLURM_ARRAY_TASK_ID)"',
        ]
        out += [f'stage {shlex.quote(s)} --sample "$sample"' for s in group.stages]
    else:
        out += [f"stage {shlex.quote(s)}" for s in group.stages]
    return "\n".join(out) + "\n"
