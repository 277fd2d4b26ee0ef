"""The built-in gene programmes measure what their names say (issue 18, defect 5).

Content rules checked against sources outside the collection file: the annotation
marker panel, the immediate-early genes the issue names, the demo's GENCODE v44
gene table and, where CellTypist is installed, its GENCODE v44 id -> name table.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest

from pipeline.datasets._resources import load_genes
from pipeline.genesets import (
    COLLECTION,
    ROLES,
    GeneSet,
    builtin_collection,
    builtin_sets,
    collection_version,
    load_aliases,
    resolve_sets,
    sets_from_config,
)
from pipeline.markers import load_marker_panel

#: The immediate-early / dissociation-response genes the issue found in the NF-kB
#: programme, and others of that response (van den Brink et al. 2017).
ISSUE_IEG = {
    "FOS", "JUNB", "EGR1", "IER2", "IER3", "DUSP1", "NR4A1", "ZFP36", "KLF6", "PPP1R15A",
    "CD69", "GADD45B",
}  # fmt: skip
OTHER_IEG = {"JUN", "FOSB", "ATF3", "IER5", "EGR2", "EGR3", "NR4A2", "NR4A3", "BTG2", "JUND"}
#: NK-cell and Treg genes the issue found in t_exhaustion.
NK_TREG = {"EOMES", "CD160", "CD244", "TIGIT", "CTLA4"}
#: The ID of the Ensembl gene SenMayo calls CCL3L1.
CCL3L_ID = "ENSG00000276085"


@pytest.fixture(scope="module")
def sets() -> dict[str, GeneSet]:
    return builtin_sets()


@pytest.fixture(scope="module")
def panel():
    return load_marker_panel()


def _positive(panel, pred) -> set[str]:
    return {m.gene for ct in panel.cell_types if pred(ct) for m in ct.positive}


def test_nfkb_programme_has_no_immediate_early_gene(sets):
    nfkb = set(sets["nfkb_inflammation"].genes)
    control = set(sets["ieg_dissociation"].genes)
    assert not nfkb & (ISSUE_IEG | OTHER_IEG | control)
    # every gene the issue named moved to the control; the NF-kB core stayed
    assert control >= ISSUE_IEG
    assert {"NFKBIA", "TNFAIP3", "NFKB1", "RELB"} <= nfkb
    # still a subset of Hallmark TNFA_SIGNALING_VIA_NFKB plus the cited extra targets
    hallmark = set(sets["hallmark_tnfa_signaling_via_nfkb"].genes)
    assert nfkb - hallmark == {"CXCL8", "CCL3", "NFKBIZ"}


def test_ieg_dissociation_is_the_only_control_and_shares_genes_only_as_published(sets):
    roles = {name: gs.role for name, gs in sets.items()}
    assert set(roles.values()) <= set(ROLES)
    assert [n for n, r in roles.items() if r == "control"] == ["ieg_dissociation"]
    control = set(sets["ieg_dissociation"].genes)
    raw = builtin_collection()["programmes"]
    for name in raw:
        if name == "ieg_dissociation":
            continue
        shared = set(sets[name].genes) & control
        # SenMayo is kept as published: its JUN is an immediate-early gene
        assert shared == ({"JUN"} if name == "senescence" else set()), (name, shared)
    # GMT and inline sets are programmes
    custom = sets_from_config([], None, {"mine": ["A", "B"]})
    assert custom["mine"].role == "programme"


def test_t_exhaustion_has_no_nk_or_treg_gene(sets, panel):
    tex = set(sets["t_exhaustion"].genes)
    nk_treg_markers = _positive(panel, lambda ct: ct.lineage == "NK" or ct.name == "Treg")
    assert not tex & (NK_TREG | nk_treg_markers)
    assert {"PDCD1", "HAVCR2", "LAG3", "TOX", "ENTPD1"} <= tex
    assert "T cells only" in sets["t_exhaustion"].source


def test_t_naive_is_disjoint_from_the_annotation_markers(sets, panel):
    naive = set(sets["t_naive"].genes)
    naive_t_markers = _positive(panel, lambda ct: "naive" in ct.name and ct.lineage.startswith("T"))
    assert {"CCR7", "SELL", "LEF1", "TCF7"} <= naive_t_markers  # the panel the test reads
    assert not naive & naive_t_markers
    # nor any marker (positive or negative) of any panel type: the label cannot be restated
    every_marker = {m.gene for ct in panel.cell_types for m in ct.markers}
    assert not naive & every_marker
    assert len(naive) >= 5  # above score.min_genes' default
    assert "T cells only" in sets["t_naive"].source


def test_version_bump_and_changes_recorded(sets):
    coll = builtin_collection()
    version = int(coll["version"])
    assert version >= 2
    assert collection_version() == f"{COLLECTION}/{version}"
    assert all(gs.version == collection_version() for gs in sets.values())
    latest = coll["changes"][0]
    assert int(latest["version"]) == version
    assert [int(c["version"]) for c in coll["changes"]] == list(range(version, 0, -1))
    changed = set(latest["sets"])
    assert {"nfkb_inflammation", "ieg_dissociation", "t_exhaustion", "t_naive", "senescence"} <= (
        changed
    )
    assert changed <= set(sets)
    for name in changed:
        assert latest["sets"][name].strip(), name
        assert "version 2" in sets[name].source.lower() or name == "ieg_dissociation", name


def test_every_programme_gene_is_in_the_demo_gene_table(sets):
    genes = load_genes()
    symbols = set(genes["symbol"])
    for name, gs in sets.items():
        assert set(gs.genes) <= symbols, (name, sorted(set(gs.genes) - symbols))
    # the demo is GENCODE v44: the gene SenMayo calls CCL3L1 is CCL3L3 there
    row = genes.loc[genes["gene_id"] == CCL3L_ID]
    assert list(row["symbol"]) == ["CCL3L3"]


@pytest.mark.skipif(find_spec("celltypist") is None, reason="celltypist not installed")
def test_symbols_are_gencode_v44_names():
    spec = find_spec("celltypist")
    table = (
        Path(spec.origin).parent / "data" / "samples" / "GENCODEv44_Gene_id2name.csv"
    )  # shipped (MIT) in the celltypist wheel
    if not table.is_file():
        pytest.skip("celltypist without its GENCODE v44 table")
    id_to_name = dict(line.split(",", 1) for line in table.read_text().split())
    names = set(id_to_name.values())
    for name, gs in builtin_sets().items():
        assert set(gs.genes) <= names, (name, sorted(set(gs.genes) - names))
    # GENCODE v44 names ENSG00000276085 CCL3L3 and has no CCL3L1 on the primary assembly
    assert id_to_name[CCL3L_ID] == "CCL3L3"
    assert "CCL3L1" not in names


def test_ccl3l1_resolves_through_the_alias_table_both_ways(sets):
    sen = sets["senescence"]
    assert "CCL3L3" in sen.genes and "CCL3L1" not in sen.genes
    assert len(sen.genes) == 125  # SenMayo complete
    aliases = load_aliases()
    assert aliases["CCL3L3"] == "CCL3L1"  # GENCODE <= v44 name -> later Ensembl name
    others = [g for g in sen.genes if g != "CCL3L3"]
    # data on a newer annotation (CCL3L1)
    new = resolve_sets({"senescence": sen}, [*others, "CCL3L1"])["senescence"]
    assert new.aliases_used == {"CCL3L3": "CCL3L1"}
    assert "CCL3L1" in new.found and not new.missing
    # data on GENCODE v44 or older (CCL3L3): matched directly
    old = resolve_sets({"senescence": sen}, [*others, "CCL3L3"])["senescence"]
    assert old.aliases_used == {} and "CCL3L3" in old.found and not old.missing
    # a user's set written with SenMayo's name finds the GENCODE v44 gene
    user = GeneSet("user", ("CCL3L1", "CCL3"), "test", "test")
    got = resolve_sets({"user": user}, ["CCL3L3", "CCL3"])["user"]
    assert got.found == ["CCL3L3", "CCL3"] and got.aliases_used == {"CCL3L1": "CCL3L3"}
