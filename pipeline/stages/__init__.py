"""The pipeline's stages, in run order.

Each stage is a module with pure functions over AnnData and the config; the
runner (:mod:`pipeline.runner`) owns reading, writing, stamps and provenance.
Adding a stage = one module, one config section, one entry in :data:`STAGES`.
"""

from __future__ import annotations

from ._base import StageContext, StageResult, StageSpec

__all__ = ["STAGES", "StageContext", "StageResult", "StageSpec", "get_stage", "stage_names"]

STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        name="ingest",
        summary="read each sample's counts (h5ad, 10x h5/mtx, Cell Ranger folders), validate, optional ambient RNA correction, merge into one AnnData",
        module="pipeline.stages.ingest",
        sample_func="ingest_sample",
        func="run_ingest_merge",
        inputs=(),
        sections=("design", "ingest", "ambient"),
        outputs=(
            "ingest/samples/<sample>.h5ad",
            "ingest/ingest.h5ad",
            "tables/ingest_samples.tsv",
        ),
    ),
    StageSpec(
        name="qc",
        summary="per-sample QC metrics, adaptive/fixed outlier filters, scrublet doublets; qc_report.html",
        module="pipeline.stages.qc",
        sample_func="qc_sample",
        func="merge_qc",
        inputs=("ingest",),
        sections=("seed", "backend", "qc"),
        outputs=(
            "qc/samples/<sample>.h5ad",
            "qc/qc.h5ad",
            "tables/qc_per_sample.tsv",
            "qc_report.html",
        ),
    ),
    StageSpec(
        name="preprocess",
        summary="filter cells and genes, normalise + log1p, seurat_v3 HVGs, PCA (scanpy, torch kernels or rapids-singlecell)",
        module="pipeline.stages.preprocess",
        func="run_preprocess",
        inputs=("ingest", "qc"),
        sections=("seed", "backend", "backed", "preprocess"),
        sheet_columns=("preprocess.hvg_batch_key",),
        outputs=("preprocess/preprocess.h5ad", "tables/hvg.tsv"),
    ),
    StageSpec(
        name="integrate",
        summary="scVI on the HVG counts (batch = sample by default; GPU when present), integration metrics PCA vs scVI",
        module="pipeline.stages.integrate",
        func="run_integrate",
        inputs=("preprocess",),
        sections=("seed", "integrate"),
        sheet_columns=(
            "integrate.batch_key",
            "integrate.categorical_covariates",
            "integrate.continuous_covariates",
        ),
        context=True,
        outputs=(
            "integrate/integrate.h5ad",
            "integrate/scvi_model/",
            "tables/scvi_history.tsv",
            "tables/integration_metrics.tsv",
        ),
    ),
    StageSpec(
        name="cluster",
        summary="kNN graph on X_scVI, Leiden at each resolution, UMAP",
        module="pipeline.stages.cluster",
        func="run_cluster",
        inputs=("integrate",),
        sections=("seed", "backend", "cluster"),
        context=True,
        outputs=("cluster/cluster.h5ad",),
    ),
    StageSpec(
        name="annotate",
        summary="immune cell types from a cited marker panel with cluster majority voting (or a CellTypist model file)",
        module="pipeline.stages.annotate",
        func="run_annotate",
        inputs=("cluster",),
        sections=("seed", "cluster", "annotate"),
        config_files=("annotate.markers", "annotate.celltypist_model"),
        outputs=(
            "annotate/annotate.h5ad",
            "tables/marker_coverage.tsv",
            "tables/cell_type_counts.tsv",
            "tables/cell_type_clusters.tsv",
        ),
    ),
    StageSpec(
        name="score",
        summary="TBK1/STING, interferon, NF-kB, senescence ... signature scores per cell, all sets in one sparse product",
        module="pipeline.stages.score",
        func="run_score",
        inputs=("annotate",),
        sections=("seed", "score"),
        config_files=("score.gmt",),
        check="check_config",
        outputs=(
            "score/score.h5ad",
            "tables/signature_coverage.tsv",
            "tables/sample_handling.tsv",
        ),
    ),
    StageSpec(
        name="differential",
        summary="donor-level tests per cell type: signature shifts, pseudobulk DE (PyDESeq2), composition, covariates",
        module="pipeline.stages.differential",
        func="run_differential",
        inputs=("score",),
        sections=("seed", "design", "differential"),
        config_files=("differential.covariates",),
        check="check_config",
        outputs=(
            "differential/differential.h5ad",
            "tables/signature_means.tsv",
            "tables/signature_shifts.tsv",
            "tables/signature_global.tsv",
            "tables/pseudobulk_de/<cell_type>__<contrast>.tsv",
            "tables/pseudobulk_de_summary.tsv",
            "tables/signature_enrichment.tsv",
            "tables/composition.tsv",
            "tables/composition_absolute.tsv",
            "tables/covariate_associations.tsv",
            "tables/differential_dropped.tsv",
        ),
    ),
    StageSpec(
        name="report",
        summary="self-contained HTML report (key findings, QC, integration, annotation, signatures, differential, provenance), figures, final AnnData",
        module="pipeline.stages.report",
        func="run_report",
        inputs=("score", "differential"),
        sections=("report",),
        sheet_columns=("*",),
        context=True,
        artifact="immuneage.h5ad",
        standalone=True,
        outputs=("immuneage.h5ad", "report.html", "figures/"),
    ),
)


def stage_names() -> list[str]:
    """Names of all stages in run order."""
    return [s.name for s in STAGES]


def get_stage(name: str) -> StageSpec:
    """The stage called ``name``.

    Raises
    ------
    ValueError
        No such stage (the message lists the valid names).
    """
    for s in STAGES:
        if s.name == name:
            return s
    raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(stage_names())}")
