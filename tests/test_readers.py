"""Reading one sample's counts: every format round-trips, every bad file is named."""

from __future__ import annotations

import gzip
import hashlib
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipeline import keys
from pipeline.errors import DataFileError, ImmuneageWarning
from pipeline.io import (
    detect_format,
    inspect_counts,
    read_counts,
    write_10x_h5,
    write_10x_mtx,
)
from pipeline.io.readers import make_unique

N_CELLS, N_GENES = 40, 60


def make_counts(n_cells: int = N_CELLS, n_genes: int = N_GENES, seed: int = 0) -> ad.AnnData:
    """Integer counts with unique barcodes, gene symbols and Ensembl-like ids."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(0.7, size=(n_cells, n_genes)).astype(np.float32)
    x[:, 3] = 0  # an all-zero gene
    obs = pd.DataFrame(index=[f"AAAC{i:06d}-1" for i in range(n_cells)])
    var = pd.DataFrame(
        {"gene_ids": [f"ENSG{i:011d}" for i in range(n_genes)]},
        index=[f"GENE{i}" for i in range(n_genes)],
    )
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=var)


def digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a directory."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def write(adata: ad.AnnData, tmp: Path, fmt: str) -> Path:
    """Write ``adata`` (integer counts in X) in one of the layouts the reader accepts."""
    if fmt == "h5ad":
        path = tmp / "s.h5ad"
        adata.write_h5ad(path)
    elif fmt == "h5ad_layer":  # normalised X, raw counts in layers["counts"]
        b = adata.copy()
        b.layers["counts"] = adata.X.copy()
        norm = sp.csr_matrix(adata.X, copy=True)
        norm.data = np.log1p(norm.data / 3.0)
        b.X = norm
        path = tmp / "s.h5ad"
        b.write_h5ad(path)
    elif fmt == "h5ad_dense":
        b = adata.copy()
        b.X = adata.X.toarray()
        path = tmp / "s.h5ad"
        b.write_h5ad(path)
    elif fmt == "h5ad_csc":
        b = adata.copy()
        b.X = sp.csc_matrix(adata.X)
        path = tmp / "s.h5ad"
        b.write_h5ad(path)
    elif fmt == "10x_h5":
        path = write_10x_h5(adata, tmp / "s.h5")
    elif fmt == "mtx_gz":
        path = write_10x_mtx(adata, tmp / "mtx")
    elif fmt == "mtx_plain":
        path = write_10x_mtx(adata, tmp / "mtx", compress=False)
    elif fmt == "mtx_legacy":
        path = write_10x_mtx(adata, tmp / "mtx", legacy=True)
    else:  # pragma: no cover
        raise ValueError(fmt)
    return path


FORMATS = {
    "h5ad": "h5ad",
    "h5ad_layer": "h5ad",
    "h5ad_dense": "h5ad",
    "h5ad_csc": "h5ad",
    "10x_h5": "10x_h5",
    "mtx_gz": "10x_mtx",
    "mtx_plain": "10x_mtx",
    "mtx_legacy": "10x_mtx",
}


def fails(path: Path, *needles: str, sample: str = "S1") -> str:
    """read_counts raises DataFileError naming the file, the sample and the needles; no file changes."""
    before = digest(path) if path.exists() else None
    with pytest.raises(DataFileError) as info:
        read_counts(path, sample=sample)
    msg = str(info.value)
    assert str(path) in msg
    assert repr(sample) in msg
    for needle in needles:
        assert needle in msg, msg
    if before is not None:
        assert digest(path) == before
    return msg


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    src = make_counts()
    path = write(src, tmp_path, fmt)
    before = digest(path)

    assert detect_format(path) == FORMATS[fmt]
    got = read_counts(path, sample="S1")

    assert isinstance(got.X, sp.csr_matrix)
    assert got.X.dtype == np.float32
    assert got.layers[keys.COUNTS] is got.X
    np.testing.assert_array_equal(got.X.toarray(), src.X.toarray())
    assert list(got.obs_names) == list(src.obs_names)
    assert list(got.obs[keys.BARCODE]) == list(src.obs_names)
    assert list(got.var_names) == list(src.var_names)
    assert list(got.var[keys.GENE_SYMBOL_ORIGINAL]) == list(src.var_names)
    assert list(got.var[keys.GENE_IDS]) == list(src.var[keys.GENE_IDS])
    assert digest(path) == before
    record = got.uns[keys.UNS]["read"]
    assert record["file"] == str(path)
    assert record["format"] == FORMATS[fmt]
    assert record["counts_source"] == {"h5ad_layer": "layers['counts']"}.get(
        fmt, "X" if FORMATS[fmt] == "h5ad" else "matrix"
    )
    assert (record["raw_matrix"], record["other_features"]) == ("", {})

    summary = inspect_counts(path)
    assert summary.format == FORMATS[fmt]
    assert summary.file == path
    assert summary.counts_source == record["counts_source"]
    assert (summary.n_cells, summary.n_genes) == (N_CELLS, N_GENES)
    assert summary.genes == tuple(src.var_names)
    assert digest(path) == before


def test_h5ad_without_gene_ids(tmp_path: Path) -> None:
    src = make_counts()
    del src.var[keys.GENE_IDS]
    path = write(src, tmp_path, "h5ad")
    got = read_counts(path, sample="S1")
    assert keys.GENE_IDS not in got.var
    np.testing.assert_array_equal(got.X.toarray(), src.X.toarray())


def test_h5ad_prefers_counts_layer_over_x(tmp_path: Path) -> None:
    src = make_counts()
    path = write(src, tmp_path, "h5ad_layer")
    got = read_counts(path, sample="S1")
    # X in the file is non-integer; reading it would fail, so the layer was used.
    np.testing.assert_array_equal(got.X.toarray(), src.X.toarray())


def test_h5ad_normalised_counts_layer_falls_back_to_x(tmp_path: Path) -> None:
    """A layer called 'counts' that holds normalised values is skipped for integer X."""
    src = make_counts()
    b = src.copy()
    b.layers["counts"] = src.X.multiply(1.0 / 3.0).tocsr()
    path = tmp_path / "s.h5ad"
    b.write_h5ad(path)
    got = read_counts(path, sample="S1")
    np.testing.assert_array_equal(got.X.toarray(), src.X.toarray())
    assert got.uns[keys.UNS]["read"]["counts_source"] == "X"
    with pytest.raises(DataFileError, match=r"layers\['counts'\]: .* not whole numbers"):
        read_counts(path, sample="S1", counts_layer="counts")


def test_integer_dtype_h5ad(tmp_path: Path) -> None:
    src = make_counts()
    src.X = sp.csr_matrix(src.X.astype(np.int64))
    path = write(src, tmp_path, "h5ad")
    got = read_counts(path, sample="S1")
    assert got.X.dtype == np.float32
    np.testing.assert_array_equal(got.X.toarray(), src.X.toarray())


def test_10x_h5_keeps_only_gene_expression(tmp_path: Path) -> None:
    src = make_counts()
    path = write_10x_h5(src, tmp_path / "s.h5")
    types = np.array([b"Gene Expression"] * (N_GENES - 5) + [b"Antibody Capture"] * 5)
    with h5py.File(path, "r+") as f:
        del f["matrix/features/feature_type"]
        f["matrix/features"].create_dataset("feature_type", data=types)
    got = read_counts(path, sample="S1")
    assert list(got.var_names) == list(src.var_names[: N_GENES - 5])
    np.testing.assert_array_equal(got.X.toarray(), src.X.toarray()[:, : N_GENES - 5])
    assert inspect_counts(path).n_genes == N_GENES - 5


def test_mtx_keeps_only_gene_expression(tmp_path: Path) -> None:
    src = make_counts()
    path = write_10x_mtx(src, tmp_path / "mtx", compress=False)
    lines = (path / "features.tsv").read_text().splitlines()
    lines[-2:] = [line.replace("Gene Expression", "CRISPR Guide Capture") for line in lines[-2:]]
    (path / "features.tsv").write_text("\n".join(lines) + "\n")
    got = read_counts(path, sample="S1")
    assert got.n_vars == N_GENES - 2
    np.testing.assert_array_equal(got.X.toarray(), src.X.toarray()[:, : N_GENES - 2])


def test_cell_ranger_2_h5(tmp_path: Path) -> None:
    """Legacy layout: one group per genome with genes / gene_names."""
    src = make_counts()
    m = sp.csc_matrix(src.X.T.astype(np.int32))
    path = tmp_path / "v2.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("GRCh38")
        g["barcodes"] = np.array(src.obs_names, dtype="S")
        g["data"] = m.data
        g["indices"] = m.indices.astype(np.int64)
        g["indptr"] = m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, dtype=np.int32)
        g["genes"] = np.array(src.var[keys.GENE_IDS], dtype="S")
        g["gene_names"] = np.array(src.var_names, dtype="S")
    got = read_counts(path, sample="S1")
    np.testing.assert_array_equal(got.X.toarray(), src.X.toarray())
    assert list(got.var[keys.GENE_IDS]) == list(src.var[keys.GENE_IDS])


# --------------------------------------------------------------------------- duplicate genes


def test_make_unique_is_anndata_style() -> None:
    names, repeated = make_unique(["A", "B", "A", "A-1", "A"])
    assert names == ["A", "B", "A-2", "A-1", "A-3"]
    assert repeated == ["A"]
    assert make_unique(["X", "X"]) == (["X", "X-1"], ["X"])


@pytest.mark.parametrize("fmt", ["h5ad", "10x_h5", "mtx_gz"])
def test_duplicate_gene_symbols_warn_and_are_made_unique(tmp_path: Path, fmt: str) -> None:
    src = make_counts()
    names = list(src.var_names)
    names[10] = "GENE2"
    names[20] = "GENE2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's own duplicate-name warning
        src.var_names = names
    path = write(src, tmp_path, fmt)
    before = digest(path)
    with pytest.warns(ImmuneageWarning, match="GENE2") as record:
        got = read_counts(path, sample="S1")
    assert any(str(path) in str(w.message) for w in record)
    expected = list(names)
    expected[10], expected[20] = "GENE2-1", "GENE2-2"
    assert list(got.var_names) == expected
    assert got.var[keys.GENE_SYMBOL_ORIGINAL].iloc[20] == "GENE2"
    with pytest.warns(ImmuneageWarning):
        again = read_counts(path, sample="S1")
    assert list(again.var_names) == expected
    assert inspect_counts(path).genes == tuple(expected)
    assert digest(path) == before


# --------------------------------------------------------------------------- errors


def test_missing_path(tmp_path: Path) -> None:
    fails(tmp_path / "nope.h5ad", "does not exist")
    with pytest.raises(DataFileError, match="does not exist"):
        detect_format(tmp_path / "nope.h5ad")


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "counts.csv"
    path.write_text("a,b\n1,2\n")
    msg = fails(path, "'.csv'", ".h5ad", "matrix.mtx")
    assert "Accepted" in msg


def test_directory_without_10x_files(tmp_path: Path) -> None:
    path = write_10x_mtx(make_counts(), tmp_path / "mtx")
    (path / "barcodes.tsv.gz").rename(path / "cells.tsv.gz")
    msg = fails(path, "barcodes.tsv[.gz]", "cells.tsv.gz")
    assert "matrix.mtx" in msg
    with pytest.raises(DataFileError, match=r"cells\.tsv\.gz"):
        inspect_counts(path)


@pytest.mark.parametrize("fmt", ["10x_h5", "h5ad"])
def test_truncated_hdf5(tmp_path: Path, fmt: str) -> None:
    path = write(make_counts(), tmp_path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    fails(path, "HDF5", "truncated")
    with pytest.raises(DataFileError, match="HDF5"):
        inspect_counts(path)


def test_not_an_hdf5_file(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    path.write_bytes(b"this is not hdf5" * 100)
    fails(path, "not a readable HDF5 file")


def test_10x_h5_missing_dataset(tmp_path: Path) -> None:
    path = write_10x_h5(make_counts(), tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        del f["matrix/indptr"]
    fails(path, "matrix/indptr", "missing")


def test_10x_h5_inconsistent_shape(tmp_path: Path) -> None:
    path = write_10x_h5(make_counts(), tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        del f["matrix/barcodes"]
        f["matrix/barcodes"] = np.array([f"B{i}" for i in range(N_CELLS - 1)], dtype="S")
    fails(path, "matrix/barcodes", f"{N_CELLS - 1} entries, expected {N_CELLS}")
    with pytest.raises(DataFileError, match="inconsistent"):
        inspect_counts(path)


def test_10x_h5_index_outside_shape(tmp_path: Path) -> None:
    path = write_10x_h5(make_counts(), tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        f["matrix/indices"][0] = N_GENES + 3
    fails(path, "malformed", f"{N_GENES} genes")


def test_inspect_names_the_sample(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="sample 'S9'"):
        inspect_counts(tmp_path / "nope.h5", sample="S9")


def test_mtx_dims_disagree_with_barcodes(tmp_path: Path) -> None:
    path = write_10x_mtx(make_counts(), tmp_path / "mtx")
    with gzip.open(path / "barcodes.tsv.gz", "rt") as fh:
        lines = fh.read().splitlines()
    with gzip.open(path / "barcodes.tsv.gz", "wt") as fh:
        fh.write("\n".join(lines[:-1]) + "\n")
    fails(path, f"{N_GENES} genes x {N_CELLS} cells", f"lists {N_CELLS - 1} barcodes")
    with pytest.raises(DataFileError, match="barcodes"):
        inspect_counts(path)


def test_mtx_transposed_is_explained(tmp_path: Path) -> None:
    path = write_10x_mtx(make_counts(), tmp_path / "mtx", compress=False)
    text = (path / "matrix.mtx").read_text().splitlines()
    i = next(k for k, line in enumerate(text) if not line.startswith("%"))
    text[i] = f"{N_CELLS} {N_GENES} {text[i].split()[2]}"
    (path / "matrix.mtx").write_text("\n".join(text) + "\n")
    fails(path, "transposed")


def test_mtx_entry_outside_dims(tmp_path: Path) -> None:
    path = write_10x_mtx(make_counts(), tmp_path / "mtx", compress=False)
    text = (path / "matrix.mtx").read_text().splitlines()
    i = next(k for k, line in enumerate(text) if not line.startswith("%")) + 1
    _, col, val = text[i].split()
    text[i] = f"{N_GENES + 7} {col} {val}"
    (path / "matrix.mtx").write_text("\n".join(text) + "\n")
    fails(path, "outside its declared", f"{N_GENES} x {N_CELLS}")


def _h5ad_with_data(tmp_path: Path, change) -> Path:
    src = make_counts()
    change(src.X.data)
    return write(src, tmp_path, "h5ad")


def test_non_integer_counts(tmp_path: Path) -> None:
    src = make_counts()
    src.X.data = np.log1p(src.X.data)
    path = write(src, tmp_path, "h5ad")
    n_bad = int((src.X.data != np.rint(src.X.data)).sum())
    msg = fails(path, "not whole numbers", f"{n_bad} of", "raw")
    assert "0.69314" in msg  # log1p(1), an example value


def test_negative_counts(tmp_path: Path) -> None:
    def neg(d: np.ndarray) -> None:
        d[5] = -2

    fails(_h5ad_with_data(tmp_path, neg), "negative", "1 of", "-2")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_counts(tmp_path: Path, bad: float) -> None:
    def put(d: np.ndarray) -> None:
        d[[1, 4]] = bad

    fails(_h5ad_with_data(tmp_path, put), "NaN or infinite", "2 of")


@pytest.mark.parametrize(
    ("shape", "needle"),
    [
        ((0, N_GENES), "empty (0 cells"),
        ((N_CELLS, 0), "empty (40 cells x 0 genes"),
        (None, "no counts"),
    ],
)
def test_empty_matrix(tmp_path: Path, shape: tuple[int, int] | None, needle: str) -> None:
    src = make_counts()
    if shape is None:
        src.X = sp.csr_matrix(src.shape, dtype=np.float32)
    elif shape[0] == 0:
        src = src[:0].copy()
    else:
        src = src[:, :0].copy()
    fails(write(src, tmp_path, "h5ad"), needle)


def test_empty_mtx(tmp_path: Path) -> None:
    src = make_counts()
    src.X = sp.csr_matrix(src.shape, dtype=np.float32)
    fails(write(src, tmp_path, "mtx_gz"), "no counts")


@pytest.mark.parametrize("fmt", ["h5ad", "mtx_gz", "10x_h5"])
def test_duplicate_barcodes(tmp_path: Path, fmt: str) -> None:
    src = make_counts()
    names = list(src.obs_names)
    names[7] = names[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src.obs_names = names
    fails(write(src, tmp_path, fmt), "repeated barcode", names[2])


def test_h5ad_without_counts(tmp_path: Path) -> None:
    path = tmp_path / "s.h5ad"
    src = make_counts()
    ad.AnnData(obs=src.obs, var=src.var).write_h5ad(path)
    fails(path, "holds no counts")


def test_write_10x_h5_leaves_unsorted_input_intact(tmp_path: Path) -> None:
    """Real matrices (pbmc68k's raw.X) have unsorted column indices within rows."""
    x = sp.csr_matrix(
        (np.array([2, 1, 4, 3], np.float32), np.array([2, 0, 2, 1]), np.array([0, 2, 4])),
        shape=(2, 3),
    )
    adata = ad.AnnData(x, var=pd.DataFrame(index=["A", "B", "C"]))
    before = adata.X.toarray().copy()
    path = write_10x_h5(adata, tmp_path / "s.h5")
    np.testing.assert_array_equal(adata.X.toarray(), before)
    np.testing.assert_array_equal(read_counts(path, sample="s").X.toarray(), before)
