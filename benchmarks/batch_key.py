"""scVI batch key, decided with evidence: ``integrate.batch_key`` = sample vs donor.

The question (issue 18, item 7): with ``batch_key: sample`` (sample = donor x
timepoint), every sample of one timepoint is its own batch, so a cell state that
exists at one timepoint only is confounded with a set of batches; scVI may fold
it into the batch correction. Clustering, annotation and composition all use
the scVI latent space. ``donor`` is never confounded with a timepoint (each
donor has every timepoint) but leaves the sample-level technical effects in.

What runs: the demo cohort (:func:`pipeline.datasets.demo_cohort`, ``n_cells``
cells) with its planted one-timepoint state (``truth.json["transient_state"]``:
30 % of the acute CD8 memory T cells in a CX3CR1+ effector state, nine genes
outside the marker panel and every gene set), through the real runner with the
demo config (``DEMO_OVERRIDES``: 25 epochs, no early stopping) up to
``differential`` (``deseq: false``; composition is what is read), once per
batch key in one output directory (ingest .. preprocess are shared; integrate,
cluster, annotate, score and differential re-run for the second key).
Scenarios (``--scenarios``; each one a cohort of its own, every cell outside
the state with the same counts in all three):

``state``
    the state as ``simulator.yaml`` plants it (nine genes at a median of 4
    expected UMIs per cell, granzymes and perforin x2, GZMK / 4);
``weak``
    a weaker state: 1 UMI per gene, no shifted genes (in the PCA a state cell's
    neighbours are barely more often state cells than a random neighbour of its
    type would be): where a correction is likeliest to fold it away;
``absent``
    no state (``transient_state=False``), up to ``annotate``: (e).

What is measured, per key (``X_scVI``; ``X_pca``, the uncorrected input, as the
reference):

(a) separation of the state: the mean share of a state cell's 15 nearest
    neighbours that are state cells (``knn_state_share``; fully mixed within
    its type at its timepoint would give about the state's share of that type,
    0.3), and the Leiden cluster (each resolution the cluster stage wrote) that
    best matches the state (largest F1): its size, precision (purity), recall,
    the ARI of "in that cluster" vs "in the state", and whether the state is
    its own cluster (precision and recall both >= 0.5);
(b) the labels the annotate stage gave the state's cells;
(c) integration metrics (:func:`pipeline.stats.integration.integration_metrics`)
    of ``X_pca`` and ``X_scVI`` with the batch column ``sample`` and ``donor``
    and the true labels (cell type, the state as a label of its own): iLISI,
    batch ASW, cell-type ASW, NMI, ARI, and iLISI with the mean over cells
    (``ilisi_mean_by_*``: the median moves in steps); plus the integrate
    stage's own table;
(d) the composition test's rows (``tables/composition.tsv``) for the state's
    type and NK in the state's contrast;
(e) without the state: the same integration metrics and the share of each
    cell's 15 neighbours from its own donor / own sample (what is left of
    donor and sample effects), against the share expected from composition
    alone (same type, random donor / sample).

Only clean cells (truth: not a doublet, not low quality) that passed QC are
measured. Wall time per run and per stage (from each stage's stamp) is
recorded.

Usage::

    python benchmarks/batch_key.py                      # 9,000 cells, 25 epochs
    python benchmarks/batch_key.py --n-cells 3000 --keys sample donor --scenarios state

Writes ``benchmarks/results/batch_key.json`` and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

K = 15
#: Scenario -> the demo's ``transient_state`` argument.
SCENARIOS: dict[str, Any] = {
    "state": True,
    "weak": {"umi_per_gene": 1.0, "shifted": {}},
    "absent": False,
}
STAGES = ("ingest", "qc", "preprocess", "integrate", "cluster", "annotate", "score", "differential")


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        )
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def _knn(emb: np.ndarray, k: int = K) -> np.ndarray:
    from pipeline.stats.integration import knn_indices

    return knn_indices(emb, k)


def _stage_walls(outdir: Path) -> dict[str, float]:
    """Wall seconds of each stage's last run, from its stamp."""
    from pipeline.artifacts import read_stamp, stamp_path

    out = {}
    for name in STAGES:
        art = outdir / name / f"{name}.h5ad"
        try:
            stamp = read_stamp(stamp_path(art))
        except (OSError, ValueError, KeyError):
            continue
        if stamp is not None and isinstance(stamp.info, dict) and "wall_s" in stamp.info:
            out[name] = float(stamp.info["wall_s"])
    return out


def _clean_cells(outdir: Path, truth_cells: Path) -> tuple[Any, pd.DataFrame]:
    """The annotate artifact restricted to clean cells, and their truth rows."""
    from pipeline.artifacts import read_h5ad_artifact

    a = read_h5ad_artifact(outdir / "annotate" / "annotate.h5ad")
    truth = pd.read_csv(truth_cells, sep="\t", keep_default_na=False)
    truth.index = truth["sample"] + ":" + truth["barcode"]
    tr = truth.loc[a.obs_names]
    clean = ~(tr["is_doublet"].astype(bool) | tr["is_low_quality"].astype(bool)).to_numpy()
    a = a[clean].copy()
    tr = tr.loc[a.obs_names]
    label = tr["cell_type"].astype(str).where(tr["state"] == "", tr["state"])
    a.obs["true_type"] = pd.Categorical(tr["cell_type"].astype(str))
    a.obs["true_label"] = pd.Categorical(label)
    a.obs["in_state"] = (tr["state"] != "").to_numpy()
    return a, tr


def _state_separation(a: Any, st: dict[str, Any]) -> dict[str, Any]:
    """(a) and (b): neighbours, best Leiden cluster and labels of the state's cells."""
    from sklearn.metrics import adjusted_rand_score

    s = a.obs["in_state"].to_numpy()
    tp = a.obs["timepoint"].astype(str).to_numpy()
    typ = a.obs["true_type"].astype(str).to_numpy()
    ref_mask = (typ == st["cell_type"]) & (tp == st["timepoint"])
    out: dict[str, Any] = {
        "n_state_cells": int(s.sum()),
        "state_share_of_type_at_timepoint": round(float(s[ref_mask].mean()), 4),
        "state_share_of_all_cells": round(float(s.mean()), 5),
    }
    for rep in ("X_pca", "X_scVI"):
        nn = _knn(a.obsm[rep])
        share = s[nn[s]].mean(axis=1)
        same_type = (typ[nn[s]] == st["cell_type"]).mean(axis=1)
        out[f"knn_state_share_{rep}"] = round(float(share.mean()), 4)
        out[f"knn_state_share_median_{rep}"] = round(float(np.median(share)), 4)
        out[f"knn_same_type_{rep}"] = round(float(same_type.mean()), 4)
    clusters = {}
    for col in sorted(c for c in a.obs.columns if c.startswith("leiden_")):
        lab = a.obs[col].astype(str).to_numpy()
        best: dict[str, Any] = {"f1": -1.0}
        for c in np.unique(lab):
            m = lab == c
            tp_n = int((m & s).sum())
            if tp_n == 0:
                continue
            prec, rec = tp_n / m.sum(), tp_n / s.sum()
            f1 = 2 * prec * rec / (prec + rec)
            if f1 > best["f1"]:
                best = {
                    "cluster": c,
                    "size": int(m.sum()),
                    "precision": round(float(prec), 4),
                    "recall": round(float(rec), 4),
                    "f1": round(float(f1), 4),
                    "ari": round(float(adjusted_rand_score(s, m)), 4),
                }
        best["own_cluster"] = bool(best.get("precision", 0) >= 0.5 and best.get("recall", 0) >= 0.5)
        best["n_clusters"] = len(np.unique(lab))
        clusters[col] = best
    out["leiden"] = clusters
    labels = a.obs["cell_type"].astype(str)
    out["annotation_of_state_cells"] = {
        k: round(float(v), 4) for k, v in labels[s].value_counts(normalize=True).items()
    }
    rest = ref_mask & ~s
    out["annotation_of_other_type_cells_at_timepoint"] = {
        k: round(float(v), 4) for k, v in labels[rest].value_counts(normalize=True).head(4).items()
    }
    return out


def _mean_ilisi(emb: np.ndarray, batch: pd.Series, k: int = 30) -> float:
    """iLISI with the mean over cells instead of the median, same scaling.

    With uniform weights over ``k`` neighbours the per-cell inverse Simpson's
    index takes few distinct values, so the median (the stage's ``ilisi``) moves
    in steps and often ties between embeddings; the mean resolves them.
    """
    codes, uniques = pd.factorize(batch.astype(str))
    nn = _knn(emb, k)
    counts = np.zeros((len(codes), len(uniques)))
    np.add.at(counts, (np.repeat(np.arange(len(codes)), nn.shape[1]), codes[nn].ravel()), 1.0)
    p = counts / nn.shape[1]
    lisi = 1.0 / (p**2).sum(axis=1)
    return float((lisi.mean() - 1.0) / (len(uniques) - 1.0))


def _mixing(a: Any) -> dict[str, Any]:
    """Integration metrics (sample and donor as batch, true labels) and own-donor/sample neighbours."""
    from pipeline.stats.integration import integration_metrics

    out: dict[str, Any] = {}
    for batch in ("sample", "donor"):
        m = integration_metrics(
            a, batch_key=batch, label_key="true_label", reps=("X_pca", "X_scVI"), seed=0
        )
        for r in m.itertuples():
            name = r.metric if r.kind == "bio_conservation" else f"{r.metric}_by_{batch}"
            out.setdefault(r.representation, {})[name] = round(float(r.value), 4)
        for rep in ("X_pca", "X_scVI"):
            out[rep][f"ilisi_mean_by_{batch}"] = round(_mean_ilisi(a.obsm[rep], a.obs[batch]), 4)
    typ = a.obs["true_label"].astype(str).to_numpy()
    for col in ("donor", "sample"):
        g = a.obs[col].astype(str).to_numpy()
        # expected own-group share if neighbours were same-type cells from random groups
        frame = pd.DataFrame({"t": typ, "g": g})
        n_tg = frame.groupby(["t", "g"]).size()
        n_t = frame.groupby("t").size()
        exp = (n_tg / n_t.reindex(n_tg.index.get_level_values(0)).to_numpy()).to_dict()
        expected = float(np.mean([exp[(t, x)] for t, x in zip(typ, g, strict=True)]))
        for rep in ("X_pca", "X_scVI"):
            nn = _knn(a.obsm[rep])
            own = (g[nn] == g[:, None]).mean(axis=1).mean()
            out.setdefault(rep, {})[f"knn_own_{col}_share"] = round(float(own), 4)
        out[f"knn_own_{col}_share_expected_if_mixed"] = round(expected, 4)
    return out


def _composition(tables: Path, st: dict[str, Any]) -> dict[str, Any]:
    """(d): the composition rows of the state's type and NK in the state's contrast."""
    path = tables / "composition.tsv"
    if not path.is_file():
        return {"error": "no composition table"}
    comp = pd.read_csv(path, sep="\t")
    rows = comp[
        (comp["contrast"] == st["contrast"]) & comp["cell_type"].isin([st["cell_type"], "NK"])
    ]
    keep = [
        c
        for c in comp.columns
        if c
        in ("cell_type", "n_donors", "mean_prop_reference", "mean_prop_test", "p_value", "q_value")
        or c.startswith(("effect", "direction", "method"))
    ]
    return {
        r["cell_type"]: {c: r[c] for c in keep if c != "cell_type"}
        for _, r in rows[keep].iterrows()
    }


def _run(sheet: Path, outdir: Path, key: str, epochs: int, seed: int, until: str) -> dict[str, Any]:
    from pipeline.config import DEMO_OVERRIDES, load_config
    from pipeline.runner import Runner

    cfg = load_config(
        None,
        {
            **DEMO_OVERRIDES,
            "seed": seed,
            "device": "cpu",
            "integrate": {"batch_key": key, "max_epochs": epochs, "early_stopping": False},
            "differential": {"deseq": False},
        },
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Runner(sheet, cfg, outdir).run(until=until)
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 1), "stage_wall_s": _stage_walls(outdir)}


def _integrate_table(tables: Path) -> list[dict[str, Any]]:
    path = tables / "integration_metrics.tsv"
    if not path.is_file():
        return []
    m = pd.read_csv(path, sep="\t")
    return m[["representation", "metric", "value"]].round(4).to_dict("records")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-cells", type=int, default=9000, help="demo cells (default 9000)")
    p.add_argument("--epochs", type=int, default=25, help="scVI epochs, both keys (default 25)")
    p.add_argument("--keys", nargs="+", default=["sample", "donor"], help="batch keys to compare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    p.add_argument(
        "--scenarios",
        nargs="+",
        choices=sorted(SCENARIOS),
        default=["state", "weak", "absent"],
        help="cohorts to run (default: all three)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "batch_key.json")
    args = p.parse_args(argv)

    from pipeline.datasets import demo_cohort

    work = args.workdir or Path(tempfile.mkdtemp(prefix="batch_key_"))
    record: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "commit": _commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "n_cells": args.n_cells,
        "epochs": args.epochs,
        "seed": args.seed,
        "runs": {},
    }
    for scenario in args.scenarios:
        planted = SCENARIOS[scenario]
        t0 = time.perf_counter()
        demo = demo_cohort(
            work / scenario / "cohort",
            size="ci",
            n_cells=args.n_cells,
            seed=args.seed,
            transient_state=planted,
        )
        gen_s = time.perf_counter() - t0
        truth = json.loads(demo.truth.read_text())
        st = truth["transient_state"]
        if st is not None:
            record.setdefault("transient_state", {})[scenario] = {
                k: st[k]
                for k in (
                    "key",
                    "cell_type",
                    "timepoint",
                    "share_of_type",
                    "n_cells",
                    "expected_umi_per_cell",
                    "shifted_log2fc_in_state",
                )
            }
        outdir = work / scenario / "run"
        for key in args.keys:
            until = "differential" if st is not None else "annotate"
            print(f"[{scenario}] batch_key={key}: running up to {until} ...", flush=True)
            res: dict[str, Any] = {"demo_generation_s": round(gen_s, 1)}
            try:
                res |= _run(demo.samplesheet, outdir, key, args.epochs, args.seed, until)
            except Exception as exc:  # differential may be mid-change: fall back to annotate
                if until != "differential":
                    raise
                res["differential_error"] = f"{type(exc).__name__}: {exc}"[:300]
                res |= _run(demo.samplesheet, outdir, key, args.epochs, args.seed, "annotate")
            a, _ = _clean_cells(outdir, demo.truth_cells)
            res["n_clean_cells_after_qc"] = int(a.n_obs)
            res["integrate_stage_metrics"] = _integrate_table(outdir / "tables")
            res["mixing"] = _mixing(a)
            if st is not None:
                res["state"] = _state_separation(a, st)
                res["composition"] = _composition(outdir / "tables", st)
            record["runs"][f"{scenario}/{key}"] = res
            print(json.dumps(res, indent=1, default=str), flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    same = ("n_cells", "epochs", "seed")
    if args.out.is_file():  # runs of other scenarios / keys with the same set-up are kept
        old = json.loads(args.out.read_text())
        if all(old.get(k) == record[k] for k in same):
            record["runs"] = {**old.get("runs", {}), **record["runs"]}
            record["transient_state"] = {
                **old.get("transient_state", {}),
                **record.get("transient_state", {}),
            }
            record["earlier_invocations"] = [
                *old.get("earlier_invocations", []),
                {k: old.get(k) for k in ("date", "commit", "machine", "command")},
            ]
    args.out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
