"""Run facts: per-stage wall time and peak memory, package versions, machine.

``provenance.json`` in the output directory is assembled from the stage
stamps (each stamp carries its own timing, memory, device and warnings) plus
run-level facts, so per-sample Slurm tasks never race on one shared file.
"""

from __future__ import annotations

import os
import platform
import resource
import socket
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["PACKAGES", "ResourceMeter", "machine_info", "package_versions"]

#: Packages whose versions provenance records.
PACKAGES = (
    "immuneage",
    "anndata",
    "scanpy",
    "scvi-tools",
    "torch",
    "numpy",
    "scipy",
    "pandas",
    "h5py",
    "pydantic",
    "pydeseq2",
    "decoupler",
    "statsmodels",
    "rapids-singlecell",
    "cupy-cuda12x",
    "cupy-cuda13x",
)


def package_versions() -> dict[str, str | None]:
    """Installed version of each package in :data:`PACKAGES` (None when absent)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict[str, Any]:
    """Host, platform, Python and CPU facts."""
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
    }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the process-lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ResourceMeter:
    """Measure wall time, CPU time (all threads of the process) and peak resident memory of a block.

    A background thread samples RSS every ``interval`` seconds; the process
    high-water mark (``ru_maxrss``) bounds it from above when it grew during
    the block.

    Examples
    --------
    >>> with ResourceMeter() as m:
    ...     _ = bytearray(10_000_000)
    >>> m.wall_s >= 0 and m.peak_rss_mb > 0
    True
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self.started = ""
        self.peak_rss_mb = 0.0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __enter__(self) -> ResourceMeter:
        self._t0 = time.perf_counter()
        self._cpu0 = time.process_time()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self._peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.wall_s = time.perf_counter() - self._t0
        self.cpu_s = time.process_time() - self._cpu0
        peak = max(self._peak, _rss_bytes())
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if maxrss > self._maxrss0:  # a new process high-water mark was set inside the block
            peak = max(peak, maxrss * 1024)
        self.peak_rss_mb = peak / 2**20
