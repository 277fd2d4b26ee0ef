"""The QC report: one self-contained HTML page written by the ``qc`` stage.

Every run writes ``<outdir>/qc_report.html`` as soon as QC is done, so a pilot
run (``immuneage run --qc-only``) or the first hour of a long run already shows
what each sample lost and why, before scVI starts. The full report
(``report.html``) repeats these figures next to everything else.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Sequence

import matplotlib.pyplot as plt
import pandas as pd

from .. import __version__, keys
from . import figures as F
from .render import encode_figure

__all__ = ["qc_report_html"]

_COLUMNS = {
    keys.SAMPLE: "sample",
    keys.DONOR: "donor",
    keys.TIMEPOINT: "timepoint",
    "cells_in": "cells in",
    "removed_counts": "low/high counts",
    "removed_genes": "low/high genes",
    "removed_mt": "high % mito",
    "doublets": "doublets",
    "cells_out": "cells kept",
    "dropped": "dropped",
}

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em}td,th{border-bottom:1px solid #ddd;padding:3px 8px;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
tr.dropped td{color:#b00}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
img{max-width:100%}.note{color:#555;font-size:.9em}
"""


def _figure(fig: plt.Figure, caption: str) -> str:
    data = base64.b64encode(encode_figure(fig, "png", 100)).decode("ascii")
    plt.close(fig)
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def qc_report_html(
    qc: pd.DataFrame,
    obs: pd.DataFrame,
    *,
    timepoints: Sequence[str] | None = None,
    max_cells_per_sample: int = 3000,
    seed: int = 0,
    title: str = "immuneage QC report",
) -> str:
    """A self-contained HTML page on QC: the per-sample table and two figures.

    Parameters
    ----------
    qc
        The ``qc_per_sample`` table (one row per sample, as the ``qc`` stage writes it).
    obs
        Every cell's QC ``obs`` (``sample``, ``timepoint``, ``total_counts``,
        ``n_genes_by_counts``, ``pct_counts_mt``).
    timepoints
        Timepoint order for the colours.
    max_cells_per_sample
        Each sample's distribution is drawn from a seeded subset of at most this many cells.
    seed
        Seed of those subsets.
    title
        Page title.

    Returns
    -------
    The HTML text (figures embedded as PNG; no external file is referenced).
    """
    n_in = int(qc["cells_in"].sum()) if len(qc) else 0
    n_out = int(qc["cells_out"].sum()) if len(qc) else 0
    dropped = [str(s) for s, d in zip(qc[keys.SAMPLE], qc.get("dropped", []), strict=False) if d]
    summary = (
        f"{len(qc)} sample(s), {qc[keys.DONOR].nunique() if len(qc) else 0} donor(s): "
        f"{n_out:,} of {n_in:,} cells kept ({100 * n_out / max(n_in, 1):.1f}%)"
    )
    if dropped:
        summary += f"; dropped sample(s): {', '.join(dropped)}"
    cols = [c for c in _COLUMNS if c in qc.columns]
    head = "".join(f"<th>{html.escape(_COLUMNS[c])}</th>" for c in cols)
    rows = []
    for _, r in qc.iterrows():
        cls = ' class="dropped"' if bool(r.get("dropped", False)) else ""
        cells = "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in cols)
        rows.append(f"<tr{cls}>{cells}</tr>")
    figs = [
        _figure(
            F.qc_cells(qc),
            "Cells kept and removed per sample (left); % of each sample's cells removed by "
            "each reason (right; a cell can fail several).",
        ),
        _figure(
            F.qc_distributions(
                obs,
                qc,
                max_cells_per_sample=max_cells_per_sample,
                seed=seed,
                timepoints=timepoints,
            ),
            f"Per-sample distributions before filtering (boxes from at most "
            f"{max_cells_per_sample:,} cells per sample); red ticks: that sample's thresholds.",
        ),
    ]
    stamp = time.strftime("%Y-%m-%d %H:%M")
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}.</p>"
        f"<p class='note'>Thresholds, rules and doublet calls per sample are in "
        f"tables/qc_per_sample.tsv; the full run's report.html repeats these figures. "
        f"immuneage {html.escape(__version__)}, {stamp}.</p>"
        f"<h2>Cells per sample</h2><table><tr>{head}</tr>{''.join(rows)}</table>"
        f"<h2>Figures</h2>{''.join(figs)}</body></html>"
    )
