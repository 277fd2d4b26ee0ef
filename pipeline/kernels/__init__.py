"""Array kernels shared by the CPU and GPU paths, written once over torch.

Every kernel is a pure function: a host :mod:`scipy.sparse` cells x genes matrix in,
numpy / scipy results out, with a keyword ``device`` (a :class:`torch.device` from
:func:`resolve_device`) saying where the arithmetic runs. The same code runs on CPU
tensors and on CUDA tensors; no kernel densifies a cells x genes matrix.

==========================  =====================================================
:func:`qc_metrics`          per-cell / per-gene QC sums (``calculate_qc_metrics``)
:func:`normalize_total`     library-size scaling (``normalize_total``)
:func:`log1p`               ``log1p`` of stored values (``log1p``)
:func:`normalize_log1p`     both, fused
:func:`hvg_seurat_v3`       Seurat v3 HVG with batches (``highly_variable_genes``)
:func:`pca_sparse`          implicitly centred randomized / LOBPCG PCA (``pca``)
==========================  =====================================================
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
