"""Tests of the synthetic demo cohort (pipeline.datasets)."""

from __future__ import annotations

import filecmp
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipeline import keys
from pipeline.datasets import SIZES, DemoCohort, demo_cohort
from pipeline.datasets._resources import load_cell_types, load_genes, load_programmes
from pipeline.errors import InputError

sc = pytest.importorskip("scanpy")

BARCODE = re.compile(r"^[ACGT]{16}-1$")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoCohort:
    return demo_cohort(tmp_path_factory.mktemp("demo") / "ci", size="ci", seed=0)


@pytest.fixture(scope="module")
def sheet(demo: DemoCohort) -> pd.DataFrame:
    return pd.read_csv(demo.samplesheet)


@pytest.fixture(scope="module")
def truth(demo: DemoCohort) -> dict:
    return json.loads(demo.truth.read_text())


def _read(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.suffix == ".h5ad":
            return sc.read_h5ad(path)
        if path.suffix == ".h5":
            return sc.read_10x_h5(path)
        return sc.read_10x_mtx(path)


@pytest.fixture(scope="module")
def cells(demo: DemoCohort, sheet: pd.DataFrame):
    """All samples read back with scanpy: (log-normalised CSR, per-cell obs, symbols)."""
    mats, obs = [], []
    for row in sheet.itertuples():
        a = _read(demo.outdir / row.path)
        mats.append(sp.csr_matrix(a.X))
        obs.append(pd.DataFrame({"sample": row.sample, "barcode": a.obs_names}))
    counts = sp.vstack(mats, format="csr")
    obs = pd.concat(obs, ignore_index=True)
    labels = pd.read_csv(demo.truth_cells, sep="\t")
    obs = obs.merge(labels, on=["sample", "barcode"], how="left", validate="one_to_one")
    obs = obs.join(sheet.set_index("sample")[["donor", "timepoint"]], on="sample")
    lib = np.asarray(counts.sum(axis=1)).ravel()
    lognorm = sp.diags(1e4 / lib) @ counts
    lognorm.data = np.log1p(lognorm.data)
    return sp.csr_matrix(lognorm), obs, list(a.var_names), counts


def _score(cells, cell_type: str, genes: list[str]) -> pd.DataFrame:
    """Donor x timepoint mean (over clean cells) of the mean log-normalised expression of genes."""
    x, obs, symbols, _ = cells
    gi = [symbols.index(g) for g in genes]
    keep = (obs["cell_type"] == cell_type) & ~obs["is_doublet"] & ~obs["is_low_quality"]
    per_cell = np.asarray(x[np.flatnonzero(keep.to_numpy())][:, gi].mean(axis=1)).ravel()
    df = obs.loc[keep, ["donor", "timepoint"]].assign(score=per_cell)
    return df.groupby(["donor", "timepoint"])["score"].mean().unstack()


def test_layout(demo: DemoCohort, sheet: pd.DataFrame, truth: dict) -> None:
    assert list(sheet.columns) == ["sample", "donor", "timepoint", "path", "age", "batch"]
    assert len(sheet) == 39
    assert sorted(sheet["donor"].unique()) == [f"D{i:02d}" for i in range(1, 14)]
    assert set(sheet["timepoint"]) == {"baseline", "acute", "longterm"}
    assert (sheet["sample"] == sheet["donor"] + "_" + sheet["timepoint"]).all()
    assert sheet.groupby("donor")["batch"].nunique().eq(1).all()
    assert sheet.groupby("donor")["age"].nunique().eq(1).all()
    kinds = set()
    for rel in sheet["path"]:
        assert not Path(rel).is_absolute()
        p = demo.samplesheet.parent / rel
        assert p.exists(), rel
        if p.is_dir():
            kinds.add("legacy" if (p / "genes.tsv").exists() else "mtx")
            if (p / "features.tsv.gz").exists():
                assert (p / "matrix.mtx.gz").exists() and (p / "barcodes.tsv.gz").exists()
        else:
            kinds.add(p.suffix)
    assert kinds == {".h5ad", ".h5", "mtx", "legacy"}
    # formats are balanced over timepoints, never confounded with them
    fmt = pd.DataFrame(truth["samples"]).groupby("timepoint")["format"].nunique()
    assert (fmt >= 3).all()
    assert demo.truth_cells.exists() and demo.covariates.exists()
    assert SIZES["ci"] == demo.n_cells == truth["n_cells"]
    assert 2_500 <= demo.n_cells <= 4_000


def test_files_read_back_with_scanpy(demo: DemoCohort, sheet: pd.DataFrame, truth: dict) -> None:
    genes = load_genes()
    n_by_sample = {s["sample"]: s["n_cells"] for s in truth["samples"]}
    for row in sheet.itertuples():
        a = _read(demo.outdir / row.path)
        assert a.n_obs == n_by_sample[row.sample]
        assert list(a.var_names) == genes["symbol"].tolist()
        assert a.var[keys.GENE_IDS].tolist() == genes["gene_id"].tolist()
        x = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
        assert np.all(x >= 0) and np.array_equal(x, np.rint(x))
        assert x.sum() > 0
        assert all(BARCODE.match(b) for b in a.obs_names)
        assert a.obs_names.is_unique
        if row.path.endswith(".h5ad"):
            c = a.layers[keys.COUNTS]
            assert (c != a.X).nnz == 0
            # no per-cell truth leaks into the counts files
            assert a.obs.shape[1] == 0


def test_truth_json(truth: dict) -> None:
    symbols = set(load_genes()["symbol"])
    cts = [ct.name for ct in load_cell_types()]
    assert len(cts) >= 11 and truth["cell_types"] == cts
    assert truth["seed"] == 0 and truth["size"] == "ci"
    for prog in truth["programmes"].values():
        assert set(prog["genes"]) <= symbols and prog["source"]
    for markers in truth["markers"].values():
        assert set(markers) <= symbols
    planted = {(e["contrast"], e["cell_type"], e["programme"]) for e in truth["planted_effects"]}
    assert ("longterm_vs_baseline", "CD14 monocyte", "ifn_type1") in planted
    assert ("longterm_vs_baseline", "CD8 memory T", "tbk1_sting") in planted
    assert ("acute_vs_baseline", "CD16 monocyte", "nfkb_inflammation") in planted
    for e in truth["planted_effects"]:
        assert e["direction"] == ("up" if e["log2fc"] > 0 else "down")
        assert 0.8 <= abs(e["log2fc"]) <= 1.0
    comp = {(e["contrast"], e["cell_type"]) for e in truth["composition_effects"]}
    assert {("acute_vs_baseline", "NK"), ("acute_vs_baseline", "CD8 memory T")} <= comp
    neg = set(truth["negative_control_cell_types"])
    assert neg and not neg & {ct for _, ct, _ in planted}
    status = {
        (e["contrast"], e["cell_type"], e["programme"]): e["status"]
        for e in truth["programme_effects"]
    }
    assert all(status[k] == "planted" for k in planted)
    assert all(v == "null" for (_, ct, _), v in status.items() if ct in neg)
    # 'state': only the transient state's type and timepoint, where its genes may be controls
    st = truth["transient_state"]
    state_pairs = {(c, ct) for (c, ct, _), v in status.items() if v == "state"}
    assert state_pairs == {(f"{st['timepoint']}_vs_baseline", st["cell_type"])}
    assert abs(sum(truth["base_proportions"].values()) - 1) < 1e-4
    assert sum(s["n_cells"] for s in truth["samples"]) == truth["n_cells"]


def test_truth_cells(cells, truth: dict) -> None:
    _, obs, symbols, counts = cells
    assert obs["cell_type"].notna().all()
    assert set(obs["cell_type"]) <= set(truth["cell_types"])
    assert 0.03 <= obs["is_doublet"].mean() <= 0.07
    assert 0.02 <= obs["is_low_quality"].mean() <= 0.06
    assert not (obs["is_doublet"] & obs["is_low_quality"]).any()
    dbl = obs["is_doublet"].to_numpy()
    partner = obs["partner_cell_type"].fillna("")
    assert (partner[dbl] != obs["cell_type"][dbl]).all() and (partner[~dbl] == "").all()
    lib = np.asarray(counts.sum(axis=1)).ravel()
    ngenes = np.diff(counts.indptr)
    mt = [i for i, s in enumerate(symbols) if s.startswith("MT-")]
    pct_mt = 100 * np.asarray(counts[:, mt].sum(axis=1)).ravel() / lib
    lq = obs["is_low_quality"].to_numpy()
    clean = ~lq & ~dbl
    assert np.median(pct_mt[lq]) > 15 > np.median(pct_mt[clean]) > 1
    assert np.median(ngenes[lq]) < 0.6 * np.median(ngenes[clean])
    assert np.median(lib[dbl]) > 1.5 * np.median(lib[clean])


def test_markers_distinguish_types(cells, truth: dict) -> None:
    x, obs, symbols, _ = cells
    clean = ~obs["is_doublet"] & ~obs["is_low_quality"]
    means = {}
    for ct in truth["cell_types"]:
        rows = np.flatnonzero((clean & (obs["cell_type"] == ct)).to_numpy())
        means[ct] = np.asarray(x[rows].mean(axis=0)).ravel()
    for ct, markers in truth["markers"].items():
        gi = [symbols.index(g) for g in markers]
        set_mean = {other: m[gi].mean() for other, m in means.items()}
        assert max(set_mean, key=set_mean.get) == ct, (ct, set_mean)


def test_planted_effects_visible_in_raw_data(cells, truth: dict) -> None:
    progs = truth["programmes"]
    for ct in ("CD14 monocyte", "CD8 memory T"):
        for prog in ("ifn_type1", "tbk1_sting"):
            s = _score(cells, ct, progs[prog]["genes"])
            d = (s["longterm"] - s["baseline"]).dropna()
            assert (d < 0).mean() >= 0.75 and d.median() < -0.15, (ct, prog, d)
    for ct in ("CD14 monocyte", "CD16 monocyte"):
        s = _score(cells, ct, progs["nfkb_inflammation"]["genes"])
        d = (s["acute"] - s["baseline"]).dropna()
        assert (d > 0).mean() >= 0.75 and d.median() > 0.3, (ct, d)
    # negative controls (abundant types, so the ci size has cells enough): no consistent
    # shift. The bound is the median's own sampling error (a normal median's standard
    # error is 1.2533 sd / sqrt(n)) times 4: a handful of cells per donor at the ci size
    # makes a fixed bound fail by chance (seen once in 80 checks over five seeds).
    for ct in ("CD4 naive T", "CD4 memory T"):
        for prog in ("ifn_type1", "tbk1_sting", "nfkb_inflammation"):
            s = _score(cells, ct, progs[prog]["genes"])
            for tp in ("acute", "longterm"):
                d = (s[tp] - s["baseline"]).dropna()
                bound = 4 * 1.2533 * d.std() / np.sqrt(len(d))
                assert 0.15 <= (d < 0).mean() <= 0.85, (ct, prog, tp, d)
                assert abs(d.median()) < bound, (ct, prog, tp, d, bound)


def test_composition_effects_visible(cells) -> None:
    _, obs, _, _ = cells
    clean = obs[~obs["is_doublet"]]
    frac = clean.groupby(["donor", "timepoint"])["cell_type"].value_counts(normalize=True)
    frac = frac.unstack(fill_value=0.0)
    mobilised = (frac["NK"] + frac["CD8 memory T"]).unstack()
    assert ((mobilised["acute"] - mobilised["baseline"]) > 0).sum() >= 10
    naive = (frac["CD4 naive T"] + frac["CD8 naive T"]).unstack()
    assert (naive["longterm"] - naive["baseline"]).median() > 0


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC: P(a pos value > a neg value), ties counted half."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(pos, neg).statistic) / (pos.size * neg.size)


def test_transient_state_only_at_its_timepoint(cells, truth: dict) -> None:
    """The planted one-timepoint state: labelled only there, and only its cells express it."""
    from pipeline.markers import load_marker_panel

    st = truth["transient_state"]
    _, obs, symbols, counts = cells
    state = obs["state"].fillna("").to_numpy() != ""
    assert set(obs.loc[state, "state"]) == {st["key"]}
    assert set(obs.loc[state, "timepoint"]) == {st["timepoint"]}
    assert set(obs.loc[state, "cell_type"]) == {st["cell_type"]}
    assert int(state.sum()) == st["n_cells"] > 0
    assert sum(s["n_transient_state"] for s in truth["samples"]) == st["n_cells"]
    # its share of the type at the timepoint is the planted probability (4 binomial sd)
    at = ((obs["cell_type"] == st["cell_type"]) & (obs["timepoint"] == st["timepoint"])).to_numpy()
    n, f = int(at.sum()), st["share_of_type"]
    assert abs(state.sum() - n * f) <= 4 * np.sqrt(n * f * (1 - f)), (int(state.sum()), n, f)
    # a state within its type: its own genes are no panel marker, none of its genes
    # (own or shifted granzymes) is in a gene set, so no planted programme truth moves
    assert not set(st["genes"]) & set(load_marker_panel().genes())
    in_sets = {g for p in truth["programmes"].values() for g in p["genes"]}
    assert not (set(st["genes"]) | set(st["shifted_log2fc_in_state"])) & in_sets
    # in the counts: the state's own genes per 10k UMIs, singlet good-quality cells of the type
    clean = ~(obs["is_doublet"] | obs["is_low_quality"]).to_numpy()
    typ = clean & (obs["cell_type"] == st["cell_type"]).to_numpy()
    lib = np.asarray(counts.sum(axis=1)).ravel()
    gi = [symbols.index(g) for g in st["genes"]]
    score = 1e4 * np.asarray(counts[:, gi].sum(axis=1)).ravel() / lib
    other_tp = typ & ~at
    rest_at = typ & at & ~state
    assert (typ & state).sum() >= 10 and other_tp.sum() >= 10 and rest_at.sum() >= 10
    # state cells stand out from the type at the other timepoints ...
    assert _auc(score[typ & state], score[other_tp]) > 0.95
    # ... while the unlabelled cells of the type at the state's timepoint do not
    # (|AUC - 1/2| within 4 null sd of the Mann-Whitney statistic)
    n1, n2 = int(rest_at.sum()), int(other_tp.sum())
    null_sd = np.sqrt((n1 + n2 + 1) / (12 * n1 * n2))
    assert abs(_auc(score[rest_at], score[other_tp]) - 0.5) < 4 * null_sd


def test_transient_state_off_changes_only_its_cells() -> None:
    """Without the state every cell but the state's has the same counts (separate streams)."""
    from pipeline.datasets import _simulate as sim
    from pipeline.datasets.demo import _transient_truth

    on = sim.build_cohort(0, 800)
    off = sim.build_cohort(0, 800, transient_state=False)
    assert off.transient_state is None and _transient_truth(off, []) is None
    n_state = 0
    for spec in on.samples:
        a, b = sim.simulate_sample(on, spec.index), sim.simulate_sample(off, spec.index)
        assert not b.in_state.any()
        assert (spec.timepoint == on.transient_state.timepoint) or not a.in_state.any()
        assert np.array_equal(a.barcodes, b.barcodes)
        assert np.array_equal(a.cell_type, b.cell_type)
        s = a.in_state
        assert (a.counts[~s] != b.counts[~s]).nnz == 0, spec.sample
        assert (np.asarray((a.counts[s] != b.counts[s]).sum(axis=1)).ravel() > 0).all()
        n_state += int(s.sum())
    assert n_state > 0


def test_deterministic(demo: DemoCohort, tmp_path: Path) -> None:
    again = demo_cohort(tmp_path / "again", size="ci", seed=0)
    cmp = filecmp.dircmp(demo.outdir, again.outdir)

    def same(c: filecmp.dircmp) -> bool:
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        ok = not (c.left_only or c.right_only or mismatch or errors)
        return ok and all(same(sub) for sub in c.subdirs.values())

    assert same(cmp)


def test_seed_changes_counts(tmp_path: Path) -> None:
    a = demo_cohort(tmp_path / "a", size="ci", seed=0, n_cells=800)
    b = demo_cohort(tmp_path / "b", size="ci", seed=1, n_cells=800)
    sa = pd.read_csv(a.samplesheet)
    xa = _read(a.outdir / sa["path"][0]).X
    xb = _read(b.outdir / pd.read_csv(b.samplesheet)["path"][0]).X
    assert xa.shape != xb.shape or (sp.csr_matrix(xa) != sp.csr_matrix(xb)).nnz > 0
    assert a.n_cells == b.n_cells == 800


def test_outdir_rules(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"notes\.txt"):
        demo_cohort(foreign, size="ci", n_cells=800)
    assert (foreign / "notes.txt").read_text() == "mine"
    # a previous demo is replaced
    out = tmp_path / "demo"
    demo_cohort(out, size="ci", n_cells=800)
    second = demo_cohort(out, size="ci", n_cells=900)
    assert len(pd.read_csv(second.samplesheet)) == 39
    assert json.loads(second.truth.read_text())["n_cells"] == 900


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"size": "huge"}, "size"), ({"n_cells": 10}, "n_cells"), ({"n_cells": 2_000_000}, "n_cells")],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        demo_cohort(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_gene_table() -> None:
    genes = load_genes()
    assert list(genes.columns) == ["gene_id", "symbol", "role"]
    assert 2_500 <= len(genes) <= 3_500
    assert genes["symbol"].is_unique and genes["gene_id"].is_unique
    assert genes["gene_id"].str.fullmatch(r"ENSG\d{11}").all()
    assert not genes["symbol"].str.contains(r"\.|-AS|^LINC|^MIR|^SNOR|^ENSG|^RNU").any()
    assert (genes["role"] == "mito").sum() == 13
    assert genes.loc[genes["role"] == "mito", "symbol"].str.startswith("MT-").all()
    symbols = set(genes["symbol"])
    must = {"ACTB", "GAPDH", "B2M", "MALAT1", "TMSB4X", "HBB", "HBA1", "HBA2", "HLA-A", "HLA-DRA"}
    assert must <= symbols
    assert sum(s.startswith(("RPL", "RPS")) for s in symbols) >= 70
    assert not symbols & {"TMEM173", "MB21D1", "DDX58"}  # old aliases are not GENCODE v44 names
    progs = load_programmes()
    for section in ("programmes", "reference_sets"):
        for name, p in progs[section].items():
            assert set(p["genes"]) <= symbols, name
            assert len(set(p["genes"])) == len(p["genes"]), name
            assert p["source"].strip(), name
    assert len(progs["programmes"]["senescence"]["genes"]) >= 120  # SenMayo (124 of 125 kept)
    for ct in load_cell_types():
        assert set(ct.markers) | set(ct.also_expressed) <= symbols, ct.name
        assert ct.source
