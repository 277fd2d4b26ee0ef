"""A synthetic 13-donor x 3-timepoint PBMC cohort with planted, known effects.

:func:`demo_cohort` writes real count files in every input format the pipeline
reads (``.h5ad``, 10x ``.h5``, 10x matrix directories, one in the Cell Ranger 2
layout), a sample sheet, and the ground truth the later stages are judged
against. See :mod:`pipeline.datasets._simulate` for the generative model.

Output layout (paths in ``samplesheet.csv`` are relative to it)::

    outdir/
      samplesheet.csv        sample,donor,timepoint,path,age,batch
      covariates.csv         sample,donor,timepoint,plasma_betaine_um
      truth.json             planted effects, programmes, markers, proportions, transient state
      truth_cells.tsv.gz     sample,barcode,cell_type,partner_cell_type,is_doublet,is_low_quality,state
      counts/D01_baseline.h5ad, counts/D01_acute.h5, counts/D01_longterm/ (matrix.mtx.gz ...)
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .. import keys
from ..errors import InputError
from ..io.write10x import write_10x_h5, write_10x_mtx
from . import _simulate as sim
from ._resources import load_programmes

__all__ = ["SIZES", "DemoCohort", "Size", "demo_cohort"]

Size = Literal["ci", "default", "large"]
#: Total cells written for each size (``n_cells`` overrides).
SIZES: dict[str, int] = {"ci": 3_000, "default": 30_000, "large": 250_000}
MAX_CELLS = 1_000_000
MIN_CELLS = 39 * 20
TRUTH_VERSION = 2

_OWN_FILES = frozenset(
    {"samplesheet.csv", "covariates.csv", "truth.json", "truth_cells.tsv.gz", "counts"}
)
_OWN_COUNTS = re.compile(r"^D\d\d_(baseline|acute|longterm)(\.h5ad|\.h5)?$")
_TRUTH_COLUMNS = (
    "sample",
    "barcode",
    "cell_type",
    "partner_cell_type",
    "is_doublet",
    "is_low_quality",
    "state",
)


@dataclass(frozen=True)
class DemoCohort:
    """What :func:`demo_cohort` wrote.

    Attributes
    ----------
    outdir
        The output directory.
    samplesheet
        ``outdir/samplesheet.csv`` (columns ``sample,donor,timepoint,path,age,batch``).
    truth
        ``outdir/truth.json``.
    n_cells
        Cells written over all samples (doublets and low-quality cells included).
    size
        The size preset.
    seed
        The seed.
    truth_cells
        ``outdir/truth_cells.tsv.gz`` (per-cell labels; never inside the count files).
    covariates
        ``outdir/covariates.csv`` (per-sample plasma betaine, linked to the
        donor's long-term response).
    """

    outdir: Path
    samplesheet: Path
    truth: Path
    n_cells: int
    size: str
    seed: int
    truth_cells: Path
    covariates: Path


def _prepare_outdir(outdir: Path) -> None:
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"demo output {outdir} exists and is not a directory; choose another path")
    if not outdir.exists():
        outdir.mkdir(parents=True)
        return
    foreign = sorted(p.name for p in outdir.iterdir() if p.name not in _OWN_FILES)
    counts = outdir / "counts"
    if counts.is_dir():
        foreign += sorted(
            f"counts/{p.name}" for p in counts.iterdir() if not _OWN_COUNTS.match(p.name)
        )
    elif counts.exists():
        foreign.append("counts")
    if foreign:
        raise InputError(
            f"demo output directory {outdir} holds files that are not a previous demo's "
            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
            "give an empty or new directory"
        )
    # a previous demo: replace it wholesale so no stale sample survives
    if counts.is_dir():
        shutil.rmtree(counts)
    for name in _OWN_FILES - {"counts"}:
        (outdir / name).unlink(missing_ok=True)


def _anndata(cells: sim.SampleCells, genes: pd.DataFrame) -> AnnData:
    var = pd.DataFrame(
        {
            keys.GENE_IDS: genes["gene_id"].to_numpy(),
            keys.FEATURE_TYPES: "Gene Expression",
        },
        index=pd.Index(genes["symbol"].to_numpy(), dtype=str),
    )
    obs = pd.DataFrame(index=pd.Index(cells.barcodes, dtype=str))
    return AnnData(X=cells.counts, obs=obs, var=var)


def _write_counts(adata: AnnData, path: Path, fmt: str) -> None:
    if fmt == "h5ad":
        x = sp.csr_matrix(adata.X, dtype=np.float32)
        out = AnnData(X=x, obs=adata.obs, var=adata.var, layers={keys.COUNTS: x.copy()})
        out.write_h5ad(path, compression="gzip")
    elif fmt == "10x_h5":
        write_10x_h5(adata, path)
    elif fmt == "10x_mtx":
        write_10x_mtx(adata, path, compress=True)
    elif fmt == sim.LEGACY_FORMAT:
        write_10x_mtx(adata, path, legacy=True)
    else:  # pragma: no cover - formats are fixed in _simulate
        raise ValueError(f"unknown format {fmt!r}")


def _truth_lines(spec: sim.SampleSpec, cells: sim.SampleCells, state_key: str) -> str:
    buf = io.StringIO()
    state = np.where(cells.in_state, state_key, "")
    for row in zip(
        cells.barcodes,
        cells.cell_type,
        cells.partner_cell_type,
        cells.is_doublet,
        cells.is_low_quality,
        state,
        strict=True,
    ):
        buf.write(f"{spec.sample}\t" + "\t".join(map(str, row)) + "\n")
    return buf.getvalue()


def _r(x: float, nd: int = 6) -> float:
    return round(float(x), nd)


def _state_log2fc(cohort: sim.Cohort) -> np.ndarray | None:
    """Expected log2 fold change of the state's type's mean profile (all its cells) at its timepoint.

    ``log2((1 - f) + f * state / type)`` on the base profile, ``f`` the state's
    share of the type: what a pseudobulk of the type sees (``None`` without a state).
    """
    st = cohort.transient_state
    if st is None:
        return None
    q = cohort.profiles[st.type_index]
    mix = (1 - st.share_of_type) * q + st.share_of_type * st.profile(q, cohort.mito)
    out = np.zeros(q.size)
    gi = _state_genes(st)
    out[gi] = np.log2(mix[gi] / q[gi])
    return out


def _state_genes(st: sim.TransientState) -> np.ndarray:
    """Columns of the state's own and shifted genes."""
    return np.concatenate([st.gene_index, st.shift_index]).astype(int)


def _effect_log2fc(cohort: sim.Cohort) -> dict[tuple[str, int], np.ndarray]:
    """Planted programme effects plus the transient state's mixture effect, per (timepoint, type)."""
    out = {k: v.copy() for k, v in cohort.gene_log2fc.items()}
    st, lfc = cohort.transient_state, _state_log2fc(cohort)
    if st is not None and lfc is not None:
        key = (st.timepoint, st.type_index)
        v = out.setdefault(key, np.zeros(lfc.size))
        gi = _state_genes(st)
        v[gi] += lfc[gi]
    return out


def _transient_truth(cohort: sim.Cohort, per_sample: list[dict[str, Any]]) -> dict[str, Any] | None:
    st = cohort.transient_state
    if st is None:
        return None
    lfc = _state_log2fc(cohort)
    t = st.type_index
    at_tp = [s for s in cohort.samples if s.timepoint == st.timepoint]
    n_state = sum(s["n_transient_state"] for s in per_sample)
    n_tp = sum(s["n_cells"] for s in per_sample if s["timepoint"] == st.timepoint)
    return {
        "key": st.key,
        "name": st.name,
        "cell_type": st.cell_type,
        "annotated_as": st.cell_type,
        "kind": "state within a cell type (same markers; not a type of the marker panel)",
        "timepoint": st.timepoint,
        "contrast": f"{st.timepoint}_vs_baseline",
        "share_of_type": st.share_of_type,
        "expected_share_of_timepoint_cells": _r(
            st.share_of_type * np.mean([s.proportions[t] for s in at_tp])
        ),
        "n_cells": int(n_state),
        "share_of_timepoint_cells": _r(n_state / max(n_tp, 1)),
        "genes": list(st.genes),
        "expected_umi_per_cell": {g: _r(u, 3) for g, u in zip(st.genes, st.umi, strict=True)},
        "shifted_log2fc_in_state": {
            g: _r(v) for g, v in zip(st.shifted, st.shift_log2fc, strict=True)
        },
        "type_log2fc_at_timepoint": {
            g: _r(lfc[i]) for g, i in zip([*st.genes, *st.shifted], _state_genes(st), strict=True)
        },
        "composition": "unchanged: the state is a share of its type's cells",
        "truth_cells_column": "state",
        "source": "simulator.yaml (Graff et al. 2018; Simpson et al. 2021)",
    }


def _programme_effects(cohort: sim.Cohort, sets: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Expected mean log2 fold change of every contrast x cell type x gene set.

    ``status``: ``planted``; ``overlap`` (the set shares genes with a planted
    effect); ``state`` (no gene of the set moves, but the type's cells at that
    timepoint include the transient state, whose genes a relative score such
    as scanpy's ``score_genes`` may draw as control genes: a score shift there
    is not evidence against the method); ``null``.
    """
    idx = {s: i for i, s in enumerate(cohort.genes["symbol"])}
    planted = {(tp, ct, prog) for tp, ct, prog, _ in sim.PLANTED_EFFECTS}
    st = cohort.transient_state
    state_at = set() if st is None else {(st.timepoint, st.cell_type)}
    effects = _effect_log2fc(cohort)
    out = []
    for tp in sim.TIMEPOINTS[1:]:
        for t, ct in enumerate(cohort.cell_types):
            lfc = effects.get((tp, t))
            for name, genes in sets.items():
                v = np.zeros(len(genes)) if lfc is None else lfc[[idx[g] for g in genes]]
                n_aff = int(np.count_nonzero(v))
                status = (
                    "planted"
                    if (tp, ct.name, name) in planted
                    else (
                        "overlap" if n_aff else ("state" if (tp, ct.name) in state_at else "null")
                    )
                )
                out.append(
                    {
                        "contrast": f"{tp}_vs_baseline",
                        "cell_type": ct.name,
                        "programme": name,
                        "status": status,
                        "n_genes": len(genes),
                        "n_genes_shifted": n_aff,
                        "mean_log2fc": _r(v.mean()),
                    }
                )
    return out


def _truth(
    cohort: sim.Cohort, size: str, seed: int, n_requested: int, per_sample: list[dict[str, Any]]
) -> dict[str, Any]:
    progs = load_programmes()
    cts = cohort.cell_types
    sets = {k: list(v["genes"]) for k, v in progs["programmes"].items()}
    sets.update({k: list(v["genes"]) for k, v in progs["reference_sets"].items()})
    affected = {ct for _, ct, _, _ in sim.PLANTED_EFFECTS}
    comp_types = {ct for _, ct, _ in sim.COMPOSITION_EFFECTS}
    expected_props = {}
    for tp in sim.TIMEPOINTS:
        props = np.mean([s.proportions for s in cohort.samples if s.timepoint == tp], axis=0)
        expected_props[tp] = {ct.name: _r(p) for ct, p in zip(cts, props, strict=True)}
    sym = cohort.genes["symbol"].to_numpy()
    gene_effects: dict[str, dict[str, dict[str, float]]] = {}
    for (tp, t), lfc in sorted(_effect_log2fc(cohort).items()):
        nz = np.flatnonzero(lfc)
        gene_effects.setdefault(f"{tp}_vs_baseline", {})[cts[t].name] = {
            str(sym[i]): _r(lfc[i]) for i in nz
        }
    return {
        "version": TRUTH_VERSION,
        "generator": "pipeline.datasets.demo_cohort",
        "seed": seed,
        "size": size,
        "n_cells_requested": n_requested,
        "n_cells": int(sum(s["n_cells"] for s in per_sample)),
        "donors": list(sim.DONORS),
        "timepoints": list(sim.TIMEPOINTS),
        "reference_timepoint": sim.TIMEPOINTS[0],
        "contrasts": [f"{tp}_vs_baseline" for tp in sim.TIMEPOINTS[1:]],
        "cell_types": [ct.name for ct in cts],
        "azimuth_l2": {ct.name: ct.azimuth_l2 for ct in cts},
        "markers": {ct.name: list(ct.markers) for ct in cts},
        "base_proportions": {
            ct.name: _r(p) for ct, p in zip(cts, cohort.base_proportions, strict=True)
        },
        "expected_proportions": expected_props,
        "programmes": {
            k: {
                "label": v["label"],
                "genes": list(v["genes"]),
                "source": " ".join(v["source"].split()),
            }
            for k, v in progs["programmes"].items()
        },
        "reference_sets": {
            k: {"label": v["label"], "genes": list(v["genes"])}
            for k, v in progs["reference_sets"].items()
        },
        "planted_effects": [
            {
                "contrast": f"{tp}_vs_baseline",
                "cell_type": ct,
                "programme": prog,
                "direction": "up" if lfc > 0 else "down",
                "log2fc": lfc,
                "donor_response_sd": sim.DONOR_RESPONSE_SD,
            }
            for tp, ct, prog, lfc in sim.PLANTED_EFFECTS
        ],
        "composition_effects": [
            {
                "contrast": f"{tp}_vs_baseline",
                "cell_type": ct,
                "direction": "up" if fold > 1 else "down",
                "fold": fold,
                "log2fc": _r(math.log2(fold)),
                "scale": "abundance before renormalisation to proportions",
                "donor_response_sd": sim.DONOR_RESPONSE_SD,
            }
            for tp, ct, fold in sim.COMPOSITION_EFFECTS
        ],
        "negative_control_cell_types": [ct.name for ct in cts if ct.name not in affected],
        "composition_unchanged_abundance_cell_types": [
            ct.name for ct in cts if ct.name not in comp_types
        ],
        "expected_log2_proportion_change": {
            f"{tp}_vs_baseline": {
                ct.name: _r(
                    math.log2(expected_props[tp][ct.name] / expected_props["baseline"][ct.name])
                )
                for ct in cts
            }
            for tp in sim.TIMEPOINTS[1:]
        },
        "programme_effects": _programme_effects(cohort, sets),
        "gene_effects": gene_effects,
        "transient_state": _transient_truth(cohort, per_sample),
        "donor_response": {
            f"{tp}_vs_baseline": {
                d: _r(r) for d, r in zip(sim.DONORS, cohort.donor_response[tp], strict=True)
            }
            for tp in sim.TIMEPOINTS[1:]
        },
        "covariates": {
            "plasma_betaine_um": (
                "baseline ~ N(35, 5) per donor + N(0, 2.5) per sample; longterm adds "
                "12 * donor_response['longterm_vs_baseline'], so across donors the betaine "
                "rise tracks the drop of the planted long-term programmes"
            )
        },
        "model": {
            "counts": "gamma-Poisson (negative binomial) around per-cell means",
            "median_umi": sim.MEDIAN_UMI,
            "library_size_log_sd": sim.LIBRARY_SD,
            "donor_gene_log_sd": sim.DONOR_SD,
            "donor_type_gene_log_sd": sim.DONOR_TYPE_SD,
            "batch_gene_log_sd": sim.BATCH_SD,
            "sample_gene_log_sd": sim.SAMPLE_SD,
            "sample_type_gene_log_sd": sim.SAMPLE_TYPE_SD,
            "nuisance_effects_depend_on_timepoint": False,
            "ambient_soup": "donor base composition + 10% haemoglobin; fraction per sample",
        },
        "samples": per_sample,
    }


def demo_cohort(
    outdir: str | Path,
    *,
    size: Size = "default",
    seed: int = 0,
    n_cells: int | None = None,
    transient_state: bool | Mapping[str, Any] = True,
) -> DemoCohort:
    """Write a synthetic 13-donor x 3-timepoint PBMC cohort with planted effects.

    Thirteen donors (``D01`` .. ``D13``) are sampled at ``baseline``, ``acute``
    (one 5 km run) and ``longterm`` (25 days of running): 39 samples of 13 PBMC
    cell types, negative-binomial counts over about 3,000 real genes (GENCODE
    v44 ids and symbols), with donor, batch and sample effects, ambient RNA,
    mitochondrial reads, ~3-5 % low-quality cells and ~4-6 % doublets.

    Planted (see ``truth.json``): long-term running lowers cGAS-STING/TBK1,
    type-I IFN and senescence genes in CD14 monocytes and CD8 memory T cells
    (log2FC -0.9); the acute run raises NF-kB/inflammatory genes in CD14 and
    CD16 monocytes (log2FC +1.0) and raises NK and CD8 memory abundance (x1.8);
    long-term raises naive CD4 and CD8 T abundance (x1.3). Each donor's
    response is scaled by a donor factor (mean 1, sd 0.25). Every other
    cell type x programme carries no effect; no nuisance effect depends on the
    timepoint. At ``acute`` only, 30 % of the CD8 memory T cells are in a
    transient CX3CR1+ effector state (nine genes outside every marker panel and
    gene set switched on, granzymes and perforin up, GZMK down;
    ``truth.json["transient_state"]``, ``state`` column of
    ``truth_cells.tsv.gz``): a test case for integration (does the batch
    correction keep a state that exists at one timepoint?).

    Samples are generated and written one at a time (sparse, in blocks of
    cells per type), so memory is bounded by the largest sample.

    Parameters
    ----------
    outdir
        Directory to write; created if needed. It must be empty or hold only a
        previous demo's outputs (those are replaced).
    size
        ``"ci"`` (3,000 cells, a few seconds), ``"default"`` (30,000 cells) or
        ``"large"`` (250,000 cells unless ``n_cells`` says otherwise).
    seed
        Same seed and size give byte-identical files; another seed gives other counts.
    n_cells
        Total cells (overrides the size's preset), from 780 to 1,000,000.
    transient_state
        Plant the one-timepoint state of ``simulator.yaml``; a mapping replaces
        some of its fields (``share_of_type``, ``umi_per_gene``, ``shifted``,
        ...: a benchmark's weaker or rarer state); ``False`` plants none. Every
        other cell's counts are the same either way (``truth.json["transient_state"]``
        is ``null`` without a state).

    Returns
    -------
    :class:`DemoCohort` with the paths written and the number of cells.

    Raises
    ------
    ValueError
        Unknown ``size`` or ``n_cells`` out of range.
    pipeline.errors.InputError
        ``outdir`` holds files that are not a previous demo's.

    Examples
    --------
    >>> from pipeline.datasets import demo_cohort
    >>> demo = demo_cohort("demo_ci", size="ci")  # doctest: +SKIP
    >>> demo.samplesheet  # doctest: +SKIP
    PosixPath('demo_ci/samplesheet.csv')
    """
    if size not in get_args(Size):
        raise ValueError(f"size must be one of {get_args(Size)}, not {size!r}")
    n_total = SIZES[size] if n_cells is None else int(n_cells)
    if not MIN_CELLS <= n_total <= MAX_CELLS:
        raise ValueError(f"n_cells must be between {MIN_CELLS} and {MAX_CELLS}, not {n_total}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed!r}")
    seed = int(seed)
    outdir = Path(outdir)
    _prepare_outdir(outdir)
    (outdir / "counts").mkdir()

    cohort = sim.build_cohort(seed, n_total, transient_state=transient_state)
    state_key = cohort.transient_state.key if cohort.transient_state is not None else ""
    genes = cohort.genes
    per_sample: list[dict[str, Any]] = []
    truth_cells = outdir / "truth_cells.tsv.gz"
    with (
        open(truth_cells, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="", compresslevel=6) as gz,
    ):
        gz.write(("\t".join(_TRUTH_COLUMNS) + "\n").encode())
        for spec in cohort.samples:
            cells = sim.simulate_sample(cohort, spec.index)
            _write_counts(_anndata(cells, genes), outdir / spec.path, spec.fmt)
            gz.write(_truth_lines(spec, cells, state_key).encode())
            by_type = pd.Series(cells.cell_type[~cells.is_doublet]).value_counts()
            per_sample.append(
                {
                    "sample": spec.sample,
                    "donor": spec.donor,
                    "timepoint": spec.timepoint,
                    "batch": spec.batch,
                    "format": spec.fmt,
                    "path": spec.path,
                    "n_cells": int(cells.counts.shape[0]),
                    "n_doublets": int(cells.is_doublet.sum()),
                    "n_low_quality": int(cells.is_low_quality.sum()),
                    "n_transient_state": int(cells.in_state.sum()),
                    "n_singlets_by_type": {
                        ct.name: int(by_type.get(ct.name, 0)) for ct in cohort.cell_types
                    },
                    "proportions": {
                        ct.name: _r(p)
                        for ct, p in zip(cohort.cell_types, spec.proportions, strict=True)
                    },
                    "depth_factor": _r(spec.depth),
                    "ambient_fraction": _r(spec.ambient),
                    "mito_factor": _r(spec.mito_factor),
                    "doublet_rate": _r(spec.doublet_rate),
                    "low_quality_rate": _r(spec.low_quality_rate),
                }
            )
            del cells

    sheet = outdir / "samplesheet.csv"
    with open(sheet, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow([*keys.SHEET_REQUIRED, "age", "batch"])
        for s in cohort.samples:
            w.writerow([s.sample, s.donor, s.timepoint, s.path, s.age, s.batch])
    covariates = outdir / "covariates.csv"
    with open(covariates, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow([keys.SAMPLE, keys.DONOR, keys.TIMEPOINT, "plasma_betaine_um"])
        for s in cohort.samples:
            w.writerow([s.sample, s.donor, s.timepoint, f"{s.plasma_betaine_um:.2f}"])
    truth = outdir / "truth.json"
    doc = _truth(cohort, size, seed, n_total, per_sample)
    truth.write_text(json.dumps(doc, indent=1) + "\n")
    return DemoCohort(
        outdir=outdir,
        samplesheet=sheet,
        truth=truth,
        n_cells=doc["n_cells"],
        size=size,
        seed=seed,
        truth_cells=truth_cells,
        covariates=covariates,
    )
