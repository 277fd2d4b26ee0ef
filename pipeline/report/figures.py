"""The report's figures: one function per figure, each returning a matplotlib Figure.

Every function is pure over DataFrames (or arrays) and draws on its own Agg
canvas (pyplot's global backend is neither used nor changed), so figures can be made on a headless node and tested without a
display. Large inputs are reduced before drawing, never silently truncated:
UMAP scatters draw a seeded subset (:func:`subsample_index`), QC distributions a
seeded subset per sample, and small multiples stop at ``max_panels`` panels
with the left-out count in the title.

Column names are those documented in ``docs/outputs.md``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from .. import keys

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from matplotlib.axes import Axes

__all__ = [
    "categorical_colors",
    "cohort_matrix",
    "composition_lines",
    "covariate_forest",
    "effect_heatmap",
    "integration_metrics",
    "marker_dotplot",
    "paired_means",
    "qc_cells",
    "qc_distributions",
    "sample_handling",
    "scvi_history",
    "signature_coverage",
    "stage_resources",
    "subsample_index",
    "umap_panels",
    "volcano_grid",
]

#: Distinct colours for up to 20 categories (tab20 reordered: dark shades first).
_TAB20 = [plt.get_cmap("tab20")(i) for i in [*range(0, 20, 2), *range(1, 20, 2)]]
#: Colour of the mean line drawn over per-donor lines.
MEAN_COLOR = "#111111"
#: Colour of a significant result (q below the threshold) and of a non-significant one.
SIG_COLOR, NS_COLOR = "#c0392b", "#9a9a9a"
#: Categories above which a legend is left out (the caption says so).
MAX_LEGEND = 40


def _figure(width: float, height: float) -> Figure:
    """A new figure on an Agg canvas, outside pyplot's global state (nothing to close, no leaks)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def categorical_colors(categories: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """One colour per category: tab20 up to 20, then evenly spaced hues of ``hsv``.

    Parameters
    ----------
    categories
        Category names in display order.

    Returns
    -------
    Category -> RGBA tuple.
    """
    cats = list(categories)
    if len(cats) <= len(_TAB20):
        return {c: _TAB20[i] for i, c in enumerate(cats)}
    cmap = plt.get_cmap("hsv")
    return {c: cmap(i / len(cats)) for i, c in enumerate(cats)}


def subsample_index(n: int, max_n: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded random subset of ``min(n, max_n)`` of ``n`` items."""
    if n <= max_n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_n, replace=False))


def _grid(n_panels: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(ncols, n_panels))
    return math.ceil(n_panels / ncols), ncols


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_axis_off()


def _qstars(q: float, threshold: float) -> str:
    """``**`` below a tenth of the threshold, ``*`` below it, else empty."""
    if q is None or not np.isfinite(q):
        return ""
    if q < threshold / 10:
        return "**"
    if q < threshold:
        return "*"
    return ""


# --------------------------------------------------------------------------- run summary
def cohort_matrix(samples: pd.DataFrame, timepoints: Sequence[str]) -> Figure:
    """Donors x timepoints, each cell showing the cells of that sample.

    Parameters
    ----------
    samples
        One row per sample with ``donor``, ``timepoint``, ``n_cells`` (e.g. cells
        after QC).
    timepoints
        Timepoint levels in design order (columns).

    Returns
    -------
    A heatmap (log colour scale); missing samples are blank and marked ``-``.
    """
    donors = sorted(samples[keys.DONOR].astype(str).unique())
    mat = (
        samples.assign(**{keys.DONOR: samples[keys.DONOR].astype(str)})
        .pivot_table(
            index=keys.DONOR, columns=keys.TIMEPOINT, values="n_cells", aggfunc="sum", observed=True
        )
        .reindex(index=donors, columns=list(timepoints))
    )
    n = len(donors)
    fig = _figure(1.6 + 1.1 * len(timepoints), min(1.4 + 0.28 * n, 40))
    ax = fig.add_subplot()
    vals = mat.to_numpy(dtype=float)
    shown = np.log10(np.where(np.isfinite(vals) & (vals > 0), vals, np.nan))
    im = ax.imshow(shown, aspect="auto", cmap="Blues", vmin=0)
    if n <= 80:
        for i in range(n):
            for j in range(len(timepoints)):
                v = vals[i, j]
                text = "-" if not np.isfinite(v) else f"{int(v):,}"
                dark = np.isfinite(v) and shown[i, j] > 0.6 * np.nanmax(shown)
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
        ax.set_yticks(range(n), donors, fontsize=8)
    else:
        ax.set_yticks([])
        ax.set_ylabel(f"{n} donors")
    ax.set_xticks(range(len(timepoints)), list(timepoints))
    ax.xaxis.tick_top()
    cb = fig.colorbar(im, ax=ax, shrink=0.6)
    cb.set_label("log10 cells")
    return fig


def stage_resources(stages: Mapping[str, Mapping[str, object]]) -> Figure:
    """Wall time and peak memory of each stage (from ``provenance.json`` ``stages``).

    Parameters
    ----------
    stages
        Stage name -> mapping with ``wall_s`` and ``peak_rss_mb`` (None allowed).

    Returns
    -------
    Two horizontal bar panels.
    """
    names = list(stages)
    wall = [float(stages[s].get("wall_s") or 0.0) for s in names]
    mem = [float(stages[s].get("peak_rss_mb") or 0.0) for s in names]
    fig = _figure(9, 1.0 + 0.32 * max(len(names), 1))
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(names))
    ax1.barh(y, wall, color="#4c72b0")
    ax1.set_yticks(y, names)
    ax1.invert_yaxis()
    ax1.set_xlabel("wall time (s)")
    ax2.barh(y, mem, color="#dd8452")
    ax2.set_xlabel("peak RSS (MB)")
    for ax, vals, fmt in ((ax1, wall, "{:.1f}"), (ax2, mem, "{:.0f}")):
        for yi, v in zip(y, vals, strict=True):
            ax.text(v, yi, " " + fmt.format(v), va="center", fontsize=8)
        ax.margins(x=0.18)
    return fig


# --------------------------------------------------------------------------- QC
_REASONS = {
    "removed_counts": "counts",
    "removed_genes": "genes",
    "removed_mt": "% mito",
    "doublets": "doublets",
}


def qc_cells(qc: pd.DataFrame) -> Figure:
    """Per sample: cells kept and removed, and the share removed by each reason.

    Parameters
    ----------
    qc
        ``tables/qc_per_sample.tsv``: ``sample``, ``cells_in``, ``cells_out``,
        ``removed_counts``, ``removed_genes``, ``removed_mt``, ``doublets``
        (and optionally ``dropped``).

    Returns
    -------
    Left: stacked bars kept / removed; right: % of cells removed per reason
    (the doublet column is the doublet rate). Dropped samples are labelled.
    """
    qc = qc.reset_index(drop=True)
    n = len(qc)
    fig = _figure(11, min(1.5 + 0.2 * n, 40))
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.4, 1])
    y = np.arange(n)
    kept = qc["cells_out"].to_numpy(dtype=float)
    removed = qc["cells_in"].to_numpy(dtype=float) - kept
    ax1.barh(y, kept, color="#4c72b0", label="kept")
    ax1.barh(y, removed, left=kept, color="#c44e52", label="removed")
    labels = [
        f"{s} (dropped)" if bool(d) else str(s)
        for s, d in zip(
            qc[keys.SAMPLE], qc.get("dropped", pd.Series(False, index=qc.index)), strict=True
        )
    ]
    show_labels = n <= 150
    ax1.set_yticks(y, labels if show_labels else [""] * n, fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xlabel("cells")
    ax1.legend(loc="lower right", fontsize=8)
    cols = [c for c in _REASONS if c in qc.columns]
    pct = (
        100
        * qc[cols].to_numpy(dtype=float)
        / np.maximum(qc["cells_in"].to_numpy(float), 1)[:, None]
    )
    im = ax2.imshow(pct, aspect="auto", cmap="Reds", vmin=0)
    ax2.set_xticks(range(len(cols)), [_REASONS[c] for c in cols])
    ax2.xaxis.tick_top()
    ax2.set_yticks([])
    if n <= 60:
        for i in range(n):
            for j in range(len(cols)):
                if np.isfinite(pct[i, j]):
                    ax2.text(j, i, f"{pct[i, j]:.1f}", ha="center", va="center", fontsize=6.5)
    fig.colorbar(im, ax=ax2, shrink=0.5).set_label("% of cells in")
    return fig


_QC_METRICS = {
    "total_counts": ("total counts", True, ("min_counts", "max_counts")),
    "n_genes_by_counts": ("genes detected", True, ("min_genes", "max_genes")),
    "pct_counts_mt": ("% mitochondrial", False, (None, "max_pct_mt")),
}


def qc_distributions(
    obs: pd.DataFrame,
    qc: pd.DataFrame | None = None,
    *,
    max_cells_per_sample: int = 5000,
    seed: int = 0,
    timepoints: Sequence[str] | None = None,
) -> Figure:
    """Distributions of counts, genes and % mitochondrial reads per sample.

    Parameters
    ----------
    obs
        Cells with ``sample``, ``timepoint`` and any of ``total_counts``,
        ``n_genes_by_counts``, ``pct_counts_mt``.
    qc
        ``qc_per_sample.tsv``; its thresholds are drawn as short red ticks.
    max_cells_per_sample
        Each sample's box is drawn from a seeded subset of at most this many cells.
    seed
        Seed of the subsets.
    timepoints
        Timepoint order for the box colours.

    Returns
    -------
    One row of box plots per metric (log axis for counts and genes).
    """
    metrics = [m for m in _QC_METRICS if m in obs.columns]
    samples = list(pd.unique(obs[keys.SAMPLE].astype(str)))
    if qc is not None:
        order = [s for s in qc[keys.SAMPLE].astype(str) if s in set(samples)]
        samples = order + [s for s in samples if s not in set(order)]
    tps = (
        list(timepoints)
        if timepoints is not None
        else list(pd.unique(obs[keys.TIMEPOINT].astype(str)))
    )
    colors = categorical_colors(tps)
    sample_tp = (
        obs.groupby(obs[keys.SAMPLE].astype(str), observed=True)[keys.TIMEPOINT].first().astype(str)
    )
    rng = np.random.default_rng(seed)
    groups = obs.groupby(obs[keys.SAMPLE].astype(str), observed=True).indices
    picked: dict[str, np.ndarray] = {}
    for s in samples:
        idx = groups.get(s, np.array([], dtype=int))
        if len(idx) > max_cells_per_sample:
            idx = np.sort(rng.choice(idx, size=max_cells_per_sample, replace=False))
        picked[s] = idx
    n = len(samples)
    fig = _figure(min(3 + 0.28 * n, 60), 2.3 * max(len(metrics), 1) + 0.8)
    axes = np.atleast_1d(fig.subplots(max(len(metrics), 1), 1, sharex=True))
    if not metrics:
        _empty(axes[0], "no QC metrics in obs")
        return fig
    thr = qc.set_index(qc[keys.SAMPLE].astype(str)) if qc is not None else None
    for ax, m in zip(axes, metrics, strict=True):
        label, log, (lo_col, hi_col) = _QC_METRICS[m]
        vals = obs[m].to_numpy(dtype=float)
        data = [vals[picked[s]] for s in samples]
        if log:
            data = [np.maximum(d, 1.0) for d in data]
        bp = ax.boxplot(data, widths=0.6, showfliers=False, patch_artist=True)
        for patch, s in zip(bp["boxes"], samples, strict=True):
            patch.set_facecolor(colors.get(sample_tp.get(s, ""), "#cccccc"))
            patch.set_alpha(0.8)
        if thr is not None:
            for i, s in enumerate(samples, 1):
                if s not in thr.index:
                    continue
                for col in (lo_col, hi_col):
                    if col and col in thr.columns and pd.notna(thr.at[s, col]):
                        ax.plot([i - 0.35, i + 0.35], [thr.at[s, col]] * 2, color="#d62728", lw=1.2)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(label)
    axes[-1].set_xticks(range(1, n + 1), samples if n <= 150 else [""] * n, rotation=90, fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[t]) for t in tps]
    handles.append(plt.Line2D([0], [0], color="#d62728", lw=1.2))
    axes[0].legend(handles, [*tps, "threshold"], ncol=len(tps) + 1, fontsize=8, loc="upper right")
    return fig


# --------------------------------------------------------------------------- integration
def umap_panels(
    coords: np.ndarray,
    obs: pd.DataFrame,
    columns: Sequence[str],
    *,
    max_cells: int = 50000,
    seed: int = 0,
    orders: Mapping[str, Sequence[str]] | None = None,
    label_on_data: Sequence[str] = (),
) -> Figure:
    """UMAP coloured by each of ``columns`` (one panel each).

    Parameters
    ----------
    coords
        ``obsm["X_umap"]`` (cells x 2).
    obs
        Cell metadata holding ``columns`` (categorical).
    columns
        obs columns to colour by.
    max_cells
        A seeded random subset of at most this many cells is drawn, in random
        order so no category paints over another.
    seed
        Seed of the subset and the drawing order.
    orders
        Optional category order per column (legend order).
    label_on_data
        Columns whose categories are also written at their median position.

    Returns
    -------
    The figure; the subset size is in each panel's title when cells were left out.
    """
    n = coords.shape[0]
    idx = subsample_index(n, max_cells, seed)
    idx = np.random.default_rng(seed + 1).permutation(idx)
    xy = np.asarray(coords)[idx, :2]
    ncols = min(3, max(len(columns), 1))
    fig = _figure(5.2 * ncols, 5.0)
    axes = np.atleast_1d(fig.subplots(1, ncols))
    size = float(np.clip(60000 / max(len(idx), 1), 0.3, 12))
    for ax, col in zip(axes, columns, strict=False):
        values = obs[col].astype(str).to_numpy()[idx]
        cats = list(orders[col]) if orders and col in orders else sorted(set(values))
        cats = [c for c in cats if c in set(values)]
        colors = categorical_colors(cats)
        rgba = np.array([colors[v] for v in values]) if len(values) else np.zeros((0, 4))
        ax.scatter(xy[:, 0], xy[:, 1], c=rgba, s=size, linewidths=0, rasterized=True)
        title = f"by {col}"
        if len(idx) < n:
            title += f" ({len(idx):,} of {n:,} cells)"
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP1")
        ax.set_ylabel("UMAP2")
        if col in label_on_data:
            for c in cats:
                m = values == c
                cx, cy = np.median(xy[m, 0]), np.median(xy[m, 1])
                ax.text(
                    cx,
                    cy,
                    c,
                    fontsize=7,
                    ha="center",
                    va="center",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7, "lw": 0},
                )
        if len(cats) <= MAX_LEGEND:
            handles = [plt.Line2D([0], [0], marker="o", ls="", color=colors[c], ms=5) for c in cats]
            ax.legend(
                handles,
                cats,
                fontsize=6.5,
                loc="upper center",
                bbox_to_anchor=(0.5, -0.06),
                ncol=min(4, max(1, math.ceil(len(cats) / 6))),
                frameon=False,
            )
        else:
            ax.text(
                0.5,
                -0.06,
                f"{len(cats)} categories (legend left out)",
                ha="center",
                va="top",
                transform=ax.transAxes,
                fontsize=8,
            )
    for ax in axes[len(columns) :]:
        ax.set_axis_off()
    return fig


def integration_metrics(metrics: pd.DataFrame) -> Figure:
    """Integration metrics of ``X_pca`` vs ``X_scVI`` side by side.

    Parameters
    ----------
    metrics
        ``tables/integration_metrics.tsv``: ``representation``, ``metric``,
        ``value``, ``kind``.

    Returns
    -------
    Grouped bars, one group per metric, batch-mixing metrics first.
    """
    kind_order = {"batch_mixing": 0, "bio_conservation": 1}
    order = (
        metrics.drop_duplicates("metric")
        .assign(_k=lambda d: d["kind"].map(kind_order).fillna(2))
        .sort_values(["_k"], kind="stable")["metric"]
        .tolist()
    )
    reps = list(pd.unique(metrics["representation"]))
    fig = _figure(1.5 + 1.1 * len(order), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / max(len(reps), 1)
    rep_colors = {"X_pca": "#9a9a9a", "X_scVI": "#4c72b0"}
    for i, rep in enumerate(reps):
        sub = metrics[metrics["representation"] == rep].set_index("metric")["value"]
        vals = [float(sub.get(m, np.nan)) for m in order]
        x = np.arange(len(order)) + (i - (len(reps) - 1) / 2) * width
        ax.bar(x, vals, width=width, label=rep, color=rep_colors.get(rep, _TAB20[i % 20]))
        for xi, v in zip(x, vals, strict=True):
            if np.isfinite(v):
                ax.text(xi, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    kinds = metrics.drop_duplicates("metric").set_index("metric")["kind"]
    ax.set_xticks(
        range(len(order)), [f"{m}\n({kinds[m].replace('_', ' ')})" for m in order], fontsize=8
    )
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("value (higher = better)")
    ax.legend(fontsize=8)
    return fig


def scvi_history(history: pd.DataFrame) -> Figure:
    """scVI training curve: ELBO (train and validation) and its terms per epoch.

    Parameters
    ----------
    history
        ``tables/scvi_history.tsv`` (``epoch`` plus the series scvi-tools logs).

    Returns
    -------
    Left: ELBO; right: reconstruction loss and local KL (and the KL weight).
    """
    fig = _figure(10, 3.4)
    ax1, ax2 = fig.subplots(1, 2)
    x = history["epoch"] if "epoch" in history.columns else np.arange(len(history))
    for col, style in (("elbo_train", "-"), ("elbo_validation", "--")):
        if col in history.columns:
            ax1.plot(x, history[col], style, label=col.replace("_", " "))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("ELBO (negative; lower = better)")
    ax1.legend(fontsize=8)
    for col in ("reconstruction_loss_train", "reconstruction_loss_validation"):
        if col in history.columns:
            ax2.plot(
                x, history[col], "-" if col.endswith("train") else "--", label=col.replace("_", " ")
            )
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("reconstruction loss")
    if "kl_local_train" in history.columns:
        twin = ax2.twinx()
        twin.plot(x, history["kl_local_train"], color="#55a868", label="KL local (train)")
        if "kl_weight" in history.columns:
            twin.plot(
                x,
                history["kl_weight"] * history["kl_local_train"].max(),
                ":",
                color="#8172b2",
                label="KL weight (scaled)",
            )
        twin.set_ylabel("KL local")
        twin.legend(fontsize=7, loc="center right")
    ax2.legend(fontsize=7, loc="upper right")
    return fig


# --------------------------------------------------------------------------- annotation
def marker_dotplot(mean_expr: pd.DataFrame, frac_expr: pd.DataFrame) -> Figure:
    """Marker dot plot: colour = mean expression, size = fraction of cells expressing.

    Parameters
    ----------
    mean_expr
        Cell types (rows) x marker genes (columns): mean log-normalised expression.
    frac_expr
        Same shape: fraction of the type's cells with a non-zero value.

    Returns
    -------
    The dot plot; each gene's colour is scaled to its maximum across types.
    """
    types, genes = list(mean_expr.index), list(mean_expr.columns)
    fig = _figure(min(2.5 + 0.24 * len(genes), 40), min(1.6 + 0.3 * len(types), 30))
    ax = fig.add_subplot()
    if not genes or not types:
        _empty(ax, "no marker genes of the panel in the data")
        return fig
    m = mean_expr.to_numpy(dtype=float)
    scaled = m / np.where(m.max(axis=0) > 0, m.max(axis=0), 1.0)
    f = frac_expr.reindex(index=types, columns=genes).to_numpy(dtype=float)
    yy, xx = np.meshgrid(np.arange(len(types)), np.arange(len(genes)), indexing="ij")
    sc = ax.scatter(
        xx.ravel(),
        yy.ravel(),
        s=5 + 120 * f.ravel(),
        c=scaled.ravel(),
        cmap="Reds",
        vmin=0,
        vmax=1,
        edgecolors="#444444",
        linewidths=0.3,
    )
    ax.set_xticks(range(len(genes)), genes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(types)), types, fontsize=8)
    ax.set_xlim(-0.7, len(genes) - 0.3)
    ax.set_ylim(len(types) - 0.5, -0.5)
    ax.grid(color="#eeeeee", lw=0.5)
    ax.set_axisbelow(True)
    fig.colorbar(sc, ax=ax, shrink=0.5).set_label("mean expr. (scaled per gene)")
    for frac in (0.25, 0.5, 1.0):
        ax.scatter([], [], s=5 + 120 * frac, c="#999999", label=f"{frac:.0%}")
    ax.legend(
        title="expressing",
        fontsize=7,
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.0, 0.0),
        frameon=False,
    )
    return fig


def _paired_panel(
    ax: Axes,
    wide: pd.DataFrame,
    timepoints: Sequence[str],
    *,
    title: str,
    ylabel: str,
    excluded: pd.DataFrame | None = None,
) -> None:
    """Per-donor lines across timepoints (grey) and their mean (black) on one axis.

    ``excluded`` (same layout as ``wide``): values left out of the tests (too few
    cells), drawn as faint open circles joined by dotted lines, not in the mean.
    """
    tps = [
        t
        for t in timepoints
        if t in wide.columns or (excluded is not None and t in excluded.columns)
    ]
    x = np.arange(len(tps))
    vals = wide.reindex(columns=tps).to_numpy(dtype=float)
    if excluded is not None and len(excluded):
        for row in excluded.reindex(columns=tps).to_numpy(dtype=float):
            ok = np.isfinite(row)
            ax.plot(x[ok], row[ok], ":o", color="#bbbbbb", mfc="none", lw=0.6, ms=2.5)
    for row in vals:
        ok = np.isfinite(row)
        ax.plot(x[ok], row[ok], "-o", color="#7f7f7f", alpha=0.55, lw=0.8, ms=2.5)
    if len(vals):
        ok = np.isfinite(vals)
        n = ok.sum(axis=0)
        mean = np.where(ok, vals, 0.0).sum(axis=0) / np.where(n > 0, n, 1)
        mean[n == 0] = np.nan
        ax.plot(x, mean, "-o", color=MEAN_COLOR, lw=2, ms=4)
    ax.set_xticks(x, tps, fontsize=7)
    ax.set_xlim(-0.3, len(tps) - 0.7)
    ax.set_title(title, fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_ylabel(ylabel, fontsize=7)


def _contrast_q_label(
    tests: pd.DataFrame | None, where: Mapping[str, str], threshold: float, short: Mapping[str, str]
) -> tuple[str, bool]:
    """``"acute q=0.03*, longterm q=0.8"`` for the rows of ``tests`` matching ``where``."""
    if tests is None or tests.empty:
        return "", False
    m = np.ones(len(tests), dtype=bool)
    for col, val in where.items():
        m &= tests[col].astype(str).to_numpy() == val
    parts, any_sig = [], False
    for _, r in tests[m].iterrows():
        q = float(r["q_value"]) if pd.notna(r["q_value"]) else float("nan")
        stars = _qstars(q, threshold)
        any_sig |= bool(stars)
        parts.append(f"{short.get(str(r['contrast']), r['contrast'])} q={q:.2g}{stars}")
    return ", ".join(parts), any_sig


def _short_contrasts(contrasts: Sequence[str]) -> dict[str, str]:
    """``acute_vs_baseline`` -> ``acute`` when every contrast shares its reference."""
    refs = {c.split("_vs_")[-1] for c in contrasts if "_vs_" in c}
    if len(refs) == 1 and all("_vs_" in c for c in contrasts):
        return {c: c.split("_vs_")[0] for c in contrasts}
    return {c: c for c in contrasts}


def _panel_order(
    names: Sequence[str], tests: pd.DataFrame | None, key: str, max_panels: int
) -> list[str]:
    """Keep ``names`` in order, or when too many the ``max_panels`` with the smallest q."""
    names = list(names)
    if len(names) <= max_panels:
        return names
    if tests is None or tests.empty:
        return names[:max_panels]
    best = tests.groupby(tests[key].astype(str))["q_value"].min()
    ranked = sorted(names, key=lambda n: (best.get(n, np.inf), names.index(n)))
    keep = set(ranked[:max_panels])
    return [n for n in names if n in keep]


def composition_lines(
    counts: pd.DataFrame,
    timepoints: Sequence[str],
    composition: pd.DataFrame | None = None,
    *,
    q_threshold: float = 0.1,
    max_panels: int = 48,
    ncols: int = 6,
) -> Figure:
    """Cell-type proportions per donor across timepoints, one panel per cell type.

    Parameters
    ----------
    counts
        ``tables/cell_type_counts.tsv`` (long: ``sample``, ``donor``,
        ``timepoint``, ``cell_type``, ``n_cells``).
    timepoints
        Timepoint levels in order (x axis).
    composition
        ``tables/composition.tsv``; each panel's title gets the q-value per
        contrast (``*`` below ``q_threshold``) and significant panels a red frame.
    q_threshold
        FDR threshold for the marks.
    max_panels
        At most this many cell types (smallest q first when there are more).
    ncols
        Panels per row.

    Returns
    -------
    Small multiples: a grey line per donor joining its timepoints, the mean in black.
    """
    c = counts.copy()
    c["_total"] = c.groupby(keys.SAMPLE)["n_cells"].transform("sum")
    c["prop"] = c["n_cells"] / c["_total"].where(c["_total"] > 0)
    types = [t for t in pd.unique(c[keys.CELL_TYPE].astype(str))]
    types = sorted(types, key=lambda t: (t == keys.UNASSIGNED, t))
    shown = _panel_order(types, composition, keys.CELL_TYPE, max_panels)
    short = (
        _short_contrasts(list(composition["contrast"].astype(str).unique()))
        if composition is not None and not composition.empty
        else {}
    )
    nrows, nc = _grid(len(shown), ncols)
    fig = _figure(2.3 * nc, 2.1 * nrows + 0.5)
    axes = np.atleast_1d(fig.subplots(nrows, nc, squeeze=False)).ravel()
    for ax, ct in zip(axes, shown, strict=False):
        sub = c[c[keys.CELL_TYPE].astype(str) == ct]
        wide = sub.pivot_table(
            index=keys.DONOR, columns=keys.TIMEPOINT, values="prop", aggfunc="mean", observed=True
        )
        wide = wide * 100
        label, sig = _contrast_q_label(composition, {keys.CELL_TYPE: ct}, q_threshold, short)
        _paired_panel(
            ax, wide, timepoints, title=f"{ct}\n{label}" if label else ct, ylabel="% of cells"
        )
        if sig:
            for spine in ax.spines.values():
                spine.set_edgecolor(SIG_COLOR)
                spine.set_linewidth(1.6)
    for ax in axes[len(shown) :]:
        ax.set_axis_off()
    if len(shown) < len(types):
        fig.suptitle(
            f"{len(shown)} of {len(types)} cell types shown (smallest q first)", fontsize=9
        )
    return fig


# --------------------------------------------------------------------------- signatures
def paired_means(
    means: pd.DataFrame,
    signature: str,
    timepoints: Sequence[str],
    shifts: pd.DataFrame | None = None,
    *,
    q_threshold: float = 0.1,
    max_panels: int = 48,
    ncols: int = 6,
) -> Figure:
    """One signature: per-donor mean score by timepoint, one panel per cell type.

    Parameters
    ----------
    means
        ``tables/signature_means.tsv``: ``donor``, ``timepoint``, ``cell_type``,
        ``signature``, ``n_cells``, ``mean_score`` (and ``passes_min_cells``:
        means with too few cells are drawn faint and dotted, outside the mean).
    signature
        The signature drawn.
    timepoints
        Timepoint levels in order.
    shifts
        ``tables/signature_shifts.tsv``: panel titles get the q-value per contrast,
        significant panels a red frame.
    q_threshold
        FDR threshold for the marks.
    max_panels
        At most this many cell types (smallest q first when there are more).
    ncols
        Panels per row.

    Returns
    -------
    Small multiples with a grey line per donor (paired across timepoints) and the mean in black.
    """
    sub = means[means["signature"].astype(str) == signature]
    tests = shifts[shifts["signature"].astype(str) == signature] if shifts is not None else None
    types = sorted(pd.unique(sub[keys.CELL_TYPE].astype(str)))
    shown = _panel_order(types, tests, keys.CELL_TYPE, max_panels)
    short = (
        _short_contrasts(list(tests["contrast"].astype(str).unique()))
        if tests is not None and not tests.empty
        else {}
    )
    nrows, nc = _grid(max(len(shown), 1), ncols)
    fig = _figure(2.3 * nc, 2.1 * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, nc, squeeze=False)).ravel()
    if not shown:
        _empty(axes[0], f"no per-donor means for {signature}")
    for ax, ct in zip(axes, shown, strict=False):
        d = sub[sub[keys.CELL_TYPE].astype(str) == ct]
        passes = (
            d["passes_min_cells"].astype(str).str.lower().eq("true").to_numpy()
            if "passes_min_cells" in d.columns
            else np.ones(len(d), dtype=bool)
        )
        wide, excluded = (
            d[m].pivot_table(
                index=keys.DONOR,
                columns=keys.TIMEPOINT,
                values="mean_score",
                aggfunc="mean",
                observed=True,
            )
            for m in (passes, ~passes)
        )
        label, sig = _contrast_q_label(tests, {keys.CELL_TYPE: ct}, q_threshold, short)
        _paired_panel(
            ax,
            wide,
            timepoints,
            title=f"{ct}\n{label}" if label else ct,
            ylabel="mean score",
            excluded=excluded,
        )
        if sig:
            for spine in ax.spines.values():
                spine.set_edgecolor(SIG_COLOR)
                spine.set_linewidth(1.6)
    for ax in axes[max(len(shown), 1) :]:
        ax.set_axis_off()
    title = f"signature {signature}"
    if len(shown) < len(types):
        title += f" ({len(shown)} of {len(types)} cell types, smallest q first)"
    fig.suptitle(title, fontsize=10)
    return fig


def signature_coverage(coverage: pd.DataFrame) -> Figure:
    """Genes of each signature found in the data vs missing.

    Parameters
    ----------
    coverage
        ``tables/signature_coverage.tsv``: ``signature``, ``n_genes``,
        ``n_found``, ``n_missing``, ``status``.

    Returns
    -------
    Stacked horizontal bars; skipped sets are labelled.
    """
    cov = coverage.reset_index(drop=True)
    n = len(cov)
    fig = _figure(7.5, 1.0 + 0.3 * max(n, 1))
    ax = fig.add_subplot()
    y = np.arange(n)
    found = cov["n_found"].to_numpy(dtype=float)
    missing = cov["n_missing"].to_numpy(dtype=float)
    ax.barh(y, found, color="#4c72b0", label="found")
    ax.barh(y, missing, left=found, color="#dddddd", label="missing", edgecolor="#999999", lw=0.5)
    labels = [
        f"{s} (skipped)" if str(st) != "scored" else str(s)
        for s, st in zip(
            cov["signature"], cov.get("status", pd.Series("scored", index=cov.index)), strict=True
        )
    ]
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    for yi, f, t in zip(y, found, found + missing, strict=True):
        ax.text(t, yi, f" {int(f)}/{int(t)}", va="center", fontsize=7)
    ax.margins(x=0.12)
    ax.set_xlabel("genes in set")
    ax.legend(fontsize=8, loc="lower right")
    return fig


# --------------------------------------------------------------------------- differential
def effect_heatmap(
    table: pd.DataFrame,
    *,
    value: str,
    value_label: str,
    contrasts: Sequence[str] | None = None,
    q_threshold: float = 0.1,
) -> Figure:
    """Cell type x signature heatmap of an effect per contrast, with q-value marks.

    Parameters
    ----------
    table
        Long table with ``contrast``, ``cell_type``, ``signature``, ``value``
        and ``q_value`` (``signature_shifts.tsv`` or ``signature_enrichment.tsv``).
    value
        Column coloured (e.g. ``dz``, ``effect`` or ``score``).
    value_label
        Colour-bar label.
    contrasts
        Contrasts in panel order (default: order of appearance).
    q_threshold
        ``*``: q < threshold, ``**``: q < threshold / 10.

    Returns
    -------
    One panel per contrast on a shared, zero-centred diverging colour scale.
    """
    cons = (
        list(contrasts) if contrasts is not None else list(pd.unique(table["contrast"].astype(str)))
    )
    cons = [c for c in cons if (table["contrast"].astype(str) == c).any()] or cons
    types = sorted(pd.unique(table[keys.CELL_TYPE].astype(str)))
    sigs = list(pd.unique(table["signature"].astype(str)))
    vals = pd.to_numeric(table[value], errors="coerce").to_numpy(dtype=float)
    vmax = float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax)
    fig = _figure(
        min(1.8 + (0.42 * len(sigs) + 0.6) * max(len(cons), 1), 40), min(1.8 + 0.3 * len(types), 30)
    )
    axes = np.atleast_1d(fig.subplots(1, max(len(cons), 1), sharey=True, squeeze=False)).ravel()
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#f0f0f0")
    im = None
    for ax, con in zip(axes, cons, strict=False):
        sub = table[table["contrast"].astype(str) == con]
        mat = sub.pivot_table(
            index=keys.CELL_TYPE, columns="signature", values=value, aggfunc="first", observed=True
        ).reindex(index=types, columns=sigs)
        qm = sub.pivot_table(
            index=keys.CELL_TYPE,
            columns="signature",
            values="q_value",
            aggfunc="first",
            observed=True,
        ).reindex(index=types, columns=sigs)
        im = ax.imshow(
            np.ma.masked_invalid(mat.to_numpy(dtype=float)), cmap=cmap, norm=norm, aspect="auto"
        )
        q = qm.to_numpy(dtype=float)
        for i in range(len(types)):
            for j in range(len(sigs)):
                stars = _qstars(q[i, j], q_threshold)
                if stars:
                    ax.text(j, i, stars, ha="center", va="center", fontsize=9, fontweight="bold")
        ax.set_xticks(range(len(sigs)), sigs, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(types)), types, fontsize=8)
        ax.set_title(con.replace("_", " "), fontsize=10)
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.6).set_label(value_label)
    return fig


def volcano_grid(
    de: Mapping[str, pd.DataFrame],
    *,
    title: str,
    q_threshold: float = 0.1,
    max_panels: int = 48,
    ncols: int = 4,
    n_labels: int = 5,
) -> Figure:
    """Volcano plots of pseudobulk DE, one panel per cell type (one contrast).

    Parameters
    ----------
    de
        Cell type -> DE table (``gene``, ``log2fc``, ``p_value``, ``q_value``);
        only the tested pairs should be given.
    title
        Figure title (the contrast).
    q_threshold
        Genes with ``q_value`` below it are coloured and counted.
    max_panels
        At most this many panels (those with most significant genes first).
    ncols
        Panels per row.
    n_labels
        The significant genes with the smallest q are labelled, this many per panel.

    Returns
    -------
    Small multiples: log2 fold change vs -log10 p.
    """
    names = list(de)
    n_sig = {
        k: int((pd.to_numeric(v["q_value"], errors="coerce") < q_threshold).sum())
        for k, v in de.items()
    }
    if len(names) > max_panels:
        keep = set(sorted(names, key=lambda k: -n_sig[k])[:max_panels])
        names = [k for k in names if k in keep]
    nrows, nc = _grid(max(len(names), 1), ncols)
    fig = _figure(3.0 * nc, 2.7 * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, nc, squeeze=False)).ravel()
    if not names:
        _empty(axes[0], "no cell type was tested")
    for ax, name in zip(axes, names, strict=False):
        d = de[name]
        lfc = pd.to_numeric(d["log2fc"], errors="coerce").to_numpy(dtype=float)
        p = pd.to_numeric(d["p_value"], errors="coerce").to_numpy(dtype=float)
        q = pd.to_numeric(d["q_value"], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(lfc) & np.isfinite(p)
        y = -np.log10(np.clip(p, 1e-300, 1.0))
        sig = ok & (q < q_threshold)
        ax.scatter(lfc[ok & ~sig], y[ok & ~sig], s=3, c=NS_COLOR, linewidths=0, rasterized=True)
        ax.scatter(lfc[sig], y[sig], s=5, c=SIG_COLOR, linewidths=0, rasterized=True)
        if sig.any():
            top = np.argsort(np.where(sig, q, np.inf))[: min(n_labels, int(sig.sum()))]
            for i in top:
                ax.text(lfc[i], y[i], str(d["gene"].iloc[i]), fontsize=6)
        ax.axvline(0, color="#cccccc", lw=0.6)
        ax.set_title(
            f"{name}\n{n_sig[name]} genes q<{q_threshold:g} of {int(ok.sum()):,}", fontsize=8
        )
        ax.tick_params(labelsize=7)
        ax.set_xlabel("log2 fold change", fontsize=7)
        ax.set_ylabel("-log10 p", fontsize=7)
    for ax in axes[max(len(names), 1) :]:
        ax.set_axis_off()
    suffix = (
        f" ({len(names)} of {len(de)} cell types, most DE genes first)"
        if len(names) < len(de)
        else ""
    )
    fig.suptitle(title + suffix, fontsize=10)
    return fig


def covariate_forest(cov: pd.DataFrame, *, q_threshold: float = 0.1, max_rows: int = 30) -> Figure:
    """Slopes (with CIs) of the covariate associations with the smallest q.

    Parameters
    ----------
    cov
        ``tables/covariate_associations.tsv``: ``covariate``, ``cell_type``,
        ``signature``, ``slope``, ``ci_low``, ``ci_high``, ``q_value``, and
        ``component`` (``within``: slope on the donor-centred covariate;
        ``between``: slope on the donor means), which labels each row.
    q_threshold
        Rows below it are drawn in red.
    max_rows
        Rows drawn (smallest q first).

    Returns
    -------
    A forest plot; each row labelled ``covariate (component) · cell type ·
    signature (q)``.
    """
    d = (
        cov.assign(qv=pd.to_numeric(cov["q_value"], errors="coerce"))
        .sort_values("qv", na_position="last")
        .head(max_rows)
    )
    n = len(d)
    fig = _figure(8, 1.0 + 0.28 * max(n, 1))
    ax = fig.add_subplot()
    if n == 0:
        _empty(ax, "no covariate associations")
        return fig
    y = np.arange(n)
    slope = d["slope"].to_numpy(dtype=float)
    lo, hi = d["ci_low"].to_numpy(dtype=float), d["ci_high"].to_numpy(dtype=float)
    colors = [SIG_COLOR if q < q_threshold else "#444444" for q in d["qv"].fillna(1.0)]
    ax.hlines(y, lo, hi, colors=colors, lw=1.2)
    ax.scatter(slope, y, c=colors, s=18, zorder=3)
    ax.axvline(0, color="#bbbbbb", lw=0.8)
    comp = [f" ({c})" for c in d["component"].astype(str)] if "component" in d.columns else [""] * n
    labels = [
        f"{r.covariate}{c} · {r.cell_type} · {r.signature} (q={r.qv:.2g})"
        for r, c in zip(d.itertuples(), comp, strict=True)
    ]
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("slope (score per covariate unit), 95% CI")
    return fig


def sample_handling(
    handling: pd.DataFrame,
    columns: Sequence[str],
    timepoints: Sequence[str],
    *,
    ncols: int = 4,
) -> Figure:
    """A sample-handling control score per sample by timepoint, one panel per column.

    Parameters
    ----------
    handling
        ``tables/sample_handling.tsv``: ``sample``, ``donor``, ``timepoint``
        and the control columns (``ieg_dissociation``, ``ieg_dissociation_<lineage>``).
    columns
        The columns drawn, one panel each.
    timepoints
        Timepoint levels in order (x axis).
    ncols
        Panels per row.

    Returns
    -------
    Small multiples: a grey line per donor joining its samples, the mean in black.
    """
    cols = [c for c in columns if c in handling.columns]
    nrows, nc = _grid(max(len(cols), 1), ncols)
    fig = _figure(2.6 * nc, 2.2 * nrows + 0.4)
    axes = np.atleast_1d(fig.subplots(nrows, nc, squeeze=False)).ravel()
    if not cols:
        _empty(axes[0], "no sample-handling control column")
    for ax, col in zip(axes, cols, strict=False):
        wide = handling.assign(
            _v=pd.to_numeric(handling[col], errors="coerce"),
            **{keys.TIMEPOINT: handling[keys.TIMEPOINT].astype(str)},
        ).pivot_table(
            index=keys.DONOR, columns=keys.TIMEPOINT, values="_v", aggfunc="mean", observed=True
        )
        _paired_panel(ax, wide, timepoints, title=str(col), ylabel="mean score")
    for ax in axes[max(len(cols), 1) :]:
        ax.set_axis_off()
    return fig
