"""Design checks of the differential stage: donors per contrast, config vs sheet,
the primary hypotheses (``differential.primary``) vs the marker panel and gene sets."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd
from scipy import stats

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
    as :func:`run_differential` requires), the covariates table
    (``differential.covariates`` against the sheet's samples,
    ``differential.covariate_columns`` against its columns), the absolute
    totals (``differential.absolute_total_column``) and
    ``differential.primary`` (:func:`check_primary`).

    Raises
    ------
    InputError
        No contrast can be tested (the message gives the donors counted per
        contrast against ``min_donors`` and how to run the stages before this
        one only); ``covariate_columns`` without a covariates file; an
        ``absolute_total_column`` without a covariates file, missing from it
        or not positive (:func:`absolute_totals`); as :func:`read_covariates`
        and :func:`check_primary`.
    """
    dcfg = cfg.differential
    check_primary(cfg)
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
        cols = covariate_columns(cfg, dcfg.covariates)
        if cols != []:  # [] : the file holds the absolute totals only
            read_covariates(dcfg.covariates, samples, cols)
    if dcfg.absolute_total_column is not None:
        absolute_totals(cfg, samples)


def covariate_columns(cfg: Config, path: Any) -> list[str] | None:
    """The covariates to test: ``differential.covariate_columns``, or (null) every column
    of the covariates file but the keys and ``differential.absolute_total_column``
    (``[]`` when the file holds nothing else: no covariate associations)."""
    dcfg = cfg.differential
    if dcfg.covariate_columns is not None or dcfg.absolute_total_column is None:
        return dcfg.covariate_columns
    cols = read_covariates(path, pd.DataFrame({keys.SAMPLE: []}), None).columns
    return [c for c in cols if c != dcfg.absolute_total_column]


def absolute_totals(cfg: Config, samples: pd.DataFrame) -> pd.Series:
    """Per sample, ``differential.absolute_total_column`` of the covariates file.

    Raises
    ------
    InputError
        No covariates file, no such column, or a total that is not a positive
        number (an empty cell is allowed: that sample is left out of the
        absolute test, a dropped row).
    """
    dcfg = cfg.differential
    col = dcfg.absolute_total_column
    if dcfg.covariates is None:
        raise InputError(
            f"differential.absolute_total_column is {col!r} but differential.covariates (the "
            "per-sample CSV that holds the totals, e.g. PBMCs per uL from the blood count) is "
            "not set; set both, or absolute_total_column: null"
        )
    header = read_covariates(dcfg.covariates, pd.DataFrame({keys.SAMPLE: []}), None).columns
    if col not in header:
        raise InputError(
            f"differential.absolute_total_column {col!r} is not a column of the covariates file "
            f"{dcfg.covariates} (numeric columns: {', '.join(header) or 'none'})"
        )
    totals = read_covariates(dcfg.covariates, samples, [col])[col]
    bad = totals.notna() & ~(totals > 0)
    if bad.any():
        s = totals.index[bad.to_numpy()][0]
        raise InputError(
            f"covariates file {dcfg.covariates}, sample {s!r}: {col} = {totals[s]:g} is not a "
            "positive number; absolute totals are cells per uL (leave the cell empty when unknown)"
        )
    return totals


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
    One text per short contrast, one for the contrasts with fewer than
    :data:`FEW_DONORS` donors (:func:`few_donors_warning`), and those of
    :func:`check_primary` (none is issued).
    """
    contrasts = list(cfg.design.contrasts)
    need = cfg.differential.min_donors
    both = contrast_donors(_sheet_samples(sheet), contrasts)
    texts = [
        f"differential: contrast {c} has {len(both[c.name])} donor(s) with samples at both "
        f"{c.reference} and {c.test} in {sheet.path} (differential.min_donors = {need}): it "
        "yields no test rows (tables/differential_dropped.tsv says why); the other contrasts "
        "are tested"
        for c in contrasts
        if len(both[c.name]) < need
    ]
    few = few_donors_warning({str(c): len(both[c.name]) for c in contrasts}, min_donors=need)
    return texts + ([few] if few else []) + check_primary(cfg)


#: Fewer donors than this: a paired t-test with under 4 df; its CI is wide (warned).
FEW_DONORS = 5


def few_donors_warning(n_donors: Mapping[str, int], *, min_donors: int) -> str | None:
    """One warning for the contrasts tested with fewer than :data:`FEW_DONORS` donors.

    ``differential.min_donors`` (default 3) lets a paired t-test run with
    ``n - 1 = 2`` degrees of freedom: it is valid, but its 95% CI is
    ``t(0.975, n - 1)`` standard errors wide each side (4.30 with 2 df against
    1.96 with many donors) and only large effects reach significance.

    Parameters
    ----------
    n_donors
        Contrast label -> the donors it is tested with (the design's count, or
        the smallest ``n_donors`` of its rows).
    min_donors
        ``differential.min_donors``: contrasts below it are not tested (said
        elsewhere) and not named here.

    Returns
    -------
    The text (not issued), or ``None`` when no tested contrast has fewer than
    :data:`FEW_DONORS` donors.
    """
    few = {c: n for c, n in n_donors.items() if max(min_donors, 2) <= n < FEW_DONORS}
    if not few:
        return None
    z = stats.norm.ppf(0.975)
    parts = [
        f"{c}: {n} donors, {n - 1} df, 95% CI +/- {stats.t.ppf(0.975, n - 1):.2f} SE"
        for c, n in few.items()
    ]
    return (
        f"differential: {len(few)} contrast(s) tested with fewer than {FEW_DONORS} donors "
        f"({'; '.join(parts)}; +/- {z:.2f} SE with many donors): the confidence intervals are "
        "wide and only large effects can reach significance. differential.min_donors = "
        f"{min_donors} allows these tests; {FEW_DONORS} or more donors per contrast are "
        "advisable"
    )


def check_primary(cfg: Config) -> list[str]:
    """Check ``differential.primary`` against the gene sets and the marker panel.

    The rules (the signature shifts' ``primary`` family is only as good as
    these names):

    - a signature that is no gene set anywhere (built-in, ``score.gmt``,
      ``score.custom``) is a typo: :class:`InputError`;
    - a known set that this run does not score (not selected in
      ``score.genesets``, e.g. a reduced list with the default ``primary``)
      forms no primary pair: a warning;
    - a key that is neither a lineage, a cell type nor a parent type of the
      shipped marker panel is an :class:`InputError` when the shipped panel
      annotates (a typo there would silently leave the family empty); with a
      user panel (``annotate.markers``) or a CellTypist model the data's
      names may differ from the shipped defaults, so a key unknown to that
      panel is a warning (it forms no primary pair unless the data has a cell
      type or lineage of that name).

    Returns
    -------
    The warning texts (not issued); empty with ``primary: null``.

    Raises
    ------
    InputError
        As above.
    """
    from ...genesets import builtin_sets, sets_from_config
    from ...markers import load_marker_panel

    primary = cfg.differential.primary
    if primary is None:
        return []
    out: list[str] = []
    scfg = cfg.score
    try:
        scored = set(sets_from_config(scfg.genesets, scfg.gmt, scfg.custom))
    except InputError:  # the score section's own check reports it (when score runs)
        return out
    known = scored | set(builtin_sets())
    listed = {s for sigs in primary.values() for s in sigs}
    unknown = sorted(listed - known)
    if unknown:
        raise InputError(
            f"differential.primary names signature(s) {', '.join(map(repr, unknown))} that are "
            "no gene set (built-in: see `immuneage genesets`; or score.gmt / score.custom); "
            f"fix the names or remove them. Scored in this run: {', '.join(sorted(scored))}"
        )
    unscored = sorted(listed - scored)
    if unscored:
        out.append(
            f"differential.primary names signature(s) not scored in this run "
            f"({', '.join(unscored)}; score.genesets / score.gmt / score.custom): they form no "
            "primary pairs"
        )
    acfg = cfg.annotate
    try:
        panel = load_marker_panel(acfg.markers)
    except InputError:  # a broken panel is annotate's to report (when annotate runs)
        return out
    names = set(panel.lineages.values()) | set(panel.names) | set(panel.parents.values())
    odd = sorted(set(map(str, primary)) - names)
    if odd and acfg.markers is None and acfg.celltypist_model is None:
        raise InputError(
            f"differential.primary names {', '.join(map(repr, odd))}, neither a lineage nor a "
            f"cell type of the shipped marker panel (lineages: "
            f"{', '.join(sorted(set(panel.lineages.values())))}; cell types: "
            f"{', '.join(panel.names)}); fix the names or remove them"
        )
    if odd:
        source = (
            f"the CellTypist model {acfg.celltypist_model}"
            if acfg.celltypist_model is not None
            else f"the marker panel {acfg.markers}"
        )
        out.append(
            f"differential.primary names {', '.join(map(repr, odd))}, no lineage or cell type of "
            f"{source} (checked against "
            f"{'the shipped panel' if acfg.markers is None else 'it'}): they form no primary "
            "pairs unless the annotated data has a cell type or lineage of that name"
        )
    return out
