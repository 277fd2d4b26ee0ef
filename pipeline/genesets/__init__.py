"""Gene sets: the built-in, cited collection, GMT files, inline sets and symbol aliases.

The built-in collection lives in ``pipeline/genesets/data/immune_ageing.yaml``
(one source for every set); ``hgnc_aliases.tsv`` maps previous HGNC symbols
(``TMEM173``, ``MB21D1``, ``IL8`` ...) to current ones so that data built on
older references still finds every gene. A set's ``role`` says what it measures:
``programme`` (biology) or ``control`` (sample handling: ``ieg_dissociation``).
The collection's version and per-version ``changes`` are in the YAML.
"""

from __future__ import annotations

from ._sets import (
    ALIASES_FILE,
    COLLECTION,
    ROLES,
    GeneSet,
    ResolvedSet,
    builtin_collection,
    builtin_sets,
    collection_version,
    load_aliases,
    read_gmt,
    resolve_sets,
    sets_from_config,
)

__all__ = [
    "ALIASES_FILE",
    "COLLECTION",
    "ROLES",
    "GeneSet",
    "ResolvedSet",
    "builtin_collection",
    "builtin_sets",
    "collection_version",
    "load_aliases",
    "read_gmt",
    "resolve_sets",
    "sets_from_config",
]
