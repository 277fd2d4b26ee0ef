"""(c) Composition: cell-type shares per sample, donor-paired tests per contrast."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ... import keys
from ...stats.composition import clr, group_log_ratio
from ...stats.paired import paired_test

if TYPE_CHECKING:
    from ...config import Contrast
from ._common import (
    _bh_within,
    _categories,
    _contrast_pairs,
    _dropped,
    _frame,
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
