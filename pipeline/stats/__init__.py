"""Statistics over cells and donors: integration metrics (more modules to come)."""

from __future__ import annotations

from .integration import (
    batch_asw,
    celltype_asw,
    ilisi,
    integration_metrics,
    knn_indices,
    leiden_clusters,
    nmi_ari,
)

__all__ = [
    "batch_asw",
    "celltype_asw",
    "ilisi",
    "integration_metrics",
    "knn_indices",
    "leiden_clusters",
    "nmi_ari",
]
