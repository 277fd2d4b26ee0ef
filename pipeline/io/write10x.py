"""Writers for the two 10x Genomics count formats (used by the demo cohort and tests).

Files are written deterministically (gzip headers carry no timestamp), so the
same AnnData and seed give byte-identical files.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp
from anndata import AnnData
from scipy.io import mmwrite

from .. import keys

__all__ = ["write_10x_h5", "write_10x_mtx"]


def _gene_ids(adata: AnnData) -> np.ndarray:
    if keys.GENE_IDS in adata.var:
        return adata.var[keys.GENE_IDS].astype(str).to_numpy()
    return adata.var_names.astype(str).to_numpy()


def _genes_by_cells_csc(adata: AnnData) -> sp.csc_matrix:
    """Cells x genes counts -> the genes x cells CSC layout 10x uses (int32)."""
    x = adata.X
    if not sp.issparse(x):
        x = sp.csr_matrix(x)
    # a copy: sort_indices below works in place, and on arrays shared with adata.X it
    # would reorder the caller's indices without their data (unsorted input, e.g. pbmc68k)
    x = sp.csr_matrix(x, copy=True)
    # cells x genes CSR is, read column-wise, genes x cells CSC.
    out = sp.csc_matrix((x.data, x.indices, x.indptr), shape=(adata.n_vars, adata.n_obs))
    out.data = np.rint(out.data).astype(np.int32)
    out.sort_indices()
    return out


def write_10x_h5(adata: AnnData, path: str | Path, *, genome: str = "GRCh38") -> Path:
    """Write ``adata.X`` (cells x genes integer counts) as a Cell Ranger v3 ``.h5`` file.

    Parameters
    ----------
    adata
        Counts in ``X``; barcodes in ``obs_names``; symbols in ``var_names``;
        optional Ensembl ids in ``var["gene_ids"]``.
    path
        Output file.
    genome
        Value of ``features/genome``.

    Returns
    -------
    The path written.
    """
    path = Path(path)
    m = _genes_by_cells_csc(adata)
    n = adata.n_vars
    with h5py.File(path, "w", track_order=True) as f:
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array(adata.obs_names, dtype="S"))
        g.create_dataset("data", data=m.data, compression="gzip")
        g.create_dataset("indices", data=m.indices.astype(np.int64), compression="gzip")
        g.create_dataset("indptr", data=m.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array([n, adata.n_obs], dtype=np.int32))
        feats = g.create_group("features")
        feats.create_dataset("_all_tag_keys", data=np.array([b"genome"], dtype="S"))
        feats.create_dataset("feature_type", data=np.array([b"Gene Expression"] * n, dtype="S"))
        feats.create_dataset("genome", data=np.array([genome.encode()] * n, dtype="S"))
        feats.create_dataset("id", data=np.array(_gene_ids(adata), dtype="S"))
        feats.create_dataset("name", data=np.array(adata.var_names, dtype="S"))
    return path


def _write_text(path: Path, text: str, compress: bool) -> None:
    data = text.encode()
    if compress:
        with (
            open(path, "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="", compresslevel=6) as gz,
        ):
            gz.write(data)
    else:
        path.write_bytes(data)


def write_10x_mtx(
    adata: AnnData, directory: str | Path, *, compress: bool = True, legacy: bool = False
) -> Path:
    """Write ``adata.X`` as a 10x matrix directory.

    Parameters
    ----------
    adata
        Counts in ``X`` (cells x genes), barcodes in ``obs_names``, symbols in ``var_names``.
    directory
        Created if needed; receives ``matrix.mtx``, ``barcodes.tsv`` and
        ``features.tsv`` (or ``genes.tsv`` with ``legacy=True``).
    compress
        Gzip the three files (Cell Ranger >= 3 style, ``.gz`` suffixes).
    legacy
        Cell Ranger 2 layout: ``genes.tsv`` with two columns, never compressed.

    Returns
    -------
    The directory written.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if legacy:
        compress = False
    suffix = ".gz" if compress else ""
    buf = io.BytesIO()
    mmwrite(buf, _genes_by_cells_csc(adata).tocoo(), field="integer", symmetry="general")
    mtx_text = buf.getvalue().decode()
    _write_text(d / f"matrix.mtx{suffix}", mtx_text, compress)
    _write_text(d / f"barcodes.tsv{suffix}", "".join(f"{b}\n" for b in adata.obs_names), compress)
    ids = _gene_ids(adata)
    if legacy:
        lines = "".join(f"{i}\t{s}\n" for i, s in zip(ids, adata.var_names, strict=True))
        _write_text(d / "genes.tsv", lines, False)
    else:
        lines = "".join(
            f"{i}\t{s}\tGene Expression\n" for i, s in zip(ids, adata.var_names, strict=True)
        )
        _write_text(d / f"features.tsv{suffix}", lines, compress)
    return d
