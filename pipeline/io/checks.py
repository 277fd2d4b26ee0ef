"""Checks of the samples' genes before anything runs (``immuneage validate`` and ``run``).

They look at the gene names of each sample (from the files' summaries, see
:func:`~pipeline.io.readers.inspect_counts`), not at loaded matrices: the
species (non-human symbols stop the run, as the shipped marker panel and gene
sets are human) and the QC prefixes that match no gene. The runner calls
:func:`check_gene_content` from :func:`~pipeline.preflight.validate_inputs`.
(The readers' own checks of stored values live in ``pipeline.io.readers``.)
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..config import Config
from ..errors import DataFileError, ImmuneageWarning
from .samplesheet import SampleSheet

__all__ = ["LOWER_CASE_SHARE", "SpeciesEvidence", "check_gene_content", "species_evidence"]

#: A sample whose gene symbols have lower-case letters at least this often looks non-human.
LOWER_CASE_SHARE = 0.5
_LOWER = re.compile(r"[a-z]")  # Cd3e (mouse, rat), cd3eap (zebrafish); not CD3E
_HAS_LETTER = re.compile(r"[A-Za-z]")
_FAMILIAR = ("Cd3e", "Ptprc", "Cd74", "Lyz2", "Actb", "B2m", "Cd14", "Ms4a1", "cd74a", "actb1")
_N_LISTED = 5


@dataclass(frozen=True)
class SpeciesEvidence:
    """What a sample's gene names say about its species (:func:`species_evidence`).

    Attributes
    ----------
    lower_case_share
        Share of symbols (names with a letter, Ensembl ids left out) with
        lower-case letters, like mouse (``Cd3e``, ``Lyz2``) or zebrafish
        (``cd74a``) symbols; human symbols are upper-case (about 2% exceptions
        such as ``C1orf112``).
    examples
        A few of those symbols.
    n_mt_lower
        Genes starting with ``mt-`` (mouse, rat and zebrafish mitochondrial genes).
    n_human_mt
        Genes starting with ``MT-`` (human mitochondrial genes).
    n_mouse_ids
        Names that are mouse Ensembl ids (``ENSMUSG...``).
    """

    lower_case_share: float
    examples: tuple[str, ...]
    n_mt_lower: int
    n_human_mt: int
    n_mouse_ids: int

    @property
    def non_human(self) -> bool:
        """Whether the names look like mouse (or another non-human species)."""
        return (
            self.lower_case_share >= LOWER_CASE_SHARE
            or self.n_mouse_ids > 0
            or (self.n_mt_lower > 0 and self.n_human_mt == 0)
        )

    def describe(self) -> str:
        """The evidence in words."""
        parts = []
        if self.lower_case_share >= LOWER_CASE_SHARE:
            shown = ", ".join(map(repr, self.examples))
            parts.append(
                f"{self.lower_case_share:.0%} of the gene symbols have lower-case letters, "
                f"title-case like mouse symbols (e.g. {shown}); human symbols are upper-case"
            )
        if self.n_mt_lower:
            parts.append(f"{self.n_mt_lower} gene(s) start with 'mt-'")
        if self.n_mouse_ids:
            parts.append(f"{self.n_mouse_ids} gene(s) are mouse Ensembl ids (ENSMUSG...)")
        return ", ".join(parts)


def species_evidence(genes: Sequence[str]) -> SpeciesEvidence:
    """Look at gene names for signs of a non-human species.

    Parameters
    ----------
    genes
        A sample's gene names (symbols as the readers return them).

    Returns
    -------
    A :class:`SpeciesEvidence`.
    """
    names = [str(g) for g in genes]
    symbols = [g for g in names if _HAS_LETTER.search(g) and not g.startswith("ENS")]
    lower = [g for g in symbols if _LOWER.search(g)]
    present = set(lower)
    examples = [g for g in _FAMILIAR if g in present] + sorted(present)
    return SpeciesEvidence(
        lower_case_share=len(lower) / len(symbols) if symbols else 0.0,
        examples=tuple(dict.fromkeys(examples))[:3],
        n_mt_lower=sum(g.startswith("mt-") for g in names),
        n_human_mt=sum(g.startswith("MT-") for g in names),
        n_mouse_ids=sum(g.startswith("ENSMUS") for g in names),
    )


def _listed(samples: Sequence[str], n_total: int) -> str:
    shown = ", ".join(map(repr, samples[:_N_LISTED]))
    more = f" and {len(samples) - _N_LISTED} more" if len(samples) > _N_LISTED else ""
    return f"{len(samples)} of {n_total} sample(s) ({shown}{more})"


def _prefix_warning(
    what: str, prefixes: Sequence[str], sets: Mapping[str, set[str]], consequence: str, fix: str
) -> str | None:
    """A warning text when ``prefixes`` match no gene of some samples, else None."""
    prefixes = tuple(prefixes)
    if not prefixes:
        return None
    lacking = [s for s, genes in sets.items() if not any(g.startswith(prefixes) for g in genes)]
    if not lacking:
        return None
    other_case: dict[str, set[str]] = {}  # sample -> the prefixes its genes have in other case
    for s in lacking:
        found = {
            g[: len(p)]
            for g in sets[s]
            for p in prefixes
            if g[: len(p)].lower() == p.lower() and not g.startswith(p)
        }
        if found:
            other_case[s] = found
    shown = prefixes[0] if len(prefixes) == 1 else list(prefixes)
    verb = "matches" if len(prefixes) == 1 else "match"
    text = f"{what} {shown!r} {verb} no gene in {_listed(lacking, len(sets))}: {consequence}"
    if other_case:
        found = sorted(set().union(*other_case.values()))
        text += (
            f"; the genes of {_listed(list(other_case), len(sets))} start with "
            f"{', '.join(map(repr, found))} instead (mouse-style symbols?): set {what} to that"
        )
    if len(other_case) < len(lacking):
        text += (
            f"; if the data are mouse, set {what} to {fix}; a targeted gene panel (or a file "
            "subset to some genes) without these genes needs no change"
        )
    return text


def check_gene_content(
    sheet: SampleSheet,
    gene_sets: Sequence[Sequence[str]],
    cfg: Config,
    *,
    warn_qc_prefixes: bool = True,
) -> list[str]:
    """Checks of the samples' genes before anything runs (``immuneage validate`` and ``run``).

    Parameters
    ----------
    sheet
        The validated sample sheet.
    gene_sets
        Per sample (in sheet order), its gene symbols (every library's).
    cfg
        Run configuration (``qc.mt_prefix``, ``qc.ribo_prefixes``,
        ``ingest.species_check``).
    warn_qc_prefixes
        Issue the QC-prefix warnings now; ``False`` only returns them (the
        runner issues them when the ``qc`` stage runs, so that a rerun with
        everything current stays quiet).

    Returns
    -------
    The warnings (issued as :class:`~pipeline.errors.ImmuneageWarning`, the
    QC-prefix ones only with ``warn_qc_prefixes``).

    Raises
    ------
    DataFileError
        Samples look non-human (lower-case letters in most symbols, ``mt-``
        genes, ENSMUS ids) and ``ingest.species_check`` is ``"error"``: the
        shipped marker panel and gene sets are human.

    Warns
    -----
    ImmuneageWarning
        ``qc.mt_prefix`` or every ``qc.ribo_prefixes`` entry matches no gene
        of a sample; samples look non-human with ``species_check: warn``.
    """
    sets = {
        row.sample: set(map(str, genes)) for row, genes in zip(sheet.rows, gene_sets, strict=True)
    }
    issued: list[str] = []
    foreign = {}
    for row in sheet.rows:
        evidence = species_evidence(sorted(sets[row.sample]))
        if evidence.non_human:
            foreign[row.sample] = (row, evidence)
    if foreign:
        rows = [r for r, _ in foreign.values()]
        first_row, first = next(iter(foreign.values()))
        files = ", ".join(str(p) for p in first_row.paths)
        text = (
            f"{_listed([r.sample for r in rows], len(sheet.rows))} look like mouse (or another "
            f"non-human species), not human: in sample {first_row.sample!r} ({files}) "
            f"{first.describe()}. The shipped marker panel and gene sets are human: set "
            "annotate.markers to a marker file in this species' symbols, score.genesets: [] "
            "with your own sets in score.custom or score.gmt, and qc.mt_prefix: 'mt-' "
            "(qc.ribo_prefixes: ['Rps', 'Rpl']) for mouse"
        )
        if cfg.ingest.species_check == "error":
            raise DataFileError(
                f"{text}; then set ingest.species_check: warn to run on it. If the data are "
                "human, check the files' gene symbols (the sample sheet's symbol_column)."
            )
        issued.append(f"{text} (going on: ingest.species_check is 'warn')")
    qc = cfg.qc
    mt = _prefix_warning(
        "qc.mt_prefix",
        [qc.mt_prefix],
        sets,
        "their % mitochondrial counts will be 0 and qc.max_pct_mt removes nothing",
        "'mt-'",
    )
    ribo = _prefix_warning(
        "qc.ribo_prefixes",
        qc.ribo_prefixes,
        sets,
        "their % ribosomal counts will be 0",
        "['Rps', 'Rpl']",
    )
    for text in issued:
        warnings.warn(text, ImmuneageWarning, stacklevel=2)
    prefixes = [t for t in (mt, ribo) if t is not None]
    if warn_qc_prefixes:
        for text in prefixes:
            warnings.warn(text, ImmuneageWarning, stacklevel=2)
    return issued + prefixes
