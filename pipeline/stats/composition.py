"""Cell-type composition: centred log-ratio (CLR) transform and log-ratios of type groups.

Counts of cells per sample x type are turned into CLR coordinates
``clr_k = log(n_k + c) - mean_j log(n_j + c)`` with a pseudocount ``c``
(default 0.5 cells: the Jeffreys-style half count that keeps a type absent
from a sample finite without dominating types of a few cells). A CLR value is
a type's log-abundance relative to the sample's geometric mean type, so a
paired difference of CLR values across donors is a compositional effect that
does not depend on the sample's total cell count. A log-ratio of two groups of
types (e.g. naive vs memory T cells) is ``log((sum numerator + c) /
(sum denominator + c))``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["DEFAULT_PSEUDOCOUNT", "clr", "group_log_ratio"]

#: Default pseudocount (cells) added before taking logs.
DEFAULT_PSEUDOCOUNT = 0.5


def clr(counts: pd.DataFrame, pseudocount: float = DEFAULT_PSEUDOCOUNT) -> pd.DataFrame:
    """CLR transform of a samples x types count table.

    Parameters
    ----------
    counts
        Non-negative cell counts, one row per sample, one column per type.
    pseudocount
        Added to every count before the log (must be > 0).

    Returns
    -------
    Same shape and labels: ``log(n + c) - row mean of log(n + c)``; each row sums to 0.
    """
    if pseudocount <= 0:
        raise ValueError("pseudocount must be > 0")
    x = counts.to_numpy(dtype=np.float64)
    if np.any(x < 0) or not np.all(np.isfinite(x)):
        raise ValueError("counts must be finite and non-negative")
    lg = np.log(x + pseudocount)
    return pd.DataFrame(
        lg - lg.mean(axis=1, keepdims=True), index=counts.index, columns=counts.columns
    )


def group_log_ratio(
    counts: pd.DataFrame,
    numerator: list[str],
    denominator: list[str],
    pseudocount: float = DEFAULT_PSEUDOCOUNT,
) -> tuple[pd.Series, pd.Series]:
    """Natural log-ratio of two groups of types per sample, and the numerator's share.

    Parameters
    ----------
    counts
        Samples x types cell counts.
    numerator, denominator
        Type names (columns of ``counts``; absent names count 0).
    pseudocount
        Added to each group's total before the log.

    Returns
    -------
    ``log((N + c) / (D + c))`` and ``N / (N + D)`` (NaN when both are 0),
    each indexed like ``counts``.
    """
    num = counts.reindex(columns=numerator, fill_value=0).sum(axis=1).astype(float)
    den = counts.reindex(columns=denominator, fill_value=0).sum(axis=1).astype(float)
    ratio = np.log((num + pseudocount) / (den + pseudocount))
    tot = num + den
    share = num / tot.where(tot > 0)
    return ratio, share
