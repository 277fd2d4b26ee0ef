"""The HTML report: figures (:mod:`.figures`), tables, findings and rendering (:mod:`.render`).

The ``report`` stage (:mod:`pipeline.stages.report`) calls :func:`read_tables`
and :func:`build_report`; both are usable on their own, e.g. to re-render a
report from a finished output directory.
"""

from __future__ import annotations

from .render import (
    TABLES,
    Finding,
    RenderedReport,
    ReportTables,
    build_report,
    key_findings,
    read_tables,
)

__all__ = [
    "TABLES",
    "Finding",
    "RenderedReport",
    "ReportTables",
    "build_report",
    "key_findings",
    "read_tables",
]
