"""Build the report: read the result tables, compute key findings, draw, render HTML.

:func:`read_tables` loads every result table present in ``<outdir>/tables``
(a missing optional table is ``None``), :func:`key_findings` ranks the
significant shifts, :func:`build_report` draws every figure
(:mod:`pipeline.report.figures`) and renders ``templates/report.html.j2`` into one
self-contained HTML string: figures embedded as base64 PNG (or inline SVG),
CSS inline, no script and a Content-Security-Policy that forbids any network
request, so the file opens anywhere, offline.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import keys
from ..stages.differential.shifts import GLOBAL_COLUMNS
from . import figures as F

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from anndata import AnnData
    from matplotlib.figure import Figure

    from ..config import Config

__all__ = [
    "TABLES",
    "FamilyRule",
    "Finding",
    "RenderedReport",
    "ReportTables",
    "build_report",
    "encode_figure",
    "enrichment_for_heatmap",
    "fdr_rules",
    "key_findings",
    "marker_expression",
    "read_tables",
]

TEMPLATES = Path(__file__).resolve().parent / "templates"

#: Result tables the report reads from ``<outdir>/tables`` (``<name>.tsv``).
TABLES = (
    "ingest_samples",
    "qc_per_sample",
    "hvg",
    "scvi_history",
    "integration_metrics",
    "marker_coverage",
    "cell_type_counts",
    "cell_type_clusters",
    "signature_coverage",
    "sample_handling",
    "signature_shifts",
    "signature_global",
    "signature_means",
    "signature_enrichment",
    "composition",
    "composition_absolute",
    "covariate_associations",
    "pseudobulk_de_summary",
    "differential_dropped",
)

#: Section ids in page order, with their titles.
SECTIONS = (
    ("summary", "1 Run summary"),
    ("qc", "2 Quality control"),
    ("integration", "3 Integration"),
    ("annotation", "4 Annotation"),
    ("signatures", "5 Signatures"),
    ("differential", "6 Differential results"),
    ("provenance", "7 Provenance"),
)


# --------------------------------------------------------------------------- tables
@dataclass
class ReportTables:
    """The result tables of a run; a table not written (yet) is ``None``.

    Attributes
    ----------
    tables
        Name (see :data:`TABLES`) -> DataFrame, or ``None`` when absent.
    pseudobulk_de
        ``(cell_type, contrast)`` -> the DE table of that tested pair.
    """

    tables: dict[str, pd.DataFrame | None] = field(default_factory=dict)
    pseudobulk_de: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)

    def get(self, name: str) -> pd.DataFrame | None:
        """The table ``name``, or ``None`` when absent or empty of columns."""
        t = self.tables.get(name)
        return t if t is not None and len(t.columns) else None


def _safe(name: str) -> str:
    """File-safe cell type as in DE table names (anything but ``[A-Za-z0-9.+_-]`` -> ``_``)."""
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", str(name))


def read_tables(tables_dir: Path) -> ReportTables:
    """Read every result table present in ``tables_dir``.

    Parameters
    ----------
    tables_dir
        ``<outdir>/tables``.

    Returns
    -------
    :class:`ReportTables`. Pseudobulk DE tables
    ``pseudobulk_de/<cell_type>__<contrast>.tsv`` are matched to their cell type
    through ``pseudobulk_de_summary.tsv`` (its ``table`` column, else the
    file-safe cell type: characters other than ``[A-Za-z0-9.+_-]`` are ``_``);
    without the summary the file name is used.
    """
    tables_dir = Path(tables_dir)
    out = ReportTables()
    for name in TABLES:
        path = tables_dir / f"{name}.tsv"
        out.tables[name] = pd.read_csv(path, sep="\t") if path.is_file() else None
    summary = out.get("pseudobulk_de_summary")
    lookup: dict[str, tuple[str, str]] = {}
    if summary is not None:
        names = (
            summary["table"].astype(str).str.removeprefix("pseudobulk_de/")
            if "table" in summary.columns
            else None
        )
        for i, (ct, con) in enumerate(
            zip(summary["cell_type"].astype(str), summary["contrast"].astype(str), strict=True)
        ):
            lookup[f"{_safe(ct)}__{con}"] = (ct, con)
            if names is not None and names.iloc[i] not in ("", "nan"):
                lookup[names.iloc[i]] = (ct, con)
    de_dir = tables_dir / "pseudobulk_de"
    if de_dir.is_dir():
        for path in sorted(de_dir.glob("*.tsv")):
            stem = path.name[: -len(".tsv")]
            if stem in lookup:
                key = lookup[stem]
            elif "__" in stem:
                ct, con = stem.rsplit("__", 1)
                key = (ct, con)
            else:
                continue
            out.pseudobulk_de[key] = pd.read_csv(path, sep="\t")
    return out


# --------------------------------------------------------------------------- FDR families
#: Tables whose q-values come in FDR families (a ``family`` column), in report order.
FAMILY_TABLES = (
    "signature_shifts",
    "signature_global",
    "composition",
    "composition_absolute",
    "signature_enrichment",
    "covariate_associations",
)

#: What each table's numbers answer: the question, relative or absolute, adjusted or not.
TABLE_QUESTIONS = {
    "signature_shifts": (
        "change of a cell type's donor-mean score between two timepoints, within donors "
        "(test minus reference); not adjusted for covariates or sample handling"
    ),
    "signature_global": (
        "any difference of the donor-mean score between the timepoints, within donors "
        "(Hotelling's T², no sphericity assumed); not adjusted for covariates"
    ),
    "composition": (
        "relative abundance: shares of the sample's assigned cells (when one type rises, the "
        "others' shares fall)"
    ),
    "composition_absolute": "absolute abundance: cells per µL (share × the sample's total)",
    "signature_enrichment": (
        "whether a signature's genes rank higher or lower than the other genes in the "
        "pseudobulk DE statistics (competitive, relative to the other genes)"
    ),
    "covariate_associations": "slope of the donor-mean score on a per-sample covariate",
}

#: What the FDR family names of the ``family`` columns stand for.
FAMILY_MEANING = {
    "primary": "cell type × signature pairs named in differential.primary",
    "exploratory": "programme pairs not named in differential.primary",
    "all": "every programme pair (differential.primary is null)",
    "control": "sample-handling control signatures, e.g. ieg_dissociation",
    "composition_relative": "each type's share",
    "composition_log_ratio": "log-ratios of two type groups",
    "composition_absolute": "cells per µL of each type",
    "enrichment_camera": "camera, inter-gene correlation accounted for",
    "enrichment_ulm": "ULM, genes assumed independent",
}

#: Families never listed as findings (a control measures sample handling, not biology).
CONTROL_FAMILIES = frozenset({"control"})

#: Order of the signature families in the key findings (primary hypotheses first).
_FAMILY_RANK = {"primary": 0, "all": 1, "exploratory": 2, "composition_relative": 0}


def _family_meaning(family: str) -> str:
    if family in FAMILY_MEANING:
        return FAMILY_MEANING[family]
    cov, _, comp = family.rpartition(":")
    if comp == "within":
        return f"slopes on the donor-centred {cov}: a donor's score following their own {cov}"
    if comp == "between":
        return (
            f"slopes on the donors' mean {cov}: a comparison of donors, open to donor-level "
            "confounding"
        )
    return family


def _truthy(values: pd.Series) -> np.ndarray:
    """``True``/``"True"``/``1`` -> True (a TSV column read back as bool or text)."""
    return values.astype(str).str.strip().str.lower().isin(("true", "1", "1.0")).to_numpy()


def calibrated_mask(t: pd.DataFrame) -> np.ndarray:
    """Rows whose p-values a calibration test checks (enrichment: ``calibrated``).

    Tables without a ``calibrated`` column are calibrated, except an enrichment
    table of the old shape (``method`` absent or not ``camera``: ULM).
    """
    if "calibrated" in t.columns:
        return _truthy(t["calibrated"])
    if "method" in t.columns and "score" in t.columns:
        return (t["method"].astype(str) == "camera").to_numpy()
    if "score" in t.columns and "signature" in t.columns and "slope" not in t.columns:
        return np.zeros(len(t), dtype=bool)
    return np.ones(len(t), dtype=bool)


def _families(t: pd.DataFrame) -> pd.Series:
    if "family" in t.columns:
        return t["family"].astype(str).where(t["family"].notna(), "")
    return pd.Series("", index=t.index)


def _matches_bh(p: np.ndarray, q: np.ndarray) -> bool:
    from ..stats.multitest import bh_adjust

    ok = np.isfinite(p) & (p >= 0) & (p <= 1)
    want = np.full(p.shape, np.nan)
    want[ok] = bh_adjust(p[ok])
    return bool(np.allclose(want, q, rtol=2e-3, atol=1e-7, equal_nan=True))


@dataclass(frozen=True)
class FamilyRule:
    """The FDR family of a table's q-values, read from the table itself.

    Attributes
    ----------
    table
        Table name (``signature_shifts``, ``composition``, ...).
    family
        The ``family`` value (``""`` for a table without that column).
    n_tests
        Rows of the family with a q-value (the ``m`` of its BH).
    contrasts
        The contrasts its rows span (empty for tables without contrasts).
    scope
        How the q-values were found to be computed, by recomputing BH from
        ``p_value``: ``family`` (over every row of the family, all contrasts
        together), ``contrast`` (within each contrast of the family),
        ``unverified`` (neither matches) or ``untested`` (no q-value).
    calibrated
        Whether its p-values come from a calibrated test (``False``: ULM).
    questions
        The family's ``question`` values (composition tables), else empty.
    """

    table: str
    family: str
    n_tests: int
    contrasts: tuple[str, ...]
    scope: str
    calibrated: bool = True
    questions: tuple[str, ...] = ()

    @property
    def meaning(self) -> str:
        """What the family name stands for."""
        return _family_meaning(self.family) if self.family else "the whole table (no families)"

    def rule(self) -> str:
        """The BH rule in words, e.g. ``BH over its 24 tests, 2 contrasts together``."""
        k = len(self.contrasts)
        if self.scope == "untested":
            return "no test had a p-value"
        if self.scope == "unverified":
            return (
                "its q-values match BH neither over the family nor within each contrast "
                "(recomputed from p_value): read them with care"
            )
        if self.scope == "contrast":
            return f"BH within each contrast separately ({self.n_tests} tests over {k} contrasts)"
        if k > 1:
            both = "both" if k == 2 else f"all {k}"
            return f"BH over its {self.n_tests} tests, {both} contrasts together"
        return f"BH over its {self.n_tests} tests"

    def short(self) -> str:
        """``<family> family: <rule>`` (``q: <rule>`` without a family)."""
        head = f"{self.family} family" if self.family else "q"
        return f"{head}: {self.rule()}"


def fdr_rules(tables: ReportTables) -> list[FamilyRule]:
    """The FDR family rule of every q-value table present, generated from the tables.

    Each family's scope is checked by recomputing Benjamini-Hochberg from
    ``p_value`` (over the family, then within each contrast), so the report
    states what the numbers are, not what they were meant to be.

    Returns
    -------
    One :class:`FamilyRule` per table (:data:`FAMILY_TABLES`) x family, in
    table order and order of appearance.
    """
    out: list[FamilyRule] = []
    for name in FAMILY_TABLES:
        t = tables.get(name)
        if t is None or t.empty or "q_value" not in t.columns:
            continue
        fams = _families(t)
        cal = calibrated_mask(t)
        for fam in dict.fromkeys(fams):
            m = (fams == fam).to_numpy()
            g = t.loc[m]
            q = pd.to_numeric(g["q_value"], errors="coerce").to_numpy(dtype=float)
            p = (
                pd.to_numeric(g["p_value"], errors="coerce").to_numpy(dtype=float)
                if "p_value" in g.columns
                else np.full(len(g), np.nan)
            )
            cons = (
                tuple(dict.fromkeys(g["contrast"].astype(str))) if "contrast" in g.columns else ()
            )
            if not np.isfinite(q).any():
                scope = "untested"
            elif _matches_bh(p, q):
                scope = "family"
            elif cons and all(
                _matches_bh(p[(g["contrast"].astype(str) == c).to_numpy()],
                            q[(g["contrast"].astype(str) == c).to_numpy()])
                for c in cons
            ):  # fmt: skip
                scope = "contrast"
            else:
                scope = "unverified"
            questions = (
                tuple(dict.fromkeys(g["question"].dropna().astype(str)))
                if "question" in g.columns
                else ()
            )
            out.append(
                FamilyRule(
                    name,
                    fam,
                    int(np.isfinite(q).sum()),
                    cons,
                    scope,
                    bool(cal[m].all()),
                    questions,
                )
            )
    return out


def _rule_lookup(rules: Sequence[FamilyRule]) -> dict[tuple[str, str], FamilyRule]:
    return {(r.table, r.family): r for r in rules}


def _caption_rule(rules: Sequence[FamilyRule], table: str, rows: pd.DataFrame | None = None) -> str:
    """One line for a table caption: each family (of ``rows``, if given) and its BH rule."""
    fams = None if rows is None else set(_families(rows))
    parts = []
    for r in rules:
        if r.table != table or (fams is not None and r.family not in fams):
            continue
        parts.append(r.short() + ("" if r.calibrated else " (not calibrated)"))
    return "; ".join(parts)


# --------------------------------------------------------------------------- findings
@dataclass(frozen=True)
class Finding:
    """One significant result, as listed at the top of the report.

    Attributes
    ----------
    kind
        ``signature``, ``composition`` (relative abundance and log-ratios),
        ``composition_absolute``, ``enrichment`` or ``de``.
    contrast
        The contrast (``<test>_vs_<reference>``).
    cell_type
        The cell type (or log-ratio name).
    what
        The signature, ``proportion``, ``log_ratio``, ``cells_per_ul`` or ``genes``.
    direction
        ``up`` or ``down`` (``mixed`` for DE gene counts and unchanged means).
    text
        The sentence shown (effect, CI, q and what it answers, donors).
    q_value
        The q-value the ranking uses.
    family
        The FDR family of ``q_value`` (``""`` for DE: BH over the genes of one result).
    """

    kind: str
    contrast: str
    cell_type: str
    what: str
    direction: str
    text: str
    q_value: float
    family: str = ""


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def _fmt(x: Any, digits: int = 3) -> str:
    """Numbers with ``digits`` significant digits, integers with separators, NaN as ``-``."""
    if x is None:
        return "-"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(float(x)):
            return "-"
        if float(x).is_integer() and abs(x) < 1e15:
            return f"{int(x):,}"
        return f"{float(x):.{digits}g}"
    if isinstance(x, str):
        return x
    return "-" if pd.isna(x) else str(x)


def _ci(lo: Any, hi: Any) -> str:
    lo_f, hi_f = _num(lo), _num(hi)
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        return ""
    return f" (95% CI {lo_f:+.3g} to {hi_f:+.3g})"


def _sig_rows(t: pd.DataFrame | None, q_threshold: float) -> pd.DataFrame:
    if t is None or "q_value" not in t.columns:
        return pd.DataFrame()
    q = pd.to_numeric(t["q_value"], errors="coerce")
    return t.assign(q_value=q)[q < q_threshold].sort_values("q_value", kind="stable")


def _ranked(sig: pd.DataFrame) -> pd.DataFrame:
    """Significant rows, primary family first, then by q."""
    if sig.empty:
        return sig
    rank = _families(sig).map(lambda f: _FAMILY_RANK.get(f, 3))
    return sig.assign(_rank=rank.to_numpy()).sort_values(["_rank", "q_value"], kind="stable")


def _change_direction(r: Any, reference: str, test: str) -> str:
    """``up``/``down`` from the table's ``direction``, else from the change of the means.

    Never from the sign of a transformed effect (a logit, CLR or log-ratio
    difference can disagree with the change of the mean share).
    """
    d = str(getattr(r, "direction", "") or "").strip().lower()
    if d in ("up", "down"):
        return d
    a, b = _num(getattr(r, reference, np.nan)), _num(getattr(r, test, np.nan))
    if math.isfinite(a) and math.isfinite(b) and a != b:
        return "up" if b > a else "down"
    return "unchanged"


def _q_text(q: float, rule: FamilyRule | None) -> str:
    return f"q = {q:.2g}" + (f" ({rule.short()})" if rule is not None else "")


def _effect_text(r: Any) -> str:
    eff = _num(getattr(r, "effect", np.nan))
    if not math.isfinite(eff):
        return ""
    scale = str(getattr(r, "scale", "") or "").strip()
    scale = "" if scale in ("", "nan") else f" {scale}"
    return f"; effect {eff:+.3g}{scale}{_ci(r.ci_low, r.ci_high).replace(' (', ', ').rstrip(')')}"


def _donors_text(r: Any) -> str:
    n = _num(getattr(r, "n_donors", np.nan))
    return f", {int(n)} donors" if math.isfinite(n) else ""


def key_findings(
    tables: ReportTables, *, q_threshold: float, max_findings: int
) -> dict[str, dict[str, Any]]:
    """Significant results per contrast, computed from the result tables.

    Signature shifts of the ``primary`` family come first; the sample-handling
    ``control`` family is never listed (the report shows it as a control);
    composition directions come from the change of the mean share (``direction``),
    never from a transformed effect's sign; enrichment results only from
    calibrated rows (camera, never ULM). Each text names the FDR family of its
    q-value and its BH rule (:func:`fdr_rules`).

    Parameters
    ----------
    tables
        The run's tables (signature shifts, composition, absolute composition,
        enrichment, pseudobulk DE).
    q_threshold
        A result counts when its BH q-value is below this.
    max_findings
        Per contrast and kind, at most this many findings (primary family
        first, then smallest q).

    Returns
    -------
    Contrast -> ``{"signature": [Finding], "composition": [...],
    "composition_absolute": [...], "enrichment": [...], "de": [...],
    "n_tests": {kind: tests done}, "n_significant": {kind: count},
    "by_family": {kind: [(family, n_significant, n_tests)]}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    rules = _rule_lookup(fdr_rules(tables))
    kinds = ("signature", "composition", "composition_absolute", "enrichment", "de")

    def slot(con: str) -> dict[str, Any]:
        return out.setdefault(
            con,
            {k: [] for k in kinds} | {"n_tests": {}, "n_significant": {}, "by_family": {}},
        )

    def tested(con: str, kind: str, g: pd.DataFrame) -> tuple[dict[str, Any], pd.DataFrame]:
        """The contrast's slot and its rows below the threshold, primary family first."""
        s = slot(con)
        sig = _ranked(_sig_rows(g, q_threshold))
        q = pd.to_numeric(g["q_value"], errors="coerce")
        s["n_tests"][kind] = int(q.notna().sum())
        s["n_significant"][kind] = len(sig)
        fams = _families(g)
        s["by_family"][kind] = [
            (f, int(((fams == f) & (q < q_threshold)).sum()), int(((fams == f) & q.notna()).sum()))
            for f in sorted(dict.fromkeys(fams), key=lambda f: _FAMILY_RANK.get(f, 3))
            if f
        ]
        return s, sig

    def per_contrast(t: pd.DataFrame | None) -> list[tuple[str, pd.DataFrame]]:
        if t is None or t.empty or "contrast" not in t.columns:
            return []
        return list(t.groupby(t["contrast"].astype(str), sort=False))

    shifts = tables.get("signature_shifts")
    if shifts is not None:
        # the control family, and control-role signatures of a table without families
        roles = _control_signatures(tables.get("signature_coverage"), None)
        control = _families(shifts).isin(CONTROL_FAMILIES) | shifts["signature"].astype(str).isin(
            roles
        )
        shifts = shifts.loc[~control.to_numpy()]
    for con, g in per_contrast(shifts):
        s, sig = tested(con, "signature", g)
        for r in sig.head(max_findings).itertuples(index=False):
            eff = _num(r.effect)
            fam = str(getattr(r, "family", "") or "")
            dz = _num(getattr(r, "dz", float("nan")))
            dz_txt = f", dz {dz:+.2f}" if math.isfinite(dz) else ""
            text = (
                f"{r.signature} {'higher' if eff > 0 else 'lower'} in {r.cell_type}: "
                f"score {eff:+.3g}{_ci(r.ci_low, r.ci_high)}{dz_txt}, "
                f"{_q_text(r.q_value, rules.get(('signature_shifts', fam)))}{_donors_text(r)}"
            )
            s["signature"].append(
                Finding(
                    "signature",
                    con,
                    str(r.cell_type),
                    str(r.signature),
                    "up" if eff > 0 else "down",
                    text,
                    float(r.q_value),
                    fam,
                )
            )

    for name in ("composition", "composition_absolute"):
        for con, g in per_contrast(tables.get(name)):
            s, sig = tested(con, name, g)
            for r in sig.head(max_findings).itertuples(index=False):
                fam = str(getattr(r, "family", "") or "")
                rule = rules.get((name, fam))
                kind_ = str(getattr(r, "kind", "") or "")
                if name == "composition_absolute":
                    what = "cells_per_ul"
                    d = _change_direction(r, "mean_per_ul_reference", "mean_per_ul_test")
                    head = (
                        f"{r.cell_type} cells per µL {d} (absolute abundance): "
                        f"{_num(r.mean_per_ul_reference):.3g} → {_num(r.mean_per_ul_test):.3g} "
                        "cells/µL"
                    )
                elif kind_ == "log_ratio" or fam == "composition_log_ratio":
                    what = "log_ratio"
                    d = _change_direction(r, "mean_prop_reference", "mean_prop_test")
                    head = (
                        f"{r.cell_type} {d}: numerator share of numerator + denominator "
                        f"{100 * _num(r.mean_prop_reference):.2f}% → "
                        f"{100 * _num(r.mean_prop_test):.2f}%"
                    )
                else:
                    what = "proportion"
                    d = _change_direction(r, "mean_prop_reference", "mean_prop_test")
                    head = (
                        f"{r.cell_type} share {d} (relative abundance): "
                        f"{100 * _num(r.mean_prop_reference):.2f}% → "
                        f"{100 * _num(r.mean_prop_test):.2f}% of assigned cells"
                    )
                text = f"{head}{_effect_text(r)}, {_q_text(r.q_value, rule)}{_donors_text(r)}"
                s[name].append(
                    Finding(
                        name,
                        con,
                        str(r.cell_type),
                        what,
                        d if d in ("up", "down") else "mixed",
                        text,
                        float(r.q_value),
                        fam,
                    )
                )

    enr = tables.get("signature_enrichment")
    if enr is not None:
        enr = enr.loc[calibrated_mask(enr)]
    for con, g in per_contrast(enr):
        s, sig = tested(con, "enrichment", g)
        for r in sig.head(max_findings).itertuples(index=False):
            fam = str(getattr(r, "family", "") or "")
            score = _num(r.score)
            d = str(getattr(r, "direction", "") or "").strip().lower()
            d = d if d in ("up", "down") else ("up" if score > 0 else "down")
            cor = _num(getattr(r, "inter_gene_cor", np.nan))
            cor_txt = f", inter-gene correlation {cor:.2f}" if math.isfinite(cor) else ""
            method = str(getattr(r, "method", "") or "")
            text = (
                f"{r.signature} genes {'higher' if d == 'up' else 'lower'} than the other genes "
                f"in {r.cell_type} DE ({method}{cor_txt}): score {score:+.3g}, "
                f"{_q_text(r.q_value, rules.get(('signature_enrichment', fam)))}"
            )
            s["enrichment"].append(
                Finding(
                    "enrichment",
                    con,
                    str(r.cell_type),
                    str(r.signature),
                    d,
                    text,
                    float(r.q_value),
                    fam,
                )
            )

    if tables.pseudobulk_de:
        summary = tables.get("pseudobulk_de_summary")
        donors: dict[tuple[str, str], Any] = {}
        if summary is not None:
            donors = {
                (str(a), str(b)): n
                for a, b, n in zip(
                    summary["cell_type"], summary["contrast"], summary["n_donors"], strict=True
                )
            }
        per_con: dict[str, list[Finding]] = {}
        for (ct, con), de in tables.pseudobulk_de.items():
            s = slot(con)
            s["n_tests"]["de"] = s["n_tests"].get("de", 0) + 1
            q = pd.to_numeric(de["q_value"], errors="coerce")
            lfc = pd.to_numeric(de["log2fc"], errors="coerce")
            m = q < q_threshold
            n_sig = int(m.sum())
            if n_sig == 0:
                continue
            n_up, n_down = int((m & (lfc > 0)).sum()), int((m & (lfc < 0)).sum())
            top = de.assign(_q=q)[m].sort_values("_q").head(5)
            genes = ", ".join(
                f"{g} {'↑' if _num(x) > 0 else '↓'}"
                for g, x in zip(top["gene"], top["log2fc"], strict=True)
            )
            nd = donors.get((ct, con))
            nd_txt = (
                f", {int(_num(nd))} donors" if nd is not None and math.isfinite(_num(nd)) else ""
            )
            text = (
                f"{ct}: {n_sig} gene{'' if n_sig == 1 else 's'} at q < {q_threshold:g} "
                f"({n_up} up, {n_down} down{nd_txt}; "
                f"BH over the genes of this cell type and contrast); top: {genes}"
            )
            direction = "up" if n_up > n_down else "down" if n_down > n_up else "mixed"
            per_con.setdefault(con, []).append(
                Finding("de", con, ct, "genes", direction, text, float(q[m].min()))
            )
        for con, items in per_con.items():
            s = slot(con)
            s["n_significant"]["de"] = len(items)
            s["de"] = sorted(items, key=lambda f: f.q_value)[:max_findings]
        for con in out:
            if "de" in out[con]["n_tests"]:
                out[con]["n_significant"].setdefault("de", 0)
    return out


# --------------------------------------------------------------------------- helpers
def _gene_columns(x: Any, idx: np.ndarray, *, chunk_size: int | None) -> Any:
    """Columns ``idx`` of a row source (an on-disk ``X``), gathered block by block as CSR."""
    import scipy.sparse as sp

    from ..kernels.sparse import DEFAULT_CHUNK_SIZE, iter_row_blocks

    step = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    blocks = [block[:, idx] for _, _, block in iter_row_blocks(x, chunk_size=step)]
    if not blocks:
        return sp.csr_matrix((int(x.shape[0]), len(idx)), dtype=getattr(x, "dtype", np.float32))
    return sp.csr_matrix(sp.vstack(blocks, format="csr"))


def marker_expression(
    adata: AnnData,
    markers: Mapping[str, Sequence[str]],
    *,
    groupby: str = keys.CELL_TYPE,
    chunk_size: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean expression and fraction of expressing cells of marker genes per group.

    Parameters
    ----------
    adata
        Cells with log-normalised ``X`` and ``obs[groupby]``. ``X`` may be an
        on-disk row source (backed mode): only the marker columns are gathered,
        block by block, and each group's cells are densified one group at a time.
    markers
        Group -> its marker genes (genes absent from ``var_names`` are dropped).
    groupby
        obs column of the groups (rows, in the order of ``markers``).
    chunk_size
        Rows per block read from an on-disk ``X``; default
        :data:`pipeline.kernels.sparse.DEFAULT_CHUNK_SIZE`.

    Returns
    -------
    ``(mean, fraction)``: groups x genes DataFrames (genes in first-seen order).
    """
    from ..kernels.sparse import is_row_source

    present = set(map(str, adata.var_names))
    genes = list(dict.fromkeys(g for gs in markers.values() for g in gs if g in present))
    groups = [g for g in markers if (adata.obs[groupby].astype(str) == g).any()]
    if not genes or not groups:
        empty = pd.DataFrame(index=groups, columns=genes, dtype=float)
        return empty, empty.copy()
    if is_row_source(adata.X):
        idx = adata.var_names.get_indexer(genes)
        x = _gene_columns(adata.X, idx, chunk_size=chunk_size)
    else:
        x = adata[:, genes].X
        x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    labels = adata.obs[groupby].astype(str).to_numpy()
    mean = np.zeros((len(groups), len(genes)))
    frac = np.zeros_like(mean)
    for i, g in enumerate(groups):
        sub = x[labels == g]
        sub = sub.toarray() if hasattr(sub, "toarray") else sub
        mean[i] = sub.mean(axis=0)
        frac[i] = (sub > 0).mean(axis=0)
    return (
        pd.DataFrame(mean, index=groups, columns=genes),
        pd.DataFrame(frac, index=groups, columns=genes),
    )


def encode_figure(fig: Figure, fmt: str, dpi: int) -> bytes:
    """The figure as PNG or SVG bytes."""
    buf = io.BytesIO()
    fig.savefig(
        buf, format=fmt, dpi=dpi, metadata={"Software": None} if fmt == "png" else {"Date": None}
    )
    return buf.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


@dataclass
class _Table:
    """A table block: header, formatted rows, per-row CSS class."""

    columns: list[str]
    rows: list[list[str]]
    row_classes: list[str]
    caption: str = ""
    collapsed: bool = False


def _table(
    df: pd.DataFrame,
    columns: Sequence[str] | None = None,
    *,
    caption: str = "",
    q_threshold: float | None = None,
    collapsed: bool | None = None,
    max_rows: int = 500,
) -> _Table:
    """A table block; with ``q_threshold``, rows below it are highlighted.

    Only rows from a calibrated test are highlighted (:func:`calibrated_mask`:
    never ULM enrichment rows).
    """
    cols = [c for c in (columns or list(df.columns)) if c in df.columns]
    d = df[cols].head(max_rows)
    rows = [[_fmt(v) for v in r] for r in d.itertuples(index=False, name=None)]
    classes = [""] * len(rows)
    if q_threshold is not None and "q_value" in df.columns:
        head = df.head(max_rows)
        q = pd.to_numeric(head["q_value"], errors="coerce").to_numpy()
        ok = calibrated_mask(head)
        classes = [
            "sig" if c and np.isfinite(v) and v < q_threshold else ""
            for v, c in zip(q, ok, strict=True)
        ]
    if len(df) > max_rows:
        caption += f" (first {max_rows} of {len(df):,} rows; all in the TSV)"
    return _Table(
        cols, rows, classes, caption, bool(len(rows) > 25 if collapsed is None else collapsed)
    )


@dataclass
class _Section:
    id: str
    title: str
    blocks: list[dict[str, Any]] = field(default_factory=list)

    def note(self, text: str, *, kind: str = "note") -> None:
        self.blocks.append({"type": "note", "text": text, "kind": kind})

    def table(self, t: _Table) -> None:
        self.blocks.append({"type": "table", "table": t})

    def heading(self, text: str) -> None:
        self.blocks.append({"type": "heading", "text": text})

    def pre(self, text: str, *, summary: str) -> None:
        self.blocks.append({"type": "pre", "text": text, "summary": summary})

    def items(self, title: str, items: list[tuple[str, list[str]]]) -> None:
        """A titled list; each item a line with its sub-lines."""
        self.blocks.append({"type": "list", "title": title, "entries": items})


@dataclass
class RenderedReport:
    """The rendered report.

    Attributes
    ----------
    html
        The self-contained page.
    figures
        File name (``<name>.png`` or ``.svg``) -> bytes, as embedded in the page.
    findings
        The key findings (see :func:`key_findings`).
    """

    html: str
    figures: dict[str, bytes]
    findings: dict[str, dict[str, Any]]


class _Figures:
    """Collects the figures of the report, then draws, encodes and closes them in one pass.

    :meth:`add` reserves the figure's place (a block of its section) and its file
    name; :meth:`draw` draws every figure in the order added, with progress
    (:func:`pipeline.progress.progress`: a bar on a terminal, a plain line now
    and then otherwise, nothing with ``--quiet``), so the total is known.
    """

    def __init__(self, fmt: str, dpi: int) -> None:
        self.fmt, self.dpi = fmt, dpi
        self.files: dict[str, bytes] = {}
        self._pending: list[tuple[str, Callable[[], Figure], dict[str, Any]]] = []
        self._names: set[str] = set()

    def add(self, section: _Section, name: str, caption: str, draw: Callable[[], Figure]) -> None:
        """Reserve a figure: ``draw`` runs in :meth:`draw` (it must not depend on later state)."""
        fname = f"{_slug(name)}.{self.fmt}"
        i = 2
        while fname in self._names:
            fname = f"{_slug(name)}_{i}.{self.fmt}"
            i += 1
        self._names.add(fname)
        block: dict[str, Any] = {"type": "figure", "name": fname, "caption": caption}
        section.blocks.append(block)
        self._pending.append((fname, draw, block))

    def draw(self) -> None:
        """Draw and encode every reserved figure, in the order added."""
        from ..progress import progress

        pending, self._pending = self._pending, []
        for fname, draw, block in progress(pending, desc="report figures", unit="figure"):
            data = encode_figure(draw(), self.fmt, self.dpi)
            self.files[fname] = data
            if self.fmt == "png":
                block["src"] = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            else:
                svg = data.decode("utf-8")
                block["svg"] = svg[svg.index("<svg") :]


def skipped_signatures_note(coverage: pd.DataFrame) -> str | None:
    """The line naming the gene sets the score stage skipped and their missing genes."""
    skipped = coverage[coverage["status"].astype(str).str.startswith("skipped")]
    if skipped.empty:
        return None
    parts = []
    for r in skipped.itertuples(index=False):
        missing = [g for g in str(r.genes_missing).split(",") if g and g != "nan"]
        shown = ", ".join(missing[:12]) + (" ..." if len(missing) > 12 else "")
        parts.append(f"{r.signature} ({r.n_found} of {r.n_genes} genes found; missing {shown})")
    return (
        f"Not scored: {len(parts)} gene set(s) with fewer genes in the data than "
        f"score.min_genes: {'; '.join(parts)}."
    )


def _contrast_label(con: str) -> str:
    return con.replace("_vs_", " vs ").replace("_", " ")


#: Columns of the composition tables shown in the report (``effect_clr``, kept in the
#: TSV for old readers, is not shown: ``effect`` is on the scale its ``scale`` names).
_COMPOSITION_SHOWN = (
    "contrast",
    "cell_type",
    "kind",
    "n_donors",
    "mean_prop_reference",
    "mean_prop_test",
    "direction",
    "effect",
    "scale",
    "ci_low",
    "ci_high",
    "dz",
    "p_value",
    "q_value",
    "family",
    "p_wilcoxon",
    "note",
)
_ABSOLUTE_SHOWN = (
    "contrast",
    "cell_type",
    "n_donors",
    "mean_per_ul_reference",
    "mean_per_ul_test",
    "mean_prop_reference",
    "mean_prop_test",
    "direction",
    "effect",
    "scale",
    "ci_low",
    "ci_high",
    "dz",
    "p_value",
    "q_value",
    "family",
    "p_wilcoxon",
    "note",
)


def _unique_text(df: pd.DataFrame, column: str, default: str) -> str:
    if column not in df.columns:
        return default
    vals = [v for v in dict.fromkeys(df[column].dropna().astype(str)) if v and v != "nan"]
    return "; ".join(vals) if vals else default


def _questions(df: pd.DataFrame) -> str:
    return _unique_text(df, "question", "question not recorded")


def _scales(df: pd.DataFrame) -> str:
    return _unique_text(df, "scale", "unstated").replace("; ", " / ")


def enrichment_for_heatmap(enr: pd.DataFrame) -> pd.DataFrame:
    """The enrichment rows the report's heatmap draws, with the q-values it may star.

    Rows of a calibrated method (camera) when there are any; otherwise every
    row with ``q_value`` set to NaN, so an uncalibrated test (ULM) is drawn but
    never starred.
    """
    cal = calibrated_mask(enr)
    if cal.any():
        return enr.loc[cal]
    return enr.assign(q_value=np.nan)


def _fdr_items(rules: Sequence[FamilyRule], tables: ReportTables) -> list[tuple[str, list[str]]]:
    """Per table: what its numbers answer, and one line per FDR family with its BH rule."""
    items: list[tuple[str, list[str]]] = []
    for name in FAMILY_TABLES:
        rs = [r for r in rules if r.table == name]
        t = tables.get(name)
        if not rs or t is None:
            continue
        head = f"{name}.tsv: {TABLE_QUESTIONS[name]}"
        if name == "covariate_associations":
            head += f"; adjusted for: {_unique_text(t, 'adjusted_for', 'not recorded')}"
        subs = []
        for r in rs:
            line = (
                f"family {r.family} ({r.meaning}): {r.rule()}"
                if r.family
                else f"no family column: {r.rule()}"
            )
            if r.questions:
                line += f"; question: {'; '.join(r.questions)}"
            if not r.calibrated:
                line += (
                    "; not calibrated (ULM ignores inter-gene correlation): never starred, "
                    "highlighted or listed as a finding"
                )
            if r.family in CONTROL_FAMILIES:
                line += "; shown under Sample-handling control (section 5), never a finding"
            subs.append(line + ".")
        items.append((head, subs))
    if tables.pseudobulk_de:
        n_ok, n_de = 0, len(tables.pseudobulk_de)
        for de in tables.pseudobulk_de.values():
            p = pd.to_numeric(de["p_value"], errors="coerce").to_numpy(dtype=float)
            q = pd.to_numeric(de["q_value"], errors="coerce").to_numpy(dtype=float)
            n_ok += _matches_bh(p, q)
        items.append(
            (
                "pseudobulk_de/<cell type>__<contrast>.tsv: gene-level log2 fold changes, test vs "
                "reference, donors paired",
                [
                    "one family per DE table: BH over its genes"
                    + (
                        f" (checked on all {n_de} tables)."
                        if n_ok == n_de
                        else f"; {n_de - n_ok} of {n_de} tables do not match BH when recomputed "
                        "from p_value: read their q-values with care."
                    )
                ],
            )
        )
    return items


def _control_signatures(
    coverage: pd.DataFrame | None, control_shifts: pd.DataFrame | None
) -> list[str]:
    """Signatures scored as sample-handling controls (coverage ``role``, shifts' control family)."""
    names: list[str] = []
    if coverage is not None and "role" in coverage.columns:
        names += (
            coverage.loc[coverage["role"].astype(str) == "control", "signature"]
            .astype(str)
            .tolist()
        )
    if control_shifts is not None and len(control_shifts):
        names += control_shifts["signature"].astype(str).tolist()
    return list(dict.fromkeys(names))


def _handling_columns(
    handling: pd.DataFrame, controls: Sequence[str]
) -> tuple[list[str], list[str]]:
    """(per-sample control columns, per-lineage columns) of ``sample_handling``."""
    cols = [
        str(c)
        for c in handling.columns
        if c not in (keys.SAMPLE, keys.DONOR, keys.TIMEPOINT, "n_cells")
        and pd.api.types.is_numeric_dtype(handling[c])
    ]
    main = [c for c in cols if c in controls]
    if not main:  # no roles known: a column no other column extends
        main = [c for c in cols if not any(o != c and c.startswith(o + "_") for o in cols)]
    return main, [c for c in cols if c not in main]


def _per_timepoint(
    handling: pd.DataFrame, columns: Sequence[str], timepoints: Sequence[str]
) -> pd.DataFrame:
    """Mean, sd and range of the sample means of each column, per timepoint."""
    rows = []
    tp = handling[keys.TIMEPOINT].astype(str)
    order = [t for t in timepoints if (tp == t).any()] + sorted(set(tp) - set(timepoints))
    for c in columns:
        v = pd.to_numeric(handling[c], errors="coerce")
        for t in order:
            x = v[(tp == t).to_numpy()].dropna()
            rows.append(
                {
                    "measure": c,
                    "timepoint": t,
                    "n_samples": len(x),
                    "mean": x.mean() if len(x) else np.nan,
                    "sd": x.std(ddof=1) if len(x) > 1 else np.nan,
                    "min": x.min() if len(x) else np.nan,
                    "max": x.max() if len(x) else np.nan,
                }
            )
    return pd.DataFrame(rows)


def _sample_handling_block(
    s: _Section,
    figs: _Figures,
    handling: pd.DataFrame | None,
    controls: Sequence[str],
    control_shifts: pd.DataFrame | None,
    rules: Sequence[FamilyRule],
    timepoints: Sequence[str],
    thr: float,
) -> None:
    """Section 5's sample-handling control: per sample, per timepoint, the control shifts."""
    s.heading("Sample-handling control")
    names = ", ".join(controls) if controls else "the control score"
    s.note(
        f"{names}: immediate-early / dissociation-response genes (FOS, JUN, EGR1, IER2, DUSP1, "
        "...) rise with time to processing, dissociation and ex-vivo stress (van den Brink et "
        "al. 2017). A difference between timepoints here is a difference in sample handling, "
        "not biology, and makes inflammation-like readouts (e.g. nfkb_inflammation) at those "
        "timepoints suspect. A control: never a finding."
    )
    if handling is not None and len(handling) and keys.TIMEPOINT in handling.columns:
        main, lineage = _handling_columns(handling, controls)
        shown = main + lineage
        if shown:
            figs.add(
                s,
                "sample_handling",
                "Sample-handling control score of each sample (mean over its cells; per lineage: "
                "over its cells of that lineage) by timepoint, a grey line per donor, black: the "
                "mean. Higher: more immediate-early / dissociation response.",
                lambda: F.sample_handling(handling, shown, timepoints),
            )
            s.table(
                _table(
                    _per_timepoint(handling, shown, timepoints),
                    caption="Sample-handling control per timepoint: mean, sd and range of the "
                    "sample means (tables/sample_handling.tsv)",
                    collapsed=len(shown) > 3,
                )
            )
        s.table(
            _table(
                handling,
                caption="Sample-handling control per sample (tables/sample_handling.tsv)",
                collapsed=True,
            )
        )
    elif handling is not None:
        s.note("tables/sample_handling.tsv has no samples.", kind="missing")
    else:
        s.note(
            "tables/sample_handling.tsv is absent: no sample-handling control was scored "
            "(score.genesets without ieg_dissociation, or a run before the score stage wrote it).",
            kind="missing",
        )
    if control_shifts is None or control_shifts.empty:
        return
    q = pd.to_numeric(control_shifts["q_value"], errors="coerce")
    hit = control_shifts.assign(q_value=q)[q < thr].sort_values("q_value")
    rule = _caption_rule(rules, "signature_shifts").split("; ")
    rule_txt = (
        "; ".join(r for r in rule if r.startswith("control ")) or "q within the control family"
    )
    if len(hit):
        parts = [
            f"{r.signature} in {r.cell_type}, {_contrast_label(str(r.contrast))} "
            f"({_num(r.effect):+.3g}, q = {r.q_value:.2g})"
            for r in hit.head(12).itertuples(index=False)
        ]
        more = f" and {len(hit) - 12} more" if len(hit) > 12 else ""
        s.note(
            f"Handling differs between timepoints at q < {thr:g} ({rule_txt}): "
            f"{'; '.join(parts)}{more}. Read inflammation-like shifts of these cell types and "
            "contrasts with care.",
            kind="missing",
        )
    else:
        s.note(
            f"No control shift reached q < {thr:g} ({rule_txt}): no handling difference between "
            "timepoints was detected (which does not prove there is none)."
        )
    s.table(
        _table(
            control_shifts.sort_values("q_value", na_position="last"),
            ["contrast", "cell_type", "signature", "family", "n_donors", "mean_reference",
             "mean_test", "effect", "dz", "ci_low", "ci_high", "p_value", "q_value", "method"],
            caption=f"Control signature shifts (tables/signature_shifts.tsv, {rule_txt}); a "
            "handling check, not findings",
            collapsed=True,
        )
    )  # fmt: skip


# --------------------------------------------------------------------------- build
def build_report(
    adata: AnnData,
    tables: ReportTables,
    provenance: Mapping[str, Any],
    cfg: Config,
    *,
    qc_obs: pd.DataFrame | None = None,
    pseudobulk_obs: pd.DataFrame | None = None,
) -> RenderedReport:
    """Draw every figure and render the HTML report.

    Parameters
    ----------
    adata
        The final AnnData: ``obs`` with ``sample``, ``donor``, ``timepoint``,
        ``cell_type``; ``obsm["X_umap"]``; log-normalised ``X`` (marker dot plot).
    tables
        The run's result tables (:func:`read_tables`).
    provenance
        ``provenance.json`` as of before the report (versions, config, inputs,
        stages, warnings).
    cfg
        Run configuration (reads ``report``, ``design``, ``seed``, ``annotate.markers``,
        ``chunk_size``).
    qc_obs
        Per-cell QC metrics of all cells before filtering (``qc/qc.h5ad`` obs);
        default: the QC columns of ``adata.obs`` (cells that passed QC).
    pseudobulk_obs
        obs of the differential stage's pseudobulk AnnData (counted in section 6).

    Returns
    -------
    :class:`RenderedReport`.
    """
    rc = cfg.report
    thr = rc.q_threshold
    timepoints = list(cfg.design.timepoints)
    contrasts = [c.name for c in cfg.design.contrasts]
    figs = _Figures(rc.figure_format, rc.dpi)
    sections = {sid: _Section(sid, title) for sid, title in SECTIONS}
    obs = adata.obs
    qc = tables.get("qc_per_sample")
    rules = fdr_rules(tables)

    # 1 run summary -------------------------------------------------------
    s = sections["summary"]
    if qc is not None:
        per_sample = qc.rename(columns={"cells_out": "n_cells"})
        what = "cells per sample after QC"
    else:
        per_sample = (
            obs.groupby([keys.SAMPLE, keys.DONOR, keys.TIMEPOINT], observed=True)
            .size()
            .rename("n_cells")
            .reset_index()
        )
        what = "cells per sample in the final data"
    n_donors = per_sample[keys.DONOR].nunique()
    s.note(
        f"{n_donors} donors, {per_sample[keys.SAMPLE].nunique()} samples, "
        f"{adata.n_obs:,} cells and {adata.n_vars:,} genes in the final data; "
        f"contrasts: {', '.join(_contrast_label(c) for c in contrasts)}."
    )
    figs.add(
        s,
        "cohort_matrix",
        f"Cohort: donors × timepoints, {what} ('-': no sample).",
        lambda: F.cohort_matrix(per_sample, timepoints),
    )
    stages = dict(provenance.get("stages", {}))
    total = sum(
        _num(v.get("wall_s")) for v in stages.values() if math.isfinite(_num(v.get("wall_s")))
    )
    device = provenance.get("device", {})
    facts = [
        ("config digest", str(provenance.get("config_digest", ""))[:16]),
        (
            "device",
            f"{device.get('resolved', '?')} (requested {device.get('requested', '?')})"
            + (f", {device['name']}" if device.get("name") else ""),
        ),
        ("stage compute time", f"{total:,.1f} s over {len(stages)} stages before the report"),
        ("seed", str(provenance.get("seed", cfg.seed))),
        ("immuneage", str(provenance.get("version", ""))),
    ]
    s.table(_Table(["item", "value"], [list(f) for f in facts], [""] * len(facts), "Run"))

    # 2 QC -----------------------------------------------------------------
    s = sections["qc"]
    if qc is not None:
        figs.add(
            s,
            "qc_cells",
            "Cells kept and removed per sample (left) and the share of cells removed by each "
            "reason (right; the doublet column is the doublet rate). A cell can fail several "
            "reasons, so the reasons need not add up.",
            lambda: F.qc_cells(qc),
        )
        s.table(
            _table(
                qc,
                [
                    keys.SAMPLE,
                    keys.DONOR,
                    keys.TIMEPOINT,
                    "cells_in",
                    "removed_counts",
                    "removed_genes",
                    "removed_mt",
                    "doublets",
                    "cells_out",
                    "dropped",
                ],
                caption="Per-sample QC (tables/qc_per_sample.tsv)",
                collapsed=True,
            )
        )
    else:
        s.note("tables/qc_per_sample.tsv is absent: no per-sample QC summary.", kind="missing")
    dist_obs = qc_obs if qc_obs is not None else obs
    which = "all cells before filtering" if qc_obs is not None else "cells that passed QC"
    if any(m in dist_obs.columns for m in ("total_counts", "n_genes_by_counts", "pct_counts_mt")):
        figs.add(
            s,
            "qc_distributions",
            f"Total counts, genes detected and % mitochondrial reads per sample ({which}; "
            f"boxes from at most {rc.max_qc_cells_per_sample:,} cells per sample; red ticks: "
            "thresholds applied).",
            lambda: F.qc_distributions(
                dist_obs,
                qc,
                max_cells_per_sample=rc.max_qc_cells_per_sample,
                seed=cfg.seed,
                timepoints=timepoints,
            ),
        )
    else:
        s.note("No per-cell QC metrics in the data: distributions not shown.", kind="missing")

    # 3 integration -----------------------------------------------------------
    s = sections["integration"]
    orders = {keys.TIMEPOINT: timepoints}
    has_umap = keys.X_UMAP in adata.obsm
    if has_umap:
        cols = [c for c in (keys.SAMPLE, keys.TIMEPOINT, keys.CELL_TYPE) if c in obs.columns]
        figs.add(
            s,
            "umap_sample_timepoint_celltype",
            "UMAP of the scVI latent space coloured by sample, timepoint and cell type "
            f"(at most {rc.max_umap_cells:,} cells drawn, seeded). Well-integrated data mixes "
            "samples within each cell-type island.",
            lambda: F.umap_panels(
                np.asarray(adata.obsm[keys.X_UMAP]),
                obs,
                cols,
                max_cells=rc.max_umap_cells,
                seed=cfg.seed,
                orders=orders,
            ),
        )
    else:
        s.note("obsm['X_umap'] is absent: no UMAP.", kind="missing")
    metrics = tables.get("integration_metrics")
    if metrics is not None:
        figs.add(
            s,
            "integration_metrics",
            "Integration metrics, unintegrated PCA vs scVI (higher = better for every metric).",
            lambda: F.integration_metrics(metrics),
        )
        s.table(_table(metrics, caption="tables/integration_metrics.tsv", collapsed=True))
    else:
        s.note("tables/integration_metrics.tsv is absent.", kind="missing")
    hist = tables.get("scvi_history")
    if hist is not None:
        figs.add(
            s,
            "scvi_training",
            "scVI training curve per epoch (train solid, validation dashed).",
            lambda: F.scvi_history(hist),
        )
    else:
        s.note("tables/scvi_history.tsv is absent: no training curve.", kind="missing")

    # 4 annotation -------------------------------------------------------------
    s = sections["annotation"]
    if keys.CELL_TYPE in obs.columns:
        type_order = sorted(
            obs[keys.CELL_TYPE].astype(str).unique(), key=lambda t: (t == keys.UNASSIGNED, t)
        )
        if has_umap:
            figs.add(
                s,
                "umap_cell_type",
                "UMAP coloured by cell type (labels at each type's median position).",
                lambda: F.umap_panels(
                    np.asarray(adata.obsm[keys.X_UMAP]),
                    obs,
                    [keys.CELL_TYPE],
                    max_cells=rc.max_umap_cells,
                    seed=cfg.seed,
                    orders={keys.CELL_TYPE: type_order},
                    label_on_data=[keys.CELL_TYPE],
                ),
            )
        mean, frac = _marker_tables(adata, cfg, type_order)
        if mean.shape[1]:
            figs.add(
                s,
                "marker_dotplot",
                "Marker genes of the annotation panel (up to 3 positive markers per type): dot size "
                "= fraction of the type's cells expressing, colour = mean log-normalised expression "
                "scaled per gene.",
                lambda: F.marker_dotplot(mean, frac),
            )
        else:
            s.note(
                "No marker of the annotation panel matches these labels: no dot plot.",
                kind="missing",
            )
    else:
        s.note("obs['cell_type'] is absent: the data were not annotated.", kind="missing")
    s.heading("Cell-type composition")
    counts = tables.get("cell_type_counts")
    comp = tables.get("composition")
    absolute = tables.get("composition_absolute")
    comp_fam = _families(comp) if comp is not None else pd.Series(dtype=str)
    relative = (
        comp.loc[(comp_fam != "composition_log_ratio").to_numpy()] if comp is not None else None
    )
    ratios = (
        comp.loc[(comp_fam == "composition_log_ratio").to_numpy()] if comp is not None else None
    )
    if counts is not None:
        figs.add(
            s,
            "composition_per_donor",
            "Cell-type share of each sample (relative abundance), one grey line per donor joining "
            "its timepoints, black: mean; titles give the relative-abundance test's q per contrast "
            f"(* q < {thr:g}, ** q < {thr / 10:g}, within its FDR family); red frames: a "
            "significant shift of the share.",
            lambda: F.composition_lines(
                counts, timepoints, relative, q_threshold=thr, max_panels=rc.max_panels
            ),
        )
    else:
        s.note("tables/cell_type_counts.tsv is absent: no composition plot.", kind="missing")
    if relative is not None and len(relative):
        s.table(
            _table(
                relative.sort_values("q_value", na_position="last"),
                _COMPOSITION_SHOWN,
                caption=(
                    f"Cell-type shares, question: {_questions(relative)} (tables/composition.tsv; effect "
                    f"on the {_scales(relative)} scale, direction from the change of the mean "
                    f"share; {_caption_rule(rules, 'composition', relative)}; highlighted: q < {thr:g})"
                ),
                q_threshold=thr,
            )
        )
    elif comp is not None:
        s.note("tables/composition.tsv has no cell-type rows: no type was tested.", kind="missing")
    else:
        s.note("tables/composition.tsv is absent: composition was not tested.", kind="missing")
    if comp is not None:
        where = (
            "The absolute-abundance table below (cells per µL) says which types changed in number."
            if absolute is not None and len(absolute)
            else "Which types changed in number needs absolute counts: give each sample's cells "
            "per µL (e.g. lymphocytes + monocytes from the blood count) in the covariates file "
            "and name its column in differential.absolute_total_column."
        )
        s.note(
            "Shares are relative: when one type rises, the other types' shares fall even if their "
            f"numbers did not change, so a type can be 'down' here without losing cells. {where}"
        )
    if ratios is not None and len(ratios):
        s.table(
            _table(
                ratios.sort_values("q_value", na_position="last"),
                _COMPOSITION_SHOWN,
                caption=(
                    f"Log-ratios of type groups, question: {_questions(ratios)} (tables/composition.tsv; "
                    "mean_prop_*: the numerator's share of numerator + denominator; effect on "
                    f"the {_scales(ratios)} scale; {_caption_rule(rules, 'composition', ratios)}; "
                    f"highlighted: q < {thr:g})"
                ),
                q_threshold=thr,
            )
        )
    if absolute is not None and len(absolute):
        s.table(
            _table(
                absolute.sort_values("q_value", na_position="last"),
                _ABSOLUTE_SHOWN,
                caption=(
                    f"Cells per µL, question: {_questions(absolute)} (tables/composition_absolute.tsv; "
                    f"effect on the {_scales(absolute)} scale, direction from the change of the "
                    f"mean cells per µL; {_caption_rule(rules, 'composition_absolute')}; "
                    f"highlighted: q < {thr:g})"
                ),
                q_threshold=thr,
            )
        )
    elif absolute is not None:
        s.note(
            "tables/composition_absolute.tsv has no rows: no type had enough samples with an "
            "absolute total (see tables/differential_dropped.tsv).",
            kind="missing",
        )
    else:
        s.note(
            "tables/composition_absolute.tsv is absent: absolute abundance (cells per µL) was not "
            "tested (differential.absolute_total_column not set).",
            kind="missing",
        )
    clusters = tables.get("cell_type_clusters")
    if clusters is not None:
        s.table(
            _table(
                clusters,
                caption="Leiden cluster votes (tables/cell_type_clusters.tsv)",
                collapsed=True,
            )
        )

    # 5 signatures ----------------------------------------------------------------
    s = sections["signatures"]
    means = tables.get("signature_means")
    shifts = tables.get("signature_shifts")
    coverage = tables.get("signature_coverage")
    shift_fam = _families(shifts) if shifts is not None else pd.Series(dtype=str)
    control_shifts = (
        shifts.loc[shift_fam.isin(CONTROL_FAMILIES).to_numpy()] if shifts is not None else None
    )
    programme_shifts = (
        shifts.loc[~shift_fam.isin(CONTROL_FAMILIES).to_numpy()] if shifts is not None else None
    )
    controls = _control_signatures(coverage, control_shifts)
    if coverage is not None:
        figs.add(
            s,
            "signature_coverage",
            "Genes of each signature found in the data (skipped sets labelled).",
            lambda: F.signature_coverage(coverage),
        )
        s.table(
            _table(
                coverage,
                [
                    "signature",
                    "role",
                    "source",
                    "n_genes",
                    "n_found",
                    "n_missing",
                    "genes_missing",
                    "aliases_used",
                    "status",
                ],
                caption="Gene coverage per set (tables/signature_coverage.tsv; role: programme, "
                "or control for a sample-handling control)",
                collapsed=True,
            )
        )
        if (skipped_note := skipped_signatures_note(coverage)) is not None:
            s.note(skipped_note, kind="missing")
    else:
        s.note("tables/signature_coverage.tsv is absent: no signature was scored.", kind="missing")
    if means is not None:
        sig_names = list(pd.unique(means["signature"].astype(str)))
        if shifts is not None:
            best = (
                pd.to_numeric(shifts["q_value"], errors="coerce")
                .groupby(shifts["signature"].astype(str))
                .min()
            )
            sig_names.sort(
                key=lambda n: (
                    n in controls,
                    best.get(n, np.inf) if pd.notna(best.get(n, np.nan)) else np.inf,
                )
            )
            s.note(
                "Signatures in order of their smallest q-value (most significant shift first; "
                "sample-handling controls last)."
            )
        for sig in sig_names:
            role = (
                " A sample-handling control: a difference between timepoints is a handling "
                "difference, not a finding (see Sample-handling control below)."
                if sig in controls
                else ""
            )
            figs.add(
                s,
                f"signature_means_{sig}",
                f"{sig}: mean score of each donor's cells per cell type and timepoint (grey: one line "
                f"per donor, paired across timepoints; black: their mean; faint dotted: donor x "
                f"timepoint means with too few cells, left out of the tests). Titles: paired-test q "
                f"per contrast (* q < {thr:g}, ** q < {thr / 10:g}, within its FDR family).{role}",
                lambda sig=sig: F.paired_means(
                    means, sig, timepoints, shifts, q_threshold=thr, max_panels=rc.max_panels
                ),
            )
    else:
        s.note(
            "tables/signature_means.tsv is absent: no per-donor signature means.", kind="missing"
        )
    _sample_handling_block(
        s, figs, tables.get("sample_handling"), controls, control_shifts, rules, timepoints, thr
    )

    # 6 differential -------------------------------------------------------------
    s = sections["differential"]
    s.heading("How to read the q-values")
    s.items(
        "Each q-value is a Benjamini–Hochberg q within one FDR family, stated per table from the "
        "table's family column (each rule checked by recomputing BH from p_value); a q-value "
        "controls the false discovery rate of its family only.",
        _fdr_items(rules, tables),
    )
    if programme_shifts is not None and len(programme_shifts):
        use_dz = (
            "dz" in programme_shifts.columns
            and pd.to_numeric(programme_shifts["dz"], errors="coerce").notna().any()
        )
        value, label = (
            ("dz", "paired effect size dz") if use_dz else ("effect", "mean score difference")
        )
        figs.add(
            s,
            "signature_shift_heatmap",
            f"Signature shifts per contrast: colour = {label} (test minus reference, per donor), "
            f"* q < {thr:g}, ** q < {thr / 10:g} within the pair's FDR family "
            f"({_caption_rule(rules, 'signature_shifts', programme_shifts)}). Grey: not tested. Sample-handling "
            "controls are in section 5.",
            lambda: F.effect_heatmap(
                programme_shifts,
                value=value,
                value_label=label,
                contrasts=contrasts,
                q_threshold=thr,
            ),
        )
        s.table(
            _table(
                programme_shifts.assign(
                    _rank=_families(programme_shifts).map(lambda f: _FAMILY_RANK.get(f, 3))
                ).sort_values(["_rank", "q_value"], na_position="last"),
                [
                    "contrast",
                    "cell_type",
                    "signature",
                    "family",
                    "test",
                    "n_donors",
                    "mean_reference",
                    "mean_test",
                    "effect",
                    "dz",
                    "ci_low",
                    "ci_high",
                    "p_value",
                    "q_value",
                    "p_wilcoxon",
                    "method",
                    "donors_dropped",
                ],
                caption=(
                    "Signature shifts (tables/signature_shifts.tsv; "
                    f"{_caption_rule(rules, 'signature_shifts', programme_shifts)}; primary family first; "
                    f"highlighted: q < {thr:g})"
                ),
                q_threshold=thr,
                collapsed=True,
            )
        )
    elif shifts is not None:
        s.note(
            "tables/signature_shifts.tsv has no programme rows: no signature was tested.",
            kind="missing",
        )
    else:
        s.note("tables/signature_shifts.tsv is absent: signatures were not tested.", kind="missing")
    s.heading("Global test across timepoints")
    glob = tables.get("signature_global")
    if glob is not None and len(glob):
        tps = ", ".join(pd.unique(glob["timepoints"].astype(str))) if "timepoints" in glob else ""
        s.note(
            "Does the donor-mean score differ between any of the timepoints "
            f"({tps}), within donors? Hotelling's T² on each donor's differences from the first "
            "timepoint (exact F, no sphericity assumed; donors with every timepoint). A small q "
            "says the timepoints differ somewhere; the pairwise contrasts say where."
        )
        s.table(
            _table(
                glob.assign(
                    _rank=_families(glob).map(lambda f: _FAMILY_RANK.get(f, 3))
                ).sort_values(["_rank", "q_value"], na_position="last"),
                list(GLOBAL_COLUMNS),
                caption=(
                    "Global tests (tables/signature_global.tsv; "
                    f"{_caption_rule(rules, 'signature_global')}; highlighted: q < {thr:g})"
                ),
                q_threshold=thr,
                collapsed=True,
            )
        )
    elif glob is not None:
        s.note(
            "tables/signature_global.tsv has no rows: fewer than 3 timepoints with samples, or no "
            "cell type with enough donors sampled at every timepoint.",
            kind="missing",
        )
    else:
        s.note(
            "tables/signature_global.tsv is absent: no global test across timepoints "
            "(differential.global_test off, or a run before it existed).",
            kind="missing",
        )
    s.heading("Pseudobulk differential expression")
    de_summary = tables.get("pseudobulk_de_summary")
    if pseudobulk_obs is not None and len(pseudobulk_obs):
        s.note(
            f"{len(pseudobulk_obs):,} pseudobulk profiles (cell type × donor × timepoint) entered the tests."
        )
    if tables.pseudobulk_de:
        de_contrasts = [c for c in contrasts if any(k[1] == c for k in tables.pseudobulk_de)]
        de_contrasts += sorted({k[1] for k in tables.pseudobulk_de} - set(de_contrasts))
        for con in de_contrasts:
            pairs = {ct: d for (ct, c), d in sorted(tables.pseudobulk_de.items()) if c == con}
            figs.add(
                s,
                f"volcano_{con}",
                f"Pseudobulk DE, {_contrast_label(con)}: one panel per tested cell type; red: "
                f"q < {thr:g} (BH over the genes of one cell type and contrast).",
                lambda pairs=pairs, con=con: F.volcano_grid(
                    pairs, title=_contrast_label(con), q_threshold=thr, max_panels=rc.max_panels
                ),
            )
    else:
        s.note("No pseudobulk DE tables (tables/pseudobulk_de/): DE was not run.", kind="missing")
    if de_summary is not None:
        s.table(
            _table(
                de_summary,
                caption="Pseudobulk DE per cell type and contrast (tables/pseudobulk_de_summary.tsv)",
                collapsed=True,
            )
        )
    s.heading("Signature enrichment in the DE results")
    enr = tables.get("signature_enrichment")
    if enr is not None and len(enr):
        cal = calibrated_mask(enr)
        methods = ", ".join(pd.unique(enr["method"].astype(str))) if "method" in enr else "ulm"
        shown = enrichment_for_heatmap(enr)
        if cal.any():
            star = (
                f"* q < {thr:g}, ** q < {thr / 10:g} within its FDR family "
                f"({_caption_rule([r for r in rules if r.calibrated], 'signature_enrichment')})"
            )
        else:
            star = (
                "no stars: no calibrated method in this table (ULM ignores inter-gene correlation)"
            )
        shown_method = (
            ", ".join(pd.unique(shown["method"].astype(str))) if "method" in shown else "ulm"
        )
        figs.add(
            s,
            "signature_enrichment_heatmap",
            f"Enrichment of each signature in the pseudobulk DE statistics ({shown_method}): "
            f"colour = score, {star}.",
            lambda: F.effect_heatmap(
                shown,
                value="score",
                value_label="enrichment score",
                contrasts=contrasts,
                q_threshold=thr,
            ),
        )
        if (~cal).any():
            s.note(
                "ULM rows (calibrated = False) assume independent genes: ULM ignores the "
                "inter-gene correlation of co-regulated programmes, so its p- and q-values are "
                "too small; they are never starred, highlighted or listed as findings."
            )
        s.table(
            _table(
                enr.sort_values(["method", "q_value"] if "method" in enr else "q_value",
                                na_position="last"),
                caption=(
                    f"Signature enrichment ({methods}; tables/signature_enrichment.tsv; "
                    f"{_caption_rule(rules, 'signature_enrichment')}; highlighted: q < {thr:g}, "
                    "calibrated rows only)"
                ),
                q_threshold=thr,
                collapsed=True,
            )
        )  # fmt: skip
    elif enr is not None:
        s.note("tables/signature_enrichment.tsv has no rows: no enrichment was computed.",
               kind="missing")  # fmt: skip
    else:
        s.note(
            "tables/signature_enrichment.tsv is absent: no enrichment was computed.", kind="missing"
        )
    s.heading("Covariate associations")
    cov = tables.get("covariate_associations")
    if cov is not None and len(cov):
        has_comp = "component" in cov.columns
        adjusted = (
            ", ".join(pd.unique(cov["adjusted_for"].astype(str))) if "adjusted_for" in cov else ""
        )
        adj_txt = f"adjusted for: {adjusted}" if adjusted else "adjustment not recorded"
        figs.add(
            s,
            "covariate_associations",
            f"Covariate associations with the smallest q (red: q < {thr:g} within the row's FDR "
            f"family); slope with 95% CI; {adj_txt}. "
            + (
                "Each row is labelled with its component: within (slope on the donor-centred "
                "covariate: does a donor's score follow their own covariate at equal timepoints, "
                "the primary question) or between (slope on the donor means: compares donors, "
                "open to donor-level confounding)."
                if has_comp
                else "No component column: slopes mix within- and between-donor variation."
            ),
            lambda: F.covariate_forest(cov, q_threshold=thr),
        )
        s.table(
            _table(
                cov.sort_values(
                    ["component", "q_value"] if has_comp else "q_value",
                    ascending=[False, True] if has_comp else True,
                    na_position="last",
                ),
                caption=(
                    f"tables/covariate_associations.tsv ({adj_txt}; "
                    f"{_caption_rule(rules, 'covariate_associations')}; highlighted: q < {thr:g})"
                ),
                q_threshold=thr,
                collapsed=True,
            )
        )
    else:
        s.note(
            "No covariate associations: no covariate was given in the configuration "
            "(tables/covariate_associations.tsv is absent).",
            kind="missing",
        )
    dropped = tables.get("differential_dropped")
    if dropped is not None and len(dropped):
        by = dropped.groupby(["analysis", "reason"], dropna=False).size().rename("n").reset_index()
        s.table(
            _table(by, caption="Left out of the tests, by reason (tables/differential_dropped.tsv)")
        )

    # 7 provenance ---------------------------------------------------------------
    s = sections["provenance"]
    s.table(
        _Table(
            ["item", "value"],
            [
                ["command", " ".join(map(str, provenance.get("command", [])))],
                ["seed", str(provenance.get("seed", ""))],
                ["device", json.dumps(provenance.get("device", {}), sort_keys=True)],
                ["config digest", str(provenance.get("config_digest", ""))],
                ["config file", str(provenance.get("config_path") or "(defaults)")],
                [
                    "sample sheet",
                    f"{provenance.get('samplesheet', {}).get('path', '')}  sha256 "
                    f"{provenance.get('samplesheet', {}).get('sha256', '')}",
                ],
                ["machine", json.dumps(provenance.get("machine", {}), sort_keys=True)],
            ],
            [""] * 7,
            caption="Run",
        )
    )
    if stages:
        figs.add(
            s,
            "stage_resources",
            "Wall time and peak resident memory of each stage (from its stamp).",
            lambda: F.stage_resources(stages),
        )
        rows = [
            [
                name,
                _fmt(_num(v.get("wall_s"))),
                _fmt(_num(v.get("peak_rss_mb"))),
                str(v.get("status", "")),
                str(v.get("finished", "")),
                str(v.get("host", "")),
            ]
            for name, v in stages.items()
        ]
        s.table(
            _Table(
                ["stage", "wall s", "peak RSS MB", "status", "finished", "host"],
                rows,
                [""] * len(rows),
                "Stages",
            )
        )
    pk = provenance.get("packages", {})
    s.table(
        _Table(
            ["package", "version"],
            [[k, str(v) if v else "not installed"] for k, v in pk.items()],
            [""] * len(pk),
            "Package versions",
            collapsed=True,
        )
    )
    inputs = provenance.get("inputs", [])
    s.table(
        _Table(
            ["sample", "path", "sha256"],
            [[str(i.get("sample")), str(i.get("path")), str(i.get("sha256"))] for i in inputs],
            [""] * len(inputs),
            "Input files and their SHA-256",
            collapsed=True,
        )
    )
    s.pre(str(provenance.get("config_yaml", "")), summary="Full effective configuration (YAML)")
    warns = list(provenance.get("warnings", []))
    if warns:
        s.table(
            _Table(
                ["warning"],
                [[w] for w in warns],
                [""] * len(warns),
                f"{len(warns)} warnings raised during the run",
                collapsed=len(warns) > 10,
            )
        )
    else:
        s.note("No warnings were raised during the run.")

    figs.draw()
    findings = key_findings(tables, q_threshold=thr, max_findings=rc.max_findings)
    html_text = _render(
        title=rc.title,
        provenance=provenance,
        facts=facts,
        sections=[sections[sid] for sid, _ in SECTIONS],
        findings=findings,
        contrasts=contrasts,
        q_threshold=thr,
        has_shifts=shifts is not None,
    )
    return RenderedReport(html_text, figs.files, findings)


def _marker_tables(
    adata: AnnData, cfg: Config, types: Sequence[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean / fraction of the first 3 present positive panel markers of each label."""
    from ..markers import load_marker_panel

    panel = load_marker_panel(cfg.annotate.markers)
    present = set(map(str, adata.var_names))
    markers: dict[str, list[str]] = {}
    children: dict[str, list[str]] = {}
    for ct in panel.cell_types:
        if ct.parent:
            children.setdefault(ct.parent, []).append(ct.name)
    for t in types:
        if t in panel:
            cands = panel[t].positive
        elif t in children:
            cands = tuple(m for c in children[t] for m in panel[c].positive)
        else:
            continue
        hits = [m.match(present) for m in cands]
        markers[t] = [h for h in dict.fromkeys(hits) if h][:3]
    markers = {t: g for t, g in markers.items() if g}
    return marker_expression(adata, markers, chunk_size=cfg.chunk_size)


def _render(
    *,
    title: str,
    provenance: Mapping[str, Any],
    facts: list[tuple[str, str]],
    sections: list[_Section],
    findings: dict[str, dict[str, Any]],
    contrasts: list[str],
    q_threshold: float,
    has_shifts: bool,
) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    css = (TEMPLATES / "report.css").read_text(encoding="utf-8")
    ordered = [c for c in contrasts if c in findings] + [c for c in findings if c not in contrasts]
    return env.get_template("report.html.j2").render(
        title=title,
        css=css,
        generated=datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        version=provenance.get("version", ""),
        facts=facts,
        sections=sections,
        findings=[(c, _contrast_label(c), findings[c]) for c in ordered],
        contrasts=[(c, _contrast_label(c)) for c in contrasts],
        q_threshold=q_threshold,
        has_shifts=has_shifts,
    )
