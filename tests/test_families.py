"""FDR families of the signature shifts (primary / exploratory / control, BH across all
contrasts), any pairwise contrast end to end, the few-donors warning and the checks of
``differential.primary`` before compute.

The calibration simulates donor-level means directly (donor effects, sample effects,
unequal cells per sample: the noise of a mean shrinks with its cell count), with the
default ``differential.primary`` over lineage-named cell types and the default gene sets.
"""

from __future__ import annotations

import json
import shutil
import warnings
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import write_cohort
from scipy import stats
from statsmodels.stats.multitest import multipletests

from pipeline.config import DifferentialConfig, load_config
from pipeline.errors import ImmuneageWarning, InputError
from pipeline.markers import SHIPPED_PANEL
from pipeline.preflight import validate_inputs
from pipeline.stages.differential import run_differential
from pipeline.stages.differential._common import pair_families
from pipeline.stages.differential.design import check_config, design_warnings
from pipeline.stats.multitest import bh_adjust, bh_by_family

LINEAGES = ("T_CD4", "T_CD8", "T_other", "NK", "B", "plasma", "mono", "DC", "platelet")
SIGS = (
    "tbk1_sting",
    "ifn_type1",
    "nfkb_inflammation",
    "senescence",
    "senescence_core",
    "sasp",
    "t_exhaustion",
    "t_naive",
    "il6_stat3",
)
DEFAULT_PRIMARY = DifferentialConfig().primary
Q = 0.1


# --------------------------------------------------------------------------- helpers
def test_bh_by_family_equals_statsmodels_within_each_family() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(size=60) ** 2
    p[[3, 17]] = np.nan
    fam = rng.choice(["primary", "exploratory", "control"], size=60)
    q = bh_by_family(p, fam)
    for f in ("primary", "exploratory", "control"):
        m = (fam == f) & np.isfinite(p)
        np.testing.assert_allclose(q[m], multipletests(p[m], method="fdr_bh")[1], rtol=1e-12)
    assert np.isnan(q[[3, 17]]).all()
    np.testing.assert_allclose(bh_by_family(p, np.zeros(60)), bh_adjust(p), rtol=1e-12)


def test_pair_families_rules() -> None:
    pairs = pd.DataFrame(
        {
            "cell_type": ["CD14 monocyte", "CD14 monocyte", "CD14 monocyte", "X", "CD4 naive T"],
            "lineage": ["mono", "mono", "mono", "", "T_CD4"],
            "signature": ["sasp", "t_naive", "ieg_dissociation", "sasp", "t_naive"],
        }
    )
    roles = {"ieg_dissociation": "control", "sasp": "programme"}
    fam = pair_families(pairs, DEFAULT_PRIMARY, roles)
    assert list(fam) == ["primary", "exploratory", "control", "exploratory", "primary"]
    # a cell type name works as a key too; null: one family (controls stay apart)
    assert pair_families(pairs, {"X": ["sasp"]}, roles)[3] == "primary"
    assert list(pair_families(pairs, None, roles)) == ["all", "all", "control", "all", "all"]
    # without a lineage column only cell type names match
    assert set(pair_families(pairs.drop(columns="lineage"), DEFAULT_PRIMARY)) == {"exploratory"}


# --------------------------------------------------------------------------- calibration
def _donor_means(
    rng: np.random.Generator, reps: int, *, n_donors: int = 6, planted=None
) -> np.ndarray:
    """(reps, donors, 3 timepoints, lineages, signatures) donor-level means.

    Donor effect (sd 1, per type and signature), sample effect (sd 0.3) and the
    noise of a mean of m cells (sd 1 / sqrt(m)), m from 3 to 300 per sample and type
    (unequal sizes, rare types); ``planted`` (timepoint, type, signature) -> shift.
    """
    shape = (reps, n_donors, 3, len(LINEAGES), len(SIGS))
    cells = rng.integers(3, 300, size=shape[:4])[..., None]
    y = rng.normal(0, 1.0, (reps, n_donors, 1, *shape[3:]))
    y = y + rng.normal(0, 0.3, shape) + rng.normal(0, 1.0, shape) / np.sqrt(cells)
    for (tp, ct, sig), shift in (planted or {}).items():
        y[:, :, tp, ct, sig] += shift
    return y


def _pvalues(y: np.ndarray) -> np.ndarray:
    """Paired t p-values (reps, 2 contrasts, types, signatures): acute and longterm vs baseline."""
    return np.stack([stats.ttest_rel(y[:, :, t], y[:, :, 0], axis=1).pvalue for t in (1, 2)], 1)


def _families(primary) -> np.ndarray:
    pairs = pd.DataFrame(
        [(ct, ct, s) for ct in LINEAGES for s in SIGS],
        columns=["cell_type", "lineage", "signature"],
    )
    return pair_families(pairs, primary).reshape(len(LINEAGES), len(SIGS))


def _q_new(p: np.ndarray, fam: np.ndarray) -> np.ndarray:
    """The new rule: BH over each family's rows of both contrasts."""
    labels = np.broadcast_to(fam, p.shape[1:]).ravel()
    return np.stack([bh_by_family(r.ravel(), labels).reshape(p.shape[1:]) for r in p])


def _q_old(p: np.ndarray) -> np.ndarray:
    """The old rule: BH over all pairs within each contrast separately."""
    return np.stack([np.stack([bh_adjust(c.ravel()).reshape(c.shape) for c in r]) for r in p])


def _bound(rate: float, reps: int) -> float:
    return rate + 3.5 * np.sqrt(rate * (1 - rate) / reps)


def test_family_q_controls_the_fdr_across_contrasts_under_a_global_null() -> None:
    """Global null: the FDR of a family is the chance of any call in it. With families over
    both contrasts it stays <= 0.1; BH within each contrast separately (the old rule) lets
    a reader of both contrasts see a false call in ~1 run of 6 (so this check can fail)."""
    reps = 1000
    p = _pvalues(_donor_means(np.random.default_rng(7), reps))
    fam = _families(DEFAULT_PRIMARY)
    assert {"primary", "exploratory"} == set(fam.ravel())
    q = _q_new(p, fam)
    for f in ("primary", "exploratory"):
        anycall = (q[:, :, fam == f] < Q).any(axis=(1, 2))
        assert anycall.mean() <= _bound(Q, reps), (f, anycall.mean())
    one = _q_new(p, _families(None))  # primary: null -> one family "all"
    new_any = (one < Q).any(axis=(1, 2, 3)).mean()
    old_any = (_q_old(p) < Q).any(axis=(1, 2, 3)).mean()
    assert new_any <= _bound(Q, reps), new_any
    assert old_any > _bound(Q, reps), old_any


def test_family_q_fdr_and_power_with_planted_primary_effects() -> None:
    """Six primary pairs change at acute (0.8 sd of the donor differences' scale); the
    primary family's FDR stays <= 0.1, and its calls find more of them than BH over all
    pairs of the contrast (the old rule), at the same nominal level."""
    reps = 400
    fam = _families(DEFAULT_PRIMARY)
    prim = np.argwhere(fam == "primary")[:6]
    planted = {(1, int(ct), int(s)): 0.8 for ct, s in prim}
    p = _pvalues(_donor_means(np.random.default_rng(8), reps, n_donors=8, planted=planted))
    truth = np.zeros(p.shape[1:], dtype=bool)
    for ct, s in prim:
        truth[0, ct, s] = True
    q_new, q_old = _q_new(p, fam), _q_old(p)
    rows = np.broadcast_to(fam == "primary", p.shape[1:])
    calls = (q_new < Q) & rows
    n_calls = calls.sum(axis=(1, 2, 3))
    fdp = np.where(n_calls > 0, (calls & ~truth).sum(axis=(1, 2, 3)) / np.maximum(n_calls, 1), 0)
    assert fdp.mean() <= Q + 3.5 * fdp.std(ddof=1) / np.sqrt(reps), fdp.mean()
    power_new = (q_new < Q)[:, truth].mean()
    power_old = (q_old < Q)[:, truth].mean()
    assert power_new > power_old + 3.5 * np.sqrt(power_old * (1 - power_old) / truth.sum() / reps)


# --------------------------------------------------------------------------- end to end
TPS = ["baseline", "acute", "longterm"]
TYPES = {"CD14 monocyte": "mono", "CD4 naive T": "T_CD4", "NK": "NK"}
E2E_SIGS = ("ifn_type1", "nfkb_inflammation", "t_naive", "ieg_dissociation")
#: (timepoint, cell type, signature) -> planted shift of the score
PLANTED = {
    ("longterm", "CD14 monocyte", "ifn_type1"): 1.0,
    ("acute", "NK", "nfkb_inflammation"): 1.0,
}
CONTRASTS = ["acute vs baseline", "longterm vs baseline", "longterm vs acute"]


def _scored(seed: int = 0, *, n_donors: int = 6) -> ad.AnnData:
    """A scored AnnData: donors x 3 timepoints x 3 types, unequal cells per sample,
    donor + sample + cell noise in the scores, integer counts, signature roles."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(24)]
    parts = []
    for d in range(n_donors):
        u = rng.normal(0, 0.5, (len(TYPES), len(E2E_SIGS)))
        for tp in TPS:
            for j, (ct, lin) in enumerate(TYPES.items()):
                m = int(rng.integers(12, 50))
                x = u[j] + rng.normal(0, 0.15, len(E2E_SIGS)) + rng.normal(0, 0.5, (m, 4))
                for k, sig in enumerate(E2E_SIGS):
                    x[:, k] += PLANTED.get((tp, ct, sig), 0.0)
                f = pd.DataFrame(x, columns=[f"score_{s}" for s in E2E_SIGS])
                f["sample"], f["donor"], f["timepoint"] = f"D{d}_{tp}", f"D{d}", tp
                f["cell_type"], f["cell_type_coarse"] = ct, lin
                parts.append(f)
    obs = pd.concat(parts, ignore_index=True)
    obs.index = [f"c{i}" for i in range(len(obs))]
    obs["timepoint"] = pd.Categorical(obs["timepoint"], categories=TPS, ordered=True)
    counts = sp.csr_matrix(rng.poisson(2.0, (len(obs), len(genes))).astype(np.float32))
    a = ad.AnnData(X=counts.copy(), obs=obs, var=pd.DataFrame(index=genes))
    a.layers["counts"] = counts
    a.uns["immuneage"] = {
        "signatures": {s: genes[4 * k : 4 * k + 6] for k, s in enumerate(E2E_SIGS)},
        "signature_roles": {s: "control" if s.startswith("ieg") else "programme" for s in E2E_SIGS},
    }
    return a


def _run(a: ad.AnnData, **diff):
    cfg = load_config(
        None,
        {
            "design": {"contrasts": CONTRASTS},
            "differential": {"deseq": False, "min_cells": 5, **diff},
        },
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run_differential(a, cfg, device="cpu")
    return res, [str(w.message) for w in caught if issubclass(w.category, ImmuneageWarning)]


def test_any_pairwise_contrast_end_to_end_with_families(tmp_path) -> None:
    res, msgs = _run(_scored())
    sh = res.tables["signature_shifts"]
    names = ["acute_vs_baseline", "longterm_vs_baseline", "longterm_vs_acute"]
    assert list(dict.fromkeys(sh["contrast"])) == names
    assert (sh.groupby("contrast").size() == len(TYPES) * len(E2E_SIGS)).all()
    t = sh.set_index(["contrast", "cell_type", "signature"])
    # signs follow "test minus reference": the longterm rise in monocytes is + against
    # baseline and against acute; the acute NK rise is + vs baseline and - longterm vs acute
    mono = ("CD14 monocyte", "ifn_type1")
    nk = ("NK", "nfkb_inflammation")
    for key, sign in (
        (("longterm_vs_baseline", *mono), 1),
        (("longterm_vs_acute", *mono), 1),
        (("acute_vs_baseline", *nk), 1),
        (("longterm_vs_acute", *nk), -1),
    ):
        row = t.loc[key]
        assert np.sign(row["effect"]) == sign and row["q_value"] < 0.05, (key, row)
        assert row["effect"] == pytest.approx(sign * 1.0, abs=0.4)
    planted = {
        ("longterm_vs_baseline", *mono),
        ("longterm_vs_acute", *mono),
        ("acute_vs_baseline", *nk),
        ("longterm_vs_acute", *nk),
    }
    null = t.drop(list(planted))
    assert (null["q_value"] >= Q).mean() >= 0.9
    # families: lineage from cell_type_coarse, control from the score stage's roles
    fam = t.xs("acute_vs_baseline")["family"]
    assert fam[("CD14 monocyte", "ifn_type1")] == "primary"
    assert fam[("CD14 monocyte", "t_naive")] == "exploratory"
    assert fam[("CD4 naive T", "t_naive")] == "primary"
    assert (fam.xs("ieg_dissociation", level="signature") == "control").all()
    # q: BH over each family's rows across all three contrasts
    for f, rows in sh.groupby("family"):
        ref = multipletests(rows["p_value"], method="fdr_bh")[1]
        np.testing.assert_allclose(rows["q_value"], ref, rtol=1e-12, err_msg=f)
    per_contrast = sh.groupby("contrast")["p_value"].transform(lambda p: bh_adjust(p.to_numpy()))
    assert not np.allclose(per_contrast, sh["q_value"])
    # the global test across the three timepoints finds both planted pairs
    g = res.tables["signature_global"].set_index(["cell_type", "signature"])
    assert len(g) == len(TYPES) * len(E2E_SIGS) and (g["n_donors"] == 6).all()
    assert g.loc[mono, "q_value"] < 0.05 and g.loc[nk, "q_value"] < 0.05
    assert (
        g.loc[mono, "family"] == "primary"
        and g.loc[("NK", "ieg_dissociation"), "family"] == "control"
    )
    info = res.adata.uns["immuneage"]["differential"]
    assert info["signature_families"] == sh["family"].value_counts().to_dict()
    assert info["n_global_tests"] == len(g) and json.loads(info["primary"]) == DEFAULT_PRIMARY
    res.adata.write_h5ad(tmp_path / "pb.h5ad")  # the summary is writable
    assert not any("fewer than 5 donors" in m for m in msgs)
    # primary: null puts every programme in one family "all"
    res_null, _ = _run(_scored(), primary=None)
    assert set(res_null.tables["signature_shifts"]["family"]) == {"all", "control"}
    # global_test off: an empty table
    res_off, _ = _run(_scored(), global_test=False)
    assert res_off.tables["signature_global"].empty


# --------------------------------------------------------------------------- few donors
def test_few_donors_warn_once_in_the_stage_and_in_preflight(tmp_path) -> None:
    _, msgs = _run(_scored(n_donors=4))
    few = [m for m in msgs if "fewer than 5 donors" in m]
    assert len(few) == 1, msgs
    for c in CONTRASTS:
        assert f"{c}: 4 donors, 3 df, 95% CI +/- {stats.t.ppf(0.975, 3):.2f} SE" in few[0]
    assert "wide" in few[0] and "differential.min_donors = 3" in few[0]
    # pre-flight: the conftest cohort has 3 donors at every timepoint
    sheet = write_cohort(tmp_path / "in", n_cells=20)
    cfg = load_config(tmp_path / "in" / "config.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImmuneageWarning)  # issued; the report lists them
        report = validate_inputs(sheet, cfg, stages=("ingest", "qc", "differential"))
    few = [w for w in report.warnings if "fewer than 5 donors" in w]
    assert len(few) == 1 and "acute vs baseline: 3 donors, 2 df" in few[0], report.warnings
    # five donors: no warning
    rows = [
        SimpleNamespace(sample=f"D{d}_{tp}", donor=f"D{d}", timepoint=tp)
        for d in range(5)
        for tp in TPS
    ]
    five = SimpleNamespace(path=tmp_path / "five.csv", rows=rows)
    assert not [w for w in design_warnings(cfg, five) if "fewer than 5" in w]


# --------------------------------------------------------------------------- config checks
def _sheet(n_donors: int = 3) -> SimpleNamespace:
    rows = [
        SimpleNamespace(sample=f"D{d}_{tp}", donor=f"D{d}", timepoint=tp)
        for d in range(n_donors)
        for tp in TPS
    ]
    return SimpleNamespace(path="sheet.csv", rows=rows)


def test_primary_names_are_checked_before_compute(tmp_path) -> None:
    ok = load_config(None, {})
    check_config(ok, _sheet())
    assert not [w for w in design_warnings(ok, _sheet()) if "primary" in w]
    typo = load_config(None, {"differential": {"primary": {"mono": ["ifn_typ1"]}}})
    with pytest.raises(InputError, match="'ifn_typ1' that are no gene set"):
        check_config(typo, _sheet())
    lineage = load_config(None, {"differential": {"primary": {"monocyte": ["ifn_type1"]}}})
    with pytest.raises(InputError, match="'monocyte', neither a lineage nor a cell type"):
        check_config(lineage, _sheet())
    # cell type and parent names of the shipped panel are keys too
    names = load_config(None, {"differential": {"primary": {"CD14 monocyte": ["sasp"]}}})
    check_config(names, _sheet())
    # a user panel: names it lacks are warnings (the default primary must not break it)
    panel = tmp_path / "panel.yaml"
    shutil.copy(SHIPPED_PANEL, panel)
    custom = load_config(
        None,
        {
            "annotate": {"markers": str(panel)},
            "differential": {"primary": {"monocyte": ["ifn_type1"]}},
        },
    )
    check_config(custom, _sheet())
    warned = [w for w in design_warnings(custom, _sheet()) if "primary" in w]
    assert len(warned) == 1 and "'monocyte'" in warned[0] and str(panel) in warned[0]
    # a known set not scored in this run forms no primary pair: a warning
    unscored = load_config(None, {"score": {"genesets": ["ifn_type1"]}})
    check_config(unscored, _sheet())
    warned = [w for w in design_warnings(unscored, _sheet()) if "not scored" in w]
    assert len(warned) == 1 and "tbk1_sting" in warned[0] and "ifn_type1," not in warned[0]
