"""Runner: whole-run stages get a context, write files outside their directory, atomically."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
from conftest import SMALL_OVERRIDES, write_cohort

import pipeline.preflight as preflight_mod
import pipeline.runner as runner_mod
import pipeline.stages as stages_mod
from pipeline.artifacts import read_stamp, stamp_path
from pipeline.config import load_config
from pipeline.runner import Runner
from pipeline.stages import StageContext, StageResult, StageSpec

CALLS: list[StageContext] = []


def summarise(adata: ad.AnnData, cfg, *, device, context: StageContext) -> StageResult:
    """A whole-run stage: reads a table and the provenance, writes a file and a directory."""
    CALLS.append(context)
    table = pd.read_csv(context.tables_dir / "ingest_samples.tsv", sep="\t")
    stages_done = sorted(context.provenance["stages"])

    def write_summary(path: Path) -> None:
        path.write_text(json.dumps({"samples": len(table), "stages": stages_done}))

    def write_dir(path: Path) -> None:
        (path / "a.txt").write_text("a")

    def failing(path: Path) -> None:
        path.write_text("half")
        if cfg.seed == 99:
            raise RuntimeError("writer failed")

    files = {"summary.json": write_summary, "figs/": write_dir, "late.txt": failing}
    return StageResult(adata[:, :0].copy(), files=files)


@pytest.fixture
def extra_stage(monkeypatch):
    spec = StageSpec(
        name="summary",
        summary="test stage",
        module=__name__,
        func="summarise",
        inputs=("ingest",),
        context=True,
        artifact="final.h5ad",
    )
    stages = (*stages_mod.STAGES, spec)
    monkeypatch.setattr(stages_mod, "STAGES", stages)
    monkeypatch.setattr(runner_mod, "STAGES", stages)
    monkeypatch.setattr(preflight_mod, "STAGES", stages)
    CALLS.clear()
    return spec


def test_context_stage_writes_files_and_custom_artifact(tmp_path, extra_stage):
    sheet = write_cohort(tmp_path / "in")
    out = tmp_path / "out"
    cfg = load_config(None, SMALL_OVERRIDES)
    Runner(sheet, cfg, out).run(until="ingest")
    summary = Runner(sheet, cfg, out).run(stage="summary")
    assert summary.stages == {"summary": "ran"}
    assert len(CALLS) == 1
    assert CALLS[0].outdir == out.resolve()
    assert CALLS[0].provenance["schema"] == "immuneage.provenance/1"
    assert json.loads((out / "summary.json").read_text()) == {"samples": 9, "stages": ["ingest"]}
    assert (out / "figs" / "a.txt").read_text() == "a"
    assert (out / "final.h5ad").exists()
    st = read_stamp(stamp_path(out / "final.h5ad"))
    assert {"summary.json", "figs/a.txt", "late.txt", "final.h5ad"} <= set(st.outputs)
    # current: not re-run; a deleted file output makes it run again
    assert Runner(sheet, cfg, out).run(stage="summary").stages == {"summary": "up to date"}
    (out / "summary.json").unlink()
    assert Runner(sheet, cfg, out).run(stage="summary").stages == {"summary": "ran"}


def test_failing_file_writer_leaves_no_partial_file(tmp_path, extra_stage):
    sheet = write_cohort(tmp_path / "in")
    out = tmp_path / "out"
    Runner(sheet, load_config(None, SMALL_OVERRIDES), out).run(until="ingest")
    cfg = load_config(None, {**SMALL_OVERRIDES, "seed": 99})
    with pytest.raises(RuntimeError, match="writer failed"):
        Runner(sheet, cfg, out).run(stage="summary")
    assert not (out / "late.txt").exists()
    assert not list(out.glob(".late*"))
    assert not stamp_path(out / "final.h5ad").exists()
