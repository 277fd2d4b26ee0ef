"""Data files shipped with :mod:`pipeline.datasets` (gene table, cell types, programmes).

The files live in ``pipeline/datasets/data/``:

``genes.tsv``
    ``gene_id`` (GENCODE v44 Ensembl id, unversioned), ``symbol`` (GENCODE v44
    gene name), ``role`` (``mito``, ``ribosomal``, ``hemoglobin``, ``sex``,
    ``marker``, ``signature``, ``housekeeping``, ``hla``, ``cell_cycle``,
    ``other``, ``filler``).
``cell_types.yaml``
    The simulated PBMC types with their markers and a ``source`` for each.
``simulator.yaml``
    Simulator curation (which SenMayo genes blood expresses).

The gene programmes themselves are the built-in gene sets of
:mod:`pipeline.genesets` (``pipeline/genesets/data/immune_ageing.yaml``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from typing import Any

import pandas as pd
import yaml

__all__ = [
    "CellTypeSpec",
    "load_cell_types",
    "load_genes",
    "load_programmes",
]

_DATA = files("pipeline.datasets").joinpath("data")


@dataclass(frozen=True)
class CellTypeSpec:
    """One simulated cell type, as read from ``cell_types.yaml``."""

    name: str
    lineage: str
    azimuth_l2: str
    base_proportion: float
    library_size_factor: float
    mito_share: float
    markers: tuple[str, ...]
    also_expressed: tuple[str, ...]
    programme_activity: dict[str, float]
    source: str


@lru_cache(maxsize=1)
def _genes() -> pd.DataFrame:
    with _DATA.joinpath("genes.tsv").open("r") as fh:
        return pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False)


def load_genes() -> pd.DataFrame:
    """The demo's gene table.

    Returns
    -------
    A new DataFrame with columns ``gene_id``, ``symbol``, ``role`` (one row per
    gene, in the order the demo writes them).
    """
    return _genes().copy()


@lru_cache(maxsize=1)
def _cell_types() -> tuple[CellTypeSpec, ...]:
    raw = yaml.safe_load(_DATA.joinpath("cell_types.yaml").read_text())
    out = []
    for ct in raw["cell_types"]:
        out.append(
            CellTypeSpec(
                name=ct["name"],
                lineage=ct["lineage"],
                azimuth_l2=ct["azimuth_l2"],
                base_proportion=float(ct["base_proportion"]),
                library_size_factor=float(ct["library_size_factor"]),
                mito_share=float(ct["mito_share"]),
                markers=tuple(ct["markers"]),
                also_expressed=tuple(ct.get("also_expressed", ())),
                programme_activity={
                    k: float(v) for k, v in (ct.get("programme_activity") or {}).items()
                },
                source=ct["source"],
            )
        )
    return tuple(out)


def load_cell_types() -> tuple[CellTypeSpec, ...]:
    """The simulated PBMC cell types, in ``cell_types.yaml`` order.

    Returns
    -------
    A tuple of :class:`CellTypeSpec`.
    """
    return _cell_types()


@lru_cache(maxsize=1)
def _programmes() -> dict[str, Any]:
    from pipeline.genesets import builtin_collection

    progs = builtin_collection()
    sim = yaml.safe_load(_DATA.joinpath("simulator.yaml").read_text())
    progs["programmes"]["senescence"]["expressed_in_pbmc"] = list(
        sim["senescence_expressed_in_pbmc"]
    )
    return progs


def load_programmes() -> dict[str, Any]:
    """The gene programmes the demo simulates: the built-in gene sets plus simulator curation.

    The sets come from :func:`pipeline.genesets.builtin_collection` (the same
    file the ``score`` stage reads); ``simulator.yaml`` adds, for ``senescence``,
    the genes expressed at blood-typical levels (``expressed_in_pbmc``).

    Returns
    -------
    A new dict with keys ``programmes`` and ``reference_sets``; each maps a
    name to ``{"label", "source", "genes", ...}``.
    """
    return copy.deepcopy(_programmes())
