"""Report: figures, key findings and rendering on synthetic tables with the documented columns.

:func:`write_synthetic_run` writes every result table the report reads, with
exactly the columns of ``docs/outputs.md`` and the score/differential contracts,
plus a final AnnData and a provenance record; the browser test reuses it.
"""

from __future__ import annotations

import base64
import json
import re
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from matplotlib.figure import Figure

from pipeline import keys
from pipeline.config import load_config
from pipeline.report import build_report, key_findings, read_tables
from pipeline.report import figures as F
from pipeline.report.render import (
    FAMILY_TABLES,
    ReportTables,
    enrichment_for_heatmap,
    fdr_rules,
    marker_expression,
)
from pipeline.stages import StageContext
from pipeline.stages.differential import (
    ABSOLUTE_COLUMNS,
    COMPOSITION_COLUMNS,
    COVARIATE_COLUMNS,
    ENRICHMENT_COLUMNS,
    GLOBAL_COLUMNS,
    MEANS_COLUMNS,
    SHIFT_COLUMNS,
)
from pipeline.stages.report import remove_unused_categories, run_report, scanpy_ready
from pipeline.stats.multitest import bh_adjust, bh_by_family

CELL_TYPES = ("CD14 monocyte", "NK", "CD8 memory T", "B naive")
LINEAGES = {"CD14 monocyte": "mono", "NK": "NK", "CD8 memory T": "T_CD8", "B naive": "B"}
SIGNATURES = ("tbk1_sting", "ifn_type1", "nfkb_inflammation")
#: The sample-handling control (role ``control``, FDR family ``control``).
CONTROL = "ieg_dissociation"
TIMEPOINTS = ("baseline", "acute", "longterm")
CONTRASTS = ("acute_vs_baseline", "longterm_vs_baseline")
#: Cell type x signature pairs of the ``primary`` family (the others are ``exploratory``).
PRIMARY = {
    ("CD14 monocyte", "tbk1_sting"),
    ("CD14 monocyte", "ifn_type1"),
    ("CD8 memory T", "ifn_type1"),
    ("CD8 memory T", "tbk1_sting"),
    ("NK", "ifn_type1"),
}
#: Planted shifts: (contrast, cell_type, signature) -> (effect, p); every other p is in
#: [0.3, 1], so each planted one is below 0.1 after BH within its family. The B naive shift
#: is exploratory with the smallest q of its contrast: the primary ones are still listed first.
PLANTED = {
    ("longterm_vs_baseline", "CD14 monocyte", "tbk1_sting"): (-0.21, 1e-4),
    ("longterm_vs_baseline", "CD8 memory T", "ifn_type1"): (-0.12, 0.012),
    ("longterm_vs_baseline", "B naive", "nfkb_inflammation"): (0.25, 1e-6),
    ("acute_vs_baseline", "CD14 monocyte", "nfkb_inflammation"): (0.3, 0.002),
    ("acute_vs_baseline", "NK", CONTROL): (0.4, 1e-5),
}
#: Enrichment: a ULM row with a tiny p whose camera row is null (never starred or listed),
#: and a planted camera row.
ULM_ONLY = ("acute_vs_baseline", "NK", "ifn_type1")
CAMERA_HIT = ("longterm_vs_baseline", "CD14 monocyte", "tbk1_sting")
MARKERS = [
    "CD14",
    "LYZ",
    "S100A8",
    "GNLY",
    "NKG7",
    "KLRF1",
    "CD3E",
    "CD8A",
    "CD8B",
    "MS4A1",
    "CD79A",
]


def _donors(n: int) -> list[str]:
    return [f"D{i + 1:02d}" for i in range(n)]


def synthetic_adata(n_donors: int = 5, cells_per_sample: int = 40, seed: int = 0) -> ad.AnnData:
    """A final AnnData: obs labels and QC metrics, log-normalised X with marker genes, UMAP."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in _donors(n_donors):
        for t in TIMEPOINTS:
            for i in range(cells_per_sample):
                rows.append((f"{d}_{t}", d, t, CELL_TYPES[i % len(CELL_TYPES)]))
    obs = pd.DataFrame(rows, columns=[keys.SAMPLE, keys.DONOR, keys.TIMEPOINT, keys.CELL_TYPE])
    obs[keys.TIMEPOINT] = pd.Categorical(obs[keys.TIMEPOINT], categories=TIMEPOINTS, ordered=True)
    obs[keys.CELL_TYPE] = obs[keys.CELL_TYPE].astype("category")
    n = len(obs)
    obs["total_counts"] = rng.lognormal(7.5, 0.4, n)
    obs["n_genes_by_counts"] = rng.lognormal(6.5, 0.3, n)
    obs["pct_counts_mt"] = rng.gamma(2.0, 2.0, n)
    for s in (*SIGNATURES, CONTROL):
        obs[f"score_{s}"] = rng.normal(0, 0.2, n)
    obs.index = [f"{s}:{i}" for i, s in enumerate(obs[keys.SAMPLE])]
    genes = [*MARKERS, *[f"G{i}" for i in range(30)]]
    x = rng.poisson(0.3, size=(n, len(genes))).astype(np.float32)
    # marker block k belongs to CELL_TYPES[k] (the categories themselves are sorted by name)
    type_idx = obs[keys.CELL_TYPE].astype(str).map({c: i for i, c in enumerate(CELL_TYPES)})
    type_idx = type_idx.to_numpy()
    for k, block in enumerate([(0, 3), (3, 6), (6, 9), (9, 11)]):
        x[np.ix_(type_idx == k, range(*block))] += rng.poisson(
            3, size=((type_idx == k).sum(), block[1] - block[0])
        )
    a = ad.AnnData(sp.csr_matrix(np.log1p(x)), obs=obs, var=pd.DataFrame(index=genes))
    a.layers[keys.COUNTS] = sp.csr_matrix(x)
    centres = rng.normal(0, 6, size=(len(CELL_TYPES), 2))
    a.obsm[keys.X_UMAP] = centres[type_idx] + rng.normal(0, 1, size=(n, 2))
    a.obsm[keys.X_SCVI] = rng.normal(size=(n, 5))
    return a


def synthetic_tables(
    adata: ad.AnnData, *, covariates: bool = True, seed: int = 0
) -> dict[str, pd.DataFrame]:
    """Every result table, name -> DataFrame (``pseudobulk_de/<ct>__<contrast>`` included)."""
    rng = np.random.default_rng(seed)
    obs = adata.obs
    donors = sorted(obs[keys.DONOR].unique())
    samples = (
        obs.groupby([keys.SAMPLE, keys.DONOR, keys.TIMEPOINT], observed=True)
        .size()
        .rename("n")
        .reset_index()
    )
    t: dict[str, pd.DataFrame] = {}
    t["ingest_samples"] = samples.assign(format="h5ad", n_cells=samples["n"] + 10, n_genes=adata.n_vars,
                                         source="/data/x.h5ad").drop(columns="n")  # fmt: skip
    t["qc_per_sample"] = pd.DataFrame(
        {
            "sample": samples[keys.SAMPLE], "donor": samples[keys.DONOR], "timepoint": samples[keys.TIMEPOINT],
            "cells_in": samples["n"] + 10, "removed_counts": 3, "removed_genes": 4, "removed_mt": 5,
            "doublets": 2, "cells_out": samples["n"], "max_counts": 9000.0, "max_genes": 1500.0,
            "max_pct_mt": 15.0, "min_counts": 300.0, "min_genes": 200.0, "doublet_threshold": 0.3,
            "doublet_rate": 0.008, "dropped": False,
        }
    )  # fmt: skip
    t["hvg"] = pd.DataFrame({"gene": adata.var_names[:10], "highly_variable_rank": np.arange(10.0),
                             "means": 1.0, "variances_norm": 2.0, "hvg_forced": False})  # fmt: skip
    ep = np.arange(20)
    t["scvi_history"] = pd.DataFrame(
        {
            "epoch": ep, "kl_weight": np.minimum(ep / 10, 1), "train_loss": 2000 - 20 * ep,
            "elbo_train": 2000 - 20 * ep, "reconstruction_loss_train": 1990 - 20 * ep,
            "kl_local_train": 5 + ep, "kl_global_train": 0.0, "validation_loss": 2100 - 18 * ep,
            "elbo_validation": 2100 - 18 * ep, "reconstruction_loss_validation": 2090 - 18 * ep,
            "kl_local_validation": 5 + ep, "kl_global_validation": 0.0,
        }
    )  # fmt: skip
    t["integration_metrics"] = pd.DataFrame(
        [
            ("X_pca", "ilisi", 0.3, "batch_mixing"), ("X_pca", "batch_asw", 0.9, "batch_mixing"),
            ("X_scVI", "ilisi", 0.4, "batch_mixing"), ("X_scVI", "batch_asw", 0.8, "batch_mixing"),
            ("X_scVI", "cluster_agreement_nmi", 0.95, "bio_conservation"),
        ],
        columns=["representation", "metric", "value", "kind"],
    ).assign(n_cells=adata.n_obs, note="synthetic")  # fmt: skip
    t["marker_coverage"] = pd.DataFrame({"cell_type": list(CELL_TYPES), "lineage": "x", "n_markers": 5,
                                         "n_present": 3, "n_positive": 4, "n_positive_present": 3,
                                         "n_positive_required": 2, "annotatable": True, "missing": ""})  # fmt: skip
    counts = obs.groupby(
        [keys.SAMPLE, keys.DONOR, keys.TIMEPOINT, keys.CELL_TYPE], observed=True
    ).size()
    t["cell_type_counts"] = counts.rename("n_cells").reset_index()
    t["cell_type_clusters"] = pd.DataFrame({"cluster": ["0", "1"], "cell_type": list(CELL_TYPES[:2]), "n_cells": [80, 60],
                                            "agreement": [0.9, 0.8], "second_cell_type": ["NK", "B naive"],
                                            "second_fraction": [0.05, 0.1]})  # fmt: skip
    t["signature_coverage"] = pd.DataFrame(
        {
            "signature": [*SIGNATURES, CONTROL, "t_naive"], "source": "cited",
            "role": ["programme"] * len(SIGNATURES) + ["control", "programme"],
            "n_genes": [20, 25, 30, 14, 6], "n_found": [18, 25, 27, 14, 2],
            "n_missing": [2, 0, 3, 0, 4], "genes_found": "A,B",
            "genes_missing": ["X,Y", "", "Z", "", "P,Q,R,S"], "aliases_used": "",
            "status": ["scored", "scored", "scored", "scored", "skipped"],
        }
    )  # fmt: skip
    sigs = (*SIGNATURES, CONTROL)

    def family(ct: str, sig: str) -> str:
        if sig == CONTROL:
            return "control"
        return "primary" if (ct, sig) in PRIMARY else "exploratory"

    means, shifts, glob, enr = [], [], [], []
    for ct in CELL_TYPES:
        for sig in sigs:
            base = rng.normal(0, 0.1, len(donors))
            for tp in TIMEPOINTS:
                shift = 0.0
                for con in CONTRASTS:
                    if con.startswith(tp) and (con, ct, sig) in PLANTED:
                        shift = PLANTED[(con, ct, sig)][0]
                for d, b in zip(donors, base, strict=True):
                    ok = not (ct == "NK" and d == donors[0] and tp == "acute")
                    means.append({"donor": d, "timepoint": tp, "cell_type": ct,
                                  "lineage": LINEAGES[ct], "signature": sig,
                                  "n_cells": 10 if ok else 3, "mean_score": b + shift + rng.normal(0, 0.02),
                                  "sample": f"{d}_{tp}", "passes_min_cells": ok})  # fmt: skip
            for con in CONTRASTS:
                eff, p = PLANTED.get((con, ct, sig), (rng.normal(0, 0.02), rng.uniform(0.3, 1)))
                shifts.append({"contrast": con, "cell_type": ct, "signature": sig,
                               "family": family(ct, sig), "test": "paired_t", "n_donors": len(donors),
                               "donors_dropped": "", "mean_reference": 0.0, "mean_test": eff,
                               "effect": eff, "dz": eff / 0.1, "ci_low": eff - 0.05,
                               "ci_high": eff + 0.05, "statistic": 3.0, "p_value": p,
                               "p_wilcoxon": min(1.0, 3 * p), "method": "paired_t", "note": ""})  # fmt: skip
                for method in ("camera", "ulm"):
                    key = (con, ct, sig)
                    if method == "ulm" and key == ULM_ONLY:
                        ep = 1e-8
                    elif method == "camera" and key == CAMERA_HIT:
                        ep = 1e-5
                    else:
                        ep = rng.uniform(0.2, 1)
                    score = float(rng.normal(0, 1)) + (-6.0 if ep < 1e-4 else 0.0)
                    enr.append({"contrast": con, "cell_type": ct, "signature": sig, "n_genes": 20,
                                "score": score, "p_value": ep, "method": method,
                                "inter_gene_cor": 0.08 if method == "camera" else np.nan,
                                "direction": "up" if score > 0 else "down",
                                "family": f"enrichment_{method}", "calibrated": method == "camera"})  # fmt: skip
            gp = 1e-3 if (ct, sig) == ("CD14 monocyte", "tbk1_sting") else rng.uniform(0.2, 1)
            glob.append({"cell_type": ct, "signature": sig, "family": family(ct, sig),
                         "n_donors": len(donors), "timepoints": ",".join(TIMEPOINTS),
                         "statistic": 9.0, "df1": 2, "df2": len(donors) - 2, "p_value": gp,
                         "method": "hotelling_t2", "note": ""})  # fmt: skip
    t["signature_means"] = pd.DataFrame(means, columns=list(MEANS_COLUMNS))
    shifts_df = pd.DataFrame(shifts)
    shifts_df["q_value"] = bh_by_family(shifts_df["p_value"], shifts_df["family"])
    t["signature_shifts"] = shifts_df[list(SHIFT_COLUMNS)]
    glob_df = pd.DataFrame(glob)
    glob_df["q_value"] = bh_by_family(glob_df["p_value"], glob_df["family"])
    t["signature_global"] = glob_df[list(GLOBAL_COLUMNS)]
    enr_df = pd.DataFrame(enr)
    enr_df["q_value"] = bh_by_family(enr_df["p_value"], enr_df["family"])
    t["signature_enrichment"] = enr_df[list(ENRICHMENT_COLUMNS)]
    t["composition"] = composition_table(len(donors))
    t["composition_absolute"] = absolute_table(len(donors))
    t["sample_handling"] = pd.DataFrame(
        {
            "sample": samples[keys.SAMPLE], "donor": samples[keys.DONOR],
            "timepoint": samples[keys.TIMEPOINT].astype(str), "n_cells": samples["n"],
            CONTROL: np.where(samples[keys.TIMEPOINT].astype(str) == "acute", 0.3, 0.1)
            + rng.normal(0, 0.02, len(samples)),
            f"{CONTROL}_mono": rng.normal(0.2, 0.02, len(samples)),
            f"{CONTROL}_NK": rng.normal(0.1, 0.02, len(samples)),
        }
    )  # fmt: skip
    summary = []
    genes = [f"GENE{i}" for i in range(300)]
    for ct in CELL_TYPES[:3]:
        for con in CONTRASTS:
            lfc = rng.normal(0, 0.5, len(genes))
            p = rng.uniform(size=len(genes))
            if ct == "CD14 monocyte" and con == "longterm_vs_baseline":
                p[:12] = 1e-8
                lfc[:12] = -2.0
            q = bh_adjust(p)
            safe = re.sub(r"[^A-Za-z0-9.+_-]", "_", ct)
            name = f"pseudobulk_de/{safe}__{con}"
            t[name] = pd.DataFrame({"gene": genes, "base_mean": 50.0, "log2fc": lfc, "lfc_se": 0.3,
                                    "stat": lfc / 0.3, "p_value": p, "q_value": q})  # fmt: skip
            summary.append(
                (
                    ct,
                    con,
                    len(donors),
                    2 * len(donors),
                    len(genes),
                    int((q < 0.1).sum()),
                    "tested",
                    name,
                )
            )
    summary.append(("B naive", "acute_vs_baseline", 2, 4, 0, 0, "not tested: 2 donors", ""))
    t["pseudobulk_de_summary"] = pd.DataFrame(
        summary, columns=["cell_type", "contrast", "n_donors", "n_pseudobulks", "n_genes_tested", "n_q_lt_0_1",
                          "status", "table"],
    )  # fmt: skip
    t["differential_dropped"] = pd.DataFrame(
        [("signature_shifts", "acute_vs_baseline", "NK", "D01", "acute", "fewer than 10 cells")],
        columns=["analysis", "contrast", "cell_type", "donor", "timepoint", "reason"],
    )
    if covariates:
        rows = [
            {"covariate": "age", "component": comp, "cell_type": ct, "signature": sig,
             "adjusted_for": "timepoint", "n_donors": len(donors), "n_obs": 3 * len(donors),
             "slope": 0.01, "ci_low": -0.01, "ci_high": 0.03, "df": 3 * len(donors) - len(donors) - 3,
             "p_value": 1e-4 if (ct, comp) == ("NK", "within") else rng.uniform(0.2, 1),
             "family": f"age:{comp}", "method": "mixedlm:lbfgs", "note": ""}
            for comp in ("within", "between") for ct in CELL_TYPES for sig in SIGNATURES
        ]  # fmt: skip
        cov = pd.DataFrame(rows)
        cov["q_value"] = bh_by_family(cov["p_value"], cov["family"])
        t["covariate_associations"] = cov[list(COVARIATE_COLUMNS)]
    return t


#: The issue's example: a share that falls 50.4% -> 45.4% while the transformed effect is
#: positive (a CLR or logit difference can disagree with the change of the mean share).
FALLING = ("acute_vs_baseline", "CD14 monocyte", 0.504, 0.454, 0.64)


def composition_table(n_donors: int) -> pd.DataFrame:
    """``composition`` in the differential stage's shape: relative rows and a log-ratio."""
    rows = []
    for con in CONTRASTS:
        for ct in CELL_TYPES:
            ref, test, eff, p = 0.2, 0.2, 0.01, 0.7
            if (con, ct) == ("acute_vs_baseline", "NK"):
                ref, test, eff, p = 0.2, 0.26, 0.4, 0.004
            if (con, ct) == FALLING[:2]:
                ref, test, eff, p = FALLING[2], FALLING[3], FALLING[4], 0.006
            rows.append({"contrast": con, "cell_type": ct, "n_donors": n_donors,
                         "mean_prop_reference": ref, "mean_prop_test": test, "effect": eff,
                         "scale": "logit proportion", "ci_low": eff - 0.3, "ci_high": eff + 0.3,
                         "p_value": p, "family": "composition_relative", "kind": "propeller",
                         "question": "relative abundance (share of the sample's assigned cells)",
                         "direction": "up" if test > ref else "down" if test < ref else "",
                         "dz": eff / 0.3, "p_wilcoxon": 0.06, "note": "", "effect_clr": eff})  # fmt: skip
        rows.append({"contrast": con, "cell_type": "naive/memory T ratio", "n_donors": n_donors,
                     "mean_prop_reference": 0.5, "mean_prop_test": 0.48, "effect": -0.08,
                     "scale": "log ratio", "ci_low": -0.3, "ci_high": 0.14, "p_value": 0.5,
                     "family": "composition_log_ratio", "kind": "log_ratio",
                     "question": "ratio of two type groups (numerator vs denominator cells)",
                     "direction": "down", "dz": -0.2, "p_wilcoxon": 0.6, "note": "",
                     "effect_clr": -0.08})  # fmt: skip
    df = pd.DataFrame(rows)
    df["q_value"] = bh_by_family(df["p_value"], df["family"])
    return df[list(COMPOSITION_COLUMNS)]


def absolute_table(n_donors: int) -> pd.DataFrame:
    """``composition_absolute``: NK cells per uL double at acute, the monocytes' do not move."""
    rows = []
    for con in CONTRASTS:
        for ct in CELL_TYPES:
            ref, test, p = 500.0, 505.0, 0.8
            if (con, ct) == ("acute_vs_baseline", "NK"):
                ref, test, p = 300.0, 600.0, 1e-4
            eff = float(np.log2(test / ref))
            rows.append({"contrast": con, "cell_type": ct, "n_donors": n_donors,
                         "mean_per_ul_reference": ref, "mean_per_ul_test": test,
                         "mean_prop_reference": 0.2, "mean_prop_test": 0.2, "effect": eff,
                         "scale": "log2 cells/uL", "ci_low": eff - 0.2, "ci_high": eff + 0.2,
                         "p_value": p, "family": "composition_absolute", "kind": "absolute",
                         "question": "absolute abundance (cells per uL)",
                         "direction": "up" if test > ref else "down", "dz": eff / 0.2,
                         "p_wilcoxon": 0.06, "note": ""})  # fmt: skip
    df = pd.DataFrame(rows)
    df["q_value"] = bh_by_family(df["p_value"], df["family"])
    return df[list(ABSOLUTE_COLUMNS)]


def synthetic_provenance(adata: ad.AnnData) -> dict:
    """A provenance record with the keys of schema ``immuneage.provenance/1``."""
    stages = {
        s: {"status": "ran", "wall_s": w, "peak_rss_mb": m, "finished": "2026-01-01T00:00:00+0000",
            "host": "node1", "outputs": {}, "config_digest": "abc"}
        for s, w, m in [("ingest", 1.5, 300), ("qc", 2.0, 350), ("preprocess", 3.0, 500),
                        ("integrate", 40.0, 900), ("cluster", 5.0, 700), ("annotate", 2.0, 650),
                        ("score", 1.0, 640), ("differential", 12.0, 800)]
    }  # fmt: skip
    samples = sorted(adata.obs[keys.SAMPLE].unique())
    return {
        "schema": "immuneage.provenance/1",
        "version": "0.1.0",
        "command": ["immuneage", "run", "--samplesheet", "s.csv", "--outdir", "out"],
        "finished": "2026-01-01T00:00:00+0000",
        "seed": 0,
        "device": {"requested": "auto", "resolved": "cpu"},
        "config": {},
        "config_yaml": "seed: 0\ndevice: auto\nreport:\n  title: immuneage report\n",
        "config_digest": "f" * 64,
        "config_path": None,
        "samplesheet": {"path": "/data/s.csv", "sha256": "a" * 64},
        "inputs": [{"sample": s, "path": f"/data/{s}.h5ad", "sha256": "b" * 64} for s in samples],
        "stages": stages,
        "warnings": ["qc [1/15] D01_baseline: few cells pass QC"],
        "packages": {"immuneage": "0.1.0", "anndata": "0.12", "rapids-singlecell": None},
        "machine": {"host": "node1", "cpus": 8},
    }


def write_synthetic_run(
    outdir: Path, *, covariates: bool = True, only: tuple[str, ...] | None = None
) -> tuple[ad.AnnData, dict]:
    """Write the synthetic tables under ``outdir/tables``; return the AnnData and provenance.

    ``only``: write just these table names (a partial run).
    """
    adata = synthetic_adata()
    tables_dir = outdir / "tables"
    for name, df in synthetic_tables(adata, covariates=covariates).items():
        if only is not None and name.split("/")[0] not in only:
            continue
        path = tables_dir / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(path, sep="\t", index=False)
    return adata, synthetic_provenance(adata)


UPSTREAM_TABLES = ("ingest_samples", "qc_per_sample", "hvg", "scvi_history", "integration_metrics",
                   "marker_coverage", "cell_type_counts", "cell_type_clusters")  # fmt: skip
SECTION_IDS = (
    "key-findings",
    "summary",
    "qc",
    "integration",
    "annotation",
    "signatures",
    "differential",
    "provenance",
)


# --------------------------------------------------------------------------- figures
def test_subsample_index_is_seeded_and_bounded():
    a = F.subsample_index(1000, 100, seed=3)
    assert len(a) == 100 and len(set(a)) == 100 and a.max() < 1000 and (np.diff(a) > 0).all()
    assert (a == F.subsample_index(1000, 100, seed=3)).all()
    assert not (a == F.subsample_index(1000, 100, seed=4)).all()
    assert (F.subsample_index(50, 100, seed=0) == np.arange(50)).all()


def test_umap_draws_at_most_max_cells():
    rng = np.random.default_rng(0)
    n = 120_000
    obs = pd.DataFrame(
        {
            "sample": rng.choice([f"S{i}" for i in range(60)], n),
            "cell_type": rng.choice(list("abc"), n),
        }
    )
    fig = F.umap_panels(
        rng.normal(size=(n, 2)), obs, ["sample", "cell_type"], max_cells=5000, seed=1
    )
    axes = fig.axes
    assert len(axes) == 2
    for ax in axes:
        assert len(ax.collections[0].get_offsets()) == 5000
        assert "5,000 of 120,000 cells" in ax.get_title()
    # 60 samples: no legend, a note instead; 3 types: a legend
    assert axes[0].get_legend() is None
    assert any("legend left out" in t.get_text() for t in axes[0].texts)
    assert axes[1].get_legend() is not None


def test_every_figure_function_draws_from_the_tables():
    adata = synthetic_adata()
    t = synthetic_tables(adata)
    tps = list(TIMEPOINTS)
    de = {
        ct: t[f"pseudobulk_de/{ct.replace(' ', '_')}__longterm_vs_baseline"]
        for ct in CELL_TYPES[:3]
    }
    mean, frac = marker_expression(
        adata, {"CD14 monocyte": ["CD14", "LYZ"], "NK": ["GNLY", "NOT_A_GENE"]}
    )
    assert list(mean.columns) == ["CD14", "LYZ", "GNLY"]
    assert mean.loc["CD14 monocyte", "CD14"] > mean.loc["NK", "CD14"]
    assert ((frac >= 0) & (frac <= 1)).all().all()
    figs = {
        "cohort": F.cohort_matrix(t["qc_per_sample"].rename(columns={"cells_out": "n_cells"}), tps),
        "qc_cells": F.qc_cells(t["qc_per_sample"]),
        "qc_dist": F.qc_distributions(
            adata.obs, t["qc_per_sample"], max_cells_per_sample=10, timepoints=tps
        ),
        "metrics": F.integration_metrics(t["integration_metrics"]),
        "history": F.scvi_history(t["scvi_history"]),
        "dot": F.marker_dotplot(mean, frac),
        "comp": F.composition_lines(t["cell_type_counts"], tps, t["composition"]),
        "means": F.paired_means(t["signature_means"], "tbk1_sting", tps, t["signature_shifts"]),
        "coverage": F.signature_coverage(t["signature_coverage"]),
        "heat": F.effect_heatmap(
            t["signature_shifts"], value="dz", value_label="dz", contrasts=CONTRASTS
        ),
        "volcano": F.volcano_grid(de, title="longterm vs baseline"),
        "forest": F.covariate_forest(t["covariate_associations"]),
        "resources": F.stage_resources(synthetic_provenance(adata)["stages"]),
        "handling": F.sample_handling(t["sample_handling"], [CONTROL, f"{CONTROL}_mono"], tps),
    }
    for name, fig in figs.items():
        assert isinstance(fig, Figure), name
        assert fig.axes, name
    # one line per donor (5) + the mean per composition panel
    assert len(figs["comp"].axes[0].lines) == 5 + 1
    # the planted significant panel is framed in red and its title carries the stars
    means_axes = {ax.get_title().split("\n")[0]: ax for ax in figs["means"].axes if ax.get_title()}
    mono = means_axes["CD14 monocyte"]
    sh = t["signature_shifts"]
    q_mono = sh.loc[
        (sh["contrast"] == "longterm_vs_baseline")
        & (sh["cell_type"] == "CD14 monocyte")
        & (sh["signature"] == "tbk1_sting"),
        "q_value",
    ].item()
    assert q_mono < 0.01 and f"longterm q={q_mono:.2g}**" in mono.get_title()
    assert mono.spines["left"].get_edgecolor()[:3] == pytest.approx(
        (0xC0 / 255, 0x39 / 255, 0x2B / 255)
    )
    # NK: donor D01 has too few cells at acute: that mean is a dotted open circle, outside
    # the mean line; the donor's two passing points stay joined
    nk = means_axes["NK"]
    dotted = [ln for ln in nk.lines if ln.get_linestyle() == ":"]
    assert len(dotted) == 1 and len(dotted[0].get_xdata()) == 1
    assert len(nk.lines) == 1 + 5 + 1
    # heatmap: one panel per contrast, stars where q < 0.1
    heat_axes = [ax for ax in figs["heat"].axes if ax.get_title()]
    assert [ax.get_title() for ax in heat_axes] == ["acute vs baseline", "longterm vs baseline"]
    q_lt = sh.loc[sh["contrast"] == "longterm_vs_baseline", "q_value"]
    stars = sorted("**" if q < 0.01 else "*" for q in q_lt[q_lt < 0.1])
    assert len(stars) >= 2 and sorted(tx.get_text() for tx in heat_axes[1].texts) == stars
    # the forest labels each row's component (within / between)
    labels = [tx.get_text() for tx in figs["forest"].axes[0].get_yticklabels()]
    assert labels and all(" (within) · " in x or " (between) · " in x for x in labels)
    # sample handling: a panel per column, a line per donor and the mean
    h_axes = [ax for ax in figs["handling"].axes if ax.get_title()]
    assert [ax.get_title() for ax in h_axes] == [CONTROL, f"{CONTROL}_mono"]
    assert all(len(ax.lines) == 5 + 1 for ax in h_axes)
    # volcano: the planted 12 genes are counted as significant in the monocyte panel
    n_mono = int((de["CD14 monocyte"]["q_value"] < 0.1).sum())
    assert n_mono >= 12
    v_titles = [ax.get_title() for ax in figs["volcano"].axes if ax.get_title()]
    assert f"CD14 monocyte\n{n_mono} genes q<0.1 of 300" in v_titles


def test_small_multiples_are_capped_with_smallest_q_first():
    rng = np.random.default_rng(0)
    types = [f"type{i:02d}" for i in range(60)]
    rows = [
        (f"D{d}_{t}", f"D{d}", t, ct, int(rng.integers(1, 50)))
        for d in range(3)
        for t in TIMEPOINTS
        for ct in types
    ]
    counts = pd.DataFrame(rows, columns=["sample", "donor", "timepoint", "cell_type", "n_cells"])
    comp = pd.DataFrame(
        {"contrast": "acute_vs_baseline", "cell_type": types, "q_value": np.linspace(0.9, 0.01, 60)}
    )
    fig = F.composition_lines(counts, TIMEPOINTS, comp, max_panels=12)
    titled = [ax.get_title().split("\n")[0] for ax in fig.axes if ax.get_title()]
    assert len(titled) == 12
    assert set(titled) == set(types[-12:])  # the 12 smallest q
    assert "12 of 60 cell types" in fig.get_suptitle()


# --------------------------------------------------------------------------- findings
def _q(table: pd.DataFrame, **where: str) -> float:
    m = np.ones(len(table), dtype=bool)
    for k, v in where.items():
        m &= (table[k] == v).to_numpy()
    return float(table.loc[m, "q_value"].item())


def test_key_findings_lists_the_significant_shifts_only(tmp_path):
    write_synthetic_run(tmp_path)
    tables = read_tables(tmp_path / "tables")
    sh = tables.get("signature_shifts")
    assert set(tables.pseudobulk_de) == {(ct, c) for ct in CELL_TYPES[:3] for c in CONTRASTS}
    f = key_findings(tables, q_threshold=0.1, max_findings=10)
    assert set(f) == set(CONTRASTS)
    lt = f["longterm_vs_baseline"]
    # primary family first, although the exploratory B naive shift has the smallest q
    assert [(x.cell_type, x.what, x.family) for x in lt["signature"]] == [
        ("CD14 monocyte", "tbk1_sting", "primary"),
        ("CD8 memory T", "ifn_type1", "primary"),
        ("B naive", "nfkb_inflammation", "exploratory"),
    ]
    assert lt["signature"][2].q_value < lt["signature"][0].q_value
    first = lt["signature"][0]
    q = _q(sh, contrast="longterm_vs_baseline", cell_type="CD14 monocyte", signature="tbk1_sting")
    n_primary = int((sh["family"] == "primary").sum())
    assert first.direction == "down" and first.q_value == pytest.approx(q, rel=1e-5)
    assert f"q = {q:.2g}" in first.text and "5 donors" in first.text and "-0.21" in first.text
    # the text says which family the q belongs to and how it was computed
    assert f"primary family: BH over its {n_primary} tests, both contrasts together" in first.text
    # the sample-handling control is not counted among the tests
    assert lt["n_tests"]["signature"] == len(CELL_TYPES) * len(SIGNATURES)
    assert lt["n_significant"]["signature"] == 3
    n_prim = len({(ct, s) for ct, s in PRIMARY})
    assert lt["by_family"]["signature"] == [
        ("primary", 2, n_prim),
        ("exploratory", 1, len(CELL_TYPES) * len(SIGNATURES) - n_prim),
    ]
    ac = f["acute_vs_baseline"]
    assert {(x.cell_type, x.direction) for x in ac["composition"]} == {
        ("NK", "up"),
        ("CD14 monocyte", "down"),
    }
    assert [(x.cell_type, x.direction) for x in ac["composition_absolute"]] == [("NK", "up")]
    assert "NK cells per µL up (absolute abundance)" in ac["composition_absolute"][0].text
    assert [x.cell_type for x in ac["signature"]] == ["CD14 monocyte"]
    assert any(x.cell_type == "CD14 monocyte" for x in lt["de"])
    # enrichment: the calibrated (camera) hit only; the ULM row with a tiny q is not listed
    assert [(x.cell_type, x.what, x.family) for x in lt["enrichment"]] == [
        ("CD14 monocyte", "tbk1_sting", "enrichment_camera")
    ]
    assert ac["enrichment"] == [] and ac["n_significant"]["enrichment"] == 0
    # a stricter threshold drops the q = 0.06 shift; max_findings caps the list (primary first)
    q_cd8 = _q(sh, contrast="longterm_vs_baseline", cell_type="CD8 memory T", signature="ifn_type1")
    assert 0.05 < q_cd8 < 0.1
    strict = key_findings(tables, q_threshold=0.05, max_findings=10)
    assert [x.cell_type for x in strict["longterm_vs_baseline"]["signature"]] == [
        "CD14 monocyte",
        "B naive",
    ]
    capped = key_findings(tables, q_threshold=0.1, max_findings=1)
    assert [x.cell_type for x in capped["longterm_vs_baseline"]["signature"]] == ["CD14 monocyte"]
    assert capped["longterm_vs_baseline"]["n_significant"]["signature"] == 3


def test_a_falling_share_is_never_written_up():
    """The issue's row: share 50.4% -> 45.4% with a positive transformed effect reads 'down'."""
    comp = composition_table(5)
    contrast, ct, ref, test, eff = FALLING
    row = comp[(comp["contrast"] == contrast) & (comp["cell_type"] == ct)].iloc[0]
    assert row["effect"] > 0 and row["mean_prop_test"] < row["mean_prop_reference"]
    for variant in (
        comp,
        comp.drop(columns=["direction"]),  # no direction column: from the mean shares
        comp.drop(columns=["effect_clr"]),  # effect_clr is not read
        comp.assign(effect_clr=-comp["effect_clr"]),
    ):
        f = key_findings(ReportTables({"composition": variant}), q_threshold=0.1, max_findings=10)
        (hit,) = [x for x in f[contrast]["composition"] if x.cell_type == ct]
        assert hit.direction == "down"
        assert f"{ct} share down (relative abundance)" in hit.text
        assert f"{100 * ref:.2f}% → {100 * test:.2f}%" in hit.text
        assert " up" not in hit.text
        # the effect is shown on its own scale, never called CLR
        assert f"effect {eff:+.3g} logit proportion" in hit.text and "CLR" not in hit.text


def test_ulm_rows_are_never_starred_highlighted_or_listed(stage_run):
    _res, html, _ = stage_run
    enr = synthetic_tables(synthetic_adata())["signature_enrichment"]
    ulm = enr[enr["method"] == "ulm"]
    assert (ulm["q_value"] < 0.1).any()  # the planted ULM row would be a hit
    # highlighted rows of the enrichment table: camera only
    start = html.index("Signature enrichment (camera, ulm; tables/signature_enrichment.tsv")
    block = html[start : html.index("</table>", start)]
    rows = re.findall(r'<tr( class="sig")?>(.*?)</tr>', block, flags=re.S)
    sig_rows = [r for cls, r in rows if cls]
    assert sig_rows and all("<td>camera</td>" in r for r in sig_rows)
    assert any("<td>ulm</td>" in r for cls, r in rows if not cls)
    assert "ULM ignores the inter-gene correlation" in html
    # the heatmap's stars: from calibrated rows only
    shown = enrichment_for_heatmap(enr)
    assert set(shown["method"]) == {"camera"}
    fig = F.effect_heatmap(shown, value="score", value_label="s", contrasts=CONTRASTS)
    stars = [tx.get_text() for ax in fig.axes for tx in ax.texts]
    cam = enr.loc[enr["method"] == "camera", "q_value"]
    assert sorted(stars) == sorted("**" if q < 0.01 else "*" for q in cam[cam < 0.1])
    # a ULM-only table: drawn, no star at all
    only_ulm = enrichment_for_heatmap(ulm)
    assert only_ulm["q_value"].isna().all()
    fig = F.effect_heatmap(only_ulm, value="score", value_label="s", contrasts=CONTRASTS)
    assert not [tx for ax in fig.axes for tx in ax.texts]
    # not listed
    top = html[: html.index('<section id="summary"')]
    assert "(ulm" not in top and "enrichment_ulm family" not in top


def test_control_family_never_in_key_findings(tmp_path):
    write_synthetic_run(tmp_path)
    tables = read_tables(tmp_path / "tables")
    sh = tables.get("signature_shifts")
    ctrl = sh[sh["family"] == "control"]
    assert (ctrl["q_value"] < 0.1).any()  # a handling difference that would be a hit
    f = key_findings(tables, q_threshold=0.1, max_findings=50)
    listed = [x for con in f.values() for k in ("signature", "enrichment") for x in con[k]]
    assert listed and all(x.what != CONTROL and x.family != "control" for x in listed)
    assert all(CONTROL not in x.text for x in listed)
    # a table without families: the coverage table's role still keeps the control out
    old = ReportTables(
        {"signature_shifts": sh.drop(columns="family"),
         "signature_coverage": tables.get("signature_coverage")}
    )  # fmt: skip
    f = key_findings(old, q_threshold=0.1, max_findings=50)
    listed = [x for con in f.values() for x in con["signature"]]
    assert listed and all(x.what != CONTROL for x in listed)


def test_family_note_matches_the_families_in_the_tables(stage_run, tmp_path):
    _res, html, _ = stage_run
    write_synthetic_run(tmp_path)
    tables = read_tables(tmp_path / "tables")
    rules = fdr_rules(tables)
    want = {
        (name, str(fam)): int(n)
        for name in FAMILY_TABLES
        for fam, n in tables.get(name)["family"].value_counts().items()
    }
    assert {(r.table, r.family): r.n_tests for r in rules} == want
    # every synthetic q is BH within its family over both contrasts: the check finds it so
    assert {r.scope for r in rules} == {"family"}
    assert [r.calibrated for r in rules if r.family == "enrichment_ulm"] == [False]
    diff = html[html.index('<section id="differential"') :]
    assert diff.index("<h3>How to read the q-values</h3>") < diff.index('<div class="fdr">')
    note = diff[diff.index('<div class="fdr">') :]
    note = note[: note.index("</div>")]
    for r in rules:
        assert f"family {r.family} (" in note and r.rule() in note
    assert note.count("<li>family ") == len(rules)
    assert f"BH over its genes (checked on all {len(tables.pseudobulk_de)} tables)" in note
    # each table caption carries its rule line
    assert "Signature shifts (tables/signature_shifts.tsv; primary family: BH over its" in html
    # a table whose q-values are BH within each contrast is said to be so
    sh = tables.get("signature_shifts")
    per_con = sh.assign(q_value=bh_by_family(sh["p_value"], sh["family"] + "|" + sh["contrast"]))
    r = {x.family: x for x in fdr_rules(ReportTables({"signature_shifts": per_con}))}
    assert r["primary"].scope == "contrast"
    assert "within each contrast separately" in r["primary"].rule()
    # ... and q-values that are no BH of their p-values are flagged, not described
    bad = sh.assign(q_value=sh["p_value"])
    r = {x.family: x for x in fdr_rules(ReportTables({"signature_shifts": bad}))}
    assert (
        r["exploratory"].scope == "unverified" and "read them with care" in r["exploratory"].rule()
    )


# --------------------------------------------------------------------------- render
def _figure_names(html: str) -> list[str]:
    return re.findall(r'data-figure="([^"]+)"', html)


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    """``run_report`` once on the full synthetic run: (result, html, figure files dir)."""
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "out"
    adata, prov = write_synthetic_run(out)
    # what the score stage hands over on a real run: a panel type no cell has, its palette
    ct = adata.obs[keys.CELL_TYPE].cat.add_categories(["NK CD56bright"])
    adata.obs[keys.CELL_TYPE] = ct.cat.reorder_categories(["NK CD56bright", *CELL_TYPES])
    adata.uns["cell_type_colors"] = np.array(
        ["#000000", "#111111", "#222222", "#333333", "#444444"]
    )
    pb = ad.AnnData(obs=pd.DataFrame(index=[f"pb{i}" for i in range(7)]))
    cfg = load_config(None, {"report": {"title": "My cohort", "dpi": 60}})
    with warnings.catch_warnings():
        # the runner records every warning in provenance: the report must raise none
        warnings.simplefilter("error")
        res = run_report(adata, pb, cfg, device=None, context=StageContext(out, prov))
    res.files["report.html"](tmp / "r.html")
    (tmp / "figs").mkdir()
    res.files["figures/"](tmp / "figs")
    return res, (tmp / "r.html").read_text(), tmp / "figs"


def test_report_has_every_section_and_embeds_every_figure(stage_run):
    _res, html, figs_dir = stage_run
    figures = {p.name: p.read_bytes() for p in figs_dir.iterdir()}
    for sid in SECTION_IDS:
        assert f'<section id="{sid}"' in html
    names = _figure_names(html)
    assert sorted(names) == sorted(figures)
    expected = {"cohort_matrix", "qc_cells", "qc_distributions", "umap_sample_timepoint_celltype",
                "integration_metrics", "scvi_training", "umap_cell_type", "marker_dotplot",
                "composition_per_donor", "signature_coverage", "signature_shift_heatmap",
                "volcano_acute_vs_baseline", "volcano_longterm_vs_baseline",
                "signature_enrichment_heatmap", "covariate_associations", "stage_resources",
                "sample_handling", *(f"signature_means_{s}" for s in (*SIGNATURES, CONTROL))}  # fmt: skip
    assert {n.removesuffix(".png") for n in names} == expected
    for name, data in figures.items():
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"data:image/png;base64,{base64.b64encode(data).decode()}" in html
    # self-contained: nothing fetched from anywhere, and the CSP forbids it
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "default-src 'none'" in html
    # key findings at the top, before section 1
    top = html[: html.index('<section id="summary"')]
    assert "tbk1_sting lower in CD14 monocyte" in top
    assert "NK share up (relative abundance)" in top
    assert "CD14 monocyte share down (relative abundance): 50.40% → 45.40%" in top
    assert "NK cells per µL up (absolute abundance)" in top
    # no transformed-effect wording: effect_clr is not shown, the scale is named
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)
    assert "CLR" not in text and "effect_clr" not in text and "logit proportion" in top
    # the control family is shown in section 5 only
    assert CONTROL not in top
    assert "primary family: BH over its" in top
    assert "CD14 monocyte: " in top and "genes at q &lt; 0.1" in top
    # provenance facts
    for text in (
        "immuneage run --samplesheet s.csv",
        "f" * 64,
        "a" * 64,
        "few cells pass QC",
        "not installed",
    ):
        assert text in html
    assert "No covariate associations" not in html


def test_new_sections_render(stage_run):
    _res, html, _ = stage_run
    sig = html[html.index('<section id="signatures"') : html.index('<section id="differential"')]
    diff = html[html.index('<section id="differential"') : html.index('<section id="provenance"')]
    ann = html[html.index('<section id="annotation"') : html.index('<section id="signatures"')]
    # composition: the relative table with its caveat pointing to the absolute table
    assert "Cell-type shares, question: relative abundance (share of the sample&#39;s" in ann
    assert "Shares are relative: when one type rises, the other types&#39; shares fall" in ann
    assert "The absolute-abundance table below (cells per µL)" in ann
    assert "Cells per µL, question: absolute abundance (cells per uL) (tables/composition" in ann
    assert (
        "effect on the log2 cells/uL scale" in ann and "effect on the logit proportion scale" in ann
    )
    assert "Log-ratios of type groups" in ann
    assert (
        ann.index("Cell-type shares, question")
        < ann.index("Shares are relative")
        < ann.index("Cells per µL, question")
    )
    # the sample-handling control: per sample, per timepoint, what a difference means
    assert "Sample-handling control" in sig and "van den Brink et al. 2017" in sig
    assert "Sample-handling control per timepoint" in sig and "per sample" in sig
    assert "Handling differs between timepoints at q &lt; 0.1 (control family" in sig
    assert f"{CONTROL} in NK, acute vs baseline" in sig
    assert 'data-figure="sample_handling.png"' in sig
    # the global test across timepoints
    assert "Global test across timepoints" in diff
    assert "Global tests (tables/signature_global.tsv; primary family: BH over its" in diff
    # covariates: the adjustment and the components are said
    assert "adjusted for: timepoint" in diff and "within (slope on the donor-centred" in diff


def test_missing_optional_tables_are_stated(tmp_path):
    adata, prov = write_synthetic_run(tmp_path, covariates=False)
    for name in (
        "signature_enrichment",
        "signature_global",
        "composition_absolute",
        "sample_handling",
    ):
        (tmp_path / "tables" / f"{name}.tsv").unlink()  # fmt: skip
    cfg = load_config(None, {"report": {"figure_format": "svg", "dpi": 60}})
    rep = build_report(adata, read_tables(tmp_path / "tables"), prov, cfg)
    assert "No covariate associations: no covariate was given" in rep.html
    assert "tables/signature_enrichment.tsv is absent" in rep.html
    assert "covariate_associations.svg" not in rep.figures
    # the new tables, absent
    assert "tables/signature_global.tsv is absent" in rep.html
    assert "tables/composition_absolute.tsv is absent" in rep.html
    assert "tables/sample_handling.tsv is absent" in rep.html
    assert "needs absolute counts" in rep.html  # the relative caveat says how to get them
    assert "sample_handling.svg" not in rep.figures
    # svg: inline vectors, no <img>
    assert rep.figures and all(n.endswith(".svg") for n in rep.figures)
    assert "<img" not in rep.html and rep.html.count("<svg") >= len(rep.figures)


def test_partial_run_without_score_and_differential(tmp_path):
    adata, prov = write_synthetic_run(tmp_path, only=UPSTREAM_TABLES)
    for k in [c for c in adata.obs.columns if c.startswith("score_")]:
        del adata.obs[k]
    # a table written without rows (two timepoints: no global test) is said to be empty
    pd.DataFrame(columns=list(GLOBAL_COLUMNS)).to_csv(
        tmp_path / "tables" / "signature_global.tsv", sep="\t", index=False
    )
    rep = build_report(
        adata, read_tables(tmp_path / "tables"), prov, load_config(None, {"report": {"dpi": 60}})
    )
    assert "No differential results in this run" in rep.html
    assert "tables/signature_shifts.tsv is absent" in rep.html
    assert "No pseudobulk DE tables" in rep.html
    assert "tables/signature_global.tsv has no rows: fewer than 3 timepoints" in rep.html
    assert "tables/sample_handling.tsv is absent" in rep.html
    assert rep.findings == {}
    for sid in SECTION_IDS:
        assert f'<section id="{sid}"' in rep.html


def test_run_report_stage_returns_files_and_final_adata(stage_run):
    res, html, figs_dir = stage_run
    assert set(res.files) == {"report.html", "figures/"}
    assert "<title>My cohort</title>" in html
    assert "7 pseudobulk profiles" in html
    files = sorted(p.name for p in figs_dir.iterdir())
    info = res.adata.uns["immuneage"]["report"]
    sh = synthetic_tables(synthetic_adata())["signature_shifts"]
    n_sig = int(((sh["q_value"] < 0.1) & (sh["family"] != "control")).sum())
    assert info["figures"] == files and info["n_findings"]["signature"] == n_sig == 4
    assert info["n_findings"]["composition_absolute"] == 1
    # the final AnnData keeps the scverse layout
    assert {keys.X_UMAP, keys.X_SCVI} <= set(res.adata.obsm) and keys.COUNTS in res.adata.layers
    json.dumps(info)  # JSON-able, so h5ad can store it
    # ... and scanpy takes it as it is: the empty type is gone, its colour with it
    final = res.adata
    assert info["removed_categories"] == {"obs": {keys.CELL_TYPE: ["NK CD56bright"]}}
    assert list(final.obs[keys.CELL_TYPE].cat.categories) == list(CELL_TYPES)
    assert list(final.uns["cell_type_colors"]) == ["#111111", "#222222", "#333333", "#444444"]
    assert final.uns["log1p"] == {"base": None}
    assert "NK CD56bright" not in html


@pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")
def test_final_adata_round_trips_and_scanpy_takes_it(stage_run, tmp_path):
    import scanpy as sc

    from pipeline.artifacts import write_h5ad_atomic

    res, _, _ = stage_run
    write_h5ad_atomic(tmp_path / "immuneage.h5ad", res.adata, link=False)
    a = ad.read_h5ad(tmp_path / "immuneage.h5ad")
    assert a.uns["log1p"] == {"base": None}
    assert a.uns["immuneage"]["report"]["removed_categories"]["obs"][keys.CELL_TYPE] == [
        "NK CD56bright"
    ]
    sc.tl.rank_genes_groups(a, keys.CELL_TYPE, method="wilcoxon")
    top = pd.DataFrame(a.uns["rank_genes_groups"]["names"]).iloc[0]
    assert set(top.index) == set(CELL_TYPES)
    assert set(top) <= set(MARKERS)  # each type's planted marker block comes first
    sc.pl.umap(a, color=["score_ifn_type1", keys.CELL_TYPE], show=False)
    assert len(a.uns["cell_type_colors"]) == len(CELL_TYPES)


def _with_categories(values: list, categories: list, **kw) -> pd.Categorical:
    return pd.Categorical(values, categories=categories, **kw)


def test_remove_unused_categories_on_obs_var_and_their_colours():
    obs = pd.DataFrame(
        {
            "cell_type": _with_categories(["T", "B", "T", None], ["NK", "T", "B", "pDC"]),
            "timepoint": _with_categories(
                ["base", "base", "late", "late"], ["base", "acute", "late"], ordered=True
            ),
            "sample": _with_categories(["s1", "s1", "s2", "s2"], ["s1", "s2"]),
            "donor": _with_categories(["d1"] * 4, ["d1", "d2"]),
            "score": [0.1, 0.2, 0.3, 0.4],
        },
        index=[f"c{i}" for i in range(4)],
    )
    var = pd.DataFrame({"chrom": _with_categories(["1", "X"], ["1", "2", "X"])}, index=["G1", "G2"])
    a = ad.AnnData(np.zeros((4, 2), np.float32), obs=obs, var=var)
    a.uns["cell_type_colors"] = np.array(["#a", "#b", "#c", "#d"])  # one per old category
    a.uns["sample_colors"] = np.array(["#a", "#b", "#c"])  # already wrong: dropped
    a.uns["donor_colors"] = ["#a"]  # already matches the kept category: kept
    removed = remove_unused_categories(a)
    assert removed == {
        "obs": {"cell_type": ["NK", "pDC"], "timepoint": ["acute"], "donor": ["d2"]},
        "var": {"chrom": ["2"]},
    }
    assert list(a.obs["cell_type"].cat.categories) == ["T", "B"]
    assert a.obs["cell_type"].isna().sum() == 1  # missing values stay missing
    tp = a.obs["timepoint"]
    assert list(tp.cat.categories) == ["base", "late"] and tp.cat.ordered
    assert list(a.obs["sample"].cat.categories) == ["s1", "s2"]
    assert list(a.var["chrom"].cat.categories) == ["1", "X"]
    assert list(a.uns["cell_type_colors"]) == ["#b", "#c"]
    assert "sample_colors" not in a.uns
    assert list(a.uns["donor_colors"]) == ["#a"]
    assert (a.obs["score"] == [0.1, 0.2, 0.3, 0.4]).all()
    assert remove_unused_categories(a) == {}  # idempotent


def test_scanpy_ready_adds_log1p_and_drops_a_dangling_graph():
    a = ad.AnnData(np.zeros((3, 2), np.float32))
    a.var["highly_variable"] = pd.Series([1.0, np.nan], index=a.var_names)
    a.uns["neighbors"] = {"connectivities_key": "connectivities", "distances_key": "distances"}
    done = scanpy_ready(a)
    assert done == {"removed_categories": {}, "fixed": ["log1p", "highly_variable", "neighbors"]}
    assert a.uns["log1p"] == {"base": None} and "neighbors" not in a.uns
    assert a.var["highly_variable"].dtype == bool and list(a.var["highly_variable"]) == [
        True,
        False,
    ]
    # nothing to do on a consistent object; an existing log1p base is kept
    b = ad.AnnData(np.zeros((3, 2), np.float32), uns={"log1p": {"base": 2}})
    b.obsp["connectivities"] = sp.csr_matrix((3, 3))
    b.obsp["distances"] = sp.csr_matrix((3, 3))
    b.uns["neighbors"] = {"connectivities_key": "connectivities", "distances_key": "distances"}
    assert scanpy_ready(b) == {"removed_categories": {}, "fixed": []}
    assert b.uns["log1p"] == {"base": 2} and "neighbors" in b.uns


def test_report_figures_report_progress(tmp_path, monkeypatch):
    import logging

    adata, prov = write_synthetic_run(tmp_path, only=UPSTREAM_TABLES)
    monkeypatch.setenv("IMMUNEAGE_PROGRESS_INTERVAL", "0")  # a plain line per figure
    monkeypatch.setenv("IMMUNEAGE_PROGRESS", "lines")
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    log = logging.getLogger("immuneage")
    handler, level = Keep(logging.INFO), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        cfg = load_config(None, {"report": {"dpi": 50}})
        rep = build_report(adata, read_tables(tmp_path / "tables"), prov, cfg)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    n = len(rep.figures)
    said = [m for m in lines if m.startswith("report figures:")]
    assert len(said) == n, lines
    assert said[0].startswith(f"report figures: figure 1/{n} (")
    assert said[-1].startswith(f"report figures: figure {n}/{n} (100%)")
    # the figures are the same, in the same order, as the HTML names them
    assert _figure_names(rep.html) == list(rep.figures)


def test_outputs_doc_lists_every_column_of_the_differential_tables():
    """docs/outputs.md names each column of the tables the report reads, in its table's section."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "outputs.md").read_text()
    shapes = {
        "signature_shifts": SHIFT_COLUMNS,
        "signature_means": MEANS_COLUMNS,
        "signature_global": GLOBAL_COLUMNS,
        "signature_enrichment": ENRICHMENT_COLUMNS,
        "composition": COMPOSITION_COLUMNS,
        "composition_absolute": ABSOLUTE_COLUMNS,
        "covariate_associations": COVARIATE_COLUMNS,
        "sample_handling": ("sample", "donor", "timepoint", "n_cells", "<control>_<lineage>"),
        "signature_coverage": ("role", "status"),
    }
    for name, columns in shapes.items():
        m = re.search(rf"^##+ `tables/{name}\.tsv`.*?(?=^##)", doc, flags=re.S | re.M)
        assert m, name
        missing = [c for c in columns if f"`{c}`" not in m.group(0)]
        assert not missing, (name, missing)
        # each table with q-values says its FDR family
        if "q_value" in columns:
            assert "BH" in m.group(0) and "`family`" in m.group(0), name
