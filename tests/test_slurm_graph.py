"""The job graph is derived from the stage list; a stage outside every group is an error."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline.slurm.graph import GraphError, job_groups, reduce_dependencies
from pipeline.slurm.status import expand_array
from pipeline.slurm.submit import array_spec
from pipeline.stages import STAGES, StageSpec, get_stage


def test_every_stage_is_in_a_group():
    groups = job_groups()  # raises GraphError when STAGES grew without GROUP_TABLE
    covered = [s for g in groups if not g.per_sample for s in g.stages]
    assert sorted(covered) == sorted(s.name for s in STAGES)
    array = next(g for g in groups if g.per_sample)
    assert array.name == "samples"
    assert list(array.stages) == [s.name for s in STAGES if s.per_sample]


def test_groups_follow_the_declared_data_flow():
    groups = {g.name: g for g in job_groups()}
    assert list(groups)[:4] == ["samples", "preprocess", "integrate", "cluster"]
    assert groups["samples"].depends_on == ()
    assert groups["preprocess"].stages[:2] == ("ingest", "qc")  # the merges first
    assert groups["preprocess"].depends_on == ("samples",)
    assert groups["integrate"].depends_on == ("samples", "preprocess")
    assert groups["cluster"].depends_on == ("samples", "preprocess", "integrate")
    order = [g.name for g in job_groups()]
    for g in groups.values():  # dependencies are always earlier groups
        assert all(order.index(d) < order.index(g.name) for d in g.depends_on)


def test_missing_members_are_skipped():
    only = [get_stage(n) for n in ("ingest", "qc", "preprocess")]
    groups = job_groups(only)
    assert [(g.name, g.stages) for g in groups] == [
        ("samples", ("ingest", "qc")),
        ("preprocess", ("ingest", "qc", "preprocess")),
    ]


def test_a_stage_in_no_group_fails_loudly():
    extra = StageSpec(name="velocity", summary="x", module="m", func="f", inputs=("annotate",))
    with pytest.raises(GraphError, match=r"'velocity' belongs to no Slurm job group.*GROUP_TABLE"):
        job_groups([*STAGES, extra])


def test_a_new_per_sample_stage_must_join_the_array():
    unit = StageSpec(
        name="ambient", summary="x", module="m", func="f", sample_func="g", inputs=("ingest",)
    )
    stages = [STAGES[0], unit, *STAGES[1:]]
    with pytest.raises(GraphError, match="'ambient'"):
        job_groups(stages)


def test_a_group_reading_a_later_group_fails():
    bad = replace(get_stage("integrate"), inputs=("annotate",))
    stages = [bad if s.name == "integrate" else s for s in STAGES]
    with pytest.raises(GraphError, match="reads stages of later group"):
        job_groups(stages)


def test_context_stages_wait_for_every_earlier_group():
    report = StageSpec(
        name="report", summary="x", module="m", func="f", inputs=("annotate",), context=True
    )
    stages = [s for s in STAGES if s.name != "report"] + [report]
    groups = {g.name: g for g in job_groups(stages)}
    assert set(groups["report"].depends_on) == set(groups) - {"report"}
    plain = replace(report, context=False)
    groups = {g.name: g for g in job_groups([*stages[:-1], plain])}
    assert set(groups["report"].depends_on) == {"samples", "preprocess", "integrate", "cluster"}


def test_dependencies_reduced_to_submitted_groups():
    groups = {g.name: g for g in job_groups()}
    all_submitted = dict(groups)
    assert reduce_dependencies(groups["cluster"], all_submitted) == ["integrate"]
    assert reduce_dependencies(groups["preprocess"], all_submitted) == ["samples"]
    # integrate up to date, samples re-run: cluster waits for preprocess directly
    partial = {k: v for k, v in groups.items() if k in ("samples", "preprocess", "cluster")}
    assert reduce_dependencies(groups["cluster"], partial) == ["preprocess"]
    assert reduce_dependencies(groups["cluster"], {"cluster": groups["cluster"]}) == []


@pytest.mark.parametrize(
    ("ids", "limit", "spec"),
    [([0], None, "0"), ([0, 1, 2, 3], None, "0-3"), ([5, 0, 1, 2, 7, 8], 4, "0-2,5,7-8%4")],
)
def test_array_spec_round_trips(ids, limit, spec):
    assert array_spec(ids, limit) == spec
    assert expand_array(spec) == sorted(ids)


def test_expand_array_steps():
    assert expand_array("0-6:3,9") == [0, 3, 6, 9]
    with pytest.raises(ValueError):
        array_spec([])
