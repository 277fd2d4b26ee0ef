"""Loading gene sets and matching their symbols to a dataset's genes."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline.errors import InputError

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

_DATA = files("pipeline.genesets").joinpath("data")
#: Name of the built-in collection (its version is in the file).
COLLECTION = "immune_ageing"
#: The alias table shipped with the package.
ALIASES_FILE = "hgnc_aliases.tsv"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
#: What a set measures: ``programme`` (biology, the default) or ``control`` (sample
#: handling, e.g. ``ieg_dissociation``: scored and reported as a control, never a finding).
ROLES = ("programme", "control")


@dataclass(frozen=True)
class GeneSet:
    """A named list of gene symbols with where it came from.

    Attributes
    ----------
    name
        Identifier (``obs`` column ``score_<name>``).
    genes
        Symbols as given by the source, in source order, without duplicates.
    source
        Citation (paper, database and release) or the file it was read from.
    version
        Version of the collection the set belongs to (e.g. ``immune_ageing/1``).
    label
        Human-readable title.
    role
        ``"programme"`` (a biological programme; every GMT / inline set) or
        ``"control"`` (a sample-handling control such as ``ieg_dissociation``), from
        the entry's ``role`` key in the collection.
    """

    name: str
    genes: tuple[str, ...]
    source: str
    version: str
    label: str = ""
    role: str = "programme"


@dataclass
class ResolvedSet:
    """A gene set matched to a dataset's genes.

    Attributes
    ----------
    geneset
        The set as defined.
    found
        Dataset gene names used for scoring (after alias mapping), in set order.
    missing
        Symbols of the set with no match in the data.
    aliases_used
        ``{symbol in the set: dataset gene it matched through an alias}``.
    """

    geneset: GeneSet
    found: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    aliases_used: dict[str, str] = field(default_factory=dict)


@lru_cache(maxsize=1)
def _collection() -> dict[str, Any]:
    return yaml.safe_load(_DATA.joinpath(f"{COLLECTION}.yaml").read_text())


def builtin_collection() -> dict[str, Any]:
    """The raw built-in collection.

    ``{"version", "programmes": {...}, "reference_sets": {...}, "changes": [...]}``;
    each set maps to ``{"label", "source", "genes"}`` and optionally ``"role"``
    (default ``"programme"``); ``changes`` lists, newest first, each version's
    changes per set and why. A fresh copy on every call.
    """
    return copy.deepcopy(_collection())


def collection_version() -> str:
    """The built-in collection and its version, e.g. ``"immune_ageing/2"``."""
    return f"{COLLECTION}/{_collection()['version']}"


def builtin_sets() -> dict[str, GeneSet]:
    """Every built-in set (programmes first, then reference sets) by name.

    Raises
    ------
    ValueError
        An entry whose ``role`` is not one of :data:`ROLES` (a broken package file).
    """
    coll = _collection()
    version = collection_version()
    out: dict[str, GeneSet] = {}
    for group in ("programmes", "reference_sets"):
        for name, entry in coll[group].items():
            role = str(entry.get("role", "programme"))
            if role not in ROLES:
                msg = f"{COLLECTION}.yaml: set {name!r} has role {role!r}; expected one of {ROLES}"
                raise ValueError(msg)
            out[name] = GeneSet(
                name=name,
                genes=tuple(dict.fromkeys(entry["genes"])),
                source=" ".join(str(entry["source"]).split()),
                version=version,
                label=entry.get("label", name),
                role=role,
            )
    return out


def _check_name(name: str, where: str) -> None:
    if not _NAME.match(name):
        raise InputError(
            f"{where}: gene set name {name!r} is not usable as an identifier; use letters, "
            "digits, '_', '.', '-', starting with a letter"
        )


def read_gmt(path: str | Path) -> dict[str, GeneSet]:
    """Read a GMT file: one set per line, ``name<TAB>description<TAB>gene<TAB>gene...``.

    Parameters
    ----------
    path
        The GMT file.

    Returns
    -------
    ``{name: GeneSet}`` in file order; the description becomes the label and the
    set's source is ``<path>:<line>``.

    Raises
    ------
    InputError
        Unreadable file, a line with fewer than three fields, an empty or repeated
        name, or a set without genes (the message names the file and line).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"score.gmt: cannot read {path}: {exc}") from None
    out: dict[str, GeneSet] = {}
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.rstrip("\n\r").split("\t")
        if len(fields) < 3:
            raise InputError(
                f"{path}, line {i}: a GMT line needs name<TAB>description<TAB>genes...; "
                f"found {len(fields)} tab-separated field(s)"
            )
        name = fields[0].strip()
        _check_name(name, f"{path}, line {i}")
        if name in out:
            raise InputError(f"{path}, line {i}: gene set {name!r} is defined twice")
        genes = tuple(dict.fromkeys(g.strip() for g in fields[2:] if g.strip()))
        if not genes:
            raise InputError(f"{path}, line {i}: gene set {name!r} lists no genes")
        out[name] = GeneSet(
            name=name,
            genes=genes,
            source=f"{path}:{i}",
            version=f"gmt:{path.name}",
            label=fields[1].strip() or name,
        )
    if not out:
        raise InputError(f"{path}: no gene sets found (expected GMT lines)")
    return out


@lru_cache(maxsize=1)
def _aliases() -> pd.DataFrame:
    with _DATA.joinpath(ALIASES_FILE).open() as fh:
        return pd.read_csv(fh, sep="\t", comment="#", dtype=str)


def load_aliases() -> dict[str, str]:
    """``{alias or previous symbol: current HGNC symbol}`` from the shipped table."""
    table = _aliases()
    return dict(zip(table["alias"], table["symbol"], strict=True))


def resolve_sets(
    sets: Mapping[str, GeneSet],
    var_names: Sequence[str] | pd.Index,
    *,
    aliases: Mapping[str, str] | None = None,
) -> dict[str, ResolvedSet]:
    """Match each set's symbols to the dataset's genes, directly or through aliases.

    A symbol matches the gene of the same name (case-sensitive, as HGNC symbols
    are); failing that, a gene whose name is an alias of the symbol (data on an
    older reference: set says ``STING1``, data says ``TMEM173``) or the current
    symbol of an alias the set uses (set says ``IL8``, data says ``CXCL8``).
    A dataset gene is used at most once per set.

    Parameters
    ----------
    sets
        The gene sets.
    var_names
        The dataset's gene names (``adata.var_names``).
    aliases
        ``{alias: current symbol}``; default :func:`load_aliases`.

    Returns
    -------
    ``{name: ResolvedSet}`` in the order of ``sets``.
    """
    aliases = load_aliases() if aliases is None else dict(aliases)
    present = set(map(str, var_names))
    # current symbol -> aliases of it that are dataset genes
    by_symbol: dict[str, list[str]] = {}
    for alias, symbol in aliases.items():
        if alias in present:
            by_symbol.setdefault(symbol, []).append(alias)
    out: dict[str, ResolvedSet] = {}
    for name, gs in sets.items():
        res = ResolvedSet(gs)
        used: set[str] = set()
        for sym in gs.genes:
            match = None
            if sym in present:
                match = sym
            else:
                candidates = [*by_symbol.get(sym, [])]
                current = aliases.get(sym)
                if current is not None and current in present:
                    candidates.append(current)
                candidates = [c for c in candidates if c not in used]
                if len(candidates) == 1:
                    match = candidates[0]
                    res.aliases_used[sym] = match
            if match is None or match in used:
                res.missing.append(sym)
            else:
                used.add(match)
                res.found.append(match)
        out[name] = res
    return out


def sets_from_config(
    names: Iterable[str], gmt: str | Path | None, custom: Mapping[str, Sequence[str]]
) -> dict[str, GeneSet]:
    """The sets a ``score`` config asks for: built-in names, a GMT file, inline sets.

    Raises
    ------
    InputError
        An unknown built-in name (the message lists the available ones), a name
        given twice across the sources, or an inline set without genes.
    """
    builtin = builtin_sets()
    out: dict[str, GeneSet] = {}
    for name in names:
        if name not in builtin:
            raise InputError(
                f"score.genesets: no built-in gene set {name!r}; available: "
                f"{', '.join(builtin)} (or give your own under score.gmt / score.custom)"
            )
        out[name] = builtin[name]
    extra: dict[str, GeneSet] = dict(read_gmt(gmt)) if gmt is not None else {}
    for name, genes in custom.items():
        _check_name(name, "score.custom")
        uniq = tuple(dict.fromkeys(str(g).strip() for g in genes if str(g).strip()))
        if not uniq:
            raise InputError(f"score.custom.{name}: the gene set lists no genes")
        if name in extra:
            raise InputError(f"score.custom.{name}: a set of that name is also in score.gmt")
        extra[name] = GeneSet(name, uniq, "config score.custom", "config", name)
    for name, gs in extra.items():
        if name in out:
            raise InputError(
                f"gene set {name!r} from {gs.source} has the name of a built-in set that is "
                "also selected in score.genesets; rename it or drop the built-in one"
            )
        out[name] = gs
    return out
