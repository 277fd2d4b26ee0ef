"""Design checks of the differential stage: donors per contrast, config vs sheet."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

from ... import keys
from ...errors import InputError

if TYPE_CHECKING:
    from ...config import Config, Contrast
from ._common import (
    COVARIATE_KEYS,
)
from .covariates import read_covariates


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
