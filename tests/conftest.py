"""Shared fixtures: small real cohorts written as real files in temp dirs."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from pipeline.io.write10x import write_10x_h5, write_10x_mtx

#: Config for the tiny synthetic cohorts: their cells have few genes, so the
#: fixed QC floors are off and scrublet (which needs realistic samples) is skipped.
SMALL_OVERRIDES = {
    "qc": {"doublets": "none", "min_genes": None, "max_pct_mt": None},
    "preprocess": {"n_top_genes": 100, "n_comps": 10, "min_cells_per_gene": 1},
    "integrate": {
        "max_epochs": 2,
        "early_stopping": False,
        "n_latent": 5,
        "metrics_max_cells": 200,
    },
    "cluster": {"resolutions": [1.0]},
    # the tiny cohorts' genes are G0..G249: score two sets of them, no built-in set
    "score": {
        "genesets": [],
        "custom": {
            "prog_a": [f"G{i}" for i in range(0, 20, 2)],
            "prog_b": [f"G{i}" for i in range(1, 40, 4)],
        },
    },
}

DONORS = ("D1", "D2", "D3")
TIMEPOINTS = ("baseline", "acute", "longterm")


def run_argv(sheet: Path, outdir: Path, *extra: str, config: Path | None = None) -> list[str]:
    """argv of a real ``immuneage run`` subprocess on ``sheet`` (config: ``config.yaml`` beside it)."""
    config = config if config is not None else sheet.parent / "config.yaml"
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "run",
        "--samplesheet",
        str(sheet),
        "--config",
        str(config),
        "--outdir",
        str(outdir),
        "--quiet",
        *extra,
    ]


def make_counts(n_cells: int, n_genes: int, seed: int, *, prefix: str = "G") -> ad.AnnData:
    """A small integer count matrix with realistic sparsity, barcodes and Ensembl-like ids."""
    rng = np.random.default_rng(seed)
    mu = rng.lognormal(mean=-1.0, sigma=1.2, size=n_genes)
    counts = rng.poisson(mu[None, :] * rng.lognormal(0, 0.3, size=(n_cells, 1)))
    x = sp.csr_matrix(counts.astype(np.float32))
    barcodes = [f"{''.join(rng.choice(list('ACGT'), 16))}-1" for _ in range(n_cells)]
    while len(set(barcodes)) < n_cells:  # pragma: no cover - astronomically rare
        barcodes = [f"{''.join(rng.choice(list('ACGT'), 16))}-1" for _ in range(n_cells)]
    genes = [f"{prefix}{i}" for i in range(n_genes)]
    var = pd.DataFrame({"gene_ids": [f"ENSG{i:011d}" for i in range(n_genes)]}, index=genes)
    return ad.AnnData(x, obs=pd.DataFrame(index=barcodes), var=var)


def write_cohort(root: Path, *, n_cells: int = 30, n_genes: int = 250, seed: int = 0) -> Path:
    """Write 3 donors x 3 timepoints in all three formats, a sample sheet and a config.

    Returns the sheet; the config (:data:`SMALL_OVERRIDES`) is ``config.yaml`` beside it.
    """
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for d_i, donor in enumerate(DONORS):
        for t_i, tp in enumerate(TIMEPOINTS):
            k = 3 * d_i + t_i
            a = make_counts(n_cells + k, n_genes, seed + k)
            sample = f"{donor}_{tp}"
            fmt = k % 3
            if fmt == 0:
                rel = f"data/{sample}.h5ad"
                a.layers["counts"] = a.X.copy()
                (root / "data").mkdir(exist_ok=True)
                a.write_h5ad(root / rel)
            elif fmt == 1:
                rel = f"data/{sample}.h5"
                (root / "data").mkdir(exist_ok=True)
                write_10x_h5(a, root / rel)
            else:
                rel = f"data/{sample}_mtx"
                write_10x_mtx(a, root / rel)
            rows.append(
                {
                    "sample": sample,
                    "donor": donor,
                    "timepoint": tp,
                    "path": rel,
                    "age": str(25 + d_i),
                }
            )
    sheet = root / "samplesheet.csv"
    pd.DataFrame(rows).to_csv(sheet, index=False)
    (root / "config.yaml").write_text(yaml.safe_dump(SMALL_OVERRIDES))
    return sheet


def tree_checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under root (to prove inputs are never modified)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    """A 9-sample cohort (h5ad, 10x h5, 10x mtx) in a temp dir; returns the sample sheet path."""
    return write_cohort(tmp_path / "in")
