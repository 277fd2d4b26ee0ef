"""Which implementation an array stage runs: scanpy, immuneage's torch kernels, or rapids-singlecell.

Resolved from the config's ``backend`` and the run's device. rapids-singlecell is
imported lazily and only here, so the package imports without it.
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType
from typing import TYPE_CHECKING, Literal

from ..errors import InputError

if TYPE_CHECKING:
    import torch

__all__ = ["Backend", "choose_backend", "rapids"]

Backend = Literal["scanpy", "kernels", "rapids"]
log = logging.getLogger("immuneage")


@functools.cache
def _rapids_import() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("rapids_singlecell"), ""
    except Exception as exc:  # ImportError, or a CUDA/cuML failure at import time
        return None, f"{type(exc).__name__}: {exc}"


def rapids() -> ModuleType:
    """The imported ``rapids_singlecell`` module (call only after choosing ``rapids``)."""
    mod, why = _rapids_import()
    if mod is None:  # pragma: no cover - guarded by choose_backend
        raise InputError(f"rapids-singlecell cannot be imported ({why})")
    return mod


def choose_backend(requested: str, device: torch.device | str) -> Backend:
    """Resolve ``backend: auto|scanpy|kernels|rapids`` for a device.

    Parameters
    ----------
    requested
        The config's ``backend``.
    device
        The run's resolved device (``cpu`` or ``cuda``).

    Returns
    -------
    ``"scanpy"`` on CPU under ``auto``; on CUDA ``"rapids"`` when rapids-singlecell
    imports, else ``"kernels"``.

    Raises
    ------
    InputError
        ``rapids`` was requested without a GPU or without an importable rapids-singlecell.
    """
    dev = getattr(device, "type", str(device))
    if requested in ("scanpy", "kernels"):
        return requested  # type: ignore[return-value]
    if requested == "rapids":
        if dev != "cuda":
            raise InputError(
                "backend 'rapids' needs a GPU, but this run's device is the CPU; set backend: auto"
            )
        mod, why = _rapids_import()
        if mod is None:
            raise InputError(
                f"backend 'rapids' was requested but rapids-singlecell cannot be imported ({why}); "
                'install it (pip install -e ".[gpu-cu12]" or ".[gpu-cu13]") or set backend: auto'
            )
        return "rapids"
    if requested != "auto":
        raise InputError(f"unknown backend {requested!r}; use auto, scanpy, kernels or rapids")
    if dev != "cuda":
        return "scanpy"
    mod, why = _rapids_import()
    if mod is not None:
        return "rapids"
    log.info(
        "rapids-singlecell not importable (%s): using immuneage's torch kernels on the GPU", why
    )
    return "kernels"
