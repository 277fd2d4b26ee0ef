"""(a) Signature shifts: donor means of each score per cell type, paired tests per contrast,
and a global test across all timepoints; q-values by BH within FDR families.

FDR families (column ``family``): a cell type x signature pair is ``primary``
when ``differential.primary`` lists the signature under the cell type's name
or its lineage (``obs["cell_type_coarse"]``), ``exploratory`` otherwise, and
``control`` when ``score`` marks the signature as a sample-handling control
(``uns["immuneage"]["signature_roles"]``); ``primary: null`` puts every
programme in one family ``all``. BH runs over all rows of a family across all
contrasts of a table (``signature_shifts``; ``signature_global`` separately).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ... import keys
from ...stats.mixed import mixed_timepoint_test
from ...stats.paired import paired_test, repeated_measures_test
from .design import few_donors_warning

if TYPE_CHECKING:
    from ...config import Contrast
from ._common import (
    FAMILY_PRIMARY,
    _bh_by_family,
    _contrast_pairs,
    _dropped,
    _frame,
    _why_missing,
    pair_families,
)

SHIFT_COLUMNS = (
    "contrast",
    "cell_type",
    "signature",
    "family",
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
    "lineage",
    "signature",
    "n_cells",
    "mean_score",
    "sample",
    "passes_min_cells",
)


def signature_means(
    obs: pd.DataFrame, score_columns: Mapping[str, str], *, min_cells: int
) -> pd.DataFrame:
    """Mean score per donor x timepoint x cell type x signature.

    Parameters
    ----------
    obs
        Per-cell table with ``sample``, ``donor``, ``timepoint``, ``cell_type``
        and the score columns; ``unassigned`` cells are left out. The
        ``lineage`` column is the cell type's ``cell_type_coarse`` (its first
        value among the type's cells; blank without that column).
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
    if keys.CELL_TYPE_COARSE in cells.columns:
        lineage = (
            pd.DataFrame(
                {
                    keys.CELL_TYPE: frame[keys.CELL_TYPE],
                    "lineage": cells[keys.CELL_TYPE_COARSE].astype(str).to_numpy(),
                }
            )
            .groupby(keys.CELL_TYPE, sort=False)["lineage"]
            .first()
        )
    else:
        lineage = pd.Series("", index=pd.Index(frame[keys.CELL_TYPE].unique()), name="lineage")
    means = grouped[list(score_columns)].mean()
    long = means.stack(future_stack=True).rename("mean_score").reset_index()
    long = long.rename(columns={f"level_{len(by)}": "signature"})
    long.columns = [*by, "signature", "mean_score"]
    long = long.merge(n.reset_index(), on=by).merge(sample.reset_index(), on=by)
    long["lineage"] = long[keys.CELL_TYPE].map(lineage).fillna("").astype(str)
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
    primary: Mapping[str, Sequence[str]] | None = None,
    roles: Mapping[str, str] | None = None,
    optimizers: Sequence[str] | None = None,
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
    primary
        ``differential.primary`` (lineage or cell type -> signatures); ``None``:
        one family ``all``.
    roles
        Signature -> role (``programme`` | ``control``), from ``score``.
    optimizers
        ``test="mixed"``: the MixedLM optimisers tried one by one
        (``differential.mixed_optimizers``; ``None``: the default list).

    Returns
    -------
    The ``signature_shifts`` table (:data:`SHIFT_COLUMNS`; ``family`` as
    :func:`~pipeline.stages.differential._common.pair_families`, q-values by
    BH over all rows of a family across all contrasts) and the dropped rows.
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
    family = _family_lookup(means, primary, roles)
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
                    "family": family[(ct, sig)],
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
                    mr = mixed_timepoint_test(
                        long, tp_ref, tp_test, value="mean_score", optimizers=optimizers
                    )
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
    return _bh_by_family(table, SHIFT_COLUMNS), dropped


GLOBAL_COLUMNS = (
    "cell_type",
    "signature",
    "family",
    "n_donors",
    "timepoints",
    "statistic",
    "df1",
    "df2",
    "p_value",
    "q_value",
    "method",
    "note",
)


def _family_lookup(
    means: pd.DataFrame,
    primary: Mapping[str, Sequence[str]] | None,
    roles: Mapping[str, str] | None,
) -> dict[tuple[str, str], str]:
    """(cell type, signature) -> FDR family, for every pair of ``means``."""
    cols = [keys.CELL_TYPE, "signature"] + (["lineage"] if "lineage" in means.columns else [])
    pairs = means[cols].drop_duplicates([keys.CELL_TYPE, "signature"]).reset_index(drop=True)
    fams = pair_families(pairs, primary, roles)
    return {
        (str(ct), str(sig)): str(f)
        for ct, sig, f in zip(pairs[keys.CELL_TYPE], pairs["signature"], fams, strict=True)
    }


def signature_global_tests(
    means: pd.DataFrame,
    samples: pd.DataFrame,
    *,
    timepoints: Sequence[str],
    min_cells: int = 10,
    min_donors: int = 3,
    primary: Mapping[str, Sequence[str]] | None = None,
    roles: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Per cell type x signature, a test of no change across all timepoints.

    Hotelling's T^2 on the donors' within-donor differences from the first
    timepoint (:func:`~pipeline.stats.paired.repeated_measures_test`: exact
    F with ``k - 1`` and ``n - k + 1`` df, no sphericity assumed). Only
    donors with at least ``min_cells`` cells of the type at every timepoint
    enter; the others are dropped rows naming what they miss.

    Parameters
    ----------
    means
        :func:`signature_means` output.
    samples
        One row per sample (``sample``, ``donor``, ``timepoint``).
    timepoints
        The design's timepoint levels in order (``design.timepoints``); those
        with a sample are tested. Fewer than 3: no test (the contrasts are the
        tests), an empty table.
    min_cells
        Only for the dropped-row messages.
    min_donors
        A cell type with fewer complete donors than ``max(min_donors, k)``
        is not tested (a dropped row).
    primary, roles
        The FDR families, as :func:`signature_shift_tests`.

    Returns
    -------
    The ``signature_global`` table (:data:`GLOBAL_COLUMNS`: ``timepoints`` the
    levels tested joined by ``,``, ``statistic`` the F, q-values by BH over
    all rows of a family) and the dropped rows (analysis ``signature_global``,
    contrast ``global``).
    """
    present = set(samples[keys.TIMEPOINT].astype(str))
    tps = [str(t) for t in timepoints if str(t) in present]
    k = len(tps)
    if k < 3 or means.empty:
        return pd.DataFrame(columns=list(GLOBAL_COLUMNS)), []
    need = max(min_donors, k)
    dropped: list[dict[str, str]] = []
    rows: list[dict[str, Any]] = []
    sampled = set(zip(samples[keys.DONOR], samples[keys.TIMEPOINT], strict=True))
    donors_all = sorted(samples[keys.DONOR].unique())
    ok = means.loc[means["passes_min_cells"].astype(bool) & means[keys.TIMEPOINT].isin(tps)]
    counts = (
        means.drop_duplicates([keys.DONOR, keys.TIMEPOINT, keys.CELL_TYPE])
        .set_index([keys.DONOR, keys.TIMEPOINT, keys.CELL_TYPE])["n_cells"]
        .to_dict()
    )
    family = _family_lookup(means, primary, roles)
    label = ",".join(tps)
    for ct in dict.fromkeys(means[keys.CELL_TYPE]):
        sub = ok.loc[ok[keys.CELL_TYPE] == ct]
        have = {tp: set(sub.loc[sub[keys.TIMEPOINT] == tp, keys.DONOR]) for tp in tps}
        complete = sorted(set.intersection(*have.values()))
        for d in donors_all:
            miss = [tp for tp in tps if d not in have[tp]]
            if miss:
                why = "; ".join(_why_missing(d, tp, ct, sampled, counts, min_cells) for tp in miss)
                dropped.append(_dropped("signature_global", "global", ct, d, ",".join(miss), why))
        if len(complete) < need:
            dropped.append(
                _dropped(
                    "signature_global",
                    "global",
                    ct,
                    "",
                    "",
                    f"not tested: {len(complete)} donor(s) with >= {min_cells} {ct} cells at all "
                    f"of {label} (the global test needs >= {need}: min_donors {min_donors}, "
                    f"and {k} for {k} timepoints)",
                )
            )
            continue
        for sig in dict.fromkeys(sub["signature"]):
            s = sub.loc[sub["signature"] == sig]
            wide = s.pivot(index=keys.DONOR, columns=keys.TIMEPOINT, values="mean_score")
            r = repeated_measures_test(wide.loc[complete, tps].to_numpy(dtype=np.float64))
            rows.append(
                {
                    "cell_type": ct,
                    "signature": sig,
                    "family": family[(ct, sig)],
                    "n_donors": r.n,
                    "timepoints": label,
                    "statistic": r.statistic,
                    "df1": r.df1,
                    "df2": r.df2,
                    "p_value": r.p_value,
                    "method": r.method,
                    "note": r.note,
                }
            )
    table = _frame(rows, [c for c in GLOBAL_COLUMNS if c != "q_value"])
    return _bh_by_family(table, GLOBAL_COLUMNS), dropped


def primary_warning(
    shifts: pd.DataFrame, primary: Mapping[str, Sequence[str]] | None
) -> str | None:
    """The warning when ``differential.primary`` is set but no tested pair is primary.

    Returns
    -------
    The text (not issued), or ``None`` when some row is ``primary``, when
    ``primary`` is null or when nothing was tested.
    """
    if primary is None or shifts.empty or (shifts["family"] == FAMILY_PRIMARY).any():
        return None
    names = ", ".join(sorted(map(str, primary)))
    return (
        "differential: no tested cell type x signature pair is in differential.primary "
        f"(entries for {names}): every signature shift is 'exploratory' (BH over all of them "
        "and all contrasts). Name the cell types (obs 'cell_type') or lineages "
        "(obs 'cell_type_coarse') and the scored signatures of the primary hypotheses in "
        "differential.primary, or set it to null for one family of every pair"
    )


def shift_warnings(
    shifts: pd.DataFrame,
    contrasts: Iterable[Contrast],
    *,
    min_donors: int,
    primary: Mapping[str, Sequence[str]] | None,
) -> list[str]:
    """What the stage says about the ``signature_shifts`` table (texts, not issued).

    One warning for the contrasts whose rows include tests with fewer than
    :data:`~pipeline.stages.differential.design.FEW_DONORS` donors (named with
    the smallest ``n_donors``, its df and CI width:
    :func:`~pipeline.stages.differential.design.few_donors_warning`), and
    :func:`primary_warning`.
    """
    out: list[str] = []
    if len(shifts):
        smallest = shifts.groupby("contrast")["n_donors"].min()
        few = few_donors_warning(
            {str(c): int(smallest[c.name]) for c in contrasts if c.name in smallest.index},
            min_donors=min_donors,
        )
        if few:
            out.append(few)
    text = primary_warning(shifts, primary)
    return out + ([text] if text else [])
