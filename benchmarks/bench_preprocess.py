"""Preprocessing benchmark: cells/s and peak memory vs cell count, per backend.

Each (cells, backend) point runs in a fresh Python process, which generates a
synthetic PBMC-like count matrix (3,000 genes, 12 cell types, 8 samples,
negative-binomial counts, ~480 genes detected per cell), then times
``run_preprocess`` (cell/gene filtering, normalize_total + log1p, seurat_v3 HVG
with the sample as batch, 50-component PCA) and the QC-metrics pass. Peak RSS is
sampled during the timed part; ``dense_gb`` is what one dense float32 copy of
the matrix would take, to show no step densifies it.

Usage::

    python benchmarks/bench_preprocess.py --cells 10000 50000 200000 --backends scanpy kernels
    python benchmarks/bench_preprocess.py --cells 1000000 --backends kernels --device gpu

Writes ``benchmarks/results/preprocess.json`` and ``benchmarks/preprocess_scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _data(n_cells: int, seed: int = 0):
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n_genes = 3000
    genes = (
        [f"MT-G{i}" for i in range(13)]
        + [f"RPL{i}" for i in range(40)]
        + [f"G{i}" for i in range(n_genes - 53)]
    )
    base = rng.lognormal(-1.0, 1.4, n_genes)
    profiles = []
    for _ in range(12):
        p = base.copy()
        up = rng.choice(np.arange(53, n_genes), 60, replace=False)
        p[up] *= rng.uniform(4, 20, 60)
        profiles.append(p / p.sum())
    profiles = np.array(profiles)
    blocks, samples = [], []
    block = 20_000
    for start in range(0, n_cells, block):
        n = min(block, n_cells - start)
        lab = rng.integers(0, 12, n)
        lib = 2500 * rng.lognormal(0, 0.35, (n, 1))
        mu = profiles[lab] * lib
        blocks.append(sp.csr_matrix(rng.negative_binomial(5, 5 / (5 + mu)).astype(np.float32)))
        samples.append(rng.integers(0, 8, n))
    x = sp.vstack(blocks).tocsr()
    s = np.concatenate(samples)
    obs = pd.DataFrame(
        {
            "sample": pd.Categorical([f"S{i}" for i in s]),
            "donor": pd.Categorical([f"D{i // 2}" for i in s]),
            "timepoint": pd.Categorical(
                ["baseline"] * n_cells, categories=["baseline", "acute", "longterm"], ordered=True
            ),
        },
        index=[f"c{i}" for i in range(n_cells)],
    )
    a = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes))
    a.layers["counts"] = a.X
    qc = ad.AnnData(sp.csr_matrix((n_cells, 0), dtype=np.float32), obs=obs.copy())
    return a, qc


def worker(n_cells: int, backend: str, device: str) -> dict:
    import numpy as np
    import torch

    from pipeline.config import load_config
    from pipeline.kernels import resolve_device
    from pipeline.provenance import ResourceMeter
    from pipeline.stages.preprocess import run_preprocess
    from pipeline.stages.qc import _metrics, gene_masks

    t0 = time.perf_counter()
    a, qc = _data(n_cells)
    gen_s = time.perf_counter() - t0
    cfg = load_config(None, {"backend": backend, "device": device})
    dev = resolve_device(cfg.device)
    masks = gene_masks(a.var_names, cfg.qc)
    counts = a.layers["counts"]
    with ResourceMeter() as m_qc:
        metrics = _metrics(counts, masks, backend, dev)
    for col in (
        "total_counts",
        "n_genes_by_counts",
        "pct_counts_mt",
        "pct_counts_ribo",
        "pct_counts_hb",
        "log1p_total_counts",
        "log1p_n_genes_by_counts",
    ):
        qc.obs[col] = metrics[col].to_numpy()
    for col in ("qc_fail_counts", "qc_fail_genes", "qc_fail_mt", "predicted_doublet"):
        qc.obs[col] = False
    qc.obs["doublet_score"] = np.nan
    qc.obs["qc_pass"] = True
    if dev.type == "cuda":
        torch.cuda.synchronize()
    with ResourceMeter() as m:
        res = run_preprocess(a, qc, cfg, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    nnz = counts.nnz
    return {
        "cells": n_cells,
        "genes": a.n_vars,
        "nnz": int(nnz),
        "backend": backend,
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "generate_s": round(gen_s, 2),
        "qc_metrics_s": round(m_qc.wall_s, 3),
        "preprocess_s": round(m.wall_s, 3),
        "cells_per_s": round(n_cells / (m.wall_s + m_qc.wall_s), 1),
        "peak_rss_gb": round(max(m.peak_rss_mb, m_qc.peak_rss_mb) / 1024, 3),
        "input_csr_gb": round((nnz * 8 + (n_cells + 1) * 4) / 2**30, 3),
        "dense_gb": round(n_cells * a.n_vars * 4 / 2**30, 3),
        "n_hvg": int(res.adata.var["highly_variable"].sum()),
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(r["backend"], r["device"]) for r in results}):
        rows = sorted(
            (r for r in results if (r["backend"], r["device"]) == key), key=lambda r: r["cells"]
        )
        x = [r["cells"] for r in rows]
        ax1.plot(
            x,
            [r["preprocess_s"] + r["qc_metrics_s"] for r in rows],
            "o-",
            label=f"{key[0]} ({key[1]})",
        )
        ax2.plot(x, [r["peak_rss_gb"] for r in rows], "o-", label=f"{key[0]} ({key[1]})")
    dense = sorted({(r["cells"], r["dense_gb"]) for r in results})
    ax2.plot([d[0] for d in dense], [d[1] for d in dense], "k--", label="one dense float32 copy")
    ax1.set(xscale="log", yscale="log", xlabel="cells", ylabel="seconds (QC metrics + preprocess)")
    ax2.set(xscale="log", xlabel="cells", ylabel="peak RSS (GB)")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    p.add_argument("--backends", nargs="+", default=["scanpy", "kernels"])
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--out", type=Path, default=HERE / "results" / "preprocess.json")
    p.add_argument(
        "--worker", nargs=3, metavar=("CELLS", "BACKEND", "DEVICE"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), args.worker[1], args.worker[2])))
        return
    results = json.loads(args.out.read_text()) if args.out.exists() else []
    for n in args.cells:
        for b in args.backends:
            r = subprocess.run(
                [sys.executable, __file__, "--worker", str(n), b, args.device],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(r.stdout.strip().splitlines()[-1])
            results = [
                x
                for x in results
                if (x["cells"], x["backend"], x["device"]) != (n, b, row["device"])
            ]
            results.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, HERE / "preprocess_scaling.png")


if __name__ == "__main__":
    main()
