"""The Slurm job graph, derived from the stage list at run time.

Stages are bundled into *job groups*, one Slurm job each (the per-sample group is
a job array, one task per sample). :data:`GROUP_TABLE` says which stages each
group runs; members that are not (yet) in :data:`pipeline.stages.STAGES` are
left out, groups left empty are dropped, and a stage that belongs to no group
is an error (:class:`GraphError`), so a new stage cannot silently be missing
from Slurm runs.

A per-sample stage (``spec.per_sample``) runs twice: its units in the
``samples`` array (each task runs every per-sample stage for its sample alone)
and its merge in a cohort group (``preprocess``). Dependencies between groups
follow the data flow the stages declare (``spec.inputs``); a stage that reads
the whole output directory so far (``spec.context``) depends on every earlier
group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ImmuneageError
from ..stages import STAGES, StageSpec

__all__ = [
    "GROUP_NAMES",
    "GROUP_TABLE",
    "PER_SAMPLE_GROUP",
    "GraphError",
    "JobGroup",
    "job_groups",
]

#: Job group -> the stages it runs, in order. ``samples`` is the per-sample array
#: (the units of every per-sample stage); the others run whole-cohort steps
#: (``preprocess`` starts with the merges of the per-sample stages).
GROUP_TABLE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("samples", ("ingest", "qc")),
    ("preprocess", ("ingest", "qc", "preprocess")),
    ("integrate", ("integrate",)),
    ("cluster", ("cluster", "annotate")),
    ("score", ("score",)),
    ("differential", ("differential",)),
    ("report", ("report",)),
)

#: The group run as a job array, one task per sample.
PER_SAMPLE_GROUP = "samples"

#: Every job group name, in graph order (profiles may configure any of them).
GROUP_NAMES: tuple[str, ...] = tuple(name for name, _ in GROUP_TABLE)


class GraphError(ImmuneageError):
    """The group table does not cover the stage list (a bug in immuneage: exit code 1)."""


@dataclass(frozen=True)
class JobGroup:
    """One Slurm job of the graph.

    Attributes
    ----------
    name
        Group name (job name ``immuneage-<name>``, profile key, script ``<name>.sbatch``).
    stages
        The stages it runs, in order (``immuneage run --stage X`` each).
    per_sample
        Whether it is the job array running each sample's units.
    depends_on
        Every group that must complete first (transitively closed), in graph order.
    """

    name: str
    stages: tuple[str, ...]
    per_sample: bool
    depends_on: tuple[str, ...]


def job_groups(stages: Sequence[StageSpec] | None = None) -> list[JobGroup]:
    """The job groups of ``stages`` (default: :data:`pipeline.stages.STAGES`), in graph order.

    Raises
    ------
    GraphError
        A stage belongs to no group (or to two), a per-sample stage is missing from
        the array group, or a group runs a stage before one it reads.
    """
    specs = list(STAGES if stages is None else stages)
    by_name = {s.name: s for s in specs}
    order = {s.name: i for i, s in enumerate(specs)}
    table = [(g, tuple(m for m in members if m in by_name)) for g, members in GROUP_TABLE]
    table = [(g, members) for g, members in table if members]
    fix = "; update GROUP_TABLE in pipeline/slurm/graph.py"

    cohort_home: dict[str, str] = {}  # stage -> group running its whole-cohort part
    for g, members in table:
        if list(members) != sorted(members, key=order.__getitem__):
            raise GraphError(f"job group {g!r} runs {members} out of stage order{fix}")
        if g == PER_SAMPLE_GROUP:
            bad = [m for m in members if not by_name[m].per_sample]
            if bad:
                raise GraphError(f"stage(s) {bad} in the per-sample group are not per-sample{fix}")
            continue
        for m in members:
            if m in cohort_home:
                raise GraphError(f"stage {m!r} is in job groups {cohort_home[m]!r} and {g!r}{fix}")
            cohort_home[m] = g
    array_members = dict(table).get(PER_SAMPLE_GROUP, ())
    for s in specs:
        if s.name not in cohort_home:
            raise GraphError(
                f"stage {s.name!r} belongs to no Slurm job group (groups: {', '.join(GROUP_NAMES)}){fix}"
            )
        if s.per_sample and s.name not in array_members:
            raise GraphError(
                f"per-sample stage {s.name!r} is not in the {PER_SAMPLE_GROUP!r} group{fix}"
            )

    names = [g for g, _ in table]
    rank = {g: i for i, g in enumerate(names)}
    direct: dict[str, set[str]] = {g: set() for g in names}
    for g, members in table:
        if g == PER_SAMPLE_GROUP:
            for m in members:
                for up in by_name[m].inputs:
                    if up not in array_members:
                        raise GraphError(
                            f"per-sample stage {m!r} reads {up!r}, which has no per-sample units{fix}"
                        )
            continue
        for m in members:
            spec = by_name[m]
            ups = {cohort_home[u] for u in spec.inputs}
            if spec.per_sample:
                ups.add(PER_SAMPLE_GROUP)
            if getattr(spec, "context", False):  # reads everything written so far
                ups |= {h for h in names if rank[h] < rank[g]}
            ups.discard(g)
            late = [u for u in ups if rank[u] > rank[g]]
            if late:
                raise GraphError(
                    f"stage {m!r} in group {g!r} reads stages of later group(s) {late}{fix}"
                )
            direct[g] |= ups

    closed: dict[str, set[str]] = {}
    for g in names:  # graph order: every dependency is closed before its dependents
        closed[g] = set(direct[g]).union(*(closed[d] for d in direct[g]))
    return [
        JobGroup(
            name=g,
            stages=members,
            per_sample=g == PER_SAMPLE_GROUP,
            depends_on=tuple(sorted(closed[g], key=rank.__getitem__)),
        )
        for g, members in table
    ]


def reduce_dependencies(group: JobGroup, submitted: dict[str, JobGroup]) -> list[str]:
    """The groups among ``submitted`` that ``group`` must wait for directly.

    Dependencies on groups not submitted (up to date) are dropped; one already
    implied by another submitted dependency is dropped too (``afterok`` chains).
    """
    deps = [d for d in group.depends_on if d in submitted]
    return [d for d in deps if not any(d in submitted[e].depends_on for e in deps if e != d)]
