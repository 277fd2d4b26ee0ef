"""Typed run configuration.

A YAML file (see ``configs/default.yaml``) is loaded into :class:`Config`, a
pydantic model with one section per stage. Unknown keys and wrong types are
rejected with a :class:`~pipeline.errors.ConfigError` that names the key path,
the value given and the allowed values. Every field has a default and a help
text; ``docs/config.schema.json`` is the exported JSON schema.

Adding a stage adds one section model here and one field on :class:`Config`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from .errors import ConfigError, InputError

__all__ = [
    "AmbientConfig",
    "AnnotateConfig",
    "ClusterConfig",
    "Config",
    "Contrast",
    "DesignConfig",
    "IngestConfig",
    "IntegrateConfig",
    "PreprocessConfig",
    "QCConfig",
    "commented_yaml",
    "config_digest",
    "config_json_schema",
    "demo_config",
    "dump_config",
    "load_config",
    "section_digest",
]


class _Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _parse_contrast(value: Any) -> Any:
    """Accept ``"acute vs baseline"`` as shorthand for ``{test: acute, reference: baseline}``."""
    if isinstance(value, str):
        parts = value.split(" vs ")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise ValueError(
                f"contrast {value!r} must read '<timepoint> vs <reference timepoint>', "
                "e.g. 'longterm vs baseline'"
            )
        return {"test": parts[0].strip(), "reference": parts[1].strip()}
    return value


class Contrast(_Section):
    """One comparison between two timepoint levels (test minus reference)."""

    test: str = Field(description="Timepoint level compared against the reference.")
    reference: str = Field(description="Reference timepoint level (usually the baseline).")

    @property
    def name(self) -> str:
        """Identifier used in table rows and file names, e.g. ``acute_vs_baseline``."""
        return f"{self.test}_vs_{self.reference}"

    def __str__(self) -> str:
        return f"{self.test} vs {self.reference}"


ContrastSpec = Annotated[Contrast, BeforeValidator(_parse_contrast)]


class DesignConfig(_Section):
    """The study design: timepoint levels in order, the baseline and the contrasts tested."""

    timepoints: list[str] = Field(
        default=["baseline", "acute", "longterm"],
        min_length=2,
        description="Timepoint levels in temporal order; sample sheet values must be among them.",
    )
    baseline: str = Field(
        default="baseline",
        description="The reference level: donors without it are warned about and dropped from paired tests.",
    )
    contrasts: list[ContrastSpec] = Field(
        default_factory=lambda: [
            Contrast(test="acute", reference="baseline"),
            Contrast(test="longterm", reference="baseline"),
        ],
        min_length=1,
        description="Comparisons to test, each '<test> vs <reference>' (or a mapping with test and reference).",
    )

    @model_validator(mode="after")
    def _check_levels(self) -> DesignConfig:
        levels = self.timepoints
        dup = sorted({t for t in levels if levels.count(t) > 1})
        if dup:
            raise ValueError(f"timepoints must be unique; repeated: {dup}")
        if any(not t.strip() for t in levels):
            raise ValueError("timepoints must be non-empty strings")
        if self.baseline not in levels:
            raise ValueError(f"baseline {self.baseline!r} is not one of the timepoints {levels}")
        seen: set[tuple[str, str]] = set()
        for c in self.contrasts:
            for level in (c.test, c.reference):
                if level not in levels:
                    raise ValueError(
                        f"contrast '{c}' uses {level!r}, which is not one of the timepoints {levels}"
                    )
            if c.test == c.reference:
                raise ValueError(f"contrast '{c}' compares a timepoint with itself")
            if (c.test, c.reference) in seen:
                raise ValueError(f"contrast '{c}' is listed twice")
            seen.add((c.test, c.reference))
        return self


class IngestConfig(_Section):
    """How per-sample count files are read and merged."""

    gene_policy: Literal["inner", "outer"] = Field(
        default="inner",
        description=(
            "Samples whose gene sets differ: 'inner' keeps the genes all samples share, "
            "'outer' keeps the union (absent genes count 0 in samples that lack them)."
        ),
    )
    min_shared_genes: int = Field(
        default=200,
        ge=1,
        description="Error when fewer genes than this are shared by all samples (a sign of mixed references or species).",
    )
    missing_baseline: Literal["warn", "error"] = Field(
        default="warn",
        description="A donor with no baseline sample: warn (paired tests drop it later) or stop.",
    )
    min_cells_per_sample: int = Field(
        default=1,
        ge=1,
        description="A sample file with fewer cells than this is an error naming the file.",
    )
    counts_layer: str | None = Field(
        default=None,
        description=(
            "Where .h5ad files keep the raw counts (a layer name, 'X' or 'raw.X'); null lets the "
            "reader find them. A sample sheet's 'counts_layer' column overrides it per line."
        ),
    )
    symbol_column: str | None = Field(
        default=None,
        description=(
            "The var column holding gene symbols (e.g. 'feature_name' in CELLxGENE files); null "
            "lets the reader decide. A sample sheet's 'symbol_column' column overrides it per line."
        ),
    )
    species_check: Literal["error", "warn"] = Field(
        default="error",
        description=(
            "Samples that look non-human (title-case symbols like 'Cd3e', 'mt-' genes, ENSMUS "
            "ids) meet the shipped human marker panel and gene sets: 'error' stops before "
            "anything runs, 'warn' goes on (set annotate.markers, score.genesets/custom/gmt "
            "and qc.mt_prefix for the species first)."
        ),
    )


class AmbientConfig(_Section):
    """Ambient RNA correction of each sample's counts before QC (off by default)."""

    method: Literal["none", "decontx", "soupx"] = Field(
        default="none",
        description=(
            "'none': counts as read. 'decontx': DecontX (decontx-scanpy) per-cell ambient fractions, "
            "from the filtered matrix alone or anchored on the raw matrix's empty droplets; about "
            "15 s per 1,000 cells of 32,786 genes on the 2-core test VM (clustering included), plus "
            "a one-off ~20-40 s of library warm-up per process. "
            "'soupx': SoupX (optional soupx-python, GPL-2.0, install it yourself), one fraction per "
            "sample, needs the raw matrix (raw_feature_bc_matrix.h5 beside the filtered one); its "
            "pure-Python loops make it several times slower than decontx (benchmarks/RESULTS.md). Corrected counts replace "
            "layers['counts'] (rounded to integers keeping each cell's total); the originals stay "
            "in layers['counts_uncorrected']."
        ),
    )
    use_raw: bool = Field(
        default=True,
        description=(
            "Use the sample's raw droplet matrix when the reader found one: its empty droplets give "
            "the ambient profile (decontx; required by soupx). Reading it adds a few seconds per sample."
        ),
    )
    empty_max_counts: int = Field(
        default=100,
        ge=1,
        description="Raw droplets that are not cells and hold 1 to this many counts are empty droplets (the ambient profile).",
    )
    resolution: float = Field(
        default=0.5,
        gt=0,
        description="Leiden resolution of the coarse per-sample clustering the ambient model uses.",
    )
    max_iter: int = Field(
        default=500,
        ge=1,
        description="Most DecontX EM iterations (it usually converges in 50-200; time is linear in iterations).",
    )
    seed: int = Field(
        default=0,
        description=(
            "Seed of the per-sample clustering the ambient model uses; a key of this section so "
            "that the ingest stamp covers it (changing the run's seed does not re-read every sample)."
        ),
    )


class QCConfig(_Section):
    """Per-sample cell quality control and doublet detection (one Slurm array task per sample)."""

    mode: Literal["adaptive", "fixed"] = Field(
        default="adaptive",
        description=(
            "'adaptive': per sample, cells outside median +/- nmads MADs of log counts and log genes, "
            "or above median + nmads MADs of % mitochondrial, are removed (each MAD raised to "
            "mad_floor_log / mad_floor_pct_mt when smaller), combined with the fixed bounds below "
            "(the stricter wins); 'fixed': only the bounds below. tables/qc_per_sample.tsv names the rule "
            "behind each bound."
        ),
    )
    nmads: float = Field(
        default=5.0,
        gt=0,
        description="Width of the adaptive thresholds in median absolute deviations.",
    )
    mad_floor_log: float = Field(
        default=0.1,
        ge=0,
        description=(
            "Smallest MAD used for log1p counts and log1p genes (natural log): with nmads 5 no "
            "cell within a factor exp(0.5) = 1.65 of the sample's median is removed, even in a "
            "tiny or uniform sample whose MAD is near 0."
        ),
    )
    mad_floor_pct_mt: float = Field(
        default=0.5,
        ge=0,
        description=(
            "Smallest MAD used for % mitochondrial (percentage points): a MAD of 0 (one MT- "
            "gene, single-nucleus data) gives a bound of median + nmads x 0.5 points (2.5 with "
            "nmads 5), not the median."
        ),
    )
    min_counts: int | None = Field(
        default=None,
        ge=0,
        description="Fixed lower bound on total counts per cell (applied in both modes when set).",
    )
    max_counts: int | None = Field(
        default=None, ge=1, description="Fixed upper bound on total counts per cell (both modes)."
    )
    min_genes: int | None = Field(
        default=200,
        ge=0,
        description=(
            "Fixed lower bound on genes detected per cell (both modes), for a whole "
            "transcriptome: scaled by n_genes / min_genes_reference on narrower matrices."
        ),
    )
    min_genes_reference: int = Field(
        default=20000,
        ge=1,
        description=(
            "Genes of a whole-transcriptome matrix, the scale of min_genes: a matrix with fewer "
            "genes (a gene panel, a reduced matrix) gets min_genes x n_genes / this (200 -> 8 "
            "on 765 genes), recorded as rule 'fixed (scaled ...)' and warned."
        ),
    )
    max_genes: int | None = Field(
        default=None, ge=1, description="Fixed upper bound on genes detected per cell (both modes)."
    )
    max_pct_mt: float | None = Field(
        default=20.0,
        gt=0,
        le=100,
        description="Fixed upper bound on % mitochondrial counts (both modes).",
    )
    mt_prefix: str = Field(
        default="MT-", min_length=1, description="Symbol prefix of mitochondrial genes."
    )
    ribo_prefixes: list[str] = Field(
        default=["RPS", "RPL"], description="Symbol prefixes of ribosomal protein genes."
    )
    hb_pattern: str = Field(
        default=r"^HB[ABDEGMQZ]\d*$",
        description="Regular expression for haemoglobin genes (matches HBA1, HBB, ...; not HBEGF or HBP1).",
    )
    doublets: Literal["scrublet", "none"] = Field(
        default="scrublet",
        description="Doublet detection per sample: scrublet (scanpy on CPU, rapids-singlecell on GPU) or none.",
    )
    expected_doublet_rate: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description=(
            "Scrublet's expected doublet rate; null: derived per sample from the cells recovered "
            "(10x: about 0.8% per 1,000 cells), recorded in tables/qc_per_sample.tsv (doublet_rate)."
        ),
    )
    doublet_threshold: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Doublet score threshold; null lets scrublet choose it.",
    )
    doublet_auto_max_factor: float = Field(
        default=2.0,
        gt=1,
        description=(
            "scrublet's automatic threshold (doublet_threshold null) is not trusted when it calls "
            "more than this many times the expected doublet rate of the cells, and more than 10% "
            "(a score histogram that is not bimodal); the expected rate's highest-scoring cells "
            "are called instead (DoubletFinder's rule), warned."
        ),
    )
    min_cells_for_doublets: int = Field(
        default=200,
        ge=10,
        description="Samples (each library of a sample with several) with fewer QC-passing cells get no doublet calls (scrublet's threshold is unreliable there); warned.",
    )
    remove_doublets: bool = Field(
        default=True,
        description="Remove predicted doublets (scores and calls are kept in obs either way).",
    )
    max_fraction_removed: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="A sample losing more than this fraction of its cells fails QC.",
    )
    min_cells_after: int = Field(
        default=20, ge=1, description="A sample with fewer cells than this after QC fails."
    )
    on_failed_sample: Literal["error", "drop"] = Field(
        default="error",
        description="A sample failing QC: stop with an error naming it, or drop it (warned and recorded in provenance).",
    )

    @model_validator(mode="after")
    def _check(self) -> QCConfig:
        import re

        try:
            re.compile(self.hb_pattern)
        except re.error as exc:
            raise ValueError(
                f"hb_pattern {self.hb_pattern!r} is not a valid regular expression: {exc}"
            ) from None
        for lo, hi in (("min_counts", "max_counts"), ("min_genes", "max_genes")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a >= b:
                raise ValueError(f"{lo} ({a}) must be smaller than {hi} ({b})")
        return self


class PreprocessConfig(_Section):
    """Cohort-level filtering, normalisation, highly variable genes and PCA."""

    min_cells_per_gene: int = Field(
        default=3,
        ge=0,
        description=(
            "Genes detected in fewer cells than this (after cell QC) are not HVG candidates (so "
            "not in PCA or scVI) but stay in the matrix for scoring and annotation "
            "(var['hvg_candidate']); only genes detected in no kept cell are removed."
        ),
    )
    target_sum: float | None = Field(
        default=1e4,
        gt=0,
        description="normalize_total target per cell; null uses the median total.",
    )
    n_top_genes: int = Field(
        default=2000, ge=10, description="Highly variable genes (seurat_v3 on counts, batch-aware)."
    )
    hvg_batch_key: str | None = Field(
        default="sample", description="obs column for batch-aware HVG selection; null for none."
    )
    hvg_span: float = Field(
        default=0.3,
        gt=0,
        le=1,
        description=(
            "LOESS span of the seurat_v3 mean-variance fit. A batch whose fit fails (small "
            "batches) is refitted with spans 0.5, 0.7, 0.9, then with a quadratic trend "
            "(uns['immuneage']['hvg']['trend_fits']); refits are summarised in one log line, a "
            "warning only when the quadratic trend was used for at least half of the batches."
        ),
    )
    hvg_include: list[str] = Field(
        default_factory=list,
        description="Genes always added to the HVGs when present (recorded in var['hvg_forced']).",
    )
    n_comps: int = Field(
        default=50, ge=2, description="Principal components computed on the HVGs (obsm['X_pca'])."
    )


class IntegrateConfig(_Section):
    """Integration of samples with scVI (scvi-tools) on the HVG counts."""

    batch_key: str = Field(
        default="sample",
        description=(
            "obs column scVI corrects for (a sequencing batch, the sample, ...). Default 'sample': "
            "each sample is its own library, so its technical effects (and the donor's) are "
            "removed; measured on the demo with a cell state present at one timepoint only "
            "(benchmarks/batch_key.py, benchmarks/RESULTS.md), 'sample' keeps that state as its "
            "own cluster, with its labels and the composition call, as well as 'donor' does, and "
            "both remove donor and sample structure equally, while 'donor' would leave per-sample "
            "technical effects in. Never 'timepoint': correcting on the variable under test "
            "erases the effect the study looks for."
        ),
    )
    categorical_covariates: list[str] = Field(
        default_factory=list, description="Extra categorical obs columns scVI conditions on."
    )
    continuous_covariates: list[str] = Field(
        default_factory=list, description="Extra continuous obs columns scVI conditions on."
    )
    n_latent: int = Field(
        default=30, ge=2, description="Dimensions of the scVI latent space (obsm['X_scVI'])."
    )
    n_hidden: int = Field(default=128, ge=8, description="Hidden units per layer.")
    n_layers: int = Field(default=2, ge=1, description="Hidden layers in encoder and decoder.")
    gene_likelihood: Literal["zinb", "nb", "poisson"] = Field(
        default="nb", description="Count distribution of the decoder."
    )
    max_epochs: int | None = Field(
        default=None,
        ge=1,
        description="Training epochs; null uses scvi-tools' heuristic (about 400 for 20k cells, fewer for more).",
    )
    kl_warmup_epochs: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Epochs over which the KL weight rises to 1; null: min(400, epochs trained), so short "
            "trainings also end at full KL weight (scvi-tools' own default is a fixed 400)."
        ),
    )
    batch_size: int = Field(default=128, ge=8, description="Minibatch size.")
    learning_rate: float = Field(default=1e-3, gt=0, description="Adam learning rate.")
    early_stopping: bool = Field(
        default=True, description="Stop when the validation ELBO stops improving."
    )
    early_stopping_patience: int = Field(
        default=10, ge=1, description="Epochs without improvement before stopping."
    )
    metrics_max_cells: int = Field(
        default=20000,
        ge=100,
        description="Cells (a seeded random subset) used for the integration metrics; they are O(n log n) to O(n^2).",
    )

    @model_validator(mode="after")
    def _not_the_variable_under_test(self) -> IntegrateConfig:
        banned = "timepoint"
        for where, cols in (
            ("batch_key", [self.batch_key]),
            ("categorical_covariates", self.categorical_covariates),
            ("continuous_covariates", self.continuous_covariates),
        ):
            if banned in cols:
                raise ValueError(
                    f"{where} must not be 'timepoint': scVI would remove the differences between "
                    "timepoints, which are the effect this pipeline tests. Use the sample or a "
                    "technical batch column instead"
                )
        return self


class ClusterConfig(_Section):
    """Neighbour graph on the scVI latent space, Leiden clustering and UMAP."""

    n_neighbors: int = Field(
        default=15, ge=2, description="Neighbours per cell in the kNN graph (on obsm['X_scVI'])."
    )
    resolutions: list[float] = Field(
        default=[0.5, 1.0],
        min_length=1,
        description="Leiden resolutions; each gives obs['leiden_<resolution>'].",
    )
    resolution: float = Field(
        default=1.0,
        gt=0,
        description="The resolution whose clusters annotation votes over (obs['leiden']).",
    )
    umap_min_dist: float = Field(default=0.5, ge=0, description="UMAP min_dist.")

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if any(r <= 0 for r in self.resolutions):
            raise ValueError("resolutions must be positive")
        if self.resolution not in self.resolutions:
            raise ValueError(
                f"resolution {self.resolution} must be one of resolutions {self.resolutions}"
            )
        return self


class AnnotateConfig(_Section):
    """Immune cell-type annotation from a cited marker panel (or a CellTypist model file)."""

    markers: str | None = Field(
        default=None,
        description="YAML marker file (same layout as the shipped panel); null uses the shipped PBMC panel.",
    )
    celltypist_model: str | None = Field(
        default=None,
        description="Path to a CellTypist model (.pkl) to use instead of the marker panel (no download at run time).",
    )
    majority_voting: bool = Field(
        default=True, description="Refine per-cell labels by majority vote within Leiden clusters."
    )
    min_confidence: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Cells whose label confidence is below this are 'unassigned'.",
    )


class ScoreConfig(_Section):
    """Signature scoring (``score`` stage)."""

    genesets: list[str] = Field(
        default_factory=lambda: [
            "tbk1_sting",
            "ifn_type1",
            "nfkb_inflammation",
            "ieg_dissociation",
            "senescence",
            "senescence_core",
            "sasp",
            "t_exhaustion",
            "t_naive",
            "il6_stat3",
        ],
        description=(
            "Names of built-in gene sets to score (see `immuneage genesets`); [] for none. "
            "ieg_dissociation is a sample-handling control (immediate-early / dissociation "
            "genes), summarised per sample in tables/sample_handling.tsv."
        ),
    )
    gmt: str | None = Field(
        default=None,
        description="GMT file of extra gene sets (name, description, genes...); all its sets are scored.",
    )
    custom: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Extra gene sets given inline: {name: [gene symbols]}.",
    )
    min_genes: int = Field(
        default=5,
        ge=1,
        description="A set with fewer genes found in the data than this is too small.",
    )
    on_small_set: Literal["error", "skip"] = Field(
        default="skip",
        description=(
            "What to do with a set below min_genes: 'skip' warns, labels it 'skipped' in "
            "tables/signature_coverage.tsv and the report, and leaves it out; 'error' (strict "
            "runs) stops naming the set and its missing genes. No set scorable is an error "
            "either way."
        ),
    )
    method: Literal["score_genes", "aucell", "ulm"] = Field(
        default="score_genes",
        description="'score_genes': scanpy score_genes semantics for all sets in one sparse product; 'aucell' / 'ulm': decoupler's methods (cross-checks).",
    )
    ctrl_size: int = Field(
        default=50,
        ge=1,
        description="Control genes drawn per signature gene bin (scanpy ctrl_size).",
    )
    n_bins: int = Field(
        default=25, ge=2, description="Expression bins for control-gene matching (scanpy n_bins)."
    )
    controls_exclude_signatures: bool = Field(
        default=True,
        description=(
            "Draw each set's control genes from a pool without the genes of the other configured "
            "sets (scanpy gene_pool): a programme that shifts then cannot move another set's "
            "controls and fake a shift. false: scanpy's default pool (all genes)."
        ),
    )


#: Default primary programmes of CD4 and CD8 T cells (``differential.primary``).
_T_CELL_PRIMARY = (
    "tbk1_sting",
    "ifn_type1",
    "nfkb_inflammation",
    "senescence_core",
    "t_exhaustion",
    "t_naive",
)


class DifferentialConfig(_Section):
    """Differential testing across timepoints per cell type (``differential`` stage)."""

    min_cells: int = Field(
        default=10,
        ge=1,
        description="Minimum cells of a type in a donor x timepoint for it to enter the tests.",
    )
    test: Literal["paired_t", "wilcoxon", "mixed"] = Field(
        default="paired_t",
        description=(
            "Signature-shift test whose p-value gets the q-value: 'paired_t' (donors with both "
            "timepoints), 'wilcoxon' (signed-rank, same donors) or 'mixed' (score ~ timepoint + "
            "(1|donor), also uses donors missing one timepoint)."
        ),
    )
    min_donors: int = Field(
        default=3,
        ge=2,
        description=(
            "Minimum donors with both timepoints (mixed: observed at both) for a test to run. "
            "Contrasts tested with fewer than 5 donors are warned about (t-tests with under 4 df: "
            "wide confidence intervals)."
        ),
    )
    deseq: bool = Field(
        default=True, description="Run pseudobulk differential expression (PyDESeq2) per cell type."
    )
    pseudobulk_min_cells: int = Field(
        default=10,
        ge=1,
        description="Pseudobulks (donor x timepoint x type) with fewer cells are left out of DE.",
    )
    gene_min_counts: int = Field(
        default=10,
        ge=1,
        description="A pseudobulk expresses a gene with at least this many summed counts.",
    )
    gene_min_samples: int = Field(
        default=3,
        ge=1,
        description="Genes expressed (gene_min_counts) in fewer pseudobulks of a type are not tested.",
    )
    shrink: bool = Field(
        default=False,
        description="Also report PyDESeq2's shrunken log2 fold changes (log2fc_shrunk; slow).",
    )
    n_cpus: int = Field(
        default=1,
        ge=1,
        description="Processes PyDESeq2 may use (1 keeps results identical across machines).",
    )
    enrichment: Literal["camera", "ulm", "none"] = Field(
        default="camera",
        description=(
            "Signature enrichment of each DE result: 'camera' (competitive test on the Wald "
            "statistics with the variance inflated by the signature's inter-gene correlation, "
            "estimated per signature from the donor-paired pseudobulk residuals; Wu & Smyth "
            "2012), 'ulm' (univariate linear model, assumes independent genes: "
            "anti-conservative for co-regulated programmes; its q-values are never starred) or "
            "'none'. q-values: BH over every cell type x signature x contrast."
        ),
    )
    enrichment_min_genes: int = Field(
        default=5,
        ge=1,
        description="Signatures with fewer genes among a DE result's tested genes are not scored.",
    )
    composition_method: Literal["propeller", "clr"] = Field(
        default="propeller",
        description=(
            "Relative-abundance test: 'propeller' (transformed cell-type proportions, donor-paired, "
            "empirical-Bayes moderated across types; Phipson et al. 2022) or 'clr' (centred "
            "log-ratio with a sample-size-aware pseudocount)."
        ),
    )
    composition_transform: Literal["asin_sqrt", "logit"] = Field(
        default="logit",
        description=(
            "Transform of the proportions for 'propeller': 'logit' of (n + 0.5) / (N + 0.5 K) "
            "(speckle's default) or 'asin_sqrt'. Each donor's two samples are compared at the "
            "smaller one's size (expected rarefaction), so both stay calibrated with 10x "
            "unequal sample sizes and a 0.2% type (measured; tests/test_composition.py); equal "
            "power on planted shifts. logit is the default: its effect is a log-odds change."
        ),
    )
    composition_moderate: bool = Field(
        default=False,
        description=(
            "'propeller': moderate each type's variance of the paired differences towards the "
            "types' common value (limma empirical Bayes, Smyth 2004). Off by default: with ~10 "
            "types it gained <= 0.01 power, and types whose variance differs systematically "
            "(a 0.2% type on the logit scale) became anti-conservative (FPR 0.11 at 0.05)."
        ),
    )
    composition_min_prevalence: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description=(
            "A type is tested in a contrast only when it has at least one cell in this share of "
            "the contrast's samples (near-absent types are a row of differential_dropped)."
        ),
    )
    composition_min_prop: float = Field(
        default=0.001,
        ge=0,
        lt=1,
        description="... and a mean proportion over those samples of at least this.",
    )
    pseudocount: float = Field(
        default=0.5,
        gt=0,
        description=(
            "Cells added to a type's count before the CLR ('clr'), group log-ratios and log2 "
            "cells per uL, scaled by the sample's size relative to the mean sample (a "
            "pseudo-proportion: a zero maps to the same value whatever the sample's size)."
        ),
    )
    absolute_total_column: str | None = Field(
        default=None,
        description=(
            "Column of the covariates file with each sample's absolute count of the cells the "
            "sample represents (e.g. PBMCs per uL = lymphocytes + monocytes from the blood count): "
            "shares are converted to cells per uL and tested donor-paired (table "
            "composition_absolute; the column is not tested as a covariate); null: relative "
            "abundance only."
        ),
    )
    log_ratios: dict[str, dict[str, list[str]]] = Field(
        default_factory=lambda: {
            "naive/memory T ratio": {
                "numerator": ["CD4 naive T", "CD8 naive T"],
                "denominator": ["CD4 memory T", "CD8 memory T"],
            },
            "CD4 naive/memory T ratio": {
                "numerator": ["CD4 naive T"],
                "denominator": ["CD4 memory T"],
            },
            "CD8 naive/memory T ratio": {
                "numerator": ["CD8 naive T"],
                "denominator": ["CD8 memory T"],
            },
        },
        description=(
            "Composition log-ratios tested like cell types: name -> {numerator: [types], "
            "denominator: [types]} (labels as in obs['cell_type'])."
        ),
    )
    covariates: str | None = Field(
        default=None,
        description=(
            "CSV of per-sample numeric covariates keyed by 'sample' (e.g. plasma betaine); "
            "null skips the covariate associations."
        ),
    )
    covariate_columns: list[str] | None = Field(
        default=None,
        description="Covariate columns to test; null: every column except sample, donor, timepoint.",
    )
    covariate_adjust_timepoint: bool = Field(
        default=True,
        description=(
            "Add timepoint as a fixed effect in the covariate models (association at equal "
            "timepoints); without it a covariate and a score that both change with time are "
            "associated although unrelated."
        ),
    )
    mixed_optimizers: list[Literal["lbfgs", "bfgs", "powell", "nm", "cg"]] = Field(
        default_factory=lambda: ["lbfgs", "bfgs", "powell", "nm"],
        min_length=1,
        description=(
            "statsmodels MixedLM optimisers tried one by one until one converges (recorded in "
            "the tables' method column); only when all fail does a test fall back to OLS."
        ),
    )
    primary: dict[str, list[str]] | None = Field(
        default_factory=lambda: {
            "T_CD4": list(_T_CELL_PRIMARY),
            "T_CD8": list(_T_CELL_PRIMARY),
            "T_other": ["tbk1_sting", "ifn_type1", "nfkb_inflammation"],
            "NK": ["tbk1_sting", "ifn_type1", "nfkb_inflammation", "senescence_core"],
            "B": ["tbk1_sting", "ifn_type1", "nfkb_inflammation"],
            "plasma": ["ifn_type1", "nfkb_inflammation"],
            "mono": ["tbk1_sting", "ifn_type1", "nfkb_inflammation", "senescence_core", "sasp"],
            "DC": ["tbk1_sting", "ifn_type1", "nfkb_inflammation"],
        },
        description=(
            "Primary hypotheses: lineage (obs['cell_type_coarse']) or cell type -> signatures. "
            "Signature shifts of these pairs form the 'primary' FDR family (BH over all of them "
            "and all contrasts); every other pair is 'exploratory' (its own family); control "
            "signatures (e.g. ieg_dissociation) are the 'control' family. null: one family 'all' "
            "of every programme pair and contrast. Checked before compute: a signature that is "
            "no gene set, or (with the shipped marker panel) a name that is no lineage or cell "
            "type of it, is an error."
        ),
    )
    global_test: bool = Field(
        default=True,
        description=(
            "With three or more timepoints, also test each cell type x signature across all of "
            "them at once (Hotelling's T^2 on the within-donor differences, exact F without "
            "assuming sphericity, donors with every timepoint; table signature_global)."
        ),
    )

    @model_validator(mode="after")
    def _check_ratios(self) -> DifferentialConfig:
        for name, spec in self.log_ratios.items():
            if set(spec) != {"numerator", "denominator"} or not all(spec.values()):
                raise ValueError(
                    f"log_ratios[{name!r}] must have non-empty 'numerator' and 'denominator' lists"
                )
        return self


class ReportConfig(_Section):
    """The HTML report (``report`` stage)."""

    title: str = Field(default="immuneage report", description="Title of the HTML report.")
    q_threshold: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="q-value (BH FDR) below which a result is called a shift: key findings, heatmap marks, volcano colours.",
    )
    max_findings: int = Field(
        default=12,
        ge=1,
        description="At most this many signature, composition and DE findings are listed at the top of the report, smallest q first.",
    )
    max_umap_cells: int = Field(
        default=50000,
        ge=1000,
        description="UMAP scatter plots draw a seeded random subset of at most this many cells.",
    )
    max_qc_cells_per_sample: int = Field(
        default=5000,
        ge=100,
        description="QC distribution plots use a seeded random subset of at most this many cells per sample.",
    )
    max_panels: int = Field(
        default=48,
        ge=1,
        description="Most panels in one small-multiples figure (volcano plots, per-donor means); the rest are listed as left out, smallest q first kept.",
    )
    figure_format: Literal["png", "svg"] = Field(
        default="png",
        description="Format of the figures embedded in report.html and written to figures/ (png: base64 image; svg: inline vector).",
    )
    dpi: int = Field(default=100, ge=50, le=600, description="Resolution of PNG figures.")


class Config(_Section):
    """A complete immuneage run configuration."""

    seed: int = Field(
        default=0, ge=0, description="Seed for every random step (HVG ties, PCA, scVI, ...)."
    )
    device: Literal["auto", "cpu", "gpu"] = Field(
        default="auto",
        description="Where array work runs: 'gpu' requires a usable CUDA device (an error otherwise), 'auto' uses one when present.",
    )
    backend: Literal["auto", "scanpy", "kernels", "rapids"] = Field(
        default="auto",
        description=(
            "'auto': scanpy on CPU; on GPU rapids-singlecell when it imports, else immuneage's torch kernels. "
            "'kernels' forces the torch kernels (also on CPU); 'rapids' requires rapids-singlecell and a GPU."
        ),
    )
    backed: bool = Field(
        default=False,
        description=(
            "Cohorts larger than memory: cells x genes matrices stay on disk and every stage reads "
            "them a block of cells at a time (merge, filtering, normalisation, HVG, PCA, scVI, "
            "scores, pseudobulk). Uses immuneage's kernels (backend auto or kernels); later "
            "artifacts link to the preprocess matrices instead of copying them."
        ),
    )
    chunk_size: int = Field(
        default=20_000,
        ge=100,
        description="Cells per block when matrices are streamed (backed: true); memory ~ one block.",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description=(
            "At most this many threads for BLAS/OpenMP, torch and numba in a local run (null: "
            "the libraries' defaults, usually every core). `immuneage run --threads N` sets it; "
            "Slurm jobs use their allocation's CPUs. Results do not depend on it."
        ),
    )
    design: DesignConfig = Field(default_factory=DesignConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    ambient: AmbientConfig = Field(default_factory=AmbientConfig)
    qc: QCConfig = Field(default_factory=QCConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    integrate: IntegrateConfig = Field(default_factory=IntegrateConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    differential: DifferentialConfig = Field(default_factory=DifferentialConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _backed_backend(self) -> Config:
        if self.backed and self.backend in ("scanpy", "rapids"):
            raise ValueError(
                f"backed: true streams matrices through immuneage's kernels, but backend is "
                f"{self.backend!r} (its functions need the whole matrix in memory); set backend: "
                "auto or kernels, or backed: false"
            )
        return self


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names valid at ``loc`` (the parent of an unknown key), or None if not a model."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        nested = [
            a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        current = nested[0] if nested else annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(Config, loc[:-1])
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  - {path}: unknown key{hint}")
            continue
        given = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  - {path}: {msg}{shown}")
    lines.append(
        "Fix these keys (all keys with their defaults and help: configs/default.yaml), then run again."
    )
    return "\n".join(lines)


def read_yaml_mapping(
    path: Path, *, what: str, keys_hint: str, error: type[InputError] = ConfigError
) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping (an empty file is an empty mapping).

    Parameters
    ----------
    path
        The file.
    what
        How messages name it (``"config file"``, ``"Slurm profile"``).
    keys_hint
        What the mapping should hold, for the message when it is not a mapping.
    error
        The :class:`~pipeline.errors.InputError` subclass raised.

    Raises
    ------
    InputError
        Not YAML (with line and column), not UTF-8 text, or not a mapping.
    """
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{what} {path} is not valid YAML{where}: {exc}") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not a UTF-8 text file") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise error(
            f"{what} {path} must hold a mapping of {keys_hint}, not a {type(loaded).__name__}"
        )
    return loaded


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate a YAML configuration.

    Parameters
    ----------
    path
        YAML file. ``None`` gives the defaults (identical to ``configs/default.yaml``).
    overrides
        Nested mapping merged over the file's content before validation.

    Returns
    -------
    The validated :class:`Config`.

    Raises
    ------
    ConfigError
        The file is missing, is not YAML, or holds unknown keys or invalid values.
    """
    data: dict[str, Any] = {}
    source = "the default configuration"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(
                f"config file {p} does not exist; pass an existing YAML file to --config"
            )
        loaded = read_yaml_mapping(
            p, what="config file", keys_hint="sections (seed, device, design, ...)"
        )
        data = loaded
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def section_digest(cfg: Config, *sections: str) -> str:
    """SHA-256 of the named sections' values (what a stage's stamp records)."""
    dumped = cfg.model_dump(mode="json")
    payload = {name: dumped[name] for name in sections}
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()


def config_digest(cfg: Config) -> str:
    """SHA-256 of the whole configuration."""
    return hashlib.sha256(_canonical(cfg.model_dump(mode="json")).encode()).hexdigest()


def config_json_schema() -> dict[str, Any]:
    """The JSON schema of :class:`Config` (exported to ``docs/config.schema.json``)."""
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "immuneage configuration"
    return schema


def dump_config(cfg: Config) -> str:
    """The configuration as YAML (keys in schema order)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


#: What the built-in demo changes relative to the defaults (``configs/demo.yaml``
#: is this, written out; a test keeps the two identical). The demo cohort uses
#: the study's design (baseline, acute, longterm), which is also the default.
DEMO_OVERRIDES: dict[str, Any] = {
    "seed": 0,
    "device": "auto",
    # a fixed, short scVI training keeps the demo a few minutes on a laptop CPU
    "integrate": {"max_epochs": 25, "early_stopping": False},
    # the demo genome has 3,000 genes, all of them expressed like a whole transcriptome's
    # informative genes: min_genes keeps its unscaled meaning there (as before the scaling)
    # the demo plants 4-6% doublets in samples of a few hundred cells (a loading
    # 10x's rule would give ~0.5%): it tells scrublet the rate it simulated
    "qc": {"min_genes_reference": 3000, "expected_doublet_rate": 0.05},
}


def demo_config() -> Config:
    """The configuration ``immuneage demo`` runs with."""
    return load_config(None, DEMO_OVERRIDES)


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def commented_yaml(cfg: Config, header: str = "") -> str:
    """The config as YAML with each field's help text as a comment above it."""
    lines = [f"# {h}" if h else "#" for h in header.splitlines()]

    def emit(model: BaseModel, indent: int) -> None:
        pad = "  " * indent
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            doc = field.description
            if doc is None and isinstance(value, BaseModel):
                doc = (type(value).__doc__ or "").strip().splitlines()[0]
            if doc:
                lines.append(f"{pad}# {doc}")
            if isinstance(value, BaseModel):
                lines.append(f"{pad}{name}:")
                emit(value, indent + 1)
            elif isinstance(value, list) and value and isinstance(value[0], Contrast):
                lines.append(f"{pad}{name}:")
                lines.extend(f"{pad}  - {c}" for c in value)
            else:
                dumped = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
                lines.append(f"{pad}{name}: {_yaml_scalar(dumped)}")

    emit(cfg, 0)
    return "\n".join(lines) + "\n"


DEFAULT_HEADER = """immuneage default configuration (every key, with its default value).
Generated from the schema in pipeline/config.py by `python -m pipeline.config`;
copy it and change what you need. JSON schema: docs/config.schema.json"""

DEMO_HEADER = """immuneage demo configuration: what `immuneage demo` runs with.
Generated by `python -m pipeline.config` from pipeline.config.DEMO_OVERRIDES."""


def write_reference_files(root: Path) -> list[Path]:
    """(Re)write configs/default.yaml, configs/demo.yaml and docs/config.schema.json under ``root``."""
    root = Path(root)
    files = {
        root / "configs" / "default.yaml": commented_yaml(Config(), DEFAULT_HEADER),
        root / "configs" / "demo.yaml": commented_yaml(demo_config(), DEMO_HEADER),
        root / "docs" / "config.schema.json": json.dumps(config_json_schema(), indent=2) + "\n",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)


if __name__ == "__main__":  # pragma: no cover - developer helper
    for written in write_reference_files(Path(__file__).resolve().parents[1]):
        print(written)
