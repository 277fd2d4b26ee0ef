"""Read one sample's counts, in every shape sequencing cores and portals deliver them.

Three entry points:

* :func:`detect_format` tells which of the accepted layouts a path is;
* :func:`inspect_counts` checks a file's structure without loading the matrix,
  and a bounded sample of its stored values (what ``immuneage validate`` runs);
* :func:`read_counts` loads one sample and validates it: integer, finite,
  non-negative counts, unique barcodes, at least one cell, gene and count.

Accepted inputs (``path``):

* an ``.h5ad`` file: counts from ``layers["counts"]``, else ``raw.X``, else
  ``X``: the first whose stored entries (a sample of them) are non-negative
  whole numbers, or the matrix named by ``counts_layer``;
* a Cell Ranger ``.h5`` file (v3+ ``matrix`` group, or v2 ``/<genome>/`` group);
* a 10x matrix directory (``matrix.mtx[.gz]``, ``features.tsv[.gz]`` or
  ``genes.tsv[.gz]``, ``barcodes.tsv[.gz]``);
* a Cell Ranger folder: ``count``'s ``outs/`` or the sample folder above it
  (the filtered matrix is read, ``.h5`` preferred), ``multi``'s ``outs/``
  (``per_sample_outs/<sample>/count/sample_filtered_feature_bc_matrix.h5``,
  when it holds one sample), a v2 ``filtered_gene_bc_matrices/`` with one
  genome, or a file inside such a folder.

Cell Ranger's raw matrices (all droplets) are never read as cells: a path named
like one, or any matrix that looks unfiltered (see :data:`UNFILTERED_MIN_BARCODES`),
is refused. Only ``Gene Expression`` features become genes; other feature types
(antibody, CRISPR guide, multiplexing capture) are kept in ``obsm``. Ensembl ids
as gene names are mapped to symbols from a var column.

Files are only ever opened read-only, and the cells x genes matrix is never
made dense. Every problem is a :class:`~pipeline.errors.DataFileError` whose
message names the file and the sample and says what to do.
"""

from __future__ import annotations

# One module per concern; imports flow one way (a module imports only those above it):
#   _common    formats, message texts, the records handed on (_Located, _Plan), helpers
#   _checks    counts values, unfiltered droplets
#   _locate    paths, 10x matrix directories, Cell Ranger layouts, detect_format
#   _h5ad      h5ad: which matrix holds the counts, Ensembl ids -> symbols
#   _tenx      Cell Ranger .h5 files and 10x matrix directories
#   _assemble  the validated AnnData read_counts returns
#   _read      inspect_counts, read_counts
from ._checks import UNFILTERED_MAX_MEDIAN_FEATURES, UNFILTERED_MIN_BARCODES
from ._common import FORMATS, CountsFormat, make_unique
from ._h5ad import SYMBOL_COLUMNS
from ._locate import detect_format
from ._read import CountsSummary, inspect_counts, read_counts

__all__ = [
    "FORMATS",
    "SYMBOL_COLUMNS",
    "UNFILTERED_MAX_MEDIAN_FEATURES",
    "UNFILTERED_MIN_BARCODES",
    "CountsFormat",
    "CountsSummary",
    "detect_format",
    "inspect_counts",
    "make_unique",
    "read_counts",
]
