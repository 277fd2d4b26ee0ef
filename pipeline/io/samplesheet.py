"""Read and validate the sample sheet: one CSV line per sample.

Required columns are ``sample, donor, timepoint, path``
(:data:`pipeline.keys.SHEET_REQUIRED`). Optional columns
(:data:`OPTION_COLUMNS`) say how to read a line's file and are not carried
into ``obs``:

``library``
    Several lines with the same ``sample`` id and distinct ``library`` values
    are one sample sequenced on several libraries (10x lanes / GEM wells):
    they must share donor, timepoint and extra values and name different
    files; ingest reads each and concatenates them (``obs["library"]``).
``counts_layer``
    Where an ``.h5ad`` keeps the raw counts (a layer name, ``X`` or ``raw.X``);
    empty = ``ingest.counts_layer``.
``symbol_column``
    The var column holding gene symbols (e.g. ``feature_name``); empty =
    ``ingest.symbol_column``.

Any further column (``age``, ``batch``, ...) is carried into ``obs`` by
ingest. Paths are resolved against the sheet's directory. Every problem is a
:class:`~pipeline.errors.SampleSheetError` naming the sheet, the line and the
column; all line-level problems of a sheet are reported together.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import keys
from ..config import DesignConfig, IngestConfig
from ..errors import ImmuneageWarning, SampleSheetError

__all__ = [
    "COUNTS_LAYER",
    "OPTION_COLUMNS",
    "RESERVED_COLUMNS",
    "SYMBOL_COLUMN",
    "LibraryRow",
    "SampleRow",
    "SampleSheet",
    "read_samplesheet",
]

#: Optional column: where an .h5ad file keeps the raw counts (per line; empty = config default).
COUNTS_LAYER = "counts_layer"
#: Optional column: the var column holding gene symbols (per line; empty = config default).
SYMBOL_COLUMN = "symbol_column"
#: Optional columns that say how to read a line's file; not carried into obs.
OPTION_COLUMNS: tuple[str, ...] = (keys.LIBRARY, COUNTS_LAYER, SYMBOL_COLUMN)
#: Extra columns that would clash with an obs column the pipeline writes.
RESERVED_COLUMNS: tuple[str, ...] = (keys.BARCODE,)

_SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_MAX_LISTED = 20  # line-level problems listed in one error


@dataclass(frozen=True)
class LibraryRow:
    """One line of the sheet: one counts file of a sample.

    Attributes
    ----------
    library
        The ``library`` value (``""`` when the sheet has no ``library`` column
        or the line leaves it empty).
    path
        The counts file, resolved to an absolute path.
    row
        1-based line number in the CSV.
    counts_layer, symbol_column
        The line's reading options (``None``: the ``ingest`` config default).
    """

    library: str
    path: Path
    row: int
    counts_layer: str | None = None
    symbol_column: str | None = None

    def reader_options(self, ingest: IngestConfig) -> dict[str, str]:
        """How to read this line's file: its own options, else the ``ingest`` config's.

        Parameters
        ----------
        ingest
            Gives the defaults ``ingest.counts_layer`` and ``ingest.symbol_column``.

        Returns
        -------
        Keyword arguments for :func:`~pipeline.io.readers.read_counts` and
        :func:`~pipeline.io.readers.inspect_counts`: ``counts_layer`` and
        ``symbol_column``, each only when set.
        """
        options = {
            "counts_layer": self.counts_layer or ingest.counts_layer,
            "symbol_column": self.symbol_column or ingest.symbol_column,
        }
        return {k: v for k, v in options.items() if v is not None}


@dataclass(frozen=True)
class SampleRow:
    """One sample of the sheet (one or several lines: its libraries).

    Attributes
    ----------
    sample
        Sample id (a safe file name; unique in the sheet).
    donor
        Donor id.
    timepoint
        One of ``design.timepoints``.
    path
        The counts file, resolved to an absolute path (relative paths are
        relative to the sheet's directory); of the first library when there are several.
    row
        1-based line number in the CSV (the header is line 1); the first library's.
    extra
        Values of the sheet's extra columns (``age``, ``batch``, ...), as strings.
    counts_layer, symbol_column
        Reading options of the (first) line; ``None``: the ``ingest`` config default.
    libraries
        Every line of the sample, in sheet order; left empty, one library
        made of ``path``, ``row`` and the options above.
    """

    sample: str
    donor: str
    timepoint: str
    path: Path
    row: int
    extra: dict[str, str] = field(default_factory=dict)
    counts_layer: str | None = None
    symbol_column: str | None = None
    libraries: tuple[LibraryRow, ...] = ()

    def __post_init__(self) -> None:
        if not self.libraries:
            only = LibraryRow("", self.path, self.row, self.counts_layer, self.symbol_column)
            object.__setattr__(self, "libraries", (only,))

    @property
    def paths(self) -> tuple[Path, ...]:
        """The counts files of every library, in sheet order."""
        return tuple(lib.path for lib in self.libraries)

    @property
    def lines(self) -> tuple[int, ...]:
        """The sheet lines of every library."""
        return tuple(lib.row for lib in self.libraries)


@dataclass(frozen=True)
class SampleSheet:
    """A validated sample sheet.

    Attributes
    ----------
    path
        The sheet file (absolute).
    rows
        The samples, in sheet order.
    extra_columns
        Names of the columns carried into ``obs`` (beyond ``sample, donor,
        timepoint, path`` and the :data:`OPTION_COLUMNS`), in sheet order.
    option_columns
        The :data:`OPTION_COLUMNS` the sheet has.
    """

    path: Path
    rows: tuple[SampleRow, ...]
    extra_columns: tuple[str, ...]
    option_columns: tuple[str, ...] = ()

    @property
    def samples(self) -> tuple[str, ...]:
        """Sample ids in sheet order."""
        return tuple(r.sample for r in self.rows)

    @property
    def donors(self) -> tuple[str, ...]:
        """Donor ids in order of first appearance."""
        return tuple(dict.fromkeys(r.donor for r in self.rows))

    def __len__(self) -> int:
        return len(self.rows)

    def metadata(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The extra columns per sample, typed as a user means them.

        Parameters
        ----------
        columns
            Extra columns to return (default: all, in sheet order).

        Returns
        -------
        One row per sample (index ``sample``, sheet order). A column whose
        non-blank values all parse as numbers is numeric (``int64`` when all are
        whole and none is blank, else ``float64`` with blanks as NaN); any other
        column is categorical of strings in order of first appearance, blanks
        missing.

        Raises
        ------
        KeyError
            A column that is not an extra column of the sheet.
        """
        names = list(self.extra_columns if columns is None else columns)
        unknown = [c for c in names if c not in self.extra_columns]
        if unknown:
            raise KeyError(f"not extra columns of {self.path}: {', '.join(unknown)}")
        index = pd.Index(self.samples, name=keys.SAMPLE)
        out = pd.DataFrame(index=index)
        for c in names:
            out[c] = typed_column([r.extra.get(c, "") for r in self.rows], index)
        return out

    def to_frame(self) -> pd.DataFrame:
        """The sheet as a table.

        Returns
        -------
        One row per line (library) with columns ``sample, donor, timepoint,
        path`` (absolute, as str), ``row`` (line number), the option columns
        the sheet has (empty when unset) and the extra columns.
        """
        records = [
            {
                keys.SAMPLE: r.sample,
                keys.DONOR: r.donor,
                keys.TIMEPOINT: r.timepoint,
                "path": str(lib.path),
                "row": lib.row,
                keys.LIBRARY: lib.library,
                COUNTS_LAYER: lib.counts_layer or "",
                SYMBOL_COLUMN: lib.symbol_column or "",
                **r.extra,
            }
            for r in self.rows
            for lib in r.libraries
        ]
        columns = [*keys.SHEET_REQUIRED, "row", *self.option_columns, *self.extra_columns]
        return pd.DataFrame.from_records(records, columns=columns)


def typed_column(values: Sequence[str], index: pd.Index | None = None) -> pd.Series:
    """Strings from a sheet or table as the type a user means (see :meth:`SampleSheet.metadata`).

    Numbers (every non-blank value parses as one) become ``int64`` when all are
    whole and none is blank, else ``float64`` with blanks NaN; anything else is
    a categorical of the stripped strings in order of first appearance, blanks
    missing. ``NA``, ``NaN`` and ``nan`` count as blanks for numbers only.
    """
    text = [str(v).strip() for v in values]
    missing = {"", "NA", "NaN", "nan", "N/A", "na"}
    present = [v for v in text if v not in missing]
    numbers = pd.to_numeric(pd.Series(present, dtype=object), errors="coerce")
    if present and not numbers.isna().any():
        arr = pd.to_numeric(
            pd.Series([v if v not in missing else None for v in text], dtype=object),
            errors="coerce",
        ).astype("float64")
        values = arr.dropna().to_numpy()
        whole = bool(np.all(np.isfinite(values))) and bool(np.all(np.mod(values, 1) == 0))
        if whole and not arr.isna().any():
            arr = arr.astype("int64")
        return pd.Series(arr.to_numpy(), index=index, dtype=arr.dtype)
    cats = list(dict.fromkeys(v for v in text if v != ""))
    return pd.Series(
        pd.Categorical([v if v != "" else None for v in text], categories=cats), index=index
    )


def _read_table(path: Path) -> pd.DataFrame:
    """All cells of the CSV as stripped strings; row ``i`` is line ``i + 1``."""
    where = f"sample sheet {path}"
    if not path.exists():
        raise SampleSheetError(f"{where} does not exist; pass an existing CSV file")
    if not path.is_file():
        raise SampleSheetError(f"{where} is not a file; pass a CSV file")
    if path.suffix.lower() in {".xlsx", ".xls", ".ods"}:
        raise SampleSheetError(f"{where} is a spreadsheet; export it as CSV (comma-separated)")
    try:
        table = pd.read_csv(
            path,
            header=None,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            encoding="utf-8-sig",
        )
    except pd.errors.EmptyDataError:
        raise SampleSheetError(
            f"{where} is empty; it needs the header line "
            f"'{','.join(keys.SHEET_REQUIRED)}' and one line per sample"
        ) from None
    except pd.errors.ParserError as exc:
        detail = str(exc).removeprefix("Error tokenizing data. C error: ").strip()
        raise SampleSheetError(
            f"{where} is not a valid CSV file ({detail}); every line must have as many "
            "comma-separated fields as the header, and values containing commas must be quoted"
        ) from None
    except UnicodeDecodeError:
        raise SampleSheetError(
            f"{where} is not a UTF-8 text file; save it as CSV (comma-separated, UTF-8)"
        ) from None
    except OSError as exc:
        raise SampleSheetError(f"{where} cannot be read ({exc.strerror or exc})") from None
    return table.fillna("").apply(lambda column: column.str.strip())


def _header(table: pd.DataFrame, where: str) -> tuple[list[str], list[int]]:
    """Column names and the positions of the columns kept (unnamed empty ones dropped)."""
    names = [str(v) for v in table.iloc[0]]
    kept: list[int] = []
    for i, name in enumerate(names):
        if name:
            kept.append(i)
        elif (table.iloc[1:, i] != "").any():
            raise SampleSheetError(
                f"{where}: column {i + 1} has values but no name in the header (line 1); "
                "name it or delete it"
            )
    names = [names[i] for i in kept]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SampleSheetError(
            f"{where}: the header (line 1) repeats the column(s) {', '.join(map(repr, dup))}; "
            "each column name must appear once"
        )
    missing = [c for c in keys.SHEET_REQUIRED if c not in names]
    if missing:
        lower = {n.lower(): n for n in names}
        near = [f"{lower[c]!r} -> {c!r}" for c in missing if c in lower]
        hint = f" Rename {', '.join(near)} (names are case-sensitive)." if near else ""
        if len(names) == 1 and any(sep in names[0] for sep in "\t;"):
            hint += " The file looks tab- or semicolon-separated; save it comma-separated."
        raise SampleSheetError(
            f"{where}: the header (line 1) lacks the required column(s) "
            f"{', '.join(map(repr, missing))}; found {', '.join(map(repr, names)) or 'none'}. "
            f"Required: {', '.join(keys.SHEET_REQUIRED)}.{hint}"
        )
    reserved = [n for n in names if n in RESERVED_COLUMNS]
    if reserved:
        raise SampleSheetError(
            f"{where}: the column(s) {', '.join(map(repr, reserved))} (line 1) would overwrite "
            "the obs column of the same name that immuneage writes; rename it"
        )
    return names, kept


@dataclass
class _Sample:
    """The lines of one sample while the sheet is read."""

    donor: str
    timepoint: str
    extra: dict[str, str]
    libraries: list[LibraryRow]


_REPLICATE_HINT = (
    "keep one sample per donor and timepoint: if the lines are libraries (10x lanes / GEM "
    "wells) of one sample, give them the same sample id and a distinct value in a 'library' "
    "column; otherwise merge or drop replicates"
)


def _library_problems(
    line: int,
    sample: str,
    library: str,
    donor: str,
    timepoint: str,
    counts_path: Path,
    extra: dict[str, str],
    first: _Sample,
    has_library_column: bool,
) -> list[str]:
    """Why a line cannot be another library of ``sample`` (empty when it can)."""
    other = first.libraries[0].row
    if not has_library_column:
        return [
            f"line {line}, column 'sample': sample {sample!r} is already on line {other}; "
            "sample ids must be unique (if both lines are libraries, e.g. 10x lanes or GEM "
            "wells, of one sample, add a 'library' column with a distinct value on each line)"
        ]
    unnamed = [lib.row for lib in first.libraries if not lib.library]
    if not library or unnamed:
        where = line if not library else unnamed[0]
        return [
            f"line {where}, column 'library': empty, but sample {sample!r} has several lines "
            f"({other} and {line}); the lines of one sample are its libraries and each needs a "
            "distinct library value (or give the lines different sample ids)"
        ]
    problems = []
    same = [lib.row for lib in first.libraries if lib.library == library]
    if same:
        problems.append(
            f"line {line}, column 'library': library {library!r} of sample {sample!r} is already "
            f"on line {same[0]}; give each library of a sample a distinct name"
        )
    for column, value, expected in (
        (keys.DONOR, donor, first.donor),
        (keys.TIMEPOINT, timepoint, first.timepoint),
        *((c, extra[c], first.extra[c]) for c in extra),
    ):
        if value != expected:
            problems.append(
                f"line {line}, column {column!r}: {value!r} differs from {expected!r} on line "
                f"{other} (same sample {sample!r}); the libraries of a sample share its donor, "
                "timepoint and extra values: fix the value, or give the line its own sample id"
            )
    same_file = [lib.row for lib in first.libraries if lib.path == counts_path]
    if same_file:
        problems.append(
            f"line {line}, column 'path': library {library!r} reads {counts_path}, like line "
            f"{same_file[0]} of the same sample {sample!r}; each library is a different file "
            "(its cells would be counted twice)"
        )
    return problems


def read_samplesheet(
    path: Path, design: DesignConfig, ingest: IngestConfig, *, check_paths: bool = True
) -> SampleSheet:
    """Read and validate a sample sheet.

    Parameters
    ----------
    path
        CSV file with the columns ``sample, donor, timepoint, path``, optionally
        ``library``, ``counts_layer``, ``symbol_column``, and any extras.
    design
        Gives the allowed timepoint levels and the baseline level.
    ingest
        ``ingest.missing_baseline`` decides whether a donor without a baseline
        sample is a warning or an error.
    check_paths
        Check that every ``path`` exists.

    Returns
    -------
    The validated :class:`SampleSheet`: one :class:`SampleRow` per sample id
    (several lines of one sample with distinct ``library`` values become its
    :attr:`SampleRow.libraries`).

    Raises
    ------
    SampleSheetError
        The sheet is missing, unreadable, not CSV, or lacks a required column;
        a column name repeats; there are no samples; or lines have an empty
        required value, a repeated sample id (without distinct ``library``
        values), an unsafe sample or library id, a missing path, an unknown
        timepoint, or a repeated (donor, timepoint); the libraries of one
        sample differ in donor, timepoint or extra values, or repeat a file.
        Every problem is named with its line and column.

    Warns
    -----
    ImmuneageWarning
        Donors without a ``design.baseline`` sample (an error instead when
        ``ingest.missing_baseline == "error"``); two samples share a file.
    """
    path = Path(path).expanduser().resolve()
    where = f"sample sheet {path}"
    table = _read_table(path)
    names, kept = _header(table, where)
    option_columns = tuple(c for c in OPTION_COLUMNS if c in names)
    extra_columns = tuple(
        n for n in names if n not in keys.SHEET_REQUIRED and n not in OPTION_COLUMNS
    )
    has_library_column = keys.LIBRARY in names

    problems: list[str] = []
    samples: dict[str, _Sample] = {}
    by_visit: dict[tuple[str, str], tuple[str, int]] = {}
    by_path: dict[Path, tuple[str, int]] = {}
    shared_files: list[str] = []
    allowed = ", ".join(design.timepoints)
    for i in range(1, len(table)):
        line = i + 1
        values = dict(zip(names, (table.iat[i, j] for j in kept), strict=True))
        if not any(values.values()):
            continue  # blank line
        empty = [c for c in keys.SHEET_REQUIRED if not values[c]]
        for column in empty:
            problems.append(f"line {line}, column {column!r}: empty; every sample needs a {column}")
        if empty:
            continue
        sample, donor, timepoint = values[keys.SAMPLE], values[keys.DONOR], values[keys.TIMEPOINT]
        library = values.get(keys.LIBRARY, "")
        extra = {c: values[c] for c in extra_columns}
        ok = True
        if not _SAFE_ID.fullmatch(sample):
            problems.append(
                f"line {line}, column 'sample': {sample!r} is not a safe sample id; it becomes "
                "a file name, so use only letters, digits, '.', '_' and '-', not starting with '.'"
            )
            ok = False
        if library and not _SAFE_ID.fullmatch(library):
            problems.append(
                f"line {line}, column 'library': {library!r} is not a safe library id; it becomes "
                "part of cell ids, so use only letters, digits, '.', '_' and '-', not starting "
                "with '.'"
            )
            ok = False
        if timepoint not in design.timepoints:
            problems.append(
                f"line {line}, column 'timepoint': {timepoint!r} is not a timepoint level; "
                f"allowed: {allowed} (set by design.timepoints in the config)"
            )
            ok = False
        raw = Path(values["path"]).expanduser()
        counts_path = (raw if raw.is_absolute() else path.parent / raw).resolve()
        if check_paths and not counts_path.exists():
            problems.append(
                f"line {line}, column 'path': {values['path']!r} does not exist "
                f"(looked for {counts_path}); relative paths are relative to the sheet's directory"
            )
            ok = False
        first = samples.get(sample)
        if first is not None:
            found = _library_problems(
                line,
                sample,
                library,
                donor,
                timepoint,
                counts_path,
                extra,
                first,
                has_library_column,
            )
            problems += found
            ok = ok and not found
        elif ok and (donor, timepoint) in by_visit:
            other, other_line = by_visit[(donor, timepoint)]
            problems.append(
                f"line {line}, columns 'donor'/'timepoint': donor {donor!r} at {timepoint!r} "
                f"already has sample {other!r} (line {other_line}), so sample {sample!r} repeats "
                f"it; {_REPLICATE_HINT}"
            )
            ok = False
        elif ok:
            by_visit[(donor, timepoint)] = (sample, line)
        if counts_path in by_path and by_path[counts_path][0] != sample:
            other, other_line = by_path[counts_path]
            shared_files.append(
                f"{sample!r} (line {line}) and {other!r} (line {other_line}) both read {counts_path}"
            )
        elif counts_path not in by_path:
            by_path[counts_path] = (sample, line)
        if not ok:
            continue
        lib = LibraryRow(
            library=library,
            path=counts_path,
            row=line,
            counts_layer=values.get(COUNTS_LAYER) or None,
            symbol_column=values.get(SYMBOL_COLUMN) or None,
        )
        if first is None:
            samples[sample] = _Sample(donor, timepoint, extra, [lib])
        else:
            first.libraries.append(lib)

    if problems:
        shown = problems[:_MAX_LISTED]
        more = len(problems) - len(shown)
        raise SampleSheetError(
            f"{where} has {len(problems)} problem(s):\n"
            + "\n".join(f"  - {p}" for p in shown)
            + (f"\n  - ... and {more} more" if more else "")
            + "\nFix these lines, then run again."
        )
    if not samples:
        raise SampleSheetError(
            f"{where} lists no samples; add one line per sample below the header "
            f"'{','.join(names)}'"
        )
    if shared_files:
        warnings.warn(
            f"{where}: samples share a counts file ({'; '.join(shared_files)}); "
            "their cells will be counted twice",
            ImmuneageWarning,
            stacklevel=2,
        )
    rows = [
        SampleRow(
            sample=sample,
            donor=s.donor,
            timepoint=s.timepoint,
            path=s.libraries[0].path,
            row=s.libraries[0].row,
            extra=s.extra,
            counts_layer=s.libraries[0].counts_layer,
            symbol_column=s.libraries[0].symbol_column,
            libraries=tuple(s.libraries),
        )
        for sample, s in samples.items()
    ]

    with_baseline = {r.donor for r in rows if r.timepoint == design.baseline}
    lacking = [d for d in dict.fromkeys(r.donor for r in rows) if d not in with_baseline]
    if lacking:
        lines = {d: [n for r in rows if r.donor == d for n in r.lines] for d in lacking}
        listed = ", ".join(f"{d!r} (line(s) {', '.join(map(str, lines[d]))})" for d in lacking)
        if ingest.missing_baseline == "error":
            raise SampleSheetError(
                f"{where}: {len(lacking)} donor(s) have no {design.baseline!r} sample: {listed}. "
                "Add their baseline samples, or set ingest.missing_baseline: warn to keep "
                "them (paired tests then drop them)."
            )
        warnings.warn(
            f"{where}: {len(lacking)} donor(s) have no {design.baseline!r} sample: {listed}; "
            "paired tests will drop them",
            ImmuneageWarning,
            stacklevel=2,
        )
    return SampleSheet(
        path=path, rows=tuple(rows), extra_columns=extra_columns, option_columns=option_columns
    )
