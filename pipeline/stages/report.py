"""Stage ``report``: one self-contained HTML report, its figures and the final AnnData.

The stage reads the result tables of every earlier stage from
``<outdir>/tables`` and the provenance record from its :class:`StageContext`,
draws the figures (:mod:`pipeline.report.figures`) and renders
``pipeline/report/templates/report.html.j2``. Its AnnData artifact is the final,
scverse-conventional object (``immuneage.h5ad``): the score stage's AnnData,
made ready for scanpy as it is (:func:`scanpy_ready`: no unused categories,
colours matching them, ``uns["log1p"]``), plus ``uns["immuneage"]["report"]``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import keys
from ..report import build_report, read_tables
from ._base import StageContext, StageResult

if TYPE_CHECKING:
    from anndata import AnnData

    from ..config import Config

__all__ = ["remove_unused_categories", "run_report", "scanpy_ready"]

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


def _align_colors(uns: Any, column: str, kept: np.ndarray) -> None:
    """Keep ``uns["<column>_colors"]`` in step with the column's categories after removal.

    A palette with one colour per old category keeps the colours of the kept
    ones (scanpy's convention: colour ``i`` is category ``i``); any other
    length no longer matches and is dropped (scanpy draws a new palette).
    """
    key = f"{column}_colors"
    if key not in uns:
        return
    colors = np.asarray(uns[key])
    if colors.ndim == 1 and len(colors) == len(kept):
        uns[key] = colors[kept]
    elif colors.ndim != 1 or len(colors) != int(kept.sum()):
        del uns[key]


def remove_unused_categories(adata: AnnData) -> dict[str, dict[str, list[str]]]:
    """Drop the categories that no cell (``obs``) or gene (``var``) has, in place.

    scanpy's group-wise functions take a categorical column's categories as the
    groups: an empty one makes ``sc.tl.rank_genes_groups`` raise and adds empty
    groups to plots. Every categorical ``obs`` and ``var`` column is cleaned
    (order and ``ordered`` kept); an ``obs`` column's colours in
    ``uns["<column>_colors"]`` follow its categories (a palette of another
    length than the categories is dropped: scanpy draws a new one).

    Parameters
    ----------
    adata
        Any AnnData (not a view).

    Returns
    -------
    ``{"obs": {column: removed categories}, "var": {...}}``, only the columns
    (and frames) that had any.
    """
    removed: dict[str, dict[str, list[str]]] = {}
    for where, frame in (("obs", adata.obs), ("var", adata.var)):
        for col in list(frame.columns):
            values = frame[col]
            if not isinstance(values.dtype, pd.CategoricalDtype):
                continue
            codes = values.cat.codes.to_numpy()
            kept = np.zeros(len(values.cat.categories), dtype=bool)
            kept[codes[codes >= 0]] = True
            if not kept.all():
                gone = [str(c) for c in values.cat.categories[~kept]]
                removed.setdefault(where, {})[str(col)] = gone
                frame[col] = values.cat.remove_unused_categories()
            if where == "obs":
                _align_colors(adata.uns, str(col), kept)
    return removed


def scanpy_ready(adata: AnnData) -> dict[str, Any]:
    """Make the final AnnData one that scanpy's functions take as it is (in place).

    - unused categories are removed from every categorical ``obs``/``var``
      column, and colours follow (:func:`remove_unused_categories`);
    - ``uns["log1p"] = {"base": None}`` (what ``sc.pp.log1p`` writes: natural
      log), as ``X`` is log1p of the normalised counts; the preprocess stage
      records it, this covers artifacts written before it did;
    - ``var["highly_variable"]`` is boolean (scanpy selects genes with it);
    - ``uns["neighbors"]`` names graphs that are in ``obsp`` (``sc.tl.leiden``,
      ``sc.tl.umap`` read them); otherwise it is dropped, so scanpy asks for
      ``sc.pp.neighbors`` instead of failing on a missing key.

    Returns
    -------
    What was changed: ``removed_categories`` (see
    :func:`remove_unused_categories`) and ``fixed`` (names of the other fixes).
    """
    removed = remove_unused_categories(adata)
    fixed: list[str] = []
    if "log1p" not in adata.uns:
        adata.uns["log1p"] = {"base": None}
        fixed.append("log1p")
    hv = adata.var.get("highly_variable")
    if hv is not None and hv.dtype != bool:
        adata.var["highly_variable"] = hv.eq(True).to_numpy(dtype=bool)
        fixed.append("highly_variable")
    nb = adata.uns.get("neighbors")
    if isinstance(nb, dict):
        graphs = (
            nb.get("connectivities_key", "connectivities"),
            nb.get("distances_key", "distances"),
        )
        if not all(g in adata.obsp for g in graphs):
            del adata.uns["neighbors"]
            fixed.append("neighbors")
    return {"removed_categories": removed, "fixed": fixed}


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

    - ``adata``: the final AnnData (written to ``immuneage.h5ad``), ready for
      scanpy (:func:`scanpy_ready`), with ``uns["immuneage"]["report"]``:
      ``html`` (path), ``figures`` (file names), ``q_threshold``,
      ``n_findings`` (significant results listed per kind),
      ``removed_categories`` (``{"obs": {column: categories}}`` removed as unused);
    - ``files["report.html"]``: the self-contained report;
    - ``files["figures/"]``: every figure of the report as ``<name>.png`` (or ``.svg``).
    """
    del device
    ready = scanpy_ready(adata)
    if ready["removed_categories"] or ready["fixed"]:
        log.debug("report: final AnnData made scanpy-ready: %s", ready)
    tables = read_tables(context.tables_dir)
    qc_obs = _qc_obs(context.outdir)
    pb_obs = pseudobulk.obs if pseudobulk is not None else None
    rendered = build_report(
        adata, tables, context.provenance, cfg, qc_obs=qc_obs, pseudobulk_obs=pb_obs
    )
    n_findings = {
        kind: sum(len(v[kind]) for v in rendered.findings.values())
        for kind in ("signature", "composition", "composition_absolute", "enrichment", "de")
    }
    adata.uns.setdefault(keys.UNS, {})["report"] = {
        "html": "report.html",
        "figures": sorted(rendered.figures),
        "q_threshold": cfg.report.q_threshold,
        "n_findings": n_findings,
        "removed_categories": ready["removed_categories"],
    }
    log.info("report: %d figures, findings %s", len(rendered.figures), n_findings)

    def write_html(path: Path) -> None:
        path.write_text(rendered.html, encoding="utf-8")

    def write_figures(path: Path) -> None:
        for name, data in rendered.figures.items():
            (path / name).write_bytes(data)

    return StageResult(adata, files={"report.html": write_html, "figures/": write_figures})
