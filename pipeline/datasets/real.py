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

These are for tests and benchmarks ("does it survive the world"); the planted
truth lives in the demo cohort (:mod:`pipeline.datasets.demo`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

__all__ = [
    "PseudoSample",
    "celltypist_sample_counts",
    "gene_ids",
    "mouse_symbols",
    "pbmc68k_counts",
    "pseudo_cohort",
    "random_barcodes",
]

_NUCLEOTIDES = np.array(list("ACGT"))


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
    ``obs["bulk_labels"]`` (the published FACS-sorted population of each cell)
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
        gene_factor = np.exp(rng.normal(0.0, donor_sd, size=counts.shape[1]))
        gene_factor /= gene_factor.max() if gene_factor.max() > 1 / depth[1] else 1.0
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
