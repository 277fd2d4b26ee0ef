"""Pre-flight: everything about a run's inputs that can be checked before compute.

:func:`validate_inputs` reads the sample sheet, runs the stages' config checks,
inspects every counts file (no matrix loaded) and checks the genes. ``immuneage
validate`` and every run call it before anything is created, so a bad input
exits with code 2 and leaves nothing behind.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import keys
from .config import Config
from .errors import ImmuneageWarning, InputError
from .stages import STAGES

if TYPE_CHECKING:
    from .io.samplesheet import SampleSheet

__all__ = ["ValidationReport", "check_obs_columns", "marker_panel_warnings", "validate_inputs"]


# --------------------------------------------------------------------------- validation
@dataclass
class ValidationReport:
    """What ``immuneage validate`` found.

    Attributes
    ----------
    sheet
        The parsed :class:`~pipeline.io.samplesheet.SampleSheet`.
    summaries
        Per sample (sheet order), one :class:`~pipeline.io.readers.CountsSummary`
        per library (sheet line).
    shared_genes
        Genes every sample has.
    warnings
        The warnings raised while checking.
    stage_warnings
        Warnings that concern one stage (e.g. QC prefixes matching no gene),
        left for the runner to issue when that stage runs.
    """

    sheet: Any
    summaries: list[list[Any]]
    shared_genes: int
    warnings: list[str] = field(default_factory=list)
    stage_warnings: dict[str, list[str]] = field(default_factory=dict)

    def table(self) -> Any:
        """One row per sheet line: sample, donor, timepoint, library (when the
        sheet has the column), format, cells, genes, where the counts and
        symbols come from, and the path."""
        import pandas as pd

        rows = []
        for row, sums in zip(self.sheet.rows, self.summaries, strict=True):
            for lib, s in zip(row.libraries, sums, strict=True):
                rows.append(
                    {
                        keys.SAMPLE: row.sample,
                        keys.DONOR: row.donor,
                        keys.TIMEPOINT: row.timepoint,
                        **(
                            {keys.LIBRARY: lib.library}
                            if keys.LIBRARY in self.sheet.option_columns
                            else {}
                        ),
                        "format": s.format,
                        "n_cells": s.n_cells,
                        "n_genes": s.n_genes,
                        "counts_source": getattr(s, "counts_source", ""),
                        "symbols_from": getattr(s, "symbols_from", ""),
                        "path": str(lib.path),
                    }
                )
        return pd.DataFrame(rows)


def _sample_genes(summaries: list[Any], policy: str) -> set[str]:
    """A sample's genes from its libraries' summaries (as ingest combines them)."""
    genes = set(summaries[0].genes)
    for s in summaries[1:]:
        genes = genes | set(s.genes) if policy == "outer" else genes & set(s.genes)
    return genes


def _stages_to_check(stages: Sequence[str] | None) -> set[str]:
    """The stages whose checks run (``None``: all); unknown names are an error."""
    names = [s.name for s in STAGES]
    if stages is None:
        return set(names)
    unknown = [s for s in stages if s not in names]
    if unknown:
        raise InputError(
            f"unknown stage(s) {', '.join(map(repr, unknown))}; stages are: {', '.join(names)}"
        )
    return set(stages)


def validate_inputs(
    samplesheet: Path,
    cfg: Config,
    *,
    stages: Sequence[str] | None = None,
    defer_stage_warnings: bool = False,
) -> ValidationReport:
    """Check everything about a run's inputs that can be checked before compute.

    Reads the sheet; runs the config checks of the stages that will run
    (``StageSpec.check``: e.g. ``differential`` needs some contrast with
    ``differential.min_donors`` donors sampled at both of its timepoints, and
    a readable covariates file); checks the obs columns the stages read
    (``preprocess.hvg_batch_key``, ``integrate.batch_key`` and covariates:
    present, no blanks, continuous ones numeric); inspects every library's
    file with its reading options (structure, and whether a sampled block of
    its stored values are counts: see :func:`~pipeline.io.readers.inspect_counts`);
    then checks the genes of the merged cohort (the genes all samples share,
    or their union with ``ingest.gene_policy: outer``): enough shared, the
    species and the QC prefixes (:func:`~pipeline.io.checks.check_gene_content`),
    the marker panel's coverage (``annotate``) and the gene sets' sizes
    (``score``, with the stage's ``min_genes`` / ``on_small_set`` rules).

    Parameters
    ----------
    samplesheet
        The sample sheet.
    cfg
        The run configuration.
    stages
        The stages that will run (``None``: all). A stage's checks run only
        when it is listed, so a pilot run (``--until qc``) of a single sample
        passes while the same sheet fails for a whole run. The sheet and the
        counts files are always checked.
    defer_stage_warnings
        Leave the warnings that concern one stage to that stage: the QC-prefix
        warnings go to :attr:`ValidationReport.stage_warnings` (for the runner
        to issue when ``qc`` runs); the marker-panel, gene-set and contrast
        warnings are not issued (``annotate``, ``score`` and ``differential``
        issue them when they run).

    Returns
    -------
    A :class:`ValidationReport`.

    Raises
    ------
    InputError
        The first problem found, naming the file, row, column, set, contrast
        or gene, and saying what to do.
    """
    from .io.checks import check_gene_content
    from .io.readers import inspect_counts
    from .io.samplesheet import read_samplesheet

    run = _stages_to_check(stages)
    policy = cfg.ingest.gene_policy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sheet = read_samplesheet(Path(samplesheet), cfg.design, cfg.ingest)
        for spec in STAGES:
            if spec.check is not None and spec.name in run:
                getattr(importlib.import_module(spec.module), spec.check)(cfg, sheet)
        check_obs_columns(sheet, cfg, run)
        if "annotate" in run:
            _check_annotate_files(cfg)
        summaries = [
            [
                inspect_counts(lib.path, sample=row.sample, **lib.reader_options(cfg.ingest))
                for lib in row.libraries
            ]
            for row in sheet.rows
        ]
        gene_sets = [_sample_genes(s, policy) for s in summaries]
        issued = check_gene_content(
            sheet,
            [sorted(g) for g in gene_sets],
            cfg,
            warn_qc_prefixes=not defer_stage_warnings,
        )
    deferred = [t for t in issued if t not in {str(w.message) for w in caught}]
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    shared = set(gene_sets[0])
    for genes in gene_sets[1:]:
        shared &= genes
    if policy == "inner" and len(shared) < cfg.ingest.min_shared_genes:
        worst = min(
            ((a, b) for a in range(len(gene_sets)) for b in range(a + 1, len(gene_sets))),
            key=lambda ab: len(gene_sets[ab[0]] & gene_sets[ab[1]]),
            default=(0, 0),
        )
        a, b = (sheet.rows[i] for i in worst)
        n_ab = len(gene_sets[worst[0]] & gene_sets[worst[1]])
        raise InputError(
            f"only {len(shared)} genes are shared by all samples of {samplesheet} "
            f"(ingest.min_shared_genes is {cfg.ingest.min_shared_genes}); samples {a.sample!r} "
            f"({a.path}) and {b.sample!r} ({b.path}) share {n_ab}. Quantify all samples against "
            "the same reference, or set ingest.gene_policy: outer"
        )
    cohort = shared if policy == "inner" else set().union(*gene_sets)
    where = (
        f"the counts files of {sheet.path.name} ({len(cohort)} genes "
        + ("all samples share" if policy == "inner" else "in any sample (gene_policy outer)")
        + ")"
    )
    later: list[str] = []  # warnings the stages themselves issue when they run
    if "annotate" in run:
        later += marker_panel_warnings(cfg, cohort, where=where)
    if "score" in run:
        from .stages.score import check_genes

        later += check_genes(cfg, cohort, where=where)
    if "differential" in run:
        from .stages.differential import design_warnings

        later += design_warnings(cfg, sheet)
    texts = [str(w.message) for w in caught]
    if not defer_stage_warnings:
        for text in later:
            warnings.warn(text, ImmuneageWarning, stacklevel=2)
        texts += later
    return ValidationReport(
        sheet,
        summaries,
        len(shared),
        texts,
        {"qc": deferred} if deferred else {},
    )


# --------------------------------------------------------------------------- obs columns
def _pipeline_columns(cfg: Config) -> dict[str, str]:
    """obs columns the stages up to ``qc`` write (column -> the stage), beyond the sheet's."""
    from .stages.qc import QC_COLUMNS

    cols = {keys.BARCODE: "ingest"}
    if cfg.ambient.method != "none":
        cols[keys.AMBIENT_FRACTION] = "ingest (ambient correction)"
    cols |= dict.fromkeys(QC_COLUMNS, "qc")
    return cols


def check_obs_columns(sheet: SampleSheet, cfg: Config, stages: set[str] | None = None) -> None:
    """The obs columns ``preprocess`` and ``integrate`` read exist and hold usable values.

    A column named in ``preprocess.hvg_batch_key``, ``integrate.batch_key``,
    ``integrate.categorical_covariates`` or ``integrate.continuous_covariates``
    must be a sample sheet column (``sample``, ``donor``, ``library`` when the
    sheet has it, or an extra column) or one the pipeline writes before
    (``barcode``, the QC metrics, ``ambient_fraction`` with ambient correction).
    Sheet columns that ``integrate`` reads must have a value for every
    sample, and continuous covariates must be numbers (values as
    :meth:`~pipeline.io.samplesheet.SampleSheet.metadata` types them).

    Parameters
    ----------
    sheet
        The validated sample sheet.
    cfg
        Run configuration.
    stages
        Stages that will run (``None``: all); only theirs are checked.

    Raises
    ------
    InputError
        A column that will not exist, a blank value, or a non-numeric
        continuous covariate (the message names the key, the column, the
        samples and their sheet lines, and the fix).
    """
    run = _stages_to_check(None) if stages is None else stages
    roles: list[tuple[str, str, str]] = []  # (config key, column, kind)
    if "preprocess" in run and cfg.preprocess.hvg_batch_key is not None:
        roles.append(("preprocess.hvg_batch_key", cfg.preprocess.hvg_batch_key, "any"))
    if "integrate" in run:
        ic = cfg.integrate
        roles.append(("integrate.batch_key", ic.batch_key, "categorical"))
        roles += [
            ("integrate.categorical_covariates", c, "categorical")
            for c in ic.categorical_covariates
        ]
        roles += [
            ("integrate.continuous_covariates", c, "continuous") for c in ic.continuous_covariates
        ]
    if not roles:
        return
    base = [keys.SAMPLE, keys.DONOR, keys.TIMEPOINT]
    if keys.LIBRARY in sheet.option_columns:
        base.append(keys.LIBRARY)
    known = {*sheet.extra_columns, *base}
    if all(col in known for _, col, _ in roles):
        written: dict[str, str] = {}  # (the qc module, which lists its columns, is heavy)
    else:
        written = _pipeline_columns(cfg)
    for key, col, kind in roles:
        if col in sheet.extra_columns:
            _check_sheet_values(sheet, key, col, kind)
            continue
        if col in base:
            if kind == "continuous":
                raise InputError(
                    f"{key} names {col!r}, the sample sheet's {col} column of ids, which is not "
                    "a number; continuous covariates must be numeric (put it under "
                    "integrate.categorical_covariates, or name a numeric column)"
                )
            continue
        if col in written:
            continue
        extra = ", ".join(sheet.extra_columns) or "none"
        hint = ""
        if col == keys.AMBIENT_FRACTION:
            hint = " (ambient_fraction exists only with ambient correction: set ambient.method)"
        raise InputError(
            f"{key} names column {col!r}, which neither the sample sheet {sheet.path} nor the "
            f"stages before {key.split('.')[0]} provide{hint}; the sheet's extra columns are: "
            f"{extra}; always available: {', '.join(base)}, and the QC metrics "
            f"({', '.join(c for c, s in written.items() if s == 'qc')}). Add a {col!r} column "
            f"to the sample sheet (one value per sample) or fix the name in {key}"
        )


#: Sheet values that mean "no value" in a numeric column (as ``typed_column`` reads them).
_BLANKS = {"", "NA", "NaN", "nan", "N/A", "na"}


def _check_sheet_values(sheet: SampleSheet, key: str, col: str, kind: str) -> None:
    """Values of extra sheet column ``col`` are usable for ``key`` (``kind``: any,
    categorical, continuous)."""
    if kind == "any":
        return
    values = sheet.metadata([col])[col]
    blank = [int(i) for i in np.flatnonzero(values.isna().to_numpy())]
    rows = sheet.rows
    text = [str(r.extra.get(col, "")).strip() for r in rows]
    bad = next(
        (
            i
            for i, t in enumerate(text)
            if t not in _BLANKS and pd.isna(pd.to_numeric(t, errors="coerce"))
        ),
        None,
    )
    if kind == "continuous" and bad is not None:
        raise InputError(
            f"{key}: column {col!r} of the sample sheet {sheet.path} must be numeric, but line "
            f"{rows[bad].row} (sample {rows[bad].sample!r}) has {text[bad]!r}; write a number "
            f"for every sample, or put {col!r} under integrate.categorical_covariates"
        )
    if kind == "continuous":
        inf = np.flatnonzero(np.isinf(values.to_numpy(dtype=float)))
        if inf.size:
            i = int(inf[0])
            raise InputError(
                f"{key}: column {col!r} of the sample sheet {sheet.path} must be finite, but "
                f"line {rows[i].row} (sample {rows[i].sample!r}) has {text[i]!r}; write a "
                "finite number for every sample"
            )
    if blank:
        shown = ", ".join(f"{rows[i].sample!r} (line {rows[i].row})" for i in blank[:5])
        more = f" and {len(blank) - 5} more" if len(blank) > 5 else ""
        raise InputError(
            f"{key}: column {col!r} of the sample sheet {sheet.path} is blank for "
            f"{len(blank)} of {len(rows)} sample(s): {shown}{more}. scVI needs a value for "
            f"every cell: fill them in, or remove {col!r} from {key}"
        )


# --------------------------------------------------------------------------- annotate
def _check_annotate_files(cfg: Config) -> None:
    """The marker panel loads (``annotate.markers``) or the CellTypist model file exists."""
    a = cfg.annotate
    if a.celltypist_model is not None:
        path = Path(str(a.celltypist_model))
        if not path.is_file():
            raise InputError(
                f"annotate.celltypist_model {path} does not exist; give the path of a "
                "CellTypist model file (.pkl) on this machine (models are never downloaded "
                "at run time), or set annotate.celltypist_model: null for the marker panel"
            )
        if importlib.util.find_spec("celltypist") is None:
            raise InputError(
                f"annotate.celltypist_model is set ({path}) but celltypist is not installed; "
                "install it (pip install celltypist) or set annotate.celltypist_model: null"
            )
    from .markers import load_marker_panel

    load_marker_panel(a.markers)  # raises InputError naming the file and the key


def marker_panel_warnings(cfg: Config, genes: set[str], *, where: str) -> list[str]:
    """What the annotate stage will say about the marker panel's coverage of ``genes``.

    Mirrors ``annotate``: a cell type with fewer positive markers present
    than the panel's ``min_present_fraction`` requires (at least one) is not
    annotatable (never assigned); with no annotatable type every cell is
    ``unassigned``. Both are warnings there, so they are warnings here.
    Nothing with ``annotate.celltypist_model`` (the model's genes decide).

    Returns
    -------
    The warning texts (not issued).
    """
    if cfg.annotate.celltypist_model is not None:
        return []
    from .markers import load_marker_panel

    panel = load_marker_panel(cfg.annotate.markers)
    lost = []  # as annotate.marker_coverage: positive markers present (aliases tried) vs required
    for ct in panel.cell_types:
        n_pos = sum(m.match(genes) is not None for m in ct.positive)
        need = panel.n_required(ct.name)
        if n_pos < need:
            lost.append((ct.name, n_pos, len(ct.positive), need))
    if not lost:
        return []
    fix = (
        "set annotate.markers to a marker file in the data's gene symbols (same layout as "
        "the shipped panel), or annotate.celltypist_model"
    )
    markers = {m.gene: m for ct in panel.cell_types for m in ct.markers}
    n_present = sum(m.match(genes) is not None for m in markers.values())
    if len(lost) == len(panel.cell_types):
        return [
            f"annotate: no cell type of the marker panel {panel.path} can be annotated on "
            f"{where}: {n_present} of its {len(markers)} marker genes are present and no type has "
            "the positive markers it needs; every cell will be 'unassigned' and the "
            f"per-cell-type tests will be empty. If this is not a gene panel on purpose, {fix}"
        ]
    shown = "; ".join(
        f"{name} ({n_pos} of {n_all} positive markers present, needs {need})"
        for name, n_pos, n_all, need in lost
    )
    return [
        f"annotate: {len(lost)} of {len(panel.cell_types)} cell types of the marker panel {panel.path} "
        f"cannot be annotated on {where} (too few markers present; never assigned): "
        f"{shown}. See tables/marker_coverage.tsv after the run; to annotate them, {fix}"
    ]
