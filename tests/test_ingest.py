"""The ingest stage: per-sample annotation and the merge's gene policies."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipeline import keys
from pipeline.config import Config
from pipeline.errors import DataFileError, ImmuneageWarning
from pipeline.io import SampleRow, write_10x_h5, write_10x_mtx
from pipeline.stages.ingest import ingest_sample, merge_obsm, merge_samples, merge_var

TIMEPOINTS = ["baseline", "acute", "longterm"]


def make_counts(genes: list[str], n_cells: int, seed: int) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = rng.poisson(0.8, size=(n_cells, len(genes))).astype(np.float32)
    obs = pd.DataFrame(index=[f"AC{seed:02d}{i:05d}-1" for i in range(n_cells)])
    var = pd.DataFrame({"gene_ids": [f"ID_{g}_{seed}" for g in genes]}, index=genes)
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=var)


def config(**ingest) -> Config:
    return Config.model_validate({"ingest": {"min_shared_genes": 10, **ingest}})


def sha_tree(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def row(path: Path, sample: str, donor: str, timepoint: str, i: int) -> SampleRow:
    return SampleRow(sample, donor, timepoint, path, i + 2, {"age": str(30 + i), "batch": "b1"})


def genes(n: int, start: int = 0) -> list[str]:
    return [f"G{i}" for i in range(start, start + n)]


def test_ingest_sample(tmp_path: Path) -> None:
    src = make_counts(genes(60), 40, seed=1)
    path = write_10x_h5(src, tmp_path / "s.h5")
    before = sha_tree(tmp_path)
    out = ingest_sample(row(path, "D1_acute", "D1", "acute", 0), config())

    assert list(out.obs_names) == [f"D1_acute:{b}" for b in src.obs_names]
    assert list(out.obs[keys.BARCODE]) == list(src.obs_names)
    assert list(out.obs.columns) == ["sample", "donor", "timepoint", "barcode", "age", "batch"]
    tp = out.obs[keys.TIMEPOINT]
    assert tp.cat.ordered
    assert list(tp.cat.categories) == TIMEPOINTS
    assert set(tp) == {"acute"}
    assert set(out.obs[keys.SAMPLE]) == {"D1_acute"}
    assert set(out.obs["age"]) == {"30"}
    info = out.uns[keys.UNS]["ingest"]
    assert {k: info[k] for k in ("sample", "source", "format", "libraries")} == {
        "sample": "D1_acute",
        "source": str(path),
        "format": "10x_h5",
        "libraries": "",
    }
    assert info["read"]["file"] == str(path)
    assert out.layers[keys.COUNTS] is out.X
    np.testing.assert_array_equal(out.X.toarray(), src.X.toarray())
    assert sha_tree(tmp_path) == before


def test_too_few_cells(tmp_path: Path) -> None:
    path = write_10x_mtx(make_counts(genes(60), 12, seed=1), tmp_path / "mtx")
    with pytest.raises(DataFileError, match="min_cells_per_sample") as info:
        ingest_sample(row(path, "S1", "D1", "baseline", 0), config(min_cells_per_sample=13))
    assert str(path) in str(info.value)
    assert "12 cells" in str(info.value)


def _ingest_three(tmp_path: Path, gene_lists: list[list[str]]) -> tuple[list, list[ad.AnnData]]:
    """Three samples in three formats; returns the ingested AnnDatas and the sources."""
    sources, outs = [], []
    specs = [
        ("D1_base", "D1", "baseline"),
        ("D1_acute", "D1", "acute"),
        ("D2_base", "D2", "baseline"),
    ]
    for i, ((sample, donor, tp), gl) in enumerate(zip(specs, gene_lists, strict=True)):
        src = make_counts(gl, 20 + i, seed=i)
        if i == 0:
            path = tmp_path / f"{sample}.h5ad"
            src.write_h5ad(path)
        elif i == 1:
            path = write_10x_h5(src, tmp_path / f"{sample}.h5")
        else:
            path = write_10x_mtx(src, tmp_path / f"{sample}_mtx")
        sources.append(src)
        outs.append(ingest_sample(row(path, sample, donor, tp, i), config()))
    return sources, outs


GENE_LISTS = [genes(50), genes(50, start=5)[::-1], [*genes(45, start=2), "EXTRA"]]


def _expected(src: ad.AnnData, order: list[str]) -> np.ndarray:
    """src's counts in the column order ``order`` (zeros for genes it lacks)."""
    dense = src.X.toarray()
    out = np.zeros((src.n_obs, len(order)), dtype=np.float32)
    for j, g in enumerate(order):
        if g in src.var_names:
            out[:, j] = dense[:, src.var_names.get_loc(g)]
    return out


def test_merge_inner(tmp_path: Path) -> None:
    sources, outs = _ingest_three(tmp_path, GENE_LISTS)
    shared = [g for g in GENE_LISTS[0] if all(g in gl for gl in GENE_LISTS)]
    n_union = len({g for gl in GENE_LISTS for g in gl})
    assert (len(shared), n_union) == (42, 56)
    with pytest.warns(ImmuneageWarning, match=r"drops 14 gene\(s\)"):
        merged = merge_samples(outs, config())

    assert list(merged.var_names) == shared  # first sample's order
    assert isinstance(merged.X, sp.csr_matrix)
    assert merged.X.dtype == np.float32
    assert merged.layers[keys.COUNTS] is merged.X
    expected = np.vstack([_expected(s, shared) for s in sources])
    np.testing.assert_array_equal(merged.X.toarray(), expected)
    assert list(merged.var[keys.GENE_IDS]) == [f"ID_{g}_0" for g in shared]

    assert list(merged.obs[keys.SAMPLE].cat.categories) == ["D1_base", "D1_acute", "D2_base"]
    assert list(merged.obs[keys.SAMPLE]) == ["D1_base"] * 20 + ["D1_acute"] * 21 + ["D2_base"] * 22
    tp = merged.obs[keys.TIMEPOINT]
    assert tp.cat.ordered
    assert list(tp.cat.categories) == TIMEPOINTS
    assert list(merged.obs[keys.DONOR].cat.categories) == ["D1", "D2"]
    assert merged.obs_names[0] == f"D1_base:{sources[0].obs_names[0]}"
    info = merged.uns[keys.UNS]["ingest"]
    assert info == {
        "gene_policy": "inner",
        "n_samples": 3,
        "n_cells_per_sample": {"D1_base": 20, "D1_acute": 21, "D2_base": 22},
        "n_genes": len(shared),
        "genes_dropped": 14,
    }


def test_merge_outer(tmp_path: Path) -> None:
    sources, outs = _ingest_three(tmp_path, GENE_LISTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImmuneageWarning)
        merged = merge_samples(outs, config(gene_policy="outer"))

    union = list(dict.fromkeys(g for gl in GENE_LISTS for g in gl))  # first appearance
    assert list(merged.var_names) == union
    assert isinstance(merged.X, sp.csr_matrix)
    assert merged.X.dtype == np.float32
    assert merged.layers[keys.COUNTS] is merged.X
    expected = np.vstack([_expected(s, union) for s in sources])
    np.testing.assert_array_equal(merged.X.toarray(), expected)
    assert merged.X.nnz == np.count_nonzero(expected)
    # gene ids from the first sample holding each gene
    assert merged.var.loc["G0", keys.GENE_IDS] == "ID_G0_0"
    assert merged.var.loc["G54", keys.GENE_IDS] == "ID_G54_1"
    assert merged.var.loc["EXTRA", keys.GENE_IDS] == "ID_EXTRA_2"
    assert merged.uns[keys.UNS]["ingest"]["genes_dropped"] == 0
    assert merged.uns[keys.UNS]["ingest"]["n_genes"] == len(union)


def test_merge_after_h5ad_round_trip(tmp_path: Path) -> None:
    """The runner saves each sample and reads it back before merging; the result must save too."""
    _, outs = _ingest_three(tmp_path, [genes(50)] * 3)
    reread = []
    for i, a in enumerate(outs):
        p = tmp_path / f"unit{i}.h5ad"
        a.write_h5ad(p)
        reread.append(ad.read_h5ad(p))
    direct = merge_samples(outs, config())
    merged = merge_samples(reread, config())
    np.testing.assert_array_equal(merged.X.toarray(), direct.X.toarray())
    pd.testing.assert_frame_equal(merged.obs, direct.obs)
    assert merged.uns[keys.UNS] == direct.uns[keys.UNS]
    out = tmp_path / "merged.h5ad"
    merged.write_h5ad(out)
    back = ad.read_h5ad(out)
    assert list(back.obs[keys.TIMEPOINT].cat.categories) == TIMEPOINTS
    assert back.obs[keys.TIMEPOINT].cat.ordered
    assert back.uns[keys.UNS]["ingest"]["n_samples"] == 3


def test_too_few_shared_genes(tmp_path: Path) -> None:
    # overlaps: s0-s1 = 20, s0-s2 = 3, s1-s2 = 10; all three share 3
    lists = [genes(30), genes(30, start=10), genes(20, start=27)]
    _, outs = _ingest_three(tmp_path, lists)
    with pytest.raises(DataFileError, match="min_shared_genes") as info:
        merge_samples(outs, config())
    msg = str(info.value)
    assert "only 3 genes" in msg
    assert "'D1_base' (30 genes) and 'D2_base' (20 genes): 3 genes in common" in msg
    assert "same reference" in msg
    assert "gene_policy" in msg
    # outer keeps the union instead
    merged = merge_samples(outs, config(gene_policy="outer"))
    assert merged.n_vars == 47


def test_merge_single_sample(tmp_path: Path) -> None:
    _, outs = _ingest_three(tmp_path, [genes(50)] * 3)
    merged = merge_samples(outs[:1], config(min_shared_genes=1000))
    assert merged.n_obs == 20
    assert list(merged.obs[keys.SAMPLE].cat.categories) == ["D1_base"]


def test_merge_nothing() -> None:
    with pytest.raises(ValueError, match="at least one"):
        merge_samples([], config())


def test_merge_var_columns_some_samples_lack(tmp_path: Path) -> None:
    """ids, feature types, flags and numbers: first non-missing value per gene; writes and reads."""
    a = pd.DataFrame(
        {"gene_symbol_original": ["A", "B", "C"], "flag": [True, False, True], "n": [1, 2, 3]},
        index=["A", "B", "C"],
    )
    b = pd.DataFrame(
        {
            "gene_ids": ["", "ID_C", "ID_D"],  # "" counts as missing
            "feature_types": pd.Categorical(["Gene Expression"] * 3),
            "gene_symbol_original": ["B", "C", "D"],
            "score": [0.5, np.nan, 1.5],
        },
        index=["B", "C", "D"],
    )
    c = pd.DataFrame({"gene_ids": ["ID_B", "ID_C2", "ID_A"]}, index=["B", "C", "A"])
    order = pd.Index(["A", "B", "C", "D"])
    var = merge_var([a, b, c], order)
    assert list(var.columns) == [
        "gene_symbol_original",
        "flag",
        "n",
        "gene_ids",
        "feature_types",
        "score",
    ]
    assert var["gene_ids"].tolist() == ["ID_A", "ID_B", "ID_C", "ID_D"]
    assert var["feature_types"].tolist() == [
        "",
        "Gene Expression",
        "Gene Expression",
        "Gene Expression",
    ]
    assert var["gene_symbol_original"].tolist() == ["A", "B", "C", "D"]
    assert str(var["flag"].dtype) == "boolean" and pd.isna(var.loc["D", "flag"])
    assert str(var["n"].dtype) == "Int64" and var.loc["C", "n"] == 3
    assert var.loc["D", "score"] == 1.5 and np.isnan(var.loc["A", "score"])
    for column in ("gene_ids", "feature_types", "gene_symbol_original"):
        assert var[column].map(type).eq(str).all()
    path = tmp_path / "v.h5ad"
    ad.AnnData(X=sp.csr_matrix((2, 4), dtype=np.float32), var=var).write_h5ad(path)
    back = ad.read_h5ad(path).var
    assert back["gene_ids"].tolist() == var["gene_ids"].tolist()
    assert back["flag"].tolist()[:3] == [True, False, True]


def test_merge_obsm_outer_columns_zero_filled() -> None:
    x = sp.csr_matrix(np.ones((2, 3), dtype=np.float32))
    s1 = ad.AnnData(X=x, obs=pd.DataFrame(index=["s1:a", "s1:b"]))
    s1.obsm["antibody_capture"] = pd.DataFrame(
        {"CD3": [5.0, 6.0], "CD4": [1.0, 0.0]}, index=s1.obs_names
    )
    s2 = ad.AnnData(X=x, obs=pd.DataFrame(index=["s2:a", "s2:b"]))
    s3 = ad.AnnData(X=x, obs=pd.DataFrame(index=["s3:a", "s3:b"]))
    s3.obsm["antibody_capture"] = pd.DataFrame({"CD8a": [7, 8], "CD3": [1, 2]}, index=s3.obs_names)
    names = pd.Index([*s1.obs_names, *s2.obs_names, *s3.obs_names])
    out = merge_obsm([s1, s2, s3], names)
    adt = out["antibody_capture"]
    assert list(adt.columns) == ["CD3", "CD4", "CD8a"]
    assert adt.dtypes.eq(np.float32).all()
    np.testing.assert_array_equal(
        adt.to_numpy(), [[5, 1, 0], [6, 0, 0], [0, 0, 0], [0, 0, 0], [1, 0, 7], [2, 0, 8]]
    )
    assert list(adt.index) == list(names)


def test_libraries_with_different_genes_follow_gene_policy(tmp_path: Path) -> None:
    from pipeline.io.samplesheet import LibraryRow

    a = write_10x_h5(make_counts(genes(50), 20, seed=1), tmp_path / "l1.h5")
    b = write_10x_mtx(make_counts(genes(50, start=5), 21, seed=2), tmp_path / "l2_mtx")
    libs = (LibraryRow("L1", a, 2), LibraryRow("L2", b, 3))
    r = SampleRow("S1", "D1", "baseline", a, 2, {"age": "30"}, libraries=libs)
    with pytest.warns(ImmuneageWarning, match=r"'L1', 'L2'.*45 genes"):
        out = ingest_sample(r, config())
    assert out.n_obs == 41 and list(out.var_names) == genes(45, start=5)
    assert list(out.obs["library"].cat.categories) == ["L1", "L2"]
    assert out.obs_names[0].startswith("S1:L1:") and out.obs_names[-1].startswith("S1:L2:")
    assert out.var[keys.GENE_IDS].iloc[0] == "ID_G5_1"  # the first library's id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImmuneageWarning)
        outer = ingest_sample(r, config(gene_policy="outer"))
    assert outer.n_vars == 55
    assert outer.X[20:, :5].nnz == 0  # genes L2 lacks count 0 in its cells
