"""The one place for AnnData key names used by stages, the runner and the report.

Follows scverse conventions: raw counts in ``layers["counts"]``, metadata in
``obs``, the scVI latent in ``obsm["X_scVI"]``, run information in
``uns["immuneage"]``.
"""

from __future__ import annotations

# layers
COUNTS = "counts"
#: layers key of the counts as read, when ambient RNA correction replaced layers["counts"].
COUNTS_UNCORRECTED = "counts_uncorrected"
#: obs column of the per-cell ambient RNA fraction (ambient correction on).
AMBIENT_FRACTION = "ambient_fraction"

# obs columns written by ingest
SAMPLE = "sample"
DONOR = "donor"
TIMEPOINT = "timepoint"
BARCODE = "barcode"
#: The library (10x lane / GEM well) of a cell: an optional sample-sheet column,
#: written to obs by ingest when the sheet names libraries.
LIBRARY = "library"
#: Columns every sample sheet must have, in this order.
SHEET_REQUIRED = (SAMPLE, DONOR, TIMEPOINT, "path")

# var columns
GENE_IDS = "gene_ids"
FEATURE_TYPES = "feature_types"
#: var column: the symbol as it was in the input, before de-duplication.
GENE_SYMBOL_ORIGINAL = "gene_symbol_original"

# uns
UNS = "immuneage"

# obsm (later stages)
X_PCA = "X_pca"
X_SCVI = "X_scVI"
X_UMAP = "X_umap"

# obs columns written by cluster / annotate
LEIDEN = "leiden"
CELL_TYPE = "cell_type"
CELL_TYPE_COARSE = "cell_type_coarse"
CELL_TYPE_CONFIDENCE = "cell_type_confidence"
CELL_TYPE_CELL_LEVEL = "cell_type_cell_level"
#: obsm key of the per-cell, per-type annotation scores (a DataFrame).
CELL_TYPE_SCORES = "cell_type_scores"
#: Label of cells no type could be given to with enough confidence.
UNASSIGNED = "unassigned"
