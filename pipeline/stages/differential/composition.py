"""(c) Composition: cell-type shares (relative) and cells per uL (absolute), donor-paired.

Two questions, two tables:

``composition`` (relative abundance)
    A type's share of the sample's assigned cells. Default
    ``composition_method: propeller`` (Phipson et al. 2022): the transformed
    share of each sample (:func:`~pipeline.stats.composition.transform_proportions`),
    the donors' paired differences, a paired t-test per type, optionally with
    the variances moderated across types (limma's empirical Bayes,
    :func:`~pipeline.stats.composition.moderated_paired_t`). ``clr``: the
    centred log-ratio with a size-aware pseudocount, paired t. Shares are
    relative: when NK cells triple every other share falls, so an unchanged
    type can be "down" here; the ``question`` column says so. Log-ratios of
    type groups (naive / memory T) are rows of the same table (their own
    question and FDR family).
``composition_absolute`` (absolute abundance)
    With a per-sample total (cells per uL, ``differential.absolute_total_column``
    of the covariates file): cells per uL of each type = share x total, tested
    donor-paired on ``log2`` cells per uL. Only types whose numbers change are called.

In both, each donor pair is compared at the smaller sample's size (expected
rarefaction, :func:`~pipeline.stats.composition.expected_at_depth`), so a rare
type is not called because one timepoint's samples are smaller; types present
in too few of a contrast's samples or too rare are not tested (a row of
``differential_dropped`` says why); the direction word comes from the change
in mean share (mean cells per uL), never from a transformed value's sign.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from ... import keys
from ...stats.composition import (
    clr,
    group_log_ratio,
    log_abundance,
    moderated_paired_t,
    transform_proportions,
)
from ...stats.multitest import bh_adjust
from ...stats.paired import paired_test

if TYPE_CHECKING:
    from ...config import Contrast
from ._common import (
    _categories,
    _contrast_pairs,
    _dropped,
    _frame,
)

#: ``question`` of the relative rows (types' shares).
QUESTION_RELATIVE = "relative abundance (share of the sample's assigned cells)"
#: ``question`` of the group log-ratio rows.
QUESTION_RATIO = "ratio of two type groups (numerator vs denominator cells)"
#: ``question`` of the absolute rows.
QUESTION_ABSOLUTE = "absolute abundance (cells per uL)"
#: FDR families (``family`` column): BH over all rows of a family, both contrasts together.
FAMILY_RELATIVE = "composition_relative"
FAMILY_RATIO = "composition_log_ratio"
FAMILY_ABSOLUTE = "composition_absolute"

COMPOSITION_COLUMNS = (
    "contrast",
    "cell_type",
    "n_donors",
    "mean_prop_reference",
    "mean_prop_test",
    "effect",
    "scale",
    "ci_low",
    "ci_high",
    "p_value",
    "q_value",
    "family",
    "kind",
    "question",
    "direction",
    "dz",
    "p_wilcoxon",
    "note",
    "effect_clr",
)
#: The absolute table: the relative table's columns (no ``effect_clr``) with the
#: mean cells per uL at each timepoint after ``n_donors``.
ABSOLUTE_COLUMNS = (
    *COMPOSITION_COLUMNS[:3],
    "mean_per_ul_reference",
    "mean_per_ul_test",
    *(c for c in COMPOSITION_COLUMNS[3:] if c != "effect_clr"),
)


def _direction(reference: float, test: float) -> str:
    if not (np.isfinite(reference) and np.isfinite(test)) or test == reference:
        return ""
    return "up" if test > reference else "down"


def _bh_families(table: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Add ``q_value``: BH over all rows of each ``family`` (all contrasts together)."""
    table["q_value"] = np.nan
    for fam in table["family"].unique():
        m = (table["family"] == fam).to_numpy()
        table.loc[m, "q_value"] = bh_adjust(table.loc[m, "p_value"].to_numpy(dtype=float))
    return table[list(columns)]


def _counts(
    obs: pd.DataFrame | None,
    samples: pd.DataFrame,
    analysis: str,
    given: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, list[str], list[dict[str, str]]]:
    """Samples x types counts of assigned cells (empty samples dropped), sample meta, types."""
    dropped: list[dict[str, str]] = []
    if given is not None:
        types = [str(c) for c in given.columns if str(c) != keys.UNASSIGNED]
        counts = given.rename(columns=str).reindex(
            index=samples[keys.SAMPLE], columns=types, fill_value=0
        )
    else:
        if obs is None:
            raise ValueError("give obs or counts")
        cells = obs.loc[obs[keys.CELL_TYPE].astype(str) != keys.UNASSIGNED]
        types = [c for c in _categories(obs[keys.CELL_TYPE]) if c != keys.UNASSIGNED]
        counts = pd.crosstab(
            cells[keys.SAMPLE].astype(str), cells[keys.CELL_TYPE].astype(str)
        ).reindex(index=samples[keys.SAMPLE], columns=types, fill_value=0)
    counts = counts.fillna(0).astype(np.int64)
    meta = samples.set_index(keys.SAMPLE)
    empty = counts.sum(axis=1) == 0
    for s in counts.index[empty]:
        dropped.append(
            _dropped(
                analysis,
                "",
                "",
                meta.at[s, keys.DONOR],
                meta.at[s, keys.TIMEPOINT],
                "sample has no assigned cells",
            )
        )
    return counts.loc[~empty], meta, types, dropped


def _donor_pairs(
    key: pd.DataFrame, cname: str, t_ref: str, t_test: str, min_donors: int, analysis: str
) -> tuple[list[str], np.ndarray, np.ndarray, list[dict[str, str]]]:
    """Donors with a usable sample at both timepoints and their (reference, test) samples."""
    dropped: list[dict[str, str]] = []
    idx = {tp: key.index[key[keys.TIMEPOINT] == tp] for tp in (t_ref, t_test)}
    by_donor = {tp: pd.Series(idx[tp], index=key.loc[idx[tp], keys.DONOR]) for tp in idx}
    donors = sorted(set(by_donor[t_ref].index) & set(by_donor[t_test].index))
    for d in sorted(set(key[keys.DONOR]) - set(donors)):
        miss = [tp for tp in (t_ref, t_test) if d not in by_donor[tp].index]
        dropped.append(
            _dropped(
                analysis, cname, "", d, ",".join(miss), f"no usable {' and '.join(miss)} sample"
            )
        )
    if len(donors) < min_donors:
        dropped.append(
            _dropped(
                analysis,
                cname,
                "",
                "",
                "",
                f"not tested: {len(donors)} donor(s) with both samples (< min_donors {min_donors})",
            )
        )
        return donors, np.array([]), np.array([]), dropped
    return (
        donors,
        by_donor[t_ref].loc[donors].to_numpy(),
        by_donor[t_test].loc[donors].to_numpy(),
        dropped,
    )


def abundance_filter(
    counts: pd.DataFrame, *, min_prevalence: float, min_prop: float
) -> tuple[list[str], dict[str, str]]:
    """Types to test over a contrast's samples, and why each other type is not tested.

    Parameters
    ----------
    counts
        The contrast's samples x all types (row sums: the samples' assigned cells).
    min_prevalence
        A type needs >= 1 cell in at least this share of the samples ...
    min_prop
        ... and a mean share over the samples of at least this.

    Returns
    -------
    The tested types (column order) and type -> reason for the others.
    """
    n = len(counts)
    present = (counts > 0).sum(axis=0)
    share = counts.div(counts.sum(axis=1), axis=0).mean(axis=0)
    keep, why = [], {}
    for t in counts.columns:
        if present[t] < min_prevalence * n:
            why[t] = (
                f"not tested: {t} has cells in {int(present[t])} of the contrast's {n} samples "
                f"(< composition_min_prevalence {min_prevalence:g})"
            )
        elif share[t] < min_prop:
            why[t] = (
                f"not tested: {t} is {100 * share[t]:.3g}% of the cells on average over the "
                f"contrast's {n} samples (< composition_min_prop {100 * min_prop:.3g}%)"
            )
        else:
            keep.append(t)
    return keep, why


def _test_rows(
    values: pd.DataFrame,
    n: int,
    tested: list[str],
    *,
    moderate: bool,
) -> dict[str, dict[str, Any]]:
    """Paired tests of ``values`` (first ``n`` rows reference, next ``n`` test) per tested type."""
    ref = values.iloc[:n][tested].to_numpy(dtype=float)
    tst = values.iloc[n:][tested].to_numpy(dtype=float)
    mt = moderated_paired_t(tst - ref, moderate=moderate)
    out: dict[str, dict[str, Any]] = {}
    for j, t in enumerate(tested):
        pr = paired_test(ref[:, j], tst[:, j])
        ok = np.isfinite(pr.p_value)
        out[t] = {
            "n_donors": pr.n,
            "effect": pr.effect,
            "ci_low": float(mt.ci_low[j]) if ok else np.nan,
            "ci_high": float(mt.ci_high[j]) if ok else np.nan,
            "p_value": float(mt.p_value[j]) if ok else np.nan,
            "dz": pr.dz,
            "p_wilcoxon": pr.p_wilcoxon,
            "note": pr.note,
        }
    return out


def composition_tests(
    obs: pd.DataFrame | None,
    contrasts: Iterable[Contrast],
    samples: pd.DataFrame,
    *,
    method: Literal["propeller", "clr"] = "propeller",
    transform: Literal["asin_sqrt", "logit"] = "logit",
    moderate: bool = False,
    min_prevalence: float = 0.5,
    min_prop: float = 0.001,
    pseudocount: float = 0.5,
    log_ratios: Mapping[str, Mapping[str, list[str]]] | None = None,
    min_donors: int = 3,
    match_depth: bool = True,
    counts: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Donor-paired tests of cell-type shares (relative abundance) and type-group log-ratios.

    Parameters
    ----------
    obs
        Per-cell ``sample``, ``donor``, ``timepoint``, ``cell_type``
        (``unassigned`` cells are not counted).
    contrasts
        The design's contrasts.
    samples
        One row per sample (``sample``, ``donor``, ``timepoint``).
    method
        ``"propeller"``: transformed shares, paired t per type (``transform``,
        ``moderate``); ``"clr"``: centred log-ratio with a size-aware
        pseudocount (the reference: the geometric mean of the tested types), paired t.
    transform
        ``"logit"`` or ``"asin_sqrt"`` (``propeller``).
    moderate
        Moderate the types' variances by empirical Bayes (``propeller``).
    min_prevalence, min_prop
        Per contrast, over its donors' samples: a type is tested only with
        >= 1 cell in this share of the samples and this mean share.
    pseudocount
        Cells added before logs in a sample of mean size (CLR, log-ratios):
        scaled by the sample's size, i.e. a pseudo-proportion.
    log_ratios
        Name -> ``{"numerator": [...], "denominator": [...]}`` type groups.
    min_donors
        Fewer donors with both samples: the contrast is not tested.
    match_depth
        Compare each donor's two samples at the smaller one's size (exact
        expectation over the subsample; :mod:`pipeline.stats.composition`).
    counts
        Samples x types cell counts (index ``sample``) to use instead of
        counting ``obs`` (which may then be ``None``).

    Returns
    -------
    The ``composition`` table (:data:`COMPOSITION_COLUMNS`) and the dropped
    rows. ``kind`` is ``propeller`` or ``clr`` (``question`` relative
    abundance, ``family`` ``composition_relative``) or ``log_ratio``
    (``question`` ratio of two type groups, ``family``
    ``composition_log_ratio``; ``mean_prop_*`` the numerator's share of
    numerator + denominator). ``effect`` is the mean paired difference on
    ``scale`` (``"logit proportion"``, ``"asin_sqrt proportion"``, ``"clr"``
    or ``"log ratio"``: natural log); ``direction`` is ``up``/``down`` from
    ``mean_prop_test - mean_prop_reference`` (means over the paired donors).
    ``q_value``: Benjamini-Hochberg over all rows of the same ``family``
    across all contrasts (one family per question). ``effect_clr`` (the
    size-aware CLR difference; for log-ratios the log-ratio difference) is
    kept for readers of the old table.
    """
    counts, meta, types, dropped = _counts(obs, samples, "composition", counts)
    if counts.empty or not types:
        return pd.DataFrame(columns=list(COMPOSITION_COLUMNS)), dropped
    ratio_specs: dict[str, tuple[list[str], list[str]]] = {}
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
        ratio_specs[name] = (list(spec["numerator"]), list(spec["denominator"]))
    key = meta.loc[counts.index]
    scale = f"{transform} proportion" if method == "propeller" else "clr"
    rows: list[dict[str, Any]] = []
    for cname, t_test, t_ref in _contrast_pairs(contrasts):
        donors, s_ref, s_test, d_pairs = _donor_pairs(
            key, cname, t_ref, t_test, min_donors, "composition"
        )
        dropped += d_pairs
        if len(s_ref) == 0:
            continue
        n = len(donors)
        sub = counts.loc[np.concatenate([s_ref, s_test])]
        tot = sub.sum(axis=1).to_numpy()
        depth = np.tile(np.minimum(tot[:n], tot[n:]), 2) if match_depth else None
        props = sub.div(sub.sum(axis=1), axis=0)
        tested, why = abundance_filter(sub, min_prevalence=min_prevalence, min_prop=min_prop)
        dropped += [_dropped("composition", cname, t, "", "", r) for t, r in why.items()]
        # the CLR's reference: the tested types (a near-absent type's stray cell would
        # otherwise shift every type's value)
        coords = clr(sub, pseudocount, size_aware=True, depth=depth, reference=tested or None)
        if method == "propeller":
            values = transform_proportions(sub, transform=transform, depth=depth)
        else:
            values = coords
        res = _test_rows(values, n, tested, moderate=moderate and method == "propeller")
        ref_clr = coords.iloc[:n].to_numpy()
        tst_clr = coords.iloc[n:].to_numpy()
        for t in tested:
            j = types.index(t)
            m_ref = float(props.iloc[:n][t].mean())
            m_tst = float(props.iloc[n:][t].mean())
            rows.append(
                {
                    "contrast": cname,
                    "cell_type": t,
                    "mean_prop_reference": m_ref,
                    "mean_prop_test": m_tst,
                    "scale": scale,
                    "family": FAMILY_RELATIVE,
                    "kind": method,
                    "question": QUESTION_RELATIVE,
                    "direction": _direction(m_ref, m_tst),
                    "effect_clr": float(np.mean(tst_clr[:, j] - ref_clr[:, j])),
                    **res[t],
                }
            )
        for name, (num, den) in ratio_specs.items():
            ratio, share = group_log_ratio(sub, num, den, pseudocount, size_aware=True, depth=depth)
            r = _test_rows(ratio.to_frame(name), n, [name], moderate=False)[name]
            m_ref = float(np.nanmean(share.iloc[:n]))
            m_tst = float(np.nanmean(share.iloc[n:]))
            rows.append(
                {
                    "contrast": cname,
                    "cell_type": name,
                    "mean_prop_reference": m_ref,
                    "mean_prop_test": m_tst,
                    "scale": "log ratio",
                    "family": FAMILY_RATIO,
                    "kind": "log_ratio",
                    "question": QUESTION_RATIO,
                    "direction": _direction(m_ref, m_tst),
                    "effect_clr": r["effect"],
                    **r,
                }
            )
    table = _frame(rows, [c for c in COMPOSITION_COLUMNS if c != "q_value"])
    return _bh_families(table, COMPOSITION_COLUMNS), dropped


def absolute_composition_tests(
    obs: pd.DataFrame | None,
    contrasts: Iterable[Contrast],
    samples: pd.DataFrame,
    totals: pd.Series,
    *,
    total_column: str = "total",
    min_prevalence: float = 0.5,
    min_prop: float = 0.001,
    pseudocount: float = 0.5,
    min_donors: int = 3,
    match_depth: bool = True,
    counts: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Donor-paired tests of cells per uL of each type (absolute abundance).

    Parameters
    ----------
    obs, contrasts, samples
        As :func:`composition_tests`.
    totals
        Per sample (index ``sample``): cells per uL that the sample's assigned
        cells represent (e.g. lymphocytes + monocytes per uL from the blood
        count for PBMCs); NaN or <= 0: unknown (the sample is dropped).
    total_column
        The totals' column name in the covariates file (for messages).
    min_prevalence, min_prop, pseudocount, min_donors, match_depth, counts
        As :func:`composition_tests`; the pseudocount is a pseudo-proportion
        ``pseudocount / mean cells per sample`` of the total (the floor of a zero).

    Returns
    -------
    The ``composition_absolute`` table (:data:`ABSOLUTE_COLUMNS`; ``kind``
    ``absolute``, ``question`` absolute abundance, ``family``
    ``composition_absolute``): ``effect`` is the mean paired difference of
    ``log2`` cells per uL (``scale`` ``"log2 cells/uL"``), ``mean_per_ul_*``
    the mean cells per uL (share x total) over the paired donors,
    ``direction`` from ``mean_per_ul_test - mean_per_ul_reference``;
    ``q_value`` BH over all rows (all types, all contrasts). And the dropped rows.
    """
    analysis = "composition_absolute"
    counts, meta, types, dropped = _counts(obs, samples, analysis, counts)
    tot_ul = pd.to_numeric(totals.reindex(counts.index), errors="coerce")
    bad = ~(tot_ul > 0)
    for s in counts.index[bad.to_numpy()]:
        dropped.append(
            _dropped(
                analysis,
                "",
                "",
                meta.at[s, keys.DONOR],
                meta.at[s, keys.TIMEPOINT],
                f"no absolute total ('{total_column}' empty or <= 0 in the covariates file): "
                "left out of the absolute-abundance tests",
            )
        )
    counts = counts.loc[~bad.to_numpy()]
    if counts.empty or not types:
        return pd.DataFrame(columns=list(ABSOLUTE_COLUMNS)), dropped
    key = meta.loc[counts.index]
    rows: list[dict[str, Any]] = []
    for cname, t_test, t_ref in _contrast_pairs(contrasts):
        donors, s_ref, s_test, d_pairs = _donor_pairs(
            key, cname, t_ref, t_test, min_donors, analysis
        )
        dropped += d_pairs
        if len(s_ref) == 0:
            continue
        n = len(donors)
        order = np.concatenate([s_ref, s_test])
        sub = counts.loc[order]
        t_sub = tot_ul.loc[order].to_numpy(dtype=float)
        tot = sub.sum(axis=1).to_numpy()
        depth = np.tile(np.minimum(tot[:n], tot[n:]), 2) if match_depth else None
        props = sub.div(sub.sum(axis=1), axis=0)
        per_ul = props.mul(t_sub, axis=0)
        tested, why = abundance_filter(sub, min_prevalence=min_prevalence, min_prop=min_prop)
        dropped += [_dropped(analysis, cname, t, "", "", r) for t, r in why.items()]
        values = log_abundance(sub, t_sub, pseudocount=pseudocount, depth=depth)
        res = _test_rows(values, n, tested, moderate=False)
        for t in tested:
            a_ref = float(per_ul.iloc[:n][t].mean())
            a_tst = float(per_ul.iloc[n:][t].mean())
            rows.append(
                {
                    "contrast": cname,
                    "cell_type": t,
                    "mean_per_ul_reference": a_ref,
                    "mean_per_ul_test": a_tst,
                    "mean_prop_reference": float(props.iloc[:n][t].mean()),
                    "mean_prop_test": float(props.iloc[n:][t].mean()),
                    "scale": "log2 cells/uL",
                    "family": FAMILY_ABSOLUTE,
                    "kind": "absolute",
                    "question": QUESTION_ABSOLUTE,
                    "direction": _direction(a_ref, a_tst),
                    **res[t],
                }
            )
    table = _frame(rows, [c for c in ABSOLUTE_COLUMNS if c != "q_value"])
    return _bh_families(table, ABSOLUTE_COLUMNS), dropped
