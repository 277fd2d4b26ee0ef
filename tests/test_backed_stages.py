"""Backed mode downstream of integrate: annotate, score, differential and report on on-disk X.

The same cells are held twice: in memory, and as ``X`` / ``layers["counts"]`` opened
in place from a real h5ad (``anndata.io.sparse_dataset`` of its groups, what the
runner hands a stage with ``backed: true``). Every computation must give the
in-memory result. A second copy wraps the on-disk matrices in a guard that records
every read and allows contiguous row slices only, proving that no stage loads the
whole matrix or indexes its columns.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from pipeline import keys
from pipeline.config import load_config
from pipeline.datasets import _simulate as sim
from pipeline.errors import InputError
from pipeline.io.ondisk import MappedRows
from pipeline.kernels.sparse import is_row_source
from pipeline.markers import load_marker_panel
from pipeline.report.render import _marker_tables, marker_expression
from pipeline.stages.annotate import run_annotate, score_cell_types
from pipeline.stages.differential import pseudobulk
from pipeline.stages.score import SCORES_KEY, run_score, score_matrix
from pipeline.stats.pseudobulk import pseudobulk_sum

TIMEPOINTS = ["baseline", "acute", "longterm"]
#: Rows per block in the direct calls: 383 cells -> 11 blocks, the last one short.
CHUNK = 37
#: The config's chunk_size (its minimum): 4 blocks in the stage calls.
CFG_CHUNK = 100


def _in_memory() -> ad.AnnData:
    """3 donors x 3 timepoints of the demo simulator: counts, log-normalised X, truth labels."""
    cohort = sim.build_cohort(0, 1600)
    parts, rows = [], []
    for i in range(9):
        spec = cohort.samples[i]
        cells = sim.simulate_sample(cohort, i)
        parts.append(cells.counts)
        for bc, ct, dbl in zip(cells.barcodes, cells.cell_type, cells.is_doublet, strict=True):
            rows.append(
                {
                    keys.SAMPLE: spec.sample,
                    keys.DONOR: spec.donor,
                    keys.TIMEPOINT: spec.timepoint,
                    keys.CELL_TYPE: keys.UNASSIGNED if dbl else str(ct),
                    "name": f"{spec.sample}:{bc}",
                }
            )
    obs = pd.DataFrame(rows).set_index("name")
    obs.index.name = None
    obs[keys.TIMEPOINT] = pd.Categorical(obs[keys.TIMEPOINT], categories=TIMEPOINTS, ordered=True)
    types = [ct.name for ct in cohort.cell_types]
    obs[keys.CELL_TYPE] = pd.Categorical(obs[keys.CELL_TYPE], categories=[*types, keys.UNASSIGNED])
    var = pd.DataFrame(
        {keys.GENE_IDS: cohort.genes["gene_id"].to_numpy()},
        index=pd.Index(cohort.genes["symbol"].to_numpy(), dtype=str),
    )
    counts = sp.csr_matrix(sp.vstack(parts), dtype=np.float32)
    a = ad.AnnData(X=counts.copy(), obs=obs, var=var)
    a.layers[keys.COUNTS] = counts
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    a.obsm[keys.X_UMAP] = np.random.default_rng(0).normal(size=(a.n_obs, 2))
    return a


class _Reads:
    """Row ranges read through the guarded matrices."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def record(self, block: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
        self.ranges.append((start, stop))
        return block

    def max_rows(self) -> int:
        return max((stop - start for start, stop in self.ranges), default=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The in-memory AnnData, its h5ad opened in place, and a read recorder."""
    mem = _in_memory()
    path = Path(tmp_path_factory.mktemp("backed")) / "cells.h5ad"
    mem.write_h5ad(path)
    f = h5py.File(path, "r")
    out = {"mem": mem, "file": f, "reads": _Reads()}
    yield out
    f.close()


def _backed(data: dict, *, guard: bool = False) -> ad.AnnData:
    """A fresh AnnData with the in-memory obs/var/obsm and the on-disk X and counts."""
    mem, f = data["mem"], data["file"]
    x = ad.io.sparse_dataset(f["X"])
    counts = ad.io.sparse_dataset(f["layers"][keys.COUNTS])
    if guard:
        x = MappedRows(x, data["reads"].record, dtype=x.dtype)
        counts = MappedRows(counts, data["reads"].record, dtype=counts.dtype)
    a = ad.AnnData(
        X=x, obs=mem.obs.copy(), var=mem.var.copy(), obsm={k: v for k, v in mem.obsm.items()}
    )
    a.layers[keys.COUNTS] = counts
    assert is_row_source(a.X) and is_row_source(a.layers[keys.COUNTS])
    return a


@pytest.fixture
def guarded(data: dict) -> Iterator[ad.AnnData]:
    """The on-disk copy behind a guard; after the test, every read was one block of rows."""
    data["reads"].ranges.clear()
    yield _backed(data, guard=True)
    reads = data["reads"]
    assert reads.ranges, "the guarded matrices were never read"
    assert reads.max_rows() <= CFG_CHUNK, reads.ranges


def test_on_disk_copy_is_the_same_data(data: dict) -> None:
    mem, b = data["mem"], _backed(data)
    assert b.X.shape == mem.X.shape and b.n_obs > 3 * CFG_CHUNK
    np.testing.assert_array_equal(b.X[10:20].toarray(), mem.X[10:20].toarray())
    with pytest.raises(TypeError, match="contiguous row slices"):
        _backed(data, guard=True).X[:, [0, 1]]


# --------------------------------------------------------------------------- annotate
def test_score_cell_types_matches_in_memory(data: dict) -> None:
    mem = data["mem"]
    panel = load_marker_panel()
    ref = score_cell_types(mem, panel)
    got = score_cell_types(_backed(data), panel, chunk_size=CHUNK)
    assert len(ref.scores.columns) > 5
    pd.testing.assert_frame_equal(got.scores, ref.scores, check_exact=False, atol=1e-6, rtol=0)
    pd.testing.assert_frame_equal(got.coverage, ref.coverage)
    assert got.not_annotatable == ref.not_annotatable and got.genes_used == ref.genes_used


def _annotate(a: ad.AnnData, **annotate) -> ad.AnnData:
    cfg = load_config(
        None, {"chunk_size": CFG_CHUNK, "annotate": {"majority_voting": False, **annotate}}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_annotate(a, cfg, device="cpu").adata


def _same_labels(got: ad.AnnData, ref: ad.AnnData) -> None:
    for col in (keys.CELL_TYPE, keys.CELL_TYPE_CELL_LEVEL, keys.CELL_TYPE_COARSE):
        assert (got.obs[col].astype(str) == ref.obs[col].astype(str)).all(), col
    np.testing.assert_allclose(
        got.obs[keys.CELL_TYPE_CONFIDENCE], ref.obs[keys.CELL_TYPE_CONFIDENCE], atol=1e-6
    )
    pd.testing.assert_frame_equal(
        got.obsm[keys.CELL_TYPE_SCORES],
        ref.obsm[keys.CELL_TYPE_SCORES],
        check_exact=False,
        atol=1e-6,
        rtol=0,
    )


def test_annotate_stage_on_disk_x(data: dict, guarded: ad.AnnData) -> None:
    ref = _annotate(data["mem"].copy())
    _same_labels(_annotate(guarded), ref)


def test_celltypist_in_blocks_matches_one_call(data: dict, tmp_path: Path) -> None:
    celltypist = pytest.importorskip("celltypist")
    mem = data["mem"]
    genes = mem.var_names[np.argsort(-np.asarray(mem.X.power(2).mean(axis=0)).ravel())[:300]]
    labelled = (mem.obs[keys.CELL_TYPE] != keys.UNASSIGNED).to_numpy()
    train = mem[labelled][:, genes].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = celltypist.train(
            train,
            labels=train.obs[keys.CELL_TYPE].astype(str).to_numpy(),
            use_SGD=True,
            max_iter=20,
            feature_selection=False,
            check_expression=False,
            n_jobs=1,
        )
    path = tmp_path / "tiny.pkl"
    model.write(str(path))
    ref = _annotate(mem.copy(), celltypist_model=str(path))
    data["reads"].ranges.clear()
    got = _annotate(_backed(data, guard=True), celltypist_model=str(path))
    assert len(data["reads"].ranges) > 1 and data["reads"].max_rows() <= CFG_CHUNK
    _same_labels(got, ref)


# --------------------------------------------------------------------------- score
def test_score_matrix_on_a_row_source(data: dict) -> None:
    mem = data["mem"]
    sets = {"a": list(mem.var_names[:40:2]), "b": list(mem.var_names[100:160:3])}
    ref, ref_ctrl = score_matrix(mem.X, mem.var_names, sets, seed=1)
    got, ctrl = score_matrix(_backed(data).X, mem.var_names, sets, seed=1, chunk_size=CHUNK)
    assert ctrl == ref_ctrl
    pd.testing.assert_frame_equal(got, ref, check_exact=False, atol=1e-6, rtol=0)


def test_score_stage_on_disk_x(data: dict, guarded: ad.AnnData) -> None:
    cfg = load_config(None, {"chunk_size": CFG_CHUNK})
    ref = run_score(data["mem"].copy(), cfg, device="cpu")
    got = run_score(guarded, cfg, device="cpu")
    assert ref.adata.obsm[SCORES_KEY].shape[1] >= 5
    pd.testing.assert_frame_equal(
        got.adata.obsm[SCORES_KEY], ref.adata.obsm[SCORES_KEY], check_exact=False, atol=1e-6
    )
    pd.testing.assert_frame_equal(
        got.tables["signature_coverage"], ref.tables["signature_coverage"]
    )


@pytest.mark.parametrize("method", ["aucell", "ulm"])
def test_decoupler_methods_need_x_in_memory(data: dict, method: str) -> None:
    cfg = load_config(None, {"score": {"method": method}})
    with pytest.raises(InputError, match=rf"score\.method: {method}.*score_genes"):
        run_score(_backed(data), cfg, device="cpu")


# --------------------------------------------------------------------------- differential
def test_pseudobulk_sum_over_row_blocks(data: dict) -> None:
    mem = data["mem"]
    groups = mem.obs[[keys.DONOR, keys.TIMEPOINT]].copy()
    groups.iloc[:7, 0] = None  # left out
    ref, ref_table = pseudobulk_sum(mem.layers[keys.COUNTS], groups)
    got, table = pseudobulk_sum(_backed(data).layers[keys.COUNTS], groups, chunk_size=CHUNK)
    pd.testing.assert_frame_equal(table, ref_table)
    assert sp.isspmatrix_csr(got) and got.has_sorted_indices
    np.testing.assert_array_equal(got.toarray(), ref.toarray())


def test_pseudobulk_on_disk_counts(data: dict, guarded: ad.AnnData) -> None:
    ref = pseudobulk(data["mem"])
    got = pseudobulk(guarded, chunk_size=CHUNK)
    assert ref.n_obs > 20 and ref.obs["n_cells"].sum() < data["mem"].n_obs  # unassigned out
    pd.testing.assert_frame_equal(got.obs, ref.obs)
    assert list(got.var_names) == list(ref.var_names)
    np.testing.assert_array_equal(got.X.toarray(), ref.X.toarray())


# --------------------------------------------------------------------------- report
def test_marker_expression_on_disk_x(data: dict, guarded: ad.AnnData) -> None:
    mem = data["mem"]
    markers = {
        "CD14 monocyte": ["CD14", "LYZ"],
        "NK": ["NKG7", "GNLY"],
        "B naive": ["MS4A1"],
        "CD8 naive T": ["CD8A", "CD3E", "NOT_A_GENE"],
    }
    ref_mean, ref_frac = marker_expression(mem, markers)
    mean, frac = marker_expression(guarded, markers, chunk_size=CHUNK)
    assert ref_mean.shape == (4, 7)
    pd.testing.assert_frame_equal(mean, ref_mean)
    pd.testing.assert_frame_equal(frac, ref_frac)
    # the in-memory result is the plain per-group mean of the dense columns
    dense = mem[:, list(ref_mean.columns)].X.toarray()
    in_nk = (mem.obs[keys.CELL_TYPE] == "NK").to_numpy()
    np.testing.assert_allclose(ref_mean.loc["NK"], dense[in_nk].mean(axis=0), atol=1e-6)
    # the report's dot-plot tables (panel markers per label), chunk_size from the config
    cfg = load_config(None, {"chunk_size": CFG_CHUNK})
    types = [t for t in mem.obs[keys.CELL_TYPE].cat.categories if t != keys.UNASSIGNED]
    ref_tables = _marker_tables(mem, cfg, types)
    got_tables = _marker_tables(guarded, cfg, types)
    assert ref_tables[0].shape[0] >= 10
    for got_t, ref_t in zip(got_tables, ref_tables, strict=True):
        pd.testing.assert_frame_equal(got_t, ref_t)
