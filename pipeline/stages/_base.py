"""What every stage declares and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import pandas as pd
    from anndata import AnnData

__all__ = ["StageContext", "StageResult", "StageSpec"]


@dataclass(frozen=True)
class StageSpec:
    """Declaration of one stage: what it reads, which config it depends on, what it writes.

    Attributes
    ----------
    name
        Stage name (also its artifact directory and ``--stage`` value).
    summary
        One line for ``immuneage stages``.
    module
        Module holding the stage's pure functions (imported lazily).
    func
        Whole-cohort stages: ``func(*upstream, cfg, *, device)`` with one AnnData per
        entry of ``inputs``; per-sample stages: the merge ``func(units, cfg)``
        over the list of per-sample results. Returns an AnnData or a :class:`StageResult`.
    inputs
        Upstream stages whose artifacts this stage reads.
    sections
        Config sections whose values are hashed into the stamp.
    outputs
        Files written, relative to the output directory (for documentation).
    config_files
        Dotted config keys whose values are paths of files the stage reads
        (e.g. ``annotate.markers``); their content hashes join the stamp, so
        editing such a file in place re-runs the stage.
    sample_func
        For per-sample stages: ``sample_func(row, cfg) -> AnnData`` run once per
        sample (one Slurm array task each); ``func`` then merges the samples.
    context
        Whether ``func`` also receives ``context=`` a :class:`StageContext` (the
        output directory, its tables, the provenance so far, and what the stage
        recorded last time), for stages that summarise the whole run (the report)
        or reuse an expensive part of their previous result.
    artifact
        Where the stage's AnnData goes, relative to the output directory
        (default ``<name>/<name>.h5ad``).
    sheet_columns
        Dotted config keys naming ``obs`` columns the stage reads (e.g.
        ``integrate.batch_key``), or ``"*"`` for all. The sample sheet's extra
        columns (``age``, ``sex``, ...) among them are joined to ``obs`` by sample
        (typed: numbers numeric, blanks missing) before the stage runs, and their
        values join the stamp; extra columns a stage does not read never re-run
        it. Ingest stores none of them.
    standalone
        The artifact holds every matrix itself, even in ``backed`` mode, where
        other artifacts link to the file the matrices were first written to
        (the run's final AnnData, which users move and share).
    check
        Name of a function ``check(cfg, sheet)`` in ``module`` that
        :func:`pipeline.preflight.validate_inputs` calls before anything runs, to
        validate the files the stage's config names (a GMT file, a covariates
        table) so bad input fails fast, raising :class:`~pipeline.errors.InputError`.
    """

    name: str
    summary: str
    module: str
    func: str
    inputs: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    config_files: tuple[str, ...] = ()
    sample_func: str | None = None
    context: bool = False
    artifact: str | None = None
    check: str | None = None
    standalone: bool = False
    sheet_columns: tuple[str, ...] = ()

    @property
    def per_sample(self) -> bool:
        """Whether the stage runs one unit per sample before a merge."""
        return self.sample_func is not None


@dataclass
class StageResult:
    """A stage's outputs: the AnnData handed downstream and named result tables.

    Tables are written by the runner to ``<outdir>/tables/<name>.tsv`` (a name
    may hold a ``/`` for a sub-directory). ``dirs`` maps a directory name to a
    writer ``writer(path)`` that fills a fresh directory (e.g. a saved model); the
    runner calls it on a temporary directory and renames it to
    ``<outdir>/<stage>/<name>/`` once complete. ``files`` maps a path relative to
    the output directory to a writer: a key ending in ``/`` is a directory (filled
    by the writer as for ``dirs``), any other key a file the writer creates at the
    path it is given; both are renamed into place only once complete.
    ``provenance`` is JSON-able detail the stage wants on record (e.g. the gene
    sets it used); it lands in ``provenance.json`` under the stage's entry.
    """

    adata: AnnData
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    dirs: dict[str, Callable[[Path], None]] = field(default_factory=dict)
    files: dict[str, Callable[[Path], None]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageContext:
    """What a whole-run stage (``StageSpec.context``) may read besides its inputs.

    Attributes
    ----------
    outdir
        The run's output directory.
    provenance
        The provenance record as of before this stage (see ``docs/outputs.md``).
    stage_dir
        The stage's own directory (``<outdir>/<stage>``), where its ``dirs`` land.
    inputs
        What the stage is computed from: upstream stage -> stamp digest, and
        config file -> content hash (the stamp's inputs).
    previous
        The ``provenance`` details the stage recorded the last time it completed
        in this output directory (empty when it never did). With ``inputs``, a
        stage can reuse an expensive part whose own inputs did not change (the
        trained scVI model when only metrics keys changed; the neighbour graph and
        UMAP when only the Leiden resolutions did).
    """

    outdir: Path
    provenance: dict[str, Any]
    stage_dir: Path | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    previous: dict[str, Any] = field(default_factory=dict)

    @property
    def tables_dir(self) -> Path:
        """``<outdir>/tables``."""
        return self.outdir / "tables"
