"""Stage ``differential``: what changes between timepoints, per cell type, with the donor as unit.

Four analyses of the scored cells (output of ``score``), each aggregated to
donors first, so cells are never replicates:

(a) Signature shifts (:func:`signature_shift_tests`)
    The mean score of each signature over a donor's cells of one type at one
    timepoint (groups with fewer than ``differential.min_cells`` cells are
    left out) is compared across donors per contrast: paired t-test (mean
    paired difference, Cohen's dz, 95% CI) and Wilcoxon signed-rank on the
    donors with both timepoints, or ``score ~ timepoint + (1 | donor)``
    (``test: mixed``, also uses donors seen at one timepoint). BH q-values over
    all cell types x signatures within a contrast.
(b) Pseudobulk DE (:func:`pseudobulk`, :func:`pseudobulk_de`)
    Raw counts summed per donor x timepoint x type (one sparse product),
    small pseudobulks and lowly expressed genes filtered, PyDESeq2 with
    ``~ donor + timepoint``, Wald test per contrast, BH per type and contrast;
    then a ULM enrichment of each signature on the Wald statistics
    (:func:`signature_enrichment`).
(c) Composition (:func:`composition_tests`)
    CLR of per-sample cell-type counts (pseudocount ``differential.pseudocount``)
    and log-ratios of type groups (naive / memory T), paired t across donors,
    BH per contrast.
(d) Covariates (:func:`covariate_associations`)
    Per type x signature x covariate, ``mean score ~ covariate + (1 | donor)``
    over donor x timepoint means (OLS fallback, noted), BH per covariate.

Everything a test could not use (a group below ``min_cells``, a donor missing a
timepoint, a type absent at a timepoint, too few donors) is a row of the
``differential_dropped`` table and a warning; constant values give NaN
p-values with a note, never an invented one.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .. import keys
from ..errors import ImmuneageWarning, InputError
from ..kernels.sparse import DEFAULT_CHUNK_SIZE
from ..progress import progress
from ..stats.composition import clr, group_log_ratio
from ..stats.deseq import deseq2_contrasts
from ..stats.enrichment import ulm
from ..stats.mixed import covariate_association, mixed_timepoint_test
from ..stats.multitest import bh_adjust
from ..stats.paired import paired_test
from ..stats.pseudobulk import filter_genes, pseudobulk_sum
from ._base import StageResult

if TYPE_CHECKING:
    import torch

    from ..config import Config, Contrast, DifferentialConfig

__all__ = [
    "COMPOSITION_COLUMNS",
    "COVARIATE_COLUMNS",
    "DROPPED_COLUMNS",
    "ENRICHMENT_COLUMNS",
    "MEANS_COLUMNS",
    "SHIFT_COLUMNS",
    "SUMMARY_COLUMNS",
    "check_config",
    "composition_tests",
    "contrast_donors",
    "covariate_associations",
    "de_table_name",
    "design_warnings",
    "pseudobulk",
    "pseudobulk_de",
    "read_covariates",
    "run_differential",
    "signature_enrichment",
    "signature_means",
    "signature_shift_tests",
]

#: obs column prefix of the per-cell signature scores written by ``score``.
SCORE_PREFIX = "score_"
#: ``uns["immuneage"]`` key of the signatures (name -> genes used) written by ``score``.
SIGNATURES_KEY = "signatures"
#: Columns that key the covariates CSV and are never covariates themselves.
COVARIATE_KEYS = (keys.SAMPLE, keys.DONOR, keys.TIMEPOINT)

SHIFT_COLUMNS = (
    "contrast",
    "cell_type",
    "signature",
    "test",
    "n_donors",
    "donors_dropped",
    "mean_reference",
    "mean_test",
    "effect",
    "dz",
    "ci_low",
    "ci_high",
    "statistic",
    "p_value",
    "q_value",
    "p_wilcoxon",
    "method",
    "note",
)
MEANS_COLUMNS = (
    "donor",
    "timepoint",
    "cell_type",
    "signature",
    "n_cells",
    "mean_score",
    "sample",
    "passes_min_cells",
)
SUMMARY_COLUMNS = (
    "cell_type",
    "contrast",
    "n_donors",
    "n_pseudobulks",
    "n_genes_tested",
    "n_q_lt_0_1",
    "status",
    "table",
)
ENRICHMENT_COLUMNS = (
    "contrast",
    "cell_type",
    "signature",
    "n_genes",
    "score",
    "p_value",
    "q_value",
)
COMPOSITION_COLUMNS = (
    "contrast",
    "cell_type",
    "n_donors",
    "mean_prop_reference",
    "mean_prop_test",
    "effect_clr",
    "ci_low",
    "ci_high",
    "p_value",
    "q_value",
    "kind",
    "dz",
    "p_wilcoxon",
    "note",
)
COVARIATE_COLUMNS = (
    "covariate",
    "cell_type",
    "signature",
    "n_donors",
    "n_obs",
    "slope",
    "ci_low",
    "ci_high",
    "p_value",
    "q_value",
    "method",
    "note",
)
DROPPED_COLUMNS = ("analysis", "contrast", "cell_type", "donor", "timepoint", "reason")


# --------------------------------------------------------------------------- helpers
def de_table_name(cell_type: str, contrast: str) -> str:
    """Table name (``pseudobulk_de/<cell_type>__<contrast>``) with a file-safe cell type.

    Spaces, slashes and any character other than letters, digits, ``.``, ``-``,
    ``+`` and ``_`` become ``_``.
    """
    safe = re.sub(r"[^A-Za-z0-9.+_-]", "_", str(cell_type))
    return f"pseudobulk_de/{safe}__{contrast}"


def _contrast_pairs(contrasts: Iterable[Contrast]) -> list[tuple[str, str, str]]:
    return [(c.name, c.test, c.reference) for c in contrasts]


def _dropped(
    analysis: str, contrast: str, cell_type: str, donor: str, timepoint: str, reason: str
) -> dict[str, str]:
    return {
        "analysis": analysis,
        "contrast": contrast,
        "cell_type": cell_type,
        "donor": donor,
        "timepoint": timepoint,
        "reason": reason,
    }


def _frame(rows: list[dict[str, Any]], columns: Iterable[str]) -> pd.DataFrame:
    cols = list(columns)
    return pd.DataFrame(rows, columns=cols) if rows else pd.DataFrame(columns=cols)


def _bh_within(table: pd.DataFrame, by: str, columns: Iterable[str]) -> pd.DataFrame:
    """Add ``q_value``: BH over the rows of each ``by`` group (e.g. within a contrast)."""
    table["q_value"] = np.nan
    for group in table[by].unique():
        m = (table[by] == group).to_numpy()
        table.loc[m, "q_value"] = bh_adjust(table.loc[m, "p_value"].to_numpy(dtype=float))
    return table[list(columns)]


def _signature_columns(adata: AnnData) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Signature name -> obs score column, and name -> genes (empty when unknown)."""
    info = adata.uns.get(keys.UNS, {})
    sets = info.get(SIGNATURES_KEY, {}) if isinstance(info, Mapping) else {}
    genes = {str(k): [str(g) for g in np.atleast_1d(v)] for k, v in dict(sets).items()}
    cols = {
        c[len(SCORE_PREFIX) :]: c
        for c in map(str, adata.obs.columns)
        if c.startswith(SCORE_PREFIX)
        and pd.api.types.is_numeric_dtype(adata.obs[c])
        and (not genes or c[len(SCORE_PREFIX) :] in genes)
    }
    return cols, genes


def _check_obs(obs: pd.DataFrame) -> None:
    need = [keys.SAMPLE, keys.DONOR, keys.TIMEPOINT, keys.CELL_TYPE]
    missing = [c for c in need if c not in obs.columns]
    if missing:
        raise InputError(
            f"differential: obs lacks column(s) {', '.join(missing)}; run the stages up to "
            "'score' first (immuneage run ... --until score)"
        )


def _sample_table(obs: pd.DataFrame) -> pd.DataFrame:
    """One row per sample: sample, donor, timepoint (strings)."""
    s = obs[[keys.SAMPLE, keys.DONOR, keys.TIMEPOINT]].astype(str).drop_duplicates()
    dup = s[keys.SAMPLE].duplicated(keep=False)
    if dup.any():
        raise InputError(
            f"differential: sample {s.loc[dup, keys.SAMPLE].iloc[0]!r} has several donors or "
            "timepoints in obs; each sample must be one donor at one timepoint"
        )
    twice = s.duplicated([keys.DONOR, keys.TIMEPOINT], keep=False)
    if twice.any():
        row = s.loc[twice].iloc[0]
        raise InputError(
            f"differential: donor {row[keys.DONOR]!r} has several samples at timepoint "
            f"{row[keys.TIMEPOINT]!r}; paired tests need one sample per donor x timepoint"
        )
    return s.reset_index(drop=True)


def _why_missing(
    donor: str,
    tp: str,
    cell_type: str,
    sampled: set[tuple[str, str]],
    counts: Mapping,
    min_cells: int,
) -> str:
    if (donor, tp) not in sampled:
        return f"donor has no {tp} sample"
    n = int(counts.get((donor, tp, cell_type), 0))
    if n == 0:
        return f"no {cell_type} cells at {tp}"
    return f"{n} {cell_type} cells at {tp} < min_cells {min_cells}"


# --------------------------------------------------------------------------- (a) signature shifts
def signature_means(
    obs: pd.DataFrame, score_columns: Mapping[str, str], *, min_cells: int
) -> pd.DataFrame:
    """Mean score per donor x timepoint x cell type x signature.

    Parameters
    ----------
    obs
        Per-cell table with ``sample``, ``donor``, ``timepoint``, ``cell_type``
        and the score columns; ``unassigned`` cells are left out.
    score_columns
        Signature name -> obs column.
    min_cells
        Groups with fewer cells get ``passes_min_cells = False``.

    Returns
    -------
    :data:`MEANS_COLUMNS`: one row per observed donor x timepoint x type x signature.
    """
    cells = obs.loc[obs[keys.CELL_TYPE].astype(str) != keys.UNASSIGNED]
    by = [keys.DONOR, keys.TIMEPOINT, keys.CELL_TYPE]
    frame = pd.DataFrame({c: cells[c].astype(str) for c in [*by, keys.SAMPLE]})
    if not score_columns or frame.empty:
        return pd.DataFrame(columns=list(MEANS_COLUMNS))
    for name, col in score_columns.items():
        frame[name] = cells[col].to_numpy(dtype=np.float64)
    grouped = frame.groupby(by, sort=True, observed=True)
    n = grouped.size().rename("n_cells")
    sample = grouped[keys.SAMPLE].first()
    means = grouped[list(score_columns)].mean()
    long = means.stack(future_stack=True).rename("mean_score").reset_index()
    long = long.rename(columns={f"level_{len(by)}": "signature"})
    long.columns = [*by, "signature", "mean_score"]
    long = long.merge(n.reset_index(), on=by).merge(sample.reset_index(), on=by)
    long["passes_min_cells"] = long["n_cells"] >= min_cells
    return long[list(MEANS_COLUMNS)].reset_index(drop=True)


def signature_shift_tests(
    means: pd.DataFrame,
    contrasts: Iterable[Contrast],
    samples: pd.DataFrame,
    *,
    test: str = "paired_t",
    min_cells: int = 10,
    min_donors: int = 3,
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Paired (or mixed-model) test of every cell type x signature per contrast.

    Parameters
    ----------
    means
        :func:`signature_means` output.
    contrasts
        The design's contrasts (``.name``, ``.test``, ``.reference``).
    samples
        One row per sample (``sample``, ``donor``, ``timepoint``), to tell a
        donor without a sample from one without cells of a type.
    test
        ``paired_t``, ``wilcoxon`` or ``mixed``: whose p-value is ``p_value``.
    min_cells
        Only for the dropped-row messages (``means`` carries ``passes_min_cells``).
    min_donors
        Fewer donors with both timepoints: the cell type is not tested in
        that contrast (a dropped row, no table rows).

    Returns
    -------
    The ``signature_shifts`` table (:data:`SHIFT_COLUMNS`, q-values by BH over
    each contrast's rows) and the dropped rows.
    """
    dropped: list[dict[str, str]] = []
    rows: list[dict[str, Any]] = []
    sampled = set(zip(samples[keys.DONOR], samples[keys.TIMEPOINT], strict=True))
    donors_all = sorted(samples[keys.DONOR].unique())
    ok = means.loc[means["passes_min_cells"].astype(bool)]
    counts = (
        means.drop_duplicates([keys.DONOR, keys.TIMEPOINT, keys.CELL_TYPE])
        .set_index([keys.DONOR, keys.TIMEPOINT, keys.CELL_TYPE])["n_cells"]
        .to_dict()
    )
    cell_types = list(dict.fromkeys(means[keys.CELL_TYPE]))
    signatures = list(dict.fromkeys(means["signature"]))
    for cname, tp_test, tp_ref in _contrast_pairs(contrasts):
        for ct in cell_types:
            sub = ok.loc[ok[keys.CELL_TYPE] == ct]
            have = {
                tp: set(sub.loc[sub[keys.TIMEPOINT] == tp, keys.DONOR]) for tp in (tp_ref, tp_test)
            }
            both = sorted(have[tp_ref] & have[tp_test])
            either = sorted(have[tp_ref] | have[tp_test])
            reasons = []
            for d in donors_all:
                if d in both:
                    continue
                miss = [tp for tp in (tp_ref, tp_test) if d not in have[tp]]
                why = "; ".join(_why_missing(d, tp, ct, sampled, counts, min_cells) for tp in miss)
                reasons.append((d, ",".join(miss), why))
                dropped.append(_dropped("signature_shifts", cname, ct, d, ",".join(miss), why))
            used = either if test == "mixed" else both
            if len(both) < min_donors:
                dropped.append(
                    _dropped(
                        "signature_shifts",
                        cname,
                        ct,
                        "",
                        "",
                        f"not tested: {len(both)} donor(s) with >= {min_cells} {ct} cells at both "
                        f"{tp_ref} and {tp_test} (< min_donors {min_donors})",
                    )
                )
                continue
            donors_dropped = "; ".join(
                f"{d} ({why})" for d, _, why in reasons if test != "mixed" or d not in used
            )
            for sig in signatures:
                s = sub.loc[sub["signature"] == sig]
                wide = s.pivot(index=keys.DONOR, columns=keys.TIMEPOINT, values="mean_score")
                pr = paired_test(wide.loc[both, tp_ref], wide.loc[both, tp_test])
                row: dict[str, Any] = {
                    "contrast": cname,
                    "cell_type": ct,
                    "signature": sig,
                    "test": test,
                    "n_donors": pr.n,
                    "donors_dropped": donors_dropped,
                    "mean_reference": pr.mean_reference,
                    "mean_test": pr.mean_test,
                    "effect": pr.effect,
                    "dz": pr.dz,
                    "ci_low": pr.ci_low,
                    "ci_high": pr.ci_high,
                    "statistic": pr.statistic,
                    "p_value": pr.p_wilcoxon if test == "wilcoxon" else pr.p_value,
                    "p_wilcoxon": pr.p_wilcoxon,
                    "method": "wilcoxon" if test == "wilcoxon" else "paired_t",
                    "note": pr.note,
                }
                if test == "mixed":
                    long = s.loc[
                        s[keys.DONOR].isin(used), [keys.DONOR, keys.TIMEPOINT, "mean_score"]
                    ]
                    mr = mixed_timepoint_test(long, tp_ref, tp_test, value="mean_score")
                    row |= {
                        "n_donors": mr.n_donors,
                        "mean_reference": mr.mean_reference,
                        "mean_test": mr.mean_test,
                        "effect": mr.effect,
                        "ci_low": mr.ci_low,
                        "ci_high": mr.ci_high,
                        "statistic": mr.statistic,
                        "p_value": mr.p_value,
                        "method": mr.method,
                        "note": mr.note,
                    }
                rows.append(row)
    table = _frame(rows, [c for c in SHIFT_COLUMNS if c != "q_value"])
    return _bh_within(table, "contrast", SHIFT_COLUMNS), dropped


# --------------------------------------------------------------------------- (b) pseudobulk DE
def pseudobulk(
    adata: AnnData, *, layer: str = keys.COUNTS, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> AnnData:
    """Raw counts summed per donor x timepoint x cell type (``unassigned`` left out).

    Parameters
    ----------
    adata
        Cells with raw counts in ``layers[layer]`` (sparse in memory, or an
        on-disk row source in backed mode) and obs ``sample``, ``donor``,
        ``timepoint``, ``cell_type``.
    layer
        Layer of raw counts.
    chunk_size
        Rows per block when the counts are read from disk.

    Returns
    -------
    AnnData with ``X`` the summed counts (CSR, float64, integral), obs
    ``donor``, ``timepoint`` (categories as in the input), ``cell_type``,
    ``sample``, ``n_cells``; obs names ``<sample>|<cell_type>``; var = the input's var names.
    """
    if layer not in adata.layers:
        raise InputError(
            f"differential: layers[{layer!r}] (raw counts) is missing; pseudobulk DE needs raw "
            "counts (written by ingest and carried by every stage)"
        )
    obs = adata.obs
    ct = obs[keys.CELL_TYPE].astype(str)
    groups = pd.DataFrame(
        {
            keys.CELL_TYPE: pd.Categorical(
                ct.where(ct != keys.UNASSIGNED),
                categories=[c for c in _categories(obs[keys.CELL_TYPE]) if c != keys.UNASSIGNED],
            ),
            keys.DONOR: obs[keys.DONOR].astype(str).to_numpy(),
            keys.TIMEPOINT: obs[keys.TIMEPOINT].to_numpy(),
        },
        index=obs.index,
    )
    if isinstance(obs[keys.TIMEPOINT].dtype, pd.CategoricalDtype):
        groups[keys.TIMEPOINT] = obs[keys.TIMEPOINT]
    counts = adata.layers[layer]
    sums, table = pseudobulk_sum(counts, groups, chunk_size=chunk_size)
    s2s = _sample_table(obs).set_index([keys.DONOR, keys.TIMEPOINT])[keys.SAMPLE]
    table[keys.SAMPLE] = [
        s2s.get((str(d), str(t)), "")
        for d, t in zip(table[keys.DONOR], table[keys.TIMEPOINT], strict=True)
    ]
    table.index = [
        f"{s}|{c}" for s, c in zip(table[keys.SAMPLE], table[keys.CELL_TYPE], strict=True)
    ]
    table = table[[keys.DONOR, keys.TIMEPOINT, keys.CELL_TYPE, keys.SAMPLE, "n_cells"]]
    return AnnData(X=sums, obs=table, var=pd.DataFrame(index=adata.var_names.copy()))


def _categories(col: pd.Series) -> list[str]:
    if isinstance(col.dtype, pd.CategoricalDtype):
        present = set(col.astype(str))
        return [str(c) for c in col.cat.categories if str(c) in present]
    return sorted(set(col.astype(str)))


def pseudobulk_de(
    pb: AnnData,
    contrasts: Iterable[Contrast],
    dcfg: DifferentialConfig,
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, list[dict[str, str]]]:
    """PyDESeq2 per cell type on the pseudobulks, Wald test per contrast.

    Parameters
    ----------
    pb
        :func:`pseudobulk` output.
    contrasts
        The design's contrasts.
    dcfg
        ``differential`` config (``pseudobulk_min_cells``, ``gene_min_counts``,
        ``gene_min_samples``, ``min_donors``, ``shrink``, ``n_cpus``).

    Returns
    -------
    Tables keyed by :func:`de_table_name` (``gene, base_mean, log2fc, lfc_se,
    stat, p_value, q_value`` [+ ``log2fc_shrunk``]; attribute
    ``attrs["cell_type"]``/``attrs["contrast"]``), the ``pseudobulk_de_summary``
    table and the dropped rows.
    """
    pairs = _contrast_pairs(contrasts)
    tables: dict[str, pd.DataFrame] = {}
    summary: list[dict[str, Any]] = []
    dropped: list[dict[str, str]] = []
    obs = pb.obs
    x = pb.X.tocsr() if sp.issparse(pb.X) else sp.csr_matrix(pb.X)
    cell_types = _categories(obs[keys.CELL_TYPE])
    for ct in progress(cell_types, desc="pseudobulk DE (PyDESeq2)", unit="cell type"):
        in_ct = (obs[keys.CELL_TYPE].astype(str) == ct).to_numpy()
        small = in_ct & (obs["n_cells"].to_numpy() < dcfg.pseudobulk_min_cells)
        for i in np.flatnonzero(small):
            dropped.append(
                _dropped(
                    "pseudobulk_de",
                    "",
                    ct,
                    str(obs[keys.DONOR].iloc[i]),
                    str(obs[keys.TIMEPOINT].iloc[i]),
                    f"pseudobulk of {int(obs['n_cells'].iloc[i])} cells < pseudobulk_min_cells "
                    f"{dcfg.pseudobulk_min_cells}",
                )
            )
        keep = in_ct & ~small
        sub = obs.loc[keep]
        per_donor = sub.groupby(keys.DONOR, observed=True).size()
        lone = per_donor.index[per_donor < 2]
        for d in lone:
            tp = str(sub.loc[sub[keys.DONOR] == d, keys.TIMEPOINT].iloc[0])
            dropped.append(
                _dropped(
                    "pseudobulk_de",
                    "",
                    ct,
                    str(d),
                    tp,
                    "donor has a usable pseudobulk at one timepoint only (nothing to pair with)",
                )
            )
        keep &= ~obs[keys.DONOR].astype(str).isin(set(map(str, lone))).to_numpy()
        sub = obs.loc[keep]
        tps = {
            tp: set(sub.loc[sub[keys.TIMEPOINT].astype(str) == tp, keys.DONOR].astype(str))
            for tp in set(sub[keys.TIMEPOINT].astype(str))
        }
        testable: list[tuple[str, str, str, int]] = []
        for cname, t_test, t_ref in pairs:
            n = len(tps.get(t_test, set()) & tps.get(t_ref, set()))
            if n < dcfg.min_donors:
                reason = (
                    f"skipped: {n} donor(s) with pseudobulks of >= {dcfg.pseudobulk_min_cells} cells "
                    f"at both {t_ref} and {t_test} (< min_donors {dcfg.min_donors})"
                )
                summary.append(_summary_row(ct, cname, n, int(keep.sum()), 0, 0, reason, ""))
                dropped.append(_dropped("pseudobulk_de", cname, ct, "", "", reason))
            else:
                testable.append((cname, t_test, t_ref, n))
        if not testable:
            continue
        counts = x[np.flatnonzero(keep)].toarray()
        genes = filter_genes(
            counts, min_count=dcfg.gene_min_counts, min_samples=dcfg.gene_min_samples
        )
        n_pb = int(keep.sum())
        n_params = sub[keys.DONOR].nunique() + sub[keys.TIMEPOINT].astype(str).nunique() - 1
        reason = ""
        if int(genes.sum()) < 2:
            reason = (
                f"skipped: {int(genes.sum())} gene(s) with >= {dcfg.gene_min_counts} counts in >= "
                f"{dcfg.gene_min_samples} pseudobulks"
            )
        elif n_pb - n_params < 1:
            reason = f"skipped: {n_pb} pseudobulks leave no residual df for {n_params} coefficients"
        if reason:
            for cname, _, _, n in testable:
                summary.append(_summary_row(ct, cname, n, n_pb, int(genes.sum()), 0, reason, ""))
                dropped.append(_dropped("pseudobulk_de", cname, ct, "", "", reason))
            continue
        cdf = pd.DataFrame(
            counts[:, genes], index=sub.index.astype(str), columns=pb.var_names[genes].astype(str)
        )
        meta = pd.DataFrame(
            {
                "donor": sub[keys.DONOR].astype(str).to_numpy(),
                "timepoint": sub[keys.TIMEPOINT].astype(str).to_numpy(),
            },
            index=cdf.index,
        )
        try:
            res, notes = deseq2_contrasts(
                cdf,
                meta,
                [(t, r) for _, t, r, _ in testable],
                shrink=dcfg.shrink,
                n_cpus=dcfg.n_cpus,
            )
        except Exception as exc:
            reason = f"skipped: PyDESeq2 failed ({type(exc).__name__}: {exc})"
            warnings.warn(f"differential: {ct}: {reason}", ImmuneageWarning, stacklevel=2)
            for cname, _, _, n in testable:
                summary.append(_summary_row(ct, cname, n, n_pb, int(genes.sum()), 0, reason, ""))
                dropped.append(_dropped("pseudobulk_de", cname, ct, "", "", reason))
            continue
        for cname, t_test, t_ref, n in testable:
            tab = res[(t_test, t_ref)]
            name = de_table_name(ct, cname)
            tab.attrs = {"cell_type": ct, "contrast": cname}
            tables[name] = tab
            status = "tested" + (f" (PyDESeq2: {'; '.join(notes)})" if notes else "")
            summary.append(
                _summary_row(
                    ct,
                    cname,
                    n,
                    n_pb,
                    int(tab["p_value"].notna().sum()),
                    int((tab["q_value"] < 0.1).sum()),
                    status,
                    name,
                )
            )
    return tables, _frame(summary, SUMMARY_COLUMNS), dropped


def _summary_row(
    ct: str, contrast: str, n: int, n_pb: int, n_genes: int, n_sig: int, status: str, table: str
) -> dict[str, Any]:
    return {
        "cell_type": ct,
        "contrast": contrast,
        "n_donors": n,
        "n_pseudobulks": n_pb,
        "n_genes_tested": n_genes,
        "n_q_lt_0_1": n_sig,
        "status": status,
        "table": table,
    }


def signature_enrichment(
    de_tables: Mapping[str, pd.DataFrame],
    gene_sets: Mapping[str, list[str]],
    *,
    min_genes: int = 5,
) -> pd.DataFrame:
    """ULM enrichment of each signature in each DE result (Wald statistics).

    Parameters
    ----------
    de_tables
        :func:`pseudobulk_de` tables (with ``attrs`` cell type and contrast).
    gene_sets
        Signature name -> genes.
    min_genes
        Minimum set members among a result's tested genes.

    Returns
    -------
    :data:`ENRICHMENT_COLUMNS`, BH q-values over all cell types x signatures within a contrast.
    """
    parts = []
    for tab in de_tables.values():
        stat = pd.Series(tab["stat"].to_numpy(dtype=float), index=tab["gene"].astype(str))
        r = ulm(stat, gene_sets, min_genes=min_genes)
        r.insert(0, "cell_type", tab.attrs["cell_type"])
        r.insert(0, "contrast", tab.attrs["contrast"])
        parts.append(r)
    if not parts:
        return pd.DataFrame(columns=list(ENRICHMENT_COLUMNS))
    return _bh_within(pd.concat(parts, ignore_index=True), "contrast", ENRICHMENT_COLUMNS)


# --------------------------------------------------------------------------- (c) composition
def composition_tests(
    obs: pd.DataFrame,
    contrasts: Iterable[Contrast],
    samples: pd.DataFrame,
    *,
    pseudocount: float = 0.5,
    log_ratios: Mapping[str, Mapping[str, list[str]]] | None = None,
    min_donors: int = 3,
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Paired tests of CLR-transformed cell-type proportions (and type-group log-ratios).

    Parameters
    ----------
    obs
        Per-cell ``sample``, ``donor``, ``timepoint``, ``cell_type``
        (``unassigned`` cells are not counted).
    contrasts
        The design's contrasts.
    samples
        One row per sample (``sample``, ``donor``, ``timepoint``).
    pseudocount
        Cells added to each count before logs (:mod:`pipeline.stats.composition`).
    log_ratios
        Name -> ``{"numerator": [...], "denominator": [...]}`` type groups.
    min_donors
        Fewer donors with both samples: the contrast is not tested.

    Returns
    -------
    The ``composition`` table (:data:`COMPOSITION_COLUMNS`: ``kind`` is
    ``clr`` or ``log_ratio``; for a log-ratio ``mean_prop_*`` is the numerator's
    share of numerator + denominator and ``effect_clr`` the mean paired
    difference of the natural log-ratio) and the dropped rows.
    """
    dropped: list[dict[str, str]] = []
    cells = obs.loc[obs[keys.CELL_TYPE].astype(str) != keys.UNASSIGNED]
    types = [c for c in _categories(obs[keys.CELL_TYPE]) if c != keys.UNASSIGNED]
    counts = (
        pd.crosstab(cells[keys.SAMPLE].astype(str), cells[keys.CELL_TYPE].astype(str))
        .reindex(index=samples[keys.SAMPLE], columns=types, fill_value=0)
        .fillna(0)
    )
    empty = counts.sum(axis=1) == 0
    meta = samples.set_index(keys.SAMPLE)
    for s in counts.index[empty]:
        dropped.append(
            _dropped(
                "composition",
                "",
                "",
                meta.at[s, keys.DONOR],
                meta.at[s, keys.TIMEPOINT],
                "sample has no assigned cells",
            )
        )
    counts = counts.loc[~empty]
    if counts.empty or not types:
        return pd.DataFrame(columns=list(COMPOSITION_COLUMNS)), dropped
    props = counts.div(counts.sum(axis=1), axis=0)
    coords = clr(counts, pseudocount)
    ratios: dict[str, tuple[pd.Series, pd.Series]] = {}
    for name, spec in (log_ratios or {}).items():
        present = [t for t in [*spec["numerator"], *spec["denominator"]] if t in types]
        if not any(t in types for t in spec["numerator"]) or not any(
            t in types for t in spec["denominator"]
        ):
            dropped.append(
                _dropped(
                    "composition",
                    "",
                    name,
                    "",
                    "",
                    f"log-ratio not computed: numerator or denominator types absent from the data (present: {present})",
                )
            )
            continue
        ratios[name] = group_log_ratio(
            counts, list(spec["numerator"]), list(spec["denominator"]), pseudocount
        )
    key = meta.loc[counts.index]
    rows: list[dict[str, Any]] = []
    for cname, t_test, t_ref in _contrast_pairs(contrasts):
        idx = {tp: key.index[key[keys.TIMEPOINT] == tp] for tp in (t_ref, t_test)}
        by_donor = {tp: pd.Series(idx[tp], index=key.loc[idx[tp], keys.DONOR]) for tp in idx}
        donors = sorted(set(by_donor[t_ref].index) & set(by_donor[t_test].index))
        for d in sorted(set(key[keys.DONOR]) - set(donors)):
            miss = [tp for tp in (t_ref, t_test) if d not in by_donor[tp].index]
            dropped.append(
                _dropped(
                    "composition",
                    cname,
                    "",
                    d,
                    ",".join(miss),
                    f"no usable {' and '.join(miss)} sample",
                )
            )
        if len(donors) < min_donors:
            dropped.append(
                _dropped(
                    "composition",
                    cname,
                    "",
                    "",
                    "",
                    f"not tested: {len(donors)} donor(s) with both samples (< min_donors {min_donors})",
                )
            )
            continue
        s_ref = by_donor[t_ref].loc[donors].to_numpy()
        s_test = by_donor[t_test].loc[donors].to_numpy()
        series: list[tuple[str, str, pd.Series, pd.Series]] = [
            (t, "clr", coords[t], props[t]) for t in types
        ] + [(n, "log_ratio", r, sh) for n, (r, sh) in ratios.items()]
        for name, kind, values, share in series:
            pr = paired_test(values.loc[s_ref].to_numpy(), values.loc[s_test].to_numpy())
            rows.append(
                {
                    "contrast": cname,
                    "cell_type": name,
                    "n_donors": pr.n,
                    "mean_prop_reference": float(np.nanmean(share.loc[s_ref])),
                    "mean_prop_test": float(np.nanmean(share.loc[s_test])),
                    "effect_clr": pr.effect,
                    "ci_low": pr.ci_low,
                    "ci_high": pr.ci_high,
                    "p_value": pr.p_value,
                    "kind": kind,
                    "dz": pr.dz,
                    "p_wilcoxon": pr.p_wilcoxon,
                    "note": pr.note,
                }
            )
    table = _frame(rows, [c for c in COMPOSITION_COLUMNS if c != "q_value"])
    return _bh_within(table, "contrast", COMPOSITION_COLUMNS), dropped


# --------------------------------------------------------------------------- (d) covariates
def check_config(cfg: Config, sheet: Any) -> None:
    """Fail fast, before any stage runs, on what this stage would stop on.

    Called by :func:`pipeline.preflight.validate_inputs` when ``differential``
    will run. Checks the design against the sample sheet (some contrast must
    have ``differential.min_donors`` donors sampled at both of its timepoints,
    as :func:`run_differential` requires) and the covariates table
    (``differential.covariates`` against the sheet's samples,
    ``differential.covariate_columns`` against its columns).

    Raises
    ------
    InputError
        No contrast can be tested (the message gives the donors counted per
        contrast against ``min_donors`` and how to run the stages before this
        one only); ``covariate_columns`` without a covariates file; as
        :func:`read_covariates`.
    """
    dcfg = cfg.differential
    contrasts = list(cfg.design.contrasts)
    samples = _sheet_samples(sheet)
    both = contrast_donors(samples, contrasts)
    if max((len(v) for v in both.values()), default=0) < dcfg.min_donors:
        n_samples, n_donors = len(samples), samples[keys.DONOR].nunique()
        raise InputError(
            f"differential: no contrast can be tested on sample sheet {sheet.path} "
            f"({n_samples} sample(s), {n_donors} donor(s)): donors with samples at both "
            f"timepoints of each contrast: {_donors_text(both, contrasts)}; "
            f"differential.min_donors is {dcfg.min_donors}. Add samples so that at least "
            f"{dcfg.min_donors} donors have both timepoints of a contrast (check the sheet's "
            "donor and timepoint columns and design.contrasts), lower differential.min_donors "
            "(at least 2), or run only the stages before the donor-level tests: "
            "--until score (or --until annotate), or a QC-only pilot run: --qc-only"
        )
    if dcfg.covariates is None and dcfg.covariate_columns is not None:
        raise InputError(
            f"differential.covariate_columns names {', '.join(map(repr, dcfg.covariate_columns))} "
            "but differential.covariates (the per-sample covariates CSV those columns are read "
            "from) is not set; set differential.covariates to a CSV with a 'sample' column and "
            "these columns, or remove differential.covariate_columns"
        )
    if dcfg.covariates is not None:
        read_covariates(dcfg.covariates, samples, dcfg.covariate_columns)


def read_covariates(
    path: str | Path, samples: pd.DataFrame, columns: list[str] | None = None
) -> pd.DataFrame:
    """Read and validate the per-sample covariates CSV.

    Parameters
    ----------
    path
        CSV with a ``sample`` column and numeric covariate columns (``donor``
        and ``timepoint`` columns, if present, are ignored).
    samples
        The run's samples (``sample`` column); each must have a row.
    columns
        Covariates to use; ``None``: every column but ``sample``, ``donor``, ``timepoint``.

    Returns
    -------
    Samples x covariates (float; an empty cell is NaN, i.e. missing), indexed by sample.

    Raises
    ------
    InputError
        Unreadable file, no ``sample`` column, duplicated or missing samples,
        unknown covariate columns, or a non-numeric value (the message names
        the file, the row and the column).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"covariates file {p} (differential.covariates) does not exist")
    try:
        raw = pd.read_csv(p, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise InputError(f"covariates file {p} is not a readable CSV: {exc}") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    if keys.SAMPLE not in raw.columns:
        raise InputError(
            f"covariates file {p} has no 'sample' column (columns: {', '.join(raw.columns)}); "
            "key each row by the sample id of the sample sheet"
        )
    raw[keys.SAMPLE] = raw[keys.SAMPLE].str.strip()
    dup = raw[keys.SAMPLE].duplicated(keep=False)
    if dup.any():
        rows = [int(i) + 2 for i in np.flatnonzero(dup)]
        raise InputError(
            f"covariates file {p}: sample {raw.loc[dup, keys.SAMPLE].iloc[0]!r} appears on several "
            f"rows ({', '.join(map(str, rows))}); give one row per sample"
        )
    candidates = [c for c in raw.columns if c not in COVARIATE_KEYS]
    if columns is not None:
        unknown = [c for c in columns if c not in raw.columns]
        if unknown:
            raise InputError(
                f"covariates file {p} has no column(s) {', '.join(unknown)} named in "
                f"differential.covariate_columns; its columns are: {', '.join(candidates)}"
            )
        candidates = list(columns)
    if not candidates:
        raise InputError(
            f"covariates file {p} has no covariate column besides {', '.join(COVARIATE_KEYS)}"
        )
    missing = sorted(set(samples[keys.SAMPLE]) - set(raw[keys.SAMPLE]))
    if missing:
        raise InputError(
            f"covariates file {p} has no row for {len(missing)} sample(s) of the run: "
            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}; add them (leave a "
            "value empty when it is unknown)"
        )
    out = pd.DataFrame(index=pd.Index(raw[keys.SAMPLE], name=keys.SAMPLE))
    for c in candidates:
        text = raw[c].str.strip()
        num = pd.to_numeric(text.where(text != ""), errors="coerce")
        bad = (text != "") & (num.isna() | ~np.isfinite(num.to_numpy(dtype=float)))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(
                f"covariates file {p}, row {i + 2} (sample {raw[keys.SAMPLE].iloc[i]!r}), column "
                f"{c!r}: {text.iloc[i]!r} is not a number; covariates must be numeric (leave the "
                "cell empty for a missing value)"
            )
        out[c] = num.to_numpy(dtype=float)
    return out.loc[samples[keys.SAMPLE].to_numpy()]


def covariate_associations(
    means: pd.DataFrame,
    covariates: pd.DataFrame,
    *,
    min_donors: int = 3,
    adjust_timepoint: bool = False,
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Mixed model ``mean score ~ covariate + (1 | donor)`` per type x signature x covariate.

    Parameters
    ----------
    means
        :func:`signature_means` output (groups below ``min_cells`` are ignored).
    covariates
        :func:`read_covariates` output (indexed by sample).
    min_donors
        Fewer donors with a usable value: no test (dropped row).
    adjust_timepoint
        Add timepoint as a fixed effect.

    Returns
    -------
    The ``covariate_associations`` table (:data:`COVARIATE_COLUMNS`, BH over
    cell types x signatures within each covariate) and the dropped rows.
    """
    dropped: list[dict[str, str]] = []
    rows: list[dict[str, Any]] = []
    ok = means.loc[means["passes_min_cells"].astype(bool)]
    for cov in covariates.columns:
        vals = covariates[cov]
        for s in vals.index[vals.isna()]:
            dropped.append(
                _dropped("covariate_associations", "", "", "", "", f"sample {s}: {cov} missing")
            )
        for (ct, sig), g in ok.groupby([keys.CELL_TYPE, "signature"], sort=False):
            d = g[[keys.DONOR, keys.TIMEPOINT, "mean_score", keys.SAMPLE]].copy()
            d["covariate"] = vals.reindex(d[keys.SAMPLE]).to_numpy()
            d = d.dropna(subset=["covariate"])
            n_d = int(d[keys.DONOR].nunique())
            if n_d < min_donors:
                dropped.append(
                    _dropped(
                        "covariate_associations",
                        "",
                        ct,
                        "",
                        "",
                        f"{cov} x {sig}: {n_d} donor(s) (< min_donors {min_donors})",
                    )
                )
                continue
            r = covariate_association(
                d, value="mean_score", covariate="covariate", adjust_timepoint=adjust_timepoint
            )
            rows.append(
                {
                    "covariate": cov,
                    "cell_type": ct,
                    "signature": sig,
                    "n_donors": r.n_donors,
                    "n_obs": r.n_obs,
                    "slope": r.slope,
                    "ci_low": r.ci_low,
                    "ci_high": r.ci_high,
                    "p_value": r.p_value,
                    "method": r.method,
                    "note": r.note,
                }
            )
    table = _frame(rows, [c for c in COVARIATE_COLUMNS if c != "q_value"])
    return _bh_within(table, "covariate", COVARIATE_COLUMNS), dropped


# --------------------------------------------------------------------------- the stage
def contrast_donors(samples: pd.DataFrame, contrasts: Iterable[Contrast]) -> dict[str, list[str]]:
    """Per contrast, the donors sampled at both of its timepoints.

    Parameters
    ----------
    samples
        One row per sample: ``donor`` and ``timepoint`` (strings).
    contrasts
        The design's contrasts.

    Returns
    -------
    ``{contrast name: sorted donors}``, in contrast order.
    """
    by_tp = samples.groupby(keys.TIMEPOINT)[keys.DONOR].agg(set).to_dict()
    return {
        c.name: sorted(by_tp.get(c.reference, set()) & by_tp.get(c.test, set())) for c in contrasts
    }


def _donors_text(both: Mapping[str, list[str]], contrasts: Iterable[Contrast]) -> str:
    """``acute vs baseline: 1 donor (D1); longterm vs baseline: 0 donors``."""
    parts = []
    for c in contrasts:
        donors = both[c.name]
        shown = ", ".join(donors[:5]) + (f" and {len(donors) - 5} more" if len(donors) > 5 else "")
        word = "donor" if len(donors) == 1 else "donors"
        parts.append(f"{c}: {len(donors)} {word}" + (f" ({shown})" if donors else ""))
    return "; ".join(parts)


def _check_design(samples: pd.DataFrame, contrasts: list[Contrast], min_donors: int) -> None:
    """Raise when no contrast has ``min_donors`` donors sampled at both of its timepoints."""
    both = contrast_donors(samples, contrasts)
    if max((len(v) for v in both.values()), default=0) < min_donors:
        raise InputError(
            "differential: no test can run: every contrast has fewer than "
            f"differential.min_donors = {min_donors} donors sampled at both of its timepoints "
            f"({_donors_text(both, contrasts)}; timepoints in the data: "
            f"{', '.join(sorted(set(samples[keys.TIMEPOINT])))}). Paired tests need "
            "the same donors at both timepoints: check the sample sheet's donor and timepoint "
            "columns and design.contrasts"
        )


def _sheet_samples(sheet: Any) -> pd.DataFrame:
    """One row per sample of a :class:`~pipeline.io.samplesheet.SampleSheet`."""
    return pd.DataFrame(
        {
            keys.SAMPLE: [r.sample for r in sheet.rows],
            keys.DONOR: [str(r.donor) for r in sheet.rows],
            keys.TIMEPOINT: [str(r.timepoint) for r in sheet.rows],
        },
        columns=list(COVARIATE_KEYS),
    )


def design_warnings(cfg: Config, sheet: Any) -> list[str]:
    """What the sheet's design leaves untested, said before anything runs.

    A contrast with fewer than ``differential.min_donors`` donors sampled at
    both of its timepoints yields no rows (as :func:`run_differential` treats
    it: a row of ``differential_dropped`` and a warning) while other contrasts
    run. Called by :func:`pipeline.preflight.validate_inputs` after
    :func:`check_config` passed.

    Returns
    -------
    One text per short contrast (not issued).
    """
    contrasts = list(cfg.design.contrasts)
    need = cfg.differential.min_donors
    both = contrast_donors(_sheet_samples(sheet), contrasts)
    return [
        f"differential: contrast {c} has {len(both[c.name])} donor(s) with samples at both "
        f"{c.reference} and {c.test} in {sheet.path} (differential.min_donors = {need}): it "
        "yields no test rows (tables/differential_dropped.tsv says why); the other contrasts "
        "are tested"
        for c in contrasts
        if len(both[c.name]) < need
    ]


def run_differential(
    adata: AnnData, cfg: Config, *, device: torch.device | str = "cpu"
) -> StageResult:
    """Test what changes between timepoints per cell type, donors as replicates.

    Parameters
    ----------
    adata
        Output of ``score``: obs ``sample``, ``donor``, ``timepoint``,
        ``cell_type`` and ``score_<set>`` columns; ``uns["immuneage"]["signatures"]``
        (set -> genes); ``layers["counts"]`` raw counts.
    cfg
        Run configuration (reads ``design`` and ``differential``; ``chunk_size`` for
        counts read from disk).
    device
        The run's device (the work here is host-side statistics).

    Returns
    -------
    StageResult whose AnnData is the pseudobulk (obs ``donor``, ``timepoint``,
    ``cell_type``, ``sample``, ``n_cells``; ``X`` the summed raw counts, sparse;
    ``uns["immuneage"]["differential"]`` the parameters and a summary) and the
    tables ``signature_means``, ``signature_shifts``, ``pseudobulk_de_summary``,
    ``pseudobulk_de/<cell_type>__<contrast>``, ``signature_enrichment``,
    ``composition``, ``covariate_associations`` (with covariates) and
    ``differential_dropped`` (columns: ``docs/outputs.md``).

    Raises
    ------
    InputError
        Missing obs columns or counts, a bad covariates file, or no test at
        all can run (the message says why).
    """
    dcfg = cfg.differential
    obs = adata.obs
    _check_obs(obs)
    samples = _sample_table(obs)
    contrasts = list(cfg.design.contrasts)
    present_tps = set(samples[keys.TIMEPOINT])
    dropped: list[dict[str, str]] = []
    for c in contrasts:
        absent = [tp for tp in (c.reference, c.test) if tp not in present_tps]
        if absent:
            msg = f"contrast {c.name}: no sample at timepoint(s) {', '.join(absent)}; it yields no rows"
            warnings.warn(f"differential: {msg}", ImmuneageWarning, stacklevel=2)
            dropped.append(_dropped("all", c.name, "", "", ",".join(absent), msg))
    _check_design(samples, contrasts, dcfg.min_donors)
    lone = samples.groupby(keys.DONOR)[keys.TIMEPOINT].nunique()
    for d in lone.index[lone < 2]:
        tp = samples.loc[samples[keys.DONOR] == d, keys.TIMEPOINT].iloc[0]
        dropped.append(
            _dropped(
                "all",
                "",
                "",
                str(d),
                str(tp),
                "donor sampled at one timepoint only: enters no paired test",
            )
        )
    if (lone < 2).any():
        warnings.warn(
            f"differential: donor(s) {', '.join(map(str, lone.index[lone < 2]))} have one timepoint "
            "only and enter no paired test (see tables/differential_dropped.tsv)",
            ImmuneageWarning,
            stacklevel=2,
        )

    score_cols, gene_sets = _signature_columns(adata)
    if not score_cols:
        warnings.warn(
            "differential: no score_<set> columns in obs; signature shifts, enrichment and "
            "covariate associations are skipped",
            ImmuneageWarning,
            stacklevel=2,
        )
    means = signature_means(obs, score_cols, min_cells=dcfg.min_cells)
    for _, r in (
        means.loc[~means["passes_min_cells"].astype(bool)]
        .drop_duplicates([keys.DONOR, keys.TIMEPOINT, keys.CELL_TYPE])
        .iterrows()
    ):
        dropped.append(
            _dropped(
                "signature_means",
                "",
                r[keys.CELL_TYPE],
                r[keys.DONOR],
                r[keys.TIMEPOINT],
                f"{int(r['n_cells'])} cells < min_cells {dcfg.min_cells}: left out of the tests",
            )
        )
    shifts, d_shift = signature_shift_tests(
        means,
        contrasts,
        samples,
        test=dcfg.test,
        min_cells=dcfg.min_cells,
        min_donors=dcfg.min_donors,
    )
    dropped += d_shift

    pb = pseudobulk(adata, chunk_size=cfg.chunk_size)
    de_tables: dict[str, pd.DataFrame] = {}
    de_summary = pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    if dcfg.deseq:
        de_tables, de_summary, d_de = pseudobulk_de(pb, contrasts, dcfg)
        dropped += d_de
    enrichment = pd.DataFrame(columns=list(ENRICHMENT_COLUMNS))
    if dcfg.enrichment == "ulm" and de_tables:
        if gene_sets:
            enrichment = signature_enrichment(
                de_tables, gene_sets, min_genes=dcfg.enrichment_min_genes
            )
        else:
            warnings.warn(
                f"differential: uns['{keys.UNS}']['{SIGNATURES_KEY}'] (genes of each signature) is "
                "missing; signature enrichment is skipped",
                ImmuneageWarning,
                stacklevel=2,
            )

    composition, d_comp = composition_tests(
        obs,
        contrasts,
        samples,
        pseudocount=dcfg.pseudocount,
        log_ratios=dcfg.log_ratios,
        min_donors=dcfg.min_donors,
    )
    dropped += d_comp

    tables: dict[str, pd.DataFrame] = {}
    if dcfg.covariates is not None:
        cov = read_covariates(dcfg.covariates, samples, dcfg.covariate_columns)
        assoc, d_cov = covariate_associations(
            means, cov, min_donors=dcfg.min_donors, adjust_timepoint=dcfg.covariate_adjust_timepoint
        )
        dropped += d_cov
        tables["covariate_associations"] = assoc

    n_de = len(de_tables)
    if shifts.empty and composition.empty and n_de == 0:
        warnings.warn(
            "differential: the design allows paired tests but no cell type had enough cells "
            f"(>= {dcfg.min_cells} per donor x timepoint in >= {dcfg.min_donors} donors) and no "
            "composition test ran; all tables are empty (is every cell 'unassigned'? see "
            "tables/cell_type_counts.tsv and tables/differential_dropped.tsv)",
            ImmuneageWarning,
            stacklevel=2,
        )
    for c in contrasts:
        if c.name not in set(shifts["contrast"]) and c.name not in set(composition["contrast"]):
            warnings.warn(
                f"differential: contrast {c.name} yields no signature-shift or composition rows "
                "(too few donors with both timepoints; see tables/differential_dropped.tsv)",
                ImmuneageWarning,
                stacklevel=2,
            )
    untested = sorted(
        {(r["contrast"], r["cell_type"]) for r in d_shift if r["donor"] == "" and r["cell_type"]}
    )
    if untested:
        warnings.warn(
            f"differential: {len(untested)} cell type x contrast pair(s) not tested for signature "
            f"shifts (fewer than {dcfg.min_donors} donors with >= {dcfg.min_cells} cells at both "
            f"timepoints), e.g. {untested[0][1]} in {untested[0][0]}; see tables/differential_dropped.tsv",
            ImmuneageWarning,
            stacklevel=2,
        )

    tables |= {
        "signature_means": means,
        "signature_shifts": shifts,
        "pseudobulk_de_summary": de_summary,
        "signature_enrichment": enrichment,
        "composition": composition,
        "differential_dropped": _frame(dropped, DROPPED_COLUMNS).drop_duplicates(ignore_index=True),
    }
    tables |= de_tables
    pb.uns[keys.UNS] = {
        "differential": {
            "test": dcfg.test,
            "min_cells": dcfg.min_cells,
            "min_donors": dcfg.min_donors,
            "contrasts": [c.name for c in contrasts],
            "signatures": list(score_cols),
            "n_signature_tests": len(shifts),
            "n_signature_q_lt_0_1": int((shifts["q_value"] < 0.1).sum()) if len(shifts) else 0,
            "n_de_tables": n_de,
            "n_dropped": len(dropped),
            "device": str(device),
            "pseudocount": dcfg.pseudocount,
        }
    }
    return StageResult(adata=pb, tables=tables)
