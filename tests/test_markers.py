"""The shipped PBMC marker panel and the panel loader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.datasets._resources import load_cell_types, load_genes
from pipeline.errors import InputError
from pipeline.markers import SHIPPED_PANEL, load_marker_panel

COARSE = {"T_CD4", "T_CD8", "T_other", "NK", "B", "plasma", "mono", "DC", "platelet"}


@pytest.fixture(scope="module")
def panel():
    return load_marker_panel()


def test_shipped_panel_is_versioned_and_every_marker_cited(panel) -> None:
    assert panel.path == SHIPPED_PANEL and SHIPPED_PANEL.is_file()
    assert panel.version and panel.name
    for ct in panel.cell_types:
        assert ct.positive, ct.name
        for m in ct.markers:
            # every source is a reference key with a full citation carrying a DOI
            assert m.source in panel.references, (ct.name, m.gene)
            assert re.search(r"doi:10\.\d{4,}/", m.citation), (ct.name, m.gene, m.citation)


def test_every_type_has_a_coarse_lineage(panel) -> None:
    assert set(panel.lineages.values()) <= COARSE
    assert set(panel.lineages.values()) == COARSE  # every lineage is used
    assert all(panel.lineage_of(n) == panel[n].lineage for n in panel.names)
    assert panel.lineage_of("cDC") == "DC"  # a parent whose subtypes share a lineage
    assert panel.lineage_of("no such type") is None


def test_covers_the_requested_pbmc_types(panel) -> None:
    wanted = {
        "CD4 naive T",
        "CD4 memory T",
        "Treg",
        "CD8 naive T",
        "CD8 memory T",
        "MAIT",
        "gdT",
        "NK",
        "NK CD56bright",
        "B naive",
        "B memory",
        "Plasmablast",
        "CD14 monocyte",
        "CD16 monocyte",
        "cDC1",
        "cDC2",
        "pDC",
        "Platelet",
    }
    assert set(panel.names) == wanted
    assert {m.gene for m in panel["MAIT"].positive} >= {"SLC4A10", "KLRB1", "TRAV1-2"}
    assert {m.gene for m in panel["gdT"].positive} >= {"TRDC", "TRGC1"}


def test_names_match_the_demo_after_collapsing_subtypes(panel) -> None:
    """Every demo type is a panel name, or the parent of finer panel types."""
    demo = {ct.name for ct in load_cell_types()}
    collapsed = set(panel.collapse(panel.names))
    assert demo <= collapsed
    assert panel.collapse(["NK CD56bright", "cDC1", "cDC2", "Treg", "unassigned"]) == [
        "NK",
        "cDC",
        "cDC",
        "Treg",
        "unassigned",
    ]
    # subtypes refine a parent that shares their lineage
    for ct in panel.cell_types:
        if ct.parent:
            assert panel.lineage_of(ct.parent) == ct.lineage


def test_genes_are_valid_symbols_and_in_the_demo_where_it_models_the_type(panel) -> None:
    genes = load_genes()
    demo_symbols = set(genes["symbol"])
    symbol = re.compile(r"^[A-Z0-9][A-Z0-9.\-]*$")
    for g in panel.genes():
        assert symbol.match(g), g
    # the demo type a panel type corresponds to: same name, or the demo's Azimuth l2 name
    demo = {ct.name: ct for ct in load_cell_types()}
    demo |= {ct.azimuth_l2: ct for ct in load_cell_types()}
    modelled = 0
    for ct in panel.cell_types:
        if ct.name not in demo:
            continue  # not simulated (MAIT, gdT, NK CD56bright, Plasmablast, cDC1)
        modelled += 1
        present = [m.gene for m in ct.positive if m.gene in demo_symbols]
        assert len(present) >= panel.n_required(ct.name), (ct.name, present)
        assert len(present) >= 0.75 * len(ct.positive), (ct.name, present)
        # the panel agrees with what the demo planted for the type
        planted = set(demo[ct.name].markers) | set(demo[ct.name].also_expressed)
        assert len(set(present) & planted) >= 0.6 * len(present), (ct.name, present)
        assert all(m.gene in demo_symbols for m in ct.negative), ct.name
    assert modelled == 13
    # the bulk of the panel is modelled by the demo
    assert sum(g in demo_symbols for g in panel.genes()) >= 0.7 * len(panel.genes())


def _write(tmp_path: Path, doc: object, name: str = "panel.yaml") -> Path:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return p


def _good() -> dict:
    return {
        "version": "0.1",
        "references": {"ref": "A. Author, Journal (2020). doi:10.1000/x"},
        "cell_types": [
            {
                "name": "T",
                "lineage": "T_CD4",
                "positive": [{"gene": "CD3E", "source": "ref"}],
            },
            {
                "name": "B",
                "lineage": "B",
                "positive": [{"gene": "MS4A1", "source": "ref"}],
                "negative": [{"gene": "CD3E", "source": "ref"}],
            },
        ],
    }


def test_user_panel_loads(tmp_path: Path) -> None:
    doc = _good()
    del doc["references"]  # free-text sources are fine without a references block
    for ct in doc["cell_types"]:
        for m in ct["positive"] + ct.get("negative", []):
            m["source"] = "my lab's flow panel"
    doc["cell_types"][0]["positive"][0]["aliases"] = ["CD3epsilon"]
    p = load_marker_panel(_write(tmp_path, doc))
    assert p.names == ["T", "B"]
    assert p["T"].positive[0].citation == "my lab's flow panel"
    assert p["T"].positive[0].match({"CD3epsilon", "X"}) == "CD3epsilon"
    assert p.min_present_fraction == 0.5 and p.n_required("T") == 1


def _bad_cases() -> list[tuple[str, object, str]]:
    cases: list[tuple[str, object, str]] = []
    d = _good()
    del d["cell_types"][1]["positive"][0]["source"]
    cases.append(("no_source", d, r"cell type 'B'.*positive\[0\] gene MS4A1.*source"))
    d = _good()
    d["cell_types"][1]["positive"] = ["MS4A1"]
    cases.append(("bare_gene", d, r"cell type 'B'.*marker 'MS4A1' has no source"))
    d = _good()
    del d["cell_types"][0]["lineage"]
    cases.append(("no_lineage", d, r"cell type 'T'.*lineage"))
    d = _good()
    d["cell_types"][0]["positive"][0]["source"] = "nope"
    cases.append(("unknown_ref", d, r"cell type 'T'.*gene CD3E.*'nope' is not a key of references"))
    d = _good()
    d["cell_types"][1]["name"] = "T"
    cases.append(("duplicate", d, r"listed twice: T"))
    d = _good()
    d["cell_types"][0]["positve"] = []
    cases.append(("typo_key", d, r"cell type 'T'.*unknown key\(s\) positve"))
    d = _good()
    d["cell_types"][0]["positive"] = []
    cases.append(("empty_positive", d, r"cell type 'T'.*positive must be a non-empty list"))
    d = _good()
    del d["version"]
    cases.append(("no_version", d, r"version"))
    d = _good()
    d["cell_types"][0]["name"] = "unassigned"
    cases.append(("reserved", d, r"'unassigned' is reserved"))
    d = _good()
    d["min_present_fraction"] = 2
    cases.append(("fraction", d, r"min_present_fraction"))
    cases.append(("not_yaml", "cell_types: [\n  - {name: T", r"not valid YAML"))
    cases.append(("not_mapping", "- a\n- b\n", r"must be a mapping"))
    return cases


@pytest.mark.parametrize(("case", "doc", "pattern"), _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_panel_names_file_and_entry(
    tmp_path: Path, case: str, doc: object, pattern: str
) -> None:
    p = _write(tmp_path, doc, f"{case}.yaml")
    with pytest.raises(InputError, match=pattern) as err:
        load_marker_panel(p)
    assert str(p) in str(err.value)


def test_missing_panel_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.yaml does not exist"):
        load_marker_panel(tmp_path / "nope.yaml")
