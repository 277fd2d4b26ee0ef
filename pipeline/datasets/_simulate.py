"""The generative model behind :func:`pipeline.datasets.demo_cohort` (private).

Counts are negative-binomial (gamma-Poisson) draws around per-cell means::

    mu[c, g] = L_c * ((1 - a_s) * Q[s, t, g] * E[s, t, g] * m_c[g] + a_s * soup[d, g])

- ``L_c``: library size (log-normal; per-sample depth, per-type factor).
- ``Q[s, t]``: the cell type's profile (log-normal baseline over all genes,
  markers strongly up in their type, programme activity) times donor, donor x
  type, batch, sample and sample x type log-normal gene effects, renormalised.
  None of these depends on the timepoint.
- ``E[s, t]``: the planted effects, ``2 ** (log2fc * r_d)`` on the genes of a
  planted programme, ``r_d`` the donor's response (mean 1).
- ``m_c``: per-cell scaling of the MT- genes (high for low-quality cells).
- ``a_s``, ``soup[d]``: the ambient fraction of the sample and the donor's soup
  (cells at the donor's base composition, plus haemoglobin), timepoint-free.

The transient state (``simulator.yaml``, :class:`TransientState`): at one
timepoint only, each cell of one type is, with a fixed probability, in a state
whose profile is the type's ``Q[s, t]`` with the state genes raised to a target
level (renormalised). It is the only per-cell (not per-type) expression effect.

Randomness: one ``SeedSequence(seed, spawn_key=(0,))`` stream draws every
cohort-level parameter (small: types x genes, donors x genes, ...); sample ``i``
draws its cells from ``SeedSequence(seed, spawn_key=(1, i))``, so samples can
be generated one at a time in bounded memory. The transient state has streams
of its own (``(2,)`` for its gene levels, ``(3, i)`` for sample ``i``'s state
membership and its state cells' counts): every draw above is the same with or
without it, so a cohort without the state (``build_cohort(...,
transient_state=False)``) has, cell for cell, the counts of the one with it
except in the state cells.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml

from ._resources import CellTypeSpec, load_cell_types, load_genes, load_programmes

__all__ = [
    "COMPOSITION_EFFECTS",
    "DONORS",
    "PLANTED_EFFECTS",
    "TIMEPOINTS",
    "Cohort",
    "SampleCells",
    "SampleSpec",
    "TransientState",
    "build_cohort",
    "simulate_sample",
]

TIMEPOINTS: tuple[str, ...] = ("baseline", "acute", "longterm")
DONORS: tuple[str, ...] = tuple(f"D{i:02d}" for i in range(1, 14))
#: Donors of each processing batch; a donor's three samples share a batch.
BATCH_OF_DONOR: tuple[str, ...] = ("B1",) * 4 + ("B2",) * 3 + ("B3",) * 3 + ("B4",) * 3
#: Formats cycled as a Latin square over (donor, timepoint): format never tracks timepoint.
FORMATS: tuple[str, ...] = ("h5ad", "10x_h5", "10x_mtx")
#: The last donor's ``10x_mtx`` sample is written in the Cell Ranger 2 layout.
LEGACY_FORMAT = "10x_mtx_legacy"

#: (timepoint, cell type, programme, log2 fold change vs baseline)
PLANTED_EFFECTS: tuple[tuple[str, str, str, float], ...] = tuple(
    (tp, ct, prog, lfc)
    for tp, cts, progs, lfc in (
        (
            "longterm",
            ("CD14 monocyte", "CD8 memory T"),
            ("tbk1_sting", "ifn_type1", "senescence", "senescence_core"),
            -0.9,
        ),
        ("acute", ("CD14 monocyte", "CD16 monocyte"), ("nfkb_inflammation",), 1.0),
    )
    for ct in cts
    for prog in progs
)
#: (timepoint, cell type, fold on the donor's abundance before renormalisation)
COMPOSITION_EFFECTS: tuple[tuple[str, str, float], ...] = (
    ("acute", "NK", 1.8),
    ("acute", "CD8 memory T", 1.8),
    ("longterm", "CD4 naive T", 1.3),
    ("longterm", "CD8 naive T", 1.3),
)
DONOR_RESPONSE_SD = 0.25

MEDIAN_UMI = 2500.0
LIBRARY_SD = 0.4
CHUNK = 2048
# log-normal sds of the gene-level nuisance effects (natural log)
DONOR_SD, DONOR_TYPE_SD, BATCH_SD, SAMPLE_SD, SAMPLE_TYPE_SD = 0.2, 0.1, 0.1, 0.08, 0.05
# (median, sd) of the baseline relative expression by gene role
_BASELINE = {
    "filler": (0.04, 1.6),
    "signature": (0.4, 0.9),
    "marker": (0.03, 0.6),
    "housekeeping": (15.0, 0.6),
    "hla": (8.0, 0.4),
    "ribosomal": (8.0, 0.5),
    "cell_cycle": (0.05, 0.7),
    "sex": (0.4, 0.3),
    "other": (0.5, 0.8),
    "hemoglobin": (1e-4, 0.1),
    "mito": (1.0, 0.6),
}
_FIXED = {"MALAT1": 60, "TMSB4X": 60, "B2M": 50, "EEF1A1": 40, "ACTB": 30, "TPT1": 25, "XIST": 1e-6}
_HB_SOUP = {"HBB": 0.6, "HBA2": 0.25, "HBA1": 0.14, "HBD": 0.01}
_SOUP_HB_SHARE = 0.1


@dataclass(frozen=True)
class SampleSpec:
    """Cohort-level parameters of one sample (all timepoint-free except composition)."""

    index: int
    sample: str
    donor: str
    donor_index: int
    timepoint: str
    batch: str
    age: int
    fmt: str
    path: str
    n_cells: int
    proportions: np.ndarray
    depth: float
    ambient: float
    mito_factor: float
    doublet_rate: float
    low_quality_rate: float
    plasma_betaine_um: float


@dataclass(frozen=True)
class TransientState:
    """A cell state present at one timepoint only, within one cell type (``simulator.yaml``).

    Attributes
    ----------
    key, name
        Identifier and description.
    cell_type, type_index
        The type whose cells can be in the state (they stay that type).
    timepoint
        The only timepoint with state cells.
    share_of_type
        Probability that a cell of the type, at that timepoint, is in the state.
    genes, gene_index
        The state's own genes (symbols, and their columns), off in the type.
    target
        Per state gene, the share of the profile (of ``Q``) it reaches in a state
        cell: ``umi / (MEDIAN_UMI * library_size_factor)``, ``umi`` log-normal
        around ``umi_per_gene``. A gene already above it keeps its level.
    umi
        The expected UMIs per state cell of each gene at the type's median library.
    shifted, shift_index, shift_log2fc
        Genes of the type's own profile raised or lowered in the state (log2 fold).
    """

    key: str
    name: str
    cell_type: str
    type_index: int
    timepoint: str
    share_of_type: float
    genes: tuple[str, ...]
    gene_index: np.ndarray
    target: np.ndarray
    umi: np.ndarray
    shifted: tuple[str, ...] = ()
    shift_index: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    shift_log2fc: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def profile(self, q: np.ndarray, mito: np.ndarray) -> np.ndarray:
        """The state's profile from the type's profile ``q`` (non-MT share kept)."""
        out = q.copy()
        out[self.shift_index] *= np.exp2(self.shift_log2fc)
        gi = self.gene_index
        out[gi] = np.maximum(q[gi], self.target)
        out[~mito] *= q[~mito].sum() / out[~mito].sum()
        return out


@lru_cache(maxsize=1)
def _state_spec() -> dict:
    text = files("pipeline.datasets").joinpath("data", "simulator.yaml").read_text()
    return dict(yaml.safe_load(text)["transient_state"])


def _transient_state(
    seed: int,
    genes: pd.DataFrame,
    cts: tuple[CellTypeSpec, ...],
    overrides: Mapping[str, Any] | None = None,
) -> TransientState:
    """The state of ``simulator.yaml`` (fields in ``overrides`` replaced), gene levels drawn."""
    spec = {**_state_spec(), **(overrides or {})}
    unknown = sorted(set(spec) - set(_state_spec()) - {"shifted"})
    if unknown:
        raise ValueError(
            f"transient_state: unknown field(s) {unknown}; fields are {sorted(_state_spec())}"
        )
    names = [ct.name for ct in cts]
    if spec["cell_type"] not in names or spec["timepoint"] not in TIMEPOINTS[1:]:
        raise ValueError(f"simulator.yaml transient_state: unknown type or timepoint {spec}")
    idx = {s: i for i, s in enumerate(genes["symbol"])}
    shifted = dict(spec.get("shifted") or {})
    missing = [g for g in [*spec["genes"], *shifted] if g not in idx]
    if missing:
        raise ValueError(f"simulator.yaml transient_state: genes not in genes.tsv: {missing}")
    t = names.index(spec["cell_type"])
    rng = _rng(seed, 2)
    umi = np.exp(
        _draw(rng, float(spec["umi_per_gene"]), float(spec["umi_log_sd"]), len(spec["genes"]))
    )
    return TransientState(
        key=str(spec["key"]),
        name=str(spec["name"]),
        cell_type=names[t],
        type_index=t,
        timepoint=str(spec["timepoint"]),
        share_of_type=float(spec["share_of_type"]),
        genes=tuple(spec["genes"]),
        gene_index=np.array([idx[g] for g in spec["genes"]]),
        target=umi / (MEDIAN_UMI * cts[t].library_size_factor),
        umi=umi,
        shifted=tuple(shifted),
        shift_index=np.array([idx[g] for g in shifted], dtype=int),
        shift_log2fc=np.array([float(v) for v in shifted.values()]),
    )


@dataclass
class Cohort:
    """Everything drawn at cohort level; the per-sample draws need only this and the seed."""

    seed: int
    genes: pd.DataFrame
    cell_types: tuple[CellTypeSpec, ...]
    programmes: dict[str, list[str]]
    profiles: np.ndarray  # types x genes, rows sum to 1
    mito: np.ndarray  # bool mask of MT- genes
    theta: np.ndarray  # NB inverse dispersion per gene
    donor_effects: np.ndarray  # donors x genes (log)
    donor_type_effects: np.ndarray  # donors x types x genes (log)
    batch_effects: dict[str, np.ndarray]
    sample_effects: np.ndarray  # samples x genes (log)
    soups: np.ndarray  # donors x genes
    base_proportions: np.ndarray
    donor_proportions: np.ndarray  # donors x types
    donor_response: dict[str, np.ndarray]  # timepoint -> donors
    gene_log2fc: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    samples: list[SampleSpec] = field(default_factory=list)
    transient_state: TransientState | None = None


@dataclass
class SampleCells:
    """One simulated sample: counts and per-cell truth."""

    counts: sp.csr_matrix  # cells x genes, int32
    barcodes: np.ndarray
    cell_type: np.ndarray
    partner_cell_type: np.ndarray
    is_doublet: np.ndarray
    is_low_quality: np.ndarray
    in_state: np.ndarray  # the cell (a doublet's first cell) is in the transient state


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _draw(rng: np.random.Generator, median: float, sd: float, n: int) -> np.ndarray:
    return rng.normal(math.log(median), sd, n)


def _profiles(
    rng: np.random.Generator,
    genes: pd.DataFrame,
    cts: tuple[CellTypeSpec, ...],
    progs: dict[str, dict],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-type relative expression (rows sum to 1) and the MT- mask."""
    sym = genes["symbol"].to_numpy()
    idx = {s: i for i, s in enumerate(sym)}
    role = genes["role"].to_numpy().copy()
    in_prog = np.zeros(len(sym), bool)
    for p in progs.values():
        in_prog[[idx[g] for g in p["genes"]]] = True
    # markers that belong to a programme keep a programme-like background
    role[(role == "marker") & in_prog] = "signature"
    logw = np.empty(len(sym))
    for r in sorted(_BASELINE):
        mask = role == r
        logw[mask] = _draw(rng, *_BASELINE[r], int(mask.sum()))
    # SenMayo genes that blood does not express stay near zero
    sen = progs["senescence"]
    others = {g for k, p in progs.items() if k != "senescence" for g in p["genes"]}
    quiet = [idx[g] for g in sen["genes"] if g not in set(sen["expressed_in_pbmc"]) | others]
    logw[quiet] = _draw(rng, 0.01, 0.7, len(quiet))
    for s, v in _FIXED.items():
        logw[idx[s]] = math.log(v)
    mito = role == "mito"
    class2 = np.array([s.startswith("HLA-D") or s == "CD74" for s in sym])

    n_t = len(cts)
    logp = logw[None, :] + rng.normal(0.0, 0.35, (n_t, len(sym)))
    for t, ct in enumerate(cts):
        if ct.lineage in ("B", "myeloid"):
            logp[t, class2] = _draw(rng, 10.0, 0.5, int(class2.sum()))
        also = [idx[g] for g in ct.also_expressed]
        logp[t, also] = _draw(rng, 6.0, 0.5, len(also))
        mk = [idx[g] for g in ct.markers]
        logp[t, mk] = _draw(rng, 12.0, 0.6, len(mk))
        for prog, boost in sorted(ct.programme_activity.items()):
            logp[t, [idx[g] for g in progs[prog]["genes"]]] += boost
    logp[:, mito] = logw[None, mito]
    p = np.exp(logp)
    for t, ct in enumerate(cts):
        p[t, ~mito] *= (1.0 - ct.mito_share) / p[t, ~mito].sum()
        p[t, mito] *= ct.mito_share / p[t, mito].sum()
    return p, mito


def _normalise_logit(logp: np.ndarray) -> np.ndarray:
    w = np.exp(logp - logp.max(axis=-1, keepdims=True))
    return w / w.sum(axis=-1, keepdims=True)


def build_cohort(
    seed: int, n_cells: int, *, transient_state: bool | Mapping[str, Any] = True
) -> Cohort:
    """Draw every cohort-level parameter.

    Parameters
    ----------
    seed
        Base seed; the biology (profiles, donor effects, planted responses)
        depends only on it, the per-sample cell numbers also on ``n_cells``.
    n_cells
        Total cells to spread over the 39 samples.
    transient_state
        Plant the one-timepoint cell state of ``simulator.yaml`` (``True``), the
        same with some fields replaced (a mapping, e.g. ``{"umi_per_gene": 1.0,
        "shifted": {}}`` for a weaker state), or none (``False``); every other
        draw is the same either way.

    Returns
    -------
    The :class:`Cohort`.
    """
    rng = _rng(seed, 0)
    genes = load_genes()
    cts = load_cell_types()
    progs_all = load_programmes()
    progs = progs_all["programmes"]
    n_g, n_t, n_d = len(genes), len(cts), len(DONORS)
    profiles, mito = _profiles(rng, genes, cts, progs)

    role = genes["role"].to_numpy()
    steady = np.isin(role, ["ribosomal", "housekeeping", "hla", "mito"])
    theta = np.where(steady, 20.0, np.exp(rng.normal(math.log(4.0), 0.5, n_g)))

    def gene_effect(sd: float, *shape: int) -> np.ndarray:
        e = rng.normal(0.0, sd, (*shape, n_g))
        e[..., mito] = 0.0
        return e

    donor_effects = gene_effect(DONOR_SD, n_d)
    donor_type_effects = gene_effect(DONOR_TYPE_SD, n_d, n_t)
    batch_effects = {b: gene_effect(BATCH_SD) for b in sorted(set(BATCH_OF_DONOR))}
    sample_effects = gene_effect(SAMPLE_SD, n_d * len(TIMEPOINTS))

    base = np.array([ct.base_proportion for ct in cts])
    base = base / base.sum()
    donor_logp = np.log(base)[None, :] + rng.normal(0.0, 0.25, (n_d, n_t))
    donor_props = _normalise_logit(donor_logp)
    sample_jitter = rng.normal(0.0, 0.1, (n_d * len(TIMEPOINTS), n_t))
    donor_response = {
        tp: np.clip(rng.normal(1.0, DONOR_RESPONSE_SD, n_d), 0.2, None) for tp in TIMEPOINTS[1:]
    }

    # soups: the donor's base composition (no timepoint), UMI-weighted, plus haemoglobin
    lib = np.array([ct.library_size_factor for ct in cts])
    hb = np.zeros(n_g)
    sym_idx = {s: i for i, s in enumerate(genes["symbol"])}
    for s, v in _HB_SOUP.items():
        hb[sym_idx[s]] = v
    soups = (donor_props * lib[None, :]) @ profiles
    soups = (1 - _SOUP_HB_SHARE) * soups / soups.sum(axis=1, keepdims=True) + _SOUP_HB_SHARE * hb

    cohort = Cohort(
        seed=seed,
        genes=genes,
        cell_types=cts,
        programmes={k: list(v["genes"]) for k, v in progs.items()},
        profiles=profiles,
        mito=mito,
        theta=theta,
        donor_effects=donor_effects,
        donor_type_effects=donor_type_effects,
        batch_effects=batch_effects,
        sample_effects=sample_effects,
        soups=soups,
        base_proportions=base,
        donor_proportions=donor_props,
        donor_response=donor_response,
        transient_state=(
            _transient_state(
                seed,
                genes,
                cts,
                transient_state if isinstance(transient_state, Mapping) else None,
            )
            if transient_state is not False
            else None
        ),
    )
    type_idx = {ct.name: t for t, ct in enumerate(cts)}
    for tp, ct, prog, lfc in PLANTED_EFFECTS:
        key = (tp, type_idx[ct])
        v = cohort.gene_log2fc.setdefault(key, np.zeros(n_g))
        gi = [sym_idx[g] for g in progs[prog]["genes"]]
        v[gi] = np.where(np.abs(lfc) > np.abs(v[gi]), lfc, v[gi])

    # technical parameters per sample (timepoint-free), donors' ages, plasma betaine
    n_s = n_d * len(TIMEPOINTS)
    batch_depth = {b: math.exp(rng.normal(0.0, 0.1)) for b in sorted(batch_effects)}
    depth = np.exp(rng.normal(0.0, 0.2, n_s))
    ambient = rng.uniform(0.01, 0.06, n_s)
    mito_factor = np.exp(rng.normal(0.0, 0.2, n_s))
    doublet_rate = rng.uniform(0.04, 0.06, n_s)
    lq_rate = rng.uniform(0.03, 0.05, n_s)
    ages = rng.integers(22, 36, n_d)
    betaine_base = rng.normal(35.0, 5.0, n_d)
    betaine_noise = rng.normal(0.0, 2.5, n_s)
    # cell numbers last, so the biology above does not depend on the size
    weights = np.exp(rng.normal(0.0, 0.25, n_s))
    n_per = np.maximum(np.floor(n_cells * weights / weights.sum()).astype(int), 10)
    n_per[np.argmax(n_per)] += n_cells - int(n_per.sum())

    comp_mult = np.ones((n_s, n_t))
    for i in range(n_s):
        d, k = divmod(i, len(TIMEPOINTS))
        tp = TIMEPOINTS[k]
        fmt = FORMATS[(d + k) % len(FORMATS)]
        if fmt == "10x_mtx" and d == n_d - 1:
            fmt = LEGACY_FORMAT
        for ctp, ct, fold in COMPOSITION_EFFECTS:
            if ctp == tp:
                comp_mult[i, type_idx[ct]] = fold ** donor_response[tp][d]
        props = _normalise_logit(np.log(donor_props[d]) + sample_jitter[i] + np.log(comp_mult[i]))
        name = f"{DONORS[d]}_{tp}"
        path = f"counts/{name}.h5ad" if fmt == "h5ad" else f"counts/{name}"
        if fmt == "10x_h5":
            path = f"counts/{name}.h5"
        betaine = betaine_base[d] + betaine_noise[i]
        if tp == "longterm":
            betaine += 12.0 * donor_response["longterm"][d]
        cohort.samples.append(
            SampleSpec(
                index=i,
                sample=name,
                donor=DONORS[d],
                donor_index=d,
                timepoint=tp,
                batch=BATCH_OF_DONOR[d],
                age=int(ages[d]),
                fmt=fmt,
                path=path,
                n_cells=int(n_per[i]),
                proportions=props,
                depth=float(depth[i] * batch_depth[BATCH_OF_DONOR[d]]),
                ambient=float(ambient[i]),
                mito_factor=float(mito_factor[i]),
                doublet_rate=float(doublet_rate[i]),
                low_quality_rate=float(lq_rate[i]),
                plasma_betaine_um=round(float(betaine), 2),
            )
        )
    return cohort


def _barcodes(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` unique, sorted 16-base barcodes with the ``-1`` suffix."""
    codes = np.unique(rng.integers(0, 4**16, n, dtype=np.int64))
    while codes.size < n:
        codes = np.unique(np.concatenate([codes, rng.integers(0, 4**16, n - codes.size)]))
    shifts = np.arange(30, -1, -2, dtype=np.int64)
    digits = (codes[:, None] >> shifts[None, :]) & 3
    letters = np.frombuffer(b"ACGT", dtype="S1")[digits]
    return np.char.add(letters.view("S16").ravel().astype(str), "-1")


def _nb(rng: np.random.Generator, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Gamma-Poisson draws with mean ``mu`` (cells x genes) and inverse dispersion ``theta``."""
    lam = rng.gamma(np.broadcast_to(theta, mu.shape), mu / theta)
    return rng.poisson(lam).astype(np.int32)


def simulate_sample(cohort: Cohort, index: int) -> SampleCells:
    """Draw the cells of sample ``index`` (its own random stream).

    Parameters
    ----------
    cohort
        From :func:`build_cohort`.
    index
        Sample index (donor-major: ``3 * donor + timepoint``).

    Returns
    -------
    The sample's counts (cells x genes CSR, int32, rows in barcode order) and
    per-cell truth.
    """
    spec = cohort.samples[index]
    rng = _rng(cohort.seed, 1, index)
    cts = cohort.cell_types
    n_t, n_g = len(cts), cohort.profiles.shape[1]
    n, d = spec.n_cells, spec.donor_index
    mito = cohort.mito

    kind = np.zeros(n, np.int8)
    n_dbl = int(rng.binomial(n, spec.doublet_rate))
    n_lq = int(rng.binomial(n - n_dbl, spec.low_quality_rate))
    kind[:n_dbl] = 1
    kind[n_dbl : n_dbl + n_lq] = 2
    kind = rng.permutation(kind)
    types = rng.choice(n_t, size=n, p=spec.proportions)
    dbl = np.flatnonzero(kind == 1)
    partner = rng.choice(n_t, size=dbl.size, p=spec.proportions)
    for _ in range(100):
        same = partner == types[dbl]
        if not same.any():
            break
        partner[same] = rng.choice(n_t, size=int(same.sum()), p=spec.proportions)
    partner = np.where(partner == types[dbl], (partner + 1) % n_t, partner)

    lib_t = np.array([ct.library_size_factor for ct in cts])
    v_cell = np.concatenate([np.arange(n), dbl])
    v_type = np.concatenate([types, partner])
    n_v = v_cell.size
    state = cohort.transient_state
    if state is not None and spec.timepoint == state.timepoint:
        rng_state = _rng(cohort.seed, 3, index)
        v_state = (v_type == state.type_index) & (rng_state.random(n_v) < state.share_of_type)
        v_state[n:] = False  # a doublet's second cell keeps its type's profile
    else:
        rng_state, v_state = None, np.zeros(n_v, bool)
    v_lib = MEDIAN_UMI * spec.depth * lib_t[v_type] * np.exp(rng.normal(0.0, LIBRARY_SD, n_v))
    v_mt = spec.mito_factor * np.exp(rng.normal(0.0, 0.3, n_v))
    lq = np.flatnonzero(kind == 2)
    v_lib[lq] *= rng.uniform(0.1, 0.3, lq.size)
    target = rng.uniform(0.2, 0.6, lq.size)
    m0 = np.array([cts[t].mito_share for t in types[lq]])
    v_mt[lq] = target * (1 - m0) / (m0 * (1 - target))

    # the sample's per-type profiles (timepoint-free effects, renormalised), then planted effects
    sample_type = rng.normal(0.0, SAMPLE_TYPE_SD, (n_t, n_g))
    sample_type[:, mito] = 0.0
    log_eff = (
        cohort.donor_effects[d][None, :]
        + cohort.donor_type_effects[d]
        + cohort.batch_effects[spec.batch][None, :]
        + cohort.sample_effects[index][None, :]
        + sample_type
    )
    q = cohort.profiles * np.exp(log_eff)
    base_nonmt = cohort.profiles[:, ~mito].sum(axis=1)
    q[:, ~mito] *= (base_nonmt / q[:, ~mito].sum(axis=1))[:, None]
    if spec.timepoint != TIMEPOINTS[0]:
        r = cohort.donor_response[spec.timepoint][d]
        for (tp, t), lfc in cohort.gene_log2fc.items():
            if tp == spec.timepoint:
                q[t] *= np.exp2(lfc * r)
    soup = cohort.soups[d]
    a = spec.ambient
    q_state = state.profile(q[state.type_index], mito) if rng_state is not None else None

    blocks: list[sp.csr_matrix] = []
    rows: list[np.ndarray] = []
    order = np.argsort(v_type, kind="stable")
    for t in range(n_t):
        members = order[v_type[order] == t]
        for start in range(0, members.size, CHUNK):
            m = members[start : start + CHUNK]
            own = (1 - a) * q[t][None, :] * v_lib[m, None]
            own[:, mito] *= v_mt[m, None]
            mu = own + (a * v_lib[m])[:, None] * soup[None, :]
            block = _nb(rng, mu, cohort.theta)
            in_state = np.flatnonzero(v_state[m])
            if in_state.size:
                # state cells redrawn from the state's stream: the main stream is unchanged
                ms = m[in_state]
                own = (1 - a) * q_state[None, :] * v_lib[ms, None]
                own[:, mito] *= v_mt[ms, None]
                mu = own + (a * v_lib[ms])[:, None] * soup[None, :]
                block[in_state] = _nb(rng_state, mu, cohort.theta)
            blocks.append(sp.csr_matrix(block))
            rows.append(m)
    v = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, n_g), dtype=np.int32)
    v_rows = np.concatenate(rows) if rows else np.zeros(0, int)
    agg = sp.csr_matrix((np.ones(n_v, np.int32), (v_cell[v_rows], np.arange(n_v))), shape=(n, n_v))
    counts = (agg @ v).tocsr().astype(np.int32)
    counts.sort_indices()
    counts.eliminate_zeros()

    names = np.array([ct.name for ct in cts], dtype=object)
    partner_name = np.full(n, "", dtype=object)
    partner_name[dbl] = names[partner]
    return SampleCells(
        counts=counts,
        barcodes=_barcodes(rng, n),
        cell_type=names[types],
        partner_cell_type=partner_name,
        is_doublet=kind == 1,
        is_low_quality=kind == 2,
        in_state=v_state[:n].copy(),
    )
