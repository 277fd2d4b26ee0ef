"""Backed mode (``backed: true``): cohorts larger than memory.

Unit tests of the on-disk artifacts (external links, streamed writes, the lazy
cohort stack) and one end-to-end test: the ci demo run with matrices on disk
gives byte-identical result tables to the same run in memory (torch kernels
backend), while no code path ever reads more than one block of rows of an
on-disk matrix.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipeline import keys
from pipeline.artifacts import read_h5ad_artifact, write_h5ad_atomic
from pipeline.config import DEMO_OVERRIDES, Config, load_config
from pipeline.errors import ImmuneageWarning
from pipeline.io.ondisk import StackedRows, SubsetRows


def _random_counts(n: int, p: int, seed: int) -> sp.csr_matrix:
    x = sp.random(n, p, density=0.2, format="csr", random_state=seed, dtype=np.float32)
    x.data = np.ceil(x.data * 10)
    return x


def _adata(x: sp.csr_matrix, prefix: str = "c") -> ad.AnnData:
    a = ad.AnnData(
        X=x,
        obs=pd.DataFrame(index=[f"{prefix}{i}" for i in range(x.shape[0])]),
        var=pd.DataFrame(index=[f"G{j}" for j in range(x.shape[1])]),
    )
    a.layers[keys.COUNTS] = a.X
    return a


def test_links_and_streamed_matrices(tmp_path: Path) -> None:
    x = _random_counts(300, 40, 0)
    up = tmp_path / "out" / "up" / "up.h5ad"
    write_h5ad_atomic(up, _adata(x))
    opened: list = []
    src = read_h5ad_artifact(up, backed=True, opened=opened)
    assert src.layers[keys.COUNTS] is src.X  # the shared-counts flag survives backed reads
    rows = np.arange(0, 300, 3)
    out = ad.AnnData(X=src.X, obs=src.obs, var=src.var, layers={"sub": src.X})
    path = tmp_path / "out" / "down" / "down.h5ad"
    write_h5ad_atomic(path, out, chunk_size=64)
    standalone = tmp_path / "out" / "final.h5ad"
    lazy = ad.AnnData(obs=src.obs.iloc[rows], var=src.var)
    lazy.X = SubsetRows(src.X, rows)  # computed on the fly, so written block by block
    write_h5ad_atomic(standalone, lazy, link=False, chunk_size=64)
    for f in opened:
        f.close()
    with h5py.File(path) as f:
        link = f.get("X", getlink=True)
        assert isinstance(link, h5py.ExternalLink)
        assert link.filename == "../up/up.h5ad"  # relative: the outdir can move
    with h5py.File(standalone) as f:
        assert isinstance(f.get("X", getlink=True), h5py.HardLink)
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "out", moved)
    back = ad.read_h5ad(moved / "down" / "down.h5ad")
    assert abs(back.X - x).max() == 0 and abs(back.layers["sub"] - x).max() == 0
    final = ad.read_h5ad(moved / "final.h5ad")
    assert abs(final.X - x[rows]).max() == 0


@pytest.mark.parametrize("policy", ["inner", "outer"])
def test_merge_samples_backed_equals_in_memory(tmp_path: Path, policy: str) -> None:
    from pipeline.stages.ingest import merge_samples

    cfg = Config.model_validate({"ingest": {"gene_policy": policy, "min_shared_genes": 5}})
    units = []
    for i, (n, p) in enumerate([(50, 30), (70, 25), (40, 30)]):
        a = _adata(_random_counts(n, p, i), prefix=f"s{i}:")
        if i == 1:  # another gene order and one gene of its own
            a.var_names = [f"G{j}" for j in range(p - 1, 0, -1)] + ["OWN"]
        a.obs[keys.SAMPLE] = f"s{i}"
        a.obs[keys.DONOR] = f"d{i}"
        a.obs[keys.TIMEPOINT] = "baseline"
        path = tmp_path / f"s{i}.h5ad"
        write_h5ad_atomic(path, a)
        units.append(path)
    with pytest.warns(ImmuneageWarning) if policy == "inner" else contextlib.nullcontext():
        mem = merge_samples([read_h5ad_artifact(u) for u in units], cfg)
    opened: list = []
    with pytest.warns(ImmuneageWarning) if policy == "inner" else contextlib.nullcontext():
        lazy = merge_samples(
            [read_h5ad_artifact(u, backed=True, opened=opened) for u in units], cfg
        )
    assert isinstance(lazy.X, StackedRows)
    assert lazy.var_names.equals(mem.var_names) and lazy.obs.equals(mem.obs)
    assert abs(lazy.X[10:130] - mem.X[10:130]).max() == 0
    assert abs(lazy.X.to_memory() - mem.X).max() == 0
    for f in opened:
        f.close()


def test_backed_needs_kernels() -> None:
    with pytest.raises(ValueError, match="backed: true streams"):
        Config.model_validate({"backed": True, "backend": "scanpy"})


# --------------------------------------------------------------------------- end to end
CHUNK = 600


def _guard(monkeypatch: pytest.MonkeyPatch, root: Path, reads: list[int]) -> None:
    """Record the rows of every read of a cohort matrix under ``root``; refuse whole loads.

    Per-sample units (``*/samples/*.h5ad``, one sample each) and the input files
    are read whole on purpose and are not checked.
    """
    from anndata._core.sparse_dataset import BaseCompressedSparseDataset

    original_get = BaseCompressedSparseDataset.__getitem__
    original_mem = BaseCompressedSparseDataset.to_memory

    def cohort_matrix(ds: BaseCompressedSparseDataset) -> bool:
        name = str(Path(ds.group.file.filename).resolve())
        empty = min(ds.shape) == 0  # e.g. the QC artifact: cells x 0 genes
        # cells x genes only (obsp kNN graphs, ~15 values a cell, are read whole)
        if not (ds.group.name == "/X" or ds.group.name.startswith("/layers/")):
            return False
        return name.startswith(str(root)) and "/samples/" not in name and not empty

    def getitem(self, key):  # type: ignore[no-untyped-def]
        if cohort_matrix(self):
            rows = key[0] if isinstance(key, tuple) else key
            n = len(range(*rows.indices(self.shape[0]))) if isinstance(rows, slice) else len(rows)
            reads.append(n)
        return original_get(self, key)

    def to_memory(self):  # type: ignore[no-untyped-def]
        if cohort_matrix(self):
            raise AssertionError(f"a whole on-disk matrix was loaded: {self.group.name}")
        return original_mem(self)

    monkeypatch.setattr(BaseCompressedSparseDataset, "__getitem__", getitem)
    monkeypatch.setattr(BaseCompressedSparseDataset, "to_memory", to_memory)


@pytest.mark.slow
def test_backed_run_equals_in_memory_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.datasets import demo_cohort
    from pipeline.runner import Runner

    demo = demo_cohort(tmp_path / "cohort", size="ci", seed=0)
    base = {**DEMO_OVERRIDES, "backend": "kernels"}
    base["integrate"] = {**DEMO_OVERRIDES["integrate"], "max_epochs": 5}
    mem_cfg = load_config(None, base)
    backed_cfg = load_config(None, {**base, "backed": True, "chunk_size": CHUNK})
    Runner(demo.samplesheet, mem_cfg, tmp_path / "mem").run()
    reads: list[int] = []
    with monkeypatch.context() as m:
        _guard(m, (tmp_path / "backed").resolve(), reads)
        Runner(demo.samplesheet, backed_cfg, tmp_path / "backed").run()
    n_cells = ad.read_h5ad(tmp_path / "mem" / "preprocess" / "preprocess.h5ad", backed="r").n_obs
    assert n_cells > 2 * 1024 > CHUNK
    # blocks of CHUNK rows, scVI minibatches (<= 1024 rows for the latent space)
    assert reads and max(reads) <= 1024

    tables = sorted((tmp_path / "mem" / "tables").rglob("*.tsv"))
    assert len(tables) > 15
    for t in tables:
        twin = tmp_path / "backed" / t.relative_to(tmp_path / "mem")
        if t.name == "integration_metrics.tsv":
            # X_pca's metrics: the streamed PCA accumulates its float32 products block by
            # block, another order than in memory; trailing components then differ by
            # ~1e-4 relative, so the metrics agree to 1e-5, not to the last printed digit
            a, b = (pd.read_csv(p, sep="\t") for p in (t, twin))
            pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-5, rtol=0)
            continue
        assert twin.read_bytes() == t.read_bytes(), t.name

    # after preprocess, artifacts link to its matrices instead of copying them
    for stage in ("integrate", "cluster", "annotate", "score"):
        with h5py.File(tmp_path / "backed" / stage / f"{stage}.h5ad") as f:
            link = f.get("X", getlink=True)
            assert isinstance(link, h5py.ExternalLink), stage
            assert link.filename == "../preprocess/preprocess.h5ad"
    # the final AnnData is whole and equal to the in-memory one
    final = tmp_path / "backed" / "immuneage.h5ad"
    with h5py.File(final) as f:
        assert isinstance(f.get("X", getlink=True), h5py.HardLink)
    a, b = ad.read_h5ad(final), ad.read_h5ad(tmp_path / "mem" / "immuneage.h5ad")
    assert abs(a.X - b.X).max() == 0
    assert abs(a.layers[keys.COUNTS] - b.layers[keys.COUNTS]).max() == 0
    assert np.array_equal(a.obsm[keys.X_SCVI], b.obsm[keys.X_SCVI])
    pd.testing.assert_frame_equal(a.obs, b.obs)
