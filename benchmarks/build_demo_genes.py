"""Build ``pipeline/datasets/data/genes.tsv`` once (not part of the package).

Reads the GENCODE v44 gene id -> symbol table shipped (MIT) in the celltypist
wheel and the two YAML files in ``pipeline/datasets/data/``; writes about 3,000
genes: every gene the demo needs plus deterministic protein-coding-looking filler.

Usage: ``.venv/bin/python benchmarks/build_demo_genes.py /path/GENCODEv44_Gene_id2name.csv``
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import yaml

DATA = Path(__file__).resolve().parents[1] / "pipeline" / "datasets" / "data"
GENESETS = Path(__file__).resolve().parents[1] / "pipeline" / "genesets" / "data"
N_GENES = 3000

MITO = [
    "MT-ND1",
    "MT-ND2",
    "MT-CO1",
    "MT-CO2",
    "MT-ATP8",
    "MT-ATP6",
    "MT-CO3",
    "MT-ND3",
    "MT-ND4L",
    "MT-ND4",
    "MT-ND5",
    "MT-ND6",
    "MT-CYB",
]
RIBO = [
    "RPL3",
    "RPL4",
    "RPL5",
    "RPL6",
    "RPL7",
    "RPL7A",
    "RPL8",
    "RPL9",
    "RPL10",
    "RPL10A",
    "RPL11",
    "RPL12",
    "RPL13",
    "RPL13A",
    "RPL14",
    "RPL15",
    "RPL17",
    "RPL18",
    "RPL18A",
    "RPL19",
    "RPL21",
    "RPL22",
    "RPL23",
    "RPL23A",
    "RPL24",
    "RPL26",
    "RPL27",
    "RPL27A",
    "RPL28",
    "RPL29",
    "RPL30",
    "RPL31",
    "RPL32",
    "RPL34",
    "RPL35",
    "RPL35A",
    "RPL36",
    "RPL36A",
    "RPL37",
    "RPL37A",
    "RPL38",
    "RPL39",
    "RPL41",
    "RPLP0",
    "RPLP1",
    "RPLP2",
    "RPS2",
    "RPS3",
    "RPS3A",
    "RPS4X",
    "RPS4Y1",
    "RPS5",
    "RPS6",
    "RPS7",
    "RPS8",
    "RPS9",
    "RPS10",
    "RPS11",
    "RPS12",
    "RPS13",
    "RPS14",
    "RPS15",
    "RPS15A",
    "RPS16",
    "RPS17",
    "RPS18",
    "RPS19",
    "RPS20",
    "RPS21",
    "RPS23",
    "RPS24",
    "RPS25",
    "RPS26",
    "RPS27",
    "RPS27A",
    "RPS28",
    "RPS29",
    "RPSA",
]
HEMO = ["HBA1", "HBA2", "HBB", "HBD"]
HOUSEKEEPING = [
    "ACTB",
    "GAPDH",
    "B2M",
    "MALAT1",
    "TMSB4X",
    "TMSB10",
    "FTL",
    "FTH1",
    "EEF1A1",
    "TPT1",
    "PTMA",
    "UBC",
    "UBB",
    "MYL6",
    "PFN1",
    "CFL1",
    "ACTG1",
    "NEAT1",
    "EEF2",
    "HSP90AB1",
    "PPIA",
    "OAZ1",
    "SRGN",
    "EEF1G",
    "EIF1",
    "NACA",
    "HNRNPA1",
    "H3-3B",
    "JUND",
    "ARHGDIB",
    "CORO1A",
    "LAPTM5",
    "PTPRC",
    "CD52",
    "CD53",
    "CD37",
    "VIM",
    "LGALS1",
    "CST3",
    "TYROBP",
    "FCER1G",
]
HLA = [
    "HLA-A",
    "HLA-B",
    "HLA-C",
    "HLA-E",
    "HLA-F",
    "HLA-DRA",
    "HLA-DRB1",
    "HLA-DRB5",
    "HLA-DPA1",
    "HLA-DPB1",
    "HLA-DQA1",
    "HLA-DQB1",
    "HLA-DMA",
    "HLA-DMB",
    "CD74",
]
SEX = ["XIST", "RPS4Y1", "DDX3Y", "UTY", "KDM5D", "EIF1AY", "USP9Y", "ZFY"]
# Tirosh et al. Science 2016 cell-cycle genes (as used by scanpy/Seurat), current symbols.
CELL_CYCLE = [
    "MCM5",
    "PCNA",
    "TYMS",
    "FEN1",
    "MCM7",
    "MCM4",
    "RRM1",
    "UNG",
    "GINS2",
    "MCM6",
    "CDCA7",
    "DTL",
    "PRIM1",
    "UHRF1",
    "CENPU",
    "HELLS",
    "RFC2",
    "POLR1B",
    "NASP",
    "RAD51AP1",
    "GMNN",
    "WDR76",
    "SLBP",
    "CCNE2",
    "UBR7",
    "POLD3",
    "MSH2",
    "ATAD2",
    "RAD51",
    "RRM2",
    "CDC45",
    "CDC6",
    "EXO1",
    "TIPIN",
    "DSCC1",
    "BLM",
    "CASP8AP2",
    "USP1",
    "CLSPN",
    "POLA1",
    "CHAF1B",
    "MRPL36",
    "E2F8",
    "HMGB2",
    "CDK1",
    "NUSAP1",
    "UBE2C",
    "BIRC5",
    "TPX2",
    "TOP2A",
    "NDC80",
    "CKS2",
    "NUF2",
    "CKS1B",
    "MKI67",
    "TMPO",
    "CENPF",
    "TACC3",
    "PIMREG",
    "SMC4",
    "CCNB2",
    "CKAP2L",
    "CKAP2",
    "AURKB",
    "BUB1",
    "KIF11",
    "ANP32E",
    "TUBB4B",
    "GTSE1",
    "KIF20B",
    "HJURP",
    "CDCA3",
    "JPT1",
    "CDC20",
    "TTK",
    "CDC25C",
    "KIF2C",
    "RANGAP1",
    "NCAPD2",
    "DLGAP5",
    "CDCA2",
    "CDCA8",
    "ECT2",
    "KIF23",
    "HMMR",
    "AURKA",
    "PSRC1",
    "ANLN",
    "LBR",
    "CKAP5",
    "CENPE",
    "CTCF",
    "NEK2",
    "G2E3",
    "GAS2L3",
    "CBX5",
    "CENPA",
]
EXTRA = [
    "ETS1",
    "CHDH",
    "IFNG",
    "TRAC",
    "TRBC1",
    "TRBC2",
    "CD3G",
    "CD2",
    "CD247",
    "IL32",
    "LTB",
    "GZMA",
    "CST7",
    "CTSW",
    "FCGR1A",
    "CSF1R",
    "CD68",
    "CD86",
    "ITGAX",
    "ITGAM",
]

BAD = re.compile(
    r"(\.|-AS|^LINC|^MIR|^SNOR|^ENSG|^RNU|^RNA|^RNY|^SNHG|^SCARNA|^Y_RNA|^LOC|^MT-|^RP[LS]\d|^HB[ABDEGMQZ]|^HLA-|-)"
)


def main(table: str) -> None:
    pairs = [
        line.strip().split(",") for line in Path(table).read_text().splitlines() if line.strip()
    ]
    by_symbol: dict[str, list[str]] = {}
    for gid, sym in pairs:
        by_symbol.setdefault(sym, []).append(gid)

    cts = yaml.safe_load((DATA / "cell_types.yaml").read_text())["cell_types"]
    progs = yaml.safe_load((GENESETS / "immune_ageing.yaml").read_text())
    roles: dict[str, str] = {}

    def add(symbols, role):
        for s in symbols:
            if s not in by_symbol:
                raise SystemExit(f"{s!r} ({role}) is not in GENCODE v44")
            roles.setdefault(s, role)

    add(MITO, "mito")
    add(RIBO, "ribosomal")
    add(HEMO, "hemoglobin")
    add(SEX, "sex")
    for ct in cts:
        add(ct["markers"], "marker")
        add(ct.get("also_expressed", []), "marker")
    for section in ("programmes", "reference_sets"):
        for p in progs[section].values():
            add(p["genes"], "signature")
            add(p.get("expressed_in_pbmc", []), "signature")
    add(HOUSEKEEPING, "housekeeping")
    add(HLA, "hla")
    add(CELL_CYCLE, "cell_cycle")
    add(EXTRA, "other")

    chosen = {s: sorted(by_symbol[s])[0] for s in roles}
    dups = {s: ids for s, ids in by_symbol.items() if s in roles and len(ids) > 1}
    for s, ids in dups.items():
        print(f"note: {s} has several ids {ids}; using {chosen[s]}", file=sys.stderr)

    fillers = sorted(
        (
            s
            for s, ids in by_symbol.items()
            if len(ids) == 1
            and s not in roles
            and not BAD.search(s)
            and re.fullmatch(r"[A-Z][A-Z0-9]{1,11}", s)
        ),
        key=lambda s: hashlib.sha256(s.encode()).hexdigest(),
    )
    for s in fillers[: N_GENES - len(roles)]:
        roles[s] = "filler"
        chosen[s] = by_symbol[s][0]
    rows = sorted(((chosen[s], s, r) for s, r in roles.items()))
    with open(DATA / "genes.tsv", "w") as f:
        f.write("gene_id\tsymbol\trole\n")
        f.writelines(f"{g}\t{s}\t{r}\n" for g, s, r in rows)
    counts: dict[str, int] = {}
    for _, _, r in rows:
        counts[r] = counts.get(r, 0) + 1
    print(len(rows), counts)


if __name__ == "__main__":
    main(sys.argv[1])
