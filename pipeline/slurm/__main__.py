"""Developer helper: ``python -m pipeline.slurm`` regenerates the Slurm reference files.

Writes ``slurm/profiles/generic.yaml`` (from :func:`~pipeline.slurm.profile.default_profile`)
and the reference sbatch scripts ``tests/data/slurm/scripts/*.sbatch`` that
``tests/test_slurm_script.py`` compares :func:`~pipeline.slurm.script.render_script`
against. Review the diff before committing: a changed reference is a changed job.
"""

from __future__ import annotations

from pathlib import Path

from .graph import GROUP_TABLE, PER_SAMPLE_GROUP, JobGroup
from .profile import GroupResources, Profile, default_profile, load_profile, write_generic_profile
from .script import ScriptPaths, render_script

__all__ = ["REFERENCE_PATHS", "reference_scripts", "write_reference_scripts"]

#: Fixed paths of the reference scripts (one with characters that need quoting).
REFERENCE_PATHS = {
    "plain": ScriptPaths(
        samplesheet=Path("/data/cohort/samplesheet.csv"),
        config=Path("/data/cohort/config.yaml"),
        outdir=Path("/scratch/run1"),
        workdir=Path("/home/user/project"),
        command=("/opt/immuneage/.venv/bin/immuneage",),
    ),
    "quoted": ScriptPaths(
        samplesheet=Path("/data/my cohort/sheet's.csv"),
        config=None,
        outdir=Path("/scratch/run $1"),
        workdir=Path("/home/user/my project"),
        command=("/opt/py env/bin/python", "-m", "pipeline.cli"),
    ),
}


def _group(name: str) -> JobGroup:
    stages = dict(GROUP_TABLE)[name]
    return JobGroup(name, stages, name == PER_SAMPLE_GROUP, ())


def reference_scripts(root: Path) -> dict[str, str]:
    """Reference file name -> script text.

    Groups are taken from :data:`~pipeline.slurm.graph.GROUP_TABLE` as written
    (not filtered by the current stage list), so the references do not change
    when a stage is added.
    """
    out: dict[str, str] = {}
    generic = default_profile()
    localhost, _ = load_profile(Path(root) / "slurm" / "profiles" / "localhost.yaml")
    plain = REFERENCE_PATHS["plain"]
    for name, _ in GROUP_TABLE:
        group = _group(name)
        for label, prof in (("generic", generic), ("localhost", localhost)):
            array = "0-8" if group.per_sample else None
            out[f"{label}-{name}.sbatch"] = render_script(
                group, prof.resources(name), plain, array=array, setup=prof.setup
            )
    site = Profile(
        defaults=GroupResources(
            cpus=2, mem="8G", time="1-00:00:00", account="lab_42", qos="normal"
        ),
        groups={
            "integrate": GroupResources(
                partition="gpu-a100",
                gres="gpu:a100:1",
                extra=["--constraint=a100&ib", "--exclusive", "--comment=immune age"],
            )
        },
        setup=["module load cuda/12.4", 'source "$HOME/.immuneagerc"'],
        max_array_tasks=4,
    )
    quoted = REFERENCE_PATHS["quoted"]
    out["site-integrate-quoted.sbatch"] = render_script(
        _group("integrate"), site.resources("integrate"), quoted, setup=site.setup
    )
    out["site-samples-quoted.sbatch"] = render_script(
        _group(PER_SAMPLE_GROUP),
        site.resources(PER_SAMPLE_GROUP),
        quoted,
        array="0-2,5,7-8%4",
        setup=site.setup,
    )
    return out


def write_reference_scripts(root: Path) -> list[Path]:
    """(Re)write ``tests/data/slurm/scripts/`` under ``root``."""
    folder = Path(root) / "tests" / "data" / "slurm" / "scripts"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.sbatch"):
        old.unlink()
    written = []
    for name, text in reference_scripts(root).items():
        (folder / name).write_text(text)
        written.append(folder / name)
    return written


if __name__ == "__main__":  # pragma: no cover - developer helper
    repo = Path(__file__).resolve().parents[2]
    print(write_generic_profile(repo))
    for path in write_reference_scripts(repo):
        print(path)
