"""Gene-set enrichment of a differential-expression result: univariate linear model (ULM).

For each set, the per-gene Wald statistics ``s_g`` are regressed on the set's
membership ``w_g`` (1 in the set, 0 otherwise) over all tested genes:
``s = a + b w + e``. The score is the t-value of ``b`` and the p-value is
two-sided with ``n_genes - 2`` df. This is decoupler's ``ulm`` with unit weights
(Badia-i-Mompel et al., Bioinformatics Advances 2022), computed here in closed
form so no network resource or API is involved; a test checks the two agree.

Caveat: like every competitive gene-set test it treats genes as independent,
so correlated genes make p-values optimistic; the donor-level signature-shift
test is the primary inference, this is a second view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["ulm"]


def ulm(
    statistics: pd.Series,
    gene_sets: Mapping[str, Sequence[str]],
    *,
    min_genes: int = 5,
) -> pd.DataFrame:
    """ULM score and p-value of each gene set on one vector of per-gene statistics.

    Parameters
    ----------
    statistics
        Per-gene statistics (e.g. DESeq2 Wald ``stat``) indexed by gene; NaN
        entries are dropped.
    gene_sets
        Set name -> member genes.
    min_genes
        Sets with fewer members among the tested genes get NaN (decoupler's ``tmin``).

    Returns
    -------
    One row per set: ``signature``, ``n_genes`` (members among the tested
    genes), ``score`` (t-value of the slope), ``p_value``.
    """
    s = statistics[np.isfinite(statistics.to_numpy(dtype=float))].astype(float)
    genes = s.index.astype(str)
    y = s.to_numpy()
    n = y.size
    rows = []
    for name, members in gene_sets.items():
        w = genes.isin(set(map(str, members))).astype(float)
        k = int(w.sum())
        score = p = np.nan
        if k >= min_genes and n - k >= 1 and n > 2:
            wc = w - w.mean()
            sxx = float(wc @ wc)
            b = float(wc @ (y - y.mean())) / sxx
            resid = y - y.mean() - b * wc
            sigma2 = float(resid @ resid) / (n - 2)
            if sigma2 > 0:
                score = b / np.sqrt(sigma2 / sxx)
                p = float(2.0 * stats.t.sf(abs(score), n - 2))
        rows.append({"signature": name, "n_genes": k, "score": score, "p_value": p})
    return pd.DataFrame(rows, columns=["signature", "n_genes", "score", "p_value"])
