"""Progress for long steps: a bar on a terminal, a plain line now and then elsewhere.

Everything goes through the ``immuneage`` logger, so ``--quiet`` (level WARNING)
silences it and the run log under ``<outdir>/logs/`` records it. On a terminal
(stderr is a TTY) a tqdm bar is drawn; on a non-terminal (Slurm logs, CI, a
notebook's captured stderr) one plain line is logged at most every
:func:`interval` seconds, plus a last line when the step ends::

    [immuneage 12:01:07] scVI: epoch 12/25 (48%), train loss 1034.2, 41 s elapsed, ~44 s left

The interval is ``IMMUNEAGE_PROGRESS_INTERVAL`` seconds (default 30).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["ProgressLine", "interactive", "interval", "progress", "step", "verbose"]

log = logging.getLogger("immuneage")
T = TypeVar("T")


def verbose() -> bool:
    """Whether progress is wanted at all (the ``immuneage`` logger shows INFO)."""
    return log.isEnabledFor(logging.INFO)


def interactive() -> bool:
    """Whether to draw bars: the terminal shows INFO (not ``--quiet``) and stderr is a TTY.

    The terminal is the handler the CLI installs (marked ``console``); without it
    (a library call) no bar is drawn. ``IMMUNEAGE_PROGRESS=lines`` forces lines.
    """
    console = [h for h in log.handlers if getattr(h, "console", False)]
    if not console or console[0].level > logging.INFO or not verbose():
        return False
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty and os.environ.get("IMMUNEAGE_PROGRESS") != "lines"


def interval() -> float:
    """Seconds between two plain progress lines (``IMMUNEAGE_PROGRESS_INTERVAL``, default 30)."""
    try:
        return max(0.0, float(os.environ.get("IMMUNEAGE_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


def _fmt_s(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class ProgressLine:
    """Plain progress lines for a step of ``total`` units, at most one per :func:`interval`.

    Parameters
    ----------
    desc
        What is progressing (``"scVI"``, ``"pseudobulk DE"``).
    total
        Number of units (``None``: unknown, no percentage or time left).
    unit
        Name of one unit (``"epoch"``, ``"cell type"``).
    """

    def __init__(self, desc: str, total: int | None, unit: str = "step") -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.t0 = time.perf_counter()
        self._last = self.t0
        self.done = 0

    def update(self, done: int, detail: str = "", *, final: bool = False) -> None:
        """Record that ``done`` units are complete; log a line when due (or ``final``)."""
        self.done = done
        now = time.perf_counter()
        if not verbose() or (not final and now - self._last < interval()):
            return
        self._last = now
        elapsed = now - self.t0
        parts = [f"{self.unit} {done}"]
        if self.total:
            parts = [f"{self.unit} {done}/{self.total} ({100 * done / self.total:.0f}%)"]
        if detail:
            parts.append(detail)
        parts.append(f"{_fmt_s(elapsed)} elapsed")
        if self.total and 0 < done < self.total:
            parts.append(f"~{_fmt_s(elapsed / done * (self.total - done))} left")
        log.info("%s: %s", self.desc, ", ".join(parts))


def progress(
    iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "step"
) -> Iterator[T]:
    """Iterate with progress: a tqdm bar on a terminal, plain lines otherwise, nothing when quiet.

    Parameters
    ----------
    iterable
        What to iterate over.
    desc
        What is progressing.
    total
        Number of items (default ``len(iterable)`` when it has one).
    unit
        Name of one item.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if interactive():
        from tqdm.auto import tqdm

        yield from tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False)
        return
    line = ProgressLine(desc, total, unit)
    i = 0
    for i, item in enumerate(iterable, 1):
        yield item
        line.update(i, final=total is not None and i == total)


@contextlib.contextmanager
def step(desc: str) -> Iterator[dict[str, Any]]:
    """Log the start and the end (with wall time) of one step that has no inner progress.

    Yields a dict; a ``"detail"`` put there is added to the end line.
    """
    t0 = time.perf_counter()
    log.info("%s ...", desc)
    info: dict[str, Any] = {}
    yield info
    extra = f" ({info['detail']})" if info.get("detail") else ""
    log.info("%s: done in %s%s", desc, _fmt_s(time.perf_counter() - t0), extra)


def lightning_callback(desc: str, max_epochs: int) -> Any:
    """A Lightning callback that logs plain :class:`ProgressLine` lines per epoch.

    For non-terminal runs, where the library's own bar would write carriage
    returns into a log file: pass it in ``callbacks=[...]`` with
    ``enable_progress_bar=False``. The line carries the epoch's train loss
    (``train_loss_epoch``, or the first logged metric with ``loss`` in its name).
    """
    from lightning.pytorch.callbacks import Callback

    class _EpochLines(Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.line = ProgressLine(desc, max_epochs, "epoch")

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            metrics = trainer.callback_metrics
            name = next(
                (k for k in ("train_loss_epoch", "train_loss", "elbo_train") if k in metrics), None
            )
            if name is None:
                name = next((k for k in metrics if "loss" in k), None)
            detail = ""
            if name is not None:
                with contextlib.suppress(Exception):
                    detail = (
                        f"{name.replace('_epoch', '').replace('_', ' ')} {float(metrics[name]):.1f}"
                    )
            done = trainer.current_epoch + 1
            self.line.update(done, detail, final=done >= (trainer.max_epochs or max_epochs))

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.line.done < (trainer.max_epochs or max_epochs):  # early stopping
                self.line.update(self.line.done, "stopped early", final=True)

    return _EpochLines()
