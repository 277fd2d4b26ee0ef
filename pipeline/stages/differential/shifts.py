"""(a) Signature shifts: donor means of each score per cell type, paired tests per contrast."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ... import keys
from ...stats.mixed import mixed_timepoint_test
from ...stats.paired import paired_test

if TYPE_CHECKING:
    from ...config import Contrast
from ._common import (
    _bh_within,
    _contrast_pairs,
    _dropped,
    _frame,
    _why_missing,
)

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
