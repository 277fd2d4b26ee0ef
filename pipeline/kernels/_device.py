"""Device resolution and transfers back to the host for the torch kernels.

The runner resolves the device once per run with :func:`resolve_device` and passes
the resulting :class:`torch.device` to every kernel. A GPU that was asked for but is
not usable is an error, never a silent fall-back to the CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import torch
from scipy import sparse

from pipeline.errors import InputError

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = ["DeviceRequest", "as_device", "resolve_device", "to_numpy", "to_scipy_csr"]

DeviceRequest = Literal["auto", "cpu", "gpu"]


def resolve_device(requested: DeviceRequest) -> torch.device:
    """Turn the configured device request into a :class:`torch.device`.

    Parameters
    ----------
    requested
        ``"cpu"``: the CPU. ``"gpu"``: the current CUDA device; an error when CUDA is
        not usable. ``"auto"``: the CUDA device when one is usable, else the CPU.

    Returns
    -------
    torch.device
        ``device("cuda")`` or ``device("cpu")``.

    Raises
    ------
    InputError
        ``requested`` is not one of the three choices, or ``"gpu"`` was requested and
        :func:`torch.cuda.is_available` is false.
    """
    valid = get_args(DeviceRequest)
    if requested not in valid:
        msg = f"device must be one of {', '.join(map(repr, valid))}, not {requested!r}."
        raise InputError(msg)
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "gpu":
        msg = (
            "device 'gpu' was requested but no usable CUDA device was found "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
            "Run on a GPU node with a CUDA build of torch, or set `device: cpu` "
            "(or `auto`) in the config."
        )
        raise InputError(msg)
    return torch.device("cpu")


def as_device(device: torch.device | str) -> torch.device:
    """Return ``device`` as a :class:`torch.device` (accepts ``"cpu"``, ``"cuda"``, ...)."""
    return device if isinstance(device, torch.device) else torch.device(device)


def to_numpy(t: torch.Tensor) -> NDArray:
    """Copy a dense tensor to a host :class:`numpy.ndarray` (a view for CPU tensors)."""
    return t.detach().cpu().numpy()


def to_scipy_csr(t: torch.Tensor) -> sparse.csr_matrix:
    """Copy a torch sparse CSR tensor to a host :class:`scipy.sparse.csr_matrix`.

    Parameters
    ----------
    t
        A 2-D tensor with layout :data:`torch.sparse_csr`, on any device.

    Returns
    -------
    scipy.sparse.csr_matrix
        Same shape, values and sparsity structure (explicit zeros are kept).
    """
    if t.layout != torch.sparse_csr:
        msg = f"expected a sparse CSR tensor, got layout {t.layout}"
        raise TypeError(msg)
    crow = to_numpy(t.crow_indices())
    col = to_numpy(t.col_indices())
    values = to_numpy(t.values())
    largest = max(col.size, *t.shape)
    index_dtype = np.int32 if largest < np.iinfo(np.int32).max else np.int64
    return sparse.csr_matrix(
        (values, col.astype(index_dtype, copy=False), crow.astype(index_dtype, copy=False)),
        shape=tuple(t.shape),
    )
