"""Stage ``report``: one self-contained HTML report, its figures and the final AnnData.

The stage reads the result tables of every earlier stage from
``<outdir>/tables`` and the provenance record from its :class:`StageContext`,
draws the figures (:mod:`pipeline.report.figures`) and renders
``pipeline/report/templates/report.html.j2``. Its AnnData artifact is the final,
scverse-conventional object (``immuneage.h5ad``): the score stage's AnnData
unchanged except for ``uns["immuneage"]["report"]``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import keys
from ..report import build_report, read_tables
from ._base import StageContext, StageResult

if TYPE_CHECKING:
    from anndata import AnnData

    from ..config import Config

__all__ = ["run_report"]

log = logging.getLogger("immuneage")

#: Per-cell QC metrics drawn in section 2 (read from ``qc/qc.h5ad`` when present).
_QC_COLUMNS = (
    keys.SAMPLE,
    keys.DONOR,
    keys.TIMEPOINT,
    "total_counts",
    "n_genes_by_counts",
    "pct_counts_mt",
)


def _qc_obs(outdir: Path) -> Any:
    """obs of ``qc/qc.h5ad`` (every cell, before filtering), or None when absent."""
    path = outdir / "qc" / "qc.h5ad"
    if not path.is_file():
        return None
    import anndata as ad

    qc = ad.read_h5ad(path)
    cols = [c for c in _QC_COLUMNS if c in qc.obs.columns]
    return qc.obs[cols]


def run_report(
    adata: AnnData,
    pseudobulk: AnnData,
    cfg: Config,
    *,
    device: Any,
    context: StageContext,
) -> StageResult:
    """Render ``report.html`` and the figures from the run's tables.

    Parameters
    ----------
    adata
        The score stage's AnnData: ``obs`` with ``sample``, ``donor``,
        ``timepoint``, ``cell_type`` and ``score_<set>``; ``obsm["X_umap"]``,
        ``obsm["X_scVI"]``; log-normalised ``X``; ``layers["counts"]``.
    pseudobulk
        The differential stage's pseudobulk AnnData (its ``obs`` is counted in
        section 6).
    cfg
        Run configuration (reads ``report``; also ``design``, ``seed`` and
        ``annotate.markers`` for labels, subsets and the marker dot plot).
    device
        The run's device (unused: drawing runs on the host).
    context
        Output directory, tables directory and the provenance so far.

    Returns
    -------
    StageResult with

    - ``adata``: the final AnnData (written to ``immuneage.h5ad``) with
      ``uns["immuneage"]["report"]``: ``html`` (path), ``figures`` (file names),
      ``q_threshold``, ``n_findings`` (significant results listed per kind);
    - ``files["report.html"]``: the self-contained report;
    - ``files["figures/"]``: every figure of the report as ``<name>.png`` (or ``.svg``).
    """
    del device
    tables = read_tables(context.tables_dir)
    qc_obs = _qc_obs(context.outdir)
    pb_obs = pseudobulk.obs if pseudobulk is not None else None
    rendered = build_report(
        adata, tables, context.provenance, cfg, qc_obs=qc_obs, pseudobulk_obs=pb_obs
    )
    n_findings = {
        kind: sum(len(v[kind]) for v in rendered.findings.values())
        for kind in ("signature", "composition", "de")
    }
    adata.uns.setdefault(keys.UNS, {})["report"] = {
        "html": "report.html",
        "figures": sorted(rendered.figures),
        "q_threshold": cfg.report.q_threshold,
        "n_findings": n_findings,
    }
    log.info("report: %d figures, findings %s", len(rendered.figures), n_findings)

    def write_html(path: Path) -> None:
        path.write_text(rendered.html, encoding="utf-8")

    def write_figures(path: Path) -> None:
        for name, data in rendered.figures.items():
            (path / name).write_bytes(data)

    return StageResult(adata, files={"report.html": write_html, "figures/": write_figures})
