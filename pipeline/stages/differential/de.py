"""(b) Pseudobulk differential expression: counts summed per donor x timepoint x type, PyDESeq2."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ... import keys
from ...errors import ImmuneageWarning, InputError
from ...kernels.sparse import DEFAULT_CHUNK_SIZE
from ...progress import progress
from ...stats.deseq import deseq2_contrasts
from ...stats.pseudobulk import filter_genes, pseudobulk_sum

if TYPE_CHECKING:
    from ...config import Contrast, DifferentialConfig
from ._common import (
    _categories,
    _contrast_pairs,
    _dropped,
    _frame,
    _sample_table,
    de_table_name,
)

SUMMARY_COLUMNS = (
    "cell_type",
    "contrast",
    "n_donors",
    "n_pseudobulks",
    "n_genes_tested",
    "n_q_lt_0_1",
    "status",
    "table",
)


def pseudobulk(
    adata: AnnData, *, layer: str = keys.COUNTS, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> AnnData:
    """Raw counts summed per donor x timepoint x cell type (``unassigned`` left out).

    Parameters
    ----------
    adata
        Cells with raw counts in ``layers[layer]`` (sparse in memory, or an
        on-disk row source in backed mode) and obs ``sample``, ``donor``,
        ``timepoint``, ``cell_type``.
    layer
        Layer of raw counts.
    chunk_size
        Rows per block when the counts are read from disk.

    Returns
    -------
    AnnData with ``X`` the summed counts (CSR, float64, integral), obs
    ``donor``, ``timepoint`` (categories as in the input), ``cell_type``,
    ``sample``, ``n_cells``; obs names ``<sample>|<cell_type>``; var = the input's var names.
    """
    if layer not in adata.layers:
        raise InputError(
            f"differential: layers[{layer!r}] (raw counts) is missing; pseudobulk DE needs raw "
            "counts (written by ingest and carried by every stage)"
        )
    obs = adata.obs
    ct = obs[keys.CELL_TYPE].astype(str)
    groups = pd.DataFrame(
        {
            keys.CELL_TYPE: pd.Categorical(
                ct.where(ct != keys.UNASSIGNED),
                categories=[c for c in _categories(obs[keys.CELL_TYPE]) if c != keys.UNASSIGNED],
            ),
            keys.DONOR: obs[keys.DONOR].astype(str).to_numpy(),
            keys.TIMEPOINT: obs[keys.TIMEPOINT].to_numpy(),
        },
        index=obs.index,
    )
    if isinstance(obs[keys.TIMEPOINT].dtype, pd.CategoricalDtype):
        groups[keys.TIMEPOINT] = obs[keys.TIMEPOINT]
    counts = adata.layers[layer]
    sums, table = pseudobulk_sum(counts, groups, chunk_size=chunk_size)
    s2s = _sample_table(obs).set_index([keys.DONOR, keys.TIMEPOINT])[keys.SAMPLE]
    table[keys.SAMPLE] = [
        s2s.get((str(d), str(t)), "")
        for d, t in zip(table[keys.DONOR], table[keys.TIMEPOINT], strict=True)
    ]
    table.index = [
        f"{s}|{c}" for s, c in zip(table[keys.SAMPLE], table[keys.CELL_TYPE], strict=True)
    ]
    table = table[[keys.DONOR, keys.TIMEPOINT, keys.CELL_TYPE, keys.SAMPLE, "n_cells"]]
    return AnnData(X=sums, obs=table, var=pd.DataFrame(index=adata.var_names.copy()))


def pseudobulk_de(
    pb: AnnData,
    contrasts: Iterable[Contrast],
    dcfg: DifferentialConfig,
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, list[dict[str, str]]]:
    """PyDESeq2 per cell type on the pseudobulks, Wald test per contrast.

    Parameters
    ----------
    pb
        :func:`pseudobulk` output.
    contrasts
        The design's contrasts.
    dcfg
        ``differential`` config (``pseudobulk_min_cells``, ``gene_min_counts``,
        ``gene_min_samples``, ``min_donors``, ``shrink``, ``n_cpus``).

    Returns
    -------
    Tables keyed by :func:`de_table_name` (``gene, base_mean, log2fc, lfc_se,
    stat, p_value, q_value`` [+ ``log2fc_shrunk``]; attribute
    ``attrs["cell_type"]``/``attrs["contrast"]``), the ``pseudobulk_de_summary``
    table and the dropped rows.
    """
    pairs = _contrast_pairs(contrasts)
    tables: dict[str, pd.DataFrame] = {}
    summary: list[dict[str, Any]] = []
    dropped: list[dict[str, str]] = []
    obs = pb.obs
    x = pb.X.tocsr() if sp.issparse(pb.X) else sp.csr_matrix(pb.X)
    frac = np.abs(x.data - np.rint(x.data))
    if frac.size and frac.max() > 1e-6:
        raise InputError(
            f"differential: the pseudobulks hold {int((frac > 1e-6).sum())} non-integer value(s) "
            f"(e.g. {x.data[int(frac.argmax())]:.6g}): layers['{keys.COUNTS}'] must hold raw "
            "integer UMI counts for PyDESeq2, and they are never rounded silently. Was the layer "
            "replaced by normalised or corrected values? Set differential.deseq: false to skip DE"
        )
    cell_types = _categories(obs[keys.CELL_TYPE])
    for ct in progress(cell_types, desc="pseudobulk DE (PyDESeq2)", unit="cell type"):
        in_ct = (obs[keys.CELL_TYPE].astype(str) == ct).to_numpy()
        small = in_ct & (obs["n_cells"].to_numpy() < dcfg.pseudobulk_min_cells)
        for i in np.flatnonzero(small):
            dropped.append(
                _dropped(
                    "pseudobulk_de",
                    "",
                    ct,
                    str(obs[keys.DONOR].iloc[i]),
                    str(obs[keys.TIMEPOINT].iloc[i]),
                    f"pseudobulk of {int(obs['n_cells'].iloc[i])} cells < pseudobulk_min_cells "
                    f"{dcfg.pseudobulk_min_cells}",
                )
            )
        keep = in_ct & ~small
        sub = obs.loc[keep]
        per_donor = sub.groupby(keys.DONOR, observed=True).size()
        lone = per_donor.index[per_donor < 2]
        for d in lone:
            tp = str(sub.loc[sub[keys.DONOR] == d, keys.TIMEPOINT].iloc[0])
            dropped.append(
                _dropped(
                    "pseudobulk_de",
                    "",
                    ct,
                    str(d),
                    tp,
                    "donor has a usable pseudobulk at one timepoint only (nothing to pair with)",
                )
            )
        keep &= ~obs[keys.DONOR].astype(str).isin(set(map(str, lone))).to_numpy()
        sub = obs.loc[keep]
        tps = {
            tp: set(sub.loc[sub[keys.TIMEPOINT].astype(str) == tp, keys.DONOR].astype(str))
            for tp in set(sub[keys.TIMEPOINT].astype(str))
        }
        testable: list[tuple[str, str, str, int]] = []
        for cname, t_test, t_ref in pairs:
            n = len(tps.get(t_test, set()) & tps.get(t_ref, set()))
            if n < dcfg.min_donors:
                reason = (
                    f"skipped: {n} donor(s) with pseudobulks of >= {dcfg.pseudobulk_min_cells} cells "
                    f"at both {t_ref} and {t_test} (< min_donors {dcfg.min_donors})"
                )
                summary.append(_summary_row(ct, cname, n, int(keep.sum()), 0, 0, reason, ""))
                dropped.append(_dropped("pseudobulk_de", cname, ct, "", "", reason))
            else:
                testable.append((cname, t_test, t_ref, n))
        if not testable:
            continue
        counts = x[np.flatnonzero(keep)].toarray()
        genes = filter_genes(
            counts, min_count=dcfg.gene_min_counts, min_samples=dcfg.gene_min_samples
        )
        n_pb = int(keep.sum())
        n_params = sub[keys.DONOR].nunique() + sub[keys.TIMEPOINT].astype(str).nunique() - 1
        reason = ""
        if int(genes.sum()) < 2:
            reason = (
                f"skipped: {int(genes.sum())} gene(s) with >= {dcfg.gene_min_counts} counts in >= "
                f"{dcfg.gene_min_samples} pseudobulks"
            )
        elif n_pb - n_params < 1:
            reason = f"skipped: {n_pb} pseudobulks leave no residual df for {n_params} coefficients"
        if reason:
            for cname, _, _, n in testable:
                summary.append(_summary_row(ct, cname, n, n_pb, int(genes.sum()), 0, reason, ""))
                dropped.append(_dropped("pseudobulk_de", cname, ct, "", "", reason))
            continue
        cdf = pd.DataFrame(
            counts[:, genes], index=sub.index.astype(str), columns=pb.var_names[genes].astype(str)
        )
        meta = pd.DataFrame(
            {
                "donor": sub[keys.DONOR].astype(str).to_numpy(),
                "timepoint": sub[keys.TIMEPOINT].astype(str).to_numpy(),
            },
            index=cdf.index,
        )
        try:
            res, notes = deseq2_contrasts(
                cdf,
                meta,
                [(t, r) for _, t, r, _ in testable],
                shrink=dcfg.shrink,
                n_cpus=dcfg.n_cpus,
            )
        except Exception as exc:
            reason = f"skipped: PyDESeq2 failed ({type(exc).__name__}: {exc})"
            warnings.warn(f"differential: {ct}: {reason}", ImmuneageWarning, stacklevel=2)
            for cname, _, _, n in testable:
                summary.append(_summary_row(ct, cname, n, n_pb, int(genes.sum()), 0, reason, ""))
                dropped.append(_dropped("pseudobulk_de", cname, ct, "", "", reason))
            continue
        for cname, t_test, t_ref, n in testable:
            tab = res[(t_test, t_ref)]
            name = de_table_name(ct, cname)
            tab.attrs = {"cell_type": ct, "contrast": cname}
            tables[name] = tab
            status = "tested" + (f" (PyDESeq2: {'; '.join(notes)})" if notes else "")
            summary.append(
                _summary_row(
                    ct,
                    cname,
                    n,
                    n_pb,
                    int(tab["p_value"].notna().sum()),
                    int((tab["q_value"] < 0.1).sum()),
                    status,
                    name,
                )
            )
    return tables, _frame(summary, SUMMARY_COLUMNS), dropped


def _summary_row(
    ct: str, contrast: str, n: int, n_pb: int, n_genes: int, n_sig: int, status: str, table: str
) -> dict[str, Any]:
    return {
        "cell_type": ct,
        "contrast": contrast,
        "n_donors": n,
        "n_pseudobulks": n_pb,
        "n_genes_tested": n_genes,
        "n_q_lt_0_1": n_sig,
        "status": status,
        "table": table,
    }
