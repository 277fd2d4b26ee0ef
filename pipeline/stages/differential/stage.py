"""The ``differential`` stage: the four analyses on the scored cells, tables and a pseudobulk AnnData."""

from __future__ import annotations

import json
import warnings
from typing import TYPE_CHECKING

import pandas as pd
from anndata import AnnData

from ... import keys
from ...errors import ImmuneageWarning
from .._base import StageResult

if TYPE_CHECKING:
    import torch

    from ...config import Config
from ._common import (
    DROPPED_COLUMNS,
    SIGNATURES_KEY,
    _check_obs,
    _dropped,
    _frame,
    _sample_table,
    _signature_columns,
    signature_roles,
)
from .composition import absolute_composition_tests, composition_tests
from .covariates import covariate_associations, read_covariates
from .de import SUMMARY_COLUMNS, pseudobulk, pseudobulk_de
from .design import _check_design, absolute_totals, covariate_columns
from .enrichment import ENRICHMENT_COLUMNS, signature_enrichment
from .shifts import (
    shift_warnings,
    signature_global_tests,
    signature_means,
    signature_shift_tests,
)


def run_differential(
    adata: AnnData, cfg: Config, *, device: torch.device | str = "cpu"
) -> StageResult:
    """Test what changes between timepoints per cell type, donors as replicates.

    Parameters
    ----------
    adata
        Output of ``score``: obs ``sample``, ``donor``, ``timepoint``,
        ``cell_type`` and ``score_<set>`` columns; ``uns["immuneage"]["signatures"]``
        (set -> genes); ``layers["counts"]`` raw counts.
    cfg
        Run configuration (reads ``design`` and ``differential``; ``chunk_size`` for
        counts read from disk).
    device
        The run's device (the work here is host-side statistics).

    Returns
    -------
    StageResult whose AnnData is the pseudobulk (obs ``donor``, ``timepoint``,
    ``cell_type``, ``sample``, ``n_cells``; ``X`` the summed raw counts, sparse;
    ``uns["immuneage"]["differential"]`` the parameters and a summary) and the
    tables ``signature_means``, ``signature_shifts``, ``pseudobulk_de_summary``,
    ``pseudobulk_de/<cell_type>__<contrast>``, ``signature_enrichment``,
    ``composition``, ``composition_absolute`` (with ``absolute_total_column``),
    ``covariate_associations`` (with covariates) and
    ``differential_dropped`` (columns: ``docs/outputs.md``).

    Raises
    ------
    InputError
        Missing obs columns or counts, a bad covariates file, or no test at
        all can run (the message says why).
    """
    dcfg = cfg.differential
    obs = adata.obs
    _check_obs(obs)
    samples = _sample_table(obs)
    contrasts = list(cfg.design.contrasts)
    present_tps = set(samples[keys.TIMEPOINT])
    dropped: list[dict[str, str]] = []
    for c in contrasts:
        absent = [tp for tp in (c.reference, c.test) if tp not in present_tps]
        if absent:
            msg = f"contrast {c.name}: no sample at timepoint(s) {', '.join(absent)}; it yields no rows"
            warnings.warn(f"differential: {msg}", ImmuneageWarning, stacklevel=2)
            dropped.append(_dropped("all", c.name, "", "", ",".join(absent), msg))
    _check_design(samples, contrasts, dcfg.min_donors)
    lone = samples.groupby(keys.DONOR)[keys.TIMEPOINT].nunique()
    for d in lone.index[lone < 2]:
        tp = samples.loc[samples[keys.DONOR] == d, keys.TIMEPOINT].iloc[0]
        dropped.append(
            _dropped(
                "all",
                "",
                "",
                str(d),
                str(tp),
                "donor sampled at one timepoint only: enters no paired test",
            )
        )
    if (lone < 2).any():
        warnings.warn(
            f"differential: donor(s) {', '.join(map(str, lone.index[lone < 2]))} have one timepoint "
            "only and enter no paired test (see tables/differential_dropped.tsv)",
            ImmuneageWarning,
            stacklevel=2,
        )

    score_cols, gene_sets = _signature_columns(adata)
    if not score_cols:
        warnings.warn(
            "differential: no score_<set> columns in obs; signature shifts, enrichment and "
            "covariate associations are skipped",
            ImmuneageWarning,
            stacklevel=2,
        )
    means = signature_means(obs, score_cols, min_cells=dcfg.min_cells)
    for _, r in (
        means.loc[~means["passes_min_cells"].astype(bool)]
        .drop_duplicates([keys.DONOR, keys.TIMEPOINT, keys.CELL_TYPE])
        .iterrows()
    ):
        dropped.append(
            _dropped(
                "signature_means",
                "",
                r[keys.CELL_TYPE],
                r[keys.DONOR],
                r[keys.TIMEPOINT],
                f"{int(r['n_cells'])} cells < min_cells {dcfg.min_cells}: left out of the tests",
            )
        )
    shifts, d_shift = signature_shift_tests(
        means,
        contrasts,
        samples,
        test=dcfg.test,
        min_cells=dcfg.min_cells,
        min_donors=dcfg.min_donors,
        primary=dcfg.primary,
        roles=signature_roles(adata),
        optimizers=dcfg.mixed_optimizers,
    )
    dropped += d_shift
    for text in shift_warnings(shifts, contrasts, min_donors=dcfg.min_donors, primary=dcfg.primary):
        warnings.warn(text, ImmuneageWarning, stacklevel=2)
    global_tests, d_global = signature_global_tests(
        means,
        samples,
        timepoints=cfg.design.timepoints if dcfg.global_test else [],
        min_cells=dcfg.min_cells,
        min_donors=dcfg.min_donors,
        primary=dcfg.primary,
        roles=signature_roles(adata),
    )
    dropped += d_global

    pb = pseudobulk(adata, chunk_size=cfg.chunk_size)
    de_tables: dict[str, pd.DataFrame] = {}
    de_summary = pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    if dcfg.deseq:
        de_tables, de_summary, d_de = pseudobulk_de(pb, contrasts, dcfg)
        dropped += d_de
    enrichment = pd.DataFrame(columns=list(ENRICHMENT_COLUMNS))
    if dcfg.enrichment != "none" and de_tables:
        if gene_sets:
            enrichment = signature_enrichment(
                de_tables,
                gene_sets,
                min_genes=dcfg.enrichment_min_genes,
                method=dcfg.enrichment,
                pseudobulks=pb,
                pseudobulk_min_cells=dcfg.pseudobulk_min_cells,
            )
        else:
            warnings.warn(
                f"differential: uns['{keys.UNS}']['{SIGNATURES_KEY}'] (genes of each signature) is "
                "missing; signature enrichment is skipped",
                ImmuneageWarning,
                stacklevel=2,
            )

    composition, d_comp = composition_tests(
        obs,
        contrasts,
        samples,
        method=dcfg.composition_method,
        transform=dcfg.composition_transform,
        moderate=dcfg.composition_moderate,
        min_prevalence=dcfg.composition_min_prevalence,
        min_prop=dcfg.composition_min_prop,
        pseudocount=dcfg.pseudocount,
        log_ratios=dcfg.log_ratios,
        min_donors=dcfg.min_donors,
    )
    dropped += d_comp
    composition_absolute = None
    if dcfg.absolute_total_column is not None:
        composition_absolute, d_abs = absolute_composition_tests(
            obs,
            contrasts,
            samples,
            absolute_totals(cfg, samples),
            total_column=dcfg.absolute_total_column,
            min_prevalence=dcfg.composition_min_prevalence,
            min_prop=dcfg.composition_min_prop,
            pseudocount=dcfg.pseudocount,
            min_donors=dcfg.min_donors,
        )
        dropped += d_abs

    tables: dict[str, pd.DataFrame] = {}
    cov_columns = None if dcfg.covariates is None else covariate_columns(cfg, dcfg.covariates)
    if cov_columns != [] and dcfg.covariates is not None:
        cov = read_covariates(dcfg.covariates, samples, cov_columns)
        assoc, d_cov = covariate_associations(
            means,
            cov,
            min_donors=dcfg.min_donors,
            adjust_timepoint=dcfg.covariate_adjust_timepoint,
            optimizers=dcfg.mixed_optimizers,
        )
        dropped += d_cov
        tables["covariate_associations"] = assoc

    n_de = len(de_tables)
    if shifts.empty and composition.empty and n_de == 0:
        warnings.warn(
            "differential: the design allows paired tests but no cell type had enough cells "
            f"(>= {dcfg.min_cells} per donor x timepoint in >= {dcfg.min_donors} donors) and no "
            "composition test ran; all tables are empty (is every cell 'unassigned'? see "
            "tables/cell_type_counts.tsv and tables/differential_dropped.tsv)",
            ImmuneageWarning,
            stacklevel=2,
        )
    for c in contrasts:
        if c.name not in set(shifts["contrast"]) and c.name not in set(composition["contrast"]):
            warnings.warn(
                f"differential: contrast {c.name} yields no signature-shift or composition rows "
                "(too few donors with both timepoints; see tables/differential_dropped.tsv)",
                ImmuneageWarning,
                stacklevel=2,
            )
    untested = sorted(
        {(r["contrast"], r["cell_type"]) for r in d_shift if r["donor"] == "" and r["cell_type"]}
    )
    if untested:
        warnings.warn(
            f"differential: {len(untested)} cell type x contrast pair(s) not tested for signature "
            f"shifts (fewer than {dcfg.min_donors} donors with >= {dcfg.min_cells} cells at both "
            f"timepoints), e.g. {untested[0][1]} in {untested[0][0]}; see tables/differential_dropped.tsv",
            ImmuneageWarning,
            stacklevel=2,
        )

    tables |= {
        "signature_means": means,
        "signature_shifts": shifts,
        "signature_global": global_tests,
        "pseudobulk_de_summary": de_summary,
        "signature_enrichment": enrichment,
        "composition": composition,
        **({} if composition_absolute is None else {"composition_absolute": composition_absolute}),
        "differential_dropped": _frame(dropped, DROPPED_COLUMNS).drop_duplicates(ignore_index=True),
    }
    tables |= de_tables
    pb.uns[keys.UNS] = {
        "differential": {
            "test": dcfg.test,
            "min_cells": dcfg.min_cells,
            "min_donors": dcfg.min_donors,
            "contrasts": [c.name for c in contrasts],
            "signatures": list(score_cols),
            "n_signature_tests": len(shifts),
            "n_signature_q_lt_0_1": int((shifts["q_value"] < 0.1).sum()) if len(shifts) else 0,
            "signature_families": {
                str(k): int(v) for k, v in shifts["family"].value_counts().items()
            },
            "primary": json.dumps(dcfg.primary),  # a string: keys may hold '/' (h5py paths)
            "n_global_tests": len(global_tests),
            "n_de_tables": n_de,
            "enrichment": dcfg.enrichment,
            "n_enrichment_q_lt_0_1": int((enrichment["q_value"] < 0.1).sum()),
            "n_dropped": len(dropped),
            "device": str(device),
            "pseudocount": dcfg.pseudocount,
            "composition_method": dcfg.composition_method,
            "composition_transform": dcfg.composition_transform,
            "composition_moderate": dcfg.composition_moderate,
            "composition_min_prevalence": dcfg.composition_min_prevalence,
            "composition_min_prop": dcfg.composition_min_prop,
            "absolute_total_column": dcfg.absolute_total_column or "",
            "n_composition_q_lt_0_1": int((composition["q_value"] < 0.1).sum()),
            "n_composition_absolute_q_lt_0_1": (
                int((composition_absolute["q_value"] < 0.1).sum())
                if composition_absolute is not None
                else 0
            ),
            "covariate_adjust_timepoint": dcfg.covariate_adjust_timepoint,
            "mixed_optimizers": list(dcfg.mixed_optimizers),
        }
    }
    return StageResult(adata=pb, tables=tables)
