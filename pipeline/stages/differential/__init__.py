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

from ._common import (  # noqa: F401 (re-exported constants)
    COVARIATE_KEYS,
    DROPPED_COLUMNS,
    SCORE_PREFIX,
    SIGNATURES_KEY,
    de_table_name,
)
from .composition import COMPOSITION_COLUMNS, composition_tests
from .covariates import COVARIATE_COLUMNS, covariate_associations, read_covariates
from .de import SUMMARY_COLUMNS, pseudobulk, pseudobulk_de
from .design import check_config, contrast_donors, design_warnings
from .enrichment import ENRICHMENT_COLUMNS, signature_enrichment
from .shifts import MEANS_COLUMNS, SHIFT_COLUMNS, signature_means, signature_shift_tests
from .stage import run_differential

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
