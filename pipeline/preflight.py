"""Pre-flight: everything about a run's inputs that can be checked before compute.

:func:`validate_inputs` reads the sample sheet, runs the stages' config checks,
inspects every counts file (no matrix loaded) and checks the genes. ``immuneage
validate`` and every run call it before anything is created, so a bad input
exits with code 2 and leaves nothing behind.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import keys
from .config import Config
from .errors import InputError
from .stages import STAGES

__all__ = ["ValidationReport", "validate_inputs"]


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
    """Check the sheet, the config and every counts file without loading matrices.

    Reads the sheet, runs the stages' config checks, inspects every library's
    file with its reading options (``counts_layer``, ``symbol_column``), then
    checks the genes: enough shared by all samples, the species (see
    :func:`~pipeline.io.checks.check_gene_content`) and the QC prefixes.

    Raises
    ------
    InputError
        The first problem found, naming the file, row, column or gene.
    """
    from .io.checks import check_gene_content
    from .io.readers import inspect_counts
    from .io.samplesheet import read_samplesheet

    policy = cfg.ingest.gene_policy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sheet = read_samplesheet(Path(samplesheet), cfg.design, cfg.ingest)
        run = _stages_to_check(stages)
        for spec in STAGES:
            if spec.check is not None and spec.name in run:
                getattr(importlib.import_module(spec.module), spec.check)(cfg, sheet)
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
    return ValidationReport(
        sheet,
        summaries,
        len(shared),
        [str(w.message) for w in caught],
        {"qc": deferred} if deferred else {},
    )
