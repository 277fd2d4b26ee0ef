"""Cited immune cell-type marker panels and their loader.

The shipped panel, ``pipeline/markers/data/pbmc.yaml``, covers the PBMC types of
the Azimuth level-2 reference (Hao et al. 2021) that markers can tell apart:
CD4 naive T, CD4 memory T, Treg, CD8 naive T, CD8 memory T, MAIT, gdT, NK
(CD56dim), NK CD56bright, B naive, B memory, Plasmablast, CD14 monocyte, CD16
monocyte, cDC1, cDC2, pDC and Platelet, each with a coarse lineage (``T_CD4``,
``T_CD8``, ``T_other``, ``NK``, ``B``, ``plasma``, ``mono``, ``DC``,
``platelet``) and every marker gene with its source. The file's header
documents the layout; a user panel (``annotate.markers``) uses the same one.

Names match immuneage's demo cohort wherever it has the type. Where the panel
is finer than the demo (NK CD56bright, cDC1, cDC2) a type names its ``parent``
(``NK``, ``cDC``); :meth:`MarkerPanel.collapse` maps labels to that level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..errors import InputError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = [
    "SHIPPED_PANEL",
    "CellTypeMarkers",
    "Marker",
    "MarkerPanel",
    "load_marker_panel",
]

#: The shipped PBMC panel (a path inside the installed package).
SHIPPED_PANEL = Path(__file__).resolve().parent / "data" / "pbmc.yaml"

_PANEL_KEYS = {"version", "name", "min_present_fraction", "references", "cell_types"}
_TYPE_KEYS = {"name", "lineage", "parent", "positive", "negative", "description"}
_MARKER_KEYS = {"gene", "source", "aliases"}


@dataclass(frozen=True)
class Marker:
    """One marker gene of a cell type.

    Attributes
    ----------
    gene
        HGNC symbol.
    source
        The source as written in the panel (a ``references`` key or free text).
    citation
        The full citation (``references[source]``, or ``source`` itself).
    aliases
        Older symbols matched when ``gene`` is not in the data.
    """

    gene: str
    source: str
    citation: str
    aliases: tuple[str, ...] = ()

    def match(self, var_names: Iterable[str] | set[str]) -> str | None:
        """The symbol of this marker present in ``var_names`` (the gene, else an alias)."""
        present = var_names if isinstance(var_names, set) else set(var_names)
        for sym in (self.gene, *self.aliases):
            if sym in present:
                return sym
        return None


@dataclass(frozen=True)
class CellTypeMarkers:
    """A cell type of a panel: its lineage and positive / negative markers."""

    name: str
    lineage: str
    positive: tuple[Marker, ...]
    negative: tuple[Marker, ...] = ()
    parent: str | None = None
    description: str = ""

    @property
    def markers(self) -> tuple[Marker, ...]:
        """Positive then negative markers."""
        return self.positive + self.negative


@dataclass(frozen=True)
class MarkerPanel:
    """A validated marker panel (see :func:`load_marker_panel`).

    Attributes
    ----------
    name, version
        From the file; recorded with every annotation.
    path
        The file it was read from.
    min_present_fraction
        A type is annotatable when at least this share of its positive
        markers (and at least one) is present in the data.
    references
        Reference key -> full citation.
    cell_types
        The types, in file order.
    """

    name: str
    version: str
    path: Path
    min_present_fraction: float
    references: dict[str, str]
    cell_types: tuple[CellTypeMarkers, ...]
    _by_name: dict[str, CellTypeMarkers] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update({ct.name: ct for ct in self.cell_types})

    @property
    def names(self) -> list[str]:
        """Fine cell-type names in panel order."""
        return [ct.name for ct in self.cell_types]

    def __getitem__(self, name: str) -> CellTypeMarkers:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def lineages(self) -> dict[str, str]:
        """Fine name -> coarse lineage."""
        return {ct.name: ct.lineage for ct in self.cell_types}

    def lineage_of(self, label: str) -> str | None:
        """Lineage of a type name, or of a parent name whose subtypes share one lineage."""
        if label in self._by_name:
            return self._by_name[label].lineage
        found = {ct.lineage for ct in self.cell_types if ct.parent == label}
        return found.pop() if len(found) == 1 else None

    @property
    def parents(self) -> dict[str, str]:
        """Fine name -> parent name (the name itself when the type has no parent)."""
        return {ct.name: ct.parent or ct.name for ct in self.cell_types}

    def collapse(self, labels: Sequence[str]) -> list[str]:
        """Map fine labels to their parent type (``NK CD56bright`` -> ``NK``); others unchanged."""
        parents = self.parents
        return [parents.get(str(lab), str(lab)) for lab in labels]

    def genes(self) -> list[str]:
        """Every marker symbol (positive and negative), sorted, without aliases."""
        return sorted({m.gene for ct in self.cell_types for m in ct.markers})

    def n_required(self, cell_type: str) -> int:
        """Positive markers that must be present for ``cell_type`` to be annotatable."""
        n = len(self[cell_type].positive)
        return max(1, math.ceil(self.min_present_fraction * n - 1e-9))


# --------------------------------------------------------------------------- loading
def _fail(path: Path, where: str, msg: str) -> InputError:
    return InputError(f"marker panel {path}: {where}: {msg}")


def _str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _marker(
    raw: Any, path: Path, where: str, references: dict[str, str], *, require_reference: bool
) -> Marker:
    if isinstance(raw, str):
        raise _fail(
            path, where, f"marker {raw!r} has no source; write it as {{gene: {raw}, source: ...}}"
        )
    if not isinstance(raw, dict):
        raise _fail(path, where, f"a marker must be a mapping with gene and source, not {raw!r}")
    extra = sorted(set(raw) - _MARKER_KEYS)
    if extra:
        raise _fail(
            path,
            where,
            f"unknown key(s) {', '.join(map(str, extra))}; allowed: {', '.join(sorted(_MARKER_KEYS))}",
        )
    gene = raw.get("gene")
    if not _str(gene) or any(c.isspace() for c in str(gene)):
        raise _fail(path, where, f"gene must be a gene symbol without spaces, got {gene!r}")
    where = f"{where} gene {gene}"
    source = raw.get("source")
    if not _str(source):
        raise _fail(path, where, "every marker needs a non-empty source (a citation)")
    source = str(source).strip()
    if require_reference and source not in references:
        raise _fail(
            path,
            where,
            f"source {source!r} is not a key of references ({', '.join(sorted(references))})",
        )
    aliases = raw.get("aliases", []) or []
    if not isinstance(aliases, list) or not all(_str(a) for a in aliases):
        raise _fail(path, where, f"aliases must be a list of symbols, got {aliases!r}")
    return Marker(
        gene=str(gene),
        source=source,
        citation=references.get(source, source),
        aliases=tuple(str(a) for a in aliases),
    )


def _cell_type(
    raw: Any, i: int, path: Path, references: dict[str, str], *, require_reference: bool
) -> CellTypeMarkers:
    where = f"cell_types[{i}]"
    if not isinstance(raw, dict):
        raise _fail(path, where, f"must be a mapping with name, lineage, positive; got {raw!r}")
    name = raw.get("name")
    if not _str(name):
        raise _fail(path, where, f"name must be a non-empty string, got {name!r}")
    where = f"cell type {name!r} ({where})"
    extra = sorted(set(raw) - _TYPE_KEYS)
    if extra:
        raise _fail(
            path,
            where,
            f"unknown key(s) {', '.join(map(str, extra))}; allowed: {', '.join(sorted(_TYPE_KEYS))}",
        )
    if name == "unassigned":
        raise _fail(path, where, "'unassigned' is reserved for cells no type fits")
    lineage = raw.get("lineage")
    if not _str(lineage):
        raise _fail(path, where, "every cell type needs a lineage (its coarse type)")
    parent = raw.get("parent")
    if parent is not None and not _str(parent):
        raise _fail(path, where, f"parent must be a cell-type name, got {parent!r}")
    pos, neg = raw.get("positive"), raw.get("negative") or []
    if not isinstance(pos, list) or not pos:
        raise _fail(path, where, "positive must be a non-empty list of markers")
    if not isinstance(neg, list):
        raise _fail(path, where, "negative must be a list of markers")
    kw = {"require_reference": require_reference}
    positive = tuple(
        _marker(m, path, f"{where} positive[{j}]", references, **kw) for j, m in enumerate(pos)
    )
    negative = tuple(
        _marker(m, path, f"{where} negative[{j}]", references, **kw) for j, m in enumerate(neg)
    )
    genes = [m.gene for m in positive + negative]
    dup = sorted({g for g in genes if genes.count(g) > 1})
    if dup:
        raise _fail(path, where, f"gene(s) listed twice: {', '.join(dup)}")
    return CellTypeMarkers(
        name=str(name).strip(),
        lineage=str(lineage).strip(),
        positive=positive,
        negative=negative,
        parent=str(parent).strip() if parent else None,
        description=str(raw.get("description") or ""),
    )


def load_marker_panel(path: str | Path | None = None) -> MarkerPanel:
    """Read and validate a marker panel YAML file.

    Parameters
    ----------
    path
        A panel file in the layout of the shipped one; ``None`` reads the
        shipped PBMC panel (:data:`SHIPPED_PANEL`).

    Returns
    -------
    The validated :class:`MarkerPanel`.

    Raises
    ------
    InputError
        The file is missing or not YAML, or an entry is invalid (a marker
        without a source, a type without lineage or positive markers, a
        duplicate name, an unknown key, an unknown reference key, ...). The
        message names the file and the entry.
    """
    p = SHIPPED_PANEL if path is None else Path(path)
    if not p.is_file():
        raise InputError(
            f"marker panel {p} does not exist; set annotate.markers to an existing YAML file "
            "(or null for the shipped PBMC panel)"
        )
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"marker panel {p} is not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"marker panel {p} is not a UTF-8 text file") from None
    if not isinstance(raw, dict):
        raise InputError(
            f"marker panel {p} must be a mapping with version and cell_types, "
            f"not a {type(raw).__name__}"
        )
    extra = sorted(set(raw) - _PANEL_KEYS)
    if extra:
        raise _fail(
            p,
            "top level",
            f"unknown key(s) {', '.join(map(str, extra))}; allowed: {', '.join(sorted(_PANEL_KEYS))}",
        )
    version = raw.get("version")
    if version is None or (not _str(version) and not isinstance(version, int | float)):
        raise _fail(p, "version", "the panel needs a version (e.g. version: '1.0')")
    refs = raw.get("references") or {}
    if not isinstance(refs, dict) or not all(_str(k) and _str(v) for k, v in refs.items()):
        raise _fail(p, "references", "must map reference keys to citation strings")
    refs = {str(k): " ".join(str(v).split()) for k, v in refs.items()}
    frac = raw.get("min_present_fraction", 0.5)
    if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 <= frac <= 1:
        raise _fail(p, "min_present_fraction", f"must be a number in [0, 1], got {frac!r}")
    types_raw = raw.get("cell_types")
    if not isinstance(types_raw, list) or not types_raw:
        raise _fail(p, "cell_types", "must be a non-empty list of cell types")
    require_reference = bool(refs)
    types = tuple(
        _cell_type(t, i, p, refs, require_reference=require_reference)
        for i, t in enumerate(types_raw)
    )
    names = [t.name for t in types]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _fail(p, "cell_types", f"cell type name(s) listed twice: {', '.join(dup)}")
    return MarkerPanel(
        name=str(raw.get("name") or p.stem),
        version=str(version),
        path=p,
        min_present_fraction=float(frac),
        references=refs,
        cell_types=types,
    )
