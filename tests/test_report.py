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
from pipeline.report.render import marker_expression
from pipeline.stages import StageContext
from pipeline.stages.differential import MEANS_COLUMNS
from pipeline.stages.report import remove_unused_categories, run_report, scanpy_ready

CELL_TYPES = ("CD14 monocyte", "NK", "CD8 memory T", "B naive")
SIGNATURES = ("tbk1_sting", "ifn_type1", "nfkb_inflammation")
TIMEPOINTS = ("baseline", "acute", "longterm")
CONTRASTS = ("acute_vs_baseline", "longterm_vs_baseline")
#: Planted significant results: (contrast, cell_type, signature) -> (effect, q).
PLANTED = {
    ("longterm_vs_baseline", "CD14 monocyte", "tbk1_sting"): (-0.21, 0.004),
    ("longterm_vs_baseline", "CD8 memory T", "ifn_type1"): (-0.12, 0.06),
    ("acute_vs_baseline", "CD14 monocyte", "nfkb_inflammation"): (0.3, 0.02),
}
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
    for s in SIGNATURES:
        obs[f"score_{s}"] = rng.normal(0, 0.2, n)
    obs.index = [f"{s}:{i}" for i, s in enumerate(obs[keys.SAMPLE])]
    genes = [*MARKERS, *[f"G{i}" for i in range(30)]]
    x = rng.poisson(0.3, size=(n, len(genes))).astype(np.float32)
    type_idx = obs[keys.CELL_TYPE].cat.codes.to_numpy()
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
            "dropped": False,
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
            "signature": [*SIGNATURES, "t_naive"], "source": "cited", "n_genes": [20, 25, 30, 6],
            "n_found": [18, 25, 27, 2], "n_missing": [2, 0, 3, 4], "genes_found": "A,B",
            "genes_missing": ["X,Y", "", "Z", "P,Q,R,S"], "aliases_used": "",
            "status": ["scored", "scored", "scored", "skipped"],
        }
    )  # fmt: skip
    means, shifts, enr = [], [], []
    for ct in CELL_TYPES:
        for sig in SIGNATURES:
            base = rng.normal(0, 0.1, len(donors))
            for tp in TIMEPOINTS:
                shift = 0.0
                for con in CONTRASTS:
                    if con.startswith(tp) and (con, ct, sig) in PLANTED:
                        shift = PLANTED[(con, ct, sig)][0]
                for d, b in zip(donors, base, strict=True):
                    ok = not (ct == "NK" and d == donors[0] and tp == "acute")
                    score = b + shift + rng.normal(0, 0.02)
                    means.append((d, tp, ct, sig, 10 if ok else 3, score, f"{d}_{tp}", ok))
            for con in CONTRASTS:
                eff, q = PLANTED.get(
                    (con, ct, sig), (rng.normal(0, 0.02), 0.5 + 0.4 * rng.random())
                )
                shifts.append((con, ct, sig, "paired_t", len(donors), "", 0.0, eff, eff, eff / 0.1,
                               eff - 0.05, eff + 0.05, 3.0, q / 5, q, q / 3, "paired t", ""))  # fmt: skip
                enr.append((con, ct, sig, 20, rng.normal(0, 2), q, q))
    t["signature_means"] = pd.DataFrame(means, columns=list(MEANS_COLUMNS))
    t["signature_shifts"] = pd.DataFrame(
        shifts,
        columns=["contrast", "cell_type", "signature", "test", "n_donors", "donors_dropped", "mean_reference",
                 "mean_test", "effect", "dz", "ci_low", "ci_high", "statistic", "p_value", "q_value",
                 "p_wilcoxon", "method", "note"],
    )  # fmt: skip
    t["signature_enrichment"] = pd.DataFrame(
        enr,
        columns=["contrast", "cell_type", "signature", "n_genes", "score", "p_value", "q_value"],
    )
    comp = []
    for con in CONTRASTS:
        for ct in CELL_TYPES:
            q = 0.03 if (con, ct) == ("acute_vs_baseline", "NK") else 0.7
            comp.append((con, ct, len(donors), 0.2, 0.26 if q < 0.1 else 0.2, 0.4 if q < 0.1 else 0.01,
                         0.1, 0.7, q / 4, q))  # fmt: skip
    t["composition"] = pd.DataFrame(
        comp, columns=["contrast", "cell_type", "n_donors", "mean_prop_reference", "mean_prop_test",
                       "effect_clr", "ci_low", "ci_high", "p_value", "q_value"],
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
            q = np.minimum(1, p * len(p) / (pd.Series(p).rank().to_numpy()))
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
        t["covariate_associations"] = pd.DataFrame(
            [("age", ct, sig, len(donors), 3 * len(donors), 0.01, -0.01, 0.03, 0.2, 0.05 if ct == "NK" else 0.6,
              "mixed") for ct in CELL_TYPES for sig in SIGNATURES],
            columns=["covariate", "cell_type", "signature", "n_donors", "n_obs", "slope", "ci_low", "ci_high",
                     "p_value", "q_value", "method"],
        )  # fmt: skip
    return t


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
    }
    for name, fig in figs.items():
        assert isinstance(fig, Figure), name
        assert fig.axes, name
    # one line per donor (5) + the mean per composition panel
    assert len(figs["comp"].axes[0].lines) == 5 + 1
    # the planted significant panel is framed in red and its title carries the stars
    means_axes = {ax.get_title().split("\n")[0]: ax for ax in figs["means"].axes if ax.get_title()}
    mono = means_axes["CD14 monocyte"]
    assert "longterm q=0.004**" in mono.get_title()
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
    assert sorted(tx.get_text() for tx in heat_axes[1].texts) == ["*", "**"]
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
def test_key_findings_lists_the_significant_shifts_only(tmp_path):
    write_synthetic_run(tmp_path)
    tables = read_tables(tmp_path / "tables")
    assert set(tables.pseudobulk_de) == {(ct, c) for ct in CELL_TYPES[:3] for c in CONTRASTS}
    f = key_findings(tables, q_threshold=0.1, max_findings=10)
    assert set(f) == set(CONTRASTS)
    lt = f["longterm_vs_baseline"]
    assert [(x.cell_type, x.what) for x in lt["signature"]] == [
        ("CD14 monocyte", "tbk1_sting"),
        ("CD8 memory T", "ifn_type1"),
    ]
    first = lt["signature"][0]
    assert first.direction == "down"
    assert "q = 0.004" in first.text and "5 donors" in first.text and "-0.21" in first.text
    assert lt["n_tests"]["signature"] == len(CELL_TYPES) * len(SIGNATURES)
    assert lt["n_significant"]["signature"] == 2
    ac = f["acute_vs_baseline"]
    assert [x.cell_type for x in ac["composition"]] == ["NK"] and ac["composition"][
        0
    ].direction == "up"
    assert [x.cell_type for x in ac["signature"]] == ["CD14 monocyte"]
    assert any(x.cell_type == "CD14 monocyte" for x in lt["de"])
    # a stricter threshold drops the q = 0.06 shift; max_findings caps the list
    strict = key_findings(tables, q_threshold=0.05, max_findings=10)
    assert len(strict["longterm_vs_baseline"]["signature"]) == 1
    capped = key_findings(tables, q_threshold=0.1, max_findings=1)
    assert len(capped["longterm_vs_baseline"]["signature"]) == 1
    assert capped["longterm_vs_baseline"]["n_significant"]["signature"] == 2


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
                *(f"signature_means_{s}" for s in SIGNATURES)}  # fmt: skip
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
    assert "NK proportion up" in top
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


def test_missing_optional_tables_are_stated(tmp_path):
    adata, prov = write_synthetic_run(tmp_path, covariates=False)
    (tmp_path / "tables" / "signature_enrichment.tsv").unlink()
    cfg = load_config(None, {"report": {"figure_format": "svg", "dpi": 60}})
    rep = build_report(adata, read_tables(tmp_path / "tables"), prov, cfg)
    assert "No covariate associations: no covariate was given" in rep.html
    assert "tables/signature_enrichment.tsv is absent" in rep.html
    assert "covariate_associations.svg" not in rep.figures
    # svg: inline vectors, no <img>
    assert rep.figures and all(n.endswith(".svg") for n in rep.figures)
    assert "<img" not in rep.html and rep.html.count("<svg") >= len(rep.figures)


def test_partial_run_without_score_and_differential(tmp_path):
    adata, prov = write_synthetic_run(tmp_path, only=UPSTREAM_TABLES)
    for k in [c for c in adata.obs.columns if c.startswith("score_")]:
        del adata.obs[k]
    rep = build_report(
        adata, read_tables(tmp_path / "tables"), prov, load_config(None, {"report": {"dpi": 60}})
    )
    assert "No differential results in this run" in rep.html
    assert "tables/signature_shifts.tsv is absent" in rep.html
    assert "No pseudobulk DE tables" in rep.html
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
    assert info["figures"] == files and info["n_findings"]["signature"] == 3
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
