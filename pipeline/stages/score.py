"""Stage ``score``: gene-signature scores per cell, every signature in one sparse product.

Gene sets
    Built-in sets (``score.genesets``, cited in
    ``pipeline/genesets/data/immune_ageing.yaml``), a GMT file (``score.gmt``)
    and inline sets (``score.custom``). Symbols are matched to ``var_names``
    directly or through the shipped HGNC alias table (``TMEM173`` <-> ``STING1``,
    ``MB21D1`` <-> ``CGAS``, ``IL8`` <-> ``CXCL8`` ...). A set with fewer genes
    found than ``score.min_genes`` is an :class:`~pipeline.errors.InputError`
    naming it and its missing genes (``score.on_small_set: error``), or, by
    default (``skip``), a warning naming every skipped set and its missing genes,
    ``skipped`` in ``tables/signature_coverage.tsv`` and no score. When no set
    can be scored the stage stops with an error.

``score_genes`` (default)
    The semantics of :func:`scanpy.tl.score_genes` with ``random_state=seed``,
    for all sets at once: genes are binned by mean expression over the whole
    dataset (``n_bins``), each set draws up to ``ctrl_size`` control genes from
    every bin its genes fall in (excluding its own genes, with the same random
    stream scanpy uses, so the control genes are the ones scanpy picks), and
    the score is ``mean(set genes) - mean(control genes)`` on the
    log-normalised ``X``. By default (``score.controls_exclude_signatures``)
    the controls come from a pool without the other configured sets' genes
    (scanpy's ``gene_pool``), so a programme that shifts cannot move another
    set's controls and fake a shift of that set. Stacking one weight column per set turns every score
    into one ``X @ W`` product (:func:`pipeline.kernels.scoring.weighted_scores`),
    streamed in row blocks on the run device; ``X`` is never densified. An on-disk
    ``X`` (backed mode) is read in row blocks by the same two kernels.

``aucell`` / ``ulm``
    decoupler's AUCell or univariate linear model over the same resolved sets
    (cross-checks; CPU). They need ``X`` in memory: with an on-disk ``X``
    (backed mode) they are an :class:`~pipeline.errors.InputError`.

Roles
    Every set has a role (:data:`pipeline.genesets.ROLES`): ``programme`` (biology;
    every GMT and inline set) or ``control``. The built-in ``ieg_dissociation``
    (immediate-early / dissociation-stress genes: FOS, JUN, EGR1, IER2, DUSP1,
    heat-shock genes ...) is a control: it measures sample handling (time to
    processing, ex-vivo stress), not the biology of a timepoint, and its genes are
    kept out of the programmes (``nfkb_inflammation`` has none of them since
    collection version 2). It is scored like any set and tested like any set by the
    ``differential`` stage (a shift there is a handling difference between
    timepoints), and summarised per sample in ``tables/sample_handling.tsv``.

``tables/sample_handling.tsv`` (:func:`sample_handling_table`)
    One row per sample: ``sample``, ``donor``, ``timepoint``, ``n_cells`` and, for
    every scored control set, ``<set>`` (mean score over the sample's cells) and
    ``<set>_<lineage>`` (mean over the sample's cells of each coarse lineage of
    ``obs["cell_type_coarse"]``; empty where the sample has no such cells;
    ``unassigned`` cells count in ``<set>`` only). Read it per timepoint to see
    whether handling differs between timepoints. To adjust the differential tests for
    it, pass it as the covariates file: its format is the one
    :func:`pipeline.stages.differential.covariates.read_covariates` reads (a
    ``sample`` column, numeric columns; ``donor`` and ``timepoint`` are ignored)
    once saved comma-separated, with ``differential.covariate_columns:
    [ieg_dissociation]`` (otherwise ``n_cells`` and every lineage column would be
    tested too).

Outputs: ``obs["score_<set>"]``, ``obsm["signature_scores"]`` (a DataFrame with
one column per set), ``uns["immuneage"]["signatures"]`` (set -> genes used),
``uns["immuneage"]["signature_roles"]`` (set -> ``programme`` / ``control``),
``uns["immuneage"]["signature_versions"]`` (set -> collection version, e.g.
``immune_ageing/2``), ``tables/signature_coverage.tsv``,
``tables/sample_handling.tsv`` (when ``obs`` has a ``sample`` column) and the set
definitions after alias mapping in ``provenance.json`` (stage ``score``,
``details``; with the built-in collection's version under ``collection``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from pipeline import keys
from pipeline.errors import ImmuneageWarning, InputError
from pipeline.genesets import ResolvedSet, collection_version, resolve_sets, sets_from_config
from pipeline.kernels.scoring import gene_means, weighted_scores
from pipeline.kernels.sparse import DEFAULT_CHUNK_SIZE, is_row_source
from pipeline.stages._base import StageResult

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

    from pipeline.config import Config, ScoreConfig

__all__ = [
    "SAMPLE_HANDLING_TABLE",
    "SCORES_KEY",
    "check_config",
    "check_genes",
    "control_genes",
    "coverage_table",
    "expression_bins",
    "run_score",
    "sample_handling_table",
    "score_matrix",
]

log = logging.getLogger("immuneage")

#: ``obsm`` key of the per-cell scores (a DataFrame, one column per set).
SCORES_KEY = "signature_scores"
#: Name of the per-sample control table (``tables/sample_handling.tsv``).
SAMPLE_HANDLING_TABLE = "sample_handling"


def score_column(name: str) -> str:
    """The ``obs`` column holding set ``name``'s score."""
    return f"score_{name}"


def expression_bins(means: pd.Series, n_bins: int) -> pd.Series:
    """Bin of every gene by mean expression, as :func:`scanpy.tl.score_genes` cuts them.

    Genes are ranked (``rank(method="min")``) and cut into bins of
    ``round(n_genes / (n_bins - 1))`` ranks; genes with a non-finite mean are left out.
    """
    obs_avg = means[np.isfinite(means.to_numpy())]
    n_items = int(np.round(len(obs_avg) / (n_bins - 1)))
    return obs_avg.rank(method="min") // n_items


def control_genes(
    bins: pd.Series,
    gene_list: list[str],
    *,
    ctrl_size: int,
    seed: int,
) -> list[str]:
    """Control genes for one set, as :func:`scanpy.tl.score_genes` picks them.

    From every expression bin holding a set gene, ``ctrl_size`` genes are drawn
    with ``numpy.random.RandomState(seed)`` in the order scanpy draws them, and
    the set's own genes are dropped from the draw (scanpy's default
    ``ctrl_as_ref=True``).

    The bins come from exact (``float64``) means; scanpy 1.11 accumulates them
    in ``float32``. Two genes whose means differ by less than that rounding and
    straddle a bin edge could swap bins, so in rare near-ties the control genes
    can differ from scanpy's; the scores from the same control genes agree to
    ``1e-5`` (tested).

    Parameters
    ----------
    bins
        :func:`expression_bins` of every candidate gene (index: gene names, data order).
    gene_list
        The set's genes (all in ``bins``).
    ctrl_size
        Genes drawn per bin.
    seed
        Seed of the draw (scanpy's ``random_state``).

    Returns
    -------
    The control genes, in data order.
    """
    rs = np.random.RandomState(seed)
    members = set(gene_list)
    chosen: set[str] = set()
    for cut in np.unique(bins.loc[gene_list]):
        r_genes = bins[bins == cut].index
        if ctrl_size < len(r_genes):
            r_genes = r_genes.to_series().sample(ctrl_size, random_state=rs).index
        chosen.update(g for g in r_genes if g not in members)
    return [g for g in bins.index if g in chosen]


def score_matrix(
    x: sparse.spmatrix | sparse.sparray | Any,
    var_names: pd.Index,
    sets: dict[str, list[str]],
    *,
    ctrl_size: int = 50,
    n_bins: int = 25,
    seed: int = 0,
    exclude_from_controls: set[str] | frozenset[str] = frozenset(),
    device: torch.device | str = "cpu",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """``score_genes`` scores of many sets at once.

    Parameters
    ----------
    x
        Cells x genes log-normalised expression: sparse in memory, or a row source
        (:func:`~pipeline.kernels.sparse.is_row_source`, an on-disk ``X`` in backed
        mode) that the kernels read in blocks of rows.
    var_names
        Gene names of ``x``'s columns.
    sets
        ``{name: genes}``, every gene in ``var_names``.
    ctrl_size, n_bins, seed
        As in :func:`scanpy.tl.score_genes` (``random_state=seed`` for every set).
    exclude_from_controls
        Genes no set may use as controls, except as its own genes: each set's
        pool (scanpy's ``gene_pool``) is every gene minus these, plus the set's
        genes; bins are cut within that pool, as scanpy cuts them.
    device
        Where the gene means and the product run.
    chunk_size
        Passed to :func:`~pipeline.kernels.scoring.gene_means` and
        :func:`~pipeline.kernels.scoring.weighted_scores` (rows per block of the product).

    Returns
    -------
    scores
        Cells x sets (``float64``), columns in ``sets`` order.
    controls
        ``{name: control genes}``.

    Raises
    ------
    ValueError
        A set with no control genes (fewer genes in the data than bins need).
    """
    var_names = pd.Index(var_names)
    means = pd.Series(gene_means(x, device=device, chunk_size=chunk_size), index=var_names)
    col = pd.Series(np.arange(len(var_names)), index=var_names)
    weights = np.zeros((len(var_names), len(sets)), dtype=np.float64)
    controls: dict[str, list[str]] = {}
    shared_bins = expression_bins(means, n_bins)
    excluded = np.asarray(var_names.isin(list(exclude_from_controls)))
    for j, (name, genes) in enumerate(sets.items()):
        if excluded.any():
            in_pool = ~excluded | np.asarray(var_names.isin(list(genes)))
            bins = expression_bins(means[in_pool], n_bins)
        else:
            bins = shared_bins
        ctrl = control_genes(bins, list(genes), ctrl_size=ctrl_size, seed=seed)
        if not ctrl:
            msg = f"gene set {name!r}: no control genes found; the data has too few genes"
            raise ValueError(msg)
        controls[name] = ctrl
        weights[col[list(genes)].to_numpy(), j] += 1.0 / len(genes)
        weights[col[ctrl].to_numpy(), j] -= 1.0 / len(ctrl)
    scores = weighted_scores(x, weights, device=device, chunk_size=chunk_size)
    return pd.DataFrame(scores, columns=list(sets)), controls


def coverage_table(resolved: dict[str, ResolvedSet], min_genes: int) -> pd.DataFrame:
    """One row per set: genes found, missing, aliases used and whether it is scored."""
    rows = []
    for name, r in resolved.items():
        n_found = len(r.found)
        rows.append(
            {
                "signature": name,
                "label": r.geneset.label,
                "source": r.geneset.source,
                "version": r.geneset.version,
                "role": r.geneset.role,
                "n_genes": len(r.geneset.genes),
                "n_found": n_found,
                "n_missing": len(r.missing),
                "fraction_found": n_found / max(len(r.geneset.genes), 1),
                "genes_found": ",".join(r.found),
                "genes_missing": ",".join(r.missing),
                "aliases_used": ",".join(f"{k}={v}" for k, v in r.aliases_used.items()),
                "status": "scored" if n_found >= min_genes else f"skipped: < {min_genes} genes",
            }
        )
    return pd.DataFrame(rows)


def sample_handling_table(
    obs: pd.DataFrame,
    scores: pd.DataFrame,
    *,
    controls: Sequence[str],
    lineage_key: str | None = keys.CELL_TYPE_COARSE,
) -> pd.DataFrame:
    """Per-sample means of the control scores (``tables/sample_handling.tsv``).

    Parameters
    ----------
    obs
        Cell metadata with a ``sample`` column (``donor``, ``timepoint`` and
        ``lineage_key`` are used when present).
    scores
        Cells x sets scores, rows in ``obs`` order.
    controls
        The sets of ``scores`` to summarise (the ``control`` role ones).
    lineage_key
        ``obs`` column of the coarse lineage; ``None`` or absent: no per-lineage columns.

    Returns
    -------
    One row per sample, sorted by sample: ``sample``, ``donor``, ``timepoint``,
    ``n_cells``, then per control ``<set>`` (mean over the sample's cells) and
    ``<set>_<lineage>`` (mean over its cells of that lineage, NaN when it has
    none; ``unassigned`` cells count in ``<set>`` only).

    Raises
    ------
    ValueError
        ``obs`` has no ``sample`` column, ``scores`` has another number of rows
        or lacks a control, or a sample has several donors or timepoints.
    """
    if keys.SAMPLE not in obs.columns:
        raise ValueError("sample_handling_table: obs has no 'sample' column")
    missing = [c for c in controls if c not in scores.columns]
    if len(scores) != len(obs) or missing:
        msg = (
            f"sample_handling_table: scores must have one row per cell ({len(scores)} vs "
            f"{len(obs)}) and the control columns (missing: {missing})"
        )
        raise ValueError(msg)
    frame = pd.DataFrame(
        {keys.SAMPLE: obs[keys.SAMPLE].astype(str).to_numpy()}
        | {c: scores[c].to_numpy(dtype=np.float64) for c in controls}
    )
    grouped = frame.groupby(keys.SAMPLE, sort=True)
    out = pd.DataFrame({keys.SAMPLE: list(grouped.groups)})
    for col in (keys.DONOR, keys.TIMEPOINT):
        if col in obs.columns:
            values = obs[col].astype(str).to_numpy()
            per = pd.Series(values).groupby(frame[keys.SAMPLE].to_numpy(), sort=True)
            if (per.nunique() > 1).any():
                bad = per.nunique()[per.nunique() > 1].index[0]
                raise ValueError(f"sample_handling_table: sample {bad!r} has several {col}s")
            out[col] = per.first().to_numpy()
    out["n_cells"] = grouped.size().to_numpy()
    lineages: list[str] = []
    if lineage_key is not None and lineage_key in obs.columns:
        lin = obs[lineage_key]
        order = lin.cat.categories if isinstance(lin.dtype, pd.CategoricalDtype) else None
        frame["_lineage"] = lin.astype(object).to_numpy()
        present = set(frame["_lineage"].dropna()) - {keys.UNASSIGNED}
        lineages = [str(x) for x in (order if order is not None else sorted(present))]
        lineages = [x for x in lineages if x in present]
    for c in controls:
        out[c] = grouped[c].mean().to_numpy()
        if lineages:
            per_lin = frame.pivot_table(
                index=keys.SAMPLE, columns="_lineage", values=c, aggfunc="mean", observed=True
            )
            for x in lineages:
                col = per_lin[x] if x in per_lin.columns else None
                out[f"{c}_{x}"] = (
                    np.nan if col is None else col.reindex(out[keys.SAMPLE]).to_numpy()
                )
    return out


def _decoupler_scores(
    adata: AnnData, sets: dict[str, list[str]], method: str, min_genes: int
) -> pd.DataFrame:
    if is_row_source(adata.X):
        raise InputError(
            f"score.method: {method} needs the whole expression matrix in memory (decoupler "
            "drops the genes that are zero in every cell before scoring, so it cannot run on "
            "blocks of cells), but X is read from disk in backed mode; use score.method: "
            "score_genes in backed mode, or run without backed mode"
        )
    import decoupler as dc
    from anndata import AnnData

    net = pd.DataFrame(
        [(name, g) for name, genes in sets.items() for g in genes], columns=["source", "target"]
    )
    net["weight"] = 1.0
    # both methods need every gene (AUCell ranks genes within a cell, ULM regresses on them)
    sub = AnnData(
        adata.X,
        obs=pd.DataFrame(index=adata.obs_names.copy()),
        var=pd.DataFrame(index=adata.var_names.copy()),
    )
    func = dc.mt.aucell if method == "aucell" else dc.mt.ulm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        func(sub, net, tmin=min_genes, verbose=False)
    est = sub.obsm[f"score_{method}"]
    return pd.DataFrame(
        np.asarray(est.reindex(columns=list(sets)), dtype=np.float64), columns=list(sets)
    )


def check_config(cfg: Config, sheet: object = None) -> None:
    """Fail fast on the ``score`` section: unknown built-in sets, a bad GMT, bad inline sets.

    Called by :func:`pipeline.preflight.validate_inputs` before any stage runs.

    Raises
    ------
    InputError
        As :func:`pipeline.genesets.sets_from_config`; also when no set is configured.
    """
    scfg = cfg.score
    if not sets_from_config(scfg.genesets, scfg.gmt, scfg.custom):
        raise InputError("score: no gene sets configured (score.genesets, score.gmt, score.custom)")


def _small_sets(
    resolved: dict[str, ResolvedSet], cfg: ScoreConfig, *, where: str = "the data"
) -> tuple[dict[str, list[str]], str | None]:
    """The sets large enough to score, and the warning about the others (``None``: none).

    Sets with fewer than ``min_genes`` genes in ``where`` raise with
    ``on_small_set: error``; else they are left out and named in the warning
    text. The returned sets may be empty (the callers raise).
    """
    small = {n: r for n, r in resolved.items() if len(r.found) < cfg.min_genes}

    def describe(name: str, r: ResolvedSet) -> str:
        missing = ", ".join(r.missing[:40]) + (" ..." if len(r.missing) > 40 else "")
        return (
            f"gene set {name!r} has {len(r.found)} of its {len(r.geneset.genes)} genes in "
            f"{where}, fewer than score.min_genes = {cfg.min_genes}; missing: {missing}"
        )

    if small and cfg.on_small_set == "error":
        name, r = next(iter(small.items()))
        raise InputError(
            describe(name, r)
            + " (lower score.min_genes, check the gene symbols / the reference the data "
            "was built on, or set score.on_small_set: skip)"
        )
    text = None
    if small:
        text = (
            f"{len(small)} gene set(s) skipped (score.on_small_set: skip): "
            + "; ".join(describe(n, r) for n, r in small.items())
            + ". See tables/signature_coverage.tsv"
        )
    return {n: r.found for n, r in resolved.items() if n not in small}, text


def _nothing_scorable(cfg: ScoreConfig, where: str, detail: str = "") -> InputError:
    return InputError(
        f"score: no gene set has at least score.min_genes = {cfg.min_genes} genes in {where}, "
        f"so nothing can be scored{detail}; check the gene symbols / the reference, lower "
        "score.min_genes, or add sets with score.gmt / score.custom"
    )


def _select(resolved: dict[str, ResolvedSet], cfg: ScoreConfig) -> dict[str, list[str]]:
    """The sets to score; sets below ``min_genes`` raise or are skipped with one warning."""
    sets, text = _small_sets(resolved, cfg)
    if text is not None:
        warnings.warn(text, ImmuneageWarning, stacklevel=3)
    if not sets:
        raise _nothing_scorable(cfg, "the data", " (see the coverage in the message above)")
    return sets


def check_genes(cfg: Config, genes: Iterable[str], *, where: str) -> list[str]:
    """Check the configured gene sets against the genes the cohort will have, before compute.

    The same rules as the stage (aliases included, ``score.min_genes``,
    ``score.on_small_set``), applied to ``genes`` (the genes of the input
    files as ingest merges them). The stage can still find fewer genes
    (preprocess drops genes detected in no cell), never more.

    Parameters
    ----------
    cfg
        Run configuration (``score`` section).
    genes
        The cohort's gene symbols.
    where
        How messages name ``genes`` (e.g. ``"the counts files (genes of all samples)"``).

    Returns
    -------
    The warnings the stage would issue (sets it would skip), not issued.

    Raises
    ------
    InputError
        A set below ``score.min_genes`` with ``on_small_set: error``, or no set
        with enough genes (the message names the set, its genes found and missing).
    """
    scfg = cfg.score
    defined = sets_from_config(scfg.genesets, scfg.gmt, scfg.custom)
    resolved = resolve_sets(defined, pd.Index(list(genes)))
    try:
        sets, text = _small_sets(resolved, scfg, where=where)
    except InputError as exc:
        raise InputError(f"score: {exc}") from None
    if not sets:
        found = ", ".join(
            f"{n} {len(r.found)} of {len(r.geneset.genes)}" for n, r in resolved.items()
        )
        raise _nothing_scorable(scfg, where, f" (genes found per set: {found})")
    return [] if text is None else [f"score: {text}"]


def run_score(adata: AnnData, cfg: Config, *, device: torch.device | str = "cpu") -> StageResult:
    """Score every configured gene set in every cell.

    Parameters
    ----------
    adata
        The annotated AnnData (log-normalised ``X``, all genes; in memory, or an
        on-disk row source in backed mode, read in blocks of ``chunk_size`` cells).
    cfg
        Run configuration (``score`` section; ``seed``; ``chunk_size``).
    device
        Run device; the ``score_genes`` product runs there.

    Returns
    -------
    :class:`~pipeline.stages.StageResult` with the scored AnnData, the
    ``signature_coverage`` table and, when ``obs`` has a ``sample`` column, the
    ``sample_handling`` table (:func:`sample_handling_table` of the control sets).

    Raises
    ------
    InputError
        Unknown built-in set, unreadable GMT, a set too small with
        ``on_small_set: error``, no set large enough to score, or ``aucell`` /
        ``ulm`` on an on-disk ``X``.
    """
    scfg = cfg.score
    check_config(cfg)
    defined = sets_from_config(scfg.genesets, scfg.gmt, scfg.custom)
    resolved = resolve_sets(defined, adata.var_names)
    coverage = coverage_table(resolved, scfg.min_genes)
    sets = _select(resolved, scfg)
    for name, r in resolved.items():
        if r.aliases_used:
            log.info("score: %s matched through aliases: %s", name, r.aliases_used)

    controls: dict[str, list[str]] = {}
    if scfg.method == "score_genes":
        x = adata.X
        backed = is_row_source(x)
        if not (backed or sparse.issparse(x)):
            x = sparse.csr_matrix(x)  # dense in memory; a row source is never loaded whole
        scores, controls = score_matrix(
            x,
            adata.var_names,
            sets,
            ctrl_size=scfg.ctrl_size,
            n_bins=scfg.n_bins,
            seed=cfg.seed,
            exclude_from_controls=(
                {g for genes in sets.values() for g in genes}
                if scfg.controls_exclude_signatures
                else frozenset()
            ),
            device=device,
            chunk_size=cfg.chunk_size if backed else DEFAULT_CHUNK_SIZE,
        )
    else:
        scores = _decoupler_scores(adata, sets, scfg.method, scfg.min_genes)
    scores.index = adata.obs_names

    out = adata
    for name in sets:
        out.obs[score_column(name)] = scores[name].to_numpy()
    out.obsm[SCORES_KEY] = scores
    run_info = out.uns.setdefault(keys.UNS, {})
    run_info["signatures"] = {name: list(genes) for name, genes in sets.items()}
    run_info["signature_roles"] = {name: resolved[name].geneset.role for name in sets}
    run_info["signature_versions"] = {name: resolved[name].geneset.version for name in sets}
    run_info["signature_method"] = scfg.method
    coverage["n_controls"] = [len(controls.get(n, [])) for n in coverage["signature"]]
    tables = {"signature_coverage": coverage}
    control_sets = [n for n in sets if resolved[n].geneset.role == "control"]
    if keys.SAMPLE in out.obs.columns:
        handling = sample_handling_table(out.obs, scores, controls=control_sets)
        tables[SAMPLE_HANDLING_TABLE] = handling
        if keys.TIMEPOINT in handling.columns:
            for c in control_sets:
                by_tp = handling.groupby(keys.TIMEPOINT, sort=False)[c].mean()
                log.info(
                    "score: %s (sample-handling control), mean of the sample means per "
                    "timepoint: %s (tables/sample_handling.tsv)",
                    c,
                    ", ".join(f"{tp} {v:.3g}" for tp, v in by_tp.items()),
                )
    details: dict[str, Any] = {
        "method": scfg.method,
        "collection": collection_version(),
        "sets": {
            name: {
                "label": r.geneset.label,
                "source": r.geneset.source,
                "version": r.geneset.version,
                "role": r.geneset.role,
                "genes_defined": list(r.geneset.genes),
                "genes_used": r.found,
                "genes_missing": r.missing,
                "aliases_used": r.aliases_used,
                "scored": name in sets,
                "n_controls": len(controls.get(name, [])),
            }
            for name, r in resolved.items()
        },
    }
    return StageResult(out, tables=tables, provenance=details)
