"""The immuneage demo analysis as a plain, hand-written scanpy + scvi-tools script.

This is the baseline of ``bench_end_to_end.py`` (issue 10, benchmark 1): what a
user would write by hand with the same libraries and the SAME parameters as
``immuneage demo``. The parameters are read from
:func:`pipeline.config.demo_config` and the gene sets from
:func:`pipeline.genesets.builtin_sets` (and the marker panel YAML shipped in
``pipeline/markers/data/pbmc.yaml``) so they cannot drift; no other immuneage
code takes part in the computation.

Steps (each timed; the last stdout line is a JSON record of the step times):

1. ``read``: each sample with anndata/scanpy readers (h5ad: ``layers["counts"]``
   or ``X``; 10x h5: ``sc.read_10x_h5``; 10x matrix dir: ``sc.read_10x_mtx``).
2. ``qc``: per sample, ``sc.pp.calculate_qc_metrics`` (mt/ribo/hb), adaptive
   MAD thresholds (median +/- nmads MADs of log counts and log genes, median +
   nmads MADs of % mt, combined with the fixed bounds), ``sc.pp.scrublet`` on
   the passing cells (samples with >= min_cells_for_doublets of them), filter.
3. ``concat``: ``anndata.concat`` (inner join of genes).
4. ``preprocess``: ``sc.pp.filter_genes``, ``normalize_total`` + ``log1p``,
   seurat_v3 HVGs (batch = sample; LOESS span 0.5 if the configured span is
   singular, as small demo samples can be), ARPACK PCA on the HVGs.
5. ``scvi``: ``scvi.model.SCVI`` on the HVG counts, batch = sample, same
   latent/hidden/layers/likelihood/epochs/batch size/lr/KL warm-up.
6. ``cluster``: ``sc.pp.neighbors`` on ``X_scVI``, Leiden per resolution
   (igraph, 2 iterations), UMAP.
7. ``annotate``: ``sc.tl.score_genes`` per cell type of the marker panel
   (positive minus negative markers), best type per cell, Leiden-cluster
   majority vote.
8. ``score``: ``sc.tl.score_genes`` per configured built-in gene set.
9. ``differential``: donor x timepoint x cell-type mean scores, paired t-tests
   (scipy) + BH (statsmodels) per contrast; pseudobulk sums + PyDESeq2
   (``~ donor + timepoint``) per cell type and contrast; CLR composition and
   naive/memory log-ratio paired t-tests.
10. ``write``: result tables as TSV and the final ``.h5ad``.

What it does not do (the pipeline does): input validation, stamps/resume,
provenance, integration metrics (iLISI/ASW), marker/gene-set coverage tables,
HGNC alias matching, per-cell confidence / ``unassigned``, ULM enrichment of
the DE results, dropped-row bookkeeping, figures and the HTML report.

Usage::

    python benchmarks/plain_pipeline.py --samplesheet COHORT/samplesheet.csv --outdir OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS: dict[str, float] = {}


@contextmanager
def step(name: str, quiet: bool = False):
    t0 = time.perf_counter()
    yield
    STEPS[name] = round(STEPS.get(name, 0.0) + time.perf_counter() - t0, 3)
    if not quiet:
        print(f"plain: {name} {STEPS[name]:.1f} s", file=sys.stderr, flush=True)


def outside(x, k: float, lo: bool = True, hi: bool = True):
    """Cells outside median +/- k MADs (unscaled MAD, as scipy computes it)."""
    import numpy as np
    from scipy import stats

    med, mad = np.median(x), stats.median_abs_deviation(x)
    return ((x < med - k * mad) & lo) | ((x > med + k * mad) & hi)


def knn_transformer(n_obs: int, n_neighbors: int, seed: int):
    """scanpy's default pynndescent kNN (same parameters), returning a ``csr_matrix``.

    With the installed pynndescent, scanpy 1.11's own call fails from 4,096
    cells on (``'csr_array' object has no attribute 'getnnz'``); this is the
    usual user-side workaround (immuneage applies the same one). Below 4,096
    cells scanpy computes exact neighbours itself (None).
    """
    if n_obs < 4096:
        return None
    import numpy as np
    import scanpy as sc
    import scipy.sparse as sp
    from pynndescent import PyNNDescentTransformer

    class CSRTransformer(PyNNDescentTransformer):
        def fit_transform(self, X, y=None, **kw):
            return sp.csr_matrix(super().fit_transform(X, y, **kw))

    return CSRTransformer(
        n_neighbors=n_neighbors,
        metric="euclidean",
        random_state=seed,
        n_jobs=sc.settings.n_jobs,
        n_trees=min(64, 5 + round(n_obs**0.5 / 20.0)),
        n_iters=max(5, round(np.log2(n_obs))),
    )


def read_sample(path: Path):
    import anndata as ad
    import scanpy as sc

    if path.suffix == ".h5ad":
        a = ad.read_h5ad(path)
        if "counts" in a.layers:
            a.X = a.layers["counts"]
        a.layers.clear()
    elif path.suffix == ".h5":
        a = sc.read_10x_h5(path)
    else:
        a = sc.read_10x_mtx(path, var_names="gene_symbols", cache=False)
    a.var_names_make_unique()
    return a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samplesheet", type=Path, required=True)
    ap.add_argument("--outdir", type=Path, required=True)
    ap.add_argument("--max-epochs", type=int, default=None, help="override (debugging only)")
    args = ap.parse_args()
    t_start = time.perf_counter()

    import anndata as ad
    import numpy as np
    import pandas as pd
    import scanpy as sc
    import scipy.sparse as sp
    import scvi
    import yaml
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats
    from scipy import stats
    from statsmodels.stats.multitest import multipletests

    # only the parameters and data paths come from immuneage
    from pipeline.config import demo_config
    from pipeline.genesets import builtin_sets

    cfg = demo_config()
    if args.max_epochs is not None:
        cfg.integrate.max_epochs = args.max_epochs
    q, p, ic, c, d = cfg.qc, cfg.preprocess, cfg.integrate, cfg.cluster, cfg.differential
    seed = cfg.seed
    contrasts = [(str(x.test), str(x.reference)) for x in cfg.design.contrasts]
    genesets = {n: list(builtin_sets()[n].genes) for n in cfg.score.genesets}
    panel = yaml.safe_load((ROOT / "pipeline" / "markers" / "data" / "pbmc.yaml").read_text())
    out = args.outdir
    (out / "tables").mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    sc.settings.verbosity = 0
    t_imports = time.perf_counter() - t_start

    # ------------------------------------------------------------- read + QC per sample
    sheet = pd.read_csv(args.samplesheet)
    parts, n_read = [], 0
    for row in sheet.itertuples(index=False):
        with step("read", quiet=True):
            a = read_sample(args.samplesheet.parent / row.path)
            a.obs_names = [f"{row.sample}:{b}" for b in a.obs_names]
            n_read += a.n_obs
            for col in ("sample", "donor", "timepoint"):
                a.obs[col] = getattr(row, col)
        with step("qc", quiet=True):
            a.var["mt"] = a.var_names.str.startswith(q.mt_prefix)
            a.var["ribo"] = a.var_names.str.startswith(tuple(q.ribo_prefixes))
            a.var["hb"] = a.var_names.str.match(q.hb_pattern)
            sc.pp.calculate_qc_metrics(
                a, qc_vars=["mt", "ribo", "hb"], percent_top=None, log1p=True, inplace=True
            )
            o, k = a.obs, q.nmads

            bad = outside(o["log1p_total_counts"], k) | outside(o["log1p_n_genes_by_counts"], k)
            bad |= outside(o["pct_counts_mt"], k, lo=False)
            bad |= o["n_genes_by_counts"] < (q.min_genes or 0)
            bad |= o["pct_counts_mt"] > (q.max_pct_mt if q.max_pct_mt is not None else np.inf)
            a = a[~bad.to_numpy()].copy()
            if q.doublets == "scrublet" and a.n_obs >= q.min_cells_for_doublets:
                sc.pp.scrublet(
                    a,
                    expected_doublet_rate=q.expected_doublet_rate,
                    threshold=q.doublet_threshold,
                    n_prin_comps=min(30, a.n_obs - 2),
                    random_state=seed,
                )
                if q.remove_doublets:
                    a = a[~a.obs["predicted_doublet"].fillna(False).to_numpy(bool)].copy()
            parts.append(a)

    with step("concat"):
        adata = ad.concat(parts, join="inner", merge="same")
        del parts
        adata.obs["timepoint"] = pd.Categorical(
            adata.obs["timepoint"], categories=list(cfg.design.timepoints), ordered=True
        )
        for col in ("sample", "donor"):
            adata.obs[col] = adata.obs[col].astype("category")

    # ------------------------------------------------------------- preprocess
    with step("preprocess"):
        sc.pp.filter_genes(adata, min_cells=p.min_cells_per_gene)
        adata.layers["counts"] = adata.X.copy()
        sc.pp.normalize_total(adata, target_sum=p.target_sum)
        sc.pp.log1p(adata)
        hvg = dict(
            flavor="seurat_v3", layer="counts", n_top_genes=p.n_top_genes, batch_key=p.hvg_batch_key
        )
        try:
            sc.pp.highly_variable_genes(adata, span=p.hvg_span, **hvg)
        except ValueError:  # LOESS singular on small batches (the ci demo)
            sc.pp.highly_variable_genes(adata, span=0.5, **hvg)
        sc.pp.pca(
            adata,
            n_comps=p.n_comps,
            mask_var="highly_variable",
            svd_solver="arpack",
            random_state=seed,
        )

    # ------------------------------------------------------------- scVI
    with step("scvi"):
        scvi.settings.seed = seed
        hv = adata[:, adata.var["highly_variable"]].copy()
        scvi.model.SCVI.setup_anndata(hv, layer="counts", batch_key=ic.batch_key)
        model = scvi.model.SCVI(
            hv,
            n_latent=ic.n_latent,
            n_hidden=ic.n_hidden,
            n_layers=ic.n_layers,
            gene_likelihood=ic.gene_likelihood,
        )
        model.train(
            max_epochs=ic.max_epochs,
            accelerator="cpu",
            batch_size=ic.batch_size,
            early_stopping=ic.early_stopping,
            check_val_every_n_epoch=1,
            enable_progress_bar=False,
            plan_kwargs={
                "lr": ic.learning_rate,
                "n_epochs_kl_warmup": ic.kl_warmup_epochs or min(400, ic.max_epochs),
            },
        )
        adata.obsm["X_scVI"] = model.get_latent_representation(batch_size=1024)
        model.save(str(out / "scvi_model"), overwrite=True, save_anndata=False)
        del hv

    # ------------------------------------------------------------- cluster
    with step("cluster"):
        sc.pp.neighbors(
            adata,
            n_neighbors=c.n_neighbors,
            use_rep="X_scVI",
            random_state=seed,
            transformer=knn_transformer(adata.n_obs, c.n_neighbors, seed),
        )
        for r in c.resolutions:
            sc.tl.leiden(
                adata,
                resolution=r,
                key_added=f"leiden_{r}",
                flavor="igraph",
                n_iterations=2,
                directed=False,
                random_state=seed,
            )
        adata.obs["leiden"] = adata.obs[f"leiden_{c.resolution}"]
        sc.tl.umap(adata, min_dist=c.umap_min_dist, random_state=seed)

    # ------------------------------------------------------------- annotate
    with step("annotate"):
        genes = set(adata.var_names)
        scores, lineage = {}, {}
        for ct in panel["cell_types"]:
            pos = [m["gene"] for m in ct["positive"] if m["gene"] in genes]
            if not pos or len(pos) < panel["min_present_fraction"] * len(ct["positive"]):
                continue
            sc.tl.score_genes(adata, pos, score_name="_s", random_state=seed)
            s = adata.obs["_s"].to_numpy()
            neg = [m["gene"] for m in ct.get("negative", []) if m["gene"] in genes]
            if neg:
                sc.tl.score_genes(adata, neg, score_name="_s", random_state=seed)
                s = s - adata.obs["_s"].to_numpy()
            scores[ct["name"]] = s
            lineage[ct["name"]] = ct["lineage"]
        del adata.obs["_s"]
        best = pd.DataFrame(scores, index=adata.obs_names).idxmax(axis=1)
        vote = best.groupby(adata.obs["leiden"], observed=True).agg(
            lambda x: x.value_counts().index[0]
        )
        adata.obs["cell_type_cell"] = best.astype("category")
        adata.obs["cell_type"] = adata.obs["leiden"].map(vote).astype(str).astype("category")
        adata.obs["cell_type_coarse"] = adata.obs["cell_type"].map(lineage).astype("category")

    # ------------------------------------------------------------- score
    with step("score"):
        in_sets = {g for gs in genesets.values() for g in gs}
        # score.controls_exclude_signatures: controls drawn from the genes of no configured set
        pool = None
        if getattr(cfg.score, "controls_exclude_signatures", False):
            pool = [g for g in adata.var_names if g not in in_sets]
        for name, gs in genesets.items():
            sc.tl.score_genes(
                adata,
                [g for g in gs if g in genes],
                ctrl_size=cfg.score.ctrl_size,
                n_bins=cfg.score.n_bins,
                gene_pool=None if pool is None else pool + [g for g in gs if g in genes],
                score_name=f"score_{name}",
                random_state=seed,
            )

    # ------------------------------------------------------------- differential
    tables: dict[str, pd.DataFrame] = {}
    with step("differential"):
        obs = adata.obs
        by = ["donor", "timepoint", "cell_type"]
        cols = [f"score_{n}" for n in genesets]
        g = obs.groupby(by, observed=True)
        means = g[cols].mean().join(g.size().rename("n_cells")).reset_index()
        means = means[means["n_cells"] >= d.min_cells]
        tables["signature_means"] = means
        rows = []
        for test, ref in contrasts:
            for ct, sub in means.groupby("cell_type", observed=True):
                wide = sub.pivot(index="donor", columns="timepoint", values=cols)
                for col in cols:
                    have = test in wide[col] and ref in wide[col]
                    pair = wide[col][[ref, test]].dropna() if have else None
                    if pair is None or len(pair) < d.min_donors:
                        continue
                    diff = pair[test] - pair[ref]
                    t = stats.ttest_rel(pair[test], pair[ref])
                    rows.append(
                        dict(
                            contrast=f"{test} vs {ref}",
                            cell_type=ct,
                            signature=col.removeprefix("score_"),
                            n_donors=len(pair),
                            effect=diff.mean(),
                            dz=diff.mean() / diff.std(ddof=1),
                            statistic=t.statistic,
                            p_value=t.pvalue,
                        )
                    )
        shifts = pd.DataFrame(rows)
        shifts["q_value"] = np.nan
        for _, idx in shifts.groupby("contrast").groups.items():
            pv = shifts.loc[idx, "p_value"]
            ok = pv.notna()
            shifts.loc[pv[ok].index, "q_value"] = multipletests(pv[ok], method="fdr_bh")[1]
        tables["signature_shifts"] = shifts

        # pseudobulk: counts summed per donor x timepoint x cell type (indicator product)
        key = obs[by].astype(str).agg("|".join, axis=1)
        codes, groups = pd.factorize(key)
        ind = sp.csr_matrix(
            (np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(groups), len(codes))
        )
        pb = ind @ adata.layers["counts"]
        pbobs = pd.DataFrame([s.split("|") for s in groups], columns=by, index=groups)
        pbobs["n_cells"] = np.bincount(codes)
        for ct in sorted(pbobs["cell_type"].unique()):
            m = (
                (pbobs["cell_type"] == ct) & (pbobs["n_cells"] >= d.pseudobulk_min_cells)
            ).to_numpy()
            meta = pbobs[m]
            paired = meta.groupby("donor")["timepoint"].transform("size") >= 2
            m[np.flatnonzero(m)[~paired.to_numpy()]] = False
            meta = pbobs[m]
            counts = pb[np.flatnonzero(m)].toarray()
            keep = (counts >= d.gene_min_counts).sum(axis=0) >= d.gene_min_samples
            for ref in dict.fromkeys(r for _, r in contrasts):
                tests = [
                    t
                    for t, r in contrasts
                    if r == ref
                    and len(
                        set(meta.donor[meta.timepoint == t]) & set(meta.donor[meta.timepoint == r])
                    )
                    >= d.min_donors
                ]
                if not tests or keep.sum() < 2:
                    continue
                md = pd.DataFrame(
                    {
                        "donor": pd.Categorical(meta["donor"]),
                        "timepoint": pd.Categorical(
                            meta["timepoint"],
                            categories=[ref] + [x for x in cfg.design.timepoints if x != ref],
                        ),
                    },
                    index=meta.index,
                )
                cdf = pd.DataFrame(
                    counts[:, keep].round().astype(np.int64),
                    index=meta.index,
                    columns=adata.var_names[keep],
                )
                inference = DefaultInference(n_cpus=d.n_cpus)
                try:
                    dds = DeseqDataSet(
                        counts=cdf,
                        metadata=md,
                        design="~donor + timepoint",
                        n_cpus=d.n_cpus,
                        inference=inference,
                        quiet=True,
                    )
                    dds.deseq2()
                except Exception as exc:  # e.g. too few residual degrees of freedom
                    print(f"plain: DESeq2 {ct}: {exc}", file=sys.stderr)
                    continue
                for t in tests:
                    st = DeseqStats(
                        dds,
                        contrast=["timepoint", t, ref],
                        independent_filter=False,
                        inference=inference,
                        n_cpus=d.n_cpus,
                        quiet=True,
                    )
                    st.summary()
                    res = st.results_df
                    ok = res["pvalue"].notna()
                    res["padj"] = np.nan
                    res.loc[ok, "padj"] = multipletests(res.loc[ok, "pvalue"], method="fdr_bh")[1]
                    name = f"de_{ct}_{t}_vs_{ref}".replace(" ", "_").replace("/", "_")
                    tables[name] = res.reset_index(names="gene")

        # composition: CLR of per-sample counts, paired t per type and log-ratio
        comp = pd.crosstab([obs["donor"], obs["timepoint"]], obs["cell_type"]) + d.pseudocount
        comp = comp[comp.sum(axis=1) > comp.shape[1] * d.pseudocount]
        logc = np.log(comp)
        values = logc.sub(logc.mean(axis=1), axis=0)
        for name, spec in d.log_ratios.items():
            num = [x for x in spec["numerator"] if x in comp]
            den = [x for x in spec["denominator"] if x in comp]
            if num and den:
                values[name] = np.log(comp[num].sum(axis=1) / comp[den].sum(axis=1))
        rows = []
        for test, ref in contrasts:
            a_ = values.xs(ref, level="timepoint")
            b_ = values.xs(test, level="timepoint")
            both = a_.index.intersection(b_.index)
            for col in values.columns:
                tt = stats.ttest_rel(b_.loc[both, col], a_.loc[both, col])
                rows.append(
                    dict(
                        contrast=f"{test} vs {ref}",
                        cell_type=col,
                        n_donors=len(both),
                        effect=(b_.loc[both, col] - a_.loc[both, col]).mean(),
                        statistic=tt.statistic,
                        p_value=tt.pvalue,
                    )
                )
        compt = pd.DataFrame(rows)
        compt["q_value"] = np.nan
        for _, idx in compt.groupby("contrast").groups.items():
            pv = compt.loc[idx, "p_value"]
            ok = pv.notna()
            compt.loc[pv[ok].index, "q_value"] = multipletests(pv[ok], method="fdr_bh")[1]
        tables["composition"] = compt

    # ------------------------------------------------------------- write
    with step("write"):
        for name, tab in tables.items():
            tab.to_csv(out / "tables" / f"{name}.tsv", sep="\t", index=False)
        adata.write_h5ad(out / "plain.h5ad", compression="gzip")

    rec = {
        "n_cells_read": n_read,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_tables": len(tables),
        "n_de_tables": sum(k.startswith("de_") for k in tables),
        "imports_s": round(t_imports, 3),
        "steps_s": STEPS,
        "total_s": round(time.perf_counter() - t_start, 3),
    }
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
