"""End to end: ``immuneage run`` vs a plain scanpy + scvi-tools script, same cohort, same command.

Generates the demo cohort (``--size``, default ``default`` = 30,000 cells), then
runs, back to back in this one command, each in a fresh process under
``/usr/bin/time -v`` (total wall time and peak RSS of the process):

(a) ``immuneage run`` with the demo config (``pipeline.config.demo_config()``
    written to YAML; the covariate analysis that ``immuneage demo`` adds is not
    part of the demo config and is off on both sides). Per-stage wall time and
    peak RSS come from the run's ``provenance.json`` (per-sample stages: the
    sum of the sample units plus the merge; peak: the max).
(b) ``benchmarks/plain_pipeline.py``: the same analysis with the same
    parameters, hand-written with scanpy/scvi-tools/pydeseq2/scipy; it prints
    its per-step wall times as JSON.

The overhead is ``pipeline wall / plain wall - 1``. It includes what only the
pipeline does (validation, stamps, provenance, integration metrics, coverage
tables, ULM enrichment, figures and the HTML report); the per-stage table shows
where. Timings on a shared machine are noisy: both sides run in the same
command, one after the other (``--plain-first`` swaps the order).

Usage::

    python benchmarks/bench_end_to_end.py --size ci        # ~3k cells, debugging
    python benchmarks/bench_end_to_end.py                  # default size, ~30k cells

Appends a record to ``benchmarks/results/end_to_end.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

#: pipeline stage -> the plain script's steps doing the same work
STAGE_TO_STEPS = {
    "ingest": ["read", "concat"],
    "qc": ["qc"],
    "preprocess": ["preprocess"],
    "integrate": ["scvi"],
    "cluster": ["cluster"],
    "annotate": ["annotate"],
    "score": ["score"],
    "differential": ["differential"],
    "report": ["write"],
}


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


def thread_env(threads: int | None) -> dict[str, str] | None:
    """The environment for a subprocess limited to ``threads`` threads (None: inherited)."""
    if threads is None:
        return None
    return {**os.environ, **dict.fromkeys(THREAD_VARS, str(threads))}


def timed(cmd: list[str], log: Path, threads: int | None = None) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v``; wall (perf_counter) and peak RSS (max RSS).

    ``threads`` sets OMP/MKL/OpenBLAS/numba thread counts (torch follows
    OMP_NUM_THREADS): on a shared, oversubscribed machine torch's default of one
    thread per core collapses (threads wait on each other), 1 thread does not.
    """
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as err:
        r = subprocess.run(
            ["/usr/bin/time", "-v", *cmd],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=thread_env(threads),
        )
    wall = time.perf_counter() - t0
    text = log.read_text()
    if r.returncode != 0:
        sys.stderr.write(text[-4000:])
        raise SystemExit(f"{cmd[0]} failed with exit code {r.returncode}; log: {log}")
    load = (round(load0, 2), round(os.getloadavg()[0], 2))
    return {
        "wall_s": round(wall, 2),
        **time_v(text),
        "load_1min_start_end": load,
        "stdout": r.stdout,
    }


def time_v(text: str) -> dict:
    """Peak RSS and CPU seconds (user + system) from ``/usr/bin/time -v`` output."""
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    cpu = sum(
        float(re.search(rf"{k} time \(seconds\): ([\d.]+)", text).group(1))
        for k in ("User", "System")
    )
    return {"peak_rss_mb": round(rss_kb / 1024, 1), "cpu_s": round(cpu, 1)}


def stage_table(prov: dict) -> dict[str, dict]:
    out = {}
    for name, st in prov["stages"].items():
        units = st.get("units") or {}
        wall = (st.get("wall_s") or 0.0) + sum(u.get("wall_s") or 0.0 for u in units.values())
        peak = max(
            [st.get("peak_rss_mb") or 0.0, *(u.get("peak_rss_mb") or 0.0 for u in units.values())]
        )
        out[name] = {
            "wall_s": round(wall, 2),
            "merge_wall_s": st.get("wall_s"),
            "units": len(units),
            "peak_rss_mb": round(peak, 1),
        }
    return out


def machine() -> dict:
    from importlib.metadata import version

    import torch

    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 2**20:.0f} GiB"
    except OSError:
        pass
    return {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory": mem,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "scanpy": version("scanpy"),
        "scvi_tools": version("scvi-tools"),
    }


def markdown(rec: dict) -> str:
    lines = [
        "| stage (pipeline) | pipeline wall s | pipeline peak RSS MB | plain step(s) | plain wall s |",
        "| --- | --- | --- | --- | --- |",
    ]
    steps = rec["plain"]["steps_s"]
    stages = rec["pipeline"]["stages"]
    for name in sorted(
        stages, key=lambda n: list(STAGE_TO_STEPS).index(n) if n in STAGE_TO_STEPS else 99
    ):
        st = stages[name]
        mapped = STAGE_TO_STEPS.get(name, [])
        plain_s = sum(steps.get(s, 0.0) for s in mapped)
        unit = f" ({st['units']} units + merge)" if st["units"] else ""
        lines.append(
            f"| {name}{unit} | {st['wall_s']:.1f} | {st['peak_rss_mb']:,.0f} | "
            f"{' + '.join(mapped)} | {plain_s:.1f} |"
        )
    p, q = rec["pipeline"], rec["plain"]
    lines.append(
        f"| outside stages (start-up, validation, provenance) | {p['outside_stages_s']:.1f} | | "
        f"imports + start-up | {q['wall_s'] - sum(steps.values()):.1f} |"
    )
    lines.append(
        f"| **total (process wall, max RSS)** | **{p['wall_s']:.1f}** | **{p['peak_rss_mb']:,.0f}** "
        f"| | **{q['wall_s']:.1f}** (max RSS **{q['peak_rss_mb']:,.0f}** MB) |"
    )
    lines.append("")
    lines.append(
        f"Overhead: wall {rec['overhead_wall_pct']:+.1f} %, CPU time (user+sys) "
        f"{rec['overhead_cpu_pct']:+.1f} % ({p['cpu_s']:.0f} vs {q['cpu_s']:.0f} s), peak RSS {rec['overhead_rss_pct']:+.1f} % "
        f"({rec['cells_after_qc_pipeline']:,} vs {rec['cells_after_qc_plain']:,} cells after QC; "
        f"{rec['cells_generated']:,} generated)."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="default", choices=["ci", "default", "large"])
    ap.add_argument("--n-cells", type=int, default=None, help="override the size's cell count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_e2e"))
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP/MKL/torch threads of both runs (default: the libraries' own, one per core)",
    )
    ap.add_argument("--plain-first", action="store_true", help="run the plain script first")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "end_to_end.json")
    args = ap.parse_args()

    from pipeline.config import commented_yaml, demo_config
    from pipeline.datasets import demo_cohort

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cohort = demo_cohort(work / "cohort", size=args.size, seed=args.seed, n_cells=args.n_cells)
    gen_s = time.perf_counter() - t0
    cfg_path = work / "demo.yaml"
    cfg_path.write_text(commented_yaml(demo_config()))
    print(f"cohort: {cohort.n_cells} cells in {gen_s:.1f} s -> {cohort.outdir}", flush=True)

    bin_dir = Path(sys.executable).parent
    immuneage = str(bin_dir / "immuneage") if (bin_dir / "immuneage").exists() else "immuneage"
    runs = {
        "pipeline": [
            immuneage,
            "run",
            "--samplesheet",
            str(cohort.samplesheet),
            "--config",
            str(cfg_path),
            "--outdir",
            str(work / "pipeline"),
            "--quiet",
        ],
        "plain": [
            sys.executable,
            str(HERE / "plain_pipeline.py"),
            "--samplesheet",
            str(cohort.samplesheet),
            "--outdir",
            str(work / "plain"),
        ],
    }
    order = ["plain", "pipeline"] if args.plain_first else ["pipeline", "plain"]
    res = {}
    for name in order:
        shutil.rmtree(work / name, ignore_errors=True)
        print(f"running {name}: {' '.join(runs[name])}", flush=True)
        res[name] = timed(runs[name], work / f"{name}.log", args.threads)
        print(
            f"  {name}: {res[name]['wall_s']:.1f} s, {res[name]['peak_rss_mb']:.0f} MB", flush=True
        )

    prov = json.loads((work / "pipeline" / "provenance.json").read_text())
    stages = stage_table(prov)
    plain = json.loads(res["plain"]["stdout"].strip().splitlines()[-1])
    import anndata as ad

    n_pipe = ad.read_h5ad(work / "pipeline" / "preprocess" / "preprocess.h5ad", backed="r").n_obs
    rec = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "command": "python "
        + " ".join([Path(sys.argv[0]).name and "benchmarks/bench_end_to_end.py", *sys.argv[1:]]),
        "note": "pipeline and plain script run back to back in this one command on a shared machine "
        "(other jobs running): timings are noisy",
        "order": order,
        "threads": args.threads or "library default (one per core)",
        "size": args.size,
        "seed": args.seed,
        "cells_generated": cohort.n_cells,
        "cells_after_qc_pipeline": int(n_pipe),
        "cells_after_qc_plain": plain["n_cells"],
        "generate_s": round(gen_s, 1),
        "config": {
            "integrate.max_epochs": demo_config().integrate.max_epochs,
            "integrate.early_stopping": demo_config().integrate.early_stopping,
            "differential.covariates": None,
        },
        "pipeline": {
            "wall_s": res["pipeline"]["wall_s"],
            "peak_rss_mb": res["pipeline"]["peak_rss_mb"],
            "cpu_s": res["pipeline"]["cpu_s"],
            "load_1min_start_end": res["pipeline"]["load_1min_start_end"],
            "stages_wall_s": round(sum(s["wall_s"] for s in stages.values()), 2),
            "outside_stages_s": round(
                res["pipeline"]["wall_s"] - sum(s["wall_s"] for s in stages.values()), 2
            ),
            "stages": stages,
        },
        "plain": {
            "wall_s": res["plain"]["wall_s"],
            "peak_rss_mb": res["plain"]["peak_rss_mb"],
            "cpu_s": res["plain"]["cpu_s"],
            "load_1min_start_end": res["plain"]["load_1min_start_end"],
            "steps_s": plain["steps_s"],
            "imports_s": plain["imports_s"],
            "n_tables": plain["n_tables"],
            "n_de_tables": plain["n_de_tables"],
        },
    }
    rec["overhead_wall_pct"] = round(
        100 * (rec["pipeline"]["wall_s"] / rec["plain"]["wall_s"] - 1), 1
    )
    rec["overhead_cpu_pct"] = round(100 * (rec["pipeline"]["cpu_s"] / rec["plain"]["cpu_s"] - 1), 1)
    rec["overhead_rss_pct"] = round(
        100 * (rec["pipeline"]["peak_rss_mb"] / rec["plain"]["peak_rss_mb"] - 1), 1
    )
    table = markdown(rec)
    rec["markdown"] = table
    print(table)
    old = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([*old, rec], indent=1) + "\n")


if __name__ == "__main__":
    main()
