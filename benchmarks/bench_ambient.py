"""Time ambient RNA correction per sample (pipeline.ambient.remove_ambient).

Cells are CellTypist's real sample counts (559 cells x 32,786 genes, the full
GRCh38 gene list a Cell Ranger sample has), resampled to ``--cells`` cells
with binomial thinning (p = 0.8) so that copies differ. Contamination is
planted at ``--fraction`` of each cell's counts from an ambient profile (the
cells' mean profile, 80%, plus platelet / red-cell genes PPBP, PF4, HBB, HBA1,
HBA2, 20%); the raw droplet matrix is the cells plus ``--empty`` empty
droplets drawn from the same profile (median 30 counts), written as a Cell
Ranger v3 ``raw_feature_bc_matrix.h5``.

For each option it reports wall seconds of ``remove_ambient`` (clustering
included, the raw file read included where used), seconds per 1,000 cells,
the estimated and planted contamination and the peak RSS.

Usage::

    python benchmarks/bench_ambient.py --cells 1000 5000 --methods decontx decontx_raw
    python benchmarks/bench_ambient.py --cells 1000 --methods soupx  # needs soupx-python
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import keys  # noqa: E402
from pipeline.ambient import remove_ambient  # noqa: E402
from pipeline.datasets.real import celltypist_sample_counts  # noqa: E402
from pipeline.io.write10x import write_10x_h5  # noqa: E402

BLOOD = {"PPBP": 0.4, "PF4": 0.2, "HBB": 0.25, "HBA1": 0.1, "HBA2": 0.05}


def planted_sample(
    n_cells: int, fraction: float, n_empty: int, seed: int = 0
) -> tuple[AnnData, AnnData, float]:
    """Cells with planted ambient counts, the raw droplets, and the planted share of counts."""
    rng = np.random.default_rng(seed)
    src = celltypist_sample_counts()
    idx = rng.choice(src.n_obs, n_cells, replace=n_cells > src.n_obs)
    native = sp.csr_matrix(src.X[idx], dtype=np.float64)
    native.data = rng.binomial(native.data.astype(np.int64), 0.8).astype(np.float64)
    native.eliminate_zeros()
    genes = pd.Index(src.var_names.astype(str))
    profile = np.asarray(native.sum(axis=0)).ravel()
    soup = 0.8 * profile / profile.sum()
    for gene, share in BLOOD.items():
        soup[genes.get_loc(gene)] += 0.2 * share
    n_native = np.asarray(native.sum(axis=1)).ravel()
    rho = np.clip(rng.beta(8, 8 * (1 - fraction) / fraction, size=n_cells), 0.005, 0.6)
    n_soup = np.rint(n_native * rho / (1 - rho)).astype(np.int64)

    def draw(totals: np.ndarray) -> sp.csr_matrix:
        rows = [sp.csr_matrix(rng.multinomial(int(k), soup).astype(np.float32)) for k in totals]
        return sp.vstack(rows).tocsr()

    observed = (native.astype(np.float32) + draw(n_soup)).tocsr()
    empty_totals = np.clip(np.rint(np.exp(rng.normal(np.log(30), 0.8, n_empty))), 1, 300)
    barcodes = [f"C{i:07d}-1" for i in range(n_cells)]
    var = pd.DataFrame(index=genes)
    cells = AnnData(X=observed, obs=pd.DataFrame({keys.BARCODE: barcodes}, index=barcodes), var=var)
    cells.layers[keys.COUNTS] = cells.X
    raw = AnnData(
        X=sp.vstack([observed, draw(empty_totals)]).tocsr(),
        obs=pd.DataFrame(index=[*barcodes, *(f"E{i:07d}-1" for i in range(n_empty))]),
        var=var.copy(),
    )
    planted = float(n_soup.sum() / observed.sum())
    return cells, raw, planted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["decontx", "decontx_raw"],
        choices=["decontx", "decontx_raw", "soupx"],
    )
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--empty", type=int, default=10000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ambient.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.cells:
            cells, raw, planted = planted_sample(n, args.fraction, args.empty)
            path = write_10x_h5(raw, Path(tmp) / f"raw_{n}.h5")
            for method in args.methods:
                adata = cells.copy()
                t0 = time.perf_counter()
                record = remove_ambient(
                    adata,
                    method="soupx" if method == "soupx" else "decontx",
                    raw=None if method == "decontx" else path,
                    seed=0,
                )
                secs = time.perf_counter() - t0
                row = {
                    "option": method,
                    "cells": n,
                    "genes": adata.n_vars,
                    "wall_s": round(secs, 1),
                    "s_per_1000_cells": round(secs / n * 1000, 1),
                    "planted": round(planted, 3),
                    "estimated": round(record["fraction_global"], 3),
                    "removed": round(record["fraction_removed"], 3),
                    "n_clusters": record["n_clusters"],
                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "python": platform.python_version()}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
