"""Stage ``qc``: per-sample cell quality control and doublet detection.

Runs once per sample (one Slurm array task each) on that sample's raw counts:

* QC metrics with scanpy's column names (``total_counts``,
  ``n_genes_by_counts``, ``pct_counts_mt``, ``pct_counts_ribo``,
  ``pct_counts_hb``, and their ``log1p_`` forms);
* outlier flags: adaptive thresholds (median +/- ``nmads`` unscaled median
  absolute deviations of log counts and log genes; median + ``nmads`` MADs of
  % mitochondrial; each MAD raised to a floor so that a metric without spread
  never collapses its bound), plus any fixed bounds from the config
  (``min_genes`` scaled down on matrices narrower than a whole transcriptome);
  the rule behind each bound is recorded (:func:`threshold_rules`);
* doublets with scrublet on the cells passing those filters (scanpy on CPU,
  rapids-singlecell on GPU); scores and calls in ``obs``. Doublets form
  within one library (one GEM well), so a sample of several libraries
  (``obs["library"]`` with more than one value) gets scrublet per library,
  each library's passing cells on their own, with its own threshold.

The per-sample result holds only ``obs`` (no matrix: the counts stay in the
ingest artifact). The merge concatenates them and writes
``tables/qc_per_sample.tsv`` (cells in, removed by each reason, cells out,
thresholds and the rule that set each). A sample losing (almost) all cells fails with an error naming it,
or is dropped with a warning when ``qc.on_failed_sample: drop``.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import median_abs_deviation

from .. import keys
from ..errors import ImmuneageWarning, InputError
from ._backend import choose_backend, rapids
from ._base import StageResult

log = logging.getLogger("immuneage")

if TYPE_CHECKING:
    import torch

    from ..config import Config, QCConfig

__all__ = [
    "call_doublets",
    "gene_masks",
    "merge_qc",
    "qc_sample",
    "qc_thresholds",
    "threshold_rules",
]

#: obs columns written by this stage.
QC_COLUMNS = (
    "total_counts",
    "n_genes_by_counts",
    "log1p_total_counts",
    "log1p_n_genes_by_counts",
    "pct_counts_mt",
    "pct_counts_ribo",
    "pct_counts_hb",
    "qc_fail_counts",
    "qc_fail_genes",
    "qc_fail_mt",
    "doublet_score",
    "predicted_doublet",
    "qc_pass",
)
REASONS = ("qc_fail_counts", "qc_fail_genes", "qc_fail_mt", "predicted_doublet")
#: scrublet's threshold of a sample: a number, ``None`` (no calls), or per library.
DoubletThreshold = float | dict[str, float | None] | None


def gene_masks(var_names: Sequence[str], cfg: QCConfig) -> dict[str, np.ndarray]:
    """Boolean masks of mitochondrial, ribosomal and haemoglobin genes."""
    names = pd.Index(var_names).astype(str)
    hb = re.compile(cfg.hb_pattern)
    return {
        "mt": np.asarray(names.str.startswith(cfg.mt_prefix)),
        "ribo": np.asarray(names.str.startswith(tuple(cfg.ribo_prefixes)))
        if cfg.ribo_prefixes
        else np.zeros(len(names), bool),
        "hb": np.array([bool(hb.match(n)) for n in names]),
    }


def _metrics(
    counts: sp.csr_matrix, masks: dict[str, np.ndarray], backend: str, device: Any
) -> pd.DataFrame:
    if backend == "kernels":
        from ..kernels import qc_metrics

        m = qc_metrics(counts, gene_masks=masks, device=device).obs
        df = pd.DataFrame(
            {
                "total_counts": m["total_counts"],
                "n_genes_by_counts": m["n_genes_by_counts"],
                **{f"pct_counts_{k}": m[f"pct_counts_{k}"] for k in masks},
            }
        )
    else:
        tmp = ad.AnnData(counts)
        for k, v in masks.items():
            tmp.var[k] = v
        if backend == "rapids":  # pragma: no cover - needs a GPU and rapids-singlecell
            rsc = rapids()
            rsc.get.anndata_to_GPU(tmp)
            rsc.pp.calculate_qc_metrics(tmp, qc_vars=list(masks), log1p=False)
            rsc.get.anndata_to_CPU(tmp)
            obs = tmp.obs
        else:
            import scanpy as sc

            obs, _ = sc.pp.calculate_qc_metrics(
                tmp, qc_vars=list(masks), percent_top=None, log1p=False, inplace=False
            )
        df = obs[
            ["total_counts", "n_genes_by_counts", *(f"pct_counts_{k}" for k in masks)]
        ].reset_index(drop=True)
    df["total_counts"] = df["total_counts"].astype(np.float64)
    df["n_genes_by_counts"] = df["n_genes_by_counts"].astype(np.int64)
    df["log1p_total_counts"] = np.log1p(df["total_counts"])
    df["log1p_n_genes_by_counts"] = np.log1p(df["n_genes_by_counts"])
    for k in masks:
        df[f"pct_counts_{k}"] = df[f"pct_counts_{k}"].astype(np.float64).fillna(0.0)
    return df


#: Thresholds of one sample and the metric (obs column) each one bounds.
BOUNDS = {
    "min_counts": "log1p_total_counts",
    "max_counts": "log1p_total_counts",
    "min_genes": "log1p_n_genes_by_counts",
    "max_genes": "log1p_n_genes_by_counts",
    "max_pct_mt": "pct_counts_mt",
}


def _mad_floor(metric: str, cfg: QCConfig) -> float:
    return cfg.mad_floor_pct_mt if metric == "pct_counts_mt" else cfg.mad_floor_log


def fixed_bounds(cfg: QCConfig, n_genes: int | None = None) -> dict[str, float | None]:
    """The config's fixed bounds, ``min_genes`` scaled to a matrix of ``n_genes`` genes.

    ``min_genes`` counts genes of a whole transcriptome (``qc.min_genes_reference``);
    on a narrower matrix it becomes ``min_genes * n_genes / min_genes_reference``.
    """
    fixed: dict[str, float | None] = {b: getattr(cfg, b) for b in BOUNDS}
    ref = cfg.min_genes_reference
    if fixed["min_genes"] is not None and n_genes is not None and 0 < n_genes < ref:
        fixed["min_genes"] = fixed["min_genes"] * n_genes / ref
    return fixed


def threshold_rules(
    metrics: pd.DataFrame, cfg: QCConfig, n_genes: int | None = None
) -> tuple[dict[str, float | None], dict[str, str], dict[str, float]]:
    """The bounds applied to one sample, the rule that set each, and the MADs.

    Rules, per bound (``min_counts``, ``max_counts``, ``min_genes``,
    ``max_genes``, ``max_pct_mt``):

    * ``mode: adaptive``: the adaptive bound is ``median +/- nmads * MAD`` of
      the metric (log1p counts, log1p genes, % mitochondrial), where the MAD
      (unscaled) is raised to a floor when smaller (``qc.mad_floor_log`` for
      the log metrics, ``qc.mad_floor_pct_mt`` for % mitochondrial): a metric
      without spread (one MT- gene detected in a few cells, a tiny or uniform
      sample) never collapses the bound onto the median. The fixed bound, when
      set, is combined with it (the stricter wins).
    * ``mode: fixed``: the fixed bounds only.

    In both modes ``min_genes`` counts genes of a whole transcriptome: on a
    matrix of ``n_genes`` < ``qc.min_genes_reference`` genes (a gene panel, a
    reduced matrix) it is scaled by ``n_genes / min_genes_reference``, so 200
    genes become 8 on a 765-gene matrix instead of removing most healthy cells.

    Parameters
    ----------
    metrics
        Per-cell QC metrics (``log1p_total_counts``, ``log1p_n_genes_by_counts``,
        ``pct_counts_mt``, ``total_counts``, ``n_genes_by_counts``).
    cfg
        The ``qc`` section.
    n_genes
        Genes in the sample's matrix (``None``: ``min_genes`` is not scaled).

    Returns
    -------
    thresholds
        ``min_counts``, ``max_counts``, ``min_genes``, ``max_genes`` (in counts
        and genes, not logs) and ``max_pct_mt``; ``None`` where no bound applies.
    rules
        Per bound: ``none``, ``fixed``, ``fixed (scaled to N of M genes)``
        (``min_genes`` only), ``adaptive`` or ``adaptive (MAD floor)``.
    mads
        Per metric: the MAD measured (before any floor); empty in fixed mode.
    """
    fixed = fixed_bounds(cfg, n_genes)
    fixed_rule = dict.fromkeys(BOUNDS, "fixed")
    if fixed["min_genes"] != cfg.min_genes:
        fixed_rule["min_genes"] = f"fixed (scaled to {n_genes} of {cfg.min_genes_reference} genes)"
    out = dict(fixed)
    rules = {b: ("none" if v is None else fixed_rule[b]) for b, v in fixed.items()}
    mads: dict[str, float] = {}
    if cfg.mode == "adaptive" and len(metrics):
        k = cfg.nmads
        for bound, metric in BOUNDS.items():
            values = metrics[metric].to_numpy(np.float64)
            med = float(np.median(values))
            mad = float(median_abs_deviation(values))
            mads[metric] = mad
            floor = _mad_floor(metric, cfg)
            width = k * max(mad, floor)
            upper = bound.startswith("max_")
            adaptive = med + width if upper else med - width
            if metric != "pct_counts_mt":
                adaptive = float(np.expm1(adaptive))
            rule = "adaptive" if mad >= floor else "adaptive (MAD floor)"
            fix = fixed[bound]
            if fix is not None and (fix < adaptive if upper else fix > adaptive):
                rules[bound], out[bound] = fixed_rule[bound], fix
            else:
                rules[bound], out[bound] = rule, adaptive
    thresholds = {
        b: (None if v is None or not np.isfinite(v) else float(v)) for b, v in out.items()
    }
    rules = {b: ("none" if thresholds[b] is None else r) for b, r in rules.items()}
    return thresholds, rules, mads


def qc_thresholds(
    metrics: pd.DataFrame, cfg: QCConfig, n_genes: int | None = None
) -> dict[str, float | None]:
    """The bounds applied to one sample (see :func:`threshold_rules` for the rules).

    Returns
    -------
    ``min_counts``, ``max_counts``, ``min_genes``, ``max_genes`` (in counts and
    genes, not logs) and ``max_pct_mt``; ``None`` where no bound applies.
    """
    return threshold_rules(metrics, cfg, n_genes)[0]


def _flags(metrics: pd.DataFrame, t: dict[str, float | None]) -> pd.DataFrame:
    tc, ng, mt = metrics["total_counts"], metrics["n_genes_by_counts"], metrics["pct_counts_mt"]
    fail_counts = np.zeros(len(metrics), bool)
    if t["min_counts"] is not None:
        fail_counts |= tc < t["min_counts"]
    if t["max_counts"] is not None:
        fail_counts |= tc > t["max_counts"]
    fail_genes = np.zeros(len(metrics), bool)
    if t["min_genes"] is not None:
        fail_genes |= ng < t["min_genes"]
    if t["max_genes"] is not None:
        fail_genes |= ng > t["max_genes"]
    fail_mt = (
        (mt > t["max_pct_mt"]).to_numpy()
        if t["max_pct_mt"] is not None
        else np.zeros(len(metrics), bool)
    )
    return pd.DataFrame(
        {"qc_fail_counts": fail_counts, "qc_fail_genes": fail_genes, "qc_fail_mt": fail_mt}
    )


#: 10x Genomics' multiplet rate: about 0.8% of the cells recovered per 1,000 cells recovered.
DOUBLET_RATE_PER_1000_CELLS = 0.008


#: scrublet's automatic threshold is trusted when it calls at most this share (or
#: ``doublet_auto_max_factor`` times the expected rate, if larger).
AUTO_CALL_FLOOR = 0.10


def doublet_rate(expected: float | None, n_recovered: int) -> float:
    """Scrublet's expected doublet rate for a library of ``n_recovered`` cells.

    Parameters
    ----------
    expected
        ``qc.expected_doublet_rate``: used as given when set.
    n_recovered
        Cells recovered in the library (barcodes of its filtered matrix,
        before QC).

    Returns
    -------
    ``expected``, or 10x's loading rule ``0.008 * n_recovered / 1000`` (0.8%
    per 1,000 cells recovered) kept within [0.001, 0.3].
    """
    if expected is not None:
        return float(expected)
    return float(np.clip(DOUBLET_RATE_PER_1000_CELLS * n_recovered / 1000.0, 0.001, 0.3))


def _scrublet(
    counts: sp.csr_matrix, cfg: QCConfig, seed: int, backend: str, rate: float
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Doublet scores and calls for the given cells (scrublet)."""
    tmp = ad.AnnData(counts.astype(np.float32))
    # scrublet's PCA needs more cells than components; tiny samples get no calls.
    n_pcs = min(30, tmp.n_obs - 2, tmp.n_vars - 1)
    if n_pcs < 2:
        return np.zeros(tmp.n_obs), np.zeros(tmp.n_obs, bool), None
    kw: dict[str, Any] = {
        "expected_doublet_rate": rate,
        "threshold": cfg.doublet_threshold,
        "n_prin_comps": n_pcs,
        "random_state": seed,
    }
    if backend == "rapids":  # pragma: no cover - needs a GPU and rapids-singlecell
        rsc = rapids()
        rsc.get.anndata_to_GPU(tmp)
        rsc.pp.scrublet(tmp, **kw)
        rsc.get.anndata_to_CPU(tmp)
    else:
        import scanpy as sc

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # exact neighbours: scanpy's own choice for small samples; for larger ones
            # scanpy 1.11 switches to pynndescent, whose csr_array result it cannot read
            # ('csr_array' object has no attribute 'getnnz'): a 5,000-cell sample crashed.
            # Exact kNN on 30 PCs stays fast at sample size (tests/test_qc.py).
            sc.pp.scrublet(tmp, verbose=False, use_approx_neighbors=False, **kw)
    thr = tmp.uns.get("scrublet", {}).get("threshold")
    score = tmp.obs["doublet_score"].to_numpy(np.float64)
    called = tmp.obs["predicted_doublet"].fillna(False).to_numpy(bool)
    return score, called, (None if thr is None else float(thr))


def _libraries(obs: pd.DataFrame) -> list[tuple[str, np.ndarray]] | None:
    """Each library of a sample and a mask of its cells, in order of appearance.

    ``None`` when the sample has no ``obs["library"]`` or one value in it;
    cells without a value form a library ``"(missing)"``.
    """
    if keys.LIBRARY not in obs:
        return None
    values = obs[keys.LIBRARY].astype(object)
    labels = values.where(values.notna(), "(missing)").astype(str).to_numpy()
    names = list(dict.fromkeys(labels))
    if len(names) < 2:
        return None
    return [(name, labels == name) for name in names]


def _doublets_in(
    counts: sp.csr_matrix,
    cells: np.ndarray,
    where: str,
    cfg: QCConfig,
    seed: int,
    backend: str,
    recovered: int,
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Scrublet on the ``cells`` (a mask) of one library or sample named by ``where``.

    ``recovered`` (the library's cells before QC) sets the expected doublet
    rate when ``cfg.expected_doublet_rate`` is null (:func:`doublet_rate`).

    Returns scores (NaN outside ``cells``), calls and scrublet's threshold;
    with fewer than ``cfg.min_cells_for_doublets`` cells (but some), no calls
    and a warning.
    """
    score = np.full(counts.shape[0], np.nan)
    called = np.zeros(counts.shape[0], bool)
    n = int(cells.sum())
    if n == 0:
        return score, called, None
    if n < cfg.min_cells_for_doublets:
        warnings.warn(
            f"{where}: only {n} cells pass QC, fewer than qc.min_cells_for_doublets "
            f"({cfg.min_cells_for_doublets}); no doublets are called in it",
            ImmuneageWarning,
            stacklevel=4,
        )
        return score, called, None
    idx = np.flatnonzero(cells)
    rate = doublet_rate(cfg.expected_doublet_rate, recovered)
    s, c, threshold = _scrublet(counts[idx], cfg, seed, backend, rate)
    # a rate derived from a small library (0.2% at 250 cells) would make any call rate above
    # 0.4% look untrustworthy: the guard is for histograms that call a large share
    limit = max(cfg.doublet_auto_max_factor * rate, AUTO_CALL_FLOOR)
    if cfg.doublet_threshold is None and threshold is not None and c.mean() > limit:
        # scrublet's automatic threshold assumes a bimodal score histogram; without one it
        # can fall inside the singlets' scores (seen on a 230-cell real PBMC sample: 49%
        # called, mostly lymphocytes). Call the expected share of top scores instead,
        # DoubletFinder's rule.
        auto, share = threshold, float(c.mean())
        threshold = float(np.quantile(s, 1.0 - rate))
        c = s > threshold
        warnings.warn(
            f"{where}: scrublet's automatic threshold {auto:.3g} calls {share:.0%} of the "
            f"cells doublets, more than max(qc.doublet_auto_max_factor x the expected rate, 10%) "
            f"({limit:.0%}); the score histogram is not bimodal. The threshold was raised to "
            f"{threshold:.3g}, calling the expected doublet rate ({rate:.1%}) "
            "highest-scoring cells; set qc.doublet_threshold to choose it yourself",
            ImmuneageWarning,
            stacklevel=4,
        )
    score[idx], called[idx] = s, c
    return score, called, threshold


def call_doublets(
    counts: sp.csr_matrix,
    passed: np.ndarray,
    cfg: QCConfig,
    *,
    sample: str,
    libraries: list[tuple[str, np.ndarray]] | None = None,
    seed: int = 0,
    backend: str = "scanpy",
    n_recovered: int | None = None,
) -> tuple[np.ndarray, np.ndarray, DoubletThreshold]:
    """Scrublet doublet scores and calls for one sample's QC-passing cells.

    Parameters
    ----------
    counts
        The sample's raw counts (cells x genes).
    passed
        Cells that pass the outlier filters; only they are scored.
    cfg
        The ``qc`` section (``expected_doublet_rate``, ``doublet_threshold``,
        ``min_cells_for_doublets``).
    sample
        The sample's name (for warnings).
    libraries
        The sample's libraries and a mask of each (several): scrublet runs on
        each library's passing cells on their own, as doublets form within one
        GEM well; ``min_cells_for_doublets`` applies per library. ``None``: the
        sample's passing cells together.
    seed
        scrublet's random state.
    backend
        ``scanpy`` or ``rapids``.
    n_recovered
        Cells recovered in the sample (sets the expected doublet rate when
        ``cfg.expected_doublet_rate`` is null, :func:`doublet_rate`); ``None``:
        the rows of ``counts``. With libraries, each library's cells.

    Returns
    -------
    score
        Per cell, the doublet score (NaN for cells not scored).
    called
        Per cell, whether it is a predicted doublet.
    threshold
        scrublet's score threshold (``None``: no calls); with libraries, a dict
        library -> threshold in library order.

    Warns
    -----
    ImmuneageWarning
        A sample (or library) has fewer than ``min_cells_for_doublets`` passing
        cells (but some): no doublets are called in it.
    """
    if libraries is None:
        return _doublets_in(
            counts,
            passed,
            f"sample {sample!r}",
            cfg,
            seed,
            backend,
            counts.shape[0] if n_recovered is None else n_recovered,
        )
    score = np.full(counts.shape[0], np.nan)
    called = np.zeros(counts.shape[0], bool)
    thresholds: dict[str, float | None] = {}
    for name, cells in libraries:
        where = f"sample {sample!r}, library {name!r}"
        s, c, thresholds[name] = _doublets_in(
            counts, passed & cells, where, cfg, seed, backend, int(cells.sum())
        )
        score[cells], called[cells] = s[cells], c[cells]
    return score, called, thresholds


def qc_sample(adata: ad.AnnData, cfg: Config, *, device: torch.device | str = "cpu") -> ad.AnnData:
    """QC metrics, outlier flags and doublet calls for one sample.

    Parameters
    ----------
    adata
        One sample's ingest output (raw counts in ``layers["counts"]``).
    cfg
        Run configuration (reads ``qc``, ``backend``, ``seed``).
    device
        The run's device.

    Returns
    -------
    AnnData with the sample's cells and no genes; ``obs`` holds ``sample``,
    ``donor``, ``timepoint`` and the columns in :data:`QC_COLUMNS`;
    ``uns["immuneage"]["qc"]`` holds the thresholds, the rule that set each
    (``rules``, see :func:`threshold_rules`), the MAD of each metric (``mads``),
    the backend, the doublet threshold (``doublet_threshold``: a number, or
    ``"none"`` without doublet calls; for a sample of several libraries a dict
    library -> threshold, see :func:`call_doublets`) and ``failed`` /
    ``dropped`` flags.

    Raises
    ------
    InputError
        The sample fails QC (too few cells left) and ``qc.on_failed_sample`` is ``error``.

    Warns
    -----
    ImmuneageWarning
        Too few cells pass QC to call doublets in the sample (or one of its libraries).

    Notes
    -----
    When ``obs["library"]`` holds more than one value, doublets are called per
    library (:func:`call_doublets`); the outlier thresholds stay per sample.
    """
    q = cfg.qc
    backend = choose_backend(cfg.backend, device)
    log.debug("qc: backend %s on %s", backend, getattr(device, "type", device))
    counts = sp.csr_matrix(adata.layers[keys.COUNTS])
    sample = str(adata.obs[keys.SAMPLE].iloc[0])
    masks = gene_masks(adata.var_names, q)
    metrics = _metrics(counts, masks, "scanpy" if backend == "scanpy" else backend, device)
    thresholds, rules, mads = threshold_rules(metrics, q, adata.n_vars)
    for bound, rule in rules.items():
        if rule not in ("adaptive", "fixed", "none"):
            log.info("qc: sample %r: %s = %.4g (%s)", sample, bound, thresholds[bound], rule)
    flags = _flags(metrics, thresholds)
    passed = ~(flags.any(axis=1).to_numpy())

    libraries = _libraries(adata.obs)
    score = np.full(adata.n_obs, np.nan)
    called = np.zeros(adata.n_obs, bool)
    doublet_threshold: DoubletThreshold = None
    if q.doublets == "scrublet":
        score, called, doublet_threshold = call_doublets(
            counts,
            passed,
            q,
            sample=sample,
            libraries=libraries,
            seed=cfg.seed,
            backend="rapids" if backend == "rapids" else "scanpy",
        )
    keep = passed & ~(called if q.remove_doublets else np.zeros_like(called))

    obs = adata.obs[[keys.SAMPLE, keys.DONOR, keys.TIMEPOINT]].copy()
    for col in metrics:
        obs[col] = metrics[col].to_numpy()
    for col in flags:
        obs[col] = flags[col].to_numpy()
    obs["doublet_score"] = score
    obs["predicted_doublet"] = called
    n_in, n_out = adata.n_obs, int(keep.sum())
    failed = n_out < q.min_cells_after or (n_in - n_out) / n_in > q.max_fraction_removed
    dropped = False
    if failed:
        removed = {r: int(obs[r].sum()) if r in obs else 0 for r in REASONS}
        shown = ", ".join(f"{k}={v:.4g}" for k, v in thresholds.items() if v is not None)
        msg = (
            f"sample {sample!r} fails QC: {n_in} cells before, {n_out} after (qc.min_cells_after "
            f"{q.min_cells_after}, qc.max_fraction_removed {q.max_fraction_removed}). Thresholds: "
            f"{shown}; cells removed by reason: {removed}. Check this sample's file, loosen the "
            "qc thresholds, or set qc.on_failed_sample: drop to continue without it"
        )
        if q.on_failed_sample == "error":
            raise InputError(msg)
        warnings.warn(msg + " (dropped)", ImmuneageWarning, stacklevel=2)
        keep[:] = False
        dropped = True
    obs["qc_pass"] = keep
    out = ad.AnnData(sp.csr_matrix((adata.n_obs, 0), dtype=np.float32), obs=obs)
    out.uns[keys.UNS] = {
        "qc": {
            "sample": sample,
            "backend": backend,
            "mode": q.mode,
            "thresholds": {k: ("none" if v is None else v) for k, v in thresholds.items()},
            "rules": rules,
            "mads": mads,
            "min_genes_fixed": "none"
            if (fixed_min := fixed_bounds(q, adata.n_vars)["min_genes"]) is None
            else fixed_min,
            "doublet_threshold": _none_if_missing(doublet_threshold),
            "doublet_rate": (
                "none"
                if q.doublets != "scrublet"
                else doublet_rate(q.expected_doublet_rate, adata.n_obs)
                if libraries is None
                else {n: doublet_rate(q.expected_doublet_rate, int(m.sum())) for n, m in libraries}
            ),
            "failed": bool(failed),
            "dropped": dropped,
        }
    }
    return out


def _none_if_missing(
    threshold: DoubletThreshold,
) -> float | str | dict[str, float | str]:
    """A doublet threshold as stored in uns: ``"none"`` for no calls (per library in a dict)."""
    if isinstance(threshold, dict):
        return {k: ("none" if v is None else v) for k, v in threshold.items()}
    return "none" if threshold is None else threshold


def _threshold_cell(value: float | str | dict[str, float | str]) -> float | str:
    """A sample's ``doublet_threshold`` in ``tables/qc_per_sample.tsv``.

    A number (NaN without calls); for a sample of several libraries,
    ``"<library>=<threshold>"`` joined with ``"; "`` in library order
    (``none`` for a library without calls).
    """
    if isinstance(value, dict):
        return "; ".join(
            f"{k}={'none' if v == 'none' else f'{float(v):.6g}'}" for k, v in value.items()
        )
    return np.nan if value == "none" else float(value)


def _warn_scaled_floor(per_sample: dict[str, Any], cfg: QCConfig) -> None:
    """One warning when ``min_genes`` was scaled down to a narrow matrix."""
    scaled = {
        s: info["min_genes_fixed"]
        for s, info in per_sample.items()
        if info.get("min_genes_fixed", "none") not in ("none", cfg.min_genes)
    }
    if scaled:
        values = sorted({f"{v:.3g}" for v in scaled.values()})
        warnings.warn(
            f"qc.min_genes = {cfg.min_genes} assumes a whole transcriptome, but the matrix of "
            f"{len(scaled)} sample(s) has fewer genes than qc.min_genes_reference = "
            f"{cfg.min_genes_reference} (a gene panel or a reduced matrix?): the floor was "
            f"scaled to {', '.join(values)} genes there (rule_min_genes in "
            "tables/qc_per_sample.tsv)",
            ImmuneageWarning,
            stacklevel=3,
        )


def merge_qc(units: Sequence[ad.AnnData], cfg: Config) -> StageResult:
    """Concatenate per-sample QC results and tabulate them.

    Returns
    -------
    StageResult whose AnnData has every cell's QC ``obs`` (no genes) and
    ``uns["immuneage"]["qc"]`` = per-sample thresholds and the dropped samples;
    table ``qc_per_sample``: sample, donor, timepoint, cells_in, removed by
    each reason (a cell can fail several), cells_out, the thresholds, the rule
    that set each threshold (``rule_<threshold>``), the doublet threshold
    (``"<library>=<threshold>; ..."`` for a sample of several libraries, and
    then the column is text) and whether the sample was dropped. A
    ``min_genes`` scaled down to a narrow matrix is warned once.
    """
    rows = []
    per_sample: dict[str, Any] = {}
    for u in units:
        info = u.uns[keys.UNS]["qc"]
        o = u.obs
        row = {
            keys.SAMPLE: info["sample"],
            keys.DONOR: str(o[keys.DONOR].iloc[0]),
            keys.TIMEPOINT: str(o[keys.TIMEPOINT].iloc[0]),
            "cells_in": u.n_obs,
            "removed_counts": int(o["qc_fail_counts"].sum()),
            "removed_genes": int(o["qc_fail_genes"].sum()),
            "removed_mt": int(o["qc_fail_mt"].sum()),
            "doublets": int(o["predicted_doublet"].sum()),
            "cells_out": int(o["qc_pass"].sum()),
        }
        for k, v in info["thresholds"].items():
            row[k] = np.nan if v == "none" else v
        rules = info.get("rules", {})
        for k in info["thresholds"]:
            row[f"rule_{k}"] = rules.get(k, "")
        row["doublet_threshold"] = _threshold_cell(info["doublet_threshold"])
        rate = info.get("doublet_rate", "none")
        row["doublet_rate"] = (
            "; ".join(f"{k}={v:.4g}" for k, v in rate.items())
            if isinstance(rate, dict)
            else (np.nan if rate == "none" else rate)
        )
        row["dropped"] = bool(info["dropped"])
        rows.append(row)
        per_sample[info["sample"]] = {k: v for k, v in info.items() if k != "sample"}
    _warn_scaled_floor(per_sample, cfg.qc)
    table = pd.DataFrame(rows)
    if rows and any(isinstance(r["doublet_threshold"], str) for r in rows):
        # per-library thresholds are text: write the others alike (6 significant digits)
        table["doublet_threshold"] = [
            v if isinstance(v, str) else ("" if np.isnan(v) else f"{v:.6g}")
            for v in table["doublet_threshold"]
        ]
    merged = ad.concat(list(units), join="outer", merge="same")
    tp = pd.Categorical(
        merged.obs[keys.TIMEPOINT].astype(str), categories=cfg.design.timepoints, ordered=True
    )
    merged.obs[keys.TIMEPOINT] = tp
    merged.uns[keys.UNS] = {
        "qc": {
            "per_sample": per_sample,
            "dropped_samples": [s for s, v in per_sample.items() if v["dropped"]],
        }
    }
    return StageResult(
        merged,
        {"qc_per_sample": table},
        files={"qc_report.html": lambda path: _write_qc_report(path, table, merged.obs, cfg)},
    )


def _write_qc_report(path: Any, table: pd.DataFrame, obs: pd.DataFrame, cfg: Config) -> None:
    """``qc_report.html``: the QC table and figures, before any later stage runs."""
    from ..progress import step
    from ..report.qc import qc_report_html

    with step("QC report"):
        text = qc_report_html(table, obs, timepoints=cfg.design.timepoints, seed=cfg.seed)
    Path(path).write_text(text, encoding="utf-8")
