"""Read and validate the sample sheet: one CSV line per sample.

Required columns are ``sample, donor, timepoint, path``
(:data:`pipeline.keys.SHEET_REQUIRED`); any further column (``age``,
``batch``, ...) is carried into ``obs`` by ingest. Paths are resolved against
the sheet's directory. Every problem is a
:class:`~pipeline.errors.SampleSheetError` naming the sheet, the line and the
column; all line-level problems of a sheet are reported together.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import keys
from ..config import DesignConfig, IngestConfig
from ..errors import ImmuneageWarning, SampleSheetError

__all__ = ["RESERVED_COLUMNS", "SampleRow", "SampleSheet", "read_samplesheet"]

#: Extra columns that would clash with an obs column the pipeline writes.
RESERVED_COLUMNS: tuple[str, ...] = (keys.BARCODE,)

_SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_MAX_LISTED = 20  # line-level problems listed in one error


@dataclass(frozen=True)
class SampleRow:
    """One sample of the sheet.

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
        relative to the sheet's directory).
    row
        1-based line number in the CSV (the header is line 1).
    extra
        Values of the sheet's extra columns (``age``, ``batch``, ...), as strings.
    """

    sample: str
    donor: str
    timepoint: str
    path: Path
    row: int
    extra: dict[str, str] = field(default_factory=dict)


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
        Names of the columns beyond ``sample, donor, timepoint, path``, in sheet order.
    """

    path: Path
    rows: tuple[SampleRow, ...]
    extra_columns: tuple[str, ...]

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

    def to_frame(self) -> pd.DataFrame:
        """The sheet as a table.

        Returns
        -------
        One row per sample with columns ``sample, donor, timepoint, path``
        (absolute, as str), ``row`` (line number) and the extra columns.
        """
        records = [
            {
                keys.SAMPLE: r.sample,
                keys.DONOR: r.donor,
                keys.TIMEPOINT: r.timepoint,
                "path": str(r.path),
                "row": r.row,
                **r.extra,
            }
            for r in self.rows
        ]
        columns = [*keys.SHEET_REQUIRED, "row", *self.extra_columns]
        return pd.DataFrame.from_records(records, columns=columns)


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


def read_samplesheet(
    path: Path, design: DesignConfig, ingest: IngestConfig, *, check_paths: bool = True
) -> SampleSheet:
    """Read and validate a sample sheet.

    Parameters
    ----------
    path
        CSV file with the columns ``sample, donor, timepoint, path`` and any extras.
    design
        Gives the allowed timepoint levels and the baseline level.
    ingest
        ``ingest.missing_baseline`` decides whether a donor without a baseline
        sample is a warning or an error.
    check_paths
        Check that every ``path`` exists.

    Returns
    -------
    The validated :class:`SampleSheet`.

    Raises
    ------
    SampleSheetError
        The sheet is missing, unreadable, not CSV, or lacks a required column;
        a column name repeats; there are no samples; or lines have an empty
        required value, a repeated or unsafe sample id, a missing path, an
        unknown timepoint, or a repeated (donor, timepoint). Every problem is
        named with its line and column.

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
    extra_columns = tuple(n for n in names if n not in keys.SHEET_REQUIRED)

    problems: list[str] = []
    rows: list[SampleRow] = []
    by_sample: dict[str, int] = {}
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
        ok = True
        if not _SAFE_ID.fullmatch(sample):
            problems.append(
                f"line {line}, column 'sample': {sample!r} is not a safe sample id; it becomes "
                "a file name, so use only letters, digits, '.', '_' and '-', not starting with '.'"
            )
            ok = False
        if sample in by_sample:
            problems.append(
                f"line {line}, column 'sample': sample {sample!r} is already on line "
                f"{by_sample[sample]}; sample ids must be unique"
            )
            ok = False
        else:
            by_sample[sample] = line
        if timepoint not in design.timepoints:
            problems.append(
                f"line {line}, column 'timepoint': {timepoint!r} is not a timepoint level; "
                f"allowed: {allowed} (set by design.timepoints in the config)"
            )
            ok = False
        elif (donor, timepoint) in by_visit:
            other, other_line = by_visit[(donor, timepoint)]
            problems.append(
                f"line {line}, columns 'donor'/'timepoint': donor {donor!r} at {timepoint!r} "
                f"already has sample {other!r} (line {other_line}), so sample {sample!r} repeats "
                "it; keep one sample per donor and timepoint (merge or drop replicates)"
            )
            ok = False
        else:
            by_visit[(donor, timepoint)] = (sample, line)
        raw = Path(values["path"]).expanduser()
        counts_path = (raw if raw.is_absolute() else path.parent / raw).resolve()
        if check_paths and not counts_path.exists():
            problems.append(
                f"line {line}, column 'path': {values['path']!r} does not exist "
                f"(looked for {counts_path}); relative paths are relative to the sheet's directory"
            )
            ok = False
        if counts_path in by_path:
            other, other_line = by_path[counts_path]
            shared_files.append(
                f"{sample!r} (line {line}) and {other!r} (line {other_line}) both read {counts_path}"
            )
        else:
            by_path[counts_path] = (sample, line)
        if ok:
            rows.append(
                SampleRow(
                    sample=sample,
                    donor=donor,
                    timepoint=timepoint,
                    path=counts_path,
                    row=line,
                    extra={c: values[c] for c in extra_columns},
                )
            )

    if problems:
        shown = problems[:_MAX_LISTED]
        more = len(problems) - len(shown)
        raise SampleSheetError(
            f"{where} has {len(problems)} problem(s):\n"
            + "\n".join(f"  - {p}" for p in shown)
            + (f"\n  - ... and {more} more" if more else "")
            + "\nFix these lines, then run again."
        )
    if not rows:
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

    with_baseline = {r.donor for r in rows if r.timepoint == design.baseline}
    lacking = [d for d in dict.fromkeys(r.donor for r in rows) if d not in with_baseline]
    if lacking:
        lines = {d: [r.row for r in rows if r.donor == d] for d in lacking}
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
    return SampleSheet(path=path, rows=tuple(rows), extra_columns=extra_columns)
