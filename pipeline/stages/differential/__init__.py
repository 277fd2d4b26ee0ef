"""Stage ``differential``: what changes between timepoints, per cell type, with the donor as unit.

The analyses of the scored cells (output of ``score``), each aggregated to
donors first, so cells are never replicates. Every q-value is a
Benjamini-Hochberg adjustment over a documented family (the ``family`` column
of each table), across all contrasts of the design:

(a) Signature shifts (:func:`signature_shift_tests`, :func:`signature_global_tests`)
    The mean score of each signature over a donor's cells of one type at one
    timepoint (groups with fewer than ``differential.min_cells`` cells are left
    out) is compared across donors per contrast: paired t-test (mean paired
    difference, Cohen's dz, 95% CI) and Wilcoxon signed-rank on the donors with
    both timepoints, or ``score ~ timepoint + (1 | donor)`` (``test: mixed``,
    MixedLM optimisers tried one by one). Families: ``primary`` (the cell type
    x signature pairs of ``differential.primary``), ``exploratory`` (the rest)
    and ``control`` (sample-handling controls such as ``ieg_dissociation``).
    With three or more timepoints a global test per pair (Hotelling's T^2 on
    the within-donor differences; no sphericity assumed).
(b) Pseudobulk DE (:func:`pseudobulk`, :func:`pseudobulk_de`)
    Raw integer counts summed per donor x timepoint x type (one sparse
    product), small pseudobulks and lowly expressed genes filtered, PyDESeq2
    with ``~ donor + timepoint``, Wald test per contrast, BH per type and
    contrast; then signature enrichment on the Wald statistics
    (:func:`signature_enrichment`: camera, the variance inflated by the
    signature's inter-gene correlation estimated from the donor-paired
    pseudobulk residuals; ULM optional and marked not calibrated).
(c) Composition (:func:`composition_tests`, :func:`absolute_composition_tests`)
    Relative abundance: each type's share of a sample's assigned cells, the
    donor's two samples compared at the smaller sample's depth, logit (or
    arcsine square root) transformed, paired t across donors (propeller-style;
    CLR optional); near-absent types filtered; group log-ratios (naive /
    memory T). Absolute abundance (cells per uL, with per-sample totals from
    the covariates file): paired t on log2 cells per uL. Direction words come
    from the change of the mean share or count, never from a transformed sign.
(d) Covariates (:func:`covariate_associations`)
    Per type x signature x covariate, ``mean score ~ c_within + c_between +
    timepoint + (1 | donor)``: the within-donor (donor-centred) and
    between-donor slopes, adjusted for timepoint by default.

Everything a test could not use (a group below ``min_cells``, a donor missing a
timepoint, a type absent at a timepoint, too few donors, a near-absent type)
is a row of the ``differential_dropped`` table and a warning; constant values
give NaN p-values with a note, never an invented one.
"""

from __future__ import annotations

from ._common import (  # noqa: F401 (re-exported constants)
    COVARIATE_KEYS,
    DROPPED_COLUMNS,
    SCORE_PREFIX,
    SIGNATURES_KEY,
    de_table_name,
)
from .composition import (
    ABSOLUTE_COLUMNS,
    COMPOSITION_COLUMNS,
    absolute_composition_tests,
    composition_tests,
)
from .covariates import COVARIATE_COLUMNS, covariate_associations, read_covariates
from .de import SUMMARY_COLUMNS, pseudobulk, pseudobulk_de
from .design import check_config, check_primary, contrast_donors, design_warnings
from .enrichment import ENRICHMENT_COLUMNS, signature_enrichment
from .shifts import (
    GLOBAL_COLUMNS,
    MEANS_COLUMNS,
    SHIFT_COLUMNS,
    signature_global_tests,
    signature_means,
    signature_shift_tests,
)
from .stage import run_differential

__all__ = [
    "ABSOLUTE_COLUMNS",
    "COMPOSITION_COLUMNS",
    "COVARIATE_COLUMNS",
    "DROPPED_COLUMNS",
    "ENRICHMENT_COLUMNS",
    "GLOBAL_COLUMNS",
    "MEANS_COLUMNS",
    "SHIFT_COLUMNS",
    "SUMMARY_COLUMNS",
    "absolute_composition_tests",
    "check_config",
    "check_primary",
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
    "signature_global_tests",
    "signature_means",
    "signature_shift_tests",
]
