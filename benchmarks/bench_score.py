"""Signature scoring benchmark: one sparse product for all sets vs a scanpy loop.

Generates the synthetic PBMC-like matrix of ``bench_preprocess.py`` (3,000
genes, NB counts), normalises it (normalize_total + log1p, sparse), draws
``--signatures`` gene sets (10 to 150 genes, seeded), then times, on the same
data in the same process:

- ``immuneage``: :func:`pipeline.stages.score.score_matrix`, every set's
  ``score_genes`` score from one ``X @ W`` product (control genes chosen as
  scanpy chooses them);
- ``scanpy``: ``scanpy.tl.score_genes`` called once per set (``random_state`` =
  the same seed), the usual way.

It checks that the scores agree (max absolute difference) and records wall
time and peak RSS of each (the RSS of the data itself is reported separately).

Usage::

    python benchmarks/bench_score.py --cells 200000 --signatures 50
    python benchmarks/bench_score.py --cells 1000000 --signatures 50 --device cuda --skip-scanpy

Writes ``benchmarks/results/score.json`` (appends one record per call).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=200_000)
    ap.add_argument("--signatures", type=int, default=50)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (immuneage path only)")
    ap.add_argument("--skip-scanpy", action="store_true", help="time only the immuneage path")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import numpy as np
    import scanpy as sc
    import torch
    from bench_preprocess import _data

    from pipeline.provenance import ResourceMeter, _rss_bytes
    from pipeline.stages.score import score_matrix

    t0 = time.perf_counter()
    a, _ = _data(args.cells, seed=args.seed)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    del a.layers["counts"]
    gen_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    sizes = rng.integers(10, 151, args.signatures)
    sets = {
        f"sig{i:02d}": list(a.var_names[rng.choice(a.n_vars, int(n), replace=False)])
        for i, n in enumerate(sizes)
    }
    data_rss_gb = _rss_bytes() / 2**30
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    with ResourceMeter() as m_ours:
        ours, _ = score_matrix(a.X, a.var_names, sets, seed=args.seed, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    rec = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}), "
        f"{__import__('os').cpu_count()} cores",
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "cells": a.n_obs,
        "genes": a.n_vars,
        "nnz": int(a.X.nnz),
        "signatures": len(sets),
        "generate_s": round(gen_s, 1),
        "data_rss_gb": round(data_rss_gb, 2),
        "immuneage_s": round(m_ours.wall_s, 2),
        "immuneage_peak_rss_gb": round(m_ours.peak_rss_mb / 1024, 2),
        "command": "python " + " ".join(sys.argv),
    }
    if not args.skip_scanpy:
        ref = np.empty_like(ours.to_numpy())
        with ResourceMeter() as m_sc:
            for j, genes in enumerate(sets.values()):
                sc.tl.score_genes(a, genes, score_name="_s", random_state=args.seed)
                ref[:, j] = a.obs["_s"].to_numpy()
        rec |= {
            "scanpy_loop_s": round(m_sc.wall_s, 2),
            "scanpy_peak_rss_gb": round(m_sc.peak_rss_mb / 1024, 2),
            "speedup": round(m_sc.wall_s / m_ours.wall_s, 1),
            "max_abs_diff": float(np.abs(ref - ours.to_numpy()).max()),
        }
    print(json.dumps(rec, indent=2))
    out = HERE / "results" / "score.json"
    old = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps([*old, rec], indent=2) + "\n")


if __name__ == "__main__":
    main()
