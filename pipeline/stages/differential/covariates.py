"""(d) Covariates: per-sample covariates (e.g. plasma betaine) vs signature means.

Each cell type x signature x covariate is one mixed model
(:func:`~pipeline.stats.mixed.covariate_association`),
``mean score ~ c_within + c_between + C(timepoint) + (1 | donor)``: timepoint
adjusted by default, the covariate split into its within-donor (donor-centred)
and between-donor (donor mean) parts. The table is long: one row per component.
For a paired design the ``within`` rows are the primary question (does a
donor's score follow their own covariate across samples, at equal timepoints?);
the ``between`` rows compare donors (confounded by anything that differs
between donors, and with ``n_donors - 2`` df).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ... import keys
from ...errors import InputError
from ...stats.mixed import covariate_association
from ._common import (
    COVARIATE_KEYS,
    _bh_within,
    _dropped,
    _frame,
)

#: Columns of ``covariate_associations``: one row per covariate x component x cell type x
#: signature. ``component``: ``within`` (slope on the donor-centred covariate) or ``between``
#: (slope on the donor mean); ``adjusted_for``: ``timepoint`` or ``none``; ``df``: of the
#: slope's t reference; ``family``: ``<covariate>:<component>``, the BH family of ``q_value``.
COVARIATE_COLUMNS = (
    "covariate",
    "component",
    "cell_type",
    "signature",
    "adjusted_for",
    "n_donors",
    "n_obs",
    "slope",
    "ci_low",
    "ci_high",
    "df",
    "p_value",
    "q_value",
    "family",
    "method",
    "note",
)


def read_covariates(
    path: str | Path, samples: pd.DataFrame, columns: list[str] | None = None
) -> pd.DataFrame:
    """Read and validate the per-sample covariates CSV (TSV when named ``.tsv``/``.tab``).

    Parameters
    ----------
    path
        CSV (tab-separated when the name ends ``.tsv`` or ``.tab``) with a
        ``sample`` column and numeric covariate columns (``donor`` and
        ``timepoint`` columns, if present, are ignored).
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
        # tab-separated for .tsv/.tab (e.g. the score stage's tables/sample_handling.tsv)
        sep = "\t" if p.suffix.lower() in (".tsv", ".tab") else ","
        raw = pd.read_csv(p, dtype=str, keep_default_na=False, sep=sep)
    except Exception as exc:
        raise InputError(
            f"covariates file {p} is not a readable {'TSV' if sep == chr(9) else 'CSV'}: {exc}"
        ) from None
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
    adjust_timepoint: bool = True,
    optimizers: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Within- and between-donor association of signature means with each covariate.

    The model per cell type x signature x covariate is ``mean score ~ c_within +
    c_between [+ C(timepoint)] + (1 | donor)`` (see
    :func:`~pipeline.stats.mixed.covariate_association`).

    Parameters
    ----------
    means
        :func:`signature_means` output (groups below ``min_cells`` are ignored).
    covariates
        :func:`read_covariates` output (indexed by sample).
    min_donors
        Fewer donors with a usable value: no test (dropped row).
    adjust_timepoint
        Add timepoint as a fixed effect (association at equal timepoints).
    optimizers
        MixedLM optimisers tried one by one (``differential.mixed_optimizers``);
        ``None``: :data:`~pipeline.stats.mixed.DEFAULT_OPTIMIZERS`.

    Returns
    -------
    The ``covariate_associations`` table (:data:`COVARIATE_COLUMNS`; q-values by
    BH over the cell types x signatures of one covariate and one component,
    the ``family`` column) and the dropped rows.
    """
    dropped: list[dict[str, str]] = []
    rows: list[dict[str, Any]] = []
    ok = means.loc[means["passes_min_cells"].astype(bool)]
    adjusted_for = keys.TIMEPOINT if adjust_timepoint else "none"
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
            for r in covariate_association(
                d,
                value="mean_score",
                covariate="covariate",
                adjust_timepoint=adjust_timepoint,
                optimizers=optimizers,
            ):
                rows.append(
                    {
                        "covariate": cov,
                        "component": r.component,
                        "cell_type": ct,
                        "signature": sig,
                        "adjusted_for": adjusted_for,
                        "n_donors": r.n_donors,
                        "n_obs": r.n_obs,
                        "slope": r.slope,
                        "ci_low": r.ci_low,
                        "ci_high": r.ci_high,
                        "df": r.df,
                        "p_value": r.p_value,
                        "family": f"{cov}:{r.component}",
                        "method": r.method,
                        "note": r.note,
                    }
                )
    table = _frame(rows, [c for c in COVARIATE_COLUMNS if c != "q_value"])
    return _bh_within(table, "family", COVARIATE_COLUMNS), dropped
