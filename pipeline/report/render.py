"""Build the report: read the result tables, compute key findings, draw, render HTML.

:func:`read_tables` loads every result table present in ``<outdir>/tables``
(a missing optional table is ``None``), :func:`key_findings` ranks the
significant shifts, :func:`build_report` draws every figure
(:mod:`pipeline.report.figures`) and renders ``templates/report.html.j2`` into one
self-contained HTML string: figures embedded as base64 PNG (or inline SVG),
CSS inline, no script and a Content-Security-Policy that forbids any network
request, so the file opens anywhere, offline.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import keys
from . import figures as F

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from anndata import AnnData
    from matplotlib.figure import Figure

    from ..config import Config

__all__ = [
    "TABLES",
    "Finding",
    "RenderedReport",
    "ReportTables",
    "build_report",
    "encode_figure",
    "key_findings",
    "marker_expression",
    "read_tables",
]

TEMPLATES = Path(__file__).resolve().parent / "templates"

#: Result tables the report reads from ``<outdir>/tables`` (``<name>.tsv``).
TABLES = (
    "ingest_samples",
    "qc_per_sample",
    "hvg",
    "scvi_history",
    "integration_metrics",
    "marker_coverage",
    "cell_type_counts",
    "cell_type_clusters",
    "signature_coverage",
    "signature_shifts",
    "signature_means",
    "signature_enrichment",
    "composition",
    "covariate_associations",
    "pseudobulk_de_summary",
    "differential_dropped",
)

#: Section ids in page order, with their titles.
SECTIONS = (
    ("summary", "1 Run summary"),
    ("qc", "2 Quality control"),
    ("integration", "3 Integration"),
    ("annotation", "4 Annotation"),
    ("signatures", "5 Signatures"),
    ("differential", "6 Differential results"),
    ("provenance", "7 Provenance"),
)


# --------------------------------------------------------------------------- tables
@dataclass
class ReportTables:
    """The result tables of a run; a table not written (yet) is ``None``.

    Attributes
    ----------
    tables
        Name (see :data:`TABLES`) -> DataFrame, or ``None`` when absent.
    pseudobulk_de
        ``(cell_type, contrast)`` -> the DE table of that tested pair.
    """

    tables: dict[str, pd.DataFrame | None] = field(default_factory=dict)
    pseudobulk_de: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)

    def get(self, name: str) -> pd.DataFrame | None:
        """The table ``name``, or ``None`` when absent or empty of columns."""
        t = self.tables.get(name)
        return t if t is not None and len(t.columns) else None


def _safe(name: str) -> str:
    """File-safe cell type as in DE table names (anything but ``[A-Za-z0-9.+_-]`` -> ``_``)."""
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", str(name))


def read_tables(tables_dir: Path) -> ReportTables:
    """Read every result table present in ``tables_dir``.

    Parameters
    ----------
    tables_dir
        ``<outdir>/tables``.

    Returns
    -------
    :class:`ReportTables`. Pseudobulk DE tables
    ``pseudobulk_de/<cell_type>__<contrast>.tsv`` are matched to their cell type
    through ``pseudobulk_de_summary.tsv`` (its ``table`` column, else the
    file-safe cell type: characters other than ``[A-Za-z0-9.+_-]`` are ``_``);
    without the summary the file name is used.
    """
    tables_dir = Path(tables_dir)
    out = ReportTables()
    for name in TABLES:
        path = tables_dir / f"{name}.tsv"
        out.tables[name] = pd.read_csv(path, sep="\t") if path.is_file() else None
    summary = out.get("pseudobulk_de_summary")
    lookup: dict[str, tuple[str, str]] = {}
    if summary is not None:
        names = (
            summary["table"].astype(str).str.removeprefix("pseudobulk_de/")
            if "table" in summary.columns
            else None
        )
        for i, (ct, con) in enumerate(
            zip(summary["cell_type"].astype(str), summary["contrast"].astype(str), strict=True)
        ):
            lookup[f"{_safe(ct)}__{con}"] = (ct, con)
            if names is not None and names.iloc[i] not in ("", "nan"):
                lookup[names.iloc[i]] = (ct, con)
    de_dir = tables_dir / "pseudobulk_de"
    if de_dir.is_dir():
        for path in sorted(de_dir.glob("*.tsv")):
            stem = path.name[: -len(".tsv")]
            if stem in lookup:
                key = lookup[stem]
            elif "__" in stem:
                ct, con = stem.rsplit("__", 1)
                key = (ct, con)
            else:
                continue
            out.pseudobulk_de[key] = pd.read_csv(path, sep="\t")
    return out


# --------------------------------------------------------------------------- findings
@dataclass(frozen=True)
class Finding:
    """One significant result, as listed at the top of the report.

    Attributes
    ----------
    kind
        ``signature``, ``composition`` or ``de``.
    contrast
        The contrast (``<test>_vs_<reference>``).
    cell_type
        The cell type.
    what
        The signature, ``proportion``, or ``genes``.
    direction
        ``up`` or ``down`` (``mixed`` for DE gene counts).
    text
        The sentence shown (effect, CI, q, donors).
    q_value
        The q-value the ranking uses.
    """

    kind: str
    contrast: str
    cell_type: str
    what: str
    direction: str
    text: str
    q_value: float


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def _fmt(x: Any, digits: int = 3) -> str:
    """Numbers with ``digits`` significant digits, integers with separators, NaN as ``-``."""
    if x is None:
        return "-"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(float(x)):
            return "-"
        if float(x).is_integer() and abs(x) < 1e15:
            return f"{int(x):,}"
        return f"{float(x):.{digits}g}"
    if isinstance(x, str):
        return x
    return "-" if pd.isna(x) else str(x)


def _ci(lo: Any, hi: Any) -> str:
    lo_f, hi_f = _num(lo), _num(hi)
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        return ""
    return f" (95% CI {lo_f:+.3g} to {hi_f:+.3g})"


def _sig_rows(t: pd.DataFrame | None, q_threshold: float) -> pd.DataFrame:
    if t is None or "q_value" not in t.columns:
        return pd.DataFrame()
    q = pd.to_numeric(t["q_value"], errors="coerce")
    return t.assign(q_value=q)[q < q_threshold].sort_values("q_value", kind="stable")


def key_findings(
    tables: ReportTables, *, q_threshold: float, max_findings: int
) -> dict[str, dict[str, Any]]:
    """Significant shifts per contrast, computed from the result tables.

    Parameters
    ----------
    tables
        The run's tables (signature shifts, composition, pseudobulk DE).
    q_threshold
        A result counts when its BH q-value is below this.
    max_findings
        Per contrast and kind, at most this many findings (smallest q first).

    Returns
    -------
    Contrast -> ``{"signature": [Finding], "composition": [...], "de": [...],
    "n_tests": {kind: tests done}, "n_significant": {kind: count}}``.
    """
    out: dict[str, dict[str, Any]] = {}

    def slot(con: str) -> dict[str, Any]:
        return out.setdefault(
            con,
            {"signature": [], "composition": [], "de": [], "n_tests": {}, "n_significant": {}},
        )

    def tested(con: str, kind: str, g: pd.DataFrame) -> tuple[dict[str, Any], pd.DataFrame]:
        """The contrast's slot and its rows below the threshold; counts tests and hits."""
        s = slot(con)
        sig = _sig_rows(g, q_threshold)
        s["n_tests"][kind] = int(pd.to_numeric(g["q_value"], errors="coerce").notna().sum())
        s["n_significant"][kind] = len(sig)
        return s, sig

    shifts = tables.get("signature_shifts")
    if shifts is not None:
        for con, g in shifts.groupby(shifts["contrast"].astype(str), sort=False):
            s, sig = tested(con, "signature", g)
            for r in sig.head(max_findings).itertuples(index=False):
                eff = _num(r.effect)
                direction = "up" if eff > 0 else "down"
                dz = _num(getattr(r, "dz", float("nan")))
                dz_txt = f", dz {dz:+.2f}" if math.isfinite(dz) else ""
                text = (
                    f"{r.signature} {'higher' if eff > 0 else 'lower'} in {r.cell_type}: "
                    f"score {eff:+.3g}{_ci(r.ci_low, r.ci_high)}{dz_txt}, "
                    f"q = {r.q_value:.2g}, {int(_num(r.n_donors))} donors"
                )
                s["signature"].append(
                    Finding(
                        "signature",
                        con,
                        str(r.cell_type),
                        str(r.signature),
                        direction,
                        text,
                        float(r.q_value),
                    )
                )
    comp = tables.get("composition")
    if comp is not None:
        for con, g in comp.groupby(comp["contrast"].astype(str), sort=False):
            s, sig = tested(con, "composition", g)
            for r in sig.head(max_findings).itertuples(index=False):
                eff = _num(r.effect_clr)
                direction = "up" if eff > 0 else "down"
                text = (
                    f"{r.cell_type} proportion {'up' if eff > 0 else 'down'}: "
                    f"{100 * _num(r.mean_prop_reference):.2f}% → {100 * _num(r.mean_prop_test):.2f}% "
                    f"(CLR {eff:+.3g}{_ci(r.ci_low, r.ci_high).replace(' (', '; ').rstrip(')')}), "
                    f"q = {r.q_value:.2g}, {int(_num(r.n_donors))} donors"
                )
                s["composition"].append(
                    Finding(
                        "composition",
                        con,
                        str(r.cell_type),
                        "proportion",
                        direction,
                        text,
                        float(r.q_value),
                    )
                )
    if tables.pseudobulk_de:
        summary = tables.get("pseudobulk_de_summary")
        donors: dict[tuple[str, str], Any] = {}
        if summary is not None:
            donors = {
                (str(a), str(b)): n
                for a, b, n in zip(
                    summary["cell_type"], summary["contrast"], summary["n_donors"], strict=True
                )
            }
        per_con: dict[str, list[Finding]] = {}
        for (ct, con), de in tables.pseudobulk_de.items():
            s = slot(con)
            s["n_tests"]["de"] = s["n_tests"].get("de", 0) + 1
            q = pd.to_numeric(de["q_value"], errors="coerce")
            lfc = pd.to_numeric(de["log2fc"], errors="coerce")
            m = q < q_threshold
            n_sig = int(m.sum())
            if n_sig == 0:
                continue
            n_up, n_down = int((m & (lfc > 0)).sum()), int((m & (lfc < 0)).sum())
            top = de.assign(_q=q)[m].sort_values("_q").head(5)
            genes = ", ".join(
                f"{g} {'↑' if _num(x) > 0 else '↓'}"
                for g, x in zip(top["gene"], top["log2fc"], strict=True)
            )
            nd = donors.get((ct, con))
            nd_txt = (
                f", {int(_num(nd))} donors" if nd is not None and math.isfinite(_num(nd)) else ""
            )
            text = f"{ct}: {n_sig} genes at q < {q_threshold:g} ({n_up} up, {n_down} down{nd_txt}); top: {genes}"
            direction = "up" if n_up > n_down else "down" if n_down > n_up else "mixed"
            per_con.setdefault(con, []).append(
                Finding("de", con, ct, "genes", direction, text, float(q[m].min()))
            )
        for con, items in per_con.items():
            s = slot(con)
            s["n_significant"]["de"] = len(items)
            s["de"] = sorted(items, key=lambda f: f.q_value)[:max_findings]
        for con in out:
            out[con]["n_significant"].setdefault("de", 0)
    return out


# --------------------------------------------------------------------------- helpers
def _gene_columns(x: Any, idx: np.ndarray, *, chunk_size: int | None) -> Any:
    """Columns ``idx`` of a row source (an on-disk ``X``), gathered block by block as CSR."""
    import scipy.sparse as sp

    from ..kernels.sparse import DEFAULT_CHUNK_SIZE, iter_row_blocks

    step = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    blocks = [block[:, idx] for _, _, block in iter_row_blocks(x, chunk_size=step)]
    if not blocks:
        return sp.csr_matrix((int(x.shape[0]), len(idx)), dtype=getattr(x, "dtype", np.float32))
    return sp.csr_matrix(sp.vstack(blocks, format="csr"))


def marker_expression(
    adata: AnnData,
    markers: Mapping[str, Sequence[str]],
    *,
    groupby: str = keys.CELL_TYPE,
    chunk_size: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean expression and fraction of expressing cells of marker genes per group.

    Parameters
    ----------
    adata
        Cells with log-normalised ``X`` and ``obs[groupby]``. ``X`` may be an
        on-disk row source (backed mode): only the marker columns are gathered,
        block by block, and each group's cells are densified one group at a time.
    markers
        Group -> its marker genes (genes absent from ``var_names`` are dropped).
    groupby
        obs column of the groups (rows, in the order of ``markers``).
    chunk_size
        Rows per block read from an on-disk ``X``; default
        :data:`pipeline.kernels.sparse.DEFAULT_CHUNK_SIZE`.

    Returns
    -------
    ``(mean, fraction)``: groups x genes DataFrames (genes in first-seen order).
    """
    from ..kernels.sparse import is_row_source

    present = set(map(str, adata.var_names))
    genes = list(dict.fromkeys(g for gs in markers.values() for g in gs if g in present))
    groups = [g for g in markers if (adata.obs[groupby].astype(str) == g).any()]
    if not genes or not groups:
        empty = pd.DataFrame(index=groups, columns=genes, dtype=float)
        return empty, empty.copy()
    if is_row_source(adata.X):
        idx = adata.var_names.get_indexer(genes)
        x = _gene_columns(adata.X, idx, chunk_size=chunk_size)
    else:
        x = adata[:, genes].X
        x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    labels = adata.obs[groupby].astype(str).to_numpy()
    mean = np.zeros((len(groups), len(genes)))
    frac = np.zeros_like(mean)
    for i, g in enumerate(groups):
        sub = x[labels == g]
        sub = sub.toarray() if hasattr(sub, "toarray") else sub
        mean[i] = sub.mean(axis=0)
        frac[i] = (sub > 0).mean(axis=0)
    return (
        pd.DataFrame(mean, index=groups, columns=genes),
        pd.DataFrame(frac, index=groups, columns=genes),
    )


def encode_figure(fig: Figure, fmt: str, dpi: int) -> bytes:
    """The figure as PNG or SVG bytes."""
    buf = io.BytesIO()
    fig.savefig(
        buf, format=fmt, dpi=dpi, metadata={"Software": None} if fmt == "png" else {"Date": None}
    )
    return buf.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


@dataclass
class _Table:
    """A table block: header, formatted rows, per-row CSS class."""

    columns: list[str]
    rows: list[list[str]]
    row_classes: list[str]
    caption: str = ""
    collapsed: bool = False


def _table(
    df: pd.DataFrame,
    columns: Sequence[str] | None = None,
    *,
    caption: str = "",
    q_threshold: float | None = None,
    collapsed: bool | None = None,
    max_rows: int = 500,
) -> _Table:
    cols = [c for c in (columns or list(df.columns)) if c in df.columns]
    d = df[cols].head(max_rows)
    rows = [[_fmt(v) for v in r] for r in d.itertuples(index=False, name=None)]
    classes = [""] * len(rows)
    if q_threshold is not None and "q_value" in d.columns:
        q = pd.to_numeric(d["q_value"], errors="coerce").to_numpy()
        classes = ["sig" if np.isfinite(v) and v < q_threshold else "" for v in q]
    if len(df) > max_rows:
        caption += f" (first {max_rows} of {len(df):,} rows; all in the TSV)"
    return _Table(
        cols, rows, classes, caption, bool(len(rows) > 25 if collapsed is None else collapsed)
    )


@dataclass
class _Section:
    id: str
    title: str
    blocks: list[dict[str, Any]] = field(default_factory=list)

    def note(self, text: str, *, kind: str = "note") -> None:
        self.blocks.append({"type": "note", "text": text, "kind": kind})

    def table(self, t: _Table) -> None:
        self.blocks.append({"type": "table", "table": t})

    def heading(self, text: str) -> None:
        self.blocks.append({"type": "heading", "text": text})

    def pre(self, text: str, *, summary: str) -> None:
        self.blocks.append({"type": "pre", "text": text, "summary": summary})


@dataclass
class RenderedReport:
    """The rendered report.

    Attributes
    ----------
    html
        The self-contained page.
    figures
        File name (``<name>.png`` or ``.svg``) -> bytes, as embedded in the page.
    findings
        The key findings (see :func:`key_findings`).
    """

    html: str
    figures: dict[str, bytes]
    findings: dict[str, dict[str, Any]]


class _Figures:
    """Collects the figures of the report, then draws, encodes and closes them in one pass.

    :meth:`add` reserves the figure's place (a block of its section) and its file
    name; :meth:`draw` draws every figure in the order added, with progress
    (:func:`pipeline.progress.progress`: a bar on a terminal, a plain line now
    and then otherwise, nothing with ``--quiet``), so the total is known.
    """

    def __init__(self, fmt: str, dpi: int) -> None:
        self.fmt, self.dpi = fmt, dpi
        self.files: dict[str, bytes] = {}
        self._pending: list[tuple[str, Callable[[], Figure], dict[str, Any]]] = []
        self._names: set[str] = set()

    def add(self, section: _Section, name: str, caption: str, draw: Callable[[], Figure]) -> None:
        """Reserve a figure: ``draw`` runs in :meth:`draw` (it must not depend on later state)."""
        fname = f"{_slug(name)}.{self.fmt}"
        i = 2
        while fname in self._names:
            fname = f"{_slug(name)}_{i}.{self.fmt}"
            i += 1
        self._names.add(fname)
        block: dict[str, Any] = {"type": "figure", "name": fname, "caption": caption}
        section.blocks.append(block)
        self._pending.append((fname, draw, block))

    def draw(self) -> None:
        """Draw and encode every reserved figure, in the order added."""
        from ..progress import progress

        pending, self._pending = self._pending, []
        for fname, draw, block in progress(pending, desc="report figures", unit="figure"):
            data = encode_figure(draw(), self.fmt, self.dpi)
            self.files[fname] = data
            if self.fmt == "png":
                block["src"] = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            else:
                svg = data.decode("utf-8")
                block["svg"] = svg[svg.index("<svg") :]


def skipped_signatures_note(coverage: pd.DataFrame) -> str | None:
    """The line naming the gene sets the score stage skipped and their missing genes."""
    skipped = coverage[coverage["status"].astype(str).str.startswith("skipped")]
    if skipped.empty:
        return None
    parts = []
    for r in skipped.itertuples(index=False):
        missing = [g for g in str(r.genes_missing).split(",") if g and g != "nan"]
        shown = ", ".join(missing[:12]) + (" ..." if len(missing) > 12 else "")
        parts.append(f"{r.signature} ({r.n_found} of {r.n_genes} genes found; missing {shown})")
    return (
        f"Not scored: {len(parts)} gene set(s) with fewer genes in the data than "
        f"score.min_genes: {'; '.join(parts)}."
    )


def _contrast_label(con: str) -> str:
    return con.replace("_vs_", " vs ").replace("_", " ")


# --------------------------------------------------------------------------- build
def build_report(
    adata: AnnData,
    tables: ReportTables,
    provenance: Mapping[str, Any],
    cfg: Config,
    *,
    qc_obs: pd.DataFrame | None = None,
    pseudobulk_obs: pd.DataFrame | None = None,
) -> RenderedReport:
    """Draw every figure and render the HTML report.

    Parameters
    ----------
    adata
        The final AnnData: ``obs`` with ``sample``, ``donor``, ``timepoint``,
        ``cell_type``; ``obsm["X_umap"]``; log-normalised ``X`` (marker dot plot).
    tables
        The run's result tables (:func:`read_tables`).
    provenance
        ``provenance.json`` as of before the report (versions, config, inputs,
        stages, warnings).
    cfg
        Run configuration (reads ``report``, ``design``, ``seed``, ``annotate.markers``,
        ``chunk_size``).
    qc_obs
        Per-cell QC metrics of all cells before filtering (``qc/qc.h5ad`` obs);
        default: the QC columns of ``adata.obs`` (cells that passed QC).
    pseudobulk_obs
        obs of the differential stage's pseudobulk AnnData (counted in section 6).

    Returns
    -------
    :class:`RenderedReport`.
    """
    rc = cfg.report
    thr = rc.q_threshold
    timepoints = list(cfg.design.timepoints)
    contrasts = [c.name for c in cfg.design.contrasts]
    figs = _Figures(rc.figure_format, rc.dpi)
    sections = {sid: _Section(sid, title) for sid, title in SECTIONS}
    obs = adata.obs
    qc = tables.get("qc_per_sample")

    # 1 run summary -------------------------------------------------------
    s = sections["summary"]
    if qc is not None:
        per_sample = qc.rename(columns={"cells_out": "n_cells"})
        what = "cells per sample after QC"
    else:
        per_sample = (
            obs.groupby([keys.SAMPLE, keys.DONOR, keys.TIMEPOINT], observed=True)
            .size()
            .rename("n_cells")
            .reset_index()
        )
        what = "cells per sample in the final data"
    n_donors = per_sample[keys.DONOR].nunique()
    s.note(
        f"{n_donors} donors, {per_sample[keys.SAMPLE].nunique()} samples, "
        f"{adata.n_obs:,} cells and {adata.n_vars:,} genes in the final data; "
        f"contrasts: {', '.join(_contrast_label(c) for c in contrasts)}."
    )
    figs.add(
        s,
        "cohort_matrix",
        f"Cohort: donors × timepoints, {what} ('-': no sample).",
        lambda: F.cohort_matrix(per_sample, timepoints),
    )
    stages = dict(provenance.get("stages", {}))
    total = sum(
        _num(v.get("wall_s")) for v in stages.values() if math.isfinite(_num(v.get("wall_s")))
    )
    device = provenance.get("device", {})
    facts = [
        ("config digest", str(provenance.get("config_digest", ""))[:16]),
        (
            "device",
            f"{device.get('resolved', '?')} (requested {device.get('requested', '?')})"
            + (f", {device['name']}" if device.get("name") else ""),
        ),
        ("stage compute time", f"{total:,.1f} s over {len(stages)} stages before the report"),
        ("seed", str(provenance.get("seed", cfg.seed))),
        ("immuneage", str(provenance.get("version", ""))),
    ]
    s.table(_Table(["item", "value"], [list(f) for f in facts], [""] * len(facts), "Run"))

    # 2 QC -----------------------------------------------------------------
    s = sections["qc"]
    if qc is not None:
        figs.add(
            s,
            "qc_cells",
            "Cells kept and removed per sample (left) and the share of cells removed by each "
            "reason (right; the doublet column is the doublet rate). A cell can fail several "
            "reasons, so the reasons need not add up.",
            lambda: F.qc_cells(qc),
        )
        s.table(
            _table(
                qc,
                [
                    keys.SAMPLE,
                    keys.DONOR,
                    keys.TIMEPOINT,
                    "cells_in",
                    "removed_counts",
                    "removed_genes",
                    "removed_mt",
                    "doublets",
                    "cells_out",
                    "dropped",
                ],
                caption="Per-sample QC (tables/qc_per_sample.tsv)",
                collapsed=True,
            )
        )
    else:
        s.note("tables/qc_per_sample.tsv is absent: no per-sample QC summary.", kind="missing")
    dist_obs = qc_obs if qc_obs is not None else obs
    which = "all cells before filtering" if qc_obs is not None else "cells that passed QC"
    if any(m in dist_obs.columns for m in ("total_counts", "n_genes_by_counts", "pct_counts_mt")):
        figs.add(
            s,
            "qc_distributions",
            f"Total counts, genes detected and % mitochondrial reads per sample ({which}; "
            f"boxes from at most {rc.max_qc_cells_per_sample:,} cells per sample; red ticks: "
            "thresholds applied).",
            lambda: F.qc_distributions(
                dist_obs,
                qc,
                max_cells_per_sample=rc.max_qc_cells_per_sample,
                seed=cfg.seed,
                timepoints=timepoints,
            ),
        )
    else:
        s.note("No per-cell QC metrics in the data: distributions not shown.", kind="missing")

    # 3 integration -----------------------------------------------------------
    s = sections["integration"]
    orders = {keys.TIMEPOINT: timepoints}
    has_umap = keys.X_UMAP in adata.obsm
    if has_umap:
        cols = [c for c in (keys.SAMPLE, keys.TIMEPOINT, keys.CELL_TYPE) if c in obs.columns]
        figs.add(
            s,
            "umap_sample_timepoint_celltype",
            "UMAP of the scVI latent space coloured by sample, timepoint and cell type "
            f"(at most {rc.max_umap_cells:,} cells drawn, seeded). Well-integrated data mixes "
            "samples within each cell-type island.",
            lambda: F.umap_panels(
                np.asarray(adata.obsm[keys.X_UMAP]),
                obs,
                cols,
                max_cells=rc.max_umap_cells,
                seed=cfg.seed,
                orders=orders,
            ),
        )
    else:
        s.note("obsm['X_umap'] is absent: no UMAP.", kind="missing")
    metrics = tables.get("integration_metrics")
    if metrics is not None:
        figs.add(
            s,
            "integration_metrics",
            "Integration metrics, unintegrated PCA vs scVI (higher = better for every metric).",
            lambda: F.integration_metrics(metrics),
        )
        s.table(_table(metrics, caption="tables/integration_metrics.tsv", collapsed=True))
    else:
        s.note("tables/integration_metrics.tsv is absent.", kind="missing")
    hist = tables.get("scvi_history")
    if hist is not None:
        figs.add(
            s,
            "scvi_training",
            "scVI training curve per epoch (train solid, validation dashed).",
            lambda: F.scvi_history(hist),
        )
    else:
        s.note("tables/scvi_history.tsv is absent: no training curve.", kind="missing")

    # 4 annotation -------------------------------------------------------------
    s = sections["annotation"]
    if keys.CELL_TYPE in obs.columns:
        type_order = sorted(
            obs[keys.CELL_TYPE].astype(str).unique(), key=lambda t: (t == keys.UNASSIGNED, t)
        )
        if has_umap:
            figs.add(
                s,
                "umap_cell_type",
                "UMAP coloured by cell type (labels at each type's median position).",
                lambda: F.umap_panels(
                    np.asarray(adata.obsm[keys.X_UMAP]),
                    obs,
                    [keys.CELL_TYPE],
                    max_cells=rc.max_umap_cells,
                    seed=cfg.seed,
                    orders={keys.CELL_TYPE: type_order},
                    label_on_data=[keys.CELL_TYPE],
                ),
            )
        mean, frac = _marker_tables(adata, cfg, type_order)
        if mean.shape[1]:
            figs.add(
                s,
                "marker_dotplot",
                "Marker genes of the annotation panel (up to 3 positive markers per type): dot size "
                "= fraction of the type's cells expressing, colour = mean log-normalised expression "
                "scaled per gene.",
                lambda: F.marker_dotplot(mean, frac),
            )
        else:
            s.note(
                "No marker of the annotation panel matches these labels: no dot plot.",
                kind="missing",
            )
    else:
        s.note("obs['cell_type'] is absent: the data were not annotated.", kind="missing")
    counts = tables.get("cell_type_counts")
    comp = tables.get("composition")
    if counts is not None:
        figs.add(
            s,
            "composition_per_donor",
            "Cell-type share of each sample, one grey line per donor joining its timepoints, black: "
            "mean; titles give the composition test's q per contrast (* q < "
            f"{thr:g}, ** q < {thr / 10:g}); red frames: a significant shift.",
            lambda: F.composition_lines(
                counts, timepoints, comp, q_threshold=thr, max_panels=rc.max_panels
            ),
        )
    else:
        s.note("tables/cell_type_counts.tsv is absent: no composition plot.", kind="missing")
    if comp is not None:
        s.table(
            _table(
                comp.sort_values("q_value", na_position="last"),
                caption=f"Composition tests per contrast (tables/composition.tsv; highlighted: q < {thr:g})",
                q_threshold=thr,
            )
        )
    else:
        s.note("tables/composition.tsv is absent: composition was not tested.", kind="missing")
    clusters = tables.get("cell_type_clusters")
    if clusters is not None:
        s.table(
            _table(
                clusters,
                caption="Leiden cluster votes (tables/cell_type_clusters.tsv)",
                collapsed=True,
            )
        )

    # 5 signatures ----------------------------------------------------------------
    s = sections["signatures"]
    means = tables.get("signature_means")
    shifts = tables.get("signature_shifts")
    coverage = tables.get("signature_coverage")
    if coverage is not None:
        figs.add(
            s,
            "signature_coverage",
            "Genes of each signature found in the data (skipped sets labelled).",
            lambda: F.signature_coverage(coverage),
        )
        s.table(
            _table(
                coverage,
                [
                    "signature",
                    "source",
                    "n_genes",
                    "n_found",
                    "n_missing",
                    "genes_missing",
                    "aliases_used",
                    "status",
                ],
                caption="Gene coverage per set (tables/signature_coverage.tsv)",
                collapsed=True,
            )
        )
        if (skipped_note := skipped_signatures_note(coverage)) is not None:
            s.note(skipped_note, kind="missing")
    else:
        s.note("tables/signature_coverage.tsv is absent: no signature was scored.", kind="missing")
    if means is not None:
        sig_names = list(pd.unique(means["signature"].astype(str)))
        if shifts is not None:
            best = (
                pd.to_numeric(shifts["q_value"], errors="coerce")
                .groupby(shifts["signature"].astype(str))
                .min()
            )
            sig_names.sort(
                key=lambda n: best.get(n, np.inf) if pd.notna(best.get(n, np.nan)) else np.inf
            )
            s.note("Signatures in order of their smallest q-value (most significant shift first).")
        for sig in sig_names:
            figs.add(
                s,
                f"signature_means_{sig}",
                f"{sig}: mean score of each donor's cells per cell type and timepoint (grey: one line "
                f"per donor, paired across timepoints; black: their mean; faint dotted: donor x "
                f"timepoint means with too few cells, left out of the tests). Titles: paired-test q "
                f"per contrast (* q < {thr:g}, ** q < {thr / 10:g}).",
                lambda sig=sig: F.paired_means(
                    means, sig, timepoints, shifts, q_threshold=thr, max_panels=rc.max_panels
                ),
            )
    else:
        s.note(
            "tables/signature_means.tsv is absent: no per-donor signature means.", kind="missing"
        )

    # 6 differential -------------------------------------------------------------
    s = sections["differential"]
    if shifts is not None:
        use_dz = (
            "dz" in shifts.columns and pd.to_numeric(shifts["dz"], errors="coerce").notna().any()
        )
        value, label = (
            ("dz", "paired effect size dz") if use_dz else ("effect", "mean score difference")
        )
        figs.add(
            s,
            "signature_shift_heatmap",
            f"Signature shifts per contrast: colour = {label} (test minus reference, per donor), "
            f"* q < {thr:g}, ** q < {thr / 10:g} (BH over cell types × signatures). Grey: not tested.",
            lambda: F.effect_heatmap(
                shifts, value=value, value_label=label, contrasts=contrasts, q_threshold=thr
            ),
        )
        s.table(
            _table(
                shifts.sort_values("q_value", na_position="last"),
                [
                    "contrast",
                    "cell_type",
                    "signature",
                    "test",
                    "n_donors",
                    "mean_reference",
                    "mean_test",
                    "effect",
                    "dz",
                    "ci_low",
                    "ci_high",
                    "p_value",
                    "q_value",
                    "p_wilcoxon",
                    "donors_dropped",
                ],
                caption=f"Signature shifts (tables/signature_shifts.tsv; highlighted: q < {thr:g})",
                q_threshold=thr,
                collapsed=True,
            )
        )
    else:
        s.note("tables/signature_shifts.tsv is absent: signatures were not tested.", kind="missing")
    s.heading("Pseudobulk differential expression")
    de_summary = tables.get("pseudobulk_de_summary")
    if pseudobulk_obs is not None and len(pseudobulk_obs):
        s.note(
            f"{len(pseudobulk_obs):,} pseudobulk profiles (cell type × donor × timepoint) entered the tests."
        )
    if tables.pseudobulk_de:
        de_contrasts = [c for c in contrasts if any(k[1] == c for k in tables.pseudobulk_de)]
        de_contrasts += sorted({k[1] for k in tables.pseudobulk_de} - set(de_contrasts))
        for con in de_contrasts:
            pairs = {ct: d for (ct, c), d in sorted(tables.pseudobulk_de.items()) if c == con}
            figs.add(
                s,
                f"volcano_{con}",
                f"Pseudobulk DE, {_contrast_label(con)}: one panel per tested cell type; red: q < {thr:g}.",
                lambda pairs=pairs, con=con: F.volcano_grid(
                    pairs, title=_contrast_label(con), q_threshold=thr, max_panels=rc.max_panels
                ),
            )
    else:
        s.note("No pseudobulk DE tables (tables/pseudobulk_de/): DE was not run.", kind="missing")
    if de_summary is not None:
        s.table(
            _table(
                de_summary,
                caption="Pseudobulk DE per cell type and contrast (tables/pseudobulk_de_summary.tsv)",
                collapsed=True,
            )
        )
    s.heading("Signature enrichment in the DE results")
    enr = tables.get("signature_enrichment")
    if enr is not None:
        figs.add(
            s,
            "signature_enrichment_heatmap",
            f"Enrichment of each signature in the pseudobulk DE statistics: colour = score, "
            f"* q < {thr:g}, ** q < {thr / 10:g}.",
            lambda: F.effect_heatmap(
                enr,
                value="score",
                value_label="enrichment score",
                contrasts=contrasts,
                q_threshold=thr,
            ),
        )
        s.table(
            _table(
                enr.sort_values("q_value", na_position="last"),
                caption="tables/signature_enrichment.tsv",
                q_threshold=thr,
                collapsed=True,
            )
        )
    else:
        s.note(
            "tables/signature_enrichment.tsv is absent: no enrichment was computed.", kind="missing"
        )
    s.heading("Covariate associations")
    cov = tables.get("covariate_associations")
    if cov is not None and len(cov):
        figs.add(
            s,
            "covariate_associations",
            f"Covariate associations with the smallest q (red: q < {thr:g}); slope with 95% CI.",
            lambda: F.covariate_forest(cov, q_threshold=thr),
        )
        s.table(
            _table(
                cov.sort_values("q_value", na_position="last"),
                caption="tables/covariate_associations.tsv",
                q_threshold=thr,
                collapsed=True,
            )
        )
    else:
        s.note(
            "No covariate associations: no covariate was given in the configuration "
            "(tables/covariate_associations.tsv is absent).",
            kind="missing",
        )
    dropped = tables.get("differential_dropped")
    if dropped is not None and len(dropped):
        by = dropped.groupby(["analysis", "reason"], dropna=False).size().rename("n").reset_index()
        s.table(
            _table(by, caption="Left out of the tests, by reason (tables/differential_dropped.tsv)")
        )

    # 7 provenance ---------------------------------------------------------------
    s = sections["provenance"]
    s.table(
        _Table(
            ["item", "value"],
            [
                ["command", " ".join(map(str, provenance.get("command", [])))],
                ["seed", str(provenance.get("seed", ""))],
                ["device", json.dumps(provenance.get("device", {}), sort_keys=True)],
                ["config digest", str(provenance.get("config_digest", ""))],
                ["config file", str(provenance.get("config_path") or "(defaults)")],
                [
                    "sample sheet",
                    f"{provenance.get('samplesheet', {}).get('path', '')}  sha256 "
                    f"{provenance.get('samplesheet', {}).get('sha256', '')}",
                ],
                ["machine", json.dumps(provenance.get("machine", {}), sort_keys=True)],
            ],
            [""] * 7,
            caption="Run",
        )
    )
    if stages:
        figs.add(
            s,
            "stage_resources",
            "Wall time and peak resident memory of each stage (from its stamp).",
            lambda: F.stage_resources(stages),
        )
        rows = [
            [
                name,
                _fmt(_num(v.get("wall_s"))),
                _fmt(_num(v.get("peak_rss_mb"))),
                str(v.get("status", "")),
                str(v.get("finished", "")),
                str(v.get("host", "")),
            ]
            for name, v in stages.items()
        ]
        s.table(
            _Table(
                ["stage", "wall s", "peak RSS MB", "status", "finished", "host"],
                rows,
                [""] * len(rows),
                "Stages",
            )
        )
    pk = provenance.get("packages", {})
    s.table(
        _Table(
            ["package", "version"],
            [[k, str(v) if v else "not installed"] for k, v in pk.items()],
            [""] * len(pk),
            "Package versions",
            collapsed=True,
        )
    )
    inputs = provenance.get("inputs", [])
    s.table(
        _Table(
            ["sample", "path", "sha256"],
            [[str(i.get("sample")), str(i.get("path")), str(i.get("sha256"))] for i in inputs],
            [""] * len(inputs),
            "Input files and their SHA-256",
            collapsed=True,
        )
    )
    s.pre(str(provenance.get("config_yaml", "")), summary="Full effective configuration (YAML)")
    warns = list(provenance.get("warnings", []))
    if warns:
        s.table(
            _Table(
                ["warning"],
                [[w] for w in warns],
                [""] * len(warns),
                f"{len(warns)} warnings raised during the run",
                collapsed=len(warns) > 10,
            )
        )
    else:
        s.note("No warnings were raised during the run.")

    figs.draw()
    findings = key_findings(tables, q_threshold=thr, max_findings=rc.max_findings)
    html_text = _render(
        title=rc.title,
        provenance=provenance,
        facts=facts,
        sections=[sections[sid] for sid, _ in SECTIONS],
        findings=findings,
        contrasts=contrasts,
        q_threshold=thr,
        has_shifts=shifts is not None,
    )
    return RenderedReport(html_text, figs.files, findings)


def _marker_tables(
    adata: AnnData, cfg: Config, types: Sequence[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean / fraction of the first 3 present positive panel markers of each label."""
    from ..markers import load_marker_panel

    panel = load_marker_panel(cfg.annotate.markers)
    present = set(map(str, adata.var_names))
    markers: dict[str, list[str]] = {}
    children: dict[str, list[str]] = {}
    for ct in panel.cell_types:
        if ct.parent:
            children.setdefault(ct.parent, []).append(ct.name)
    for t in types:
        if t in panel:
            cands = panel[t].positive
        elif t in children:
            cands = tuple(m for c in children[t] for m in panel[c].positive)
        else:
            continue
        hits = [m.match(present) for m in cands]
        markers[t] = [h for h in dict.fromkeys(hits) if h][:3]
    markers = {t: g for t, g in markers.items() if g}
    return marker_expression(adata, markers, chunk_size=cfg.chunk_size)


def _render(
    *,
    title: str,
    provenance: Mapping[str, Any],
    facts: list[tuple[str, str]],
    sections: list[_Section],
    findings: dict[str, dict[str, Any]],
    contrasts: list[str],
    q_threshold: float,
    has_shifts: bool,
) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    css = (TEMPLATES / "report.css").read_text(encoding="utf-8")
    ordered = [c for c in contrasts if c in findings] + [c for c in findings if c not in contrasts]
    return env.get_template("report.html.j2").render(
        title=title,
        css=css,
        generated=datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        version=provenance.get("version", ""),
        facts=facts,
        sections=sections,
        findings=[(c, _contrast_label(c), findings[c]) for c in ordered],
        contrasts=[(c, _contrast_label(c)) for c in contrasts],
        q_threshold=q_threshold,
        has_shifts=has_shifts,
    )
