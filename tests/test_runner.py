"""Runner: stamps, resume, forced re-runs, atomicity, locking, clean failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import SMALL_OVERRIDES, run_argv, tree_checksums, write_cohort

from pipeline.artifacts import (
    atomic_path,
    read_h5ad_artifact,
    read_stamp,
    remove_stale_temporaries,
    stamp_path,
)
from pipeline.config import load_config
from pipeline.errors import InputError, LockError
from pipeline.lock import outdir_lock
from pipeline.runner import Runner
from pipeline.stages import stage_names

SAMPLES = [f"{d}_{t}" for d in ("D1", "D2", "D3") for t in ("baseline", "acute", "longterm")]


STAGES = tuple(stage_names())
ALL = dict.fromkeys(STAGES, "ran")
CURRENT = dict.fromkeys(STAGES, "up to date")


def _cfg(**extra):
    return load_config(None, {**SMALL_OVERRIDES, **extra})


def _run(sheet: Path, outdir: Path, **kw):
    return Runner(sheet, _cfg(), outdir).run(**kw)


def _same_adata(a: ad.AnnData, b: ad.AnnData) -> None:
    assert list(a.obs_names) == list(b.obs_names)
    assert list(a.var_names) == list(b.var_names)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert (a.layers["counts"] != b.layers["counts"]).nnz == 0


def test_run_writes_artifacts_stamps_and_provenance(cohort, tmp_path):
    out = tmp_path / "out"
    summary = _run(cohort, out)
    assert summary.stages == ALL
    merged = out / "ingest" / "ingest.h5ad"
    st = read_stamp(stamp_path(merged))
    assert st is not None and st.outputs_present(out)
    for s in SAMPLES:
        assert (out / "ingest" / "samples" / f"{s}.h5ad").is_file()
    a = ad.read_h5ad(merged)
    assert a.n_obs == sum(30 + k for k in range(9))
    assert a.uns["immuneage"]["version"]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["seed"] == 0
    assert prov["device"]["resolved"] == "cpu"
    assert [i["sample"] for i in prov["inputs"]] == SAMPLES
    assert all(len(i["sha256"]) == 64 for i in prov["inputs"])
    assert prov["stages"]["ingest"]["wall_s"] >= 0
    assert prov["stages"]["ingest"]["peak_rss_mb"] > 0
    assert set(prov["stages"]["ingest"]["units"]) == set(SAMPLES)
    assert prov["packages"]["anndata"]
    assert not list(out.rglob("*.tmp-*"))


def test_rerun_skips_and_changes_rerun_only_what_changed(cohort, tmp_path):
    out = tmp_path / "out"
    _run(cohort, out)
    merged = out / "ingest" / "ingest.h5ad"
    mtime = merged.stat().st_mtime_ns
    assert _run(cohort, out).stages == CURRENT
    assert merged.stat().st_mtime_ns == mtime

    # touching a file without changing its bytes: re-hashed, nothing re-run
    src = cohort.parent / "data" / "D1_baseline.h5ad"
    os.utime(src, ns=(time.time_ns(), time.time_ns()))
    assert _run(cohort, out).stages == CURRENT

    # a sheet column only the report reads (age): only the report re-runs, and its
    # final AnnData has the new value, numeric
    unit = out / "ingest" / "samples"
    before = {s: (unit / f"{s}.h5ad").stat().st_mtime_ns for s in SAMPLES}
    sheet = pd.read_csv(cohort, dtype=str)
    sheet.loc[sheet["sample"] == "D2_acute", "age"] = "99"
    sheet.to_csv(cohort, index=False)
    assert _run(cohort, out).stages == {**CURRENT, "report": "ran"}
    final = ad.read_h5ad(out / "immuneage.h5ad")
    assert final.obs["age"].dtype == np.int64
    assert set(final.obs.loc[final.obs["sample"] == "D2_acute", "age"]) == {99}

    # changing one sample's counts re-runs that sample's unit, the merge and what follows
    src = cohort.parent / "data" / "D2_baseline.h5ad"
    a = ad.read_h5ad(src)
    a.X.data[0] += 1
    a.layers["counts"] = a.X.copy()
    a.write_h5ad(src)
    assert _run(cohort, out).stages == ALL
    after = {s: (unit / f"{s}.h5ad").stat().st_mtime_ns for s in SAMPLES}
    assert [s for s in SAMPLES if before[s] != after[s]] == ["D2_baseline"]


def test_force_and_from_rerun(cohort, tmp_path):
    out = tmp_path / "out"
    _run(cohort, out)
    assert _run(cohort, out, force=True).stages == ALL
    assert _run(cohort, out, from_stage="ingest").stages == ALL
    assert _run(cohort, out, from_stage="qc").stages == {**ALL, "ingest": "up to date"}
    assert _run(cohort, out, until="qc").stages == {"ingest": "up to date", "qc": "up to date"}


def test_config_change_reruns_the_stage(cohort, tmp_path):
    out = tmp_path / "out"
    _run(cohort, out)
    cfg = _cfg(ingest={"gene_policy": "outer"})
    assert Runner(cohort, cfg, out).run().stages["ingest"] == "ran"
    # a key only later stages read leaves ingest current
    cfg2 = _cfg(ingest={"gene_policy": "outer"}, seed=7)
    assert Runner(cohort, cfg2, out).run().stages == {**ALL, "ingest": "up to date"}
    cfg3 = _cfg(
        ingest={"gene_policy": "outer"},
        seed=7,
        preprocess={**SMALL_OVERRIDES["preprocess"], "n_comps": 5},
    )
    # preprocess and everything downstream of it re-run
    assert Runner(cohort, cfg3, out).run().stages == {
        **CURRENT,
        **dict.fromkeys(STAGES[STAGES.index("preprocess") :], "ran"),
    }


def test_missing_artifact_is_rebuilt(cohort, tmp_path):
    out = tmp_path / "out"
    _run(cohort, out)
    (out / "ingest" / "samples" / "D3_longterm.h5ad").unlink()
    assert _run(cohort, out).stages["ingest"] == "ran"
    assert (out / "ingest" / "samples" / "D3_longterm.h5ad").is_file()


def test_single_sample_unit_then_merge(cohort, tmp_path):
    """What a Slurm array task does: one sample alone, then the merge in a later job."""
    out = tmp_path / "out"
    s = _run(cohort, out, stage="ingest", sample="D1_acute")
    assert s.stages == {"ingest": "ran"}
    assert [p.name for p in (out / "ingest" / "samples").glob("*.h5ad")] == ["D1_acute.h5ad"]
    assert not (out / "ingest" / "ingest.h5ad").exists()
    assert not (out / "provenance.json").exists()
    _run(cohort, out)
    assert (out / "ingest" / "ingest.h5ad").is_file()


def test_slurm_like_sequence_of_per_sample_tasks(cohort, tmp_path):
    """ingest array, then qc array (before any merge), then one whole run merging everything."""
    out = tmp_path / "out"
    with pytest.raises(InputError, match="--stage ingest --sample D1_acute"):
        _run(cohort, out, stage="qc", sample="D1_acute")
    for s in SAMPLES:
        assert _run(cohort, out, stage="ingest", sample=s).stages == {"ingest": "ran"}
    for s in SAMPLES:
        assert _run(cohort, out, stage="qc", sample=s).stages == {"qc": "ran"}
    assert not (out / "ingest" / "ingest.h5ad").exists()
    assert _run(cohort, out).stages == ALL  # merges run; no unit is redone
    st = read_stamp(stamp_path(out / "qc" / "samples" / "D1_acute.h5ad"))
    assert st is not None and st.unit == "D1_acute"
    assert _run(cohort, out).stages == CURRENT


def test_unknown_sample_is_an_input_error(cohort, tmp_path):
    with pytest.raises(InputError, match="not in"):
        _run(cohort, tmp_path / "out", stage="ingest", sample="nope")
    assert not (tmp_path / "out").exists()


def test_bad_file_mid_run_leaves_no_output(tmp_path):
    sheet = write_cohort(tmp_path / "in")
    # a structurally valid file whose values are bad is only found when it is read in full
    bad = tmp_path / "in" / "data" / "D3_baseline.h5ad"
    a = ad.read_h5ad(bad)
    a.X.data[0] = 0.5
    a.layers["counts"] = a.X.copy()
    a.write_h5ad(bad)
    before = tree_checksums(tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        _run(sheet, out)
    assert "D3_baseline" in str(err.value)
    assert not out.exists()
    assert tree_checksums(tmp_path / "in") == before


def test_bad_input_on_resume_keeps_earlier_results(tmp_path):
    sheet = write_cohort(tmp_path / "in")
    out = tmp_path / "out"
    _run(sheet, out)
    listing = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    bad = tmp_path / "in" / "data" / "D3_baseline.h5ad"
    a = ad.read_h5ad(bad)
    a.X.data[0] = -3
    a.layers["counts"] = a.X.copy()
    a.write_h5ad(bad)
    with pytest.raises(InputError):
        _run(sheet, out)
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == listing


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "x.txt"
    final.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert final.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "ingest").mkdir()
    stray = tmp_path / "ingest" / ".ingest.tmp-123.h5ad"
    stray.write_text("x")
    keep = tmp_path / "ingest" / "ingest.h5ad"
    keep.write_text("y")
    assert remove_stale_temporaries(tmp_path) == [stray]
    assert keep.exists()


def test_lock_refuses_a_second_run(cohort, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with outdir_lock(out):
        with pytest.raises(LockError, match=f"pid {os.getpid()}"):
            _run(cohort, out)
        with pytest.raises(LockError):
            _run(cohort, out, stage="ingest", sample="D1_acute")
    # per-sample tasks share the directory, but not the same sample
    with outdir_lock(out, sample="D1_acute"):
        _run(cohort, out, stage="ingest", sample="D2_acute")
        with pytest.raises(LockError, match="D1_acute"):
            _run(cohort, out, stage="ingest", sample="D1_acute")
        with pytest.raises(LockError):
            _run(cohort, out)
    _run(cohort, out)  # released


def test_gpu_request_without_gpu_is_an_error(cohort, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cfg = _cfg(device="gpu")
    with pytest.raises(InputError, match="no usable CUDA device"):
        Runner(cohort, cfg, tmp_path / "out").run()
    assert not (tmp_path / "out").exists()


def _read_all(out: Path) -> dict[str, ad.AnnData]:
    from pipeline.artifacts import read_h5ad_artifact

    return {p.name: read_h5ad_artifact(p) for p in sorted((out / "ingest").rglob("*.h5ad"))}


def _read_all_qc(out: Path) -> dict[str, pd.DataFrame]:
    return {p.name: ad.read_h5ad(p).obs for p in sorted((out / "qc").rglob("*.h5ad"))}


@pytest.fixture(scope="module")
def killable(tmp_path_factory):
    """A cohort big enough that a run takes a few seconds, and its uninterrupted result."""
    root = tmp_path_factory.mktemp("kill")
    sheet = write_cohort(root / "in", n_cells=300, n_genes=1500)
    ref = root / "ref"
    _run(sheet, ref)
    return sheet, ref


# 20 + one stamp per cohort stage: 9 ingest units + merge, 9 qc units + merge, then the rest.
# One kill point in each kind of work a run does (CI time: each point is two runs):
# in the first ingest unit, among the ingest units, in the qc units after the ingest merge,
# in preprocess after the qc merge, in cluster after scVI, and in differential.
N_STAMPS = 20 + sum(1 for name in stage_names() if name not in ("ingest", "qc"))
# stage -> the number of stamps on disk while it runs
_RUNNING_AT = {
    name: 20 + i for i, name in enumerate(n for n in stage_names() if n not in ("ingest", "qc"))
}
KILL_POINTS = [
    0,
    5,
    10,
    _RUNNING_AT["preprocess"],
    _RUNNING_AT["cluster"],
    _RUNNING_AT["differential"],
]
assert all(0 <= k < N_STAMPS for k in KILL_POINTS)


@pytest.mark.parametrize("kill_after_stamps", KILL_POINTS)
def test_sigkill_then_resume_matches_uninterrupted(killable, tmp_path, kill_after_stamps):
    """Kill a real `immuneage run` with SIGKILL mid-run; the rerun finishes with identical outputs."""
    sheet, ref = killable
    out = tmp_path / "out"
    cmd = run_argv(sheet, out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    rng = np.random.default_rng(kill_after_stamps)
    while time.time() < deadline and proc.poll() is None:
        stamps = list(out.rglob("*.stamp.json")) if out.exists() else []
        if len(stamps) >= kill_after_stamps:
            time.sleep(float(rng.uniform(0, 0.2)))
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # nothing half-written under a final name: every stamp's outputs are complete
    for st_file in out.rglob("*.stamp.json"):
        st = json.loads(st_file.read_text())
        for rel, meta in st["outputs"].items():
            assert (out / rel).stat().st_size == meta["size"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not list(out.rglob("*.tmp-*"))
    got, want = _read_all(out), _read_all(ref)
    assert got.keys() == want.keys()
    for name in want:
        _same_adata(got[name], want[name])
    got_qc, want_qc = _read_all_qc(out), _read_all_qc(ref)
    assert got_qc.keys() == want_qc.keys()
    for name in want_qc:
        pd.testing.assert_frame_equal(got_qc[name], want_qc[name])
    a, b = (ad.read_h5ad(d / "preprocess" / "preprocess.h5ad") for d in (out, ref))
    np.testing.assert_array_equal(a.obsm["X_pca"], b.obsm["X_pca"])
    assert (a.X != b.X).nnz == 0
    a, b = (read_h5ad_artifact(d / "annotate" / "annotate.h5ad") for d in (out, ref))
    np.testing.assert_array_equal(a.obsm["X_scVI"], b.obsm["X_scVI"])
    assert (a.obs["cell_type"] == b.obs["cell_type"]).all()
    tables = sorted(p.relative_to(ref) for p in (ref / "tables").rglob("*.tsv"))
    assert tables == sorted(p.relative_to(out) for p in (out / "tables").rglob("*.tsv"))
    for table in tables:
        assert (out / table).read_bytes() == (ref / table).read_bytes(), table
    assert (out / "report.html").is_file()


def test_raw_count_artifacts_store_the_matrix_once(cohort, tmp_path):
    import h5py

    from pipeline.artifacts import read_h5ad_artifact

    out = tmp_path / "out"
    _run(cohort, out, until="ingest")
    path = out / "ingest" / "ingest.h5ad"
    with h5py.File(path, "r") as f:
        assert "counts" not in f["layers"]
    a = read_h5ad_artifact(path)
    assert a.layers["counts"] is a.X
    assert "immuneage_x_is_counts" not in a.uns
