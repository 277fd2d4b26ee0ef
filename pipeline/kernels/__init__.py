"""Array kernels shared by the CPU and GPU paths, written once over torch.

Every kernel is a pure function: a host :mod:`scipy.sparse` cells x genes matrix in,
numpy / scipy results out, with a keyword ``device`` (a :class:`torch.device` from
:func:`resolve_device`) saying where the arithmetic runs. The same code runs on CPU
tensors and on CUDA tensors; no kernel densifies a cells x genes matrix.

Kernels marked *rows* also take a row source (:func:`~pipeline.kernels.sparse.is_row_source`:
an on-disk h5ad matrix or a lazy transform of one, as stages receive in ``backed``
mode), read ``chunk_size`` rows at a time and never held whole; the result equals the
in-memory one. The others return a whole in-memory matrix and refuse a row source
with a :class:`TypeError` (normalise per block with
:func:`~pipeline.kernels.normalize.cell_totals` instead).

==========================  ======  ===============================================
:func:`qc_metrics`          rows    per-cell / per-gene QC sums (``calculate_qc_metrics``)
:func:`normalize_total`             library-size scaling (``normalize_total``)
:func:`log1p`                       ``log1p`` of stored values (``log1p``)
:func:`normalize_log1p`             both, fused
:func:`hvg_seurat_v3`       rows    Seurat v3 HVG with batches (``highly_variable_genes``)
:func:`pca_sparse`          rows    implicitly centred randomized / LOBPCG PCA (``pca``)
==========================  ======  ===============================================

``normalize.cell_totals`` and ``scoring.gene_means`` / ``scoring.weighted_scores``
(signature scores) also take row sources.
"""

from __future__ import annotations

from pipeline.kernels._device import resolve_device, to_numpy, to_scipy_csr
from pipeline.kernels.hvg import hvg_seurat_v3
from pipeline.kernels.normalize import log1p, normalize_log1p, normalize_total
from pipeline.kernels.pca import PCAResult, pca_sparse
from pipeline.kernels.qc import QCMetrics, qc_metrics
from pipeline.kernels.sparse import DEFAULT_CHUNK_SIZE, csr_to_torch, iter_row_chunks

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "PCAResult",
    "QCMetrics",
    "csr_to_torch",
    "hvg_seurat_v3",
    "iter_row_chunks",
    "log1p",
    "normalize_log1p",
    "normalize_total",
    "pca_sparse",
    "qc_metrics",
    "resolve_device",
    "to_numpy",
    "to_scipy_csr",
]
