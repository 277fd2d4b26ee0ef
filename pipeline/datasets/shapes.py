"""Put counts on disk in every shape sequencing cores and portals deliver them.

Each writer takes an AnnData of integer counts (cells x genes in ``X``,
barcodes as ``obs_names``, symbols as ``var_names``, optional
``var["gene_ids"]`` and ``var["feature_types"]``) and writes one real layout,
so that tests read real files rather than mocks:

* :func:`write_cellranger_outs`: Cell Ranger ``count`` (v3+) ``outs/`` with the
  filtered and raw matrices (``.h5`` and gzipped matrix directory) and
  ``metrics_summary.csv``; the raw matrix holds the cells plus many empty
  droplets drawn from the ambient profile (:func:`ambient_droplets`);
* :func:`write_cellranger_multi`: Cell Ranger ``multi`` ``outs/`` with
  ``per_sample_outs/<sample>/count/sample_filtered_feature_bc_matrix.h5``;
* :func:`write_cellranger_v2`: Cell Ranger 2 ``outs/`` with
  ``filtered_gene_bc_matrices/<genome>/`` (plain files, two-column
  ``genes.tsv``) and the v2 ``.h5`` (one ``/<genome>/`` group);
* :func:`with_feature_barcoding`: adds ``Antibody Capture``, ``CRISPR Guide
  Capture`` and ``Multiplexing Capture`` features to the same matrix;
* :func:`write_h5ad_shape`: the h5ad variants of :data:`H5AD_STYLES`;
* :func:`mouse_style`: mouse orthologue symbols (``mt-`` genes, title case).

The 10x files are written by :mod:`pipeline.io.write10x`; this module only
adds the folder layouts, the feature types and the v2 ``.h5``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .. import keys
from ..io.write10x import _write_text, write_10x_h5, write_10x_mtx
from .real import gene_ids, mouse_symbols, random_barcodes

__all__ = [
    "H5AD_STYLES",
    "ambient_droplets",
    "mouse_style",
    "with_feature_barcoding",
    "write_cellranger_multi",
    "write_cellranger_outs",
    "write_cellranger_v2",
    "write_h5ad_shape",
]

_GEX = "Gene Expression"
#: Real-looking names of the extra features :func:`with_feature_barcoding` adds.
_ANTIBODIES = ("CD3", "CD4", "CD8a", "CD14", "CD16", "CD19", "CD45RA", "CD56", "CCR7", "HLA-DR")
_GUIDES = ("CD4-g1", "CD4-g2", "NTC-1", "NTC-2")
_MULTIPLEXING = ("CMO301", "CMO302", "CMO303")


def _counts(adata: AnnData) -> sp.csr_matrix:
    """A fresh CSR float32 copy of ``X`` with sorted indices.

    Always a copy: :func:`~pipeline.io.write10x.write_10x_h5` sorts the indices
    of the matrix it is given in place (without its data) when they are unsorted,
    as in :func:`~pipeline.datasets.real.pbmc68k_counts`.
    """
    x = sp.csr_matrix(adata.X, dtype=np.float32, copy=True)
    x.has_sorted_indices = False  # recompute: the flag can be stale
    x.sort_indices()
    return x


@contextmanager
def _repeated_names_expected() -> Iterator[None]:
    """Silence anndata's duplicate-name warning where repeats are part of the shape."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*names are not unique", category=UserWarning)
        yield


def _feature_types(adata: AnnData) -> np.ndarray:
    if keys.FEATURE_TYPES in adata.var:
        return adata.var[keys.FEATURE_TYPES].astype(str).to_numpy()
    return np.full(adata.n_vars, _GEX, dtype=object)


@_repeated_names_expected()
def ambient_droplets(adata: AnnData, n: int, *, seed: int = 0, mean_umis: float = 3.0) -> AnnData:
    """Empty droplets: ``n`` barcodes holding a few UMIs drawn from the ambient profile.

    Parameters
    ----------
    adata
        The cells; their summed counts per feature are the ambient profile.
    n
        Number of droplets.
    seed
        Seed of the draws.
    mean_umis
        Mean UMIs per droplet (``1 + Geometric``; most hold 1-3).

    Returns
    -------
    AnnData of ``n`` droplets x the same features (``var`` copied), new barcodes
    distinct from the cells'.
    """
    rng = np.random.default_rng(seed)
    profile = np.asarray(_counts(adata).sum(axis=0)).ravel().astype(np.float64)
    profile /= profile.sum()
    umis = rng.geometric(1.0 / mean_umis, size=n)
    genes = rng.choice(adata.n_vars, size=int(umis.sum()), p=profile)
    indptr = np.concatenate([[0], np.cumsum(umis)])
    x = sp.csr_matrix(
        (np.ones(genes.size, dtype=np.float32), genes, indptr), shape=(n, adata.n_vars)
    )
    x.sum_duplicates()
    taken = set(adata.obs_names)
    barcodes = [b for b in random_barcodes(n + adata.n_obs, rng) if b not in taken][:n]
    return AnnData(X=x, obs=pd.DataFrame(index=barcodes), var=adata.var.copy())


@_repeated_names_expected()
def _with_droplets(adata: AnnData, n: int, seed: int) -> AnnData:
    """Cells plus ``n`` empty droplets, sorted by barcode as Cell Ranger's raw matrix is."""
    drops = ambient_droplets(adata, n, seed=seed)
    x = sp.vstack([_counts(adata), drops.X], format="csr")
    barcodes = np.concatenate([adata.obs_names.to_numpy(str), drops.obs_names.to_numpy(str)])
    order = np.argsort(barcodes, kind="stable")
    return AnnData(X=x[order], obs=pd.DataFrame(index=barcodes[order]), var=adata.var.copy())


@_repeated_names_expected()
def _write_10x(adata: AnnData, target: Path, kind: str) -> Path:
    """Write one 10x matrix (``kind``: ``"h5"``, ``"mtx"``, ``"h5_v2"``, ``"mtx_v2"``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    plain = AnnData(X=_counts(adata), obs=pd.DataFrame(index=adata.obs_names), var=adata.var)
    types = _feature_types(adata)
    if kind == "h5":
        write_10x_h5(plain, target)
        with h5py.File(target, "r+") as f:  # write_10x_h5 writes every feature as GEX
            del f["matrix/features/feature_type"]
            f["matrix/features"].create_dataset("feature_type", data=types.astype("S"))
    elif kind == "mtx":
        write_10x_mtx(plain, target)
        ids = plain.var.get(keys.GENE_IDS, plain.var_names)
        lines = "".join(
            f"{i}\t{s}\t{t}\n" for i, s, t in zip(ids, plain.var_names, types, strict=True)
        )
        _write_text(target / "features.tsv.gz", lines, True)
    elif kind == "mtx_v2":
        write_10x_mtx(plain, target, legacy=True)
    elif kind == "h5_v2":
        _write_h5_v2(plain, target)
    else:  # pragma: no cover
        raise ValueError(kind)
    return target


def _write_h5_v2(adata: AnnData, path: Path, genome: str = "GRCh38") -> None:
    """Cell Ranger 2 ``.h5``: one ``/<genome>/`` group with ``genes`` / ``gene_names``."""
    m = sp.csc_matrix(_counts(adata).T)
    m.sort_indices()
    ids = adata.var.get(keys.GENE_IDS, adata.var_names)
    with h5py.File(path, "w") as f:
        g = f.create_group(genome)
        g["barcodes"] = np.array(adata.obs_names, dtype="S")
        g.create_dataset("data", data=np.rint(m.data).astype(np.int32), compression="gzip")
        g.create_dataset("indices", data=m.indices.astype(np.int64), compression="gzip")
        g["indptr"] = m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, dtype=np.int32)
        g["genes"] = np.array(ids, dtype="S")
        g["gene_names"] = np.array(adata.var_names, dtype="S")


def _write_metrics(outs: Path, adata: AnnData) -> None:
    genes = np.diff(_counts(adata).indptr)
    header = ["Estimated Number of Cells", "Mean Reads per Cell", "Median Genes per Cell"]
    values = [adata.n_obs, 41_234, int(np.median(genes)) if genes.size else 0]
    text = ",".join(f'"{h}"' for h in header) + "\n" + ",".join(f'"{v:,}"' for v in values)
    (outs / "metrics_summary.csv").write_text(text + "\n")
    (outs / "web_summary.html").write_text("<html><body>Cell Ranger web summary</body></html>\n")


def write_cellranger_outs(
    adata: AnnData,
    sample_dir: str | Path,
    *,
    raw_droplets: int = 25_000,
    h5: bool = True,
    mtx: bool = True,
    seed: int = 0,
) -> Path:
    """Write a Cell Ranger ``count`` (v3+) sample folder.

    Parameters
    ----------
    adata
        The called cells (integer counts).
    sample_dir
        Receives ``outs/filtered_feature_bc_matrix.h5`` (``h5``),
        ``outs/filtered_feature_bc_matrix/`` (``mtx``), the same two for
        ``raw_feature_bc_matrix``, ``metrics_summary.csv`` and ``web_summary.html``.
    raw_droplets
        Empty droplets added to the cells in the raw matrices (0: no raw matrices).
    h5, mtx
        Which of the two matrix formats to write.
    seed
        Seed of the droplets.

    Returns
    -------
    The ``outs`` folder.
    """
    outs = Path(sample_dir) / "outs"
    outs.mkdir(parents=True, exist_ok=True)
    raw = _with_droplets(adata, raw_droplets, seed) if raw_droplets else None
    for name, data in (("filtered", adata), ("raw", raw)):
        if data is None:
            continue
        if h5:
            _write_10x(data, outs / f"{name}_feature_bc_matrix.h5", "h5")
        if mtx:
            _write_10x(data, outs / f"{name}_feature_bc_matrix", "mtx")
    _write_metrics(outs, adata)
    return outs


@_repeated_names_expected()
def write_cellranger_multi(
    samples: Mapping[str, AnnData],
    run_dir: str | Path,
    *,
    raw_droplets: int = 25_000,
    seed: int = 0,
) -> Path:
    """Write a Cell Ranger ``multi`` run folder.

    Parameters
    ----------
    samples
        Sample name -> its cells (one or several samples of one GEM well).
    run_dir
        Receives ``outs/per_sample_outs/<sample>/count/sample_filtered_feature_bc_matrix.h5``
        and ``.../sample_filtered_feature_bc_matrix/``, ``per_sample_outs/<sample>/
        metrics_summary.csv``, and ``outs/multi/count/raw_feature_bc_matrix.h5``
        (every sample's cells plus ``raw_droplets`` empty droplets).
    raw_droplets
        Empty droplets in the raw matrix (0: no raw matrix).
    seed
        Seed of the droplets.

    Returns
    -------
    The ``outs`` folder.
    """
    outs = Path(run_dir) / "outs"
    for name, adata in samples.items():
        count = outs / "per_sample_outs" / name / "count"
        _write_10x(adata, count / "sample_filtered_feature_bc_matrix.h5", "h5")
        _write_10x(adata, count / "sample_filtered_feature_bc_matrix", "mtx")
        _write_metrics(count.parent, adata)
    if raw_droplets:
        cells = list(samples.values())
        x = sp.vstack([_counts(a) for a in cells], format="csr")
        barcodes = np.concatenate([a.obs_names.to_numpy(str) for a in cells])
        keep = ~pd.Index(barcodes).duplicated()
        pooled = AnnData(X=x[keep], obs=pd.DataFrame(index=barcodes[keep]), var=cells[0].var)
        raw = _with_droplets(pooled, raw_droplets, seed)
        _write_10x(raw, outs / "multi" / "count" / "raw_feature_bc_matrix.h5", "h5")
    return outs


def write_cellranger_v2(
    adata: AnnData,
    sample_dir: str | Path,
    *,
    genome: str = "GRCh38",
    h5: bool = True,
    mtx: bool = True,
    raw_droplets: int = 0,
    seed: int = 0,
) -> Path:
    """Write a Cell Ranger 2 sample folder.

    Parameters
    ----------
    adata
        The called cells (integer counts; gene expression only).
    sample_dir
        Receives ``outs/filtered_gene_bc_matrices/<genome>/`` (``matrix.mtx``,
        two-column ``genes.tsv``, ``barcodes.tsv``, uncompressed; ``mtx``) and
        ``outs/filtered_gene_bc_matrices_h5.h5`` (``h5``); with ``raw_droplets``,
        the same for ``raw_gene_bc_matrices``.
    genome
        Name of the genome folder and ``.h5`` group.
    h5, mtx
        Which of the two matrix formats to write.
    raw_droplets
        Empty droplets added to the cells in the raw matrices (0: none written).
    seed
        Seed of the droplets.

    Returns
    -------
    The ``outs`` folder.
    """
    outs = Path(sample_dir) / "outs"
    outs.mkdir(parents=True, exist_ok=True)
    raw = _with_droplets(adata, raw_droplets, seed) if raw_droplets else None
    for name, data in (("filtered", adata), ("raw", raw)):
        if data is None:
            continue
        if mtx:
            _write_10x(data, outs / f"{name}_gene_bc_matrices" / genome, "mtx_v2")
        if h5:
            _write_h5_v2(data, outs / f"{name}_gene_bc_matrices_h5.h5", genome)
    return outs


def with_feature_barcoding(
    adata: AnnData,
    *,
    n_antibody: int = len(_ANTIBODIES),
    n_crispr: int = len(_GUIDES),
    n_multiplexing: int = len(_MULTIPLEXING),
    seed: int = 0,
) -> AnnData:
    """Add feature barcoding features to the same matrix, as Cell Ranger writes them.

    Parameters
    ----------
    adata
        Gene expression counts.
    n_antibody, n_crispr, n_multiplexing
        How many ``Antibody Capture`` (CITE-seq ADT: hundreds of UMIs per cell),
        ``CRISPR Guide Capture`` (a few UMIs) and ``Multiplexing Capture``
        (one dominant tag per cell) features to add (at most 10, 4 and 3).
    seed
        Seed of the added counts.

    Returns
    -------
    A new AnnData: the genes (``var["feature_types"] = "Gene Expression"``)
    followed by the added features; ``var["gene_ids"]`` of an added feature is its name.
    """
    rng = np.random.default_rng(seed)
    n = adata.n_obs
    blocks = [
        ("Antibody Capture", _ANTIBODIES[:n_antibody], rng.poisson(60.0, (n, n_antibody))),
        ("CRISPR Guide Capture", _GUIDES[:n_crispr], rng.poisson(0.8, (n, n_crispr))),
    ]
    tags = rng.poisson(2.0, (n, n_multiplexing))
    if n_multiplexing:
        tags[np.arange(n), rng.integers(0, n_multiplexing, n)] += 200
    blocks.append(("Multiplexing Capture", _MULTIPLEXING[:n_multiplexing], tags))
    ids = (
        adata.var[keys.GENE_IDS].astype(str).tolist()
        if keys.GENE_IDS in adata.var
        else list(adata.var_names)
    )
    names, types = list(adata.var_names), [_GEX] * adata.n_vars
    parts = [_counts(adata)]
    for kind, labels, counts in blocks:
        names += list(labels)
        ids += list(labels)
        types += [kind] * len(labels)
        parts.append(sp.csr_matrix(counts.astype(np.float32)))
    var = pd.DataFrame({keys.GENE_IDS: ids, keys.FEATURE_TYPES: types}, index=names)
    x = sp.hstack(parts, format="csr")
    with _repeated_names_expected():  # the antibody 'CD4' next to the gene CD4
        return AnnData(X=x, obs=pd.DataFrame(index=adata.obs_names), var=var)


def mouse_style(adata: AnnData) -> AnnData:
    """A copy with mouse orthologue symbols (``mt-Co1``, ``Cd3e``, title case) as var_names."""
    out = AnnData(X=_counts(adata), obs=pd.DataFrame(index=adata.obs_names))
    with _repeated_names_expected():  # several human genes share a mouse orthologue
        out.var_names = mouse_symbols(list(adata.var_names))
    return out


# --------------------------------------------------------------------------- h5ad


def _log_normalised(x: sp.csr_matrix) -> sp.csr_matrix:
    """``log1p(counts / total * 1e4)`` per cell, as scanpy's defaults make it."""
    totals = np.asarray(x.sum(axis=1)).ravel()
    scale = np.repeat(1e4 / np.maximum(totals, 1.0), np.diff(x.indptr))
    out = x.copy()
    out.data = np.log1p(out.data * scale).astype(np.float32)
    return out


def _ids(adata: AnnData) -> np.ndarray:
    if keys.GENE_IDS in adata.var:
        return adata.var[keys.GENE_IDS].astype(str).to_numpy()
    return np.asarray(gene_ids(adata.var_names), dtype=str)


@_repeated_names_expected()
def _plain(adata: AnnData) -> AnnData:
    return AnnData(X=_counts(adata), obs=pd.DataFrame(index=adata.obs_names), var=adata.var.copy())


def _style_x_counts(adata: AnnData) -> AnnData:
    return _plain(adata)


def _style_counts_layer(adata: AnnData) -> AnnData:
    out = _plain(adata)
    out.layers[keys.COUNTS] = out.X.copy()
    out.X = _log_normalised(out.X)
    return out


def _style_named_layer(adata: AnnData) -> AnnData:
    out = _plain(adata)
    out.layers["raw_counts"] = out.X.copy()
    out.X = _log_normalised(out.X)
    return out


def _style_cellxgene(adata: AnnData) -> AnnData:
    counts = _counts(adata)
    var = pd.DataFrame(
        {
            "feature_name": pd.Categorical(adata.var_names.astype(str)),
            "feature_biotype": pd.Categorical(["gene"] * adata.n_vars),
        },
        index=pd.Index(_ids(adata)),
    )
    out = AnnData(X=_log_normalised(counts), obs=pd.DataFrame(index=adata.obs_names), var=var)
    out.raw = AnnData(X=counts, obs=out.obs, var=pd.DataFrame(index=var.index))
    return out


def _style_raw_counts_hvg_x(adata: AnnData) -> AnnData:
    counts = _counts(adata)
    out = _plain(adata)
    out.raw = out  # every gene's counts in raw.X ...
    keep = np.argsort(-np.asarray(counts.sum(axis=0)).ravel(), kind="stable")[: adata.n_vars // 4]
    out = out[:, np.sort(keep)].copy()  # ... X: a quarter of the genes, scaled (negative values)
    dense = _log_normalised(out.X).toarray()
    out.X = (dense - dense.mean(axis=0)) / np.maximum(dense.std(axis=0), 1e-6)
    return out


def _style_gene_symbols(adata: AnnData) -> AnnData:
    out = _plain(adata)
    out.var = pd.DataFrame(
        {"gene_symbols": adata.var_names.astype(str), keys.FEATURE_TYPES: _GEX},
        index=pd.Index(_ids(adata)),
    )
    return out


def _style_ensembl_only(adata: AnnData) -> AnnData:
    out = _plain(adata)
    out.var = pd.DataFrame(index=pd.Index(_ids(adata)))
    return out


#: h5ad shapes :func:`write_h5ad_shape` writes: style -> (where the counts are, where symbols are)
H5AD_STYLES: dict[str, Callable[[AnnData], AnnData]] = {
    "x_counts": _style_x_counts,  # counts in X, symbols as var_names
    "counts_layer": _style_counts_layer,  # counts in layers["counts"], log-normalised X
    "named_layer": _style_named_layer,  # counts in layers["raw_counts"], log-normalised X
    "cellxgene": _style_cellxgene,  # Ensembl var_names, var["feature_name"], counts in raw.X
    "raw_counts_hvg_x": _style_raw_counts_hvg_x,  # raw.X: all genes; X: scaled gene subset
    "gene_symbols": _style_gene_symbols,  # read_10x_mtx(var_names="gene_ids"): Ensembl + symbols
    "ensembl_only": _style_ensembl_only,  # Ensembl var_names, no symbol column
}


def write_h5ad_shape(adata: AnnData, path: str | Path, style: str) -> Path:
    """Write ``adata`` as an h5ad of one of the shapes collaborators and portals deliver.

    Parameters
    ----------
    adata
        Integer counts in ``X``, symbols as ``var_names`` (ids from
        ``var["gene_ids"]``, else real GENCODE ids of the symbols).
    path
        Output file.
    style
        One of :data:`H5AD_STYLES`:

        ``"x_counts"``
            counts in ``X``;
        ``"counts_layer"``
            counts in ``layers["counts"]``, log-normalised ``X``;
        ``"named_layer"``
            counts in ``layers["raw_counts"]``, log-normalised ``X``;
        ``"cellxgene"``
            CELLxGENE schema: Ensembl var_names, symbols in ``var["feature_name"]``,
            log-normalised ``X``, counts in ``raw.X`` (``raw.var`` without symbols);
        ``"raw_counts_hvg_x"``
            every gene's counts in ``raw.X``, ``X`` a scaled quarter of the genes;
        ``"gene_symbols"``
            scanpy ``read_10x_mtx(var_names="gene_ids")``: Ensembl var_names,
            ``var["gene_symbols"]``, counts in ``X``;
        ``"ensembl_only"``
            Ensembl var_names and no symbol column.

    Returns
    -------
    The path written.
    """
    if style not in H5AD_STYLES:
        raise ValueError(f"unknown h5ad style {style!r}; one of {', '.join(H5AD_STYLES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _repeated_names_expected():
        H5AD_STYLES[style](adata).write_h5ad(path)
    return path
