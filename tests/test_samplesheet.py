"""Sample sheet parsing and validation: one test per problem, each naming line and column."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.errors import ImmuneageWarning, SampleSheetError
from pipeline.io import SampleSheet, read_samplesheet

HEADER = "sample,donor,timepoint,path,age,batch"
LIB_HEADER = "sample,donor,timepoint,library,path,age"
GOOD = [
    "D1_base,D1,baseline,data/a.h5ad,31,b1",
    "D1_acute,D1,acute,data/b.h5,31,b1",
    "D2_base,D2,baseline,data/c_mtx,45,b2",
]


def sheet_dir(tmp_path: Path) -> Path:
    """A directory with the counts 'files' the sheets name (existence is all that is checked)."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for name in ("a.h5ad", "b.h5", "d.h5ad", "e.h5ad"):
        (data / name).write_bytes(b"")
    (data / "c_mtx").mkdir(exist_ok=True)
    return tmp_path


def write_sheet(tmp_path: Path, lines: list[str], name: str = "sheet.csv") -> Path:
    root = sheet_dir(tmp_path)
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read(path: Path, cfg: Config | None = None, **kw) -> SampleSheet:
    cfg = cfg or Config()
    return read_samplesheet(path, cfg.design, cfg.ingest, **kw)


def test_valid_sheet(tmp_path: Path) -> None:
    path = write_sheet(tmp_path, [HEADER, *GOOD])
    sheet = read(path)
    assert sheet.path == path.resolve()
    assert sheet.samples == ("D1_base", "D1_acute", "D2_base")
    assert sheet.donors == ("D1", "D2")
    assert sheet.extra_columns == ("age", "batch")
    first = sheet.rows[0]
    assert first.row == 2
    assert sheet.rows[2].row == 4
    assert first.path == (tmp_path / "data" / "a.h5ad").resolve()
    assert first.path.is_absolute()
    assert first.extra == {"age": "31", "batch": "b1"}
    frame = sheet.to_frame()
    assert list(frame.columns) == ["sample", "donor", "timepoint", "path", "row", "age", "batch"]
    assert frame["path"].iloc[2] == str((tmp_path / "data" / "c_mtx").resolve())
    assert len(sheet) == 3


def test_paths_relative_to_sheet_not_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_sheet(tmp_path, [HEADER, *GOOD])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    sheet = read(Path(os.path.relpath(path, elsewhere)))
    assert sheet.rows[0].path == (tmp_path / "data" / "a.h5ad").resolve()


def test_absolute_path_whitespace_bom_and_blank_lines(tmp_path: Path) -> None:
    root = sheet_dir(tmp_path)
    absolute = (root / "data" / "d.h5ad").resolve()
    text = (
        "\ufeff sample , donor,timepoint ,path\n"
        " D1_base , D1 ,baseline, data/a.h5ad \n"
        "\n"
        f"D2_base,D2,baseline,{absolute}\n"
    )
    path = root / "sheet.csv"
    path.write_text(text, encoding="utf-8")
    sheet = read(path)
    assert sheet.samples == ("D1_base", "D2_base")
    assert sheet.rows[0].donor == "D1"
    assert sheet.rows[1].path == absolute
    assert sheet.rows[1].row == 4
    assert sheet.extra_columns == ()


def test_check_paths_false_allows_missing_files(tmp_path: Path) -> None:
    path = write_sheet(tmp_path, [HEADER, "S1,D1,baseline,nowhere.h5ad,1,b"])
    sheet = read(path, check_paths=False)
    assert sheet.rows[0].path == (tmp_path / "nowhere.h5ad").resolve()


def test_missing_baseline_warns_naming_donors(tmp_path: Path) -> None:
    path = write_sheet(tmp_path, [HEADER, *GOOD, "D3_acute,D3,acute,data/d.h5ad,50,b2"])
    with pytest.warns(ImmuneageWarning, match="'D3'") as record:
        sheet = read(path)
    assert "line(s) 5" in str(record[0].message)
    assert "D3_acute" in sheet.samples


def test_samples_sharing_a_file_warn(tmp_path: Path) -> None:
    path = write_sheet(tmp_path, [HEADER, *GOOD, "D2_acute,D2,acute,data/./a.h5ad,45,b2"])
    with pytest.warns(ImmuneageWarning, match="share a counts file"):
        read(path)


def test_sheet_does_not_exist(tmp_path: Path) -> None:
    path = tmp_path / "missing.csv"
    with pytest.raises(SampleSheetError, match="does not exist") as info:
        read(path)
    assert str(path) in str(info.value)


# (id, lines or bytes, config overrides, substrings the message must hold)
ERROR_CASES = [
    ("empty file", [], {}, ["is empty", "sample,donor,timepoint,path"]),
    ("header only", [HEADER], {}, ["lists no samples"]),
    (
        "ragged line",
        [HEADER, "S1,D1,baseline,data/a.h5ad,1,b,EXTRA"],
        {},
        ["not a valid CSV", "line 2"],
    ),
    (
        "missing column",
        ["sample,donor,path", "S1,D1,data/a.h5ad"],
        {},
        ["'timepoint'", "found 'sample', 'donor', 'path'"],
    ),
    (
        "wrong case column",
        ["sample,donor,Timepoint,path", "S1,D1,baseline,data/a.h5ad"],
        {},
        ["'timepoint'", "'Timepoint' -> 'timepoint'"],
    ),
    (
        "tab separated",
        ["sample\tdonor\ttimepoint\tpath", "S1\tD1\tbaseline\tdata/a.h5ad"],
        {},
        ["lacks the required", "tab- or semicolon-separated"],
    ),
    (
        "duplicate column",
        ["sample,donor,timepoint,path,age,age", "S1,D1,baseline,data/a.h5ad,1,2"],
        {},
        ["repeats the column", "'age'", "line 1"],
    ),
    (
        "unnamed column with values",
        ["sample,donor,timepoint,path,", "S1,D1,baseline,data/a.h5ad,x"],
        {},
        ["column 5", "no name"],
    ),
    (
        "reserved column",
        ["sample,donor,timepoint,path,barcode", "S1,D1,baseline,data/a.h5ad,x"],
        {},
        ["'barcode'", "line 1", "rename"],
    ),
    (
        "empty required value",
        [HEADER, GOOD[0], "D1_acute,,acute,data/b.h5,31,b1"],
        {},
        ["line 3, column 'donor'", "empty"],
    ),
    (
        "duplicate sample",
        [HEADER, GOOD[0], GOOD[1], "D1_base,D2,baseline,data/c_mtx,45,b2"],
        {},
        ["line 4, column 'sample'", "'D1_base'", "line 2"],
    ),
    (
        "missing path",
        [HEADER, GOOD[0], "D2_base,D2,baseline,data/gone.h5ad,45,b2"],
        {},
        ["line 3, column 'path'", "'data/gone.h5ad'", "does not exist"],
    ),
    (
        "unknown timepoint",
        [HEADER, GOOD[0], "D1_post,D1,post,data/b.h5,31,b1"],
        {},
        ["line 3, column 'timepoint'", "'post'", "baseline, acute, longterm", "design.timepoints"],
    ),
    (
        "duplicate donor timepoint",
        [HEADER, GOOD[0], "D1_base2,D1,baseline,data/b.h5,31,b1"],
        {},
        ["line 3", "'D1'", "'baseline'", "'D1_base'", "line 2", "'D1_base2'", "'library' column"],
    ),
    (
        "duplicate sample hints at the library column",
        [HEADER, GOOD[0], "D1_base,D1,baseline,data/b.h5,31,b1"],
        {},
        ["line 3, column 'sample'", "line 2", "add a 'library' column"],
    ),
    (
        "library empty on a repeated sample",
        [LIB_HEADER, "S1,D1,baseline,L1,data/a.h5ad,1", "S1,D1,baseline,,data/b.h5,1"],
        {},
        ["line 3, column 'library'", "empty", "distinct library value"],
    ),
    (
        "library repeated",
        [LIB_HEADER, "S1,D1,baseline,L1,data/a.h5ad,1", "S1,D1,baseline,L1,data/b.h5,1"],
        {},
        ["line 3, column 'library'", "'L1'", "line 2", "distinct name"],
    ),
    (
        "libraries with different donors",
        [LIB_HEADER, "S1,D1,baseline,L1,data/a.h5ad,1", "S1,D2,baseline,L2,data/b.h5,1"],
        {},
        ["line 3, column 'donor'", "'D2' differs from 'D1' on line 2", "share"],
    ),
    (
        "libraries with different timepoints",
        [LIB_HEADER, "S1,D1,baseline,L1,data/a.h5ad,1", "S1,D1,acute,L2,data/b.h5,1"],
        {},
        ["line 3, column 'timepoint'", "'acute' differs from 'baseline'"],
    ),
    (
        "libraries with different extra values",
        [LIB_HEADER, "S1,D1,baseline,L1,data/a.h5ad,1", "S1,D1,baseline,L2,data/b.h5,2"],
        {},
        ["line 3, column 'age'", "'2' differs from '1'"],
    ),
    (
        "library reads the same file twice",
        [LIB_HEADER, "S1,D1,baseline,L1,data/a.h5ad,1", "S1,D1,baseline,L2,data/./a.h5ad,1"],
        {},
        ["line 3, column 'path'", "like line 2", "counted twice"],
    ),
    (
        "unsafe library id",
        [LIB_HEADER, "S1,D1,baseline,L:1,data/a.h5ad,1"],
        {},
        ["line 2, column 'library'", "'L:1'", "safe library id"],
    ),
    (
        "unsafe sample id slash",
        [HEADER, "D1/base,D1,baseline,data/a.h5ad,31,b1"],
        {},
        ["line 2, column 'sample'", "'D1/base'", "safe"],
    ),
    (
        "unsafe sample id leading dot",
        [HEADER, ".D1,D1,baseline,data/a.h5ad,31,b1"],
        {},
        ["line 2, column 'sample'", "'.D1'", "not starting with '.'"],
    ),
    (
        "unsafe sample id colon",
        [HEADER, "D1:base,D1,baseline,data/a.h5ad,31,b1"],
        {},
        ["line 2, column 'sample'", "'D1:base'"],
    ),
    (
        "missing baseline is an error when configured",
        [HEADER, GOOD[0], "D3_acute,D3,acute,data/d.h5ad,50,b2"],
        {"ingest": {"missing_baseline": "error"}},
        ["'D3'", "line(s) 3", "missing_baseline"],
    ),
    ("not utf-8", b"sample,donor,timepoint,path\n\xff\xfe\x00\x81,D1,baseline,x\n", {}, ["UTF-8"]),
]


@pytest.mark.parametrize(
    ("lines", "overrides", "needles"),
    [pytest.param(lines, o, n, id=i) for i, lines, o, n in ERROR_CASES],
)
def test_sheet_errors(
    tmp_path: Path, lines: list[str] | bytes, overrides: dict, needles: list[str]
) -> None:
    root = sheet_dir(tmp_path)
    path = root / "sheet.csv"
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("\n".join(lines) + ("\n" if lines else ""))
    before = sha(path)
    cfg = Config.model_validate(overrides)
    with pytest.raises(SampleSheetError) as info:
        read(path, cfg)
    msg = str(info.value)
    assert str(path.resolve()) in msg
    for needle in needles:
        assert needle in msg, msg
    assert sha(path) == before


def test_spreadsheet_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sheet.xlsx"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(SampleSheetError, match="export it as CSV"):
        read(path)


def test_all_line_problems_reported_together(tmp_path: Path) -> None:
    path = write_sheet(
        tmp_path,
        [HEADER, "a/b,D1,baseline,data/a.h5ad,1,x", "S2,D2,later,data/b.h5,1,x"],
    )
    with pytest.raises(SampleSheetError, match="2 problem") as info:
        read(path)
    assert "line 2, column 'sample'" in str(info.value)
    assert "line 3, column 'timepoint'" in str(info.value)


def test_custom_design_levels(tmp_path: Path) -> None:
    cfg = Config.model_validate(
        {"design": {"timepoints": ["pre", "post"], "baseline": "pre", "contrasts": ["post vs pre"]}}
    )
    path = write_sheet(
        tmp_path, ["sample,donor,timepoint,path", "A,D1,pre,data/a.h5ad", "B,D1,post,data/b.h5"]
    )
    assert read(path, cfg).samples == ("A", "B")


def test_libraries_and_reading_options(tmp_path: Path) -> None:
    """Lines sharing a sample id with distinct libraries are one sample; options stay per line."""
    lines = [
        "sample,donor,timepoint,library,path,counts_layer,symbol_column,age",
        "D1_base,D1,baseline,L1,data/a.h5ad,raw_counts,,31",
        "D1_acute,D1,acute,,data/b.h5,,,31",
        "D1_base,D1,baseline,L2,data/d.h5ad,,feature_name,31",
        "D2_base,D2,baseline,,data/c_mtx,,,45",
    ]
    sheet = read(write_sheet(tmp_path, lines))
    assert sheet.samples == ("D1_base", "D1_acute", "D2_base")
    assert sheet.extra_columns == ("age",)
    assert sheet.option_columns == ("library", "counts_layer", "symbol_column")
    base = sheet.rows[0]
    assert [lib.library for lib in base.libraries] == ["L1", "L2"]
    assert base.lines == (2, 4)
    assert base.paths == (
        (tmp_path / "data" / "a.h5ad").resolve(),
        (tmp_path / "data" / "d.h5ad").resolve(),
    )
    assert base.path == base.paths[0] and base.row == 2  # the first library's
    assert base.counts_layer == "raw_counts" and base.symbol_column is None
    assert base.libraries[1].counts_layer is None
    assert base.libraries[1].symbol_column == "feature_name"
    assert base.extra == {"age": "31"}
    single = sheet.rows[1]
    assert len(single.libraries) == 1 and single.libraries[0].library == ""
    frame = sheet.to_frame()
    assert len(frame) == 4
    assert list(frame.columns) == [
        "sample",
        "donor",
        "timepoint",
        "path",
        "row",
        "library",
        "counts_layer",
        "symbol_column",
        "age",
    ]
    assert frame["library"].tolist() == ["L1", "L2", "", ""]
    # reading options: the line's, else the config's, passed only when set
    cfg = Config.model_validate({"ingest": {"counts_layer": "counts"}})
    assert base.libraries[0].reader_options(cfg.ingest) == {"counts_layer": "raw_counts"}
    assert base.libraries[1].reader_options(cfg.ingest) == {
        "counts_layer": "counts",
        "symbol_column": "feature_name",
    }
    assert single.libraries[0].reader_options(Config().ingest) == {}


def test_sample_row_without_libraries_is_one_library(tmp_path: Path) -> None:
    """SampleRow built the old way (runner, Slurm, tests) still has one library."""
    from pipeline.io import SampleRow

    row = SampleRow("S1", "D1", "baseline", tmp_path / "a.h5ad", 2, {"age": "1"})
    assert row.paths == (tmp_path / "a.h5ad",)
    assert row.libraries[0].library == "" and row.libraries[0].row == 2
