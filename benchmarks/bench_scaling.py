"""Scaling: time and peak memory per stage of ``immuneage run`` vs cells (demo generator).

For each ``--cells`` value, writes the demo cohort with the ``large`` generator
(``demo_cohort(size="large", n_cells=N)``: 13 donors x 3 timepoints, every
input format) and runs ``immuneage run`` on it in a fresh process (under
``/usr/bin/time -v``) with the demo config, except that scVI training is capped
at ``--max-epochs`` (default 5; the demo trains 25), so the scaling of the other
stages is not buried under training time (scVI cost is linear in cells x
epochs; see ``bench_scvi.py``). Per-stage wall time and peak RSS come from the
run's ``provenance.json`` (per-sample stages: units summed, peak = max).

For each size it also records the stored values of the raw count matrix (the
merged ``ingest`` artifact): its CSR size and the size of one dense float32
cells x genes copy. Peak RSS far below the dense copy and growing linearly with
the stored values shows no stage densifies the matrix. The memory slope (MB per
1,000 cells) is a least-squares fit of the run's peak RSS against cells.

Usage::

    python benchmarks/bench_scaling.py                         # 10k and 50k cells
    python benchmarks/bench_scaling.py --cells 10000 50000 200000
    python benchmarks/bench_scaling.py --backed --cells 10000 50000   # matrices on disk

Writes ``benchmarks/results/scaling.json`` (points replaced by cell count) and
``benchmarks/scaling.png``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))


def run_point(
    n_cells: int, max_epochs: int, work: Path, seed: int, threads: int | None, backed: bool = False
) -> dict:
    import anndata as ad
    import yaml
    from bench_end_to_end import machine, stage_table, timed

    from pipeline.config import DEMO_OVERRIDES, dump_config, load_config
    from pipeline.datasets import demo_cohort

    wdir = work / f"n{n_cells}"
    wdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cohort = demo_cohort(wdir / "cohort", size="large", seed=seed, n_cells=n_cells)
    gen_s = time.perf_counter() - t0
    overrides = yaml.safe_load(yaml.safe_dump(DEMO_OVERRIDES))
    overrides["integrate"]["max_epochs"] = max_epochs
    if backed:  # cohorts larger than memory: matrices stay on disk, read in blocks
        overrides["backed"] = True
    cfg = load_config(None, overrides)
    cfg_path = wdir / "config.yaml"
    cfg_path.write_text(dump_config(cfg))
    out = wdir / "results"
    shutil.rmtree(out, ignore_errors=True)
    bin_dir = Path(sys.executable).parent
    cmd = [
        str(bin_dir / "immuneage"),
        "run",
        "--samplesheet",
        str(cohort.samplesheet),
        "--config",
        str(cfg_path),
        "--outdir",
        str(out),
        "--quiet",
    ]
    print(f"{n_cells} cells: cohort in {gen_s:.1f} s; running {' '.join(cmd)}", flush=True)
    r = timed(cmd, wdir / "run.log", threads)
    prov = json.loads((out / "provenance.json").read_text())
    raw = ad.read_h5ad(out / "ingest" / "ingest.h5ad", backed="r")
    n_obs, n_vars = raw.n_obs, raw.n_vars
    x = raw.layers.get("counts", raw.X)
    nnz = int(x.nnz if hasattr(x, "nnz") else x.group["data"].shape[0])
    raw.file.close()
    pre = ad.read_h5ad(out / "preprocess" / "preprocess.h5ad", backed="r")
    n_qc = pre.n_obs
    pre.file.close()
    return {
        "cells": cohort.n_cells,
        "cells_after_qc": int(n_qc),
        "genes": int(n_vars),
        "nnz": nnz,
        "density": round(nnz / (n_obs * n_vars), 4),
        "csr_gb": round((nnz * (4 + 4) + (n_obs + 1) * 8) / 2**30, 3),
        "dense_f32_gb": round(n_obs * n_vars * 4 / 2**30, 3),
        "max_epochs": max_epochs,
        "backed": backed,
        "threads": threads or "library default (one per core)",
        "cpu_s": r["cpu_s"],
        "load_1min_start_end": r["load_1min_start_end"],
        "generate_s": round(gen_s, 1),
        "wall_s": r["wall_s"],
        "peak_rss_mb": r["peak_rss_mb"],
        "stages": stage_table(prov),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    import numpy as np

    if len(xs) < 2:
        return float("nan"), float("nan")
    slope, icpt = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(slope), float(icpt)


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(points, key=lambda p: p["cells"])
    x = [p["cells"] for p in pts]
    stages = list(pts[0]["stages"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for s in stages:
        ax1.plot(x, [p["stages"][s]["wall_s"] for p in pts], "o-", label=s)
        ax2.plot(x, [p["stages"][s]["peak_rss_mb"] / 1024 for p in pts], "o-", label=s)
    ax2.plot(x, [p["peak_rss_mb"] / 1024 for p in pts], "k-", lw=2, label="run (max RSS)")
    ax2.plot(x, [p["dense_f32_gb"] for p in pts], "k--", label="one dense float32 copy")
    ax2.plot(x, [p["csr_gb"] for p in pts], "k:", label="raw counts CSR")
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="cells",
        ylabel="wall s",
        title=f"time per stage (scVI {pts[0]['max_epochs']} epochs)",
    )
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="cells",
        ylabel="peak RSS (GB)",
        title="peak RSS per stage",
    )
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(points: list[dict], slope_mb_per_1k: float) -> str:
    pts = sorted(points, key=lambda p: p["cells"])
    stages = list(pts[0]["stages"])
    head = "| stage | " + " | ".join(f"{p['cells']:,} cells: s / MB" for p in pts) + " |"
    lines = [head, "| --- |" + " --- |" * len(pts)]
    for s in stages:
        cells = " | ".join(
            f"{p['stages'][s]['wall_s']:.1f} / {p['stages'][s]['peak_rss_mb']:,.0f}" for p in pts
        )
        lines.append(f"| {s} | {cells} |")
    lines.append(
        "| **run (process wall / max RSS)** | "
        + " | ".join(f"**{p['wall_s']:.1f} / {p['peak_rss_mb']:,.0f}**" for p in pts)
        + " |"
    )
    lines.append(
        "| raw counts: CSR / dense float32 GB | "
        + " | ".join(f"{p['csr_gb']:.2f} / {p['dense_f32_gb']:.2f}" for p in pts)
        + " |"
    )
    lines.append("")
    lines.append(
        f"Peak RSS slope: {slope_mb_per_1k:.1f} MB per 1,000 cells (least squares over the run's max RSS)."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[10_000, 50_000])
    ap.add_argument("--max-epochs", type=int, default=5, help="scVI epochs cap (demo: 25)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=None, help="OMP/MKL/torch threads (see bench_end_to_end)"
    )
    ap.add_argument(
        "--backed",
        action="store_true",
        help="run with backed: true (matrices on disk); results go to scaling_backed.json/png",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_scaling"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scaling.json")
    ap.add_argument("--keep", action="store_true", help="keep each size's cohort and outputs")
    args = ap.parse_args()
    if args.backed and args.out == HERE / "results" / "scaling.json":
        args.out = HERE / "results" / "scaling_backed.json"

    old = json.loads(args.out.read_text()) if args.out.exists() else {"points": []}
    points = {p["cells"]: p for p in old["points"]}
    for n in args.cells:
        p = run_point(
            n, args.max_epochs, args.workdir.resolve(), args.seed, args.threads, args.backed
        )
        points[p["cells"]] = p
        print(
            f"  {p['cells']} cells: {p['wall_s']:.1f} s, peak {p['peak_rss_mb']:.0f} MB "
            f"(dense float32 copy {p['dense_f32_gb'] * 1024:.0f} MB, CSR {p['csr_gb'] * 1024:.0f} MB)",
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(args.workdir.resolve() / f"n{n}", ignore_errors=True)
    pts = sorted(points.values(), key=lambda p: p["cells"])
    slope, icpt = fit([p["cells"] for p in pts], [p["peak_rss_mb"] for p in pts])
    per_stage = {
        s: round(
            1000 * fit([p["cells"] for p in pts], [p["stages"][s]["peak_rss_mb"] for p in pts])[0],
            2,
        )
        for s in pts[0]["stages"]
    }
    rec = {
        "command": "python benchmarks/bench_scaling.py " + " ".join(sys.argv[1:]),
        "note": "scVI capped at max_epochs (demo config otherwise); each size a fresh process; "
        "shared machine, timings noisy",
        "rss_slope_mb_per_1k_cells": round(1000 * slope, 2),
        "rss_intercept_mb": round(icpt, 1),
        "rss_slope_mb_per_1k_cells_by_stage": per_stage,
        "points": pts,
    }
    rec["markdown"] = markdown(pts, 1000 * slope)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=1) + "\n")
    plot(pts, HERE / ("scaling_backed.png" if args.backed else "scaling.png"))
    print(rec["markdown"])
    print("per-stage peak RSS slope (MB per 1,000 cells):", json.dumps(per_stage))


if __name__ == "__main__":
    main()
