"""Ingest on real counts (pbmc68k via pseudo_cohort) written as real files, through the runner.

Covers: merging every pairing of formats (h5ad with and without gene ids, 10x
h5, 10x mtx) in memory and backed; other modalities in obsm; per-line reading
options in the sheet; several libraries per sample (and qc's doublets called
per library); the read record in tables/ingest_samples.tsv; and the checks
before compute (QC prefixes, species; :mod:`pipeline.io.checks`).
"""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from conftest import tree_checksums

from pipeline import keys
from pipeline.artifacts import read_h5ad_artifact
from pipeline.cli import main
from pipeline.config import Config
from pipeline.datasets.real import gene_ids, mouse_symbols, pbmc68k_counts, pseudo_cohort
from pipeline.datasets.shapes import (
    with_feature_barcoding,
    write_cellranger_outs,
    write_h5ad_shape,
)
from pipeline.errors import DataFileError, ImmuneageWarning
from pipeline.io.write10x import write_10x_h5, write_10x_mtx
from pipeline.runner import Runner, validate_inputs

FORMATS = ("h5ad_noids", "h5ad_ids", "10x_h5", "10x_mtx")
READ_COLUMNS = ["file", "counts_source", "symbols_from", "raw_matrix", "other_features"]


@pytest.fixture(scope="module")
def samples() -> list[ad.AnnData]:
    """Six real pseudo-samples (pbmc68k counts, 2 donors x 3 timepoints, 60-70 cells)."""
    cohort = pseudo_cohort(pbmc68k_counts(), donors=2, cells_per_sample=[60, 62, 64, 66, 68, 70])
    out = []
    for s in cohort:
        a = ad.AnnData(X=sp.csr_matrix(s.adata.X), obs=pd.DataFrame(index=s.adata.obs_names))
        a.var_names = s.adata.var_names
        out.append(a)
    return out


def write_sample(a: ad.AnnData, root: Path, name: str, fmt: str) -> str:
    """Write ``a`` as ``fmt`` under root/data; returns the path relative to root."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    a = a.copy()
    if fmt != "h5ad_noids":
        a.var[keys.GENE_IDS] = gene_ids(a.var_names).astype(str)
    if fmt.startswith("h5ad"):
        a.write_h5ad(data / f"{name}.h5ad")
        return f"data/{name}.h5ad"
    if fmt == "10x_h5":
        write_10x_h5(a, data / f"{name}.h5")
        return f"data/{name}.h5"
    write_10x_mtx(a, data / f"{name}_mtx")
    return f"data/{name}_mtx"


def write_sheet(root: Path, rows: list[dict[str, str]], config: dict | None = None) -> Path:
    sheet = root / "samplesheet.csv"
    pd.DataFrame(rows).to_csv(sheet, index=False)
    (root / "config.yaml").write_text(yaml.safe_dump(config or {}))
    return sheet


def run_ingest(sheet: Path, outdir: Path, **cfg: dict) -> tuple[ad.AnnData, pd.DataFrame]:
    config = Config.model_validate(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImmuneageWarning)
        Runner(sheet, config, outdir, argv=["test"]).run(until="ingest")
    merged = ad.read_h5ad(outdir / "ingest" / "ingest.h5ad")
    table = pd.read_csv(
        outdir / "tables" / "ingest_samples.tsv", sep="\t", dtype=str, keep_default_na=False
    )
    return merged, table


def assert_counts(merged: ad.AnnData, sample: str, source: ad.AnnData) -> None:
    """The merged rows of ``sample`` hold ``source``'s counts, gene by gene."""
    rows = np.flatnonzero(merged.obs[keys.SAMPLE].to_numpy() == sample)
    got = merged.X[rows].toarray()
    cols = source.var_names.get_indexer(merged.var_names)
    assert (cols >= 0).all()
    np.testing.assert_array_equal(got, source.X.toarray()[:, cols])


PAIRS = list(itertools.permutations(FORMATS, 2))


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=["-".join(p) for p in PAIRS])
def test_merge_any_pair_of_formats(tmp_path, samples, first, second):
    root = tmp_path / "in"
    rows = []
    for (name, tp, fmt), a in zip(
        [("S1", "baseline", first), ("S2", "acute", second)], samples, strict=False
    ):
        rows.append(
            {
                "sample": name,
                "donor": "D1",
                "timepoint": tp,
                "path": write_sample(a, root, name, fmt),
            }
        )
    merged, table = run_ingest(write_sheet(root, rows), tmp_path / "out")

    assert merged.n_obs == samples[0].n_obs + samples[1].n_obs
    assert merged.n_vars == samples[0].n_vars
    for name, a in zip(["S1", "S2"], samples, strict=False):
        assert_counts(merged, name, a)
    # ids from whichever sample has them; strings throughout (no NaN), written and read back
    has_ids = {first, second} != {"h5ad_noids"}
    if has_ids:
        ids = merged.var[keys.GENE_IDS]
        assert ids.map(type).eq(str).all()
        assert list(ids) == list(gene_ids(merged.var_names))
    assert merged.var[keys.GENE_SYMBOL_ORIGINAL].map(type).eq(str).all()
    # the read record, per sample
    assert list(table.columns) == [
        "sample",
        "donor",
        "timepoint",
        "format",
        "n_cells",
        "n_genes",
        "source",
        *READ_COLUMNS,
        "libraries",
        "ambient",
    ]
    assert (table["file"] != "").all()
    assert (table["counts_source"] != "").all()
    assert table["libraries"].tolist() == ["", ""]
    assert table["ambient"].tolist() == ["none", "none"]


def test_backed_merge_matches_in_memory(tmp_path, samples):
    """Four formats, the id-less h5ad first: the lazy on-disk stack merges var and obsm alike."""
    root = tmp_path / "in"
    rows = []
    for i, fmt in enumerate(FORMATS):
        name = f"S{i + 1}"
        rows.append(
            {
                "sample": name,
                "donor": f"D{i // 2 + 1}",
                "timepoint": ("baseline", "acute")[i % 2],
                "path": write_sample(samples[i], root, name, fmt),
            }
        )
    # and a CITE-seq sample (Cell Ranger outs/ with Antibody Capture features)
    cite = with_feature_barcoding(samples[4], n_crispr=0, n_multiplexing=0, seed=3)
    cite.var[keys.GENE_IDS] = [
        *gene_ids(samples[4].var_names).astype(str),
        *cite.var_names[samples[4].n_vars :],
    ]
    write_cellranger_outs(cite, root / "data" / "S5", raw_droplets=0, mtx=False)
    rows.append({"sample": "S5", "donor": "D3", "timepoint": "baseline", "path": "data/S5"})
    sheet = write_sheet(root, rows)

    memory, table = run_ingest(sheet, tmp_path / "memory")
    backed, _ = run_ingest(sheet, tmp_path / "backed", backed=True)
    for merged in (memory, backed):
        assert merged.n_obs == sum(a.n_obs for a in samples[:5])
        for i in range(5):
            assert_counts(merged, f"S{i + 1}", samples[i])
        ids = merged.var[keys.GENE_IDS]
        assert list(ids) == list(gene_ids(merged.var_names))
        adt = merged.obsm["antibody_capture"]
        assert isinstance(adt, pd.DataFrame)
        assert list(adt.columns) == list(cite.var_names[samples[4].n_vars :])
        assert list(adt.index) == list(merged.obs_names)
        s5 = (merged.obs[keys.SAMPLE] == "S5").to_numpy()
        assert (adt.to_numpy()[~s5] == 0).all()  # samples without antibodies: rows of 0
        expected = cite.X[:, samples[4].n_vars :].toarray()
        np.testing.assert_array_equal(adt.to_numpy()[s5], expected)
    pd.testing.assert_frame_equal(memory.var, backed.var)
    np.testing.assert_array_equal(memory.X.toarray(), backed.X.toarray())
    s5 = table.set_index("sample").loc["S5"]
    assert s5["file"].endswith("filtered_feature_bc_matrix.h5")
    assert "Antibody Capture" in s5["other_features"]


def test_libraries_of_one_sample(tmp_path, samples):
    """Two lanes of D1 at baseline (same barcodes in both): one sample, cell ids keep them apart."""
    root = tmp_path / "in"
    lane2 = samples[1][:58].copy()
    lane2.obs_names = samples[0].obs_names[:58]  # barcodes repeat across libraries
    rows = [
        {
            "sample": "D1_base",
            "donor": "D1",
            "timepoint": "baseline",
            "library": "L1",
            "path": write_sample(samples[0], root, "lane1", "10x_h5"),
            "age": "31",
        },
        {
            "sample": "D1_base",
            "donor": "D1",
            "timepoint": "baseline",
            "library": "L2",
            "path": write_sample(lane2, root, "lane2", "h5ad_noids"),
            "age": "31",
        },
        {
            "sample": "D1_acute",
            "donor": "D1",
            "timepoint": "acute",
            "library": "",
            "path": write_sample(samples[2], root, "acute", "10x_mtx"),
            "age": "31",
        },
    ]
    sheet = write_sheet(root, rows)
    out = tmp_path / "out"
    merged, table = run_ingest(sheet, out)

    base = merged[merged.obs[keys.SAMPLE] == "D1_base"]
    assert base.n_obs == samples[0].n_obs + lane2.n_obs
    assert merged.obs_names.is_unique
    assert base.obs_names[0] == f"D1_base:L1:{samples[0].obs_names[0]}"
    assert base.obs_names[-1] == f"D1_base:L2:{lane2.obs_names[-1]}"
    assert list(base.obs["library"].value_counts().sort_index()) == [60, 58]
    assert merged.obs_names[-1] == f"D1_acute:{samples[2].obs_names[-1]}"
    assert list(merged.obs[keys.SAMPLE].cat.categories) == ["D1_base", "D1_acute"]
    x = merged.X.toarray()
    cols = samples[0].var_names.get_indexer(merged.var_names)
    np.testing.assert_array_equal(
        x[: base.n_obs], np.vstack([samples[0].X.toarray(), lane2.X.toarray()])[:, cols]
    )
    row = table.set_index("sample").loc["D1_base"]
    assert row["libraries"] == "L1; L2"
    assert row["n_cells"] == str(base.n_obs)
    assert row["source"].count("; ") == 1 and "lane2.h5ad" in row["source"]
    assert row["format"] == "10x_h5; h5ad"

    prov = json.loads((out / "provenance.json").read_text())
    entry = next(i for i in prov["inputs"] if i["sample"] == "D1_base")
    assert [x["library"] for x in entry["libraries"]] == ["L1", "L2"]
    assert all(len(x["sha256"]) == 64 for x in entry["libraries"])
    # a changed library file re-runs that sample only
    stamp = out / "ingest" / "samples" / "D1_acute.h5ad.stamp.json"
    before = stamp.read_text()
    lane2.X = lane2.X * 2
    lane2.write_h5ad(root / "data" / "lane2.h5ad")
    summary = Runner(sheet, Config(), out, argv=["test"]).run(until="ingest")
    assert summary.stages["ingest"] == "ran"
    assert stamp.read_text() == before
    again = ad.read_h5ad(out / "ingest" / "ingest.h5ad")
    assert again.X[:, :].sum() > merged.X.sum()

    # qc calls doublets per library: one scrublet threshold per library of D1_base,
    # kept through the per-sample artifact, the merged uns and the table
    cfg = Config.model_validate({"qc": {"min_cells_for_doublets": 50}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImmuneageWarning)
        Runner(sheet, cfg, out, argv=["test"]).run(until="qc")
    unit = ad.read_h5ad(out / "qc" / "samples" / "D1_base.h5ad")
    thr = unit.uns["immuneage"]["qc"]["doublet_threshold"]
    assert list(thr) == ["L1", "L2"]
    qc = ad.read_h5ad(out / "qc" / "qc.h5ad").uns["immuneage"]["qc"]["per_sample"]
    assert dict(qc["D1_base"]["doublet_threshold"]) == dict(thr)
    assert not isinstance(qc["D1_acute"]["doublet_threshold"], dict)
    table = pd.read_csv(out / "tables" / "qc_per_sample.tsv", sep="\t", dtype=str).set_index(
        "sample"
    )
    assert table.loc["D1_base", "doublet_threshold"].startswith("L1=")
    assert "; L2=" in table.loc["D1_base", "doublet_threshold"]
    assert "=" not in str(table.loc["D1_acute", "doublet_threshold"])


def test_sheet_reading_options(tmp_path, samples):
    """counts_layer / symbol_column per line (and from the config), not carried into obs."""
    root = tmp_path / "in"
    (root / "data").mkdir(parents=True)
    # counts in layers["raw_counts"], log-normalised X: the reader needs counts_layer
    write_h5ad_shape(samples[0], root / "data" / "named.h5ad", "named_layer")
    # Ensembl var_names, symbols in a column no reader guesses
    odd = samples[1].copy()
    odd.var = pd.DataFrame({"hgnc": odd.var_names.astype(str)}, index=gene_ids(odd.var_names))
    odd.write_h5ad(root / "data" / "odd.h5ad")
    rows = [
        {
            "sample": "S1",
            "donor": "D1",
            "timepoint": "baseline",
            "path": "data/named.h5ad",
            "counts_layer": "raw_counts",
            "symbol_column": "",
        },
        {
            "sample": "S2",
            "donor": "D1",
            "timepoint": "acute",
            "path": "data/odd.h5ad",
            "counts_layer": "",
            "symbol_column": "hgnc",
        },
    ]
    sheet = write_sheet(root, rows)
    cfg = Config()
    report = validate_inputs(sheet, cfg, stages=("ingest",))
    assert [s[0].counts_source for s in report.summaries] == ["layers['raw_counts']", "X"]
    merged, table = run_ingest(sheet, tmp_path / "out")
    assert "counts_layer" not in merged.obs and "symbol_column" not in merged.obs
    assert_counts(merged, "S1", samples[0])
    assert_counts(merged, "S2", samples[1])
    assert table["counts_source"].tolist() == ["layers['raw_counts']", "X"]
    assert "hgnc" in table["symbols_from"].iloc[1]

    # without the options the files are refused before anything runs ...
    bare = root / "bare.csv"
    pd.DataFrame(rows).drop(columns=["counts_layer", "symbol_column"]).to_csv(bare, index=False)
    with pytest.raises(DataFileError, match=r"named\.h5ad"):
        validate_inputs(bare, cfg, stages=("ingest",))
    # ... and the config's defaults apply to lines that leave them empty
    only_first = pd.read_csv(bare).iloc[:1]
    only_first.to_csv(bare, index=False)
    ok = validate_inputs(
        bare, Config.model_validate({"ingest": {"counts_layer": "raw_counts"}}), stages=("ingest",)
    )
    assert ok.summaries[0][0].counts_source == "layers['raw_counts']"


def test_checks_before_compute(tmp_path, samples, capsys):
    """mt/ribo prefixes that match nothing warn; mouse-looking data stop with the fix."""
    root = tmp_path / "in"
    human = samples[0][:, [not g.startswith("MT-") for g in samples[0].var_names]].copy()
    mouse = samples[1].copy()
    mouse.var_names = mouse_symbols(list(mouse.var_names))
    assert any(g.startswith("mt-") for g in mouse.var_names)
    rows = [
        {"sample": "S1", "donor": "D1", "timepoint": "baseline", "path": "data/S1.h5"},
        {"sample": "S2", "donor": "D1", "timepoint": "acute", "path": "data/S2_mtx"},
    ]
    write_sample(human, root, "S1", "10x_h5")
    write_sample(samples[2], root, "S2", "10x_mtx")
    sheet = write_sheet(root, rows)
    with pytest.warns(ImmuneageWarning, match=r"qc.mt_prefix 'MT-' matches no gene in 1 of 2"):
        report = validate_inputs(sheet, Config(), stages=("ingest", "qc"))
    assert any("'S1'" in w and "'mt-'" in w for w in report.warnings)
    # a run issues it when qc runs, and a rerun with qc current stays quiet
    out0 = tmp_path / "out0"
    with pytest.warns(ImmuneageWarning) as caught:
        Runner(sheet, Config(), out0, argv=["test"]).run(until="qc")
    assert sum("qc.mt_prefix 'MT-'" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert Runner(sheet, Config(), out0, argv=["test"]).run(until="qc").stages == {
            "ingest": "up to date",
            "qc": "up to date",
        }
    assert not any("qc.mt_prefix" in str(w.message) for w in again)

    # a mouse sample: refused before anything is written, naming it and what to set
    write_sample(mouse, root, "S2", "10x_mtx")
    before = tree_checksums(root)
    out = tmp_path / "out"
    argv = ["--samplesheet", str(sheet), "--config", str(root / "config.yaml")]
    capsys.readouterr()  # only what this run prints
    assert main(["run", *argv, "--outdir", str(out), "--until", "ingest"]) == 2
    err = capsys.readouterr().err
    for needed in (
        "'S2'",
        "S2_mtx",
        "title-case",
        "'mt-'",
        "annotate.markers",
        "score.custom",
        "qc.mt_prefix",
        "ingest.species_check: warn",
    ):
        assert needed in err, (needed, err)
    assert "'S1'" not in err.split("look like")[0]
    assert not out.exists()
    assert tree_checksums(root) == before
    assert main(["validate", *argv]) == 2
    # a whole mouse cohort runs with species_check: warn and mouse prefixes, warning only once
    mouse0 = samples[0].copy()
    mouse0.var_names = mouse_symbols(list(mouse0.var_names))
    write_sample(mouse0, root, "S1", "10x_h5")
    settings = {
        "ingest": {"species_check": "warn"},
        "qc": {"mt_prefix": "mt-", "ribo_prefixes": ["Rps", "Rpl"]},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(settings))
    capsys.readouterr()
    assert main(["validate", "--qc-only", *argv]) == 0
    printed = capsys.readouterr().out
    assert "OK: 2 samples" in printed
    warned = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1, printed
    assert "look like mouse" in warned[0] and "going on" in warned[0]
    assert "2 of 2 sample(s)" in warned[0]


def test_ambient_correction_in_ingest(tmp_path, samples):
    """ambient.method decontx through the runner: Cell Ranger outs/ (raw matrix beside) + h5ad."""
    root = tmp_path / "in"
    cells = samples[0].copy()
    cells.var[keys.GENE_IDS] = gene_ids(cells.var_names).astype(str)
    write_cellranger_outs(cells, root / "data" / "S1", raw_droplets=2000, mtx=False)
    rows = [
        {"sample": "S1", "donor": "D1", "timepoint": "baseline", "path": "data/S1", "library": "A"},
        {
            "sample": "S2",
            "donor": "D1",
            "timepoint": "acute",
            "path": write_sample(samples[1], root, "S2", "h5ad_noids"),
            "library": "A",
        },
        *(  # a sample of two libraries: corrected one by one, stacked
            {
                "sample": "S3",
                "donor": "D1",
                "timepoint": "longterm",
                "path": write_sample(samples[i], root, f"S3_{lib}", "10x_h5"),
                "library": lib,
            }
            for i, lib in ((2, "A"), (3, "B"))
        ),
    ]
    sheet = write_sheet(root, rows)
    out = tmp_path / "out"
    merged, table = run_ingest(sheet, out, ambient={"method": "decontx"})
    # the record says what ran on which matrix; the raw matrix only where Cell Ranger left one
    assert (
        table.loc[0, "ambient"].startswith("decontx: ")
        and "(raw matrix)" in table.loc[0, "ambient"]
    )
    assert "(filtered matrix only)" in table.loc[1, "ambient"]
    assert table.loc[0, "raw_matrix"].endswith("raw_feature_bc_matrix.h5")
    # per sample: corrected integer counts, never above the originals, which are kept
    for sample, source in (("S1", samples[0]), ("S2", samples[1])):
        unit = read_h5ad_artifact(out / "ingest" / "samples" / f"{sample}.h5ad")
        corrected = unit.layers[keys.COUNTS]
        original = unit.layers[keys.COUNTS_UNCORRECTED]
        np.testing.assert_array_equal(original.toarray(), source.X.toarray())
        assert np.array_equal(corrected.data, np.rint(corrected.data))
        assert (corrected.toarray() <= original.toarray()).all()
        assert corrected.sum() < original.sum()
        assert unit.obs[keys.AMBIENT_FRACTION].between(0, 1).all()
    s3 = read_h5ad_artifact(out / "ingest" / "samples" / "S3.h5ad")
    assert s3.obs[keys.LIBRARY].tolist() == ["A"] * samples[2].n_obs + ["B"] * samples[3].n_obs
    assert table.loc[2, "ambient"].count("decontx: ") == 2  # one record per library
    uncorrected = s3.layers[keys.COUNTS_UNCORRECTED].toarray()
    np.testing.assert_array_equal(uncorrected[: samples[2].n_obs], samples[2].X.toarray())
    np.testing.assert_array_equal(uncorrected[samples[2].n_obs :], samples[3].X.toarray())
    # the cohort carries the corrected counts and the per-cell fractions (numbers)
    assert pd.api.types.is_float_dtype(merged.obs[keys.AMBIENT_FRACTION])
    assert merged.obs[keys.AMBIENT_FRACTION].notna().all()
    assert merged.X.sum() < sum(s.X.sum() for s in samples[:4])  # X = counts in ingest
    # the section is in the ingest stamp: turning it off re-runs ingest with the counts as read
    merged_off, table_off = run_ingest(sheet, out)
    assert (table_off["ambient"] == "none").all()
    assert_counts(merged_off, "S2", samples[1])
