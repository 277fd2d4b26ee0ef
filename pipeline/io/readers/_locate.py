"""Where a path leads: 10x matrix directories, Cell Ranger folder layouts, the format.

:func:`_locate` resolves a sample sheet path (a file, a matrix directory or a
Cell Ranger ``count``/``multi``/v2 folder) to the filtered matrix to read,
refusing Cell Ranger's raw matrices, and finds the raw matrix beside it;
:func:`detect_format` is its public face.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import DataFileError
from ._common import (
    _ACCEPTED,
    _RAW_ADVICE,
    _REEXPORT,
    CountsFormat,
    _Located,
    _shown,
    _where,
)

# Cell Ranger file names, filtered (read) and raw (never read as cells)
_FILTERED_H5 = (
    "filtered_feature_bc_matrix.h5",
    "sample_filtered_feature_bc_matrix.h5",
    "filtered_gene_bc_matrices_h5.h5",
)
_FILTERED_DIRS = ("filtered_feature_bc_matrix", "sample_filtered_feature_bc_matrix")
_RAW_NAMES = (
    "raw_feature_bc_matrix",
    "raw_feature_bc_matrix.h5",
    "sample_raw_feature_bc_matrix",
    "raw_gene_bc_matrices",
    "raw_gene_bc_matrices_h5.h5",
)


@dataclass(frozen=True)
class _MtxFiles:
    matrix: Path
    features: Path
    barcodes: Path


def _first_existing(directory: Path, *names: str) -> Path | None:
    for name in names:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _find_mtx_files(directory: Path) -> tuple[_MtxFiles | None, list[str]]:
    """The three files of a 10x matrix directory, or None and the names missing."""
    matrix = _first_existing(directory, "matrix.mtx.gz", "matrix.mtx")
    features = _first_existing(
        directory, "features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"
    )
    barcodes = _first_existing(directory, "barcodes.tsv.gz", "barcodes.tsv")
    missing = [
        name
        for name, found in (
            ("matrix.mtx[.gz]", matrix),
            ("features.tsv[.gz] or genes.tsv[.gz]", features),
            ("barcodes.tsv[.gz]", barcodes),
        )
        if found is None
    ]
    if matrix is None or features is None or barcodes is None:
        return None, missing
    return _MtxFiles(matrix, features, barcodes), []


def _listing(directory: Path) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    except OSError as exc:
        return f"(cannot list it: {exc.strerror or exc})"
    return _shown(names, 10) if names else "nothing (the directory is empty)"


def _subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir())


def _refuse_raw(path: Path, where: str) -> None:
    """A path Cell Ranger names as a raw matrix (all droplets) is never read as cells."""
    names = {path.name, path.parent.name}  # v2: raw_gene_bc_matrices/<genome>/
    if path.name in ("matrix.mtx", "matrix.mtx.gz"):
        names |= {path.parent.parent.name, path.parent.name}
    hit = sorted(names & set(_RAW_NAMES))
    if hit:
        raise DataFileError(
            f"{where} is Cell Ranger's {hit[0]}: unfiltered droplets (every barcode, mostly "
            f"empty), not cells; {_RAW_ADVICE}. The raw matrix is only used for ambient RNA "
            "estimation, found beside the filtered one."
        )


def _one_of(options: list[Path], what: str, where: str, fix: str) -> Path:
    if len(options) == 1:
        return options[0]
    raise DataFileError(
        f"{where} holds {len(options)} {what}: {_shown([p.name for p in options], 20)}; {fix}"
    )


def _cellranger_matrix(d: Path, where: str) -> Path | None:
    """The filtered matrix of a Cell Ranger folder ``d`` (or a folder inside / above it)."""
    for name in _FILTERED_H5:
        if (d / name).is_file():
            return d / name
    for name in _FILTERED_DIRS:
        if (d / name).is_dir():
            return d / name
    if d.name == "filtered_gene_bc_matrices" or (d / "filtered_gene_bc_matrices").is_dir():
        top = d if d.name == "filtered_gene_bc_matrices" else d / "filtered_gene_bc_matrices"
        genomes = _subdirs(top)
        if not genomes:
            return None
        fix = (
            "immuneage reads one genome per sample: point the sample sheet at "
            f"{top}/<genome> for the genome you want"
        )
        return _one_of(genomes, "genomes (Cell Ranger 2 filtered_gene_bc_matrices)", where, fix)
    if (d / "count").is_dir():  # multi: per_sample_outs/<sample>/
        return _cellranger_matrix(d / "count", where)
    if d.name == "per_sample_outs" or (d / "per_sample_outs").is_dir():
        top = d if d.name == "per_sample_outs" else d / "per_sample_outs"
        samples = _subdirs(top)
        if not samples:
            return None
        fix = (
            f"point the sample sheet at one sample per row: {top}/<sample> "
            "(each becomes its own sample sheet row)"
        )
        return _cellranger_matrix(
            _one_of(samples, "samples (Cell Ranger multi per_sample_outs)", where, fix), where
        )
    if (d / "outs").is_dir():
        return _cellranger_matrix(d / "outs", where)
    return None


def _raw_beside(file: Path) -> str:
    """The Cell Ranger raw matrix (all droplets) beside a filtered one, or ``""``."""
    if file.parent.name == "filtered_gene_bc_matrices":  # v2 <outs>/filtered.../<genome>
        outs, genome = file.parent.parent, file.name
        options = [outs / "raw_gene_bc_matrices_h5.h5", outs / "raw_gene_bc_matrices" / genome]
    elif file.name.startswith("sample_filtered_feature_bc_matrix"):  # multi
        outs = file.parent.parent.parent.parent  # outs/per_sample_outs/<s>/count/<file>
        count = outs / "multi" / "count"
        options = [count / "raw_feature_bc_matrix.h5", count / "raw_feature_bc_matrix"]
    elif file.name.startswith("filtered_feature_bc_matrix"):
        options = [file.parent / "raw_feature_bc_matrix.h5", file.parent / "raw_feature_bc_matrix"]
    elif file.name == "filtered_gene_bc_matrices_h5.h5":
        options = [file.parent / "raw_gene_bc_matrices_h5.h5"]
    else:
        return ""
    return next((str(p) for p in options if p.exists()), "")


def _locate(path: Path, sample: str | None) -> _Located:
    """Resolve ``path`` to the matrix to read and its format."""
    where = _where(path, sample)
    if not path.exists():
        raise DataFileError(
            f"{where} does not exist; fix the 'path' column of the sample sheet "
            "(relative paths are relative to the sheet's directory)"
        )
    _refuse_raw(path, where)
    if path.is_file() and path.name in ("matrix.mtx", "matrix.mtx.gz"):
        path = path.parent  # a file inside a matrix directory
    elif path.is_file() and path.name in ("metrics_summary.csv", "web_summary.html"):
        path = path.parent  # a file inside a Cell Ranger outs/ folder
    if path.is_dir():
        files, missing = _find_mtx_files(path)
        if files is None:
            found = _cellranger_matrix(path, where)
            if found is None:
                raise DataFileError(
                    f"{where} is a directory but neither a 10x matrix directory (it lacks "
                    f"{', '.join(missing)}) nor a Cell Ranger outs/ folder; found "
                    f"{_listing(path)}. Accepted: {_ACCEPTED}."
                )
            if found.is_dir():
                files, missing = _find_mtx_files(found)
                if files is None:
                    raise DataFileError(
                        f"{_where(found, sample)} is an incomplete 10x matrix directory: it "
                        f"lacks {', '.join(missing)}; found {_listing(found)}. {_REEXPORT}"
                    )
                return _Located(found, "10x_mtx", _raw_beside(found))
            path = found
        else:
            return _Located(path, "10x_mtx", _raw_beside(path))
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        return _Located(path, "h5ad", "")
    if suffix == ".h5":
        return _Located(path, "10x_h5", _raw_beside(path))
    raise DataFileError(
        f"{where} has an unrecognised format (a file ending in {path.suffix or 'no suffix'!r}). "
        f"Accepted: {_ACCEPTED}. Convert the file or point the sample sheet at one of these."
    )


def detect_format(path: Path, *, sample: str | None = None) -> CountsFormat:
    """Tell which accepted counts layout ``path`` is (or leads to).

    Parameters
    ----------
    path
        An ``.h5ad`` file, a Cell Ranger ``.h5`` file, a 10x matrix directory,
        or a Cell Ranger folder (see the module docstring).
    sample
        Sample id named in error messages, if known.

    Returns
    -------
    ``"h5ad"``, ``"10x_h5"`` or ``"10x_mtx"``: the format of the matrix that
    :func:`read_counts` reads (for a Cell Ranger folder, its filtered matrix).

    Raises
    ------
    DataFileError
        The path does not exist, is a raw (unfiltered) Cell Ranger matrix, or
        is none of these; the message lists what was found.
    """
    return _locate(Path(path), sample).format
