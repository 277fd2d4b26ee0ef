"""scVI training benchmark: seconds per epoch and cells/s vs cell count on the current device.

Each cell count runs in a fresh Python process, which generates a synthetic
PBMC-like HVG count matrix (2,000 genes, 12 cell types, 8 samples with
per-sample gene effects, negative-binomial counts, ~2,500 UMIs per cell) and
trains scVI exactly as the integrate stage does
(:func:`pipeline.stages.integrate.train_scvi`: default ``integrate`` config,
validation every epoch, no progress bar) for a fixed number of epochs
(early stopping off, so every point trains the same number of epochs). Reported:
``train_s`` (``model.train`` wall time, including lightning's set-up),
``s_per_epoch`` and ``cells_per_s`` (cells x epochs / train_s), the latent
inference time and peak RSS.

Usage::

    python benchmarks/bench_scvi.py --cells 5000 30000 --epochs 5
    python benchmarks/bench_scvi.py --cells 100000 1000000 --epochs 3 --device gpu

Prints one JSON row per point and writes ``benchmarks/results/scvi.json``
(rows of earlier runs with another cell count, epoch count or device are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_GENES = 2000


def _data(n_cells: int, seed: int = 0):
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    base = rng.lognormal(-1.0, 1.4, N_GENES)
    profiles = []
    for _ in range(12):
        p = base.copy()
        up = rng.choice(N_GENES, 60, replace=False)
        p[up] *= rng.uniform(4, 20, 60)
        profiles.append(p / p.sum())
    profiles = np.array(profiles)
    sample_fx = rng.lognormal(0, 0.2, (8, N_GENES))
    blocks, samples = [], []
    for start in range(0, n_cells, 20_000):
        n = min(20_000, n_cells - start)
        lab = rng.integers(0, 12, n)
        s = rng.integers(0, 8, n)
        mu = profiles[lab] * sample_fx[s]
        mu *= 2500 * rng.lognormal(0, 0.35, (n, 1)) / mu.sum(axis=1, keepdims=True)
        blocks.append(sp.csr_matrix(rng.negative_binomial(5, 5 / (5 + mu)).astype(np.float32)))
        samples.append(s)
    s = np.concatenate(samples)
    obs = pd.DataFrame(
        {"sample": pd.Categorical([f"S{i}" for i in s])},
        index=[f"c{i}" for i in range(n_cells)],
    )
    a = ad.AnnData(obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(N_GENES)]))
    a.layers["counts"] = sp.vstack(blocks).tocsr()
    return a


def worker(n_cells: int, epochs: int, device: str) -> dict:
    import scvi
    import torch

    from pipeline.config import load_config
    from pipeline.kernels import resolve_device
    from pipeline.provenance import ResourceMeter
    from pipeline.stages.integrate import scvi_accelerator, train_scvi

    t0 = time.perf_counter()
    a = _data(n_cells)
    gen_s = time.perf_counter() - t0
    cfg = load_config(None, {"device": device, "integrate": {"early_stopping": False}})
    dev = resolve_device(cfg.device)
    with ResourceMeter() as m:
        model = train_scvi(a, cfg, device=dev, max_epochs=epochs)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    t1 = time.perf_counter()
    model.get_latent_representation(batch_size=1024)
    latent_s = time.perf_counter() - t1
    trained = len(model.history["elbo_train"])
    ic = cfg.integrate
    return {
        "cells": n_cells,
        "genes": N_GENES,
        "epochs": trained,
        "device": dev.type,
        "accelerator": scvi_accelerator(dev)[0],
        "device_name": (
            torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else f"{platform.processor() or platform.machine()} x{os.cpu_count()}"
        ),
        "torch_threads": torch.get_num_threads(),
        "model": f"n_latent={ic.n_latent} n_hidden={ic.n_hidden} n_layers={ic.n_layers} "
        f"{ic.gene_likelihood} batch_size={ic.batch_size}",
        "generate_s": round(gen_s, 2),
        "train_s": round(m.wall_s, 2),
        "s_per_epoch": round(m.wall_s / trained, 3),
        "cells_per_s": round(n_cells * trained / m.wall_s, 1),
        "latent_s": round(latent_s, 2),
        "peak_rss_gb": round(m.peak_rss_mb / 1024, 3),
        "scvi_tools": scvi.__version__,
        "torch": torch.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, nargs="+", default=[5_000, 30_000])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--out", type=Path, default=HERE / "results" / "scvi.json")
    p.add_argument(
        "--worker", nargs=3, metavar=("CELLS", "EPOCHS", "DEVICE"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), int(args.worker[1]), args.worker[2])))
        return
    results = json.loads(args.out.read_text()) if args.out.exists() else []
    for n in args.cells:
        r = subprocess.run(
            [sys.executable, __file__, "--worker", str(n), str(args.epochs), args.device],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            sys.stderr.write(r.stderr)
            raise SystemExit(f"benchmark worker for {n} cells failed (exit {r.returncode})")
        row = json.loads(r.stdout.strip().splitlines()[-1])
        results = [
            x
            for x in results
            if (x["cells"], x["epochs"], x["device"]) != (n, row["epochs"], row["device"])
        ]
        results.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
