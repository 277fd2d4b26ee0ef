"""Gene sets: the built-in, cited collection, GMT files, inline sets and symbol aliases.

The built-in collection lives in ``pipeline/genesets/data/immune_ageing.yaml``
(one source for every set); ``hgnc_aliases.tsv`` maps previous HGNC symbols
(``TMEM173``, ``MB21D1``, ``IL8`` ...) to current ones so that data built on
older references still finds every gene.
"""

from __future__ import annotations

from ._sets import (
    ALIASES_FILE,
    COLLECTION,
    GeneSet,
    ResolvedSet,
    builtin_collection,
    builtin_sets,
    load_aliases,
    read_gmt,
    resolve_sets,
    sets_from_config,
)

__all__ = [
    "ALIASES_FILE",
    "COLLECTION",
    "GeneSet",
    "ResolvedSet",
    "builtin_collection",
    "builtin_sets",
    "load_aliases",
    "read_gmt",
    "resolve_sets",
    "sets_from_config",
]
