"""Reading every delivered shape, on real counts written by pipeline.datasets.shapes."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipeline import keys
from pipeline.datasets import shapes
from pipeline.datasets.real import (
    celltypist_sample_counts,
    gene_ids,
    pbmc68k_counts,
    pseudo_cohort,
)
from pipeline.errors import DataFileError, ImmuneageWarning
from pipeline.io.readers import FORMATS, detect_format, inspect_counts, read_counts


@pytest.fixture(scope="module")
def pbmc() -> ad.AnnData:
    """150 real PBMCs x 765 genes, integer counts, GENCODE ids."""
    adata = pbmc68k_counts()[:150].copy()
    adata.var[keys.GENE_IDS] = gene_ids(adata.var_names)
    return adata


@pytest.fixture(scope="module")
def celltypist() -> ad.AnnData:
    """CellTypist's 559 cells x 32,786 genes (MT- genes included)."""
    adata = celltypist_sample_counts()
    adata.var[keys.GENE_IDS] = gene_ids(adata.var_names)
    return adata


@pytest.fixture(scope="module")
def outs(pbmc: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Cell Ranger count sample folder of the PBMCs, with raw droplets."""
    return shapes.write_cellranger_outs(pbmc, tmp_path_factory.mktemp("cr") / "sample1")


def digest(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def same_counts(got: ad.AnnData, src: ad.AnnData, genes: list[str] | None = None) -> None:
    """Same barcodes, symbols (made unique) and counts as the source."""
    assert list(got.obs_names) == list(src.obs_names)
    assert list(got.var_names) == list(genes if genes is not None else src.var_names)
    want = sp.csr_matrix(src.X, dtype=np.float32)
    assert (sp.csr_matrix(got.X) != want).nnz == 0
    assert got.layers[keys.COUNTS] is got.X


def record(adata: ad.AnnData) -> dict:
    rec = adata.uns[keys.UNS]["read"]
    assert set(rec) == {
        "file",
        "format",
        "counts_source",
        "symbols_from",
        "raw_matrix",
        "other_features",
    }
    assert rec["format"] in FORMATS
    return rec


def refused(path: Path, *needles: str, **kwargs: str) -> str:
    """inspect_counts and read_counts both refuse ``path``, naming it, the sample, the needles."""
    before = digest(path)
    for call in (inspect_counts, read_counts):
        with pytest.raises(DataFileError) as info:
            call(path, sample="S1", **kwargs)
        msg = str(info.value)
        assert str(path) in msg and "'S1'" in msg, msg
        for needle in needles:
            assert needle in msg, msg
    assert digest(path) == before
    return msg


# --------------------------------------------------------------------------- Cell Ranger count


@pytest.mark.parametrize("target", ["sample", "outs", "h5", "metrics"])
def test_cellranger_count_reads_filtered_h5(pbmc: ad.AnnData, outs: Path, target: str) -> None:
    path = {
        "sample": outs.parent,
        "outs": outs,
        "h5": outs / "filtered_feature_bc_matrix.h5",
        "metrics": outs / "metrics_summary.csv",
    }[target]
    before = digest(outs)
    got = read_counts(path, sample="S1")
    same_counts(got, pbmc)
    assert list(got.var[keys.GENE_IDS]) == list(pbmc.var[keys.GENE_IDS])
    rec = record(got)
    assert rec["file"] == str(outs / "filtered_feature_bc_matrix.h5")
    assert rec["raw_matrix"] == str(outs / "raw_feature_bc_matrix.h5")
    assert (rec["format"], rec["counts_source"]) == ("10x_h5", "matrix")
    summary = inspect_counts(path, sample="S1")
    assert (summary.n_cells, summary.n_genes) == pbmc.shape
    assert summary.file == outs / "filtered_feature_bc_matrix.h5"
    assert summary.raw_matrix == rec["raw_matrix"]
    assert detect_format(path) == "10x_h5"
    assert digest(outs) == before


def test_cellranger_count_mtx_only(pbmc: ad.AnnData, tmp_path: Path) -> None:
    outs = shapes.write_cellranger_outs(pbmc, tmp_path / "s", h5=False, raw_droplets=20_000)
    got = read_counts(outs.parent, sample="S1")
    same_counts(got, pbmc)
    rec = record(got)
    assert rec["file"] == str(outs / "filtered_feature_bc_matrix")
    assert rec["raw_matrix"] == str(outs / "raw_feature_bc_matrix")
    assert rec["symbols_from"] == "features.tsv column 2"


def test_celltypist_outs_keeps_every_gene(celltypist: ad.AnnData, tmp_path: Path) -> None:
    outs = shapes.write_cellranger_outs(celltypist, tmp_path / "ct", mtx=False)
    got = read_counts(outs, sample="S1")
    same_counts(got, celltypist)
    assert got.var_names.str.startswith("MT-").sum() >= 13  # MT-CO1, MT-ND1, ...
    assert list(got.var[keys.GENE_IDS]) == list(celltypist.var[keys.GENE_IDS])


@pytest.mark.parametrize("name", ["raw_feature_bc_matrix.h5", "raw_feature_bc_matrix"])
def test_raw_matrix_is_never_read(outs: Path, name: str) -> None:
    refused(outs / name, "unfiltered droplets", "filtered_feature_bc_matrix")


@pytest.mark.parametrize("name", ["raw_feature_bc_matrix.h5", "raw_feature_bc_matrix"])
def test_unfiltered_matrix_refused_whatever_its_name(outs: Path, tmp_path: Path, name: str) -> None:
    """A raw matrix renamed (``counts.h5``, ``mtx/``) is caught by its droplets."""
    src = outs / name
    path = tmp_path / ("counts.h5" if src.is_file() else "mtx")
    (shutil.copy if src.is_file() else shutil.copytree)(src, path)
    msg = refused(path, "unfiltered droplets", "25,150 barcodes", "cell calling")
    assert "filtered_feature_bc_matrix" in msg


def test_unfiltered_h5ad_refused(pbmc: ad.AnnData, tmp_path: Path) -> None:
    raw = shapes._with_droplets(pbmc, 20_000, seed=1)
    path = shapes.write_h5ad_shape(raw, tmp_path / "all.h5ad", "x_counts")
    refused(path, "unfiltered droplets", "20,150 barcodes")


def test_large_filtered_matrix_is_not_unfiltered(pbmc: ad.AnnData, tmp_path: Path) -> None:
    """20,000 real cells (thinned to 60-95% depth) stay well above the droplet rule."""
    big = pseudo_cohort(pbmc, donors=1, timepoints=("t0",), cells_per_sample=20_000)[0].adata
    outs = shapes.write_cellranger_outs(big, tmp_path / "big", mtx=False, raw_droplets=0)
    assert inspect_counts(outs, sample="S1").n_cells == 20_000
    assert read_counts(outs, sample="S1").n_obs == 20_000


# --------------------------------------------------------------------------- multi, v2


def test_cellranger_multi_one_sample(pbmc: ad.AnnData, tmp_path: Path) -> None:
    outs = shapes.write_cellranger_multi({"PBMC_1": pbmc}, tmp_path / "run", raw_droplets=20_000)
    h5 = outs / "per_sample_outs" / "PBMC_1" / "count" / "sample_filtered_feature_bc_matrix.h5"
    for path in (tmp_path / "run", outs, outs / "per_sample_outs" / "PBMC_1"):
        got = read_counts(path, sample="S1")
        same_counts(got, pbmc)
        rec = record(got)
        assert rec["file"] == str(h5)
        assert rec["raw_matrix"] == str(outs / "multi" / "count" / "raw_feature_bc_matrix.h5")


def test_cellranger_multi_several_samples(pbmc: ad.AnnData, tmp_path: Path) -> None:
    parts = {"PBMC_1": pbmc[:70].copy(), "PBMC_2": pbmc[70:].copy()}
    outs = shapes.write_cellranger_multi(parts, tmp_path / "run", raw_droplets=0)
    refused(outs, "2 samples", "PBMC_1", "PBMC_2", "per_sample_outs/<sample>")
    got = read_counts(outs / "per_sample_outs" / "PBMC_2", sample="S2")
    same_counts(got, parts["PBMC_2"])


@pytest.mark.parametrize("h5", [False, True])
def test_cellranger_v2(pbmc: ad.AnnData, tmp_path: Path, h5: bool) -> None:
    outs = shapes.write_cellranger_v2(pbmc, tmp_path / "v2", h5=h5, mtx=not h5, raw_droplets=20_000)
    if h5:
        targets, file = (
            [outs, outs / "filtered_gene_bc_matrices_h5.h5"],
            "filtered_gene_bc_matrices_h5.h5",
        )
        raw = outs / "raw_gene_bc_matrices_h5.h5"
    else:
        genome = outs / "filtered_gene_bc_matrices" / "GRCh38"
        targets, file = [outs.parent, genome.parent, genome], "filtered_gene_bc_matrices/GRCh38"
        raw = outs / "raw_gene_bc_matrices" / "GRCh38"
        assert (genome / "genes.tsv").read_text().count("\t") == pbmc.n_vars  # two columns
    for path in targets:
        got = read_counts(path, sample="S1")
        same_counts(got, pbmc)
        assert list(got.var[keys.GENE_IDS]) == list(pbmc.var[keys.GENE_IDS])
        rec = record(got)
        assert rec["file"] == str(outs / file)
        assert rec["raw_matrix"] == str(raw)
    refused(raw, "unfiltered droplets")


def test_v2_several_genomes(pbmc: ad.AnnData, tmp_path: Path) -> None:
    outs = shapes.write_cellranger_v2(pbmc, tmp_path / "v2", h5=False)
    shapes.write_cellranger_v2(pbmc, tmp_path / "v2", h5=False, genome="mm10")
    refused(outs, "2 genomes", "GRCh38", "mm10")


# --------------------------------------------------------------------------- feature barcoding


@pytest.mark.parametrize("h5", [True, False])
def test_feature_barcoding_kept_aside(pbmc: ad.AnnData, tmp_path: Path, h5: bool) -> None:
    both = shapes.with_feature_barcoding(pbmc)
    outs = shapes.write_cellranger_outs(both, tmp_path / "fb", h5=h5, mtx=not h5, raw_droplets=0)
    got = read_counts(outs, sample="S1")
    same_counts(got, pbmc)  # genes only: the ADT 'CD4' does not push the gene to 'CD4-1'
    assert "CD4" in got.var_names and "CD4-1" not in got.var_names
    expected = {"antibody_capture": 10, "crispr_guide_capture": 4, "multiplexing_capture": 3}
    assert set(got.obsm) == set(expected)
    for key, n in expected.items():
        table = got.obsm[key]
        assert isinstance(table, pd.DataFrame)
        assert table.shape == (pbmc.n_obs, n)
        assert (table.dtypes == np.float32).all()
        assert list(table.index) == list(got.obs_names)
    types = both.var[keys.FEATURE_TYPES].to_numpy()
    adt = both[:, types == "Antibody Capture"]
    assert list(got.obsm["antibody_capture"].columns) == list(adt.var_names)
    np.testing.assert_array_equal(got.obsm["antibody_capture"].to_numpy(), adt.X.toarray())
    other = {"Antibody Capture": 10, "CRISPR Guide Capture": 4, "Multiplexing Capture": 3}
    assert record(got)["other_features"] == other
    summary = inspect_counts(outs, sample="S1")
    assert summary.n_genes == pbmc.n_vars and summary.other_features == other


# --------------------------------------------------------------------------- h5ad


@pytest.mark.parametrize(
    ("style", "source", "symbols_from"),
    [
        ("x_counts", "X", "var_names"),
        ("counts_layer", "layers['counts']", "var_names"),
        ("cellxgene", "raw.X", "var['feature_name']"),
        ("raw_counts_hvg_x", "raw.X", "raw.var_names"),
        ("gene_symbols", "X", "var['gene_symbols']"),
    ],
)
def test_h5ad_shapes(
    pbmc: ad.AnnData, tmp_path: Path, style: str, source: str, symbols_from: str
) -> None:
    path = shapes.write_h5ad_shape(pbmc, tmp_path / f"{style}.h5ad", style)
    before = digest(path)
    got = read_counts(path, sample="S1")
    same_counts(got, pbmc)
    assert list(got.var[keys.GENE_IDS]) == list(pbmc.var[keys.GENE_IDS])
    assert list(got.var[keys.GENE_SYMBOL_ORIGINAL]) == list(pbmc.var_names)
    rec = record(got)
    assert (rec["format"], rec["counts_source"], rec["symbols_from"]) == (
        "h5ad",
        source,
        symbols_from,
    )
    summary = inspect_counts(path, sample="S1")
    assert summary.genes == tuple(pbmc.var_names)
    assert (summary.counts_source, summary.symbols_from) == (source, symbols_from)
    assert digest(path) == before


def test_h5ad_named_layer(pbmc: ad.AnnData, tmp_path: Path) -> None:
    path = shapes.write_h5ad_shape(pbmc, tmp_path / "s.h5ad", "named_layer")
    refused(path, "tried X", "not whole numbers", "log-normalised", "'raw_counts'", "counts_layer")
    got = read_counts(path, sample="S1", counts_layer="raw_counts")
    same_counts(got, pbmc)
    assert record(got)["counts_source"] == "layers['raw_counts']"
    refused(path, "no matrix 'umi'", "'raw_counts'", counts_layer="umi")
    # an explicit choice is validated in full: X holds log-normalised values
    refused(path, "not whole numbers", counts_layer="X")


def test_cellxgene_symbol_column(celltypist: ad.AnnData, tmp_path: Path) -> None:
    path = shapes.write_h5ad_shape(celltypist, tmp_path / "cxg.h5ad", "cellxgene")
    got = read_counts(path, sample="S1")
    same_counts(got, celltypist)
    assert got.var_names.str.startswith("MT-").sum() >= 13  # MT-CO1, MT-ND1, ...
    assert got.var[keys.GENE_IDS].str.startswith("ENSG").all()
    refused(path, "column 'symbols'", "feature_name", symbol_column="symbols")
    explicit = read_counts(path, sample="S1", symbol_column="feature_name")
    assert list(explicit.var_names) == list(celltypist.var_names)


def test_ensembl_without_symbols(pbmc: ad.AnnData, tmp_path: Path) -> None:
    path = shapes.write_h5ad_shape(pbmc, tmp_path / "ens.h5ad", "ensembl_only")
    refused(path, "Ensembl ids", "symbol_column", "Add a column of gene symbols")


def test_10x_features_with_ids_only(pbmc: ad.AnnData, tmp_path: Path) -> None:
    src = pbmc.copy()
    src.var_names = src.var[keys.GENE_IDS].astype(str)
    outs = shapes.write_cellranger_outs(src, tmp_path / "ids", h5=False, raw_droplets=0)
    refused(outs / "filtered_feature_bc_matrix", "Ensembl gene ids", "symbols")


def test_mouse_symbols_read_as_they_are(pbmc: ad.AnnData, tmp_path: Path) -> None:
    mouse = shapes.mouse_style(pbmc)
    path = shapes.write_h5ad_shape(mouse, tmp_path / "mm.h5ad", "counts_layer")
    assert mouse.var_names.has_duplicates  # several human genes, one mouse orthologue
    with pytest.warns(ImmuneageWarning, match="made unique"):
        got = read_counts(path, sample="S1")
    assert list(got.var[keys.GENE_SYMBOL_ORIGINAL]) == list(mouse.var_names)
    assert got.var_names.is_unique
    assert record(got)["symbols_from"] == "var_names"
