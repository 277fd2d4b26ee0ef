"""Output-directory lock: two runs never write to the same outdir at once.

A whole run holds an exclusive ``flock`` on ``<outdir>/.immuneage.lock`` and
writes its pid, host and start time into it. A per-sample run (one task of a
Slurm array) holds a *shared* lock on that file plus an exclusive lock on its
sample, so array tasks run side by side while a whole run excludes them all.
``flock`` locks vanish with the process, so a run killed with SIGKILL never
leaves a stale lock behind. (On network file systems flock needs lock support:
NFSv4 and Lustre mounted with ``-o flock`` provide it.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import LockError

__all__ = ["LOCK_NAME", "outdir_lock"]

LOCK_NAME = ".immuneage.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        info = {}
    if not info:
        return "another immuneage process (per-sample tasks, e.g. a Slurm array)"
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"


@contextlib.contextmanager
def outdir_lock(outdir: Path, *, sample: str | None = None) -> Iterator[None]:
    """Hold the output directory for the duration of the block.

    Parameters
    ----------
    outdir
        The run's output directory (must exist).
    sample
        For a per-sample unit: take a shared outdir lock and an exclusive lock
        on this sample only.

    Raises
    ------
    LockError
        Another run holds the directory (or this sample).
    """
    path = Path(outdir) / LOCK_NAME
    fh = open(path, "a+")  # noqa: SIM115 - held for the whole block
    sample_fh = None
    try:
        mode = fcntl.LOCK_SH if sample else fcntl.LOCK_EX
        try:
            fcntl.flock(fh.fileno(), mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockError(
                f"output directory {outdir} is in use by {_holder(path)}; wait for that run to "
                "finish, or choose another --outdir"
            ) from None
        if sample is None:
            fh.seek(0)
            fh.truncate()
            fh.write(
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    }
                )
            )
            fh.flush()
        else:
            locks = Path(outdir) / ".locks"
            locks.mkdir(exist_ok=True)
            sample_fh = open(locks / f"{sample}.lock", "a+")  # noqa: SIM115
            try:
                fcntl.flock(sample_fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockError(
                    f"sample {sample!r} in {outdir} is being processed by another immuneage "
                    "task; do not submit the same sample twice"
                ) from None
        yield
    finally:
        if sample_fh is not None:
            sample_fh.close()
        if sample is None:
            with contextlib.suppress(OSError):
                fh.seek(0)
                fh.truncate()
        fh.close()
