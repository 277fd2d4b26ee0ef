"""Cap the threads a run uses (``--threads`` / config ``threads``).

On a shared login node or a Slurm allocation, BLAS/OpenMP, torch, numba and
PyDESeq2 each default to every core of the machine. :func:`limit_threads` caps
all of them for a block; the Slurm job scripts set :data:`THREAD_ENV` to the
job's CPUs for the same reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

__all__ = ["THREAD_ENV", "limit_threads"]

log = logging.getLogger("immuneage")

#: Environment variables that cap BLAS/OpenMP/numba threads of a process.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


@contextlib.contextmanager
def limit_threads(n: int | None) -> Iterator[None]:
    """Use at most ``n`` threads inside the block (``None`` or 0: no cap).

    Caps the BLAS/OpenMP pools already loaded (threadpoolctl), torch's intra-op
    threads, numba's threads, and sets :data:`THREAD_ENV` for processes started
    inside the block; everything is restored afterwards. PyDESeq2's processes
    are ``differential.n_cpus`` (default 1); its BLAS threads are capped here.
    """
    if not n:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    torch_before = torch.get_num_threads()
    saved = {v: os.environ.get(v) for v in THREAD_ENV}
    for v in THREAD_ENV:
        os.environ[v] = str(n)
    torch.set_num_threads(n)
    numba_before = None
    with contextlib.suppress(Exception):
        import numba

        numba_before = numba.get_num_threads()
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    log.info("threads: at most %d (BLAS/OpenMP, torch, numba, PyDESeq2)", n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(torch_before)
        if numba_before is not None:
            import numba

            numba.set_num_threads(numba_before)
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old
