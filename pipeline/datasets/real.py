"""Real counts shipped inside installed packages, and longitudinal pseudo-cohorts built from them.

No network is needed: the counts come from files that scanpy and CellTypist
ship in their wheels.

* :func:`pbmc68k_counts`: scanpy's ``pbmc68k_reduced`` (700 labelled PBMCs of
  Zheng et al. 2017, 765 genes) with its integer UMI counts recovered from
  ``raw.X`` (``log1p(counts / n_counts * 1e4)``) as ``rint(expm1(raw.X) * n_counts / 1e4)``.
* :func:`celltypist_sample_counts`: CellTypist's sample matrix (559 cells x
  32,786 genes, raw counts; mostly myeloid cells).
* :func:`gene_ids` / :func:`mouse_symbols`: real Ensembl ids (GENCODE v44) and
  mouse orthologue symbols (Ensembl 105) from the tables CellTypist ships.
* :func:`pseudo_cohort`: donors x timepoints pseudo-samples drawn from one of
  these by resampling cells and binomial thinning of their counts, with a
  per-sample depth and a per-donor gene effect, so that the biology stays real
  while every sample differs like real samples do.
* :func:`write_real_cohort`: such a pseudo-cohort written as real files in the
  formats users bring (h5ad, 10x h5, 10x matrix directory), with a sample
  sheet, for end-to-end runs of ``immuneage run``, and the cells' published
  labels in a truth table beside it.

These are for tests and benchmarks ("does it survive the world"); the planted
truth lives in the demo cohort (:mod:`pipeline.datasets.demo`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

__all__ = [
    "PANEL_LINEAGE",
    "PBMC68K_LINEAGE",
    "PseudoSample",
    "celltypist_sample_counts",
    "gene_ids",
    "mouse_symbols",
    "pbmc68k_counts",
    "pseudo_cohort",
    "random_barcodes",
    "write_real_cohort",
]

_NUCLEOTIDES = np.array(list("ACGT"))

#: pbmc68k ``bulk_labels`` -> common lineage (tests and benchmarks of annotation).
#: Zheng et al. gave each of the 68k cells the label of the FACS-sorted reference population it correlated with
#: best: the labels are themselves predictions. Looking at the 700 cells
#: (share of cells detecting each gene, pbmc68k_counts()):
#:
#: * "Dendritic" (240 cells, a third of the set) are LYZ+ (98%) HLA-DRA+ (100%)
#:   myeloid cells; 62% FCER1A and 53% CLEC10A (cDC2) but also 53% FCN1 and
#:   58% S100A9 (classical monocytes): a mix of cDC2 and monocytes, with no way
#:   to tell them apart from the label. Monocytes and DCs are therefore one
#:   "myeloid" lineage here.
#: * "CD14+ Monocyte" (129) are FCN1+ LYZ+ S100A9+ and also FCGR3A+ (96%):
#:   monocytes, CD14 vs CD16 not separable in this subset (CD14 itself is not
#:   among the 765 genes).
#: * "CD34+" (13) are progenitors: no panel type exists, so they are left out
#:   of the lineage figures and their calls are reported apart.
#: * The five T labels are CD3D+ (93-100%); CD4+/CD25 T Reg is a sorted CD25+
#:   population (Tregs plus activated CD4 T), "T" like the others.
PBMC68K_LINEAGE: dict[str, str] = {
    "CD4+/CD25 T Reg": "T",
    "CD4+/CD45RA+/CD25- Naive T": "T",
    "CD4+/CD45RO+ Memory": "T",
    "CD8+ Cytotoxic T": "T",
    "CD8+/CD45RA+ Naive Cytotoxic": "T",
    "CD19+ B": "B",
    "CD56+ NK": "NK",
    "CD14+ Monocyte": "myeloid",
    "Dendritic": "myeloid",
    "CD34+": "progenitor",
}
#: the panel's lineages (``obs["cell_type_coarse"]``, pipeline/markers/data/pbmc.yaml)
#: -> the same lineages: unconventional T (MAIT, gdT) are T; plasmablasts are
#: B lineage; monocytes and DCs are myeloid (see "Dendritic" above); platelets
#: have no counterpart among the labels.
PANEL_LINEAGE: dict[str, str] = {
    "T_CD4": "T",
    "T_CD8": "T",
    "T_other": "T",
    "B": "B",
    "plasma": "B",
    "NK": "NK",
    "mono": "myeloid",
    "DC": "myeloid",
    "platelet": "platelet",
    "unassigned": "unassigned",
}


def _celltypist_data() -> Path:
    try:
        import celltypist
    except ImportError as exc:  # pragma: no cover - a test extra
        raise ImportError(
            "the CellTypist sample data need the 'celltypist' package: pip install celltypist"
        ) from exc
    return Path(celltypist.__file__).parent / "data" / "samples"


def pbmc68k_counts() -> AnnData:
    """scanpy's ``pbmc68k_reduced`` as integer UMI counts.

    Returns
    -------
    AnnData of 700 cells x 765 genes: ``X`` CSR float32 integer counts,
    ``obs["bulk_labels"]`` (the published label of each cell: Zheng et al.
    gave each cell the FACS-sorted reference population whose profile it
    correlated with best, so the labels are predictions, not sorting gates)
    and ``obs["n_counts"]`` (the cell's total UMI count in the full matrix, of
    which these 765 genes hold a part).
    """
    import scanpy as sc

    ref = sc.datasets.pbmc68k_reduced()
    logn = sp.csr_matrix(ref.raw.X, dtype=np.float64)
    n_counts = ref.obs["n_counts"].to_numpy(np.float64)
    scale = np.repeat(n_counts / 1e4, np.diff(logn.indptr))
    data = np.rint(np.expm1(logn.data) * scale)
    x = sp.csr_matrix((data.astype(np.float32), logn.indices, logn.indptr), shape=logn.shape)
    x.eliminate_zeros()
    obs = pd.DataFrame(
        {
            "bulk_labels": ref.obs["bulk_labels"].astype(str).to_numpy(),
            "n_counts": n_counts,
        },
        index=ref.obs_names.astype(str),
    )
    return AnnData(X=x, obs=obs, var=pd.DataFrame(index=ref.raw.var_names.astype(str)))


@cache
def _celltypist_sample() -> tuple[sp.csr_matrix, list[str], list[str]]:
    table = pd.read_csv(_celltypist_data() / "sample_cell_by_gene.csv", index_col=0)
    x = sp.csr_matrix(table.to_numpy(dtype=np.float32))
    return x, table.index.astype(str).tolist(), table.columns.astype(str).tolist()


def celltypist_sample_counts() -> AnnData:
    """CellTypist's sample matrix: 559 cells x 32,786 genes of raw counts, no labels."""
    x, cells, genes = _celltypist_sample()
    return AnnData(X=x.copy(), obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes))


@cache
def _id_table() -> dict[str, str]:
    table = pd.read_csv(
        _celltypist_data() / "GENCODEv44_Gene_id2name.csv", header=None, names=["id", "symbol"]
    )
    table = table.drop_duplicates("symbol", keep="first")
    return dict(zip(table["symbol"], table["id"], strict=True))


def gene_ids(symbols: list[str] | pd.Index) -> np.ndarray:
    """Ensembl gene ids (GENCODE v44) of human symbols.

    Symbols GENCODE v44 does not know get a made-up id of the same shape
    (``ENSG9`` + 10 digits, deterministic), so every gene has one id.
    """
    table = _id_table()
    out = []
    for i, s in enumerate(map(str, symbols)):
        out.append(table.get(s, f"ENSG9{i:010d}"))
    return np.asarray(out, dtype=object)


@cache
def _mouse_table() -> dict[str, str]:
    table = pd.read_csv(
        _celltypist_data() / "Ensembl105_Human2Mouse_Genes.csv",
        header=None,
        names=["human", "mouse"],
        keep_default_na=False,
    )
    table = table[table["mouse"] != ""]
    # several orthologues per human gene: prefer the one spelt like it (CD3E -> Cd3e)
    table = table.assign(same=table["mouse"] == table["human"].str.capitalize())
    table = table.sort_values("same", ascending=False, kind="stable")
    table = table.drop_duplicates("human", keep="first")
    return dict(zip(table["human"], table["mouse"], strict=True))


def mouse_symbols(symbols: list[str] | pd.Index) -> list[str]:
    """Mouse orthologue symbols (Ensembl 105) of human symbols.

    Mitochondrial genes become ``mt-`` genes; a symbol without an orthologue is
    written in title case (``GENE1`` -> ``Gene1``), the way mouse symbols look.
    """
    table = _mouse_table()
    out = []
    for s in map(str, symbols):
        if s.startswith("MT-"):
            out.append("mt-" + s[3:].capitalize())
        else:
            out.append(table.get(s, s.capitalize()))
    return out


def random_barcodes(n: int, rng: np.random.Generator, *, suffix: str = "-1") -> np.ndarray:
    """``n`` distinct 16-base 10x-style barcodes (``ACGT...-1``)."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        for row in _NUCLEOTIDES[rng.integers(0, 4, size=(n, 16))]:
            bc = "".join(row) + suffix
            if bc not in seen:
                seen.add(bc)
                out.append(bc)
                if len(out) == n:
                    break
    return np.asarray(out, dtype=object)


def _thin(
    x: sp.csr_matrix, p: sp.csr_matrix | np.ndarray, rng: np.random.Generator
) -> sp.csr_matrix:
    """Binomial thinning of integer counts: each UMI kept with probability ``p`` (per entry)."""
    x = sp.csr_matrix(x, dtype=np.float32)
    n = x.data.astype(np.int64)
    probs = np.asarray(p, dtype=np.float64)
    data = rng.binomial(n, np.clip(probs, 0.0, 1.0)).astype(np.float32)
    out = sp.csr_matrix((data, x.indices.copy(), x.indptr.copy()), shape=x.shape)
    out.eliminate_zeros()
    return out


@dataclass(frozen=True)
class PseudoSample:
    """One pseudo-sample of :func:`pseudo_cohort`."""

    sample: str
    donor: str
    timepoint: str
    adata: AnnData


def pseudo_cohort(
    source: AnnData,
    *,
    donors: int = 3,
    timepoints: tuple[str, ...] = ("baseline", "acute", "longterm"),
    cells_per_sample: int | list[int] = 300,
    depth: tuple[float, float] = (0.6, 0.95),
    donor_sd: float = 0.15,
    seed: int = 0,
) -> list[PseudoSample]:
    """Longitudinal pseudo-samples drawn from real counts.

    Each sample resamples ``cells_per_sample`` cells of ``source`` (without
    replacement when there are enough, else with), then thins every UMI
    binomially with probability ``depth_s * donor_g``: a sample depth drawn
    uniformly from ``depth``, times a per-donor gene factor
    ``exp(N(0, donor_sd))`` (capped so the probability stays <= 1). Barcodes
    are new 10x-style barcodes, distinct within a sample.

    Parameters
    ----------
    source
        Cells x genes integer counts in ``X`` (e.g. :func:`pbmc68k_counts`).
    donors
        Number of donors (``D1``, ``D2``, ...).
    timepoints
        Timepoint levels; every donor is sampled at each.
    cells_per_sample
        Cells per sample: one number, or one per sample in donor-major order.
    depth
        Range of the per-sample depth factor.
    donor_sd
        Standard deviation of the per-donor log gene factor.
    seed
        Seed of everything random here.

    Returns
    -------
    One :class:`PseudoSample` per donor x timepoint, donor-major; each AnnData
    has ``X`` CSR float32 counts, ``obs`` with the source's columns and the
    new barcodes as ``obs_names``, ``var`` a copy of the source's.
    """
    rng = np.random.default_rng(seed)
    counts = sp.csr_matrix(source.X, dtype=np.float32)
    n_samples = donors * len(timepoints)
    sizes = (
        [int(cells_per_sample)] * n_samples
        if np.isscalar(cells_per_sample)
        else [int(c) for c in cells_per_sample]  # type: ignore[union-attr]
    )
    if len(sizes) != n_samples:
        raise ValueError(f"cells_per_sample has {len(sizes)} entries for {n_samples} samples")
    out: list[PseudoSample] = []
    k = 0
    for d in range(donors):
        donor = f"D{d + 1}"
        # each entry's keep probability is capped at 1 (``_thin`` clips): dividing
        # every factor by the largest one instead would lower the whole sample's
        # depth by ~40% at donor_sd 0.15 (max of 765 factors ~ exp(3.1 sd))
        gene_factor = np.exp(rng.normal(0.0, donor_sd, size=counts.shape[1]))
        for tp in timepoints:
            n = sizes[k]
            k += 1
            cells = rng.choice(counts.shape[0], size=n, replace=n > counts.shape[0])
            x = counts[cells]
            p = rng.uniform(*depth) * gene_factor[x.indices]
            x = _thin(x, p, rng)
            obs = source.obs.iloc[cells].copy()
            obs.index = pd.Index(random_barcodes(n, rng))
            adata = AnnData(X=x, obs=obs, var=source.var.copy())
            out.append(PseudoSample(f"{donor}_{tp}", donor, tp, adata))
    return out


#: Formats :func:`write_real_cohort` writes, as named in its ``formats`` argument.
CohortFormat = Literal["h5ad", "10x_h5", "10x_mtx"]


def _source_counts(source: str) -> AnnData:
    if source == "pbmc68k":
        return pbmc68k_counts()
    if source == "celltypist":
        a = celltypist_sample_counts()
        a.obs["bulk_labels"] = "unlabelled"
        return a
    raise ValueError(f"source must be 'pbmc68k' or 'celltypist', not {source!r}")


def write_real_cohort(
    outdir: str | Path,
    *,
    source: Literal["pbmc68k", "celltypist"] = "pbmc68k",
    donors: int = 3,
    timepoints: tuple[str, ...] = ("baseline", "acute", "longterm"),
    cells_per_sample: int | list[int] = 230,
    formats: tuple[CohortFormat, ...] = ("h5ad", "10x_h5", "10x_mtx"),
    depth: tuple[float, float] = (0.9, 1.0),
    seed: int = 0,
) -> Path:
    """Write a longitudinal pseudo-cohort of real counts as real files and a sample sheet.

    The samples come from :func:`pseudo_cohort` (cells resampled from
    ``source`` and binomially thinned per sample and donor) and are written in
    the formats users bring, rotating through ``formats`` and shifted by one
    per donor, so one cohort mixes them and no format goes with a timepoint:

    ``h5ad``
        ``data/<sample>.h5ad`` as collaborators share them: integer counts in
        ``layers["counts"]``, log1p(counts per 10,000) in ``X``, symbols as
        ``var_names`` and *no* ``var["gene_ids"]``; ``obs`` has no labels.
    ``10x_h5``
        ``data/<sample>.h5``, Cell Ranger v3 ``.h5`` with real Ensembl ids
        (:func:`gene_ids`, GENCODE v44) in ``features/id``.
    ``10x_mtx``
        ``data/<sample>_mtx/`` (gzipped ``matrix.mtx``, ``features.tsv``,
        ``barcodes.tsv``), with the same real ids.

    Parameters
    ----------
    outdir
        Directory to write into (created if needed).
    source
        ``"pbmc68k"``: :func:`pbmc68k_counts`, 700 labelled PBMCs x 765 genes.
        ``"celltypist"``: :func:`celltypist_sample_counts`, 559 unlabelled
        (mostly myeloid) cells x 32,786 genes; its truth label is ``unlabelled``.
    donors
        Number of donors; their ids are numbers (``101``, ``102``, ...), as
        sheets exported from Excel carry them.
    timepoints
        Timepoint levels, each sampled for every donor.
    cells_per_sample
        Cells per sample: one number or one per sample (donor-major order).
        The default, 230 over 3 x 3 samples, gives ~2,000 cells, each sample
        above the 200 cells scrublet needs (``qc.min_cells_for_doublets``).
    formats
        Formats to rotate through (``"h5ad"``, ``"10x_h5"``, ``"10x_mtx"``).
    depth
        Range of the per-sample thinning depth (:func:`pseudo_cohort`). The
        default keeps 90-100% of the UMIs: ``pbmc68k_reduced`` holds only 765
        genes, of which its cells detect ~240 (median), so deeper thinning
        would push most of them under the 200-gene floor (``qc.min_genes``)
        meant for whole-transcriptome matrices (at 0.7, half the cells).
    seed
        Seed of the sampling and thinning.

    Returns
    -------
    The sample sheet, ``<outdir>/samplesheet.csv``: columns ``sample, donor,
    timepoint, path, age`` (paths relative to the sheet; one age per donor).
    Beside it, ``truth.tsv`` has one line per written cell: ``cell`` (the id
    ingest gives it, ``<sample>:<barcode>``), ``sample``, ``donor``,
    ``timepoint``, ``format``, ``source_cell`` (the cell of ``source`` it was
    drawn from) and ``bulk_labels`` (its published label, see :func:`pbmc68k_counts`).
    """
    from ..io.write10x import write_10x_h5, write_10x_mtx

    known = ("h5ad", "10x_h5", "10x_mtx")
    bad = [f for f in formats if f not in known]
    if bad or not formats:
        raise ValueError(f"formats must be a non-empty tuple of {known}, not {formats!r}")
    outdir = Path(outdir)
    data = outdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    src = _source_counts(source)
    src.obs["source_cell"] = src.obs_names.astype(str)
    samples = pseudo_cohort(
        src,
        donors=donors,
        timepoints=timepoints,
        cells_per_sample=cells_per_sample,
        depth=depth,
        seed=seed,
    )
    ids = gene_ids(src.var_names)
    ages = np.random.default_rng(seed).integers(20, 36, size=donors)
    rows: list[dict[str, object]] = []
    truth: list[pd.DataFrame] = []
    for k, ps in enumerate(samples):
        d = int(ps.donor.removeprefix("D"))
        donor = str(100 + d)
        sample = f"{donor}_{ps.timepoint}"
        # a Latin square over donors x timepoints (3 x 3): no format goes with one
        # timepoint or one donor, so a reader's quirk cannot pose as an effect
        fmt = formats[(k + k // len(timepoints)) % len(formats)]
        a = AnnData(
            X=sp.csr_matrix(ps.adata.X, dtype=np.float32),
            obs=pd.DataFrame(index=ps.adata.obs_names.astype(str)),
            var=pd.DataFrame(index=src.var_names.astype(str)),
        )
        if fmt == "h5ad":
            counts = a.X.copy()
            total = np.asarray(counts.sum(axis=1)).ravel()
            scale = sp.diags(1e4 / np.maximum(total, 1.0))
            lognorm = sp.csr_matrix(scale @ counts, dtype=np.float32)
            lognorm.data = np.log1p(lognorm.data)
            a.X = lognorm
            a.layers["counts"] = counts
            rel = f"data/{sample}.h5ad"
            a.write_h5ad(outdir / rel)
        else:
            a.var["gene_ids"] = ids
            if fmt == "10x_h5":
                rel = f"data/{sample}.h5"
                write_10x_h5(a, outdir / rel)
            else:
                rel = f"data/{sample}_mtx"
                write_10x_mtx(a, outdir / rel)
        rows.append(
            {
                "sample": sample,
                "donor": donor,
                "timepoint": ps.timepoint,
                "path": rel,
                "age": int(ages[d - 1]),
            }
        )
        truth.append(
            pd.DataFrame(
                {
                    "cell": [f"{sample}:{b}" for b in a.obs_names],
                    "sample": sample,
                    "donor": donor,
                    "timepoint": ps.timepoint,
                    "format": fmt,
                    "source_cell": ps.adata.obs["source_cell"].to_numpy(),
                    "bulk_labels": ps.adata.obs["bulk_labels"].to_numpy(),
                }
            )
        )
    sheet = outdir / "samplesheet.csv"
    pd.DataFrame(rows).to_csv(sheet, index=False)
    pd.concat(truth, ignore_index=True).to_csv(outdir / "truth.tsv", sep="\t", index=False)
    return sheet
