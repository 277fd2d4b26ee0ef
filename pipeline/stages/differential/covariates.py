"""(d) Covariates: per-sample covariates (e.g. plasma betaine) vs signature means."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ... import keys
from ...errors import InputError
from ...stats.mixed import covariate_association

if TYPE_CHECKING:
    pass
from ._common import (
    COVARIATE_KEYS,
    _bh_within,
    _dropped,
    _frame,
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
